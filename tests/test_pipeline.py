"""End-to-end on tiny models: every shipped recipe runs, exports, and reloads to identical logits."""
import json

import pytest
import torch

import modelpress as mp
from modelpress.algos.prune import is_nm
from modelpress.errors import UserError
from modelpress.export import load_compressed, save, verify
from modelpress.modules import QuantLinear, SparseLinear
from modelpress.recipe import RECIPES_DIR, Recipe

from .conftest import correlated_calib, tiny_gpt2, tiny_llama

SHIPPED = sorted(p.stem for p in RECIPES_DIR.glob("*.yaml"))


@torch.no_grad()
def _logits(m, ids):
    return m(input_ids=ids).logits


@pytest.mark.parametrize("name", SHIPPED)
def test_every_shipped_recipe_runs_and_reloads_exactly(name, tmp_path, ids):
    recipe = Recipe.from_yaml(name)
    model = tiny_llama(layers=2)
    stats = mp.compress(model, recipe, correlated_calib())
    assert all(s["summary"] for s in stats)
    save(model, None, tmp_path / "out", recipe=recipe.to_dict())
    back, _ = load_compressed(tmp_path / "out")
    assert torch.equal(_logits(model, ids), _logits(back, ids))


def test_2of4_then_w4_semantics(calib):
    model = tiny_llama()
    mp.compress(model, Recipe.from_yaml("2of4-w4"), calib)
    for name, m in model.named_modules():
        if name.startswith("model.layers") and isinstance(m, torch.nn.Linear):
            assert isinstance(m, QuantLinear) and m.keep is not None
            assert is_nm(m.weight, 2, 4)
            assert float((m.weight == 0).float().mean()) >= 0.5


def test_gptq_beats_rtn_end_to_end(calib, ids):
    ref = tiny_llama()
    errs = {}
    for method in ("rtn", "gptq"):
        m = tiny_llama()
        mp.compress(m, Recipe.from_dict({"stages": [{"quantize": {"method": method, "bits": 3, "group_size": 32}}]}), calib)
        errs[method] = float((_logits(m, calib.input_ids[:4]) - _logits(ref, calib.input_ids[:4])).pow(2).mean())
    assert errs["gptq"] < errs["rtn"]


def test_gpt2_prune_quant_export_reload(tmp_path, calib, ids):
    m = tiny_gpt2()
    r = Recipe.from_dict({"stages": [{"prune": {"method": "wanda", "sparsity": 0.5}},
                                     {"quantize": {"method": "gptq", "bits": 4, "group_size": 32, "sym": False}}]})
    mp.compress(m, r, calib)
    save(m, None, tmp_path / "g", recipe=r.to_dict())
    back, _ = load_compressed(tmp_path / "g")
    assert torch.equal(_logits(m, ids), _logits(back, ids))


def test_sparse_export_is_compact_and_exact(tmp_path, calib, ids):
    m = tiny_llama(tie=False)
    mp.compress(m, Recipe.from_dict({"stages": [{"prune": {"method": "magnitude", "sparsity": 0.75}}]}), calib)
    assert all(isinstance(x, SparseLinear) for n, x in m.named_modules() if n.endswith("proj"))
    rep = mp.eval.size_report(m)
    # 25% of values at 16 bits (the default storage dtype) + 1 mask bit per weight
    assert all(abs(r["bits"] - (0.25 * 16 + 1)) < 1e-6 for r in rep["layers"].values())
    assert all(abs(r["bits"] - (0.25 * 32 + 1)) < 1e-6 for r in mp.eval.size_report(m, "float32")["layers"].values())
    save(m, None, tmp_path / "s")
    back, _ = load_compressed(tmp_path / "s")
    assert torch.equal(_logits(m, ids), _logits(back, ids))


def test_bits_per_weight_counts_scales_and_zeros(calib):
    m = tiny_llama()
    mp.compress(m, Recipe.from_dict({"stages": [{"quantize": {"method": "rtn", "bits": 4, "group_size": 32, "sym": False}}]}), calib)
    rep = mp.eval.size_report(m)
    # 4 bits + (16-bit scale + 4-bit zero) / 32 weights
    assert all(abs(r["bits"] - (4 + 20 / 32)) < 1e-6 for r in rep["layers"].values())


def test_corrupted_export_detected(tmp_path, calib):
    m = tiny_llama()
    mp.compress(m, Recipe.from_dict({"stages": [{"quantize": {"method": "rtn"}}]}), calib)
    out = save(m, None, tmp_path / "c")
    data = bytearray((out / "model.safetensors").read_bytes())
    data[-10] ^= 0xFF
    (out / "model.safetensors").write_bytes(bytes(data))
    with pytest.raises(UserError, match="corrupted"):
        verify(out)


