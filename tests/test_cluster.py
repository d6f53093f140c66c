"""Weight clustering (arXiv 2603.17917): k-means quality, codebook limits, rank probes, centroid fine-tuning,
ClusteredLinear exact reload."""
import math

import pytest
import torch
import torch.nn.functional as F

from modelpress import modules as M
from modelpress.algos import cluster as C
from modelpress.errors import UserError
from modelpress.export import load_compressed, save
from modelpress.modules.cluster import ClusteredLinear
from modelpress.stages.cluster import Cluster

from .conftest import correlated_calib, tiny_llama


pytestmark = pytest.mark.usefixtures("one_thread")


def _w(rows=128, cols=96, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(rows, cols, generator=g) * 0.05


@pytest.mark.parametrize("k,group_rows", [(8, None), (16, 16), (32, None), (64, 32), (256, None)])
def test_unique_values_per_codebook_at_most_k(k, group_rows):
    W = _w(128, 96)
    cb, idx = C.cluster_matrix(W, k, group_rows)
    W_hat = C.decode(cb, idx, group_rows)
    for g in range(cb.shape[0]):
        rows = slice(g * (group_rows or 128), (g + 1) * (group_rows or 128))
        assert torch.unique(W_hat[rows]).numel() <= k
    if group_rows is None:
        assert torch.unique(W_hat).numel() >= 0.95 * k      # a Gaussian matrix fills (almost) every cluster
    assert int(idx.max()) < k and idx.dtype == torch.uint8


def test_reconstruction_error_non_increasing_in_k():
    W = _w(128, 96, seed=3)
    col_w = torch.rand(96, generator=torch.Generator().manual_seed(4)) + 0.1
    for group_rows, cw in [(None, None), (32, None), (None, col_w)]:
        errs = [C.sse(W, C.decode(*C.cluster_matrix(W, k, group_rows, cw), group_rows), cw) for k in C.KS]
        assert all(a >= b for a, b in zip(errs, errs[1:])), errs
        assert errs[-1] < errs[0] / 100


def test_kmeans_matches_exact_lloyd_quality():
    """The histogram Lloyd is within 1% of scikit-learn's exact k-means inertia (4 restarts)."""
    from sklearn.cluster import KMeans
    from threadpoolctl import threadpool_limits
    x = _w(64, 64, seed=5).reshape(-1)
    with threadpool_limits(1):
        km = KMeans(16, n_init=4, random_state=0).fit(x[:, None].double().numpy())
    c, idx = C.kmeans_1d(x[None, :], 16)
    ours = float(((x - c[0, idx[0].long()]) ** 2).sum())
    assert ours <= km.inertia_ * 1.01


def test_centroids_are_member_means_and_assignment_is_near_nearest():
    x = _w(32, 64, seed=6).reshape(1, -1)
    om = torch.rand_like(x) + 0.5
    c, idx = C.kmeans_1d(x, 8, om)
    for j in range(8):
        sel = idx[0] == j
        mean = float((x[0, sel] * om[0, sel]).sum() / om[0, sel].sum())
        assert c[0, j].item() == pytest.approx(mean, rel=1e-5, abs=1e-7)
    # assignment: the nearest centroid up to one histogram bin
    width = float(x.max() - x.min()) / C.n_bins(x.numel())
    d_assigned = (x[0] - c[0, idx[0].long()]).abs()
    d_best = (x[0, :, None] - c[0][None, :]).abs().min(1).values
    assert float((d_assigned - d_best).max()) <= width + 1e-7
    assert torch.all(c[0, 1:] >= c[0, :-1])


def test_sensitivity_weighting_lowers_weighted_error():
    W = _w(128, 128, seed=7)
    W[:, :8] *= 4                                            # 8 wide, very sensitive input channels
    cw = torch.ones(128)
    cw[:8] = 100.0
    plain = C.sse(W, C.decode(*C.cluster_matrix(W, 8), None), cw)
    weighted = C.sse(W, C.decode(*C.cluster_matrix(W, 8, col_weight=cw), None), cw)
    assert weighted < 0.7 * plain


def test_kmeans_seed_is_deterministic():
    W = _w(64, 64, seed=8)
    a = C.cluster_matrix(W, 16, seed=3)
    b = C.cluster_matrix(W, 16, seed=3)
    assert torch.equal(a[0], b[0]) and torch.equal(a[1], b[1])


def test_centroid_grad_equals_autograd_of_gather():
    rows, cols, k, gr = 32, 24, 16, 8
    idx = torch.randint(0, k, (rows, cols), generator=torch.Generator().manual_seed(0)).to(torch.uint8)
    cb = torch.randn(rows // gr, k, requires_grad=True)
    x = torch.randn(5, cols)
    W = C.decode(cb, idx, gr)
    W.retain_grad()
    F.linear(x, W).pow(2).sum().backward()
    ours = C.centroid_grad(W.grad, idx, gr, k)
    assert torch.allclose(ours, cb.grad, atol=1e-5)


def test_rank_preserving_keeps_spearman_one_and_scramble_does_not():
    W = _w(64, 64, seed=9)
    cb, idx = C.cluster_matrix(W, 16)
    W_hat = C.decode(cb, idx, None)
    rp = C.decode(C.rank_preserving_randomise(cb, seed=1), idx, None)
    sc_cb = C.scramble_centroids(cb, seed=1)
    sc = C.decode(sc_cb, idx, None)
    assert C.spearman(W_hat, rp) == pytest.approx(1.0, abs=1e-12)
    assert not torch.equal(rp, W_hat)
    assert torch.equal(torch.sort(sc_cb, 1).values, torch.sort(cb, 1).values)    # same set of values
    assert C.spearman(W_hat, sc) < 0.9
    # per-group codebooks too
    cbg, idxg = C.cluster_matrix(W, 8, 16)
    rpg = C.rank_preserving_randomise(cbg, seed=2)
    for g in range(cbg.shape[0]):
        assert C.spearman(cbg[g], rpg[g]) == pytest.approx(1.0, abs=1e-12)


def test_affine_correction_matches_mean_std_and_keeps_order():
    W = _w(64, 64, seed=10)
    cb, idx = C.cluster_matrix(W, 16)
    pert = C.decode(C.rank_preserving_randomise(cb, seed=3), idx, None) * 3 + 0.2
    fixed = C.affine_correct(pert, W)
    assert abs(float(fixed.double().mean() - W.double().mean())) < 1e-6
    assert abs(float(fixed.double().std(unbiased=False) - W.double().std(unbiased=False))) < 1e-6
    a, _ = C.affine_params(pert, W)
    assert a > 0
    assert C.spearman(pert, fixed) == pytest.approx(1.0, abs=1e-12)
    flat_p, flat_f = pert.reshape(-1), fixed.reshape(-1)
    order = torch.argsort(flat_p, stable=True)
    assert torch.all(flat_f[order][1:] >= flat_f[order][:-1])
    with pytest.raises(ValueError):
        C.affine_correct(torch.ones(4, 4), W)


def test_bits_per_weight_counts_the_codebook():
    assert C.bits_per_weight(16, 576, 576, None) == pytest.approx(4 + 16 * 16 / (576 * 576))
    assert C.bits_per_weight(16, 576, 576, 16) == pytest.approx(4 + 16 / 576)      # = RTN 4-bit per channel


def test_clustered_linear_exact_reload_and_packed_size():
    torch.manual_seed(0)
    lin = torch.nn.Linear(96, 64, bias=True)
    cb, idx = C.cluster_matrix(lin.weight.detach(), 16, 16)
    m = ClusteredLinear.build(lin, cb, idx, 16)
    t, cfg = m.to_state()
    assert t["indices"].numel() == 64 * 96 * 4 // 8 and t["codebook"].dtype == torch.float16
    back = ClusteredLinear.from_state(t, cfg)
    x = torch.randn(3, 96)
    assert torch.equal(back.weight, m.weight) and torch.equal(back(x), m(x))
    assert torch.unique(m.weight).numel() <= 16 * 4


@pytest.fixture
def registered(monkeypatch):
    monkeypatch.setitem(M.MODULE_TYPES, "ClusteredLinear", ClusteredLinear)


@torch.no_grad()
def _loss(model, calib):
    return float(model(input_ids=calib.input_ids, labels=calib.input_ids).loss)


def test_stage_weighted_exports_and_reloads_identical_logits(tmp_path, registered, ids):
    model, calib = tiny_llama(), correlated_calib()
    st = Cluster(k=16, weighting="hessian-diag").apply(model, calib)
    assert "unique values <= K per codebook: True" in st["summary"]
    lins = [m for n, m in model.named_modules() if n.startswith("model.layers") and isinstance(m, torch.nn.Linear)]
    assert lins and all(isinstance(m, ClusteredLinear) for m in lins)
    assert all(torch.unique(m.weight).numel() <= 16 for m in lins)
    save(model, None, tmp_path / "c")
    back, _ = load_compressed(tmp_path / "c")
    with torch.no_grad():
        assert torch.equal(model(input_ids=ids).logits, back(input_ids=ids).logits)


@torch.no_grad()
def _logit_err(model, ref, calib):
    return float((model(input_ids=calib.input_ids).logits - ref(input_ids=calib.input_ids).logits).pow(2).mean())


@pytest.mark.parametrize("objective", ["next-token", "layer-mse"])
def test_centroid_finetuning_with_frozen_indices(objective):
    calib = correlated_calib(n=8, seqlen=32)
    ref, base, tuned = tiny_llama(), tiny_llama(), tiny_llama()
    Cluster(k=8).apply(base, calib)
    st = Cluster(k=8, finetune=True, objective=objective, steps=12, lr=0.01, batch_size=4).apply(tuned, calib)
    assert st["finetune"]["loss_after"] < st["finetune"]["loss_before"]
    changed = 0
    for (n, a), (_, b) in zip(base.named_modules(), tuned.named_modules()):
        if isinstance(a, ClusteredLinear):
            assert torch.equal(a.idx, b.idx)                       # assignments frozen
            assert torch.unique(b.weight).numel() <= 8
            changed += not torch.equal(a.codebook, b.codebook)
    assert changed > 0
    if objective == "next-token":
        assert _loss(tuned, calib) < _loss(base, calib)
    else:
        assert _logit_err(tuned, ref, calib) < _logit_err(base, ref, calib)
    assert all(p.requires_grad for p in tuned.model.embed_tokens.parameters())   # flags restored


def test_config_errors_name_the_field():
    with pytest.raises(UserError, match="cluster.k"):
        Cluster(k=12)
    with pytest.raises(UserError, match="cluster.weighting"):
        Cluster(weighting="fisher")
    with pytest.raises(UserError, match="cluster.objective"):
        Cluster(objective="kl")
    with pytest.raises(UserError, match="calibration"):
        Cluster(weighting="activation").apply(tiny_llama(), None)
    with pytest.raises(UserError, match="group_rows"):
        Cluster(group_rows=7).apply(tiny_llama(), None)
    m = tiny_llama()
    Cluster().apply(m)
    with pytest.raises(UserError, match="already compressed"):
        Cluster().apply(m)
    assert math.isclose(Cluster(k=256).k, 256)


def test_recipe_yaml_keys_map_to_the_stage(monkeypatch):
    from modelpress import recipe as R
    monkeypatch.setitem(R.STAGES, "cluster", Cluster)
    r = R.Recipe.from_dict({"stages": [{"cluster": {"k": 32, "group_rows": 16, "weighting": "activation",
                                                    "finetune": True, "objective": "layer-mse",
                                                    "include": ["mlp"]}}]})
    (name, cfg), = r.stages
    assert cfg == Cluster(k=32, group_rows=16, weighting="activation", finetune=True, objective="layer-mse",
                          include=("mlp",))
    assert r.needs_calibration
    with pytest.raises(UserError, match="allowed keys"):
        R.Recipe.from_dict({"stages": [{"cluster": {"clusters": 16}}]})


def test_rank_preserving_resample_keeps_order_and_the_centroid_distribution():
    """The paper's probe: sorted draws from the fitted centroids, placed in the original rank order."""
    W = _w(256, 64, seed=11)
    cb, _ = C.cluster_matrix(W, 16, 8)                                    # 32 codebooks of K = 16
    new = C.rank_preserving_resample(cb, seed=4)
    assert new.shape == cb.shape and not torch.equal(new, cb)
    for g in range(cb.shape[0]):                                          # order within each codebook kept
        o = torch.argsort(cb[g])
        assert (new[g][o][1:] >= new[g][o][:-1]).all()
    pool = cb.reshape(-1)
    assert torch.isin(new.reshape(-1), pool).all()                        # only fitted centroid values
    # the value distribution is the pool's: quantiles of the draws match the centroids' (two-sample KS)
    from scipy.stats import ks_2samp
    assert ks_2samp(new.reshape(-1).numpy(), pool.numpy()).pvalue > 0.01
    # ...whereas the Exp(1)-gap stress test moves the dense middle: its quantiles drift further
    stress = C.rank_preserving_randomise(cb, seed=4)
    assert ks_2samp(stress.reshape(-1).numpy(), pool.numpy()).statistic > \
        ks_2samp(new.reshape(-1).numpy(), pool.numpy()).statistic
    # an explicit pool is honoured, deterministic per seed
    other = torch.linspace(-1, 1, 101)
    a = C.rank_preserving_resample(cb, pool=other, seed=5)
    assert torch.isin(a.reshape(-1), other).all()
    assert torch.equal(a, C.rank_preserving_resample(cb, pool=other, seed=5))


def test_rank_preserving_resample_own_draws_each_codebook_from_its_own_centroids():
    """own=True (the benchmark's per-codebook probe): codebook g's values come from codebook g only."""
    W = _w(256, 64, seed=12)
    cb, _ = C.cluster_matrix(W, 16, 8)                                    # 32 codebooks of K = 16
    new = C.rank_preserving_resample(cb, seed=3, own=True)
    assert new.shape == cb.shape and not torch.equal(new, cb)
    for g in range(cb.shape[0]):
        assert torch.isin(new[g], cb[g]).all()
        o = torch.argsort(cb[g])
        assert (new[g][o][1:] >= new[g][o][:-1]).all()
        assert torch.equal(new[g:g + 1], C.rank_preserving_resample(cb[g:g + 1], seed=3 * 7919 + g))
    with pytest.raises(ValueError, match="own=True"):
        C.rank_preserving_resample(cb, pool=cb.reshape(-1), seed=3, own=True)
