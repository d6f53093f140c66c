"""The Python API, verb by verb, used the way the docstrings in modelpress/__init__.py and api.py show,
on a tiny in-process Llama (no download)."""
import copy

import pytest
import torch

import modelpress as mp
from modelpress.eval import eval_windows

from .conftest import tiny_model_dir

TEXT = ("the quick brown fox jumps over the lazy dog and compression keeps what matters. " * 3 + "\n\n") * 60


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    d = tmp_path_factory.mktemp("api")
    (d / "text.txt").write_text(TEXT)
    (d / "recipe.yaml").write_text("stages:\n  - quantize: {method: gptq, bits: 4, group_size: 32}\n")
    return tiny_model_dir(d / "model"), d


def test_load_variants(setup):
    model_dir, _ = setup
    model, tok = mp.load(model_dir)
    assert not model.training and next(model.parameters()).dtype == torch.float32
    assert tok("the quick").input_ids
    half, _ = mp.load(model_dir, dtype="bfloat16")
    assert next(half.parameters()).dtype == torch.bfloat16
    with pytest.raises(mp.UserError, match="does not exist"):
        mp.load(model_dir / "missing.gguf")


def test_calibration_set(setup):
    model_dir, d = setup
    _, tok = mp.load(model_dir)
    calib = mp.calibration_set(tok, str(d / "text.txt"), samples=8, seqlen=32)
    assert calib.input_ids.shape == (8, 32) and calib.provenance["samples"] == 8
    again = mp.calibration_set(tok, str(d / "text.txt"), samples=8, seqlen=32)
    assert calib.sha256() == again.sha256()          # same seed, same windows


def test_compress_evaluate_certify_export(setup, tmp_path):
    model_dir, d = setup
    model, tok = mp.load(model_dir)
    original = copy.deepcopy(model)
    calib = mp.calibration_set(tok, str(d / "text.txt"), samples=8, seqlen=32)
    # compress: a recipe file, a dict, or Recipe(stages=...) built from stage configs
    stats = mp.compress(model, mp.Recipe.from_yaml(d / "recipe.yaml"), calib)
    assert len(stats) == 1 and stats[0]["summary"].startswith("quantize gptq w4 g32")
    built = mp.Recipe(stages=(("quantize", mp.Quantize(method="gptq", bits=4, group_size=32)),))
    assert built.to_dict()["stages"] == mp.Recipe.from_yaml(d / "recipe.yaml").to_dict()["stages"]
    # evaluate: perplexity + agreement/KL against the original + size
    res = mp.evaluate(model, tok, reference=original, text=str(d / "text.txt"), seqlen=32, windows=4)
    assert 0.5 <= res["agreement"] <= 1.0 and res["kl"] >= 0 and res["perplexity"] > 1
    assert 4.0 < res["size"]["bits_per_weight"] < 5.0
    # certify: a probabilistic bound on the disagreement rate
    windows = eval_windows(tok, [TEXT], 32, 8)
    cert = mp.certify(original, model, windows, "agreement", eps=0.5, delta=0.05)
    assert cert.lower <= cert.observed <= cert.bound and cert.confidence == pytest.approx(0.95)
    # export: a folder that reloads to identical logits
    out = mp.export(model, tok, tmp_path / "w4")
    back, tok2 = mp.load(out)
    ids = windows[:2]
    with torch.no_grad():
        assert torch.equal(back(ids).logits, model(ids).logits)
    assert tok2("the quick").input_ids == tok("the quick").input_ids


def test_run_recipe_and_shipped_recipe(setup, tmp_path):
    model_dir, d = setup
    shipped = mp.Recipe.from_yaml("w4a16-gptq-g128")
    assert mp.Recipe.from_dict(__import__("yaml").safe_load(shipped.to_yaml())) == shipped
    recipe = mp.Recipe.from_dict({"calibration": {"source": str(d / "text.txt"), "samples": 4, "seqlen": 32},
                                  "stages": [{"quantize": {"method": "gptq", "bits": 4, "group_size": 32}}]})
    rep = mp.run_recipe(recipe, str(model_dir), tmp_path / "out", evaluate_models=False)
    assert rep["export"] == str(tmp_path / "out") and (tmp_path / "out" / "modelpress.json").exists()
    assert rep["size"]["bits_per_weight"] < 5.0
