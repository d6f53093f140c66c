"""Resumable compression. A run keeps its progress in `<out>.partial/`:
  fingerprint.json             recipe + calibration hash; a resume with anything else is refused
  stage<k>/model.safetensors   full model snapshot after stage k finished (+ stats.json)
  stage<k>/layer<i>.safetensors  decoder layer i after stage k touched it (layer-wise stages)
  stage<k>/inputs<i>.safetensors  inputs of layer i (the next to run); stage<k>/progress.json  layers done + stats
Every file is written atomically and progress.json last, so a kill -9 at any moment leaves a consistent
state; `--resume` restarts from the last finished layer and produces the same artifact."""
from __future__ import annotations

import hashlib
import json
import shutil
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import load_file
from torch import nn

from ..errors import UserError
from ..export.native import apply_state, collect_tensors
from ..io import atomic_save_file, atomic_write_text, remove_stale_temporaries


def save_module(module: nn.Module, path: Path) -> None:
    tensors, modules, aliases = collect_tensors(module)
    atomic_save_file(tensors, path, metadata={"modules": json.dumps(modules), "aliases": json.dumps(aliases)})


def load_module(module: nn.Module, path: Path) -> None:
    with safe_open(str(path), "pt") as f:
        meta = f.metadata()
    apply_state(module, load_file(path), json.loads(meta["modules"]), json.loads(meta["aliases"]), str(path))


class StageCheckpoint:
    """Per-layer progress of one layer-wise stage."""

    def __init__(self, folder: Path):
        self.folder = folder
        folder.mkdir(parents=True, exist_ok=True)
        p = folder / "progress.json"
        self.progress = json.loads(p.read_text()) if p.exists() else {"done": 0, "stats": {}}

    @property
    def done(self) -> int:
        return self.progress["done"]

    def restore(self, layers: nn.ModuleList) -> tuple[int, list[torch.Tensor] | None, dict]:
        """Load finished layers; returns (first layer to run, its inputs or None, stats so far)."""
        if self.done == 0:
            return 0, None, {}
        for i in range(self.done):
            load_module(layers[i], self.folder / f"layer{i}.safetensors")
        saved = load_file(self.folder / f"inputs{self.done}.safetensors")
        inputs = [saved[f"b{j}"] for j in range(len(saved))]
        return self.done, inputs, self.progress["stats"]

    def save(self, i: int, layer: nn.Module, next_inputs: list[torch.Tensor], stats: dict) -> None:
        # order matters for a kill at any instant: layer and inputs first (new names), progress last,
        # then the inputs the progress no longer points to are removed
        save_module(layer, self.folder / f"layer{i}.safetensors")
        atomic_save_file({f"b{j}": x.detach().cpu() for j, x in enumerate(next_inputs)},
                         self.folder / f"inputs{i + 1}.safetensors")
        self.progress = {"done": i + 1, "stats": {**self.progress["stats"], **_jsonable(stats)}}
        atomic_write_text(self.folder / "progress.json", json.dumps(self.progress))
        (self.folder / f"inputs{i}.safetensors").unlink(missing_ok=True)


def _jsonable(d):
    """Stats as JSON: tensors to lists, keys to strings (as json.dumps writes them)."""
    if isinstance(d, dict):
        return {str(k): _jsonable(v) for k, v in d.items()}
    if isinstance(d, (list, tuple)):
        return [_jsonable(v) for v in d]
    if isinstance(d, torch.Tensor):
        return d.tolist()
    return d


