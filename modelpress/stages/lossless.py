"""Stage `lossless`: store what is left in BF16/FP16 (embeddings, lm_head, skipped linears, or a whole
model) bit-exactly and ~30% smaller, with ZipServ's TCA-TBE (arXiv 2603.17435) or a DFloat11-style
Huffman baseline (arXiv 2504.11651). Replaces plain nn.Linear / nn.Embedding modules (not the ones
another stage already compressed) by ZipLinear / ZipEmbedding; tied embeddings are coded once."""
from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from ..algos import lossless as LL
from ..errors import UserError
from ..model import set_module
from ..modules.zip import ZipEmbedding, ZipLinear
from ..targets import Target
from . import _check

_HALF = (torch.bfloat16, torch.float16)


@dataclass(frozen=True)
class Lossless:
    codec: str = "tca-tbe"                # tca-tbe | huffman
    include: tuple[str, ...] = ()         # regexes over module names; empty = every plain Linear/Embedding
    exclude: tuple[str, ...] = ()
    cast: str | None = None               # null | bf16: round fp32 weights to bf16 first (lossy, explicit)

    def __post_init__(self):
        _check.choice("lossless", "codec", self.codec, ("tca-tbe", "huffman"))
        _check.patterns("lossless", "include", self.include)
        _check.patterns("lossless", "exclude", self.exclude)
        _check.choice("lossless", "cast", self.cast, (None, "bf16"))

    @property
    def target(self) -> Target:
        return Target(self.include, self.exclude, types=(nn.Linear, nn.Embedding))

    def describe(self) -> str:
        return f"lossless {self.codec}" + (" (cast bf16)" if self.cast else "")

    def _weight(self, name: str, mod: nn.Module) -> torch.Tensor:
        w = mod.weight.detach()
        if w.dtype == torch.float16 and self.codec == "tca-tbe":
            if self.cast == "bf16":
                return w.to(torch.bfloat16)
            raise UserError(f"{name}.weight is fp16: " + LL.FP16_REFUSED + " (or `lossless.cast: bf16`, lossy)")
        if w.dtype in _HALF:
            return w
        if self.cast == "bf16" and w.is_floating_point():
            return w.to(torch.bfloat16)
        raise UserError(f"lossless needs bf16/fp16 weights but {name}.weight is {w.dtype}: set `lossless.cast: bf16` "
                        "(rounds to bf16 first) or load the model in bf16")

    def apply(self, model: nn.Module, calib=None) -> dict:
        chosen = {n: m for n, m in self.target.select(model).items() if type(m) in (nn.Linear, nn.Embedding)}
        # every plain Linear/Embedding, to find weights shared with a chosen one (tied embeddings)
        plain = {n: m for n, m in model.named_modules() if type(m) in (nn.Linear, nn.Embedding)}
        groups: dict[int, list[str]] = {}
        for n, m in plain.items():
            groups.setdefault(id(m.weight), []).append(n)
        stats: dict = {}
        skipped: list[str] = []
        weights = {n: self._weight(n, m) for n, m in chosen.items()}  # validates dtypes before any change
        done: set[str] = set()
        tot_raw = tot_zip = tot_h16 = tot_h8 = 0.0
        for name, mod in chosen.items():
            if name in done:
                continue
            members = groups[id(mod.weight)]
            if any(n not in chosen for n in members):
                skipped.append(name)
                stats[name] = {"skipped": f"weight shared with {[n for n in members if n not in chosen]}, "
                                          "which is not selected: include all of them or none"}
                continue
            if any(isinstance(plain[n], nn.Embedding) and (plain[n].max_norm is not None or plain[n].sparse
                                                          or plain[n].scale_grad_by_freq) for n in members):
                skipped.append(name)
                stats[name] = {"skipped": "embedding with max_norm/sparse/scale_grad_by_freq"}
                continue
            w = weights[name]
            enc = LL.encode(w, self.codec)
            # the module that holds the buffers: the embedding if the group has one
            members = sorted(members, key=lambda n: not isinstance(plain[n], nn.Embedding))
            head, rest = members[0], members[1:]
            hm = plain[head]
            holder = (ZipEmbedding(enc, hm.padding_idx) if isinstance(hm, nn.Embedding) else ZipLinear(enc, hm.bias))
            holder.to(w.device)
            if not torch.equal(holder.decoded_weight().view(torch.int16), w.view(torch.int16)):
                raise RuntimeError(f"lossless: {head} did not round-trip bit-exactly ({self.codec}); please report")
            set_module(model, head, holder)
            for n in rest:
                m = plain[n]
                if isinstance(m, nn.Embedding):
                    raise UserError(f"{n} shares its weight with {head}: two tied embeddings are not supported; "
                                    "exclude them from lossless")
                set_module(model, n, ZipLinear.tied(holder, head, m.bias))
            done.update(members)
            raw = w.numel() * 2
            h16, h8 = LL.entropy_bits(w, "symbol16"), LL.entropy_bits(w, "exp+8")
            stats[head] = {"kind": type(holder).__name__, "codec": self.codec, "shape": list(w.shape),
                           "tied": rest, "bf16_bytes": raw, "bytes": enc.nbytes, "ratio": enc.nbytes / raw,
                           "entropy_symbol16_bits": h16, "entropy_exp8_bits": h8,
                           "bound_symbol16_ratio": h16 / 16, "bound_exp8_ratio": h8 / 16,
                           "cast": w.dtype != self._orig_dtype(hm)}
            tot_raw += raw
            tot_zip += enc.nbytes
            tot_h16 += h16 * w.numel() / 8
            tot_h8 += h8 * w.numel() / 8
        n = len(stats) - len(skipped)
        if n == 0:
            stats["summary"] = f"lossless {self.codec}: no plain bf16/fp16 Linear/Embedding selected (nothing done)"
            return stats
        stats["summary"] = (f"lossless {self.codec}: {n} tensors {tot_raw / 1e6:.1f} MB -> {tot_zip / 1e6:.1f} MB "
                            f"({100 * tot_zip / tot_raw:.1f}% of 16-bit; entropy bound {100 * tot_h8 / tot_raw:.1f}% "
                            f"exp+8, {100 * tot_h16 / tot_raw:.1f}% 16-bit symbol), every tensor decodes bit-exactly"
                            + (f"; {len(skipped)} skipped" if skipped else "")
                            + ("; weights rounded fp32->bf16 first" if self.cast else ""))
        return stats

    @staticmethod
    def _orig_dtype(m: nn.Module) -> torch.dtype:
        return m.weight.dtype
