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


def _resident_mapped(path) -> int:
    """Resident bytes of this process' memory maps of `path` (from /proc/self/smaps)."""
    total, inside = 0, False
    with open("/proc/self/smaps") as f:
        for line in f:
            if "-" in line.split()[0] and len(line.split()) >= 5:
                inside = line.rstrip().endswith(str(path))
            elif inside and line.startswith("Rss:"):
                total += int(line.split()[1]) * 1024
    return total


@pytest.mark.parametrize("tied", [False, True])
def test_load_maps_only_the_embeddings_and_never_writes_the_file(tmp_path, tied):
    """mp.load of a safetensors folder copies every tensor out of the file except the input embedding and an
    untied output layer, which stay in a private map (only the rows a run touches become resident); a write to
    them goes to private pages, never to the file; values are the file's."""
    import gc

    from safetensors.torch import load_file
    from transformers import LlamaConfig, LlamaForCausalLM

    from modelpress.io import sha256_file

    from .conftest import tiny_tokenizer
    cfg = LlamaConfig(vocab_size=4096, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2, tie_word_embeddings=tied)
    LlamaForCausalLM(cfg).save_pretrained(tmp_path)
    tiny_tokenizer().save_pretrained(tmp_path)
    file = (tmp_path / "model.safetensors").resolve()
    before = sha256_file(file)
    stored = {k: v.clone() for k, v in load_file(file).items()}
    gc.collect()
    model, _ = mp.load(tmp_path)
    emb = model.get_input_embeddings().weight
    table_bytes = emb.numel() * 4 * (1 if tied else 2)
    slack = 2 * 64 * 1024                   # the kernel faults pages in around each touch (16 pages)
    assert _resident_mapped(file) <= slack                                  # nothing read yet
    for t in {id(t): t for t in (emb, model.get_output_embeddings().weight)}.values():
        float(t.detach().sum())
    assert table_bytes <= _resident_mapped(file) <= table_bytes + slack     # the tables, nothing else
    for name, t in model.state_dict().items():
        assert torch.equal(t, stored.get(name, stored["model.embed_tokens.weight"]))
    with torch.no_grad():
        emb.add_(1.0)
        model.get_output_embeddings().weight.mul_(2.0)
    assert sha256_file(file) == before
    del model, emb, t
    gc.collect()
    assert _resident_mapped(file) == 0                                        # the maps go with the tensors