class RunLock:
    """An exclusive POSIX lock on `<folder>.lock` (which records the owner's pid) held while this process
    writes `folder` and the export beside it. The OS drops the lock when the owner dies (kill -9 included),
    so a folder whose lock is free belongs to an interrupted run and one whose lock is held to a live run:
    a second run is told so at once. Temporaries a killed run left are removed on acquiring. (A POSIX
    record lock never blocks its own process; without fcntl, e.g. on Windows, runs are not locked.)"""

    def __init__(self, folder: str | Path, export: str | Path | None = None):
        import os
        import time
        self.folder = Path(folder)
        self.folder.parent.mkdir(parents=True, exist_ok=True)
        self.path = Path(f"{self.folder}.lock")
        self.fd = None
        try:
            import fcntl
        except ImportError:                        # pragma: no cover - not POSIX
            fcntl = None
        if fcntl is not None:
            fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
            try:
                fcntl.lockf(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except OSError:
                os.close(fd)
                try:
                    info = json.loads(self.path.read_text())
                    who = f" (pid {int(info['pid'])}, started {info['started']})"
                except (OSError, ValueError, KeyError, TypeError):
                    who = ""
                raise UserError(f"another modelpress run{who} is still writing {export or self.folder}: wait for "
                                "it to finish, or stop it and pass --resume") from None
            os.ftruncate(fd, 0)
            os.write(fd, json.dumps({"pid": os.getpid(), "started": time.strftime("%Y-%m-%d %H:%M:%S")}).encode())
            self.fd = fd
        remove_stale_temporaries(self.folder)
        if export is not None:
            remove_stale_temporaries(export)

    def release(self) -> None:
        import os
        if self.fd is not None:
            self.path.unlink(missing_ok=True)
            os.close(self.fd)
            self.fd = None

    def __del__(self):
        try:
            self.release()
        except Exception:                          # interpreter shutdown: the OS drops the lock anyway
            pass


def claim(folder: Path, fingerprint: str, resume: bool, inputs: str) -> None:
    """Take `folder` for a run with this fingerprint (a hash of its inputs): a run left there by an interrupted
    process is continued only with resume=True and the same inputs; a folder without a fingerprint is stale."""
    f = folder / "fingerprint.json"
    if f.exists():
        if not resume:
            raise UserError(f"an interrupted run exists in {folder}: pass --resume to continue it, "
                            "or delete that folder to start over")
        if json.loads(f.read_text())["fingerprint"] != fingerprint:
            raise UserError(f"{folder} belongs to a run with another {inputs}: delete it to start over, "
                            "or resume with the original inputs")
    else:
        shutil.rmtree(folder, ignore_errors=True)
    folder.mkdir(parents=True, exist_ok=True)
    atomic_write_text(f, json.dumps({"fingerprint": fingerprint}))


class Run:
    """The checkpoint folder of one compress run."""

    def __init__(self, folder: str | Path, recipe: dict, calib_sha: str | None, resume: bool,
                 lock: RunLock | None = None):
        self.folder = Path(folder)
        self.lock = lock or RunLock(self.folder)
        fp = hashlib.sha256(json.dumps({"recipe": recipe, "calib": calib_sha}, sort_keys=True).encode()).hexdigest()
        claim(self.folder, fp, resume, "recipe or calibration set")

    def stage_dir(self, k: int) -> Path:
        return self.folder / f"stage{k}"

    def finished(self, k: int) -> bool:
        return (self.stage_dir(k) / "stats.json").exists()

    def restore_stage(self, k: int, model: nn.Module) -> dict:
        load_module(model, self.stage_dir(k) / "model.safetensors")
        return json.loads((self.stage_dir(k) / "stats.json").read_text())

    def finish_stage(self, k: int, model: nn.Module, stats: dict) -> None:
        save_module(model, self.stage_dir(k) / "model.safetensors")
        atomic_write_text(self.stage_dir(k) / "stats.json", json.dumps(_jsonable(stats), default=float))
        for p in self.stage_dir(k).glob("*"):      # only once the stage is marked finished
            if p.name.startswith(("layer", "inputs")):
                p.unlink()

    def checkpoint(self, k: int) -> StageCheckpoint:
        return StageCheckpoint(self.stage_dir(k))

    def close(self) -> None:
        shutil.rmtree(self.folder, ignore_errors=True)
        self.lock.release()
