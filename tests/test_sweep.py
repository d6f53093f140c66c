"""Recipe sweeps: local executor, and the same jobs on a local Ray instance give the same rows."""
import json

import pytest

import argparse

from modelpress.cli import sweep as sweep_cli
from modelpress.errors import UserError
from modelpress.sweep import plan, sweep

from .conftest import tiny_model_dir

RECIPES = {
    "w4": "stages:\n  - quantize: {method: rtn, bits: 4, group_size: 32}\n",
    "w8": "stages:\n  - quantize: {method: rtn, bits: 8, group_size: 32}\n",
}


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    d = tmp_path_factory.mktemp("sweep")
    text = d / "eval.txt"
    text.write_text("the quick brown fox jumps over the lazy dog. compression keeps what matters.\n\n" * 50)
    paths = []
    for name, body in RECIPES.items():
        p = d / f"{name}.yaml"
        p.write_text(body + f"evaluate: {{text: {text}, seqlen: 32, windows: 4}}\n")
        paths.append(str(p))
    return str(tiny_model_dir(d / "m")), paths


def test_local_sweep_cli(setup, tmp_path, capsys):
    model, recipes = setup
    p = argparse.ArgumentParser()
    sweep_cli.add_parser(p.add_subparsers(dest="cmd"))      # the plugin's own parser (as modelpress.cli wires it)
    a = p.parse_args(["sweep", *recipes, "--model", model, "--out", str(tmp_path / "s"), "--seeds", "0,1"])
    assert sweep_cli.run(a) == 0
    rows = json.loads((tmp_path / "s" / "sweep.json").read_text())["jobs"]
    assert [(r["out"].rsplit("/", 1)[1], r["status"]) for r in rows] == \
        [("w4-seed0", "ok"), ("w4-seed1", "ok"), ("w8-seed0", "ok"), ("w8-seed1", "ok")]
    w4, w8 = rows[0], rows[2]
    assert 4.0 < w4["bits_per_weight"] < 5.0 and 8.0 < w8["bits_per_weight"] < 9.0
    assert w8["agreement"] >= w4["agreement"] and w8["kl"] < w4["kl"]      # more bits, closer to the original
    assert (tmp_path / "s" / "w8-seed1" / "modelpress.json").exists()
    assert "w8 seed 1: 8.5" in capsys.readouterr().out


def test_plan_validates_and_bad_executor(setup, tmp_path):
    _, recipes = setup
    assert len(plan(recipes, [0, 1, 2], tmp_path)) == 6
    with pytest.raises(UserError, match="does not exist"):
        plan(recipes + ["no-such-recipe"], [0], tmp_path)
    with pytest.raises(UserError, match="--executor"):
        sweep(recipes, None, tmp_path / "x", executor="dask")


@pytest.mark.slow          # starting a local Ray instance takes ~20-90 s on the shared 2-core machine
def test_ray_executor_matches_local(setup, tmp_path):
    ray = pytest.importorskip("ray")
    model, recipes = setup
    local = sweep(recipes[:1], model, tmp_path / "local", seeds=[0])
    ray.init(num_cpus=1, include_dashboard=False, log_to_driver=False)
    try:
        remote = sweep(recipes[:1], model, tmp_path / "ray", seeds=[0], executor="ray")
    finally:
        ray.shutdown()
    keys = ("status", "bits_per_weight", "compressed_bytes", "perplexity", "agreement", "kl")
    assert [{k: r[k] for k in keys} for r in remote] == [{k: r[k] for k in keys} for r in local]
    assert json.loads((tmp_path / "ray" / "sweep.json").read_text())["executor"] == "ray"
