"""Tests for modelpress.tabular (TabKD, arXiv 2603.15481): covering arrays, bins, queries,
students, determinism and the CLI's error handling. Small budgets keep this well under 60 s."""
from __future__ import annotations

import argparse
import itertools

import numpy as np
import pytest
import torch

from modelpress.errors import UserError
from modelpress.tabular.bins import (bins_from_thresholds, digitize, make_bins, reduce_thresholds,
                                     sweep_bins)
from modelpress.tabular.covering import covering_rows, ipog, pairwise_coverage
from modelpress.tabular.distill import DistillConfig, agreement, distill
from modelpress.tabular.queries import (balance_seeds, farthest_points, refine_boundaries, sample_in_bins,
                                       uniform_queries, water_fill)
from modelpress.tabular.spec import Feature, FeatureSpec, spec_from_columns, spec_from_dict
from modelpress.tabular.student import load_student, predict_proba, save_student, train_tree
from modelpress.tabular.teacher import Teacher, split_thresholds

torch.set_num_threads(1)


def brute_force_covered(ca: np.ndarray, levels) -> bool:
    for j, i in itertools.combinations(range(len(levels)), 2):
        seen = set(zip(ca[:, j].tolist(), ca[:, i].tolist()))
        for a, b in itertools.product(range(levels[j]), range(levels[i])):
            if (a, b) not in seen:
                return False
    return True


@pytest.mark.parametrize("levels", [[2, 2, 2], [3, 3, 3, 3], [2] * 10, [5, 4, 3, 2, 2, 2], [1, 3, 2],
                                    [4] * 13, [6, 2, 6, 3, 5], [7], [3, 5]])
def test_ipog_full_pairwise_coverage(levels):
    ca = ipog(levels, np.random.default_rng(0))
    assert ca.shape[1] == len(levels)
    assert np.all(ca >= 0) and np.all(ca < np.asarray(levels))
    assert brute_force_covered(ca, levels)
    assert pairwise_coverage(ca, levels) == 1.0
    top = sorted(levels, reverse=True) + [1]
    assert len(ca) >= top[0] * top[1]  # lower bound of any covering array


def test_ipog_sizes_reasonable():
    # 3^4 has an optimal CA with 9 rows; mixed 5,4,3,2,2,2 has one with 20 = 5*4 rows
    assert len(ipog([3, 3, 3, 3], np.random.default_rng(0))) == 9
    assert len(ipog([5, 4, 3, 2, 2, 2], np.random.default_rng(0))) == 20
    assert len(ipog([2] * 10, np.random.default_rng(0))) <= 12


def test_pairwise_coverage_matches_brute_force():
    rng = np.random.default_rng(1)
    levels = [3, 4, 2, 3]
    L = np.stack([rng.integers(0, v, 7) for v in levels], 1)
    covered = total = 0
    for j, i in itertools.combinations(range(4), 2):
        covered += len(set(zip(L[:, j], L[:, i])))
        total += levels[j] * levels[i]
    assert pairwise_coverage(L, levels) == pytest.approx(covered / total)
    assert pairwise_coverage(L, levels) < 1.0


def test_covering_rows_repeat_and_determinism():
    levels = [4, 3, 3, 2]
    a = covering_rows(levels, 100, np.random.default_rng(5))
    b = covering_rows(levels, 100, np.random.default_rng(5))
    c = covering_rows(levels, 100, np.random.default_rng(6))
    assert a.shape == (100, 4)
    np.testing.assert_array_equal(a, b)
    assert not np.array_equal(a, c)
    n1 = len(ipog(levels, np.random.default_rng(5)))
    assert brute_force_covered(a[:n1], levels)


def _tree_data(seed=0, n=400):
    rng = np.random.default_rng(seed)
    X = rng.uniform(0, 10, (n, 4))
    y = ((X[:, 0] > 3.3) & (X[:, 1] < 6.1)).astype(int) + (X[:, 2] > 7.7).astype(int)
    return X, y


def test_bins_recover_decision_tree_thresholds_exactly():
    from sklearn.tree import DecisionTreeClassifier
    X, y = _tree_data()
    tree = DecisionTreeClassifier(max_depth=4, random_state=0).fit(X, y)
    spec = spec_from_columns(X)
    thr = split_thresholds(tree, 4)
    t = tree.tree_
    bins = bins_from_thresholds(spec, thr, max_bins=32)
    for j in range(4):
        want = np.unique(t.threshold[t.feature == j])
        np.testing.assert_array_equal(bins.edges[j], want)
        assert bins.n_levels[j] == len(want) + 1
    # the splits the data was built from are among the recovered edges (to sklearn's midpoint)
    assert np.min(np.abs(bins.edges[0] - 3.3)) < 0.1
    assert np.min(np.abs(bins.edges[2] - 7.7)) < 0.1
    assert len(bins.edges[3]) <= 2  # noise feature: few or no splits


