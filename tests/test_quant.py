import pytest
import torch

from modelpress.algos import gptq as G
from modelpress.algos import quant as Q


@pytest.mark.parametrize("bits", range(2, 9))
def test_pack_unpack_roundtrip(bits):
    q = torch.randint(0, 1 << bits, (1001,), dtype=torch.uint8)
    p = Q.pack(q, bits)
    assert p.numel() == -(-1001 * bits // 8)
    assert torch.equal(Q.unpack(p, bits, 1001), q)


@pytest.mark.parametrize("bits,gs,sym,min_db", [(8, None, False, 40.0), (8, 128, True, 40.0), (4, 128, False, 19.0),
                                                (4, 32, True, 19.0), (3, 64, False, 13.0), (2, 32, False, 7.0)])
def test_rtn_sqnr(bits, gs, sym, min_db):
    w = torch.randn(256, 512, generator=torch.Generator().manual_seed(0))
    q, s, z = Q.rtn(w, bits, gs, sym)
    assert q.max() <= (1 << bits) - 1
    w_hat = Q.dequantize_groups(q, s, z, gs)
    assert Q.sqnr(w, w_hat) > min_db
    assert torch.equal(s, s.half().float())          # fp16-exact scales: reload is exact


def test_partial_last_group():
    w = torch.randn(8, 96)
    q, s, z = Q.rtn(w, 4, 64, False)
    assert s.shape == (8, 2)
    assert Q.sqnr(w, Q.dequantize_groups(q, s, z, 64)) > 17


def test_pruned_weights_dequantize_to_zero():
    w = torch.randn(16, 64)
    keep = torch.rand(16, 64) > 0.5
    q, s, z = Q.rtn(w, 3, 32, False, keep)
    w_hat = Q.dequantize_groups(q, s, z, 32, keep)
    assert torch.equal(w_hat == 0, ~keep | (w_hat == 0))
    assert bool((w_hat[~keep] == 0).all())


def _correlated(n=2048, d=128, seed=0):
    g = torch.Generator().manual_seed(seed)
    base = torch.randn(n, 16, generator=g)
    X = base @ torch.randn(16, d, generator=g) + 0.1 * torch.randn(n, d, generator=g)
    return X


@pytest.mark.parametrize("gs,act_order", [(None, False), (32, False), (32, True), (64, True)])
def test_gptq_beats_rtn_on_correlated_inputs(gs, act_order):
    X = _correlated()
    W = torch.randn(64, 128, generator=torch.Generator().manual_seed(1))
    H = 2 * X.t() @ X / X.shape[0]
    r = G.gptq(W, H, 4, gs, sym=False, act_order=act_order)
    w_gptq = Q.dequantize_groups(r.q, r.scale, r.zero, gs)
    q, s, z = Q.rtn(W, 4, gs, False)
    w_rtn = Q.dequantize_groups(q, s, z, gs)
    err_gptq = (X @ (W - w_gptq).t()).pow(2).sum()
    err_rtn = (X @ (W - w_rtn).t()).pow(2).sum()
    assert err_gptq < 0.6 * err_rtn


def test_gptq_keep_mask_stays_zero():
    X = _correlated()
    W = torch.randn(32, 128)
    keep = torch.rand(32, 128) > 0.5
    r = G.gptq(W, 2 * X.t() @ X / X.shape[0], 4, 32, keep=keep)
    w_hat = Q.dequantize_groups(r.q, r.scale, r.zero, 32, keep)
    assert bool((w_hat[~keep] == 0).all())


def test_not_positive_definite_raises():
    with pytest.raises(G.HessianNotPD):
        G.gptq(torch.randn(4, 8), -torch.eye(8), 4)


def test_stage_falls_back_to_rtn_with_message(caplog):
    from modelpress.stages.quantize import Quantize
    lin = torch.nn.Linear(8, 4)
    new, info = Quantize(group_size=None).quantize_one("x", lin, -torch.eye(8))
    assert info["fallback"] == "rtn"
    assert "fell back to RTN" in caplog.text
    assert info["sqnr"] > 15


@pytest.mark.parametrize("bits,gs,sym", [(2, 32, False), (3, 64, False), (4, 64, True), (4, None, False), (8, 48, True)])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_quantlinear_codes_exact_from_weight_or_packed(bits, gs, sym, dtype):
    """fp32 QuantLinears derive their codes from the weight; bf16 ones keep them packed: both give back
    exactly the codes they were built from (survivors), and the fp32 export refuses a modified weight."""
    from modelpress.modules import QuantLinear
    g = torch.Generator().manual_seed(bits)
    lin = torch.nn.Linear(96, 24, dtype=dtype)
    keep = torch.rand(24, 96, generator=g) > 0.3
    q, s, z = Q.rtn(lin.weight.float() * 3, bits, gs, sym, keep)
    m = QuantLinear.build(lin, q, s, z, bits, gs, sym, keep, in_place=True)
    assert m.weight.data_ptr() == lin.weight.data_ptr()              # written into the replaced weight
    assert torch.equal(m.q[keep], q[keep])
    assert (m.qpacked is None) == (dtype == torch.float32)
    state, cfg = m.to_state()
    assert torch.equal(QuantLinear.from_state(state, cfg).weight, m.weight)
    if dtype == torch.float32:
        with torch.no_grad():
            m.weight[0, 0] += 1e-3
        with pytest.raises(RuntimeError, match="changed after quantization"):
            m.to_state()
