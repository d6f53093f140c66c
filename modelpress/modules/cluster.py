"""ClusteredLinear: a weight-clustered linear (arXiv 2603.17917) that exports compactly and reloads exactly.

Stores log2(K)-bit packed indices (rows, cols) and fp16 codebooks (G, K), one per group of `group_rows`
consecutive output channels (G = 1: one codebook per matrix). Like QuantLinear it subclasses nn.Linear and
keeps a dense `weight` derived deterministically (codebook[group(row), index]), so the forward is an
ordinary F.linear and a reloaded module gives bit-identical outputs."""
from __future__ import annotations

import math

import torch
from torch import Tensor, nn

from ..algos import cluster as C
from ..algos import quant
from .quant import _shell


def index_bits(k: int) -> int:
    return max(1, math.ceil(math.log2(k)))


class ClusteredLinear(nn.Linear):
    kind = "ClusteredLinear"
    storage_keys = ("bias",)

    @classmethod
    def build(cls, lin: nn.Linear, codebook: Tensor, idx: Tensor, group_rows: int | None) -> "ClusteredLinear":
        """codebook (G, K) (rounded to fp16 here), idx (rows, cols) in [0, K)."""
        rows, cols = lin.out_features, lin.in_features
        G, K = codebook.shape
        if idx.shape != (rows, cols) or G != rows // (group_rows or rows):
            raise ValueError(f"codebook {tuple(codebook.shape)} / indices {tuple(idx.shape)} do not fit a "
                             f"({rows}, {cols}) linear with group_rows {group_rows}")
        m = _shell(cls, cols, rows, lin.bias, lin.weight.dtype)
        m.k, m.group_rows = K, group_rows
        if K > 256:
            raise ValueError(f"ClusteredLinear holds at most 256 centroids, got {K}")
        dev = lin.weight.device
        m.register_buffer("idx", idx.to(torch.uint8).to(dev), persistent=False)
        m.register_buffer("codebook", codebook.detach().half().to(dev), persistent=False)
        m.weight = nn.Parameter(m.decoded(), requires_grad=False)
        return m

    def decoded(self) -> Tensor:
        """Dense weights (rows, cols) in the module dtype."""
        return C.decode(self.codebook.float(), self.idx, self.group_rows).to(self.weight.dtype)

    def set_codebook(self, codebook: Tensor) -> None:
        """New centroid values (G, K) with the same indices (rounded to fp16); the dense weight follows."""
        self.codebook = codebook.detach().half().to(self.idx.device)
        self.weight.data = self.decoded()

    def bits_per_weight(self) -> float:
        return C.bits_per_weight(self.k, self.out_features, self.in_features, self.group_rows)

    def to_state(self) -> tuple[dict[str, Tensor], dict]:
        t = {"indices": quant.pack(self.idx, index_bits(self.k)), "codebook": self.codebook.contiguous()}
        if self.bias is not None:
            t["bias"] = self.bias.detach()
        cfg = {"in": self.in_features, "out": self.out_features, "k": self.k, "group_rows": self.group_rows,
               "dtype": str(self.weight.dtype)}
        return t, cfg

    @classmethod
    def from_state(cls, t: dict[str, Tensor], cfg: dict) -> "ClusteredLinear":
        rows, cols, k = cfg["out"], cfg["in"], cfg["k"]
        idx = quant.unpack(t["indices"], index_bits(k), rows * cols).reshape(rows, cols)
        dtype = getattr(torch, cfg["dtype"].replace("torch.", ""))
        lin = nn.Linear(cols, rows, bias="bias" in t, device="meta", dtype=dtype)
        lin.bias = nn.Parameter(t["bias"]) if "bias" in t else None
        lin.weight = nn.Parameter(torch.empty(0, dtype=dtype))
        return cls.build(lin, t["codebook"].float(), idx, cfg["group_rows"])
