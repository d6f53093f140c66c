"""Protocol modelpress-eval/2: calibration and evaluation windows start with the tokenizer's BOS where the
tokenizer adds one by default (and only there), the BOS is never scored, /1 stays reproducible, and the
choice is recorded in the report and calibration.json. Tiny in-process tokenizer/model pairs, one adding a
BOS token and one not."""
import json

import pytest
import torch
from transformers import LlamaConfig, LlamaForCausalLM

import modelpress as mp
from modelpress.calib import calibration_set
from modelpress.calib.protocol import V1, V2, default_bos, window_bos
from modelpress.errors import UserError
from modelpress.eval import eval_windows, evaluate

from .conftest import VOCAB, tiny_tokenizer

TEXTS = ["the quick brown fox jumps over the lazy dog. compression keeps what matters."] * 40


def bos_tokenizer():
    """A byte-level BPE tokenizer whose post-processor prepends <bos> (as Llama / Gemma tokenizers do)."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
    from transformers import PreTrainedTokenizerFast
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    text = ["the quick brown fox jumps over the lazy dog"] * 20 + ["compression keeps what matters"] * 20
    tok.train_from_iterator(text, trainers.BpeTrainer(vocab_size=VOCAB, special_tokens=["<eos>", "<bos>"],
                                                      initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
    bos = tok.token_to_id("<bos>")
    tok.post_processor = processors.TemplateProcessing(single="<bos> $A", pair="<bos> $A <bos> $B",
                                                       special_tokens=[("<bos>", bos)])
    return PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="<eos>", bos_token="<bos>")


def _tiny(tok) -> LlamaForCausalLM:
    torch.manual_seed(0)
    return LlamaForCausalLM(LlamaConfig(vocab_size=max(VOCAB, len(tok)), hidden_size=32, intermediate_size=64,
                                        num_hidden_layers=1, num_attention_heads=2, num_key_value_heads=1)).eval()


@pytest.fixture(scope="module")
def with_bos():
    return bos_tokenizer()


@pytest.fixture(scope="module")
def without_bos():
    return tiny_tokenizer()


def test_bos_detected_only_where_the_tokenizer_adds_one(with_bos, without_bos):
    assert default_bos(with_bos) == with_bos.convert_tokens_to_ids("<bos>")
    assert default_bos(without_bos) is None
    assert window_bos(with_bos, V1) is None
    with pytest.raises(UserError, match="evaluate.protocol"):
        eval_windows(with_bos, TEXTS, 16, 4, protocol="modelpress-eval/3")


def test_eval_windows_v2_start_with_bos_and_hold_the_v1_stream(with_bos):
    bos = default_bos(with_bos)
    v1 = eval_windows(with_bos, TEXTS, 16, 4, protocol=V1)                      # (4, 16), text only
    v2 = eval_windows(with_bos, TEXTS, 16, 4, protocol=V2)                      # (4, 16), BOS + 15 text tokens
    assert v1.shape == v2.shape == (4, 16)
    assert (v2[:, 0] == bos).all() and not (v1 == bos).any() and not (v2[:, 1:] == bos).any()
    stream = eval_windows(with_bos, TEXTS, 64, 1, protocol=V1)[0]              # the same text tokens, in order
    assert torch.equal(v2[:, 1:].reshape(-1), stream[:60])
    assert torch.equal(v1.reshape(-1), stream[:64])


def test_without_bos_v2_equals_v1(without_bos):
    assert torch.equal(eval_windows(without_bos, TEXTS, 16, 4, protocol=V1),
                       eval_windows(without_bos, TEXTS, 16, 4, protocol=V2))
    for select in ("random", "zipcal-words", "zipcal-coverage"):
        a = calibration_set(without_bos, TEXTS, select, samples=4, seqlen=16, protocol=V1)
        b = calibration_set(without_bos, TEXTS, select, samples=4, seqlen=16, protocol=V2)
        assert torch.equal(a.input_ids, b.input_ids)
        assert b.provenance["protocol"] == V2 and b.provenance["bos"] is False


@pytest.mark.parametrize("select", ["random", "zipcal-words", "zipcal-coverage", "perplexity"])
def test_calibration_windows_v2_start_with_bos(with_bos, select):
    bos = default_bos(with_bos)
    model = _tiny(with_bos)
    c2 = calibration_set(with_bos, TEXTS, select, samples=4, seqlen=16, model=model)          # default: /2
    c1 = calibration_set(with_bos, TEXTS, select, samples=4, seqlen=16, model=model, protocol=V1)
    assert c2.input_ids.shape == c1.input_ids.shape == (4, 16)
    assert (c2.input_ids[:, 0] == bos).all() and not (c2.input_ids[:, 1:] == bos).any()
    assert not (c1.input_ids == bos).any()
    assert c2.provenance["protocol"] == V2 and c2.provenance["bos"] is True
    assert c2.provenance["bos_token_id"] == bos and c2.provenance["bos_token"] == "<bos>"
    assert c1.provenance["protocol"] == V1 and c1.provenance["bos"] is False
    assert c2.sha256() != c1.sha256()


def test_bos_position_is_never_scored(with_bos):
    """Every predicted position is a text token: the NLL of the BOS itself is never counted, and a model's
    score changes with the BOS only through the context it gives (the first text token is predicted from it)."""
    model = _tiny(with_bos)
    w = eval_windows(with_bos, TEXTS, 16, 3)
    res = evaluate(model, w, reference=model)
    assert res["tokens"] == 3 * 15                                  # positions 2..16 of each window
    with torch.no_grad():
        logits = model(w).logits[:, :-1]
    nll = torch.nn.functional.cross_entropy(logits.reshape(-1, logits.shape[-1]), w[:, 1:].reshape(-1))
    assert res["perplexity"] == pytest.approx(float(nll.exp()), rel=1e-5)


def _model_dir(path, tok):
    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=max(VOCAB, len(tok)), hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                      num_attention_heads=2, num_key_value_heads=1, max_position_embeddings=128)
    LlamaForCausalLM(cfg).save_pretrained(path)
    tok.save_pretrained(path)
    return path


@pytest.mark.parametrize("adds_bos", [True, False])
@pytest.mark.parametrize("protocol", [V2, V1])
def test_run_recipe_records_the_choice(adds_bos, protocol, tmp_path, with_bos, without_bos):
    tok = with_bos if adds_bos else without_bos
    src = _model_dir(tmp_path / "m", tok)
    text = tmp_path / "t.txt"
    text.write_text("\n\n".join(TEXTS))
    recipe = mp.Recipe.from_dict({"calibration": {"source": str(text), "samples": 2, "seqlen": 16, "protocol": protocol},
                                  "evaluate": {"text": str(text), "seqlen": 16, "windows": 2, "protocol": protocol},
                                  "stages": [{"quantize": {"method": "gptq", "bits": 4, "group_size": 32}}]})
    rep = mp.run_recipe(recipe, str(src), tmp_path / "out")
    want = adds_bos and protocol == V2
    assert rep["eval"]["protocol"] == protocol and rep["eval"]["bos"] is want
    cal = json.loads((tmp_path / "out" / "calibration.json").read_text())
    assert cal["protocol"] == protocol and cal["bos"] is want
    assert cal["bos_token_id"] == (tok.convert_tokens_to_ids("<bos>") if want else None)
    saved = json.loads((tmp_path / "out" / "report.json").read_text())
    assert saved["eval"]["protocol"] == protocol


def test_recipe_refuses_an_unknown_protocol():
    with pytest.raises(UserError, match="calibration.protocol"):
        mp.Recipe.from_dict({"calibration": {"protocol": "v3"}, "stages": [{"quantize": {"method": "rtn"}}]})
    with pytest.raises(UserError, match="evaluate.protocol"):
        mp.Recipe.from_dict({"evaluate": {"protocol": "v3"}, "stages": [{"quantize": {"method": "rtn"}}]})
