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
    from modelpress.api import load
    from modelpress.eval.lm_eval_bridge import run_tasks
    model, tok = load(m)
    with pytest.raises(UserError, match="--trust-tasks-code"):
        run_tasks(model, tok, "evil", include_path=str(d), include_defaults=False)
    assert not marker.exists()
    with pytest.raises(Exception):          # with the flag lm-eval imports utils.py (then fails: no data)
        run_tasks(model, tok, "evil", include_path=str(d), include_defaults=False, trust_code=True)
    assert marker.exists()


# -- 2. tamper-evident exports ----------------------------------------------------------------------

@pytest.fixture(scope="module")
def export_dir(tmp_path_factory):
    import modelpress as mp
    from modelpress.export import save
    from modelpress.recipe import Recipe

    from .conftest import correlated_calib, tiny_llama
    m = tiny_llama()
    recipe = Recipe.from_dict({"stages": [{"prune": {"method": "magnitude", "sparsity": 0.5}},
                                          {"quantize": {"method": "rtn", "bits": 4, "group_size": 16}}]})
    calib = correlated_calib()
    mp.compress(m, recipe, calib)
    return save(m, None, tmp_path_factory.mktemp("exp") / "e", recipe=recipe.to_dict(),
                calibration=calib.provenance)


def _copy(src, dst):
    import shutil
    shutil.copytree(src, dst)
    return dst


def _resum(d):
    from modelpress.export.native import write_checksums
    write_checksums(d)


def _edit_manifest(d, fn):
    man = json.loads((d / "modelpress.json").read_text())
    fn(man)
    (d / "modelpress.json").write_text(json.dumps(man))
    _resum(d)


def test_consistent_weight_edit_is_caught_by_tensor_hashes(export_dir, tmp_path, capsys):
    from modelpress.export import load_compressed
    d = _copy(export_dir, tmp_path / "e")
    data = bytearray((d / "model.safetensors").read_bytes())
    data[-5] ^= 0x01
    (d / "model.safetensors").write_bytes(bytes(data))
    _resum(d)                                               # checksums.json rewritten to match
    with pytest.raises(UserError, match="does not match its sha256"):
        load_compressed(d)
    for argv in (["inspect", str(d)], ["inspect", str(d), "--verify"], ["eval", str(d), "--windows", "1"]):
        assert "does not match its sha256" in _one_line_error(capsys, argv)


@pytest.mark.parametrize("edit,msg", [
    (lambda man: next(iter(man["modules"].values()))["config"].update(group_size=32), "scales has shape"),
    (lambda man: next(iter(man["modules"].values()))["config"].update(bits=3), "qweight has shape"),
    (lambda man: next(iter(man["modules"].values()))["config"].update({"in": 32}), "shape"),
    (lambda man: man.update(dtype="torch.load"), "dtype"),
    (lambda man: next(iter(man["modules"].values()))["config"].update(dtype="torch.load"), "dtype"),
    (lambda man: next(iter(man["modules"].values())).update(kind="os.system"), "unknown to this modelpress"),
])
def test_manifest_edits_that_do_not_fit_the_tensors_are_refused(export_dir, tmp_path, edit, msg):
    from modelpress.export import load_compressed
    d = _copy(export_dir, tmp_path / "e")
    _edit_manifest(d, edit)
    with pytest.raises(UserError, match=msg):
        load_compressed(d)


def test_mask_size_mismatch_is_refused(export_dir, tmp_path):
    from safetensors.torch import load_file, save_file

    from modelpress.export import load_compressed
    from modelpress.io import sha256_tensor
    d = _copy(export_dir, tmp_path / "e")
    t = load_file(d / "model.safetensors")
    k = next(k for k in t if k.endswith(".keep"))
    t[k] = t[k][:-1].clone()
    save_file(t, d / "model.safetensors", metadata={"format": "modelpress/1"})
    _edit_manifest(d, lambda man: man["tensor_sha256"].update({k: sha256_tensor(t[k])}))
    with pytest.raises(UserError, match="keep has shape"):
        load_compressed(d)


