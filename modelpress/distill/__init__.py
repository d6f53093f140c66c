"""Distillation: Low-Rank Clone (LRC, arXiv 2505.12781; rank guideline arXiv 2603.22355).
CLI: modelpress.distill.cli (`modelpress distill lowrank`, `modelpress mft`)."""
from __future__ import annotations

import json
import os
import shutil
import tempfile
from pathlib import Path

from ..errors import UserError
from .lowrank_clone import LossWeights, LowRankClone, auto_hidden, train_lockstep


def save_pretrained_atomic(model, tokenizer, out: str | os.PathLike, meta: dict, marker: str) -> Path:
    """save_pretrained (+ tokenizer + `marker` JSON with `meta`) into a temp folder, renamed into place.
    An existing `out` is replaced only when it holds `marker` (written by an earlier run)."""
    out = Path(out)
    if out.exists() and (not out.is_dir() or (any(out.iterdir()) and not (out / marker).exists())):
        raise UserError(f"output folder {out} exists and was not written by this command: choose a new --out")
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=out.parent, prefix=f".{out.name}."))
    try:
        model.save_pretrained(tmp)
        if tokenizer is not None:
            tokenizer.save_pretrained(tmp)
        (tmp / marker).write_text(json.dumps(meta, indent=1, default=str))
        if out.exists():
            old = Path(tempfile.mkdtemp(dir=out.parent, prefix=f".{out.name}.old."))
            os.replace(out, old / "x")
            os.replace(tmp, out)
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.replace(tmp, out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return out


__all__ = ["LossWeights", "LowRankClone", "auto_hidden", "save_pretrained_atomic", "train_lockstep"]
