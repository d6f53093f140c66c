"""SimCert certificates: semantics, i.i.d. unit, coverage, MLP range, JSON, tampering, CLI."""
import copy
import json

import numpy as np
import pytest
import torch
from torch import nn

from modelpress.certify import bounds as B
from modelpress.certify import certificate as C
from modelpress.errors import UserError
from modelpress.eval import compare

DELTA = 0.05


@pytest.fixture(scope="module")
def tiny_lm():
    from transformers import LlamaConfig, LlamaForCausalLM
    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=40, hidden_size=16, intermediate_size=32, num_hidden_layers=1,
                      num_attention_heads=2, num_key_value_heads=2, max_position_embeddings=64)
    f = LlamaForCausalLM(cfg).eval()
    g = copy.deepcopy(f)
    with torch.no_grad():
        for p in g.model.layers[0].parameters():
            if p.ndim == 2:
                p.copy_(torch.round(p / 0.05) * 0.05)  # coarse grid: some top-1 flips
    windows = torch.randint(0, 40, (24, 12), generator=torch.Generator().manual_seed(1))
    return f, g, windows


def _per_token(rate: float, n: int, T: int, rng) -> dict:
    agree = torch.as_tensor(rng.random((n, T)) >= rate)
    return {"agree": agree, "kl": torch.as_tensor(rng.random((n, T)) * 0.2), "linf": torch.as_tensor(rng.random((n, T)))}


def test_windows_are_the_iid_unit_and_bounds_match_the_estimators():
    rng = np.random.default_rng(0)
    pt = _per_token(0.1, 50, 30, rng)
    cert = C.certificate_from_tokens(pt, "agreement", eps=0.2, delta=DELTA, seed=3)
    assert cert.n_samples == 50 and cert.n_tokens == 1500 and "window" in cert.iid_unit
    # recompute the two estimators by hand at delta / 2 each
    v = (~pt["agree"]).double().numpy()
    pick = np.random.default_rng(3).integers(0, 30, size=50)
    cp = B.clopper_pearson_upper(int(v[np.arange(50), pick].sum()), 50, DELTA / 3)
    ho = B.hoeffding_upper(v.mean(1), DELTA / 3, 0, 1)
    eb = B.bernstein_upper(v.mean(1), DELTA / 3, 0, 1)
    assert cert.bound == pytest.approx(min(cp, ho, eb))
    assert cert.observed == pytest.approx(v.mean())
    assert cert.passed == (cert.bound <= 0.2) and cert.threshold == 0.2
    hf = C.certificate_from_tokens(pt, "agreement", eps=0.2, delta=DELTA, method="hoeffding")
    assert hf.bound == pytest.approx(B.hoeffding_upper(v.mean(1), DELTA, 0, 1))


def test_windowed_certificate_covers_the_true_rate():
    # tokens inside a window are correlated (a per-window rate drawn from Beta), windows i.i.d.
    rate, miss = 0.08, 0
    for t in range(1000):
        rng = np.random.default_rng(t)
        p_w = rng.beta(0.8, 0.8 * (1 - rate) / rate, size=(40, 1))  # E = rate
        pt = {"agree": torch.as_tensor(rng.random((40, 20)) >= p_w)}
        miss += C.certificate_from_tokens(pt, "agreement", eps=0.5, delta=DELTA, seed=t).bound < rate
    assert miss / 1000 <= DELTA


