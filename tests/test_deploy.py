"""Deployment estimator: hand-computed roofline cases, profile validation, tensor-byte accounting, CLI,
and the calibration probes on a tiny model."""
from __future__ import annotations

import argparse
import json
import math

import pytest
import torch
from safetensors.torch import save_file

from modelpress.cli import deploy as cli
from modelpress.deploy.estimate import (DecoderShape, WeightBytes, builtin_profiles, decode_flops, decoder_shape,
                                        estimate, estimate_dir, kv_cache_bytes, load_profile, prefill_flops,
                                        profile_from_dict, roofline_seconds, tensor_bytes, weight_bytes,
                                        weight_bytes_from_dir, weight_bytes_from_params)
from modelpress.errors import UserError

# layers=2, hidden=4, heads=2, kv_heads=1, head_dim=2, intermediate=8, vocab=10
SHAPE = DecoderShape(layers=2, hidden=4, heads=2, kv_heads=1, head_dim=2, intermediate=8, vocab=10)
# 1 GB/s, 1 GFLOP/s fp16, 10 W, sustained clocks at half the peak
PROFILE = dict(name="toy", memory_gib=1.0, bandwidth_gbs=1.0, peak_fp16_tflops=1e-3, peak_int8_tops=2e-3,
               tdp_w=10.0, sustained_clock_ratio=0.5)


def toy(**kw):
    return profile_from_dict({**PROFILE, **kw}, "toy.yaml")


def test_shape_params_flops_and_kv_by_hand():
    # q 4*4 + k,v 2*4*2 + o 4*4 + gated MLP 3*4*8 = 144 per layer; LM head 10*4 = 40
    assert SHAPE.layer_linear_params == 144
    assert SHAPE.linear_params == 2 * 144 + 40 == 328
    # decode at context 5: 2*328 + 4*L*heads*head_dim*5 = 656 + 160
    assert decode_flops(SHAPE, 5) == 816
    # prefill 5 tokens: 2*5*2*144 + 2*40 + 32 * (5*6/2) = 2880 + 80 + 480
    assert prefill_flops(SHAPE, 5) == 3440
    # 2 new tokens after 3 cached: 2*2*288 + 80 + 32 * (2*3 + 3) = 1152 + 80 + 288
    assert prefill_flops(SHAPE, 2, past=3) == 1520
    # K and V: 2 * layers 2 * kv_heads 1 * head_dim 2 * 5 tokens * 2 bytes
    assert kv_cache_bytes(2, 1, 2, 5, bits=16) == 80
    assert kv_cache_bytes(2, 1, 2, 5, bits=4) == 20
    assert roofline_seconds(100, 50, 10, 10) == (10.0, "compute")
    assert roofline_seconds(100, 500, 10, 10) == (50.0, "memory")


