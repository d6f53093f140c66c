"""GGUF export: read back with the gguf package (types, dequantized values) and with transformers
(logits, tokenizer)."""
import numpy as np
import pytest
import torch
from gguf import GGUFReader, dequantize
from transformers import AutoModelForCausalLM, AutoTokenizer, LlamaConfig, LlamaForCausalLM

import modelpress as mp
from modelpress.errors import UserError
from modelpress.export.gguf import permute_qk, save_gguf

from .conftest import correlated_calib


@pytest.fixture(scope="module")
def tok():
    """Byte-level BPE with merges and one special token, trained in-process."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast
    tk = Tokenizer(models.BPE())
    tk.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tk.decoder = decoders.ByteLevel()
    text = ["the quick brown fox jumps over the lazy dog"] * 20 + ["compression keeps what matters"] * 20
    tk.train_from_iterator(text, trainers.BpeTrainer(vocab_size=300, special_tokens=["<eos>"],
                                                     initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
    return PreTrainedTokenizerFast(tokenizer_object=tk, eos_token="<eos>")


def _llama(vocab: int, tie: bool) -> LlamaForCausalLM:
    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=vocab, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2, tie_word_embeddings=tie,
                      max_position_embeddings=256)
    return LlamaForCausalLM(cfg).eval()


CASES = {
    "w4g32sym": ([{"quantize": {"method": "gptq", "bits": 4, "group_size": 32, "sym": True}}], "Q4_0", True),
    "w8g32sym": ([{"quantize": {"method": "rtn", "bits": 8, "group_size": 32, "sym": True}}], "Q8_0", True),
    "2of4-w4g32sym": ([{"prune": {"method": "sparsegpt", "pattern": "2:4", "sparsity": 0.5}},
                       {"quantize": {"method": "gptq", "bits": 4, "group_size": 32, "sym": True}}], "Q4_0", True),
    "w4g32asym": ([{"quantize": {"method": "rtn", "bits": 4, "group_size": 32, "sym": False}}], "Q4_1", False),
    "w4g64sym-requant": ([{"quantize": {"method": "rtn", "bits": 4, "group_size": 64, "sym": True}}], "Q8_0", False),
}


@pytest.mark.parametrize("case", list(CASES))
def test_gguf_roundtrip(case, tok, tmp_path):
    stages, qtype, exact = CASES[case]
    m = _llama(len(tok), tie=case != "w8g32sym")
    mp.compress(m, mp.Recipe.from_dict({"stages": stages}), correlated_calib(n=4, seqlen=32))
    rep = save_gguf(m, tok, tmp_path / "model.gguf")
    # 1. the gguf package: types and dequantized values equal ours (q/k in llama.cpp's row order)
    r = GGUFReader(tmp_path / "model.gguf")
    by_name = {t.name: t for t in r.tensors}
    assert ("output.weight" in by_name) == (case == "w8g32sym")        # tied: no separate output tensor
    q = m.model.layers[1].self_attn.q_proj
    t = by_name["blk.1.attn_q.weight"]
    assert t.tensor_type.name == qtype
    ours = permute_qk(q.weight.detach(), 4, 4).numpy()
    got = dequantize(t.data, t.tensor_type).reshape(ours.shape)
    if exact:
        assert np.array_equal(got, ours)
        assert all(v["exact"] for v in rep["tensors"].values())
    else:
        err = np.abs(got - ours).max() / np.abs(ours).max()
        assert 0 < err < (2e-3 if qtype == "Q4_1" else 2e-2)
        assert 30 < rep["tensors"]["model.layers.1.self_attn.q_proj.weight"]["extra_sqnr_db"] < 120
    # 2. transformers: logits (its loader un-permutes q/k) and tokenizer
    back = AutoModelForCausalLM.from_pretrained(tmp_path, gguf_file="model.gguf", dtype=torch.float32)
    ids = torch.randint(0, len(tok), (2, 24), generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        diff = (back(ids).logits - m(ids).logits).abs().max().item()
    assert diff == 0.0 if exact else diff < 5e-2
    if case == "w4g32sym":
        t2 = AutoTokenizer.from_pretrained(tmp_path, gguf_file="model.gguf")
        s = "the quick brown fox<eos> compression keeps"
        assert t2(s).input_ids == tok(s).input_ids
        assert t2.eos_token == "<eos>"


def test_refuses_unmapped_scheme_without_requantize(tok, tmp_path):
    m = _llama(len(tok), tie=True)
    mp.compress(m, mp.Recipe.from_dict({"stages": [{"quantize": {"method": "rtn", "bits": 4, "group_size": 128}}]}), None)
    with pytest.raises(UserError, match="no exact GGUF type"):
        save_gguf(m, tok, tmp_path / "model.gguf", requantize=None)
    assert not (tmp_path / "model.gguf").exists()


def test_unsupported_architecture(tmp_path):
    from .conftest import tiny_gpt2
    with pytest.raises(UserError, match="GGUF export supports"):
        save_gguf(tiny_gpt2(), None, tmp_path / "model.gguf")


def test_recipe_export_formats_gguf(tmp_path):
    from modelpress.api import run_recipe

    from .conftest import tiny_model_dir
    model = tiny_model_dir(tmp_path / "m")
    recipe = mp.Recipe.from_dict({"stages": [{"quantize": {"method": "rtn", "bits": 4, "group_size": 32}}],
                                  "export": {"formats": ["native", "gguf"]}})
    rep = run_recipe(recipe, str(model), tmp_path / "out", evaluate_models=False)
    assert "Q4_0 x14" in rep["export_gguf"] and "all exact" in rep["export_gguf"]
    back = AutoModelForCausalLM.from_pretrained(tmp_path / "out", gguf_file="model.gguf", dtype=torch.float32)
    ids = torch.randint(0, 128, (1, 16), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        assert torch.equal(back(ids).logits, rep["_model"](ids).logits)