def test_property_semantics_and_errors():
    rng = np.random.default_rng(1)
    pt = _per_token(0.0, 20, 10, rng)
    kl = C.certificate_from_tokens(pt, "kl", eps=0.5, delta=DELTA)
    assert kl.stat == "mean" and kl.range == [0.0, C.DEFAULT_KL_CLIP] and kl.method in ("hoeffding", "bernstein")
    assert kl.observed == pytest.approx(float(pt["kl"].double().mean()))
    li = C.certificate_from_tokens(pt, "linf", eps=0.9, delta=DELTA, threshold=0.3)
    assert li.observed == pytest.approx(float((pt["linf"] > 0.9).double().mean()))
    with pytest.raises(UserError, match="threshold"):
        C.certificate_from_tokens(pt, "linf", eps=0.9, delta=DELTA)
    with pytest.raises(UserError, match="property"):
        C.certificate_from_tokens(pt, "bleu", eps=0.9, delta=DELTA)
    with pytest.raises(UserError, match="delta"):
        C.certificate_from_tokens(pt, "agreement", eps=0.1, delta=0)
    with pytest.raises(UserError, match="clopper-pearson"):
        C.certificate_from_tokens(pt, "kl", eps=0.1, delta=DELTA, method="clopper-pearson")


def test_certify_llm_identical_and_compressed(tiny_lm):
    f, g, windows = tiny_lm
    same = C.certify(f, copy.deepcopy(f), windows, "agreement", eps=0.01, delta=DELTA)
    assert same.bound == 0.0 and same.passed and same.hashes["original_model"] == same.hashes["compressed_model"]
    cert = C.certify(f, g, windows, "agreement", eps=0.5, delta=DELTA)
    from modelpress.eval import compare
    pt = compare(f, g, windows)["per_token"]
    assert cert.observed == pytest.approx(1 - float(pt["agree"].float().mean()))
    assert cert.n_samples == 24 and cert.n_tokens == 24 * 11
    assert cert.observed <= cert.bound <= 1.0 and cert.bound > 0
    assert cert.hashes["original_model"] != cert.hashes["compressed_model"]
    fail = C.certify(f, g, windows, "agreement", eps=0.0, delta=DELTA)
    assert not fail.passed


def test_sequential_stops_once_decided(tiny_lm):
    f, g, windows = tiny_lm
    many = windows.repeat(6, 1)  # 144 windows
    # kl mean far below a loose eps: decided at an early checkpoint
    cert = C.certify(f, g, many, "kl", eps=0.9, delta=DELTA, sequential=True, n_min=8)
    assert cert.passed and cert.sequential["decided"] and cert.n_samples < 144
    assert cert.sequential["checkpoints"][0]["delta"] == pytest.approx(DELTA / len(B.geometric_schedule(8, 144)))


def test_mlp_certificate_uses_the_interval_range():
    torch.manual_seed(0)
    f = nn.Sequential(nn.Linear(4, 16), nn.ReLU(), nn.Linear(16, 2)).eval()
    g = copy.deepcopy(f)
    with torch.no_grad():
        for m in g:
            if isinstance(m, nn.Linear):
                m.weight.copy_(torch.round(m.weight / 0.02) * 0.02)
    lo, hi = -torch.ones(4), torch.ones(4)
    X = torch.rand(500, 4, generator=torch.Generator().manual_seed(2)) * 2 - 1
    mean = C.certify_mlp(f, g, X, lo, hi, eps=0.05, delta=DELTA, stat="mean", method="bernstein")
    R = mean.deterministic["R"]
    assert mean.range == [0.0, R] and 0 < R < 1
    hoe = C.certify_mlp(f, g, X, lo, hi, eps=0.05, delta=DELTA, stat="mean", method="hoeffding")
    assert mean.bound < hoe.bound  # low variance: Bernstein is tighter
    # rate below the interval range is decided without sampling error
    det = C.certify_mlp(f, g, X, lo, hi, eps=R, delta=DELTA, threshold=0.0)
    assert det.bound == 0.0 and det.passed and "interval" in det.method
    same = C.certify_mlp(f, copy.deepcopy(f), X, lo, hi, eps=0.0, delta=DELTA, stat="mean")
    assert same.bound == 0.0 and same.range == [0.0, 0.0]
    with pytest.raises(UserError, match="outside"):
        C.certify_mlp(f, g, X * 2, lo, hi, eps=0.1, delta=DELTA, stat="mean")


