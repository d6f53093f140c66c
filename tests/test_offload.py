"""Disk offload: compressing layer by layer from safetensors shards gives the same model as the
in-memory path, exported by streaming in the native format."""

import pytest
import torch

import modelpress as mp
from modelpress.errors import UserError
from modelpress.export import load_compressed
from modelpress.engine.offload import compress_offloaded, export_offloaded, run_recipe_offloaded

from .conftest import correlated_calib, tiny_model_dir

CASES = {
    "gptq-w4g32": [{"quantize": {"method": "gptq", "bits": 4, "group_size": 32}}],
    "rtn-w4g32": [{"quantize": {"method": "rtn", "bits": 4, "group_size": 32, "sym": False}}],
    "magnitude-then-gptq": [{"prune": {"method": "magnitude", "sparsity": 0.5}},
                            {"quantize": {"method": "gptq", "bits": 4, "group_size": 32}}],
    "magnitude-then-rtn-with-lm_head": [{"prune": {"method": "magnitude", "sparsity": 0.5}},
                                        {"quantize": {"method": "rtn", "bits": 4, "group_size": 32, "exclude": []}}],
    "rtn-lm_head-then-magnitude": [{"quantize": {"method": "rtn", "bits": 8, "group_size": 32, "exclude": []}},
                                   {"prune": {"method": "magnitude", "sparsity": 0.25, "exclude": []}}],
    "rtn-then-sparsegpt": [{"quantize": {"method": "rtn", "bits": 4, "group_size": 32}},
                           {"prune": {"method": "sparsegpt", "sparsity": 0.5}}],
    "gptq-layer-0-only": [{"quantize": {"method": "gptq", "bits": 8, "group_size": None,
                                        "include": [r"layers\.0\."]}}],
}


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    return tiny_model_dir(tmp_path_factory.mktemp("off") / "m", layers=2)


@pytest.mark.parametrize("case", list(CASES))
def test_offload_equals_in_memory(case, model_dir, tmp_path):
    recipe = mp.Recipe.from_dict({"stages": CASES[case]})
    calib = correlated_calib(n=8, seqlen=32)
    ref, tok = mp.load(model_dir)
    mp.compress(ref, recipe, calib)
    skel, store, stats = compress_offloaded(model_dir, recipe, calib, tmp_path / "work")
    if store.layers is not None:                  # calibrated: a meta skeleton, nothing left resident
        assert all(p.is_meta for layer in store.layers for p in layer.parameters())
    else:                                         # calibration-free: no model built at all
        assert not isinstance(skel, torch.nn.Module)
    out = export_offloaded(skel, store, tok, tmp_path / "out")
    back, _ = load_compressed(out)
    ids = calib.input_ids[:2]
    with torch.no_grad():
        assert torch.equal(back(ids).logits, ref(ids).logits)
    assert [type(m).__name__ for m in back.modules()] == [type(m).__name__ for m in ref.modules()]
    if case == "gptq-layer-0-only":             # untouched layers stream straight from the shards
        assert type(back.model.layers[1].mlp.down_proj).__name__ == "Linear"


def test_run_recipe_offloaded_and_refusals(model_dir, tmp_path):
    text = tmp_path / "t.txt"
    text.write_text("the quick brown fox jumps over the lazy dog. compression keeps what matters.\n\n" * 200)
    recipe = mp.Recipe.from_dict({"calibration": {"source": str(text), "samples": 4, "seqlen": 32},
                                  "stages": [{"quantize": {"method": "gptq", "bits": 4, "group_size": 32}}]})
    rep = run_recipe_offloaded(recipe, model_dir, tmp_path / "out")
    assert rep["offload"] and "quantize" in rep["stages"][0]["summary"]
    m, tok = mp.load(tmp_path / "out")            # an ordinary export: checksums verified
    assert type(m.model.layers[0].self_attn.q_proj).__name__ == "QuantLinear"
    assert not (tmp_path / "out.offload").exists()
    with pytest.raises(UserError, match="cannot run with --offload"):
        run_recipe_offloaded(mp.Recipe.from_dict({"stages": [{"lowrank": {}}]}), model_dir, tmp_path / "o2")
    with pytest.raises(UserError, match="budget"):
        run_recipe_offloaded(mp.Recipe.from_dict({"stages": [{"prune": {"method": "magnitude", "budget": "owl"}}]}),
                             model_dir, tmp_path / "o3")


def test_cli_offload(model_dir, tmp_path, capsys):
    from modelpress.cli import main
    recipe = tmp_path / "r.yaml"
    recipe.write_text("stages:\n  - quantize: {method: rtn, bits: 4, group_size: 32}\n")
    assert main(["compress", str(model_dir), "--recipe", str(recipe), "--out", str(tmp_path / "o"), "--offload"]) == 0
    assert "offloaded" in capsys.readouterr().out
    m, _ = mp.load(tmp_path / "o")
    assert type(m.model.layers[1].mlp.up_proj).__name__ == "QuantLinear"


@pytest.mark.parametrize("sym,group_size,observer,bias", [(True, 32, "minmax", False), (False, 48, "minmax", True),
                                                          (False, None, "mse", False), (True, 128, "minmax", True)])
