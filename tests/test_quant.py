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


@pytest.mark.parametrize("gs,sym,observer,gain", [(32, True, "mse", 0.9), (48, False, "minmax", 0.9),
                                                  (None, True, "minmax", 0.97)])
def test_refit_scales_lowers_layer_error_same_codes(gs, sym, observer, gain):
    """Re-solving the scales for GPTQ's codes: same codes, fp16-exact scales, lower output error on every
    row (rows that would not improve keep their scales), w_hat consistent with the stored parameters."""
    X = _correlated(d=96)
    W = torch.randn(40, 96, generator=torch.Generator().manual_seed(2))
    W[:, 5] = 0                                                      # a dead input too
    X[:, 5] = 0
    H = 2 * X.t() @ X / X.shape[0]
    a = G.gptq(W, H, 3, gs, sym=sym, act_order=True, observer=observer)
    b = G.gptq(W, H, 3, gs, sym=sym, act_order=True, observer=observer, refit=True)
    assert torch.equal(a.q, b.q) and torch.equal(a.zero, b.zero)
    assert torch.equal(b.scale, b.scale.half().float())
    assert torch.equal(b.w_hat, Q.dequantize_groups(b.q, b.scale, b.zero, gs))
    err = lambda r: (X @ (W - r.w_hat).t()).pow(2).sum(0)            # (rows,)
    assert bool((err(b) <= err(a)).all())
    assert err(b).sum() < gain * err(a).sum()


def test_refit_scales_keeps_pruned_zero():
    X = _correlated()
    W = torch.randn(32, 128)
    keep = torch.rand(32, 128, generator=torch.Generator().manual_seed(3)) > 0.5
    H = 2 * X.t() @ X / X.shape[0]
    a, b = (G.gptq(W, H, 4, 32, keep=keep, refit=r) for r in (False, True))
    assert bool((b.w_hat[~keep] == 0).all())
    err = lambda r: (X @ (W * keep - r.w_hat).t()).pow(2).sum()
    assert err(b) < err(a)


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


def test_hessian_observer_minimises_weighted_error():
    """observer hessian: per group, the lowest input-weighted squared error sum_j h_j (w_j - w_hat_j)^2 of the
    clipping grid, so never above min/max's (shrink 1 is on the grid) nor mse's (same grid, other loss)."""
    g = torch.Generator().manual_seed(4)
    w = torch.randn(64, 160, generator=g)
    h = torch.rand(160, generator=g).pow(4) * 10                     # uneven input energies
    def werr(obs):
        s, z = Q.group_params(w, 3, 64, False, obs, h)
        w_hat = Q.dequantize_groups(Q.quantize(w, Q.expand(s, 64, 160), Q.expand(z, 64, 160), 3), s, z, 64)
        return ((w - w_hat).pow(2) * h).sum(1)                       # (rows,)
    e_h, e_mm, e_mse = werr("hessian"), werr("minmax"), werr("mse")
    assert bool((e_h <= e_mm * (1 + 1e-6)).all()) and bool((e_h <= e_mse * (1 + 1e-6)).all())
    assert e_h.sum() < 0.9 * e_mm.sum()
    with pytest.raises(ValueError, match="second moments"):
        Q.group_params(w, 3, 64, False, "hessian")


def test_hessian_observer_needs_gptq():
    from modelpress.errors import UserError
    from modelpress.stages.quantize import Quantize
    with pytest.raises(UserError, match="quantize.observer hessian .* method gptq"):
        Quantize(method="rtn", observer="hessian")
    Quantize(method="gptq", observer="hessian")


@pytest.mark.parametrize("bits", [4, 5, 8])
def test_signed_scales_put_the_extreme_on_code_zero(bits):
    """llama.cpp's Q4_0 convention: s = w_e / -2^(b-1) with w_e the block's largest-magnitude value (s < 0 when
    w_e > 0), so w_e sits on code 0 (its fp16-rounded self); only the opposite side's top level is missing (an
    error of at most one step there (and the fp16 rounding of s), half a step elsewhere); on Gaussian weights
    the grid is finer than the unsigned symmetric one (higher SQNR)."""
    g = torch.Generator().manual_seed(bits)
    w = torch.randn(64, 256, generator=g)
    q, s, z = Q.rtn(w, bits, 32, sym=True, signed=True)
    blocks = w.reshape(64, 8, 32)
    at = blocks.abs().argmax(-1, keepdim=True)                                      # each block's extreme
    ext = blocks.gather(-1, at)[..., 0]                                             # (rows, blocks) signed
    assert torch.equal(torch.sign(s), -torch.sign(ext)) and torch.equal(s, s.half().float())
    assert bool((z == 1 << (bits - 1)).all())
    w_hat = Q.dequantize_groups(q, s, z, 32)
    assert bool((q.reshape(64, 8, 32).gather(-1, at) == 0).all())
    assert torch.allclose(w_hat.reshape(64, 8, 32).gather(-1, at)[..., 0], ext, rtol=1e-3, atol=0)
    step = s.abs().repeat_interleave(32, 1)
    err = (w - w_hat).abs()
    assert bool((err <= 1.05 * step).all()) and bool((err <= step / 2 + 1e-6).float().mean() > 0.99)   # (fp16 s)
    plain = Q.dequantize_groups(*Q.rtn(w, bits, 32, sym=True), 32)
    assert Q.sqnr(w, w_hat) > Q.sqnr(w, plain) + 0.2
    with pytest.raises(ValueError, match="symmetric"):
        Q.rtn(w, bits, 32, sym=False, signed=True)


def test_signed_format_in_the_stage_and_gptq():
    """quantize.format q4_0: group 32, symmetric, signed scales, through GPTQ (the codes' error feedback works on
    the negative scales too: lower output error than RTN on the same grid)."""
    from modelpress.errors import UserError
    from modelpress.stages.quantize import Quantize
    c = Quantize(method="gptq", bits=4, format="q4_0", group_size=128, sym=False)
    assert (c.group_size, c.sym, c.signed) == (32, True, True) and not Quantize().signed
    with pytest.raises(UserError, match="format q4_0 stores 4-bit codes"):
        Quantize(bits=3, format="q4_0")
    X = _correlated()
    W = torch.randn(64, 128, generator=torch.Generator().manual_seed(1))
    H = 2 * X.t() @ X / X.shape[0]
    r = G.gptq(W, H, 4, 32, sym=True, act_order=True, observer="hessian", signed=True)
    assert bool((r.scale < 0).any()) and bool((r.scale > 0).any())
    assert torch.equal(r.w_hat, Q.dequantize_groups(r.q, r.scale, r.zero, 32))
    w_rtn = Q.dequantize_groups(*Q.rtn(W, 4, 32, sym=True, signed=True), 32)
    err = lambda wh: (X @ (W - wh).t()).pow(2).sum()
    assert err(r.w_hat) < 0.6 * err(w_rtn)
