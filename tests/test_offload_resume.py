"""kill -9 during an offloaded compress (in a calibration-free stage, in a calibrated stage, during the
export), then resume: the export equals an uninterrupted run's, file by file."""
import hashlib
import json
import subprocess
import sys
from pathlib import Path

import pytest

from modelpress.errors import UserError
from modelpress.engine.offload import run_recipe_offloaded
from modelpress.recipe import Recipe

from .conftest import tiny_model_dir

RECIPE = """
calibration: {source: %s, samples: 4, seqlen: 32, seed: 0}
stages:
  - prune: {method: magnitude, sparsity: 0.5}
  - quantize: {method: gptq, bits: 4, group_size: 32, sym: false}
"""

# Runs one offloaded compress; SIGKILLs itself at the n-th shard/layer-file read after entering `phase`
# (stage<k> or export), a point chosen by the test; prints counters when it finishes.
SCRIPT = r"""
import json, os, signal, sys
import modelpress.engine.offload as O
from modelpress.recipe import Recipe
model, recipe, out, resume, phase, n = sys.argv[1:7]
state = {"phase": None, "reads": 0, "linears": 0, "layers_saved": 0}
read, begin, export, comp, save = O.SafeFile.read, O.LayerStore.begin_stage, O.export_offloaded, O._compress_linear, O.LayerStore.save
def counted_read(self, *a, **k):
    state["reads"] += 1
    if state["phase"] == phase and state["reads"] == int(n):
        os.kill(os.getpid(), signal.SIGKILL)
    return read(self, *a, **k)
def counted_begin(self, k):
    state["phase"], state["reads"] = f"stage{k}", 0
    return begin(self, k)
def counted_export(*a, **k):
    state["phase"], state["reads"] = "export", 0
    return export(*a, **k)
def counted_comp(*a, **k):
    state["linears"] += 1
    return comp(*a, **k)
def counted_save(*a, **k):
    state["layers_saved"] += 1
    return save(*a, **k)
def counted_final(self, items, st):
    state["layers_saved"] += len(items)
    return final(self, items, st)
O.SafeFile.read, O.LayerStore.begin_stage, O.export_offloaded = counted_read, counted_begin, counted_export
final = O.LayerStore.save_final
O._compress_linear, O.LayerStore.save, O.LayerStore.save_final = counted_comp, counted_save, counted_final
O.run_recipe_offloaded(Recipe.from_yaml(recipe), model, out, resume=resume == "1")
print(json.dumps(state))
"""


def _run(model, recipe, out, resume=False, phase="-", n=0):
    return subprocess.run([sys.executable, "-c", SCRIPT, str(model), str(recipe), str(out), "1" if resume else "0",
                           phase, str(n)], capture_output=True, text=True, cwd=Path(__file__).resolve().parent.parent)


def _digests(folder: Path) -> dict:
    return {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(folder.iterdir())}


def test_offload_kill9_then_resume_gives_identical_export(tmp_path):
    model = tiny_model_dir(tmp_path / "m", layers=4)
    text = tmp_path / "t.txt"
    text.write_text("the quick brown fox jumps over the lazy dog. compression keeps what matters.\n\n" * 200)
    recipe = tmp_path / "r.yaml"
    recipe.write_text(RECIPE % text)
    ref = _run(model, recipe, tmp_path / "ref")
    assert ref.returncode == 0, ref.stderr[-2000:]
    full = json.loads(ref.stdout.strip().splitlines()[-1])
    assert full["linears"] == 28 and full["layers_saved"] == 4         # 4 layers x 7 linears, 4 GPTQ layers

    out = tmp_path / "out"
    work = tmp_path / "out.offload"
    killed = _run(model, recipe, out, phase="stage0", n=40)        # magnitude pruning, layer 2 or so
    assert killed.returncode == -9, killed.stderr[-2000:]
    p0 = json.loads((work / "stage0" / "progress.json").read_text())
    assert 1 <= len(p0["files"]) < 4 and not p0["finished"]
    with pytest.raises(UserError, match="pass --resume"):           # a leftover run is not silently dropped
        run_recipe_offloaded(Recipe.from_yaml(str(recipe)), model, out)
    other = tmp_path / "other.yaml"
    other.write_text((RECIPE % text).replace("sparsity: 0.5", "sparsity: 0.4"))
    with pytest.raises(UserError, match="another recipe"):
        run_recipe_offloaded(Recipe.from_yaml(str(other)), model, out, resume=True)

    killed = _run(model, recipe, out, resume=True, phase="stage1", n=60)   # inside GPTQ, after a layer or two
    assert killed.returncode == -9, killed.stderr[-2000:]
    p1 = json.loads((work / "stage1" / "progress.json").read_text())
    assert 1 <= p1["done"] < 4 and json.loads((work / "stage0" / "progress.json").read_text())["finished"]

    killed = _run(model, recipe, out, resume=True, phase="export", n=20)   # half-way through model.safetensors
    assert killed.returncode == -9, killed.stderr[-2000:]
    assert not out.exists()

    done = _run(model, recipe, out, resume=True)
    assert done.returncode == 0, done.stderr[-2000:]
    rest = json.loads(done.stdout.strip().splitlines()[-1])
    assert rest["linears"] == 0 and rest["layers_saved"] == 0     # nothing recomputed: only the export ran
    assert _digests(out) == _digests(tmp_path / "ref")
    assert set(_digests(out)) >= {"model.safetensors", "modelpress.json", "report.json", "checksums.json"}
    assert not work.exists()
