"""The second text domain (bundled public-domain novels) and the two-domain default evaluation."""
from __future__ import annotations

import pytest
import torch

import modelpress as mp
from modelpress.calib import sources
from modelpress.cli.pipeline import _domain, print_report

from .conftest import tiny_model_dir


def test_novels_split_is_frozen_and_author_disjoint():
    ev, cal = sources.texts("novels-eval", "eval"), sources.texts("novels", "calib")
    assert ev[0].startswith("It is a truth universally acknowledged")           # Pride and Prejudice
    assert cal[0].startswith("The Nellie, a cruising yawl")                      # Heart of Darkness first
    assert len(ev) == 1922 and len(cal) == 992 and not set(ev) & set(cal)
    assert all(len(p) > 40 and "\n" not in p and "\ufeff" not in p for p in ev + cal)
    assert sources.texts("novels", "eval") == ev and sources.texts("novels-calib") == cal
    assert sources.source_sha256("novels-eval") != sources.source_sha256("novels-calib")
    with pytest.raises(mp.UserError, match="split"):
        sources.novels_texts("test")


def test_novels_refuses_a_changed_file(tmp_path, monkeypatch):
    (tmp_path / "Austen, Jane - Pride and Prejudice.txt").write_text("not the book\n\nat all, really not the book")
    monkeypatch.setattr(sources, "novels_dir", lambda: tmp_path)
    with pytest.raises(mp.UserError, match="pinned text"):
        sources.texts("novels-eval")


def test_domain_labels():
    assert _domain("wiki-eval", "wiki") == " (in-domain)"
    assert _domain("novels-eval", "wiki") == " (off-domain)"
    assert _domain("novels-eval", "novels") == " (in-domain)"
    assert _domain("/a/b-c.txt", "/a/b-c.txt") == " (in-domain)" and _domain("/a/b-c.txt", "wiki") == " (off-domain)"
    assert _domain("wiki-eval", None) == ""
    assert _domain("wiki-eval", "wiki+novels") == _domain("novels-eval", "wiki+novels") == " (in-domain)"


def test_composite_source_draws_equal_shares_from_its_parts():
    """'wiki+novels' is the concatenation of the parts' own calibration sets (part i of k: samples
    (i+1)//k - samples i//k, same selector and seed), with its own provenance."""
    from .conftest import tiny_tokenizer
    tok = tiny_tokenizer()
    mix = mp.calibration_set(tok, "wiki+novels", samples=5, seqlen=16, seed=3)
    a = mp.calibration_set(tok, "wiki", samples=2, seqlen=16, seed=3)
    b = mp.calibration_set(tok, "novels", samples=3, seqlen=16, seed=3)
    assert mix.input_ids.shape == (5, 16)
    assert mix.input_ids.equal(torch.cat([a.input_ids, b.input_ids]))
    assert mix.provenance["source"] == "wiki+novels" and mix.provenance["samples"] == 5
    assert mix.provenance["source_sha256"] not in (a.provenance["source_sha256"], b.provenance["source_sha256"])
    assert sources.texts("wiki+novels") == sources.texts("wiki") + sources.texts("novels")
    with pytest.raises(mp.UserError, match="at least 2 samples"):
        mp.calibration_set(tok, "wiki+novels", samples=1, seqlen=16)
    with pytest.raises(mp.UserError, match="empty part"):
        sources.texts("wiki+")


def test_default_evaluation_reports_both_domains(one_thread, tmp_path, capsys):
    model_dir = tiny_model_dir(tmp_path / "model")
    (tmp_path / "t.txt").write_text("\n\n".join(["the quick brown fox jumps over the lazy dog"] * 200))
    base = {"calibration": {"source": str(tmp_path / "t.txt"), "samples": 4, "seqlen": 32},
            "evaluate": {"seqlen": 32, "windows": 3},
            "stages": [{"quantize": {"method": "rtn", "bits": 3, "group_size": 32}}]}
    rep = mp.run_recipe(mp.Recipe.from_dict(base), str(model_dir), tmp_path / "two")
    ev = rep["eval"]
    assert ev["text"] == "wiki-eval" and ev["off_domain"]["text"] == "novels-eval"
    off = ev["off_domain"]
    assert off["compressed"]["tokens"] == 3 * 31 and off["compressed"]["kl"] > 0
    assert off["original"]["perplexity"] != ev["original"]["perplexity"]
    # the single-domain numbers of before are reproducible: `off_domain: null`
    one = {**base, "evaluate": {**base["evaluate"], "off_domain": None}}
    rep1 = mp.run_recipe(mp.Recipe.from_dict(one), str(model_dir), tmp_path / "one")
    assert "off_domain" not in rep1["eval"]
    for k in ("perplexity", "agreement", "kl"):
        assert rep1["eval"]["compressed"][k] == ev["compressed"][k]
    # and off-domain alone equals the same text evaluated as the main one
    nov = {**base, "evaluate": {**base["evaluate"], "text": "novels-eval", "off_domain": None}}
    rep2 = mp.run_recipe(mp.Recipe.from_dict(nov), str(model_dir), tmp_path / "nov")
    assert rep2["eval"]["compressed"]["kl"] == off["compressed"]["kl"]
    capsys.readouterr()
    print_report(rep)
    out = capsys.readouterr().out
    assert "perplexity, wiki-eval (off-domain)" in out and "perplexity, novels-eval (off-domain)" in out


def test_cli_calib_source_overrides_the_recipe(one_thread, tmp_path):
    """compress --calib-source A+B: the run calibrates on the composite source (calibration.json records it and
    its ids are the parts' own sets, concatenated)."""
    import json

    from modelpress.cli import main
    model_dir = tiny_model_dir(tmp_path / "model")
    a, b = tmp_path / "a.txt", tmp_path / "b.txt"
    a.write_text("\n\n".join(["the quick brown fox jumps over the lazy dog"] * 50))
    b.write_text("\n\n".join(["it is a truth universally acknowledged that compression keeps"] * 50))
    (tmp_path / "r.yaml").write_text(
        f"calibration: {{source: {a}, samples: 2, seqlen: 16}}\n"
        "stages:\n  - prune: {method: wanda, sparsity: 0.5}\n")
    assert main(["compress", str(model_dir), "--recipe", str(tmp_path / "r.yaml"), "--out", str(tmp_path / "o"),
                 "--calib-source", f"{a}+{b}", "--calib-samples", "4", "--no-eval", "--in-memory"]) == 0
    prov = json.loads((tmp_path / "o" / "calibration.json").read_text())
    _, tok = mp.load(model_dir)
    want = mp.calibration_set(tok, f"{a}+{b}", samples=4, seqlen=16)
    assert prov["source"] == f"{a}+{b}" and prov["samples"] == 4 and prov["sha256"] == want.sha256()