@pytest.mark.parametrize("name", ["../../etc/hostname", "/etc/hostname", "sub/../../x", "zero"])
def test_checksum_names_stay_inside_and_name_regular_files(export_dir, tmp_path, capsys, name):
    import os
    import signal
    d = _copy(export_dir, tmp_path / "e")
    os.symlink("/dev/zero", d / "zero")
    sums = json.loads((d / "checksums.json").read_text())
    sums[name] = "0" * 64
    (d / "checksums.json").write_text(json.dumps(sums))
    signal.alarm(60)                                        # /dev/zero used to hang forever
    try:
        line = _one_line_error(capsys, ["inspect", str(d)])
    finally:
        signal.alarm(0)
    assert "outside the export folder" in line or "not a regular file" in line


@pytest.mark.parametrize("content", [b"{not json", b"\xff\xfe\x00garbage", b"[1, 2]", b'{"model.safetensors": 5}'])
def test_malformed_checksums_is_one_line(export_dir, tmp_path, capsys, content):
    d = _copy(export_dir, tmp_path / "e")
    (d / "checksums.json").write_bytes(content)
    _one_line_error(capsys, ["inspect", str(d)])


@pytest.mark.parametrize("how", ["truncate", "header"])
def test_truncated_or_header_corrupted_safetensors(export_dir, tmp_path, capsys, how):
    from modelpress.export import load_compressed
    d = _copy(export_dir, tmp_path / "e")
    data = (d / "model.safetensors").read_bytes()
    data = data[: len(data) // 2] if how == "truncate" else data[:8] + b"{\"x\": garbage" + data[21:]
    (d / "model.safetensors").write_bytes(data)
    _resum(d)
    with pytest.raises(UserError, match="not a readable safetensors"):
        load_compressed(d)


def test_config_values_that_do_not_fit_are_one_line(export_dir, tmp_path):
    from modelpress.export import load_compressed
    d = _copy(export_dir, tmp_path / "e")
    cfg = json.loads((d / "config.json").read_text())
    cfg["hidden_size"] = 48
    (d / "config.json").write_text(json.dumps(cfg))
    _resum(d)
    with pytest.raises(UserError, match="config"):
        load_compressed(d)
    (d / "config.json").write_bytes(b"\xff\xfe not utf-8")
    _resum(d)
    with pytest.raises(UserError, match="not UTF-8"):
        load_compressed(d)


def test_inspect_verify_prints_the_provenance_chain(export_dir, capsys):
    from modelpress.io import sha256_file
    assert main(["inspect", str(export_dir), "--verify"]) == 0
    out = capsys.readouterr().out
    calib = json.loads((export_dir / "calibration.json").read_text())["sha256"]
    for k, v in (("recipe", sha256_file(export_dir / "recipe.yaml")), ("calibration", calib),
                 ("weights", sha256_file(export_dir / "model.safetensors")),
                 ("export", sha256_file(export_dir / "checksums.json"))):
        assert f"{k}" in out and v in out


def _certified_recipe(tmp_path):
    text = tmp_path / "t.txt"
    text.write_text("\n\n".join(["the quick brown fox jumps over the lazy dog"] * 300))
    recipe = {"calibration": {"source": str(text), "samples": 8, "seqlen": 32},
              "evaluate": {"text": str(text), "seqlen": 32, "windows": 8},
              "certify": {"property": "agreement", "eps": 0.5, "delta": 0.05, "text": str(text),
                          "seqlen": 32, "windows": 40},
              "stages": [{"quantize": {"method": "gptq", "bits": 8, "group_size": 32}}]}
    import yaml
    (tmp_path / "r.yaml").write_text(yaml.safe_dump(recipe))
    return tmp_path / "r.yaml"


def test_certificate_is_tied_to_the_exact_bytes(tmp_path, capsys):
    m = tiny_model_dir(tmp_path / "m")
    out = tmp_path / "out"
    assert main(["compress", str(m), "--recipe", str(_certified_recipe(tmp_path)), "--out", str(out)]) == 0
    capsys.readouterr()
    assert main(["inspect", str(out), "--verify"]) == 0
    text = capsys.readouterr().out
    assert text.count("= certificate") == 3, text
    (out / "certificate.json").write_bytes(b"\xff\xfe{}")
    assert "certificate" in _one_line_error(capsys, ["inspect", str(out)])


# -- 3. every fault is a one-line error (exit 2) -----------------------------------------------------

BAD_UTF8 = b"stages:\n- quantize: {bits: 4}\n# \xff\xfe caf\xe9\n"

RTN = "stages:\n- quantize: {method: rtn, bits: 4, group_size: 32}\n"


def test_non_utf8_inputs_are_one_line(tmp_path, capsys):
    from modelpress.tabular.student import MLPStudent, export_onnx
    (tmp_path / "bad.yaml").write_bytes(BAD_UTF8)
    assert "not UTF-8" in _one_line_error(capsys, ["compress", "smollm2", "--recipe", str(tmp_path / "bad.yaml"),
                                                   "--out", str(tmp_path / "o")])
    m = tiny_model_dir(tmp_path / "m")
    assert "not UTF-8" in _one_line_error(capsys, ["deploy", str(m), "--device", str(tmp_path / "bad.yaml")])
    export_onnx(MLPStudent(2, 2, (4,)).eval(), 2, tmp_path / "t.onnx")
    spec = ["tabular", "distill", str(tmp_path / "t.onnx"), "--budget", "50", "--out", str(tmp_path / "o")]
    assert "not UTF-8" in _one_line_error(capsys, [*spec, "--spec", str(tmp_path / "bad.yaml")])
    (tmp_path / "s.yaml").write_text("features:\n- {name: a, range: [0, 1]}\n- {name: b, range: [0, 1]}\n")
    (tmp_path / "e.csv").write_bytes(b"a,b\n0.1,0.\xff\n")
    assert "not UTF-8" in _one_line_error(capsys, [*spec, "--spec", str(tmp_path / "s.yaml"),
                                                   "--eval", str(tmp_path / "e.csv")])
    (tmp_path / "t.txt").write_bytes(b"\xff\xfe\x00 x")
    assert "not UTF-8" in _one_line_error(capsys, ["eval", str(m), "--text", str(tmp_path / "t.txt")])


@pytest.mark.parametrize("argv,msg", [
    (["eval", "./no-such-model", "--windows", "-1"], "--windows -1"),
    (["eval", "./no-such-model", "--windows", "0"], "--windows 0"),
    (["eval", "./no-such-model", "--seqlen", "0"], "--seqlen 0"),
    (["deploy", "smollm2", "--bits", "-4"], "--bits -4"),
    (["deploy", "smollm2", "--context", "0"], "--context 0"),
])
def test_silently_wrong_values_are_refused_before_any_work(capsys, argv, msg):
    assert msg in _one_line_error(capsys, argv)


def test_report_out_existing_folder(tmp_path, capsys):
    (tmp_path / "r").mkdir()
    assert "is a folder" in _one_line_error(capsys, ["report", str(tmp_path), "--out", str(tmp_path / "r")])


def test_yaml_alias_bomb_is_refused_with_a_short_line(tmp_path, capsys):
    lines = ["a: &a [x, x, x, x, x, x, x, x, x]"]
    for i in range(1, 9):
        lines.append(f"{chr(97 + i)}: &{chr(97 + i)} [" + ", ".join([f"*{chr(96 + i)}"] * 9) + "]")
    lines.append("stages: [*i]")
    bomb = "\n".join(lines) + "\n"
    assert len(bomb) < 450
    (tmp_path / "bomb.yaml").write_text(bomb)
    line = _one_line_error(capsys, ["compress", "smollm2", "--recipe", str(tmp_path / "bomb.yaml"),
                                    "--out", str(tmp_path / "o")])
    assert "alias" in line
    m = tiny_model_dir(tmp_path / "m")
    assert "alias" in _one_line_error(capsys, ["deploy", str(m), "--device", str(tmp_path / "bomb.yaml")])


def test_error_lines_quote_a_short_excerpt(tmp_path, capsys):
    (tmp_path / "r.yaml").write_text("stages:\n- quantize: {method: " + "x" * 100000 + "}\n")
    line = _one_line_error(capsys, ["compress", "smollm2", "--recipe", str(tmp_path / "r.yaml"),
                                    "--out", str(tmp_path / "o")])
    assert "quantize.method" in line


def _compress_argv(tmp_path, out):
    (tmp_path / "rtn.yaml").write_text(RTN)
    return ["compress", str(tiny_model_dir(tmp_path / "m")), "--recipe", str(tmp_path / "rtn.yaml"),
            "--out", str(out), "--no-eval"]


def test_disk_full_and_read_only_output_are_one_line(tmp_path, capsys, monkeypatch):
    import errno

    import modelpress.io as mio
    from safetensors import SafetensorError
    argv = [*_compress_argv(tmp_path, tmp_path / "out"), "--in-memory"]    # (streamed: the real full disk below)

    def full(*a, **k):
        raise SafetensorError("Error while serializing: IoError(Os { code: 28, kind: StorageFull, "
                              "message: \"No space left on device\" }) (os error 28)")
    monkeypatch.setattr("safetensors.torch.save_file", full)     # modelpress.io imports it at call time
    assert "disk full" in _one_line_error(capsys, argv)
    monkeypatch.undo()

    def read_only(*a, **k):
        raise PermissionError(errno.EACCES, "Permission denied", str(tmp_path))
    monkeypatch.setattr(mio.tempfile, "mkdtemp", read_only)
    argv[argv.index("--out") + 1] = str(tmp_path / "out2")
    assert "Permission denied" in _one_line_error(capsys, argv)
    monkeypatch.undo()
    assert not (tmp_path / "out").exists() and not (tmp_path / "out2").exists()


def test_two_processes_fill_an_empty_cache_once(tmp_path):
    import subprocess
    import sys
    script = (
        "import sys, time\n"
        "from pathlib import Path\n"
        "from modelpress.model import cached_conversion\n"
        "out, log = Path(sys.argv[1]), Path(sys.argv[2])\n"
        "def convert(tmp):\n"
        "    with open(log, 'a') as f: f.write('converted\\n')\n"
        "    time.sleep(1.5)\n"
        "    (tmp / 'config.json').write_text('{}')\n"
        "print(cached_conversion(out, convert))\n")
    args = [sys.executable, "-c", script, str(tmp_path / "cache" / "ref"), str(tmp_path / "log")]
    procs = [subprocess.Popen(args, stdout=subprocess.PIPE, stderr=subprocess.PIPE) for _ in range(2)]
    res = [p.communicate(timeout=120) for p in procs]
    assert [p.returncode for p in procs] == [0, 0], res
    assert (tmp_path / "log").read_text() == "converted\n"
    assert (tmp_path / "cache" / "ref" / "config.json").exists()


# -- 4. validate before the expensive work ---------------------------------------------------------

@pytest.mark.parametrize("extra,msg", [
    (["--calib-samples", "0"], "calibration.samples"),
    (["--calib-seqlen", "1"], "calibration.seqlen"),
    (["--calib-select", "nope"], "calibration.select"),
])
def test_calibration_settings_checked_before_loading(tmp_path, capsys, extra, msg):
    (tmp_path / "g.yaml").write_text("stages:\n- quantize: {method: gptq, bits: 4}\n")
    line = _one_line_error(capsys, ["compress", str(tmp_path / "no-model"), "--recipe", str(tmp_path / "g.yaml"),
                                    "--out", str(tmp_path / "o"), *extra])
    assert msg in line


def test_out_and_texts_checked_before_loading(tmp_path, capsys):
    foreign = tmp_path / "foreign"
    foreign.mkdir()
    (foreign / "notes.txt").write_text("mine")
    (tmp_path / "g.yaml").write_text("calibration: {source: " + str(tmp_path / "missing.txt") + "}\n"
                                     "stages:\n- quantize: {method: gptq, bits: 4}\n")
    base = ["compress", str(tmp_path / "no-model"), "--recipe", str(tmp_path / "g.yaml")]   # the model is never loaded
    assert "not a modelpress export" in _one_line_error(capsys, [*base, "--out", str(foreign)])
    assert "missing.txt does not exist" in _one_line_error(capsys, [*base, "--out", str(tmp_path / "o")])
    assert (foreign / "notes.txt").read_text() == "mine" and not (tmp_path / "o.partial").exists()


def test_a_live_run_is_reported_running_with_its_pid(tmp_path, capsys):
    import subprocess
    import sys
    import time
    out = tmp_path / "out"
    holder = subprocess.Popen([sys.executable, "-c",
                               "import sys, time\nfrom modelpress.engine.checkpoint import RunLock\n"
                               f"lock = RunLock({str(out) + '.partial'!r}, {str(out)!r})\n"
                               "print('locked', flush=True)\ntime.sleep(60)\n"], stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "locked"
        line = _one_line_error(capsys, _compress_argv(tmp_path, out))
        assert "still writing" in line and f"pid {holder.pid}" in line and "interrupted" not in line
    finally:
        holder.kill()
        holder.wait()
    time.sleep(0.1)
    (tmp_path / f".{out.name}.tmp-leftover").mkdir()            # what a kill during export leaves
    (tmp_path / f".{out.name}.tmp-leftover" / "model.safetensors").write_bytes(b"x" * 100)
    capsys.readouterr()
    assert main(_compress_argv(tmp_path, out)) == 0                # the dead owner's lock is free again
    assert sorted(p.name for p in tmp_path.iterdir() if p.name.startswith(".")) == []
    assert not (tmp_path / "out.partial.lock").exists()


def test_resume_removes_temporaries_a_kill_left(tmp_path):
    from modelpress.engine.checkpoint import RunLock
    out = tmp_path / "out"
    part = tmp_path / "out.partial" / "stage0"
    part.mkdir(parents=True)
    (part / ".layer3.safetensors.abc123.tmp").write_bytes(b"half")
    (part / "layer2.safetensors").write_bytes(b"kept")
    (tmp_path / ".out.tmp-xyz").mkdir()
    lock = RunLock(tmp_path / "out.partial", out)
    assert not (part / ".layer3.safetensors.abc123.tmp").exists() and not (tmp_path / ".out.tmp-xyz").exists()
    assert (part / "layer2.safetensors").read_bytes() == b"kept"
    lock.release()


def test_compress_help_explains_calibration_options(capsys):
    with pytest.raises(SystemExit):
        main(["compress", "--help"])
    out = " ".join(capsys.readouterr().out.split())
    for flag in ("--calib-source", "--calib-select", "--calib-samples", "--calib-seqlen", "--calib-seed"):
        assert flag in out
    assert "number of calibration windows" in out and "tokens per calibration window" in out
    assert "wiki+novels" in out


# -- 5. long runs talk, also in logs ----------------------------------------------------------------

@pytest.mark.parametrize("how", ["layer-by-layer", "in-memory"])
def test_compress_with_stderr_to_a_file_logs_every_step(tmp_path, how):
    """A tiny GPTQ run with stderr a file (not a terminal): plain progress lines for load (in memory) or the
    layer-by-layer scoring of both models, calibration, each stage with layer i/N, evaluation and export."""
    import os
    import re
    import subprocess
    import sys
    m = tiny_model_dir(tmp_path / "m", layers=3)
    text = tmp_path / "t.txt"
    text.write_text("\n\n".join(["the quick brown fox jumps over the lazy dog"] * 300))
    (tmp_path / "r.yaml").write_text(
        f"calibration: {{source: {text}, samples: 4, seqlen: 32}}\n"
        f"evaluate: {{text: {text}, seqlen: 32, windows: 4}}\n"
        "stages:\n- quantize: {method: gptq, bits: 4, group_size: 32}\n")
    log = tmp_path / "run.log"
    env = {**os.environ, "MODELPRESS_PROGRESS_INTERVAL": "0"}
    with open(log, "w") as f:
        rc = subprocess.run([sys.executable, "-m", "modelpress.cli", "compress", str(m), "--recipe",
                             str(tmp_path / "r.yaml"), "--out", str(tmp_path / "out"),
                             "--in-memory" if how == "in-memory" else "--offload"],
                            stderr=f, stdout=subprocess.DEVNULL, env=env, timeout=300).returncode
    lines = log.read_text().splitlines()
    assert rc == 0, lines[-20:]
    assert any(re.search(r"GPTQ .*: 3/3, elapsed \d+ s$", x) for x in lines), lines
    assert any(re.search(r"GPTQ .*: 1/3, elapsed \d+ s, ETA", x) for x in lines), lines
    assert any(re.search(r"^evaluation batches: 2/2, elapsed \d+ s$", x) for x in lines), lines     # 4 windows, batch 2
    assert any(re.search(r"^original on .*: batches: 2/2, elapsed \d+ s$", x) for x in lines), lines
    steps = ("load ",) if how == "in-memory" else ("scoring the original on", "scoring the compressed model on")
    if how != "in-memory":
        assert any(re.search(r"^compressed on .*: layers: 3/3, elapsed \d+ s$", x) for x in lines), lines
    for label in (*steps, "calibration set", "stage 1/1: quantize", "evaluation", "export "):
        assert any(x.startswith(label) and x.endswith("...") for x in lines), (label, lines)
        assert any(x.startswith(label) and ": done in" in x for x in lines), (label, lines)


def test_step_reports_while_running(caplog, monkeypatch):
    import logging
    import time

    from modelpress.progress import step
    monkeypatch.setenv("MODELPRESS_PROGRESS_INTERVAL", "0.05")
    with caplog.at_level(logging.INFO, logger="modelpress"):
        with step("packing"):
            time.sleep(0.3)
    msgs = [r.getMessage() for r in caplog.records]
    assert msgs[0] == "packing ..." and msgs[-1].startswith("packing: done in")
    assert sum("still running" in x for x in msgs) >= 2


@pytest.mark.parametrize("fault", ["truncated", "header", "config"])
def test_broken_hf_folder_is_one_line(tmp_path, capsys, fault):
    m = tiny_model_dir(tmp_path / "m")
    w = m / "model.safetensors"
    if fault == "truncated":
        w.write_bytes(w.read_bytes()[:1000])
    elif fault == "header":
        data = w.read_bytes()
        w.write_bytes(data[:8] + b"{garbage" + data[16:])
    else:
        cfg = json.loads((m / "config.json").read_text())
        cfg.update(hidden_size=60, num_attention_heads=7)
        (m / "config.json").write_text(json.dumps(cfg))
    line = _one_line_error(capsys, ["eval", str(m), "--windows", "1"])
    # loaded whole ("cannot load model ...") or streamed from its shards (the file and the fix named)
    assert "cannot load model" in line or ("model.safetensors is not a readable safetensors file" in line
                                           and "restore or re-download" in line), line


@pytest.fixture
def tiny_fs(tmp_path):
    """A 64 kB tmpfs (root only; skipped where mounting is not allowed): smaller than the tiny model's export."""
    import subprocess
    mnt = tmp_path / "fs"
    mnt.mkdir()
    if subprocess.run(["mount", "-t", "tmpfs", "-o", "size=64k", "tmpfs", str(mnt)],
                      capture_output=True).returncode != 0:
        pytest.skip("cannot mount a tmpfs here")
    yield mnt
    subprocess.run(["umount", "-l", str(mnt)], capture_output=True)


def test_real_full_and_read_only_disks(tmp_path, capsys, tiny_fs):
    import subprocess
    for how in ("--in-memory", "--offload"):
        argv = [*_compress_argv(tmp_path, tiny_fs / "out"), how]
        assert "No space left on device" in _one_line_error(capsys, argv), how
        assert not [p for p in tiny_fs.iterdir() if ".tmp-" in p.name], how          # the half export is gone
        subprocess.run(["rm", "-rf", *map(str, tiny_fs.iterdir())], check=True)
    subprocess.run(["mount", "-o", "remount,ro", str(tiny_fs)], check=True)
    argv[argv.index("--out") + 1] = str(tiny_fs / "out2")
    assert "not writable" in _one_line_error(capsys, argv)


@pytest.mark.parametrize("name,content", [("tokenizer_config.json", b"{broken"), ("report.json", b'{"size": 5}')])
def test_consistently_edited_side_files_are_one_line(tmp_path, capsys, name, content):
    out = tmp_path / "out"
    assert main([*_compress_argv(tmp_path, out)]) == 0
    (out / name).write_bytes(content)
    _resum(out)
    cmd = ["inspect", str(out), "--verify"] if name.startswith("tokenizer") else ["inspect", str(out)]
    _one_line_error(capsys, cmd)