def test_save_verify_and_tampering(tmp_path):
    rng = np.random.default_rng(2)
    cert = C.certificate_from_tokens(_per_token(0.05, 30, 10, rng), "agreement", eps=0.3, delta=DELTA)
    (tmp_path / "model.safetensors").write_bytes(b"\x00" * 64)
    (tmp_path / "recipe.yaml").write_text("stages: []\n")
    with pytest.raises(UserError, match="does not exist"):
        C.save(cert, tmp_path / "nope")
    C.save(cert, tmp_path)
    C.verify(tmp_path)
    d = json.loads((tmp_path / "certificate.json").read_text())
    assert d["property"] == "agreement" and d["confidence"] == pytest.approx(0.95)
    assert set(d["artifacts"]) == {"model.safetensors", "recipe.yaml"}
    assert {"torch", "scipy", "python"} <= set(d["versions"])
    # tamper with a weight byte
    (tmp_path / "model.safetensors").write_bytes(b"\x00" * 63 + b"\x01")
    with pytest.raises(UserError, match="model.safetensors"):
        C.verify(tmp_path)
    (tmp_path / "model.safetensors").write_bytes(b"\x00" * 64)
    C.verify(tmp_path)
    # tamper with the certificate itself
    d["bound"], d["passed"] = 0.0, True
    (tmp_path / "certificate.json").write_text(json.dumps(d))
    with pytest.raises(UserError, match="modified"):
        C.verify(tmp_path)
    C.save(cert, tmp_path)
    (tmp_path / "extra.safetensors").write_bytes(b"1")
    with pytest.raises(UserError, match="not covered"):
        C.verify(tmp_path)
    (tmp_path / "extra.safetensors").unlink()
    (tmp_path / "recipe.yaml").unlink()
    with pytest.raises(UserError, match="missing"):
        C.verify(tmp_path)


def test_cli_exit_codes_and_export(tiny_lm, tmp_path, monkeypatch):
    import argparse

    from modelpress import api
    from modelpress.cli import certify as cli
    f, g, _ = tiny_lm
    export = tmp_path / "exp"
    export.mkdir()
    (export / "modelpress.json").write_text("{}")
    (export / "recipe.yaml").write_text("stages: []\n")
    models = {"orig": f, str(export): g}

    class Tok:
        def __call__(self, text, add_special_tokens=False):
            return {"input_ids": [ord(c) % 40 for c in text]}

    monkeypatch.setattr(api, "load", lambda src, *a, **k: (models[str(src)], Tok()))
    text = tmp_path / "eval.txt"
    text.write_text("\n\n".join(f"paragraph {i} with some words to score" for i in range(40)))
    p = argparse.ArgumentParser()
    sub = p.add_subparsers(dest="cmd")
    assert cli.add_parser(sub) == ["certify"]
    base = ["certify", "orig", str(export), "--text", str(text), "--seqlen", "16", "--windows", "20",
            "--delta", "0.05"]
    assert cli.run(p.parse_args(base + ["--property", "agreement", "--eps", "0.0"])) == 1
    assert cli.run(p.parse_args(base + ["--property", "kl", "--eps", "1.0"])) == 0
    C.verify(export)
    saved = C.load(export)
    assert saved.property == "kl" and saved.passed and saved.n_samples == 20
    assert saved.hashes["recipe"] == __import__("hashlib").sha256(b"stages: []\n").hexdigest()
    with pytest.raises(UserError, match="does not exist"):
        cli.run(p.parse_args(base[:3] + ["--text", str(tmp_path / "none.txt"), "--property", "kl", "--eps", "1",
                                          "--delta", "0.05"]))
    with pytest.raises(UserError, match="threshold"):
        cli.run(p.parse_args(base + ["--property", "linf", "--eps", "1.0", "--no-save"]))