def test_thresholds_from_ensembles():
    from sklearn.ensemble import HistGradientBoostingClassifier, RandomForestClassifier
    X, y = _tree_data()
    for model in (RandomForestClassifier(10, max_depth=3, random_state=0),
                  HistGradientBoostingClassifier(max_iter=10, random_state=0)):
        thr = split_thresholds(model.fit(X, y), 4)
        assert thr is not None and len(thr[0]) > 0
        assert np.min(np.abs(thr[0] - 3.3)) < 0.2
    xgb = pytest.importorskip("xgboost")
    thr = split_thresholds(xgb.XGBClassifier(n_estimators=10, max_depth=3).fit(X, y), 4)
    assert np.min(np.abs(thr[0] - 3.3)) < 0.2
    assert split_thresholds(object(), 4) is None


def test_thresholds_from_lightgbm():
    lgb = pytest.importorskip("lightgbm")
    X, y = _tree_data()
    thr = split_thresholds(lgb.LGBMClassifier(n_estimators=10, verbose=-1).fit(X, y), 4)
    assert len(thr[0]) > 0 and np.min(np.abs(thr[0] - 3.3)) < 0.2


def test_reduce_thresholds_keeps_real_thresholds():
    t = np.array([1.0, 1.0, 1.0, 2.0, 3.0, 3.0, 4.0, 5.0, 6.0, 7.0])
    r = reduce_thresholds(t, 3)
    assert len(r) <= 3 and set(r.tolist()) <= set(t.tolist())
    assert 1.0 in r  # the most used threshold survives
    np.testing.assert_array_equal(reduce_thresholds(t, 20), np.unique(t))


class StepTeacher:
    """p(class 1) = 1 when x0 > 0.3 (x1 ignored)."""
    classes_ = np.array([0, 1])

    def predict_proba(self, X):
        p = (X[:, 0] > 0.3).astype(float)
        return np.stack([1 - p, p], 1)


def test_sweep_bins_find_step():
    spec = FeatureSpec((Feature("a", "numeric", 0, 1), Feature("b", "numeric", 0, 1)))
    T = Teacher(StepTeacher())
    bins, X, P = sweep_bins(T, spec, 200, np.random.default_rng(0), max_bins=8)
    assert len(X) <= 200 and T.n_queries == len(X)
    assert len(bins.edges[0]) == 1 and abs(bins.edges[0][0] - 0.3) < 1 / 23
    assert len(bins.edges[1]) == 2  # no change seen: 3 equal-width fallback bins


def test_farthest_points_order():
    Z = np.array([[0.0], [1.0], [2.0], [10.0]])
    np.testing.assert_array_equal(farthest_points(Z, 3), [0, 3, 2])
    assert len(farthest_points(Z, 9)) == 4 and len(farthest_points(Z, 0)) == 0


@pytest.mark.parametrize("spread", [False, True])
def test_refine_boundaries_bisects_onto_step(spread):
    spec = FeatureSpec((Feature("a", "numeric", 0, 1), Feature("b", "numeric", 0, 1)))
    T = Teacher(StepTeacher())
    X = uniform_queries(spec, 300, np.random.default_rng(0))
    P = T.proba(X)
    q0 = T.n_queries
    Xn, Pn = refine_boundaries(T, spec, X, P, 60, np.random.default_rng(1), steps=5, spread=spread)
    assert len(Xn) == 60 and T.n_queries - q0 == 60  # 12 pairs x 5 bisection steps, all counted
    np.testing.assert_array_equal(Pn, T.proba(Xn))
    last = Xn[-12:]  # 5th midpoints: within 2^-5 of a bracket (~0.1 long) from the step at 0.3
    assert np.abs(last[:, 0] - 0.3).max() < 0.01
    span = last[:, 1].max() - last[:, 1].min()
    # the closest brackets cluster on part of the boundary x0 = 0.3; spread ones cover it
    assert span > 0.9 if spread else span < 0.5, span


