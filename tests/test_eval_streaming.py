"""Streaming evaluation (modelpress.eval.perplexity.evaluate) gives the figures of the whole-tensor
computation it replaced, on tiny models: small and 262k vocabularies, tied and untied heads, GPT-2, a
soft-capped head, a model without a separable head, and precomputed reference scores."""
from __future__ import annotations

import copy
import math

import pytest
import torch
import torch.nn.functional as F
from transformers import LlamaConfig, LlamaForCausalLM

from modelpress.errors import UserError
from modelpress.eval.perplexity import ReferenceScores, evaluate, reference_scores

from .conftest import VOCAB, tiny_gpt2, tiny_llama

REL = 1e-6


@torch.no_grad()
def whole_tensor_evaluate(model, windows, reference=None, batch_size=2) -> dict:
    """The implementation before streaming (full logits and log-softmax of both models per batch): the oracle."""
    nll, agree, kl, linf, ref_nll = [], [], [], [], []
    for b in range(0, windows.shape[0], batch_size):
        ids = windows[b:b + batch_size]
        logits = model(input_ids=ids, use_cache=False).logits[:, :-1].float().cpu()
        tgt = ids[:, 1:]
        lp = F.log_softmax(logits, -1)
        nll.append(-lp.gather(-1, tgt[..., None])[..., 0])
        if reference is not None:
            rlogits = reference(input_ids=ids, use_cache=False).logits[:, :-1].float().cpu()
            rlp = F.log_softmax(rlogits, -1)
            ref_nll.append(-rlp.gather(-1, tgt[..., None])[..., 0])
            agree.append(logits.argmax(-1) == rlogits.argmax(-1))
            kl.append((rlp.exp() * (rlp - lp)).sum(-1).clamp(min=0))
            linf.append((logits - rlogits).abs().amax(-1))
    nll_t = torch.cat(nll)
    out = {"perplexity": math.exp(float(nll_t.double().mean())), "tokens": nll_t.numel()}
    if reference is not None:
        a, k, li, rn = torch.cat(agree), torch.cat(kl), torch.cat(linf), torch.cat(ref_nll)
        out.update(reference_perplexity=math.exp(float(rn.double().mean())), agreement=float(a.double().mean()),
                   kl=float(k.double().mean()), linf=float(li.max()),
                   per_token={"agree": a, "kl": k, "linf": li, "nll": nll_t})
    return out


def assert_same(got: dict, want: dict) -> None:
    for k in ("perplexity", "reference_perplexity", "kl", "linf"):
        if k in want:
            assert got[k] == pytest.approx(want[k], rel=REL, abs=0), k
    assert got["tokens"] == want["tokens"]
    if "agreement" in want:
        assert got["agreement"] == want["agreement"]
        for k in ("kl", "linf", "nll"):
            torch.testing.assert_close(got["per_token"][k], want["per_token"][k], rtol=1e-5, atol=1e-7)
        assert torch.equal(got["per_token"]["agree"], want["per_token"]["agree"])


def perturbed(model, scale=0.5, seed=3, head=False):
    """A copy with noise on every decoder weight (and on the output layer when head=True)."""
    m = copy.deepcopy(model)
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in m.named_parameters():
            if ("layers" in name or ".h." in name) or (head and "lm_head" in name):
                p.add_(scale * p.abs().mean() * torch.randn(p.shape, generator=g))
    return m


def windows(vocab: int, n: int = 5, seqlen: int = 24, seed: int = 7):
    return torch.randint(0, vocab, (n, seqlen), generator=torch.Generator().manual_seed(seed))


@pytest.mark.parametrize("chunk", [3 * VOCAB, 1 << 22])
@pytest.mark.parametrize("tie", [True, False])
def test_same_figures_as_whole_tensor(one_thread, chunk, tie):
    ref = tiny_llama(tie=tie)
    comp = perturbed(ref, head=not tie)
    w = windows(VOCAB)
    want = whole_tensor_evaluate(comp, w, ref)
    assert want["kl"] > 1e-5 and want["agreement"] < 1          # the models really differ
    assert_same(evaluate(comp, w, ref, chunk_elements=chunk), want)
    assert_same(evaluate(comp, w, chunk_elements=chunk), whole_tensor_evaluate(comp, w))


def test_gpt2_same_figures(one_thread):
    ref = tiny_gpt2()
    comp = perturbed(ref)
    w = windows(VOCAB)
    assert_same(evaluate(comp, w, ref, chunk_elements=5 * VOCAB), whole_tensor_evaluate(comp, w, ref))


def large_vocab_llama(vocab: int = 262_144, seed: int = 0):
    torch.manual_seed(seed)
    cfg = LlamaConfig(vocab_size=vocab, hidden_size=16, intermediate_size=32, num_hidden_layers=1,
                      num_attention_heads=2, num_key_value_heads=1, tie_word_embeddings=True,
                      max_position_embeddings=64)
    return LlamaForCausalLM(cfg).eval()


