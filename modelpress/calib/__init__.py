"""Calibration sets: token windows plus provenance (source, selection method, seed, sha256)."""
from __future__ import annotations

import hashlib
from dataclasses import dataclass, field

import torch

from ..errors import UserError
from . import protocol as _protocol
from . import select as _select
from . import sources


@dataclass
class CalibrationSet:
    input_ids: torch.Tensor                      # (n, seqlen) long
    attention_mask: torch.Tensor                 # (n, seqlen) long
    provenance: dict = field(default_factory=dict)

    def __len__(self) -> int:
        return self.input_ids.shape[0]

    @property
    def seqlen(self) -> int:
        return self.input_ids.shape[1]

    def sha256(self) -> str:
        return hashlib.sha256(self.input_ids.to(torch.int64).numpy().tobytes()).hexdigest()

    @classmethod
    def from_ids(cls, input_ids: torch.Tensor, **provenance) -> "CalibrationSet":
        ids = input_ids.to(torch.long)
        cs = cls(ids, torch.ones_like(ids), dict(provenance))
        cs.provenance["sha256"] = cs.sha256()
        return cs


def calibration_set(tokenizer, source="wiki", select: str = "random", samples: int = 128, seqlen: int = 512,
                    seed: int = 0, field: str = "text", model=None, protocol: str = _protocol.DEFAULT) -> CalibrationSet:
    """Build a calibration set from a text source with a selection method. Under modelpress-eval/2 (the
    default; see calib.protocol) each window starts with the tokenizer's BOS where it adds one by default,
    followed by seqlen - 1 selected text tokens; the choice is recorded in the provenance.

    A composite source "A+B[+...]" draws equal shares of the samples from each part (part i of k gets
    samples (i+1)//k - samples i//k, selected from its own pool with the same seed), in part order.

    >>> calib = calibration_set(tok, "wiki", select="random", samples=32, seqlen=256, seed=0)
    >>> mixed = calibration_set(tok, "wiki+novels", samples=32, seqlen=256, seed=0)   # 16 + 16 windows
    """
    _protocol.check(protocol, "calibration.protocol")
    if select not in _select.SELECTORS:
        raise UserError(f"calibration.select {select!r} is unknown: use one of {sorted(_select.SELECTORS)}")
    if samples < 1 or seqlen < 2:
        raise UserError(f"calibration.samples must be >= 1 and calibration.seqlen >= 2, got {samples}, {seqlen}")
    split = sources.parts(source)
    if split:
        k = len(split)
        if samples < k:
            raise UserError(f"calibration.samples {samples} is fewer than the {k} parts of source {source!r}: "
                            f"use at least {k} samples")
        sets = [calibration_set(tokenizer, p, select, samples * (i + 1) // k - samples * i // k, seqlen, seed, field,
                                model, protocol) for i, p in enumerate(split)]
        return CalibrationSet.from_ids(torch.cat([c.input_ids for c in sets]), source=str(source),
                                       source_sha256=sources.source_sha256(source), select=select, seed=seed,
                                       samples=samples, seqlen=seqlen, **_protocol.describe(tokenizer, protocol))
    pool = sources.texts(source, "calib", field)
    bos = _protocol.window_bos(tokenizer, protocol)
    ids = _select.SELECTORS[select](pool, tokenizer, samples=samples, seqlen=_protocol.body_len(seqlen, bos),
                                    seed=seed, model=model, bos=bos)
    return CalibrationSet.from_ids(_protocol.prepend(ids, bos),
                                   source=str(source) if isinstance(source, str) else type(source).__name__,
                                   source_sha256=sources.source_sha256(source), select=select, seed=seed,
                                   samples=samples, seqlen=seqlen, **_protocol.describe(tokenizer, protocol))


__all__ = ["CalibrationSet", "calibration_set", "sources"]
