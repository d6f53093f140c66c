"""kill -9 during `compress`, then `--resume`: the artifact equals an uninterrupted run's."""
import hashlib
import json
import os
import signal
import subprocess
import sys
import time

import pytest

from .conftest import tiny_model_dir

RECIPE = """
calibration: {source: %s, samples: 16, seqlen: 64, seed: 0}
stages:
  - prune: {method: sparsegpt, sparsity: 0.5}
  - quantize: {method: gptq, bits: 4, group_size: 64, sym: false}
"""


def _sha(p):
    return hashlib.sha256(p.read_bytes()).hexdigest()


def _setup(tmp_path):
    model = tiny_model_dir(tmp_path / "m", layers=12, hidden=128, inter=256)
    text = tmp_path / "t.txt"
    text.write_text("\n\n".join(["the quick brown fox jumps over the lazy dog and compression keeps what matters"] * 200))
    recipe = tmp_path / "r.yaml"
    recipe.write_text(RECIPE % text)
    return model, recipe


@pytest.mark.parametrize("how", ["layer-by-layer", "in-memory"])
def test_kill9_then_resume_gives_identical_artifact(tmp_path, how):
    # every run in a fresh process with the same environment: float results depend on the thread count,
    # which other tests in this process may have changed
    model, recipe = _setup(tmp_path)
    ref = tmp_path / "ref"
    base = [sys.executable, "-m", "modelpress.cli", "compress", str(model), "--recipe", str(recipe), "--no-eval"]
    base += ["--in-memory"] if how == "in-memory" else ["--offload"]
    assert subprocess.run(base + ["--out", str(ref)], capture_output=True).returncode == 0
    out = tmp_path / "out"
    cmd = base + ["--out", str(out)]
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    prog = out.with_name("out.partial") / "stage1" / "progress.json"
    killed_at = None
    deadline = time.time() + 300
    while time.time() < deadline and proc.poll() is None:
        if prog.exists() and json.loads(prog.read_text())["done"] >= 3:
            os.kill(proc.pid, signal.SIGKILL)
            proc.wait()
            killed_at = json.loads(prog.read_text())["done"]
            break
        time.sleep(0.005)
    assert killed_at is not None and 3 <= killed_at < 12, "the run finished before it could be interrupted"
    assert not (out / "model.safetensors").exists()
    # without --resume the leftover run is not silently discarded
    again = subprocess.run(cmd, capture_output=True, text=True)
    assert again.returncode == 2 and "pass --resume" in again.stderr
    assert subprocess.run(cmd + ["--resume"], capture_output=True).returncode == 0
    for f in ("model.safetensors", "modelpress.json"):
        assert _sha(out / f) == _sha(ref / f)
    assert not out.with_name("out.partial").exists()