def test_export_refuses_foreign_folder_and_overwrites_own(tmp_path, calib):
    foreign = tmp_path / "f"
    foreign.mkdir()
    (foreign / "notes.txt").write_text("mine")
    m = tiny_llama()
    with pytest.raises(UserError, match="not a modelpress export"):
        save(m, None, foreign)
    assert (foreign / "notes.txt").read_text() == "mine"
    save(m, None, tmp_path / "o")
    save(m, None, tmp_path / "o")
    assert json.loads((tmp_path / "o" / "modelpress.json").read_text())["format"] == "modelpress/1"
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]


def test_recipe_errors_name_key_and_allowed():
    with pytest.raises(UserError, match="unknown stage 'quantise'.*quantize"):
        Recipe.from_dict({"stages": [{"quantise": {}}]})
    with pytest.raises(UserError, match="unknown key 'bit'.*bits"):
        Recipe.from_dict({"stages": [{"quantize": {"bit": 4}}]})
    with pytest.raises(UserError, match=r"quantize.bits must be an integer in \[2, 8\]"):
        Recipe.from_dict({"stages": [{"quantize": {"bits": 9}}]})
    with pytest.raises(UserError, match="conflicts with pattern 2:4"):
        Recipe.from_dict({"stages": [{"prune": {"sparsity": 0.3, "pattern": "2:4"}}]})
    with pytest.raises(UserError, match="unknown key 'sampels'"):
        Recipe.from_dict({"calibration": {"sampels": 3}, "stages": [{"quantize": {}}]})


def test_recipe_yaml_roundtrip():
    r = Recipe.from_yaml("2of4-w4")
    assert Recipe.from_dict(r.to_dict()) == r


def test_layerwise_shares_statistics_of_identical_inputs(calib):
    from modelpress.engine import layerwise
    from modelpress.targets import Target
    m = tiny_llama()
    step = next(layerwise.steps(m, calib))
    lin = step.linears(Target())
    H = step.collect(lin, "hessian")
    p = "model.layers.0."
    assert H[p + "self_attn.q_proj"] is H[p + "self_attn.k_proj"] is H[p + "self_attn.v_proj"]
    assert H[p + "mlp.gate_proj"] is H[p + "mlp.up_proj"]
    assert H[p + "self_attn.o_proj"] is not H[p + "self_attn.q_proj"]
    # H = 2 X^T X / n, checked against the raw inputs
    X = step.collect({p + "mlp.down_proj": lin[p + "mlp.down_proj"]}, "inputs")[p + "mlp.down_proj"]
    assert torch.allclose(H[p + "mlp.down_proj"], 2 * X.t() @ X / X.shape[0], rtol=1e-4, atol=1e-5)


def test_recipe_with_certify_block_writes_a_verified_certificate(tmp_path):
    """load -> calibrate -> compress -> evaluate -> certify -> export, on a tiny model folder with text files."""
    from .conftest import tiny_model_dir
    from modelpress.certify import certificate as certify
    model = tiny_model_dir(tmp_path / "m")
    text = tmp_path / "t.txt"
    text.write_text("\n\n".join(["the quick brown fox jumps over the lazy dog"] * 300))
    r = Recipe.from_dict({"calibration": {"source": str(text), "samples": 8, "seqlen": 32},
                          "evaluate": {"text": str(text), "seqlen": 32, "windows": 8},
                          "certify": {"property": "agreement", "eps": 0.5, "delta": 0.05, "text": str(text),
                                      "seqlen": 32, "windows": 40},
                          "stages": [{"quantize": {"method": "gptq", "bits": 8, "group_size": 32}}]})
    rep = mp.run_recipe(r, str(model), tmp_path / "out")
    assert rep["certificate"]["passed"] and rep["eval"]["compressed"]["agreement"] > 0.9
    certify.verify(tmp_path / "out")
    with pytest.raises(UserError, match="certify: unknown key"):
        Recipe.from_dict({"certify": {"epsilon": 0.1}, "stages": [{"quantize": {}}]})


def test_stages_refuse_to_destroy_earlier_compression(calib):
    m = tiny_llama()
    mp.compress(m, Recipe.from_dict({"stages": [{"cluster": {"k": 16}}]}), calib)
    with pytest.raises(UserError, match="already a ClusteredLinear"):
        mp.compress(m, Recipe.from_dict({"stages": [{"quantize": {"method": "rtn"}}]}), calib)