def test_estimate_by_hand_including_derating_energy_and_deadline():
    w = WeightBytes(resident=1000, per_token=920)
    e = estimate(toy(), SHAPE, w, 5, control_hz=1e5, action_tokens=2)
    # decode: bytes 920 + KV 80 = 1000 B at 1e9 B/s = 1 us; FLOPs 816 at 1e9 = 0.816 us -> memory bound
    assert e.decode_bytes == 1000 and e.decode_bound == "memory"
    assert e.decode_s == pytest.approx(1e-6, rel=1e-12)
    # derated: 0.5e9 FLOP/s -> 1.632 us, now compute bound
    assert e.decode_s_sustained == pytest.approx(1.632e-6, rel=1e-12)
    assert e.tokens_per_s == pytest.approx(1 / 1.632e-6, rel=1e-12)
    assert e.energy_j_per_token == pytest.approx(10 * 1.632e-6, rel=1e-12)
    # prefill (TTFT) of the 5-token context: 3440 FLOPs at 1e9 -> 3.44 us (compute), derated 6.88 us
    assert e.prefill_s == pytest.approx(3.44e-6, rel=1e-12) and e.prefill_bound == "compute"
    assert e.prefill_s_sustained == pytest.approx(6.88e-6, rel=1e-12)
    # control step: 2 decoded tokens at sustained clocks = 3.264 us <= 10 us
    assert e.control_step_s == pytest.approx(3.264e-6, rel=1e-12) and e.deadline_met is True
    assert estimate(toy(), SHAPE, w, 5, control_hz=4e5, action_tokens=2).deadline_met is False
    # with 2 observation tokens prefilled after 3 cached: + 1520 / 0.5e9 = 3.04 us
    e2 = estimate(toy(), SHAPE, w, 5, control_hz=1e5, action_tokens=2, obs_tokens=2)
    assert e2.control_step_s == pytest.approx(3.264e-6 + 3.04e-6, rel=1e-12)
    # fits: 1000 + 80 = 1080 B against 1 GiB; against 1e-6 GiB (1073.7 B) it does not fit
    assert e.total_bytes == 1080 and e.fits
    assert not estimate(toy(memory_gib=1e-6), SHAPE, w, 5).fits
    # efficiency halves the bandwidth (2 us, still memory bound vs 0.816 us); overhead adds layers * tau
    assert estimate(toy(), SHAPE, w, 5, bandwidth_efficiency=0.5).decode_s == pytest.approx(2e-6, rel=1e-12)
    assert estimate(toy(), SHAPE, w, 5, overhead_us_per_layer=1.0).decode_s == pytest.approx(3e-6, rel=1e-12)
    # int8 compute doubles the peak: derated decode back to max(1 us, 0.816 us) = 1 us
    assert estimate(toy(), SHAPE, w, 5, compute="int8").decode_s_sustained == pytest.approx(1e-6, rel=1e-12)
    # bandwidth derating applies to the memory term
    assert estimate(toy(sustained_bandwidth_ratio=0.25), SHAPE, w, 5).decode_s_sustained == pytest.approx(4e-6)


def test_estimate_rejects_bad_arguments():
    w = WeightBytes(1000, 920)
    with pytest.raises(UserError, match="--context"):
        estimate(toy(), SHAPE, w, 0)
    with pytest.raises(UserError, match="--control-hz"):
        estimate(toy(), SHAPE, w, 5, control_hz=0)
    with pytest.raises(UserError, match="peak_fp32_tflops"):
        estimate(toy(), SHAPE, w, 5, compute="fp32")
    with pytest.raises(UserError, match="efficiency"):
        estimate(toy(), SHAPE, w, 5, bandwidth_efficiency=1.5)


def test_weight_bytes_tied_untied_and_from_params():
    t = {"model.embed_tokens.weight": 80, "model.layers.0.q.weight": 32, "model.norm.weight": 8}
    assert weight_bytes(t, tied=True) == WeightBytes(120, 120)   # tied head reads the whole table
    assert weight_bytes(t, tied=False) == WeightBytes(120, 40)   # gathered rows only (neglected)
    t2 = {**t, "lm_head.weight": 80}
    assert weight_bytes(t2, tied=True) == WeightBytes(200, 120)  # a stored head wins over the tie flag
    # params x bits: decoder 2*144 weights at 4 bits = 144 B; table 40 at 16 bits = 80 B
    assert weight_bytes_from_params(SHAPE, 4) == WeightBytes(224, 224)
    untied = DecoderShape(**{**SHAPE.__dict__, "tied_embeddings": False})
    assert weight_bytes_from_params(untied, 4) == WeightBytes(144 + 20 + 80, 164)


def _folder(tmp_path, tied=True, config=None):
    cfg = config or {"model_type": "llama", "num_hidden_layers": 2, "hidden_size": 4, "num_attention_heads": 2,
                     "num_key_value_heads": 1, "head_dim": 2, "intermediate_size": 8, "vocab_size": 10,
                     "tie_word_embeddings": tied}
    tmp_path.mkdir(parents=True, exist_ok=True)
    (tmp_path / "config.json").write_text(json.dumps(cfg))
    tensors = {"model.embed_tokens.weight": torch.zeros(10, 4),                    # F32: 160 B stored, 80 at 16 bit
               "model.layers.0.self_attn.q_proj.qweight": torch.zeros(8, dtype=torch.uint8),  # packed: 8 B
               "model.layers.0.self_attn.q_proj.scales": torch.zeros(4, dtype=torch.float16)}  # 8 B
    if not tied:
        tensors["lm_head.weight"] = torch.zeros(10, 4, dtype=torch.bfloat16)       # 80 B
    save_file(tensors, tmp_path / "model.safetensors")
    return tmp_path


