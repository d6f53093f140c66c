"""Disk offload: compressing layer by layer from safetensors shards gives the same model as the
in-memory path, exported by streaming in the native format."""
import copy

import pytest
import torch

import modelpress as mp
from modelpress.errors import UserError
from modelpress.export import load_compressed
from modelpress.offload import compress_offloaded, export_offloaded, run_recipe_offloaded

from .conftest import correlated_calib, tiny_model_dir

CASES = {
    "gptq-w4g32": [{"quantize": {"method": "gptq", "bits": 4, "group_size": 32}}],
    "rtn-w4g32": [{"quantize": {"method": "rtn", "bits": 4, "group_size": 32, "sym": False}}],
    "magnitude-then-gptq": [{"prune": {"method": "magnitude", "sparsity": 0.5}},
                            {"quantize": {"method": "gptq", "bits": 4, "group_size": 32}}],
    "gptq-layer-0-only": [{"quantize": {"method": "gptq", "bits": 8, "group_size": None,
                                        "include": [r"layers\.0\."]}}],
}


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    return tiny_model_dir(tmp_path_factory.mktemp("off") / "m", layers=2)


@pytest.mark.parametrize("case", list(CASES))
def test_offload_equals_in_memory(case, model_dir, tmp_path):
    recipe = mp.Recipe.from_dict({"stages": CASES[case]})
    calib = correlated_calib(n=8, seqlen=32)
    ref, tok = mp.load(model_dir)
    mp.compress(ref, recipe, calib)
    skel, store, stats = compress_offloaded(model_dir, recipe, calib, tmp_path / "work")
    if store.layers is not None:                  # calibrated: a meta skeleton, nothing left resident
        assert all(p.is_meta for layer in store.layers for p in layer.parameters())
    else:                                         # calibration-free: no model built at all
        assert not isinstance(skel, torch.nn.Module)
    out = export_offloaded(skel, store, tok, tmp_path / "out")
    back, _ = load_compressed(out)
    ids = calib.input_ids[:2]
    with torch.no_grad():
        assert torch.equal(back(ids).logits, ref(ids).logits)
    assert [type(m).__name__ for m in back.modules()] == [type(m).__name__ for m in ref.modules()]
    if case == "gptq-layer-0-only":             # untouched layers stream straight from the shards
        assert type(back.model.layers[1].mlp.down_proj).__name__ == "Linear"


def test_run_recipe_offloaded_and_refusals(model_dir, tmp_path):
    text = tmp_path / "t.txt"
    text.write_text("the quick brown fox jumps over the lazy dog. compression keeps what matters.\n\n" * 200)
    recipe = mp.Recipe.from_dict({"calibration": {"source": str(text), "samples": 4, "seqlen": 32},
                                  "stages": [{"quantize": {"method": "gptq", "bits": 4, "group_size": 32}}]})
    rep = run_recipe_offloaded(recipe, model_dir, tmp_path / "out")
    assert rep["offload"] and "quantize" in rep["stages"][0]["summary"]
    m, tok = mp.load(tmp_path / "out")            # an ordinary export: checksums verified
    assert type(m.model.layers[0].self_attn.q_proj).__name__ == "QuantLinear"
    assert not (tmp_path / "out.offload").exists()
    with pytest.raises(UserError, match="cannot run with --offload"):
        run_recipe_offloaded(mp.Recipe.from_dict({"stages": [{"lowrank": {}}]}), model_dir, tmp_path / "o2")
    with pytest.raises(UserError, match="budget"):
        run_recipe_offloaded(mp.Recipe.from_dict({"stages": [{"prune": {"method": "magnitude", "budget": "owl"}}]}),
                             model_dir, tmp_path / "o3")


def test_cli_offload(model_dir, tmp_path, capsys):
    from modelpress.cli import main
    recipe = tmp_path / "r.yaml"
    recipe.write_text("stages:\n  - quantize: {method: rtn, bits: 4, group_size: 32}\n")
    assert main(["compress", str(model_dir), "--recipe", str(recipe), "--out", str(tmp_path / "o"), "--offload"]) == 0
    assert "offloaded" in capsys.readouterr().out
    m, _ = mp.load(tmp_path / "o")
    assert type(m.model.layers[1].mlp.up_proj).__name__ == "QuantLinear"
