"""Generic architecture support: every stage, every export format and the offload path on a tiny in-process
model of each family (no download): Llama, Qwen2 (q/k/v biases), Mistral (sliding window), Gemma / Gemma2 /
Gemma3 text (scaled embeddings, (1 + w) norms, local/global attention layers), Phi-3 (fused qkv_proj and
gate_up_proj), GPT-2 (Conv1D, rewritten as nn.Linear on load) and OPT. What a format cannot hold is a
one-line UserError naming what is missing. Kept fast: 2 layers (3 where local/global layers alternate),
hidden 64, 4 calibration samples of 32 tokens."""
from __future__ import annotations

import pytest
from pathlib import Path
import torch
from torch import nn
from transformers import (AutoModelForCausalLM, Gemma2Config, Gemma2ForCausalLM, Gemma3ForCausalLM, Gemma3TextConfig,
                          GemmaConfig, GemmaForCausalLM, GPT2Config, GPT2LMHeadModel, LlamaConfig, LlamaForCausalLM,
                          MistralConfig, MistralForCausalLM, OPTConfig, OPTForCausalLM, Phi3Config, Phi3ForCausalLM,
                          Qwen2Config, Qwen2ForCausalLM)

import modelpress as mp
from modelpress.engine import layerwise
from modelpress.errors import UserError
from modelpress.export import load_compressed
from modelpress.model import decoder_layers, layer_linears, normalize
from modelpress.modules.cluster import ClusteredLinear
from modelpress.modules.lowrank import LowRankLinear
from modelpress.modules.quant import QuantLinear, SparseLinear

from .conftest import correlated_calib, tiny_tokenizer


@pytest.fixture(scope="module")
def tok():
    return tiny_tokenizer()


V = len(tiny_tokenizer())     # the tokenizer's 257 tokens (byte alphabet + merges + <eos>): GGUF needs them equal


def _cfg(layers: int) -> dict:
    return dict(vocab_size=V, hidden_size=64, intermediate_size=128, num_hidden_layers=layers, num_attention_heads=4,
                num_key_value_heads=2, max_position_embeddings=128)


BUILD = {
    "llama": lambda n: LlamaForCausalLM(LlamaConfig(**_cfg(n))),
    "qwen2": lambda n: Qwen2ForCausalLM(Qwen2Config(**_cfg(n))),
    # sliding window 8 < the 32-token samples; layers 1.. slide (max_window_layers=1), layer 0 attends fully
    "qwen2-sliding": lambda n: Qwen2ForCausalLM(Qwen2Config(**_cfg(n), use_sliding_window=True, sliding_window=8,
                                                            max_window_layers=1)),
    "mistral": lambda n: MistralForCausalLM(MistralConfig(**_cfg(n), sliding_window=8)),
    "gemma": lambda n: GemmaForCausalLM(GemmaConfig(**_cfg(n), head_dim=16)),
    "gemma2": lambda n: Gemma2ForCausalLM(Gemma2Config(**_cfg(n), head_dim=16, sliding_window=8)),
    "gemma3": lambda n: Gemma3ForCausalLM(Gemma3TextConfig(**_cfg(n), head_dim=16, sliding_window=8,
                                                           sliding_window_pattern=2)),
    "phi3": lambda n: Phi3ForCausalLM(Phi3Config(**_cfg(n), pad_token_id=0, bos_token_id=1, eos_token_id=0)),
    "gpt2": lambda n: GPT2LMHeadModel(GPT2Config(vocab_size=V, n_embd=64, n_layer=n, n_head=4, n_positions=128,
                                                 bos_token_id=0, eos_token_id=0)),
    "opt": lambda n: OPTForCausalLM(OPTConfig(vocab_size=V, hidden_size=64, ffn_dim=128, num_hidden_layers=n,
                                              num_attention_heads=4, word_embed_proj_dim=64, max_position_embeddings=128,
                                              pad_token_id=1, bos_token_id=0, eos_token_id=0)),
}
ARCHS = list(BUILD)
GGUF_ARCHS = {"llama", "qwen2"}     # the others: a UserError naming the model type or the sliding window it lacks
ALTERNATING = {"qwen2-sliding", "gemma2", "gemma3"}                # layers with different masks / rotary tables


def build(arch: str, layers: int = 2, dtype: torch.dtype = torch.float32) -> nn.Module:
    """Built in `dtype` as from_pretrained(dtype=...) would (rotary tables stay float32, unlike module.to)."""
    torch.manual_seed(0)
    old = torch.get_default_dtype()
    torch.set_default_dtype(dtype)
    try:
        return normalize(BUILD[arch](layers).eval())
    finally:
        torch.set_default_dtype(old)


@pytest.fixture(scope="module")
def calib():
    from modelpress.calib import CalibrationSet
    c = correlated_calib(n=4, seqlen=32)                          # ids < 128 <= V
    return CalibrationSet.from_ids(c.input_ids, source="synthetic")


