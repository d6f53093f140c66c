"""Low-rank factorization: truncated SVD, activation-aware (whitened) SVD, rank selection, LowRankLinear
exact reload."""
import pytest
import torch

from modelpress import modules as M
from modelpress.algos import lowrank as LR
from modelpress.errors import UserError
from modelpress.export import load_compressed, save
from modelpress.modules.lowrank import LowRankLinear
from modelpress.stages.lowrank import LowRank

from .conftest import correlated_calib, tiny_llama


pytestmark = pytest.mark.usefixtures("one_thread")


def _correlated_inputs(n=2048, cols=64, seed=0):
    """Inputs with a strongly non-isotropic covariance (a few dominant, correlated directions)."""
    g = torch.Generator().manual_seed(seed)
    mix = torch.randn(cols, cols, generator=g)
    scales = torch.logspace(1, -2, cols)
    return (torch.randn(n, cols, generator=g) * scales) @ mix


def test_truncated_svd_is_eckart_young():
    W = torch.randn(48, 64, generator=torch.Generator().manual_seed(1))
    S = torch.linalg.svdvals(W.double())
    for r in (1, 8, 32):
        A, B = LR.svd_factors(W, r)
        assert A.shape == (48, r) and B.shape == (r, 64)
        err = float(((W.double() - A.double() @ B.double()) ** 2).sum())
        assert err == pytest.approx(float((S[r:] ** 2).sum()), rel=1e-4)


def test_asvd_has_lower_output_error_than_svd_on_correlated_inputs():
    W = torch.randn(32, 64, generator=torch.Generator().manual_seed(2))
    X = _correlated_inputs()
    H = 2 * X.T @ X / X.shape[0]
    for r in (4, 8, 16):
        A1, B1 = LR.svd_factors(W, r)
        A2, B2 = LR.asvd_factors(W, H, r, damp=1e-6)
        e_svd = float(((X @ (W - A1 @ B1).T) ** 2).sum())
        e_asvd = float(((X @ (W - A2 @ B2).T) ** 2).sum())
        assert e_asvd < 0.5 * e_svd
        assert LR.output_error(W, A2 @ B2, H) < LR.output_error(W, A1 @ B1, H)


def test_rank_selection():
    S = torch.tensor([4.0, 2.0, 1.0, 1.0])                      # energies 16, 4, 1, 1 of 22
    assert LR.rank_for_energy(S, 0.7) == 1
    assert LR.rank_for_energy(S, 0.9) == 2
    assert LR.rank_for_energy(S, 1.0) == 4
    assert LR.rank_for_budget(100, 100, 0.5) == 25
    st = LowRank(method="svd", rank_by="fixed", rank=1000)
    assert st.choose_rank(S, 4, 4) == 4


def test_lowrank_linear_forward_and_exact_reload():
    torch.manual_seed(0)
    lin = torch.nn.Linear(64, 48, bias=True)
    A, B = LR.svd_factors(lin.weight.detach(), 8)
    m = LowRankLinear.build(lin, A, B)
    x = torch.randn(5, 64)
    assert torch.allclose(m(x), x @ (A @ B).T + lin.bias, atol=1e-5)
    assert torch.allclose(m.weight, A @ B, atol=1e-6)
    t, cfg = m.to_state()
    assert set(t) == {"A", "B", "bias"} and t["A"].shape == (48, 8) and t["B"].shape == (8, 64)
    back = LowRankLinear.from_state(t, cfg)
    assert torch.equal(back(x), m(x)) and torch.equal(back.weight, m.weight)


def test_stage_asvd_exports_and_reloads_identical_logits(tmp_path, monkeypatch, ids):
    monkeypatch.setitem(M.MODULE_TYPES, "LowRankLinear", LowRankLinear)
    model, calib = tiny_llama(), correlated_calib()
    st = LowRank(method="asvd", rank_by="budget", budget=0.5).apply(model, calib)
    done = [v for v in st["layers"].values() if v["kind"] == "LowRankLinear"]
    assert len(done) == len(st["layers"]) > 0
    assert all(v["params_fraction"] <= 0.5 for v in done)
    assert all(0 < v["rel_output_error"] < 1 for v in done)
    save(model, None, tmp_path / "lr")
    back, _ = load_compressed(tmp_path / "lr")
    with torch.no_grad():
        assert torch.equal(model(input_ids=ids).logits, back(input_ids=ids).logits)


def test_stage_asvd_beats_svd_end_to_end():
    calib = correlated_calib()
    ref = tiny_llama()
    errs = {}
    for method in ("svd", "asvd"):
        m = tiny_llama()
        LowRank(method=method, rank_by="fixed", rank=8).apply(m, calib)
        with torch.no_grad():
            errs[method] = float((m(input_ids=calib.input_ids).logits - ref(input_ids=calib.input_ids).logits).pow(2).mean())
    assert errs["asvd"] < errs["svd"]


def test_full_energy_keeps_layers_dense_and_errors_name_fields():
    m = tiny_llama()
    st = LowRank(method="svd", rank_by="energy", energy=1.0).apply(m)
    assert all(v["kind"] == "Linear" for v in st["layers"].values())
    assert not any(isinstance(x, LowRankLinear) for x in m.modules())
    with pytest.raises(UserError, match="lowrank.method"):
        LowRank(method="pca")
    with pytest.raises(UserError, match="lowrank.budget"):
        LowRank(budget=1.5)
    with pytest.raises(UserError, match="calibration"):
        LowRank(method="asvd").apply(tiny_llama(), None)


def test_recipe_yaml_keys_map_to_the_stage(monkeypatch):
    from modelpress import recipe as R
    monkeypatch.setitem(R.STAGES, "lowrank", LowRank)
    r = R.Recipe.from_dict({"stages": [{"lowrank": {"method": "svd", "rank_by": "fixed", "rank": 16,
                                                    "exclude": ["lm_head", "q_proj"]}}]})
    (name, cfg), = r.stages
    assert cfg == LowRank(method="svd", rank_by="fixed", rank=16, exclude=("lm_head", "q_proj"))
    assert not r.needs_calibration
    assert R.Recipe.from_dict({"stages": [{"lowrank": {"method": "asvd"}}]}).needs_calibration