def test_large_vocabulary_same_figures(one_thread):
    ref = large_vocab_llama()
    comp = perturbed(ref, scale=0.3)
    w = windows(262_144, n=3, seqlen=12)
    want = whole_tensor_evaluate(comp, w, ref)
    got = evaluate(comp, w, ref, chunk_elements=262_144 * 4)           # 4 rows of 262k logits per chunk
    assert_same(got, want)
    scores = reference_scores(ref, w, 2, chunk_elements=262_144 * 4)
    scores.release_head()                                               # comp's head is ref's (tied, unchanged)
    assert_same(evaluate(comp, w, scores, chunk_elements=262_144 * 4), want)


def test_reference_scores_replace_the_model(one_thread, tmp_path):
    ref = tiny_llama(tie=False)
    w = windows(VOCAB)
    scores = reference_scores(ref, w, 2)
    assert scores.evaluation()["perplexity"] == pytest.approx(whole_tensor_evaluate(ref, w)["perplexity"], rel=REL)
    # compressed in place after scoring, as run_recipe does: the decoder changes, the head object is the same
    comp = ref
    with torch.no_grad():
        for name, p in comp.named_parameters():
            if "layers" in name:
                p.mul_(0.9)
    oracle_ref = tiny_llama(tie=False)                                  # same seed: the original again
    want = whole_tensor_evaluate(comp, w, oracle_ref)
    assert_same(evaluate(comp, w, scores), want)
    scores.release_head()
    assert_same(evaluate(comp, w, scores), want)
    scores.park(tmp_path / "parked.safetensors")                      # on disk, read back one batch at a time
    assert not isinstance(scores.hidden, list) and len(scores.hidden) == 3
    assert_same(evaluate(comp, w, scores), want)
    scores.unpark()
    assert isinstance(scores.hidden, list)
    assert_same(evaluate(comp, w, scores), want)
    with torch.no_grad():
        comp.lm_head.weight.mul_(1.01)                                 # now the head differs: refused
    with pytest.raises(UserError, match="output layer"):
        evaluate(comp, w, scores)
    with pytest.raises(UserError, match="other windows"):
        evaluate(comp, w[:2], reference_scores(oracle_ref, w, 2))


def test_softcapped_head(one_thread):
    from transformers import Gemma2Config, Gemma2ForCausalLM
    torch.manual_seed(0)
    cfg = Gemma2Config(vocab_size=VOCAB, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                       num_attention_heads=2, num_key_value_heads=1, head_dim=16, final_logit_softcapping=2.0,
                       max_position_embeddings=64)
    ref = Gemma2ForCausalLM(cfg).eval()
    comp = perturbed(ref, scale=0.3)
    w = windows(VOCAB)
    assert_same(evaluate(comp, w, ref, chunk_elements=4 * VOCAB), whole_tensor_evaluate(comp, w, ref))


def test_model_without_separable_head_falls_back(one_thread, monkeypatch):
    ref = tiny_llama()
    comp = perturbed(ref)
    w = windows(VOCAB)
    want = whole_tensor_evaluate(comp, w, ref)
    monkeypatch.setattr(type(comp), "get_output_embeddings", lambda self: None)
    assert_same(evaluate(comp, w, ref, chunk_elements=3 * VOCAB), want)
    scores = reference_scores(ref, w, 2)
    assert isinstance(scores, ReferenceScores) and scores.hidden is None
    assert_same(evaluate(comp, w, scores), want)


TEXT = ("the quick brown fox jumps over the lazy dog and compression keeps what matters. " * 3 + "\n\n") * 60


@pytest.mark.parametrize("head", ["kept", "quantized"])
def test_run_recipe_keeps_no_copy_and_gives_the_old_figures(one_thread, tmp_path, head):
    """run_recipe scores the original before compressing (no deep copy): same figures as comparing the
    compressed model with a fresh load of the original; with the output layer quantized too, the original's
    output layer is reloaded from the source."""
    import modelpress as mp
    from .conftest import tiny_model_dir
    model_dir = tiny_model_dir(tmp_path / "model")
    (tmp_path / "text.txt").write_text(TEXT)
    exclude = ["lm_head"] if head == "kept" else []
    recipe = mp.Recipe.from_dict({
        "calibration": {"source": str(tmp_path / "text.txt"), "samples": 4, "seqlen": 32},
        "evaluate": {"text": str(tmp_path / "text.txt"), "seqlen": 32, "windows": 6},
        "stages": [{"quantize": {"method": "rtn", "bits": 3, "group_size": 32, "exclude": exclude}}]})
    rep = mp.run_recipe(recipe, str(model_dir), tmp_path / "out")
    assert rep["_original"] is None
    comp, tok = rep["_model"], rep["_tokenizer"]
    assert (type(comp.lm_head).__name__ == "Linear") == (head == "kept")
    original, _ = mp.load(model_dir)
    w = mp.api.windows_for(tok, str(tmp_path / "text.txt"), 32, 6)
    want = whole_tensor_evaluate(comp, w, original)
    got = rep["eval"]["compressed"]
    for k in ("perplexity", "reference_perplexity", "kl", "linf"):
        assert got[k] == pytest.approx(want[k], rel=REL, abs=0), k
    assert got["agreement"] == want["agreement"] and got["kl"] > 0
    assert rep["eval"]["original"]["perplexity"] == pytest.approx(whole_tensor_evaluate(original, w)["perplexity"], rel=REL)