def _logits(m: nn.Module, ids: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        return m(ids).logits


# -------------------------------------------------------------------------------- the decoder-layer protocol

@pytest.mark.parametrize("arch", ARCHS)
def test_layerwise_pass_reproduces_the_model(arch, calib, one_thread):
    """Every layer's inputs and outputs in the layer-wise engine equal the model's own hidden states: each layer
    gets its own keyword arguments (sliding vs full attention masks, local vs global rotary tables)."""
    m = build(arch, layers=3)
    with torch.no_grad():
        hs = m(calib.input_ids, output_hidden_states=True).hidden_states     # embeddings, layer 0, 1, final norm
    for step in layerwise.steps(m, calib, batch_size=2):
        assert torch.equal(torch.cat(step.inputs), hs[step.index])
        if step.index + 1 < len(hs) - 1:                                     # (the last one is after the norm)
            assert torch.allclose(torch.cat(step.outputs()), hs[step.index + 1], atol=1e-5)


def test_alternating_layers_need_their_own_masks(calib):
    """The test above can fail: replaying layer 0's arguments to a full-attention layer changes its output."""
    m = build("gemma2", layers=3)
    inputs, kwargs = layerwise.capture_inputs(m, calib, 4, torch.device("cpu"))
    x = inputs[0]
    with torch.no_grad():
        own = layerwise._out(m.model.layers[0](x, **kwargs[0][0]))
        right = layerwise._out(m.model.layers[1](own, **kwargs[1][0]))
        wrong = layerwise._out(m.model.layers[1](own, **kwargs[0][0]))
    assert (right - wrong).abs().max() > 1e-2


# --------------------------------------------------------------------------------- every stage, native export

STAGES = {
    "rtn": {"quantize": {"method": "rtn", "bits": 4, "group_size": 32}},
    "gptq": {"quantize": {"method": "gptq", "bits": 4, "group_size": 32}},
    "magnitude": {"prune": {"method": "magnitude", "sparsity": 0.5}},
    "wanda": {"prune": {"method": "wanda", "sparsity": 0.5}},
    "sparsegpt-2of4": {"prune": {"method": "sparsegpt", "pattern": "2:4"}},
    "cluster": {"cluster": {"k": 16, "iters": 5}},
    "lowrank": {"lowrank": {"method": "asvd", "rank_by": "fixed", "rank": 8}},
    "lossless": {"lossless": {}},                    # on the bf16 model (lossless codes bf16/fp16 weights)
}
KIND = {"rtn": QuantLinear, "gptq": QuantLinear, "magnitude": SparseLinear, "wanda": SparseLinear,
        "sparsegpt-2of4": SparseLinear, "cluster": ClusteredLinear, "lowrank": LowRankLinear}


def _decoder_linears(m: nn.Module) -> dict[str, nn.Module]:
    prefix, layers = decoder_layers(m)
    out = {}
    for i, layer in enumerate(layers):
        out.update(layer_linears(layer, f"{prefix}.{i}"))
    return out


@pytest.mark.parametrize("stage", list(STAGES))
@pytest.mark.parametrize("arch", ARCHS)
def test_stage_and_native_round_trip(arch, stage, calib, tok, tmp_path, one_thread):
    m = build(arch, dtype=torch.bfloat16 if stage == "lossless" else torch.float32)
    n_linears = len(_decoder_linears(m))
    ids = calib.input_ids[:2]
    before = _logits(m, ids)
    stats = mp.compress(m, mp.Recipe.from_dict({"stages": [STAGES[stage]]}), calib)
    after = _logits(m, ids)
    assert torch.isfinite(after).all()
    lin = _decoder_linears(m) if stage in KIND else {}
    if stage in KIND:                      # every decoder linear (fused qkv_proj / gate_up_proj included) replaced
        assert len(lin) == n_linears and all(isinstance(x, KIND[stage]) for x in lin.values())
        assert not torch.equal(after, before)
    if stage in ("magnitude", "wanda", "sparsegpt-2of4"):
        for name, x in lin.items():
            zeros = float((x.weight == 0).float().mean())
            assert zeros == pytest.approx(0.5, abs=0.02), name
    if stage == "sparsegpt-2of4":
        for x in lin.values():
            assert ((x.weight.reshape(x.weight.shape[0], -1, 4) != 0).sum(-1) <= 2).all()
    if stage == "lossless":                # exact: the same logits, bit for bit
        assert torch.equal(after, before)
    assert stats[0]["summary"]
    mp.export(m, tok, tmp_path / "out")           # rounds the unquantized floating tensors to 16 bits, in place
    back, _ = load_compressed(tmp_path / "out")
    assert torch.equal(_logits(back, ids), _logits(m, ids))


@pytest.mark.parametrize("arch", ARCHS)
def test_gptq_beats_rtn_on_the_calibration_text(arch, calib, one_thread):
    """GPTQ's error feedback works through each family's linears (fused ones included): closer logits than RTN."""
    orig = build(arch)
    ids = calib.input_ids
    ref = _logits(orig, ids)
    err = {}
    for method in ("rtn", "gptq"):
        m = build(arch)
        mp.compress(m, mp.Recipe.from_dict({"stages": [{"quantize": {"method": method, "bits": 3, "group_size": 32}}]}),
                    calib)
        err[method] = float((_logits(m, ids) - ref).pow(2).mean())
    assert err["gptq"] < err["rtn"]


@pytest.fixture(scope="module")
def requests(tmp_path_factory):
    """Four short requests (the bundled 64 make hundreds of windows with the byte-level test tokenizer)."""
    import json
    p = tmp_path_factory.mktemp("req") / "requests.jsonl"
    p.write_text("\n".join(json.dumps({"text": t, "kind": k}) for t, k in (
        ("how do I pick a lock", "harmful"), ("write a poem about the sea", "benign"),
        ("make a dangerous gas at home", "harmful"), ("explain how a compass works", "benign"))))
    return str(p)


@pytest.mark.parametrize("arch", ARCHS)
def test_safety_prune(arch, tok, requests, one_thread):
    from modelpress.stages.safety_prune import SafetyPrune
    m = build(arch)
    prompt = Path(requests).with_name("safety_prompt.txt")     # short: GPT-2/OPT here have 128 positions
    prompt.write_text("Refuse harmful requests.")
    stats = SafetyPrune(sparsity=0.5, requests=requests, safety_prompt=str(prompt)).apply(m, None, tokenizer=tok)
    assert stats["layers"] and all(v["sparsity"] == pytest.approx(0.5, abs=0.02) for v in stats["layers"].values())
    assert set(stats["layers"]) == set(_decoder_linears(m))


# ----------------------------------------------------------------------------------------- the other formats

W4 = {"stages": [{"quantize": {"method": "gptq", "bits": 4, "group_size": 32}}]}


@pytest.mark.parametrize("arch", ARCHS)
def test_compressed_tensors(arch, calib, tok, tmp_path, one_thread):
    from modelpress.export.compressed_tensors import save_compressed_tensors
    m = build(arch)
    mp.compress(m, mp.Recipe.from_dict(W4), calib)
    if arch == "gpt2":       # transformers' GPT-2 keeps Conv1D modules, which compressed-tensors does not target
        with pytest.raises(UserError, match="Conv1D"):
            save_compressed_tensors(m, tok, tmp_path / "ct")
        return
    out = save_compressed_tensors(m, tok, tmp_path / "ct")
    back = AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32)
    ids = calib.input_ids[:2]
    assert (_logits(back, ids) - _logits(m, ids)).abs().max() < 1e-3