def test_rtn_row_chunks_equal_whole_matrix(sym, group_size, observer, bias, tmp_path, monkeypatch):
    """Streamed RTN (rows read 8 at a time; 72 columns, so 48-wide groups end in a partial one) writes the
    very bytes of QuantLinear.to_state and the SQNR of the whole-matrix computation."""
    from safetensors.torch import save_file

    from modelpress.engine import offload as O
    from modelpress.algos import quant
    from modelpress.modules import QuantLinear
    from modelpress.stages.quantize import Quantize
    monkeypatch.setattr("modelpress.engine.shards.CHUNK_BYTES", 8 * 72 * 4)
    g = torch.Generator().manual_seed(3)
    lin = torch.nn.Linear(72, 44, bias=bias)                # 44 rows: 5 full chunks + a partial one
    lin.weight.data = torch.randn(44, 72, generator=g) * torch.linspace(0.1, 3, 72)
    save_file({k: v.detach().contiguous() for k, v in lin.state_dict().items()}, tmp_path / "w.safetensors")
    f = O.SafeFile(tmp_path / "w.safetensors")
    assert f.chunk_rows("weight") == 8
    cfg = Quantize(method="rtn", bits=4, group_size=group_size, sym=sym, observer=observer)
    entries, conf, stats = O.rtn_entries(O.Src(f, "weight"), O.Src(f, "bias") if bias else None, 44, 72, cfg,
                                         torch.float32)
    O.write_streaming(tmp_path / "part.safetensors", entries, {})
    got = O.SafeFile(tmp_path / "part.safetensors")
    ref = QuantLinear.build(lin, *quant.rtn(lin.weight.detach(), 4, group_size, sym, None, observer), 4, group_size, sym)
    want, want_conf = ref.to_state()
    assert sorted(got.keys()) == sorted(want) and conf == want_conf
    for k, v in want.items():
        assert torch.equal(got.read(k), v), k
    st = stats()
    assert st["sqnr"] == pytest.approx(quant.sqnr(lin.weight.detach(), ref.weight), rel=1e-12)
    assert st["sparsity"] == float((ref.weight == 0).sum()) / ref.weight.numel()


@pytest.mark.parametrize("tied", [False, True])
def test_structure_from_shard_names_equals_skeleton(tied, tmp_path):
    import json

    from transformers import LlamaConfig, LlamaForCausalLM

    from modelpress.engine.offload import RawConfig, Shards, skeleton, structure_from_model, structure_from_shards
    cfg = LlamaConfig(vocab_size=96, hidden_size=32, intermediate_size=64, num_hidden_layers=3, num_attention_heads=4,
                      num_key_value_heads=2, tie_word_embeddings=tied, attention_bias=True)
    LlamaForCausalLM(cfg).save_pretrained(tmp_path)
    shards = Shards(tmp_path)
    got = structure_from_shards(shards, RawConfig(json.loads((tmp_path / "config.json").read_text())))
    want = structure_from_model(skeleton(tmp_path, torch.float32)[0])
    assert got.prefix == want.prefix == "model.layers"
    assert [sorted(n) for n in got.layer_names] == [sorted(n) for n in want.layer_names]
    assert got.linears == want.linears and got.linears[0]["self_attn.q_proj"] == (32, 32, True)
    assert sorted(got.outside) == sorted(want.outside)
    assert got.outside_linears == want.outside_linears and got.aliases == want.aliases
    assert bool(got.aliases) == tied


@pytest.mark.parametrize("case", ["rtn-w4g32", "gptq-w4g32"])
def test_offload_tied_embeddings(case, tmp_path):
    """A tied lm_head stays an alias of the embedding in the export (model-free and skeleton paths)."""
    from transformers import LlamaConfig, LlamaForCausalLM

    from .conftest import tiny_tokenizer
    torch.manual_seed(0)
    tok = tiny_tokenizer()
    cfg = LlamaConfig(vocab_size=len(tok), hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2, tie_word_embeddings=True)
    LlamaForCausalLM(cfg).save_pretrained(tmp_path / "m")
    tok.save_pretrained(tmp_path / "m")
    recipe = mp.Recipe.from_dict({"stages": CASES[case]})
    calib = correlated_calib(n=4, seqlen=32)
    calib.input_ids.clamp_(max=len(tok) - 1)
    ref, _ = mp.load(tmp_path / "m")
    mp.compress(ref, recipe, calib)
    skel, store, _ = compress_offloaded(tmp_path / "m", recipe, calib, tmp_path / "work")
    out = export_offloaded(skel, store, tmp_path / "m", tmp_path / "out")
    back, _ = load_compressed(out)
    assert back.lm_head.weight is back.model.embed_tokens.weight
    with torch.no_grad():
        assert torch.equal(back(calib.input_ids).logits, ref(calib.input_ids).logits)


def test_offload_refuses_conv1d_models(tmp_path):
    from transformers import GPT2Config, GPT2LMHeadModel
    GPT2LMHeadModel(GPT2Config(vocab_size=64, n_positions=32, n_embd=32, n_layer=1, n_head=2)).save_pretrained(tmp_path)
    recipe = mp.Recipe.from_dict({"stages": [{"quantize": {"method": "rtn", "bits": 4, "group_size": 32}}]})
    with pytest.raises(UserError, match="transposed"):
        compress_offloaded(tmp_path, recipe, None, tmp_path / "work")