def test_tensor_bytes_from_safetensors_headers(tmp_path):
    d = _folder(tmp_path)
    assert tensor_bytes(d, float_bits=None) == {"model.embed_tokens.weight": 160,
                                                "model.layers.0.self_attn.q_proj.qweight": 8,
                                                "model.layers.0.self_attn.q_proj.scales": 8}
    assert sum(tensor_bytes(d, float_bits=16).values()) == 80 + 8 + 8
    assert weight_bytes_from_dir(d) == WeightBytes(96, 96)


def test_untied_folder_and_gpt2_config(tmp_path):
    d = _folder(tmp_path, tied=False)
    assert weight_bytes_from_dir(d) == WeightBytes(176, 96)
    s = decoder_shape({"model_type": "gpt2", "n_layer": 3, "n_embd": 8, "n_head": 2, "vocab_size": 50})
    assert (s.layers, s.hidden, s.heads, s.kv_heads, s.head_dim, s.intermediate, s.gated_mlp) == (3, 8, 2, 2, 4, 32, False)
    # GPT-2 layer: q,k,v,o 4*64 + MLP 2*8*32
    assert s.layer_linear_params == 4 * 64 + 2 * 8 * 32
    with pytest.raises(UserError, match="config.json: missing field 'vocab_size'"):
        decoder_shape({"num_hidden_layers": 1, "hidden_size": 4, "num_attention_heads": 1})


def test_builtin_profiles_load_and_are_consistent():
    names = builtin_profiles()
    for need in ("jetson-orin-nano", "jetson-agx-orin", "raspberry-pi-5", "rtx-4090", "l40s", "a100", "h100",
                 "h200", "apple-m2-max"):
        assert need in names
    for n in names:
        p = load_profile(n)
        assert p.name == n
        assert 0 < p.sustained_clock_ratio <= 1 and p.bandwidth > 0 and p.tdp_w > 0
        assert p.peak_int8_tops >= p.peak_fp16_tflops  # no device runs int8 slower than fp16
    h100 = load_profile("h100")
    assert h100.bandwidth == 3.35e12 and h100.peak("fp16") == pytest.approx(989.4e12)


@pytest.mark.parametrize("text,match", [
    ("name: x\nmemory_gib: 8\n", "x.yaml: missing field 'bandwidth_gbs'"),
    ("{name: x, memory_gib: 8, bandwidth_gbs: 1, peak_fp16_tflops: 1, peak_int8_tops: 1, tdp_w: 5, "
     "sustained_clock_ratio: 1.5}", "x.yaml: field 'sustained_clock_ratio' must be a number in \\(0, 1\\]"),
    ("{name: x, memory_gib: -8, bandwidth_gbs: 1, peak_fp16_tflops: 1, peak_int8_tops: 1, tdp_w: 5, "
     "sustained_clock_ratio: 1}", "x.yaml: field 'memory_gib' must be a number > 0"),
    ("{name: x, memory_gb: 8}", "x.yaml: unknown field 'memory_gb'"),
    ("name: [unclosed\n", "x.yaml: not valid YAML"),
    ("- a\n- b\n", "x.yaml: a device profile must be a YAML mapping"),
])
def test_bad_user_profile_names_file_and_field(tmp_path, text, match):
    p = tmp_path / "x.yaml"
    p.write_text(text)
    with pytest.raises(UserError, match=match):
        load_profile(p)


def test_user_profile_and_unknown_name(tmp_path):
    p = tmp_path / "mine.yaml"
    p.write_text("# my board\nname: mine\nmemory_gib: 2\nbandwidth_gbs: 10\npeak_fp16_tflops: 1\npeak_int8_tops: 2\n"
                 "tdp_w: 5\nsustained_clock_ratio: 0.8\noverhead_us_per_layer: 3\n")
    prof = load_profile(p)
    assert prof.name == "mine" and prof.overhead_us_per_layer == 3.0 and prof.source == str(p)
    with pytest.raises(UserError, match="unknown device 'nope'"):
        load_profile("nope")