def test_water_fill_equalises_counts():
    np.testing.assert_array_equal(water_fill([10, 2, 5], 4), [0, 4, 0])
    np.testing.assert_array_equal(water_fill([10, 2, 5], 20), [2, 11, 7])  # -> 12, 13, 12
    np.testing.assert_array_equal(water_fill([0, 100, 7], 50), [29, 0, 21])
    assert water_fill([3, 3], 3).sum() == 3 and water_fill([3, 3], 0).sum() == 0


def test_balance_seeds_fill_the_rare_class():
    spec = FeatureSpec((Feature("a", "numeric", 0, 1), Feature("b", "numeric", 0, 1)))
    T = Teacher(StepTeacher())  # class 0 where x0 <= 0.3
    X = uniform_queries(spec, 200, np.random.default_rng(0))
    y = T.proba(X).argmax(1)
    Xb = balance_seeds(X, y, spec, 100, np.random.default_rng(1), sigma=0.1)
    assert Xb.shape == (100, 2) and Xb.min() >= 0 and Xb.max() <= 1
    yb = T.proba(Xb).argmax(1)
    before = np.bincount(y, minlength=2)
    after = before + np.bincount(yb, minlength=2)
    assert before[0] < 70 and (yb == 0).mean() > 0.75  # seeds go to the rare class 0
    assert before[1] - before[0] >= 80 and abs(after[0] - after[1]) <= 20  # 50:150 -> ~150:150


def test_sample_in_bins_lands_in_bins():
    spec = FeatureSpec((Feature("n", "numeric", -1, 5), Feature("i", "integer", 0, 9),
                        Feature("c", "categorical", levels=(3.0, 7.0, 9.0))))
    bins = make_bins(spec, [np.array([0.0, 2.5]), np.array([2.2, 6.7]), np.zeros(0)], "test")
    assert bins.n_levels == (3, 3, 3)
    L = covering_rows(bins.n_levels, 60, np.random.default_rng(0))
    X = sample_in_bins(L, spec, bins, np.random.default_rng(1))
    np.testing.assert_array_equal(digitize(X, spec, bins), L)
    assert np.all(X[:, 1] == np.round(X[:, 1]))
    assert set(X[:, 2].tolist()) <= {3.0, 7.0, 9.0}
    assert X[:, 0].min() >= -1 and X[:, 0].max() <= 5


def _wine_setup():
    from sklearn.datasets import load_wine
    from sklearn.ensemble import RandomForestClassifier
    from sklearn.model_selection import train_test_split
    X, y = load_wine(return_X_y=True)
    Xtr, Xte, ytr, _ = train_test_split(X, y, test_size=0.4, random_state=0, stratify=y)
    teacher = Teacher(RandomForestClassifier(30, max_depth=4, random_state=0).fit(Xtr, ytr))
    return spec_from_columns(Xtr), teacher, Xte


def test_distill_deterministic_per_seed():
    spec, T, _ = _wine_setup()
    cfg = DistillConfig(budget=300, steps=40, seed=3)
    state = torch.random.get_rng_state()
    a, b = distill(T, spec, cfg), distill(T, spec, cfg)
    assert torch.equal(state, torch.random.get_rng_state())  # no global RNG side effects
    np.testing.assert_array_equal(a.X, b.X)
    for (ka, va), (kb, vb) in zip(a.student.state_dict().items(), b.student.state_dict().items()):
        assert ka == kb and torch.equal(va, vb)
    c = distill(T, spec, DistillConfig(budget=300, steps=40, seed=4))
    assert not np.array_equal(a.X, c.X)
    assert a.info["n_queries"] == 300 and len(a.X) == 300


def test_tabkd_student_agreement_on_held_out_wine():
    spec, T, Xte = _wine_setup()
    res = distill(T, spec, DistillConfig(budget=800, steps=300, seed=0))
    assert res.info["bin_source"] == "thresholds"
    assert res.coverage == 1.0
    agree = agreement(T, res.student, Xte)
    assert agree >= 0.85, agree  # 72 real rows never seen in distillation


def test_tree_student_and_safetensors_roundtrip(tmp_path):
    from sklearn.tree import DecisionTreeRegressor
    spec, T, Xte = _wine_setup()
    res = distill(T, spec, DistillConfig(budget=300, student="tree", tree_depth=4, seed=0))
    ref = DecisionTreeRegressor(max_depth=4, random_state=0).fit(res.X, res.P).predict(Xte)
    ours = predict_proba(res.student, Xte)
    np.testing.assert_array_equal(ours.argmax(1), ref.argmax(1))
    path = tmp_path / "tree.safetensors"
    save_student(res.student, path)
    np.testing.assert_allclose(predict_proba(load_student(path), Xte), ours, atol=1e-6)
    mlp = distill(T, spec, DistillConfig(budget=200, steps=20, seed=0)).student
    save_student(mlp, tmp_path / "mlp.safetensors")
    np.testing.assert_allclose(predict_proba(load_student(tmp_path / "mlp.safetensors"), Xte),
                               predict_proba(mlp, Xte), atol=1e-6)


