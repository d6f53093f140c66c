"""LowRankLinear: a linear factored as W ~= A B (A: (out, r), B: (r, in)), exported as the two factors and
reloaded exactly (truncated SVD / activation-aware SVD, see modelpress.algos.lowrank).

The forward runs through the factors, y = (x B^T) A^T + bias: r (in + out) multiply-adds per token instead
of in * out. For every other part of modelpress that reads `.weight` (size accounting, a later prune or
quantize stage), the module also keeps the dense product A B as its `weight`, derived deterministically."""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .quant import _shell


class LowRankLinear(nn.Linear):
    kind = "LowRankLinear"
    storage_keys = ("bias",)      # stored in the export's storage dtype (A, B keep the compute dtype)

    @classmethod
    def build(cls, lin: nn.Linear, A: Tensor, B: Tensor) -> "LowRankLinear":
        """A (out, r), B (r, in), cast to the linear's dtype."""
        rows, cols = lin.out_features, lin.in_features
        if A.dim() != 2 or B.dim() != 2 or A.shape[0] != rows or B.shape[1] != cols or A.shape[1] != B.shape[0]:
            raise ValueError(f"factors {tuple(A.shape)} x {tuple(B.shape)} do not fit a ({rows}, {cols}) linear")
        dtype, dev = lin.weight.dtype, lin.weight.device
        m = _shell(cls, cols, rows, lin.bias, dtype)
        m.rank = A.shape[1]
        m.register_buffer("A", A.detach().to(dtype).to(dev).contiguous(), persistent=False)
        m.register_buffer("B", B.detach().to(dtype).to(dev).contiguous(), persistent=False)
        m.weight = nn.Parameter((m.A.float() @ m.B.float()).to(dtype), requires_grad=False)
        return m

    def forward(self, x: Tensor) -> Tensor:
        return F.linear(F.linear(x, self.B), self.A, self.bias)

    def to_state(self) -> tuple[dict[str, Tensor], dict]:
        t = {"A": self.A, "B": self.B}
        if self.bias is not None:
            t["bias"] = self.bias.detach()
        return t, {"in": self.in_features, "out": self.out_features, "rank": self.rank,
                   "dtype": str(self.weight.dtype)}

    @classmethod
    def from_state(cls, t: dict[str, Tensor], cfg: dict) -> "LowRankLinear":
        dtype = getattr(torch, cfg["dtype"].replace("torch.", ""))
        lin = nn.Linear(cfg["in"], cfg["out"], bias="bias" in t, device="meta", dtype=dtype)
        lin.bias = nn.Parameter(t["bias"]) if "bias" in t else None
        lin.weight = nn.Parameter(torch.empty(0, dtype=dtype))
        return cls.build(lin, t["A"], t["B"])
