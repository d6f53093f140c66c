"""Stage `quantize_embedding`: the token embedding (and an untied output projection) to b-bit integer codes by
round-to-nearest, as llama.cpp stores token embeddings (Q8_0: 8 bits, one scale per block; Q4_K/Q6_K:
4/6 bits in groups). The embedding of a small model is a large share of its bytes (SmolLM2-135M: 28M of
135M parameters), so a "4-bit" export needs it. A tied output projection shares the embedding's
weight and so reads exactly the same quantized table; an untied one (output: true) becomes a QuantLinear
with the same settings."""
from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from ..algos import quant
from ..errors import UserError
from ..model import set_module, tied_lm_head
from ..modules import QuantEmbedding, QuantLinear
from . import _check


@dataclass(frozen=True)
class QuantizeEmbedding:
    bits: int = 8                          # 2..8
    group_size: int | None = None          # null = one scale per row (per token); e.g. 32 for 4/6-bit grouped
    sym: bool = True
    observer: str = "minmax"               # minmax | mse (clipping search)
    output: bool = True                    # also quantize an untied output projection (lm_head) the same way

    def __post_init__(self):
        _check.int_range("quantize_embedding", "bits", self.bits, 2, 8)
        _check.group_size("quantize_embedding", self.group_size)
        _check.flag("quantize_embedding", "sym", self.sym)
        _check.choice("quantize_embedding", "observer", self.observer, ("minmax", "mse"))
        _check.flag("quantize_embedding", "output", self.output)

    def describe(self) -> str:
        g = f"g{self.group_size}" if self.group_size else "per-row"
        return f"w{self.bits} {g} {'sym' if self.sym else 'asym'}"

    def _codes(self, w: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, dict]:
        q, s, z = quant.rtn(w.detach().float(), self.bits, self.group_size, self.sym, None, self.observer)
        w_hat = quant.dequantize_groups(q, s.half().float(), z.float(), self.group_size)      # (rows, cols)
        return q, s, z, {"bits": self.bits, "sqnr": quant.sqnr(w.detach().float(), w_hat)}

    @torch.no_grad()
    def apply(self, model: nn.Module, calib=None) -> dict:
        emb = model.get_input_embeddings()
        if isinstance(emb, QuantEmbedding):
            raise UserError("the embedding is already quantized: remove the second quantize_embedding stage")
        if type(emb) is not nn.Embedding:
            raise UserError(f"quantize_embedding needs a plain nn.Embedding, found {type(emb).__name__}: "
                            "put quantize_embedding before stages that replace the embedding")
        tied = tied_lm_head(model)
        names = {id(m): n for n, m in model.named_modules()}
        emb_name = names[id(emb)]
        q, s, z, info = self._codes(emb.weight)
        new = QuantEmbedding.build(emb, q, s, z, self.bits, self.group_size, self.sym)
        set_module(model, emb_name, new)
        layers = {emb_name: {"kind": "QuantEmbedding", **info}}
        head = model.get_output_embeddings()
        if tied:
            head.weight = new.weight                # the same parameter: the same quantized values
        elif self.output and head is not None:
            if type(head) is not nn.Linear:
                raise UserError(f"the output projection is a {type(head).__name__}: set quantize_embedding.output "
                                "false or put quantize_embedding first")
            hq, hs, hz, hinfo = self._codes(head.weight)
            set_module(model, names[id(head)],
                       QuantLinear.build(head, hq, hs, hz, self.bits, self.group_size, self.sym, in_place=True))
            layers[names[id(head)]] = {"kind": "QuantLinear", **hinfo}
        what = "embedding (tied output projection reads it)" if tied else (
            "embedding and output projection" if self.output and head is not None else "embedding")
        sq = ", ".join(f"{v['sqnr']:.1f}" for v in layers.values())
        return {"summary": f"quantize_embedding {self.describe()}: {what}, SQNR {sq} dB", "layers": layers}