def test_onnx_export_matches_torch(tmp_path):
    onnx = pytest.importorskip("onnx")
    from onnx.reference import ReferenceEvaluator

    from modelpress.tabular.student import MLPStudent, export_onnx
    spec, T, Xte = _wine_setup()
    torch.manual_seed(0)
    mlp = MLPStudent(13, 3, (8,), center=np.full(13, 2.0), scale=np.full(13, 3.0)).eval()
    ple = MLPStudent(13, 3, (8,), edges=np.quantile(Xte, np.linspace(0, 1, 5), axis=0).T).eval()
    tree = distill(T, spec, DistillConfig(budget=300, student="tree", tree_depth=4, seed=0)).student
    x = Xte.astype(np.float32)
    for name, m in (("mlp", mlp), ("ple", ple), ("tree", tree)):
        path = tmp_path / f"{name}.onnx"
        export_onnx(m, 13, path)
        model = onnx.load(str(path))
        onnx.checker.check_model(model)
        assert [i.name for i in model.graph.input] == ["x"]
        got = ReferenceEvaluator(str(path)).run(None, {"x": x})[0]
        with torch.no_grad():
            want = m(torch.as_tensor(x)).numpy()
        np.testing.assert_allclose(got, want, atol=1e-4)


def test_spec_validation_errors():
    with pytest.raises(UserError, match="range"):
        spec_from_dict({"features": [{"name": "a", "type": "numeric", "range": [3, 1]}]})
    with pytest.raises(UserError, match="levels"):
        spec_from_dict({"features": [{"name": "a", "type": "categorical"}]})
    with pytest.raises(UserError, match="type"):
        spec_from_dict({"features": [{"name": "a", "type": "text", "range": [0, 1]}]})
    with pytest.raises(UserError, match="features"):
        spec_from_dict([1, 2])
    with pytest.raises(UserError, match="method"):
        DistillConfig(method="magic")
    with pytest.raises(UserError, match="budget"):
        DistillConfig(budget=3)


def _cli(argv):
    from modelpress.cli import tabular as cli
    ap = argparse.ArgumentParser()
    cli.add_parser(ap.add_subparsers(dest="cmd"))
    args = ap.parse_args(argv)
    return args.func(args)


def test_cli_bad_input_raises_user_error(tmp_path):
    import joblib
    from sklearn.linear_model import LogisticRegression
    from sklearn.tree import DecisionTreeClassifier
    X, y = _tree_data(n=200)
    joblib.dump(DecisionTreeClassifier(max_depth=3).fit(X, y), tmp_path / "tree.pkl")
    joblib.dump(LogisticRegression(max_iter=200).fit(X, y), tmp_path / "lr.pkl")
    (tmp_path / "bad.yaml").write_text("features: [ {name: a, type: numeric, range: [0, 1]}\n")
    (tmp_path / "two.yaml").write_text("features:\n- {name: a, range: [0, 1]}\n- {name: b, range: [0, 1]}\n")
    (tmp_path / "junk.pkl").write_bytes(b"not a pickle")
    out = str(tmp_path / "o")
    cases = [
        ([str(tmp_path / "missing.pkl"), "--budget", "100", "--out", out], "not found"),
        ([str(tmp_path / "junk.pkl"), "--budget", "100", "--out", out], "cannot load"),
        ([str(tmp_path / "tree.pkl"), "--spec", str(tmp_path / "nope.yaml"), "--budget", "100", "--out", out],
         "not found"),
        ([str(tmp_path / "tree.pkl"), "--spec", str(tmp_path / "bad.yaml"), "--budget", "100", "--out", out],
         "cannot parse"),
        ([str(tmp_path / "tree.pkl"), "--spec", str(tmp_path / "two.yaml"), "--budget", "100", "--out", out],
         "teacher expects 4"),
        ([str(tmp_path / "lr.pkl"), "--budget", "100", "--out", out], "pass --spec"),
        ([str(tmp_path / "tree.pkl"), "--budget", "2", "--out", out], "budget"),
        ([str(tmp_path / "tree.pkl"), "--budget", "100", "--student", "svm", "--out", out], "student"),
    ]
    for argv, msg in cases:
        with pytest.raises(UserError, match=msg):
            _cli(["tabular", "distill", *argv, "--trust-pickle"])
    with pytest.raises(UserError, match="is a pickle.*--trust-pickle"):     # never without the flag
        _cli(["tabular", "distill", str(tmp_path / "tree.pkl"), "--budget", "100", "--out", out])


