import pytest
import torch

import modelpress as mp
from modelpress.algos import prune as P
from modelpress.algos import quant as Q
from modelpress.export.native import load_compressed, save
from modelpress.modules import QuantLinear

from .conftest import correlated_calib, tiny_llama


def _X(n=1024, d=128, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n, 8, generator=g) @ torch.randn(8, d, generator=g) + 0.05 * torch.randn(n, d, generator=g)


@pytest.mark.parametrize("sparsity", [0.25, 0.5, 0.75])
def test_magnitude_exact_sparsity(sparsity):
    w = torch.randn(64, 128)
    keep = P.magnitude_mask(w, sparsity)
    assert P.sparsity(w * keep) == sparsity


def test_wanda_exact_per_row_and_prefers_large_inputs():
    w = torch.ones(4, 8)
    norm = torch.arange(1.0, 9.0)
    keep = P.wanda_mask(w, norm, 0.5)
    assert (keep.sum(1) == 4).all()
    assert keep[:, 4:].all() and not keep[:, :4].any()


@pytest.mark.parametrize("pattern,n,m", [("2:4", 2, 4), ("4:8", 4, 8), ("1:4", 1, 4)])
def test_nm_patterns_valid(pattern, n, m):
    w = torch.randn(32, 64)
    for keep in (P.magnitude_mask(w, 1 - n / m, pattern), P.wanda_mask(w, torch.rand(64), 1 - n / m, pattern)):
        assert P.is_nm(w * keep, n, m)
        assert P.sparsity(w * keep) == 1 - n / m


def test_sparsegpt_exact_and_better_than_magnitude():
    X = _X()
    W = torch.randn(64, 128, generator=torch.Generator().manual_seed(3))
    H = 2 * X.t() @ X / X.shape[0]
    W_hat, keep, _ = P.sparsegpt(W, H, 0.5)
    assert P.sparsity(W_hat) == 0.5
    err_sgpt = (X @ (W - W_hat).t()).pow(2).sum()
    err_mag = (X @ (W - W * P.magnitude_mask(W, 0.5)).t()).pow(2).sum()
    assert err_sgpt < 0.5 * err_mag


def test_sparsegpt_24_with_joint_quant():
    X = _X()
    W = torch.randn(32, 128)
    W_hat, keep, (q, s, z) = P.sparsegpt(W, 2 * X.t() @ X / X.shape[0], 0.5, "2:4", bits=4, group_size=32)
    assert P.is_nm(W_hat, 2, 4)
    assert float((~keep).float().mean()) == 0.5      # exactly 2 of every 4 pruned
    assert P.sparsity(W_hat) >= 0.5                  # a survivor may also round to 0
    w_deq = Q.dequantize_groups(q, s, z, 32, keep)
    assert torch.equal(w_deq, W_hat)                 # survivors sit exactly on the 4-bit grid


def test_bad_pattern():
    with pytest.raises(ValueError, match="N:M"):
        P.parse_pattern("4:2")


def test_sparsegpt_on_a_fixed_grid_keeps_it_and_beats_masking():
    """Pruning an already-quantized weight: the OBS updates of the survivors land on the weight's own grid."""
    X = _X()
    H = 2 * X.t() @ X / X.shape[0]
    W = torch.randn(32, 128, generator=torch.Generator().manual_seed(5))
    q, s, z = Q.rtn(W, 4, 32)                                              # g32 grid: s, z (32, 4)
    Wq = Q.dequantize_groups(q, s, z, 32)                                  # the quantized weight
    W_hat, keep, (q2, s2, z2) = P.sparsegpt(Wq, H, 0.5, bits=4, group_size=32, grid=(s, z))
    assert torch.equal(s2, s) and torch.equal(z2, z)                       # the grid is not refitted
    assert torch.equal(Q.dequantize_groups(q2, s, z, 32, keep), W_hat)      # survivors on it
    assert float((~keep).float().mean()) == 0.5
    err_sgpt = (X @ (Wq - W_hat).t()).pow(2).sum()
    err_mask = (X @ (Wq - Wq * P.wanda_mask(Wq, X.norm(dim=0), 0.5)).t()).pow(2).sum()
    assert err_sgpt < 0.7 * err_mask, (err_sgpt, err_mask)
    with pytest.raises(ValueError, match="grid"):
        P.sparsegpt(Wq, H, 0.5, bits=4, group_size=64, grid=(s, z))


def test_sparsegpt_after_quantize_stays_on_the_grid_and_round_trips(tmp_path):
    """quantize -> prune sparsegpt: every linear keeps its QuantLinear scales, reaches 50 %, beats Wanda
    after quantize on the model's output, and the export reloads with identical logits."""
    calib = correlated_calib(n=8)
    ids = calib.input_ids[:2]
    ref = tiny_llama()
    with torch.no_grad():
        base = ref(ids).logits.log_softmax(-1)
    q = [{"quantize": {"method": "rtn", "bits": 4, "group_size": 32}}]
    kl = {}
    for method in ("sparsegpt", "wanda"):
        m = tiny_llama()
        mp.compress(m, mp.Recipe.from_dict({"stages": q}), None)
        scales = {n: mod.scale.clone() for n, mod in m.named_modules() if isinstance(mod, QuantLinear)}
        mp.compress(m, mp.Recipe.from_dict({"stages": [{"prune": {"method": method, "sparsity": 0.5}}]}), calib)
        for n, s in scales.items():
            mod = m.get_submodule(n)
            assert isinstance(mod, QuantLinear) and torch.equal(mod.scale, s)
            assert float((~mod.keep).float().mean()) == 0.5
        with torch.no_grad():
            out = m(ids).logits.log_softmax(-1)
        kl[method] = float((base.exp() * (base - out)).sum(-1).mean())
        if method == "sparsegpt":
            save(m, None, tmp_path / "e")
            back, _ = load_compressed(tmp_path / "e")
            with torch.no_grad():
                assert torch.equal(back(ids).logits, m(ids).logits)
    assert kl["sparsegpt"] < kl["wanda"], kl