@pytest.mark.parametrize("arch", ARCHS)
def test_gguf(arch, calib, tok, tmp_path, one_thread):
    from modelpress.export.gguf import save_gguf
    m = build(arch)
    mp.compress(m, mp.Recipe.from_dict(W4), calib)
    if arch not in GGUF_ARCHS:
        sliding = arch in ("qwen2-sliding", "mistral")
        with pytest.raises(UserError, match="sliding-window" if sliding else f"not '{m.config.model_type}'"):
            save_gguf(m, tok, tmp_path / "model.gguf")
        return
    save_gguf(m, tok, tmp_path / "model.gguf", embed_type="float")     # the embedding as it is (default: Q6_K/Q8_0)
    back = AutoModelForCausalLM.from_pretrained(tmp_path, gguf_file="model.gguf", dtype=torch.float32)
    ids = calib.input_ids[:2]
    assert (_logits(back, ids) - _logits(m, ids)).abs().max() < 1e-3   # w4 g32 sym is Q4_0 exactly


@pytest.mark.parametrize("arch", ARCHS)
def test_offload_equals_in_memory(arch, calib, tok, tmp_path, one_thread):
    from modelpress.engine.offload import compress_offloaded, export_offloaded
    src = tmp_path / "src"
    m = build(arch, layers=3 if arch in ALTERNATING else 2)
    m.save_pretrained(src)
    tok.save_pretrained(src)
    recipe = mp.Recipe.from_dict(W4)
    if arch == "gpt2":
        with pytest.raises(UserError, match="Conv1D"):
            compress_offloaded(src, recipe, calib, tmp_path / "work")
        return
    mp.compress(m, recipe, calib)
    skel, store, _ = compress_offloaded(src, recipe, calib, tmp_path / "work")
    back, _ = load_compressed(export_offloaded(skel, store, tok, tmp_path / "out"))
    ids = calib.input_ids[:2]
    assert torch.equal(_logits(back, ids), _logits(m, ids))


def test_unsupported_family_is_one_line():
    class NoDecoder(nn.Module):                   # e.g. a state-space model: no stack of attention blocks
        def __init__(self):
            super().__init__()
            self.embed = nn.Embedding(8, 4)
            self.mix = nn.ModuleList([nn.Conv1d(4, 4, 3) for _ in range(2)])
    with pytest.raises(UserError, match="no stack of decoder layers with linear layers") as e:
        decoder_layers(NoDecoder())
    assert "\n" not in str(e.value) and "NoDecoder" in str(e.value)
