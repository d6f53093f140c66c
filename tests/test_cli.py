"""Every user mistake gives one line naming the fix, exit code 2, no traceback."""
import pytest

from modelpress.cli import main


def _err(capsys, argv):
    code = main(argv)
    err = capsys.readouterr().err.strip()
    assert code == 2
    assert err.startswith("modelpress: error: ") and "\n" not in err and "Traceback" not in err
    return err


def test_missing_recipe_file(capsys, tmp_path):
    assert "does not exist" in _err(capsys, ["compress", "smollm2", "--recipe", str(tmp_path / "no.yaml"), "--out", str(tmp_path / "o")])


def test_bad_yaml(capsys, tmp_path):
    p = tmp_path / "r.yaml"
    p.write_text("stages: [quantize: {bits: 4\n")
    assert "not valid YAML" in _err(capsys, ["compress", "smollm2", "--recipe", str(p), "--out", str(tmp_path / "o")])


def test_unknown_stage_and_out_of_range(capsys, tmp_path):
    p = tmp_path / "r.yaml"
    p.write_text("stages:\n  - squeeze: {}\n")
    assert "unknown stage 'squeeze'" in _err(capsys, ["compress", "x", "--recipe", str(p), "--out", str(tmp_path / "o")])
    p.write_text("stages:\n  - prune: {sparsity: 1.5}\n")
    assert "prune.sparsity must be a number in [0.0, 1.0)" in _err(capsys, ["compress", "x", "--recipe", str(p), "--out", str(tmp_path / "o")])


def test_missing_model(capsys, tmp_path):
    p = tmp_path / "r.yaml"
    p.write_text("stages:\n  - quantize: {method: rtn}\n")
    err = _err(capsys, ["compress", str(tmp_path / "nomodel.gguf"), "--recipe", str(p), "--out", str(tmp_path / "o")])
    assert "does not exist" in err


def test_unsupported_model(capsys, tmp_path):
    d = tmp_path / "m"
    d.mkdir()
    (d / "config.json").write_text('{"model_type": "resnet"}')
    assert "cannot load model" in _err(capsys, ["eval", str(d)])


def test_folder_without_config(capsys, tmp_path):
    assert "has no config.json" in _err(capsys, ["eval", str(tmp_path)])


def test_inspect_non_export(capsys, tmp_path):
    assert "not a modelpress export" in _err(capsys, ["inspect", str(tmp_path)])


def test_help_imports_no_torch():
    """`modelpress --help` and every subcommand's parser are built without torch, transformers or numpy
    (the command must start fast: BENCHMARKS.md "CLI start-up")."""
    import subprocess
    import sys
    code = ("import sys, modelpress.cli as c; c.parser(); "
            "print(sorted({m.split('.')[0] for m in sys.modules} & {'torch', 'transformers', 'numpy', 'safetensors'}))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout.strip()
    assert out == "[]"


def test_plan_allocator_names_match_the_registry():
    from modelpress.cli.plan import ALLOCATOR_NAMES
    from modelpress.plan.budget import ALLOCATORS
    assert ALLOCATOR_NAMES == tuple(ALLOCATORS)


def test_public_names_stay_functions():
    import modelpress
    import modelpress.certify.certificate  # noqa: F401  (binding a subpackage must not shadow the verb)
    import modelpress.export.native  # noqa: F401
    assert callable(modelpress.export) and modelpress.export.__name__ == "save"
    assert callable(modelpress.certify) and modelpress.certify.__name__ == "certify"
    assert modelpress.Recipe.__name__ == "Recipe" and set(modelpress.__all__) >= {"load", "compress", "evaluate"}
