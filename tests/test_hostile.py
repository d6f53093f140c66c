"""Hostile and faulty inputs (issue 22): no code runs from files a user was handed, exports are
tamper-evident, every fault is a one-line error (exit 2), runs validate before the expensive work,
and long runs talk in logs."""
from __future__ import annotations

import json
import pickle

import numpy as np
import pytest
import torch

from modelpress.cli import main
from modelpress.errors import UserError

from .conftest import tiny_model_dir


def _one_line_error(capsys, argv) -> str:
    """Run the CLI; assert exit 2 and exactly one stderr line `modelpress: error: ...`; return it."""
    capsys.readouterr()
    rc = main(argv)
    err = capsys.readouterr().err
    lines = [x for x in err.replace("\r", "\n").splitlines() if x.strip() and "%|" not in x]  # minus bars
    assert rc == 2, err[-2000:]
    assert len(lines) == 1 and lines[0].startswith("modelpress: error: "), err[-2000:]
    assert len(lines[0]) < 600, lines[0][:300]
    return lines[0]


# -- 1. no code from user files ---------------------------------------------------------------------

class _Evil:
    """Unpickling this calls exec(...), which writes a marker file."""

    def __init__(self, marker):
        self.marker = str(marker)

    def __reduce__(self):
        return exec, (f"open({self.marker!r}, 'w').write('pwned')",)


def _tabular_cli(argv):
    return main(["tabular", "distill", *argv])


def test_malicious_pickle_and_pt_write_nothing_without_the_flag(tmp_path, capsys):
    marker = tmp_path / "marker"
    (tmp_path / "evil.pkl").write_bytes(pickle.dumps(_Evil(marker)))
    torch.save(_Evil(marker), tmp_path / "evil.pt")
    for name in ("evil.pkl", "evil.pt"):
        line = _one_line_error(capsys, ["tabular", "distill", str(tmp_path / name), "--budget", "50",
                                        "--out", str(tmp_path / "o")])
        assert "--trust-pickle" in line and not marker.exists(), line
    # the flag is what makes it run (so the test above can fail)
    from modelpress.tabular.teacher import load_teacher
    load_teacher(tmp_path / "evil.pkl", trust_pickle=True)
    assert marker.exists()


def test_trust_pickle_help_explains_the_risk(capsys):
    with pytest.raises(SystemExit):
        main(["tabular", "distill", "--help"])
    out = " ".join(capsys.readouterr().out.split())
    assert "--trust-pickle" in out and "runs any code" in out


def _tree_data(n=300, seed=0):
    rng = np.random.default_rng(seed)
    X = rng.uniform(0, 1, (n, 3)).astype(np.float32)
    y = (X[:, 0] > 0.5).astype(int) + (X[:, 1] > 0.3).astype(int)
    return X, y


def test_onnx_sklearn_teacher_equals_sklearn_and_exposes_thresholds(tmp_path, capsys):
    pytest.importorskip("skl2onnx")
    from skl2onnx import to_onnx
    from sklearn.ensemble import RandomForestClassifier

    from modelpress.tabular.teacher import Teacher, load_teacher, split_thresholds
    X, y = _tree_data()
    rf = RandomForestClassifier(8, max_depth=3, random_state=0).fit(X, y)
    (tmp_path / "rf.onnx").write_bytes(to_onnx(rf, X[:1]).SerializeToString())     # with a ZipMap
    t = load_teacher(tmp_path / "rf.onnx")
    np.testing.assert_allclose(Teacher(t).proba(X[:50]), rf.predict_proba(X[:50]), atol=1e-5)
    ours, theirs = split_thresholds(t, 3), split_thresholds(rf, 3)
    for a, b in zip(ours, theirs):
        np.testing.assert_allclose(a, np.sort(b.astype(np.float32)), atol=1e-6)
    rc = _tabular_cli([str(tmp_path / "rf.onnx"), "--budget", "300", "--out", str(tmp_path / "o"),
                       "--student", "tree", "--no-onnx"])
    assert rc == 0 and (tmp_path / "o" / "report.json").exists()


def test_onnx_torch_teacher_and_lightgbm_text(tmp_path):
    from modelpress.tabular.student import MLPStudent, export_onnx
    from modelpress.tabular.teacher import Teacher, load_teacher
    torch.manual_seed(0)
    net = MLPStudent(3, 4, (8,)).eval()
    export_onnx(net, 3, tmp_path / "net.onnx")
    X, y = _tree_data()
    t = Teacher(load_teacher(tmp_path / "net.onnx"))
    with torch.no_grad():
        want = torch.softmax(net(torch.as_tensor(X[:20])), -1).numpy()
    np.testing.assert_allclose(t.proba(X[:20]), want, atol=1e-5)
    assert t.n_classes == 4
    lgb = pytest.importorskip("lightgbm")
    clf = lgb.LGBMClassifier(n_estimators=5, num_leaves=4, verbose=-1).fit(X, y)
    clf.booster_.save_model(str(tmp_path / "m.txt"))
    np.testing.assert_allclose(Teacher(load_teacher(tmp_path / "m.txt")).proba(X[:20]),
                               clf.predict_proba(X[:20]), atol=1e-9)


def test_tasks_dir_is_code_and_needs_the_flag(tmp_path, capsys):
    pytest.importorskip("lm_eval")
    marker = tmp_path / "marker"
    d = tmp_path / "tasks"
    d.mkdir()
    (d / "utils.py").write_text(f"open({str(marker)!r}, 'w').write('pwned')\n"
                                "def process(ds):\n    return ds\n")
    (d / "evil.yaml").write_text("task: evil\ndataset_path: json\nprocess_docs: !function utils.process\n"
                                 "output_type: multiple_choice\ndoc_to_text: q\ndoc_to_choice: [a, b]\n"
                                 "doc_to_target: 0\ntest_split: test\n")
    m = tiny_model_dir(tmp_path / "m")
    line = _one_line_error(capsys, ["eval", str(m), "--tasks", "evil", "--tasks-dir", str(d)])
    assert "--trust-tasks-code" in line and not marker.exists()