def test_restore_reference_head_reloads_when_changed_in_place(one_thread, tmp_path):
    import modelpress as mp
    from modelpress.api import restore_reference_head
    from .conftest import tiny_model_dir
    model_dir = tiny_model_dir(tmp_path / "model")
    model, tok = mp.load(model_dir)
    w = windows(VOCAB, n=2, seqlen=16)
    scores = reference_scores(model, w, 2)
    with torch.no_grad():
        model.lm_head.weight.mul_(1.5)                     # "compressed" in place: the kept head is stale
    restore_reference_head(scores, model, str(model_dir), "float32")
    assert scores.head is not model.lm_head
    original, _ = mp.load(model_dir)
    assert_same(evaluate(model, w, scores), whole_tensor_evaluate(model, w, original))


def test_cli_eval_with_reference_scores_it_first(one_thread, tmp_path, capsys, monkeypatch):
    """`eval EXPORT --reference MODEL`: the reference is scored first, one decoder layer at a time from its
    shards, then the export likewise (neither is loaded whole); same figures."""
    import modelpress as mp
    from .conftest import tiny_model_dir
    model_dir = tiny_model_dir(tmp_path / "model")
    (tmp_path / "text.txt").write_text(TEXT)
    recipe = mp.Recipe.from_dict({"stages": [{"quantize": {"method": "rtn", "bits": 3, "group_size": 32}}]})
    rep = mp.run_recipe(recipe, str(model_dir), tmp_path / "out", evaluate_models=False)
    _cli_eval_streamed(tmp_path / "out", model_dir, rep["_model"], tmp_path, capsys, monkeypatch)


def _cli_eval_streamed(model, reference, compared, tmp_path, capsys, monkeypatch) -> str:
    """`eval MODEL --reference REFERENCE` on tmp_path/text.txt: neither side loaded whole (both streamed layer
    by layer), figures those of the whole-tensor oracle on `compared` (the loaded MODEL); the printed table."""
    import modelpress.api as api
    from modelpress.cli import main
    loads = []
    real = api.load
    monkeypatch.setattr(api, "load", lambda src, *a, **k: loads.append(str(src)) or real(src, *a, **k))
    assert main(["eval", str(model), "--reference", str(reference), "--text", str(tmp_path / "text.txt"),
                 "--seqlen", "32", "--windows", "4"]) == 0
    out = capsys.readouterr().out
    assert loads == []
    original, tok = real(reference)
    want = whole_tensor_evaluate(compared, api.windows_for(tok, str(tmp_path / "text.txt"), 32, 4), original)
    assert f"{want['kl']:.4g}" in out and f"{want['agreement']:.4g}" in out and f"{want['perplexity']:.4g}" in out
    return out


def test_cli_eval_of_a_folder_streams_it_too(one_thread, tmp_path, capsys, monkeypatch):
    """`eval FOLDER --reference MODEL` with FOLDER an uncompressed HF folder: scored layer by layer as well (never
    loaded whole), the same figures and the same size rows as evaluating the loaded model."""
    import modelpress as mp
    from modelpress.eval.size import plain_size, size_report
    from .conftest import tiny_model_dir
    model_dir = tiny_model_dir(tmp_path / "model")
    (tmp_path / "text.txt").write_text(TEXT)
    other, tok = mp.load(model_dir)
    with torch.no_grad():
        for n, p in other.named_parameters():
            if "layers" in n:
                p.mul_(1 + 0.05 * torch.randn(p.shape, generator=torch.Generator().manual_seed(1)))
    other.save_pretrained(tmp_path / "other")
    tok.save_pretrained(tmp_path / "other")
    compared, _ = mp.load(tmp_path / "other")
    out = _cli_eval_streamed(tmp_path / "other", model_dir, compared, tmp_path, capsys, monkeypatch)
    size = size_report(compared)
    assert f"{size['compressed_bytes'] / 1e6:.4g}" in out
    from modelpress.engine.store import skeleton
    shell, _ = skeleton(tmp_path / "other", torch.float32)
    assert {k: v for k, v in plain_size(shell).items() if k != "layers"} == {k: v for k, v in size.items() if k != "layers"}