def _parse(argv):
    ap = argparse.ArgumentParser()
    sub = ap.add_subparsers(dest="cmd")
    assert cli.add_parser(sub) == ("deploy",)
    return ap.parse_args(argv)


def test_cli_json_matches_the_estimate(tmp_path):
    d = _folder(tmp_path / "m")
    prof = tmp_path / "toy.yaml"
    prof.write_text("\n".join(f"{k}: {v}" for k, v in PROFILE.items()))
    out = tmp_path / "est.json"
    assert cli.run(_parse(["deploy", str(d), "--device", str(prof), "--context", "5", "--control-hz", "1e5",
                           "--action-tokens", "2", "--json", str(out)])) == 0
    (row,) = json.loads(out.read_text())
    # weights 96 B (per token 96) + KV 80 B: decode 176 B -> 0.176 us memory vs 0.816 us compute
    assert row["weight_bytes"] == 96 and row["kv_bytes"] == 80 and row["decode_bound"] == "compute"
    assert row["decode_s"] == pytest.approx(0.816e-6) and row["decode_s_sustained"] == pytest.approx(1.632e-6)
    assert row["deadline_met"] is True
    ests = estimate_dir(d, [str(prof)], 5, bits=4)
    assert ests[0].weight_bytes == 224
    with pytest.raises(UserError, match="not a folder"):
        cli.run(_parse(["deploy", str(tmp_path / "missing")]))


def _tiny_llama():
    from transformers import LlamaConfig, LlamaForCausalLM
    cfg = LlamaConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                      num_key_value_heads=2, head_dim=8, vocab_size=128, tie_word_embeddings=True)
    torch.manual_seed(0)
    return LlamaForCausalLM(cfg).eval()


def test_runtime_bytes_and_quantized_bytes():
    from modelpress.deploy.measure import linear_shapes, module_tensor_bytes, runtime_weight_bytes
    m = _tiny_llama()
    n_params = sum(p.numel() for p in m.parameters())  # tied table counted once by parameters()
    n_buffers = sum(b.numel() for b in m.buffers())    # rotary frequencies
    wb = runtime_weight_bytes(m)
    assert wb.resident == 4 * (n_params + n_buffers) and wb.per_token == wb.resident
    shape = decoder_shape(m.config.to_dict())
    assert sum(o * i for o, i in linear_shapes(shape)) == shape.linear_params
    q = torch.ao.quantization.quantize_dynamic(torch.nn.Sequential(torch.nn.Linear(16, 8, bias=False)),
                                               {torch.nn.Linear}, dtype=torch.qint8)
    assert sum(module_tensor_bytes(q).values()) == 16 * 8  # int8 codes, one byte per weight


def test_calibrate_tiny_model_reports_positive_times():
    from modelpress.deploy.measure import calibrate, shrunk_config
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        m = _tiny_llama()
        tw = shrunk_config(m.config)
        assert (tw.num_hidden_layers, tw.num_attention_heads, tw.head_dim, tw.hidden_size) == (2, 4, 8, 64)
        ids = torch.randint(0, 128, (1, 16))
        res = calibrate(m, ids, new_tokens=4, vendor=load_profile("raspberry-pi-5"))
    finally:
        torch.set_num_threads(n)            # no leak into later tests
    assert res["measured"]["decode_s"] > 0 and res["measured"]["prefill_s"] > 0
    assert len(res["estimates"]) == 4
    for r in res["estimates"].values():
        assert r["decode_s"] > 0 and math.isfinite(r["decode_ratio"])
    assert res["probes"]["copy_gbs"] > 0.1


def test_runtime_bytes_skip_storage_only_buffers_of_compressed_modules():
    from modelpress.deploy.measure import module_tensor_bytes

    class Packed(torch.nn.Linear):  # like modelpress QuantLinear: dense weight for forward + stored codes
        def to_state(self):
            return {}, {}

    m = Packed(4, 2, bias=False)
    m.register_buffer("q", torch.zeros(8, dtype=torch.uint8), persistent=False)
    net = torch.nn.Sequential(m)
    net.register_buffer("other", torch.zeros(3))
    assert module_tensor_bytes(net) == {"0.weight": 32, "other": 12}