def test_recipe_block(tiny_lm, tmp_path):
    f, g, _ = tiny_lm

    class Tok:
        def __call__(self, text, add_special_tokens=False):
            return {"input_ids": [ord(c) % 40 for c in text]}

    text = tmp_path / "eval.txt"
    text.write_text("\n\n".join(f"paragraph {i} with some words to score" for i in range(40)))
    block = {"property": "kl", "eps": 1.0, "delta": 0.05, "text": str(text), "seqlen": 16, "windows": 10}
    cert = C.certify_recipe_block(block, f, g, Tok(), recipe={"stages": []})
    assert cert.passed and cert.n_samples == 10 and cert.hashes["recipe"] is not None
    assert "position" in cert.iid_unit and cert.n_tokens == 10           # default: i.i.d. random positions
    win = C.certify_recipe_block({**block, "unit": "window"}, f, g, Tok())
    assert "window" in win.iid_unit and win.n_tokens == 10 * 15
    with pytest.raises(UserError, match="certify.epsilon"):
        C.certify_recipe_block({**block, "epsilon": 1}, f, g, Tok())
    with pytest.raises(UserError, match="certify.delta"):
        C.certify_recipe_block({k: v for k, v in block.items() if k != "delta"}, f, g, Tok())
    with pytest.raises(UserError, match="certify.windows must be an integer"):
        C.certify_recipe_block({**block, "windows": "ten"}, f, g, Tok())


def test_sample_positions_are_iid_uniform_over_the_whole_corpus():
    class Tok:                                      # token id = running index: positions are readable
        def __init__(self):
            self.k = 0

        def __call__(self, text, add_special_tokens=False):
            ids = list(range(self.k, self.k + len(text)))
            self.k += len(text)
            return {"input_ids": ids}

    texts = ["x" * 48, "y" * 50]                   # joined with "\n\n": 100 tokens, ids 0..99
    rows = C.sample_positions(Tok(), texts, 20000, context=10, seed=3)
    assert rows.shape == (20000, 11)
    p = rows[:, -1]
    assert torch.equal(rows, p[:, None] - 10 + torch.arange(11)[None, :])   # contiguous left context
    counts = torch.bincount(p, minlength=100)
    assert counts[:10].sum() == 0 and (counts[10:] > 0).all()                # every eligible position, tail too
    assert counts[10:].float().std() / counts[10:].float().mean() < 0.1        # uniform: 222 expected per position
    assert torch.equal(rows[:50], C.sample_positions(Tok(), texts, 50, 10, seed=3))
    assert not torch.equal(rows[:50], C.sample_positions(Tok(), texts, 50, 10, seed=4))
    with pytest.raises(UserError, match="context"):
        C.sample_positions(Tok(), texts, 5, context=200)


def test_position_certificates_use_one_prediction_per_sample(tiny_lm):
    f, g, _ = tiny_lm
    stream = torch.randint(0, 40, (2000,), generator=torch.Generator().manual_seed(5))

    class Tok:
        def __call__(self, text, add_special_tokens=False):
            return {"input_ids": stream.tolist() if text.startswith("corpus") else []}

    rows = C.sample_positions(Tok(), ["corpus"], 60, context=12, seed=0)
    cert = C.certify(f, g, rows, "agreement", eps=0.5, delta=DELTA, unit="position")
    assert cert.n_samples == 60 and cert.n_tokens == 60 and "position" in cert.iid_unit
    last = (~compare(f, g, rows)["per_token"]["agree"].bool())[:, -1].double()
    assert cert.observed == pytest.approx(float(last.mean()))
    win = C.certify(f, g, rows, "agreement", eps=0.5, delta=DELTA, unit="window")
    assert win.n_tokens == 60 * 12 and "assumed" in win.iid_unit          # 13 tokens: 12 predictions
    with pytest.raises(UserError, match="unit"):
        C.certify(f, g, rows, "agreement", eps=0.5, delta=DELTA, unit="token")
