"""Per-head bit widths inside one QuantLinear (issue 20, "Capability-Guided Compression", arXiv 2603.16440):
quantize `budget: capability` gives the q rows of head h, the k/v rows of its KV group and (scale groups inside a
head) the o_proj columns of head h that head's whole-bit width, RTN and GPTQ; the achieved parameter-weighted
mean is the requested one within the rounding rule (plan.round_bit_specs); the native export reloads with
identical logits and its size report counts the mixed widths exactly; compressed-tensors and GGUF write the
module at its widest width, exactly."""
import json

import numpy as np
import pytest
import torch
from transformers import LlamaConfig, LlamaForCausalLM

import modelpress as mp
from modelpress.algos import gptq as G
from modelpress.algos import quant as Q
from modelpress.errors import UserError
from modelpress.eval.size import size_report
from modelpress.export.native import load_compressed, save, write_checksums
from modelpress.modules import QuantLinear
from modelpress.modules.quant import element_bits, mixed_bytes, pack_mixed, unpack_mixed
from modelpress.plan import budget as B
from modelpress.stages.quantize import Quantize
from modelpress.targets import Target

from .conftest import correlated_calib, tiny_llama, tiny_tokenizer

HEADS, KV, DH = 4, 2, 16            # tiny_llama: hidden 64, 4 heads of 16, 2 KV groups


def _achieved(model) -> tuple[float, float]:
    """(parameter-weighted mean code width over the QuantLinears, largest block's share of their weights)."""
    mods = [m for m in model.modules() if isinstance(m, QuantLinear)]
    tot = sum(m.weight.numel() for m in mods)
    blocks = [m.weight.numel() / (1 if m.bits_map is None else m.bits_map.numel()) for m in mods]
    return sum(m.mean_bits * m.weight.numel() for m in mods) / tot, max(blocks) / tot


