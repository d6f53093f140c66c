"""Distillation: Low-Rank Clone (LRC, arXiv 2505.12781; rank guideline arXiv 2603.22355).
CLI: modelpress.cli.distill (`modelpress distill lowrank`, `modelpress mft`)."""
from __future__ import annotations

import json
import os
from pathlib import Path

from ..errors import UserError
from ..io import atomic_dir
from .lowrank_clone import LossWeights, LowRankClone, auto_hidden, train_lockstep


def save_pretrained_atomic(model, tokenizer, out: str | os.PathLike, meta: dict, marker: str) -> Path:
    """save_pretrained (+ tokenizer + `marker` JSON with `meta`) into a temp folder, renamed into place.
    An existing `out` is replaced only when it holds `marker` (written by an earlier run)."""
    out = Path(out)
    if out.exists() and (not out.is_dir() or (any(out.iterdir()) and not (out / marker).exists())):
        raise UserError(f"output folder {out} exists and was not written by this command: choose a new --out")
    with atomic_dir(out) as tmp:
        model.save_pretrained(tmp)
        if tokenizer is not None:
            tokenizer.save_pretrained(tmp)
        (tmp / marker).write_text(json.dumps(meta, indent=1, default=str))
    return out


__all__ = ["LossWeights", "LowRankClone", "auto_hidden", "save_pretrained_atomic", "train_lockstep"]
