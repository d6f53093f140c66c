"""Issue 25 (export size): 16-bit storage of unquantized tensors with exact reload, embedding/output
quantization (tied and untied), whole-artifact headline figures, mask-only sparsity, and a failed extra
export format that leaves the native export, the report and no .partial folder behind."""
import json

import pytest
import torch
from safetensors import safe_open

import modelpress as mp
from modelpress.errors import UserError
from modelpress.eval.size import headline, size_report
from modelpress.export.native import load_compressed, save
from modelpress.modules import QuantEmbedding, QuantLinear

from .conftest import correlated_calib, tiny_llama, tiny_model_dir

W4 = {"quantize": {"method": "rtn", "bits": 4, "group_size": 32}}


def _dtypes(folder):
    with safe_open(str(folder / "model.safetensors"), "pt") as f:
        return {k: f.get_slice(k).get_dtype() for k in f.keys()}


def _logits(m, ids):
    with torch.no_grad():
        return m(ids).logits


def test_unquantized_tensors_are_stored_16bit_and_reload_exactly(tmp_path, ids):
    m = tiny_llama()
    mp.compress(m, mp.Recipe.from_dict({"stages": [W4]}), None)
    before = size_report(m)
    save(m, None, tmp_path / "e")
    dt = _dtypes(tmp_path / "e")
    assert dt["model.embed_tokens.weight"] == "BF16" and dt["model.norm.weight"] == "BF16"
    assert dt["model.layers.0.self_attn.q_proj.scales"] == "F16"
    back, _ = load_compressed(tmp_path / "e")
    assert next(back.parameters()).dtype == torch.float32
    assert torch.equal(_logits(back, ids), _logits(m, ids))         # save rounded m in place: identical
    man = json.loads((tmp_path / "e" / "modelpress.json").read_text())
    assert man["storage"]["dtype"] == "bfloat16" and "model.embed_tokens.weight" in man["storage"]["upcast"]
    assert before["storage_dtype"] == "bfloat16"
    stored = before["compressed_bytes"]
    assert 0 < (tmp_path / "e" / "model.safetensors").stat().st_size - stored < 64 * 1024   # + header only


def test_float32_storage_when_asked(tmp_path, ids):
    m = tiny_llama()
    ref = _logits(m, ids)
    save(m, None, tmp_path / "e", dtype="float32")
    assert _dtypes(tmp_path / "e")["model.embed_tokens.weight"] == "F32"
    assert torch.equal(_logits(load_compressed(tmp_path / "e")[0], ids), ref)   # nothing rounded
    with pytest.raises(UserError, match="export.dtype"):
        mp.Recipe.from_dict({"stages": [W4], "export": {"dtype": "fp8"}})
    assert mp.Recipe.from_dict({"stages": [W4], "export": {"dtype": "float32"}}).export.dtype == "float32"


def test_16bit_model_keeps_its_own_dtype(tmp_path, ids):
    m = tiny_llama(dtype=torch.float16)
    save(m, None, tmp_path / "e")
    assert _dtypes(tmp_path / "e")["model.embed_tokens.weight"] == "F16"
    assert json.loads((tmp_path / "e" / "modelpress.json").read_text())["storage"]["upcast"] == []