def test_pack_mixed_round_trip_and_exact_bytes():
    g = torch.Generator().manual_seed(0)
    widths = torch.randint(2, 9, (1001,), generator=g).to(torch.uint8)
    codes = (torch.rand(1001, generator=g) * (2.0 ** widths.float())).floor().to(torch.uint8)
    p = pack_mixed(codes, widths)
    assert torch.equal(unpack_mixed(p, widths), codes)
    want = sum(-(-int((widths == b).sum()) * b // 8) for b in range(2, 9))
    assert p.numel() == mixed_bytes(widths) == want
    bm = torch.tensor([[3, 5], [4, 4]], dtype=torch.uint8)
    assert element_bits(bm, 4, 6).tolist() == [[3, 3, 3, 5, 5, 5]] * 2 + [[4] * 6] * 2


@pytest.mark.parametrize("method", ["rtn", "gptq"])
def test_head_widths_reach_q_rows_kv_groups_and_o_columns(method):
    calib = correlated_calib(n=8)
    ref = tiny_llama(layers=2)
    W0 = {n: m.weight.detach().clone() for n, m in Target().select(ref).items()}
    specs, plan = B.bit_specs(ref, calib, "capability", 3.5, Target(), 1.0, DH)
    frac = plan.module_specs()
    assert abs(plan.achieved_mean() - 3.5) < 1e-6                   # fractional plan: exact mean
    model = tiny_llama(layers=2)
    st = Quantize(method=method, bits=3.5, group_size=DH, budget="capability", budget_spread=1.0).apply(model, calib)
    lin = Target().select(model)
    differ = 0
    for layer in range(2):
        hb = [c.budget for c in plan.components if c.layer == layer and c.name != "mlp"]
        p = f"model.layers.{layer}.self_attn."
        q, k, o = lin[p + "q_proj"], lin[p + "k_proj"], lin[p + "o_proj"]
        wq = q.bits_map.reshape(-1).long() if q.bits_map is not None else torch.full((HEADS,), q.bits)
        assert wq.tolist() == specs[p + "q_proj"].reshape(-1).tolist()
        for a in range(HEADS):                     # widths follow the head budgets: a larger budget, never fewer bits
            for b in range(HEADS):
                if hb[a] < hb[b]:
                    assert wq[a] <= wq[b]
            assert abs(int(wq[a]) - hb[a]) < 1.0 + 1e-9                 # whole bits next to the budget
        differ += len(set(wq.tolist())) > 1
        # GQA: a KV group's width rounds the parameter-weighted budget of its heads
        assert frac[p + "k_proj"].reshape(-1).tolist() == pytest.approx([(hb[0] + hb[1]) / 2, (hb[2] + hb[3]) / 2])
        wk = k.bits_map.reshape(-1).tolist() if k.bits_map is not None else [k.bits] * KV
        assert wk == specs[p + "k_proj"].reshape(-1).tolist()
        wo = o.bits_map.reshape(-1).tolist() if o.bits_map is not None else [o.bits] * HEADS
        assert wo == specs[p + "o_proj"].reshape(-1).tolist() == wq.tolist()   # head h's o_proj input columns
        # the codes sit on each head's own grid (symmetric: zero 2^(w-1), |q - z| within the w-bit range)
        for h in range(HEADS):
            rows, w = slice(h * DH, (h + 1) * DH), int(wq[h])
            c = q.q[rows].long() - q.zero[rows].long().repeat_interleave(DH, 1)[:, :64]
            assert bool((q.zero[rows] == 1 << (w - 1)).all()) and int(c.min()) >= -(1 << (w - 1))
            assert int(c.max()) <= (1 << (w - 1)) - 1 and len(c.unique()) <= 1 << w
            oc = o.q[:, h * DH:(h + 1) * DH].long() - (1 << (w - 1))
            assert int(oc.min()) >= -(1 << (w - 1)) and int(oc.max()) <= (1 << (w - 1)) - 1
            if method == "rtn":                    # exactly RTN of head h's rows / columns at head h's width
                qq, s, z = Q.rtn(W0[p + "q_proj"][rows], w, DH, True)
                assert torch.equal(q.weight[rows], Q.dequantize_groups(qq, s, z, DH))
                qo, so, zo = Q.rtn(W0[p + "o_proj"][:, h * DH:(h + 1) * DH], w, DH, True)
                assert torch.equal(o.weight[:, h * DH:(h + 1) * DH], Q.dequantize_groups(qo, so, zo, DH))
        top = int(wq.argmax())
        c = q.q[top * DH:(top + 1) * DH].long() - (1 << (int(wq[top]) - 1))
        assert int(c.abs().max()) > 1 << (int(wq.min()) - 1)        # the widest head uses levels beyond the narrowest
    assert differ == 2                                              # widths differ inside every q_proj
    ach, share = _achieved(model)
    assert abs(ach - 3.5) <= share / 2 + 1e-9                       # the rounding rule (plan.round_bit_specs)
    assert "requested 3.5" in st["summary"] and f"mean {ach:.3f} bits" in st["summary"]
    qs = st["layers"]["model.layers.0.self_attn.q_proj"]
    assert qs["widths"] == [[int(v)] for v in specs["model.layers.0.self_attn.q_proj"].reshape(-1)]


def test_gptq_mixed_rows_equal_separate_calls_per_width():
    """GPTQ rows are independent given H: the stage's one call per width pattern gives each row the codes of
    GPTQ on that row's width alone; per-column-group widths (o_proj) keep each column on its own grid."""
    g = torch.Generator().manual_seed(0)
    W, X = torch.randn(32, 64, generator=g), torch.randn(256, 64, generator=g)
    H = 2 * X.T @ X / 256
    lin = torch.nn.Linear(64, 32, bias=False)
    lin.weight.data = W.clone()
    cfg = Quantize(method="gptq", bits=4, group_size=16, act_order=False)
    out = cfg.quantize_group([("x", lin)], H, bits_maps={"x": torch.tensor([[3], [5]])})["x"][0]
    for r, b in ((slice(0, 16), 3), (slice(16, 32), 5)):
        ref = G.gptq(W[r], H, b, 16, True, 0.01, 128, False)
        assert torch.equal(out.q[r], ref.q) and torch.equal(out.weight[r], ref.w_hat)
    gb = torch.tensor([2, 3, 4, 8])
    r = G.gptq(W, H, gb, 16, True)
    assert [int(r.q[:, i * 16:(i + 1) * 16].max()) < (1 << int(b)) for i, b in enumerate(gb)] == [True] * 4
    assert torch.equal(G.gptq(W, H, torch.full((4,), 4), 16, True).q, G.gptq(W, H, 4, 16, True).q)


def test_o_proj_takes_its_heads_mean_width_when_scale_groups_straddle_heads():
    calib = correlated_calib(n=8)
    model = tiny_llama(layers=2)
    Quantize(method="rtn", bits=4, group_size=32, budget="capability", budget_spread=1.0).apply(model, calib)
    lin = Target().select(model)
    assert lin["model.layers.0.self_attn.o_proj"].bits_map is None              # one width (group 32 > head 16)
    assert len(set(lin["model.layers.0.self_attn.q_proj"].bits_map.reshape(-1).tolist())) > 1
    ach, share = _achieved(model)
    assert abs(ach - 4.0) <= share / 2 + 1e-9


def test_fractional_mean_only_with_a_budget():
    with pytest.raises(UserError, match="quantize.bits 3.5 is a mean width, which needs a budget"):
        Quantize(bits=3.5)
    with pytest.raises(UserError, match="quantize.bits must be a number in"):
        Quantize(bits=8.5, budget="capability")
    assert Quantize(bits=3.5, budget="capability").describe().startswith("gptq w3.5")


def _expected_bytes(m: QuantLinear) -> int:
    """What the export must store for a mixed QuantLinear, counted from its widths alone."""
    rows, cols = m.out_features, m.in_features
    eb = element_bits(m.bits_map, rows, cols)
    if m.keep is not None:
        eb = eb[m.keep]
    ng = Q.n_groups(cols, m.group_size)
    n = sum(-(-int((eb == b).sum()) * b // 8) for b in range(1, 9)) + rows * ng * 2 + m.bits_map.numel()
    if not m.sym:
        gb = element_bits(m.bits_map, rows, cols)[:, ::m.group_size]
        n += sum(-(-int((gb == b).sum()) * b // 8) for b in range(1, 9))
    if m.keep is not None:
        n += -(-rows * cols // 8)
    return n


@pytest.mark.parametrize("case", ["sym-fp32", "asym-bf16", "pruned-sym"])
def test_native_round_trip_identical_logits_and_exact_size(case, tmp_path, ids):
    dtype = torch.bfloat16 if "bf16" in case else torch.float32     # bf16: codes held packed in memory
    m = tiny_llama(layers=2, dtype=dtype)
    stages = [{"quantize": {"method": "rtn", "bits": 4, "group_size": DH, "sym": "asym" not in case,
                            "budget": "capability", "budget_spread": 1.0}}]
    if "pruned" in case:
        stages.insert(0, {"prune": {"method": "wanda", "sparsity": 0.5}})
    mp.compress(m, mp.Recipe.from_dict({"stages": stages}), correlated_calib(n=8))
    rep = size_report(m)
    save(m, None, tmp_path / "e")
    back, _ = load_compressed(tmp_path / "e")
    if dtype == torch.float32:         # (a bf16 model's reload rebuilds its rotary buffers in bf16: logits differ
        with torch.no_grad():          # for any export, uniform too; its weights and codes are compared below)
            assert torch.equal(back(ids).logits, m(ids).logits)
    mixed = 0
    for name, mod in Target().select(m).items():
        got = back.get_submodule(name)
        assert torch.equal(got.q, mod.q) and torch.equal(got.weight, mod.weight)
        if mod.bits_map is None:
            continue
        mixed += 1
        assert torch.equal(got.bits_map, mod.bits_map) and got.bits == mod.bits == int(mod.bits_map.max())
        nbytes = _expected_bytes(mod)
        assert rep["layers"][name]["bytes"] == nbytes                              # exactly what is stored
        assert rep["layers"][name]["bits"] == 8 * nbytes / mod.weight.numel()
        code_bits = float(element_bits(mod.bits_map, mod.out_features, mod.in_features).float().mean())
        assert code_bits == mod.mean_bits == rep["layers"][name]["code_bits"] < mod.bits   # narrower than the widest
    assert mixed >= 6
    man = json.loads((tmp_path / "e" / "modelpress.json").read_text())
    assert man["modules"]["model.layers.0.self_attn.q_proj"]["config"]["bits"] == m.model.layers[0].self_attn.q_proj.bits


def test_compressed_tensors_writes_the_widest_width_exactly(tmp_path, ids):
    from transformers import AutoModelForCausalLM

    from modelpress.export.compressed_tensors import preflight, save_compressed_tensors
    m = tiny_llama(layers=2)
    cfg = Quantize(method="rtn", bits=4, group_size=DH, budget="capability", budget_spread=1.0)
    assert any("widest width" in n for n in preflight(m, [("quantize", cfg)]))
    cfg.apply(m, correlated_calib(n=8))
    out = save_compressed_tensors(m, None, tmp_path / "ct")
    qc = json.loads((out / "config.json").read_text())["quantization_config"]
    width = {t: g["weights"]["num_bits"] for g in qc["config_groups"].values() for t in g["targets"]}
    q = m.model.layers[0].self_attn.q_proj
    assert q.bits_map is not None and width["model.layers.0.self_attn.q_proj"] == q.bits
    from compressed_tensors.compressors.pack_quantized.helpers import unpack_from_int32
    from safetensors.torch import load_file
    t = load_file(str(out / "model.safetensors"))
    for name, mod in Target().select(m).items():          # the stored codes x scales are our weights, bit for bit
        c = unpack_from_int32(t[name + ".weight_packed"], width[name], torch.Size(mod.weight.shape)).float()
        s = t[name + ".weight_scale"].float().repeat_interleave(DH, 1)                        # (rows, cols)
        assert torch.equal(c * s, mod.weight.float()), name
    back = AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32)
    with torch.no_grad():
        assert (back(ids).logits - m(ids).logits).abs().max() < 1e-4


def _mixed_module(lin: torch.nn.Linear, widths: list[int], gs: int) -> QuantLinear:
    """A symmetric QuantLinear whose row blocks have `widths` (RTN per block)."""
    rows = lin.out_features // len(widths)
    parts = [Q.rtn(lin.weight.detach()[i * rows:(i + 1) * rows], w, gs, True) for i, w in enumerate(widths)]
    q, s, z = (torch.cat([p[j] for p in parts]) for j in range(3))
    return QuantLinear.build(lin, q, s, z, max(widths), gs, True, bits_map=torch.tensor(widths)[:, None])


def test_gguf_writes_the_widest_width_exact_or_refuses(tmp_path):
    from gguf import GGUFReader, dequantize

    from modelpress.export.gguf import permute_qk, save_gguf
    from modelpress.model import set_module
    tok = tiny_tokenizer()

    def llama():
        torch.manual_seed(0)
        return LlamaForCausalLM(LlamaConfig(vocab_size=len(tok), hidden_size=64, intermediate_size=128,
                                            num_hidden_layers=2, num_attention_heads=HEADS,
                                            num_key_value_heads=KV)).eval()
    m = llama()
    p = "model.layers.0.self_attn.q_proj"
    set_module(m, p, _mixed_module(m.get_submodule(p), [3, 4, 2, 4], 32))
    rep = save_gguf(m, tok, tmp_path / "a.gguf", embed_type="float")
    assert rep["tensors"][p + ".weight"]["type"] == "Q4_0" and rep["tensors"][p + ".weight"]["exact"]
    assert "widest of mixed" in rep["tensors"][p + ".weight"]["scheme"]
    t = {x.name: x for x in GGUFReader(tmp_path / "a.gguf").tensors}["blk.0.attn_q.weight"]
    ours = permute_qk(m.get_submodule(p).weight.detach(), 4, 4).numpy()
    assert np.array_equal(dequantize(t.data, t.tensor_type).reshape(ours.shape), ours)
    # widest 3 bits: no exact GGUF type -> refused in one line without requantize
    set_module(m, p, _mixed_module(llama().get_submodule(p), [3, 2, 2, 3], 32))
    with pytest.raises(UserError, match=r"q_proj: 3-bit group 32 sym has no exact GGUF type"):
        save_gguf(m, tok, tmp_path / "b.gguf", requantize=None)
    assert not (tmp_path / "b.gguf").exists()


@pytest.mark.parametrize("edit, msg", [
    (lambda t, k: t.update({k + ".qweight": t[k + ".qweight"][:-1].clone()}), "tensor qweight has shape"),
    (lambda t, k: t.update({k + ".bits_map": t[k + ".bits_map"][:3].clone()}), "does not tile"),
    (lambda t, k: t.update({k + ".bits_map": t[k + ".bits_map"] * 0 + 9}), "bit widths must be 1..8"),
])
def test_inconsistent_mixed_width_state_is_refused_in_one_line(tmp_path, edit, msg):
    from safetensors.torch import load_file, save_file

    from modelpress.io import sha256_tensor
    from modelpress.model import set_module
    m = tiny_llama(layers=2)
    p = "model.layers.0.self_attn.q_proj"
    set_module(m, p, _mixed_module(m.get_submodule(p), [3, 4, 2, 4], DH))
    save(m, None, tmp_path / "e")
    f = tmp_path / "e" / "model.safetensors"
    t = load_file(f)
    edit(t, p)
    save_file(t, f, metadata={"format": "modelpress/1"})
    man = json.loads((tmp_path / "e" / "modelpress.json").read_text())
    man["tensor_sha256"].update({k: sha256_tensor(v) for k, v in t.items() if k.startswith(p)})
    (tmp_path / "e" / "modelpress.json").write_text(json.dumps(man))
    write_checksums(tmp_path / "e")                # a consistent edit: only the module check can catch it
    with pytest.raises(UserError, match=msg) as e:
        load_compressed(tmp_path / "e")
    assert "\n" not in str(e.value) and p in str(e.value)
