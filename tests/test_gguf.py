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


def _llama(vocab: int, tie: bool, hidden: int = 64, inter: int = 128) -> LlamaForCausalLM:
    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=vocab, hidden_size=hidden, intermediate_size=inter, num_hidden_layers=2,
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
    "q4_0-gptq-signed": ([{"quantize": {"method": "gptq", "bits": 4, "format": "q4_0", "observer": "hessian"}}],
                         "Q4_0", True),
    "q8_0-rtn-signed": ([{"quantize": {"method": "rtn", "bits": 8, "format": "q8_0", "observer": "mse"}}], "Q8_0", True),
}


@pytest.mark.parametrize("case", list(CASES))
def test_gguf_roundtrip(case, tok, tmp_path):
    stages, qtype, exact = CASES[case]
    m = _llama(len(tok), tie=case != "w8g32sym")
    mp.compress(m, mp.Recipe.from_dict({"stages": stages}), correlated_calib(n=4, seqlen=32))
    rep = save_gguf(m, tok, tmp_path / "model.gguf", embed_type="float")
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
    # the linears exactly; the embedding as llama-quantize does (Q8_0: its rows are not whole 256-superblocks)
    assert "Q4_0 x14" in rep["export_gguf"] and "Q8_0 x2" in rep["export_gguf"]          # embedding + output
    assert "2 tensors not exact" in rep["export_gguf"]
    back = AutoModelForCausalLM.from_pretrained(tmp_path / "out", gguf_file="model.gguf", dtype=torch.float32)
    ids = torch.randint(0, 128, (1, 16), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        a, b = back(ids).logits, rep["_model"](ids).logits
    assert 0 < (a - b).abs().max() < 1e-2 * b.abs().max()


# ---------------------------------------------------------------- k-quants

@pytest.mark.parametrize("fmt", ["q4_k", "q5_k", "q6_k"])
def test_k_blocks_bit_exact_any_params(fmt):
    """Random codes and grid parameters over their whole ranges pack into blocks that gguf's dequantizer reads
    back as exactly kquant.dequantize's weights."""
    from gguf import GGMLQuantizationType
    from modelpress.algos import kquant as K
    from modelpress.export.gguf import k_blocks
    f = K.FORMATS[fmt]
    g = torch.Generator().manual_seed(0)
    rows, cols = 6, 768
    nsup, nsub = cols // 256, cols // f.sub
    q = torch.randint(0, 1 << f.bits, (rows, cols), generator=g, dtype=torch.uint8)
    d = (torch.rand(rows, nsup, generator=g) * 0.05).half()
    lo = -128 if f.sym else 0
    sc = torch.randint(lo, f.sc_max + 1, (rows, nsub), generator=g, dtype=torch.int16)
    dmin = torch.zeros_like(d) if f.sym else (torch.rand(rows, nsup, generator=g) * 0.05).half()
    m = torch.zeros_like(sc) if f.sym else torch.randint(0, 64, (rows, nsub), generator=g, dtype=torch.int16)
    p = K.KParams(fmt, d, sc, dmin, m)
    got = dequantize(k_blocks(q, p), GGMLQuantizationType[fmt.upper()]).reshape(rows, cols)
    ours = K.dequantize(q, p).numpy()
    assert np.array_equal(got, ours)
    assert np.abs(ours).max() > 0


def test_snap_stays_on_grid_and_close():
    from modelpress.algos import kquant as K
    from modelpress.algos.quant import sqnr
    w = torch.randn(16, 512, generator=torch.Generator().manual_seed(1)) * torch.linspace(0.1, 2, 16)[:, None]
    for fmt in K.FORMATS:
        f = K.FORMATS[fmt]
        q, p = K.rtn(w, fmt)
        assert int(p.sc.min()) >= 1 and int(p.sc.max()) <= f.sc_max and int(p.m.min()) >= 0 and int(p.m.max()) <= 63
        assert int(q.max()) <= (1 << f.bits) - 1
        sq = sqnr(w, K.dequantize(q, p))
        assert sq > {"q4_k": 16, "q5_k": 22, "q6_k": 28}[fmt], (fmt, sq)     # about 6 dB per bit


KCASES = {   # format, method, GGUF type of the 256-multiple linears
    "q4_k-gptq": ("q4_k", "gptq", "Q4_K"),
    "q5_k-rtn": ("q5_k", "rtn", "Q5_K"),
    "q6_k-gptq": ("q6_k", "gptq", "Q6_K"),
}


@pytest.mark.parametrize("case", list(KCASES))
def test_kquant_export_exact(case, tok, tmp_path):
    fmt, method, qtype = KCASES[case]
    m = _llama(len(tok), tie=True, hidden=256, inter=512)
    mp.compress(m, mp.Recipe.from_dict({"stages": [{"quantize": {"method": method, "bits": int(qtype[1]),
                                                                 "format": fmt, "observer": "mse"}}]}),
                correlated_calib(n=4, seqlen=32))
    rep = save_gguf(m, tok, tmp_path / "model.gguf", embed_type="float")
    r = GGUFReader(tmp_path / "model.gguf")
    by_name = {t.name: t for t in r.tensors}
    q = m.model.layers[1].self_attn.q_proj
    t = by_name["blk.1.attn_q.weight"]
    assert t.tensor_type.name == qtype and by_name["blk.0.ffn_down.weight"].tensor_type.name == qtype
    ours = permute_qk(q.weight.detach(), 4, 4).numpy()
    assert np.array_equal(dequantize(t.data, t.tensor_type).reshape(ours.shape), ours)
    assert all(v["exact"] for v in rep["tensors"].values())
    back = AutoModelForCausalLM.from_pretrained(tmp_path, gguf_file="model.gguf", dtype=torch.float32)
    ids = torch.randint(0, len(tok), (2, 24), generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        assert (back(ids).logits - m(ids).logits).abs().max().item() == 0.0
    # the native format keeps the grid exactly too
    from modelpress.modules import QuantLinear
    t2, cfg = q.to_state()
    assert cfg["format"] == fmt and torch.equal(QuantLinear.from_state(t2, cfg).weight, q.weight)


def test_kquant_gptq_beats_rtn_on_grid():
    from modelpress.algos import gptq as G
    from modelpress.algos import kquant as K
    g = torch.Generator().manual_seed(0)
    X = torch.randn(1024, 256, generator=g) @ (0.3 * torch.randn(256, 256, generator=g) + torch.eye(256))
    H = 2 * X.T @ X / X.shape[0]
    W = torch.randn(32, 256, generator=g)
    p = K.params(W, "q4_k", "mse")
    r = G.gptq(W, H, 4, 32, False, act_order=True, grid=p.scale_zero())

    def err(q):
        E = W - K.dequantize(q, p)
        return float(torch.einsum("ri,ij,rj->", E, H, E))
    assert err(r.q) < 0.8 * err(K.codes(W, p))


def test_kquant_ragged_rows_fall_back_to_int_grid(tok, tmp_path):
    """Rows that are not whole super-blocks (64 inputs here) keep the int grid (4-bit g32 asym -> Q4_1), as
    llama-quantize falls back for them; the embedding goes Q6_K -> Q8_0 for the same reason."""
    m = _llama(len(tok), tie=True, hidden=64, inter=256)
    mp.compress(m, mp.Recipe.from_dict({"stages": [{"quantize": {"method": "rtn", "bits": 4, "format": "q4_k"}}]}), None)
    rep = save_gguf(m, tok, tmp_path / "model.gguf")
    types = {v["gguf"]: v["type"] for v in rep["tensors"].values()}
    assert types["blk.0.attn_q.weight"] == "Q4_1" and types["blk.0.ffn_down.weight"] == "Q4_K"
    assert types["token_embd.weight"] == "Q8_0"


@pytest.mark.parametrize("fmt,want", [("q4_k", "Q5_0"), ("q5_k", "Q5_1"), ("q6_k", "Q8_0")])
def test_kquant_llama_fallback_writes_llama_quantize_types(fmt, want, tok, tmp_path):
    """kquant_fallback llama: ragged rows (64 inputs) get the type llama-quantize falls back to, written exactly
    (logits identical after transformers reads the GGUF back); rows of 256 inputs stay k-quants."""
    m = _llama(len(tok), tie=True, hidden=64, inter=256)
    q = {"method": "gptq", "bits": int(fmt[1]), "format": fmt, "kquant_fallback": "llama"}
    mp.compress(m, mp.Recipe.from_dict({"stages": [{"quantize": q}]}), correlated_calib(n=4, seqlen=32))
    rep = save_gguf(m, tok, tmp_path / "model.gguf", embed_type="float")
    types = {v["gguf"]: v["type"] for v in rep["tensors"].values()}
    assert types["blk.0.attn_q.weight"] == want and types["blk.1.ffn_up.weight"] == want
    assert types["blk.0.ffn_down.weight"] == fmt.upper()
    exact = want != "Q5_1"                  # Q5_1 stores the offset m = -s z in fp16 (module docstring of export.gguf)
    assert all(v["exact"] for v in rep["tensors"].values() if exact or v["type"] != "Q5_1")
    back = AutoModelForCausalLM.from_pretrained(tmp_path, gguf_file="model.gguf", dtype=torch.float32)
    ids = torch.randint(0, len(tok), (2, 24), generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        d = (back(ids).logits - m(ids).logits).abs().max().item()
    assert d == 0.0 if exact else d < 1e-3


@pytest.mark.parametrize("fmt,fallback", [("q4_k", "int"), ("q4_k", "llama"), ("q6_k", "llama")])
def test_kquant_native_export_reloads_exactly(fmt, fallback, tok, tmp_path):
    """The native export of k-quant linears (kd/ksc/kdmin/km instead of scales/zeros) passes load's
    consistency check and reloads with identical logits; a k-quant tensor of the wrong shape is refused."""
    from modelpress.export import native
    m = _llama(len(tok), tie=True, hidden=64, inter=256)
    q = {"method": "gptq", "bits": int(fmt[1]), "format": fmt, "kquant_fallback": fallback}
    mp.compress(m, mp.Recipe.from_dict({"stages": [{"quantize": q}]}), correlated_calib(n=4, seqlen=32))
    native.save(m, tok, tmp_path / "out")
    back, _ = mp.load(str(tmp_path / "out"))
    assert back.model.layers[0].mlp.down_proj.fmt == fmt
    ids = torch.randint(0, len(tok), (2, 24), generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        assert (back(ids).logits - m(ids).logits).abs().max().item() == 0.0
    t, cfg = m.model.layers[0].mlp.down_proj.to_state()
    t["kd"] = t["kd"][:, :0]
    with pytest.raises(UserError, match="tensor kd has shape"):
        native.check_module_state("down_proj", "QuantLinear", t, cfg, "here")


def test_kquant_config_errors():
    with pytest.raises(UserError, match="kquant_fallback"):
        mp.Quantize(bits=4, group_size=32, kquant_fallback="llama")
    with pytest.raises(UserError, match="kquant_fallback"):
        mp.Quantize(bits=4, format="q4_k", kquant_fallback="q5_0")
    with pytest.raises(UserError, match="format q4_k"):
        mp.Quantize(bits=3, format="q4_k")
    with pytest.raises(UserError, match="quantize.format"):
        mp.Quantize(format="q3_x")
    assert mp.Quantize(bits=6, format="q6_k").group_size == 16


@pytest.mark.parametrize("etype,hidden,want", [("q6_k", 256, "Q6_K"), ("q8_0", 256, "Q8_0"), ("auto", 256, "Q6_K"),
                                               ("q6_k", 64, "Q8_0")])
def test_embedding_types(etype, hidden, want, tok, tmp_path):
    m = _llama(len(tok), tie=False, hidden=hidden, inter=256)
    mp.compress(m, mp.Recipe.from_dict({"stages": [{"quantize": {"method": "rtn", "bits": 4, "group_size": 32}}]}), None)
    rep = save_gguf(m, tok, tmp_path / "model.gguf", embed_type=etype)
    r = GGUFReader(tmp_path / "model.gguf")
    by_name = {t.name: t for t in r.tensors}
    for name, hf in (("token_embd.weight", m.model.embed_tokens.weight), ("output.weight", m.lm_head.weight)):
        t = by_name[name]
        assert t.tensor_type.name == want
        got = dequantize(t.data, t.tensor_type).reshape(hf.shape)
        sq = 10 * np.log10((hf.detach().numpy() ** 2).sum() / ((got - hf.detach().numpy()) ** 2).sum())
        assert sq > (30 if want == "Q6_K" else 38)
    assert rep["tensors"]["model.embed_tokens.weight"]["type"] == want
    m2 = _llama(len(tok), tie=True)                                     # a plain model keeps float embeddings
    assert save_gguf(m2, tok, tmp_path / "p.gguf")["tensors"]["model.embed_tokens.weight"]["type"] == "F32"


# ---------------------------------------------------------------- metadata

def test_metadata_copied_from_source_gguf(tok, tmp_path):
    """A model loaded from a GGUF gets that file's general.* and tokenizer.* keys (the converter's pre-tokenizer,
    add_bos_token, chat template, ...) unchanged."""
    m = _llama(len(tok), tie=True)
    save_gguf(m, tok, tmp_path / "src.gguf", tokenizer_pre="smollm", embed_type="float")
    src = {k: f.contents() for k, f in GGUFReader(tmp_path / "src.gguf").fields.items()}
    assert src["tokenizer.ggml.pre"] == "smollm"
    assert src["tokenizer.ggml.add_bos_token"] is False and "tokenizer.ggml.add_eos_token" in src
    tok2 = AutoTokenizer.from_pretrained(tmp_path, gguf_file="src.gguf")
    mp.compress(m, mp.Recipe.from_dict({"stages": [{"quantize": {"method": "rtn", "bits": 4, "group_size": 32}}]}), None)
    rep = save_gguf(m, tok2, tmp_path / "out.gguf")
    assert "from src.gguf" in rep["summary"]
    out = {k: f.contents() for k, f in GGUFReader(tmp_path / "out.gguf").fields.items()}
    for k, v in src.items():
        if k.startswith(("tokenizer.", "general.")) and k not in ("general.file_type",):
            assert out[k] == v, k
    assert out["general.file_type"] != src["general.file_type"]


@pytest.mark.slow
def test_smollm2_metadata_matches_official(tmp_path):
    """SmolLM2 (converted from the official Q4_1 GGUF) exported by modelpress carries the official converter's
    tokenizer and general metadata: pre-tokenizer "smollm", add_bos_token false, chat template, ..."""
    from modelpress.export.gguf import source_gguf
    m, tk = mp.load("smollm2")
    src = source_gguf(m, tk)
    assert src is not None and src.name.endswith(".gguf")
    save_gguf(m, tk, tmp_path / "m.gguf", embed_type="q8_0", float_type="f16")
    off = {k: f.contents() for k, f in GGUFReader(src).fields.items()}
    out = {k: f.contents() for k, f in GGUFReader(tmp_path / "m.gguf").fields.items()}
    assert out["tokenizer.ggml.pre"] == "smollm" and out["tokenizer.ggml.add_bos_token"] is False
    for k, v in off.items():
        if k.startswith(("tokenizer.", "general.")) and k != "general.file_type":
            assert out[k] == v, k


def test_kquant_grid_refused_where_it_cannot_be_stored(tok, tmp_path):
    """compressed-tensors has integer zero points only; a pruned linear cannot keep exact zeros on a k-quant grid."""
    from modelpress.export.compressed_tensors import save_compressed_tensors
    m = _llama(len(tok), tie=True, hidden=256, inter=512)
    mp.compress(m, mp.Recipe.from_dict({"stages": [{"quantize": {"method": "rtn", "bits": 4, "format": "q4_k"}}]}), None)
    with pytest.raises(UserError, match="q4_k grid"):
        save_compressed_tensors(m, tok, tmp_path / "ct")
    m2 = _llama(len(tok), tie=True, hidden=256, inter=512)
    with pytest.raises(UserError, match="pruned"):
        mp.compress(m2, mp.Recipe.from_dict({"stages": [{"prune": {"method": "magnitude", "sparsity": 0.5}},
                                                        {"quantize": {"method": "rtn", "bits": 4, "format": "q4_k"}}]}), None)