@pytest.mark.parametrize("bits,group,sym", [(8, None, True), (4, 32, False), (6, 32, True)])
def test_tied_embedding_quantized_exactly_and_stays_tied(bits, group, sym, tmp_path, ids):
    m = tiny_llama(tie=True)
    emb = {"quantize_embedding": {"bits": bits, "group_size": group, "sym": sym}}
    stats = mp.compress(m, mp.Recipe.from_dict({"stages": [W4, emb]}), None)
    assert "tied" in stats[1]["summary"]
    e = m.get_input_embeddings()
    assert isinstance(e, QuantEmbedding) and m.lm_head.weight is e.weight
    n, d = e.weight.shape
    ng = 1 if group is None else d // group
    w = (e.q.float() - e.zero.float().repeat_interleave(d // ng, 1)) * e.scale.float().repeat_interleave(d // ng, 1)
    assert torch.equal(w, e.weight)                                      # weight = s (q - z) exactly
    save(m, None, tmp_path / "e")
    back, _ = load_compressed(tmp_path / "e")
    assert isinstance(back.get_input_embeddings(), QuantEmbedding)
    assert back.lm_head.weight is back.get_input_embeddings().weight
    assert torch.equal(_logits(back, ids), _logits(m, ids))
    man = json.loads((tmp_path / "e" / "modelpress.json").read_text())
    assert man["aliases"] == {"lm_head.weight": "model.embed_tokens.weight"}
    lay = size_report(m)["layers"]["model.embed_tokens"]
    assert lay["bits"] == pytest.approx(bits + (16 + (0 if sym else bits)) * ng / d)


def test_untied_output_projection_quantized_too(tmp_path, ids):
    m = tiny_llama(tie=False)
    mp.compress(m, mp.Recipe.from_dict({"stages": [{"quantize_embedding": {"bits": 8}}]}), None)
    assert isinstance(m.lm_head, QuantLinear) and m.lm_head.bits == 8
    save(m, None, tmp_path / "e")
    assert torch.equal(_logits(load_compressed(tmp_path / "e")[0], ids), _logits(m, ids))
    m2 = tiny_llama(tie=False)
    mp.compress(m2, mp.Recipe.from_dict({"stages": [{"quantize_embedding": {"bits": 8, "output": False}}]}), None)
    assert type(m2.lm_head) is torch.nn.Linear
    with pytest.raises(UserError, match="quantize_embedding.bits"):
        mp.Recipe.from_dict({"stages": [{"quantize_embedding": {"bits": 9}}]})


def test_headline_counts_the_whole_artifact():
    m = tiny_llama()
    full = size_report(m)
    assert full["vs_16bit"] == pytest.approx(1.0) and full["vs_fp32"] == pytest.approx(0.5)
    mp.compress(m, mp.Recipe.from_dict({"stages": [W4, {"quantize_embedding": {"bits": 8}}]}), None)
    r = size_report(m)
    assert r["compressed_bytes"] == r["vs_16bit"] * r["original_bytes"]
    assert r["vs_16bit"] < 0.45 and r["bits_per_param"] == pytest.approx(16 * r["vs_16bit"])
    line = headline({**r, "file_bytes": r["compressed_bytes"] + 1000})
    assert "x the 16-bit original" in line and "x the fp32 source" in line and "model.safetensors" in line


def test_quantize_only_reports_no_sparsity_prune_does(calib):
    m = tiny_llama()
    st = mp.compress(m, mp.Recipe.from_dict({"stages": [{"quantize": {"method": "rtn", "bits": 2, "group_size": 32}}]}), None)
    assert all("sparsity" not in v for v in st[0]["layers"].values())
    assert all("sparsity" not in v for v in size_report(m)["layers"].values())
    m = tiny_llama()
    st = mp.compress(m, mp.Recipe.from_dict({"stages": [{"prune": {"method": "wanda", "sparsity": 0.5}}, W4]}), calib)
    assert all(v["sparsity"] == pytest.approx(0.5) for v in st[1]["layers"].values())
    assert all(v["sparsity"] == pytest.approx(0.5) for v in size_report(m)["layers"].values())


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    return tiny_model_dir(tmp_path_factory.mktemp("size") / "model", hidden=96, inter=192)


def _recipe(stages, formats=("native", "compressed-tensors")):
    return mp.Recipe.from_dict({"stages": stages, "export": {"formats": list(formats)},
                                "evaluate": {"seqlen": 16, "windows": 2}, "calibration": {"samples": 4, "seqlen": 16}})


def test_run_recipe_headline_file_bytes_and_exports(model_dir, tmp_path, capsys, monkeypatch):
    from modelpress.cli.pipeline import print_report
    rep = mp.run_recipe(_recipe([{"quantize": {"method": "rtn", "bits": 4, "group_size": 64}},
                                 {"quantize_embedding": {"bits": 8}}]), str(model_dir), tmp_path / "o")
    out = tmp_path / "o"
    assert rep["size"]["file_bytes"] == (out / "model.safetensors").stat().st_size
    assert set(rep["exports"]) == {"native", "compressed-tensors"} and all("path" in e for e in rep["exports"].values())
    assert any("group 32" in n for n in rep["export_notes"])          # 96 inputs with g64: written as g32
    assert json.loads((out / "report.json").read_text())["exports"] == rep["exports"]
    from modelpress.export import verify
    verify(out)                                               # checksums rewritten with the report
    print_report(rep)
    printed = capsys.readouterr().out
    assert "x the 16-bit original" in printed and "sparsity" not in printed
    assert not list(tmp_path.glob("*.partial"))


def test_failed_extra_format_keeps_native_table_and_no_partial(model_dir, tmp_path, monkeypatch):
    import importlib
    ct = importlib.import_module("modelpress.export.compressed_tensors")
    from modelpress.cli.pipeline import failed_exports

    def boom(*a, **k):
        raise UserError("simulated failure")
    monkeypatch.setattr(ct, "save_compressed_tensors", boom)
    rep = mp.run_recipe(_recipe([{"quantize": {"method": "rtn", "bits": 4, "group_size": 32}}]), str(model_dir),
                        tmp_path / "o")
    assert failed_exports(rep) == ["compressed-tensors"] and "eval" in rep
    assert (tmp_path / "o" / "modelpress.json").exists() and not list(tmp_path.glob("*.partial"))
    from modelpress.report.build import build
    html = build([tmp_path / "o"], tmp_path / "r.html").read_text()
    assert "exported formats: native<" in html and "compressed-tensors export failed" in html


def test_constraints_checked_before_compression(model_dir, tmp_path, monkeypatch):
    import modelpress.api as api
    called = []
    monkeypatch.setattr(api, "compress", lambda *a, **k: called.append(1) or [])
    with pytest.raises(UserError, match="ragged last group"):           # 96 inputs, g40: no CT group fits
        mp.run_recipe(_recipe([{"quantize": {"method": "rtn", "bits": 4, "group_size": 40}}]), str(model_dir),
                      tmp_path / "o")
    with pytest.raises(UserError, match="cannot store the `lowrank`"):
        mp.run_recipe(_recipe([{"lowrank": {}}]), str(model_dir), tmp_path / "o")
    assert not called and not (tmp_path / "o").exists() and not list(tmp_path.glob("*.partial"))


def test_untied_output_layer_alone_by_rtn_and_calibrated_stages_refuse_it(tmp_path, ids, calib, caplog):
    """The export-size recipe for an untied output layer (Qwen2.5-Coder-0.5B): 8-bit embedding, the output
    layer alone by RTN w6 g64; it exports and reloads exactly. A calibrated stage (GPTQ) that matches lm_head
    says so instead of leaving it silently unquantized."""
    m = tiny_llama(tie=False)
    stages = [W4, {"quantize_embedding": {"bits": 8, "group_size": None, "output": False}},
              {"quantize": {"method": "rtn", "bits": 6, "group_size": 64, "observer": "mse", "include": ["lm_head"],
                            "exclude": []}}]
    mp.compress(m, mp.Recipe.from_dict({"stages": stages}), None)
    assert isinstance(m.lm_head, QuantLinear) and m.lm_head.bits == 6 and m.lm_head.group_size == 64
    assert isinstance(m.model.embed_tokens, QuantEmbedding) and m.model.embed_tokens.bits == 8
    save(m, None, tmp_path / "e")
    assert torch.equal(_logits(load_compressed(tmp_path / "e")[0], ids), _logits(m, ids))
    g = {"quantize": {"method": "gptq", "bits": 4, "group_size": 32, "include": ["lm_head"], "exclude": []}}
    with pytest.raises(UserError, match="lm_head matched but lies outside the decoder layers.*method rtn"):
        mp.compress(tiny_llama(tie=False), mp.Recipe.from_dict({"stages": [g]}), calib)
    m2 = tiny_llama(tie=False)                 # not named, only not excluded: skipped with a warning
    g["quantize"]["include"] = []
    with caplog.at_level("WARNING", logger="modelpress"):
        mp.compress(m2, mp.Recipe.from_dict({"stages": [g]}), calib)
    assert "left uncompressed (outside the decoder layers" in caplog.text and "lm_head" in caplog.text
    assert type(m2.lm_head) is torch.nn.Linear and isinstance(m2.model.layers[0].mlp.up_proj, QuantLinear)