def test_cli_distill_writes_outputs(tmp_path):
    import json

    import joblib
    from sklearn.tree import DecisionTreeClassifier
    X, y = _tree_data(n=300)
    joblib.dump(DecisionTreeClassifier(max_depth=3, random_state=0).fit(X[:200], y[:200]), tmp_path / "t.pkl")
    np.savetxt(tmp_path / "eval.csv", X[200:], delimiter=",", header="a,b,c,d", comments="")
    out = tmp_path / "out"
    rc = _cli(["tabular", "distill", str(tmp_path / "t.pkl"), "--budget", "400", "--out", str(out),
               "--student", "tree", "--eval", str(tmp_path / "eval.csv"), "--no-onnx", "--trust-pickle"])
    assert rc == 0
    rep = json.loads((out / "report.json").read_text())
    assert rep["queries"] == 400 and rep["pairwise_coverage"] == 1.0
    assert rep["n_eval"] == 100 and rep["agreement_eval"] >= 0.9
    assert (out / "student.safetensors").is_file() and (out / "spec.yaml").is_file()


def test_onnx_missing_gives_clear_error(tmp_path, monkeypatch):
    import sys

    from modelpress.tabular.student import MLPStudent, export_onnx
    monkeypatch.setitem(sys.modules, "onnx", None)  # makes `import onnx` raise ImportError
    with pytest.raises(UserError, match="needs the 'onnx' package"):
        export_onnx(MLPStudent(3, 2, (4,)), 3, tmp_path / "s.onnx")
    assert not (tmp_path / "s.onnx").exists()


def test_threshold_at_low_makes_point_bin():
    """A split 'x <= low' (zero-inflated column) keeps the point bin {low} under reduction."""
    spec = FeatureSpec((Feature("spend", "numeric", 0.0, 100.0), Feature("i", "integer", 0, 9)))
    thr = [np.array([0.0, 0.0] + list(np.linspace(5, 95, 40))), np.array([0.0, 3.2])]
    bins = bins_from_thresholds(spec, thr, max_bins=4)
    assert bins.edges[0][0] == 0.0 and bins.n_levels == (4, 3)
    np.testing.assert_array_equal(bins.edges[1], [0.5, 3.5])
    L = np.array([[0, 0], [1, 1], [0, 2]])
    X = sample_in_bins(L, spec, bins, np.random.default_rng(0))
    assert X[0, 0] == 0.0 and X[2, 0] == 0.0 and 0.0 < X[1, 0] <= bins.edges[0][1]
    np.testing.assert_array_equal(digitize(X, spec, bins), L)


def test_ple_student_learns_point_mass_step():
    """PLE over quantile bins turns a point mass at 0 into a step the student can fit."""
    from modelpress.tabular.student import train_mlp
    rng = np.random.default_rng(0)
    x = np.where(rng.random(600) < 0.4, 0.0, rng.uniform(0.5, 3000.0, 600))
    X = np.stack([x, rng.uniform(0, 1, 600)], 1)
    P = np.stack([(x == 0) * 1.0, (x > 0) * 1.0], 1)
    m = train_mlp(X, P, np.array([1500.0, 0.5]), np.array([1500.0, 0.5]), 0, (16,), 300, 256,
                  lr=3e-3, ple_bins=4)
    assert m.config["ple_bins"] == 4
    probe = np.array([[0.0, 0.5], [0.5, 0.5], [2.0, 0.2], [2500.0, 0.9]])
    np.testing.assert_array_equal(predict_proba(m, probe).argmax(1), [0, 1, 1, 1])


def test_student_recipe_depends_on_teacher_only():
    from modelpress.tabular.distill import student_recipe
    for method in ("tabkd", "uniform", "gaussian", "dfkd"):
        cfg = DistillConfig(method=method)
        assert student_recipe(cfg, True) == (8, cfg.ple_steps, cfg.ple_lr)
        assert student_recipe(cfg, False) == (0, cfg.steps, cfg.lr)
    assert student_recipe(DistillConfig(ple_bins=0), True)[0] == 0
    with pytest.raises(UserError, match="ple_bins"):
        DistillConfig(ple_bins=-2)
