"""Calibration-set selection (modelpress.calib.select; ZipCal, arXiv 2603.16105) on a tiny in-process
byte-level BPE tokenizer and a synthetic bursty Zipfian corpus: shapes, masks, determinism, unigram
fidelity of zipcal-words, type coverage of zipcal-coverage, the perplexity baseline, provenance."""
from __future__ import annotations

import json
from collections import Counter

import numpy as np
import pytest
import torch

from modelpress.calib import CalibrationSet, calibration_set, sources
from modelpress.calib import select as S
from modelpress.errors import UserError

FAST = ("random", "zipcal-words", "zipcal-coverage")


def _word(i: int) -> str:
    letters = "abcdefghijklmnopqrstuvwxyz"
    s = ""
    i += 26
    while i:
        i, r = divmod(i, 26)
        s = letters[r] + s
    return s


def bursty_corpus(n_docs: int = 240, vocab: int = 1200, topic: int = 12, doc_words: int = 160,
                  seed: int = 0) -> list[str]:
    """Documents that each repeat a small Zipf-drawn topic vocabulary: the pool is diverse, every document
    is not (the burstiness that makes contiguous random windows poor in types)."""
    rng = np.random.default_rng(seed)
    p = 1.0 / np.arange(1, vocab + 1)
    p /= p.sum()
    words = [_word(i) for i in range(vocab)]
    docs = []
    for _ in range(n_docs):
        topic_ids = rng.choice(vocab, topic, replace=False, p=p)
        seq = rng.choice(topic_ids, doc_words)
        docs.append(" ".join(words[j].capitalize() if k % 17 == 0 else words[j] for k, j in enumerate(seq)) + ".")
    return docs


@pytest.fixture(scope="module")
def corpus() -> list[str]:
    return bursty_corpus()


@pytest.fixture(scope="module")
def tok(corpus):
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast
    t = Tokenizer(models.BPE())
    t.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    t.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=1500, initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
                                  show_progress=False)
    t.train_from_iterator(corpus, trainer)
    return PreTrainedTokenizerFast(tokenizer_object=t, eos_token="</s>", pad_token="</s>")


def js_divergence(p: Counter, q: Counter) -> float:
    """Jensen-Shannon divergence (bits, in [0, 1]) between two count distributions."""
    keys = sorted(set(p) | set(q))
    a = np.array([p[k] for k in keys], float)
    b = np.array([q[k] for k in keys], float)
    a, b = a / a.sum(), b / b.sum()
    m = (a + b) / 2

    def kl(x, y):
        nz = x > 0
        return float((x[nz] * np.log2(x[nz] / y[nz])).sum())
    return 0.5 * kl(a, m) + 0.5 * kl(b, m)


def sample_words(ids: torch.Tensor, tok) -> Counter:
    return Counter(w for row in ids for w in tok.decode(row.tolist()).lower().split())


def types_per_sample(ids: torch.Tensor, tok) -> float:
    types = S.normalised_types(ids.numpy(), tok)
    return float(np.mean([len(set(r[r >= 0].tolist())) for r in types]))


@pytest.mark.parametrize("method", FAST)
def test_shapes_mask_and_provenance(method, corpus, tok, tmp_path):
    path = tmp_path / "pool.txt"
    path.write_text("\n\n".join(corpus), encoding="utf-8")
    cs = calibration_set(tok, str(path), select=method, samples=6, seqlen=40, seed=3)
    assert cs.input_ids.shape == (6, 40) and cs.input_ids.dtype == torch.long
    assert cs.attention_mask.shape == (6, 40) and bool((cs.attention_mask == 1).all())
    assert int(cs.input_ids.min()) >= 0 and int(cs.input_ids.max()) < len(tok)
    p = cs.provenance
    assert (p["select"], p["seed"], p["samples"], p["seqlen"]) == (method, 3, 6, 40)
    assert p["sha256"] == cs.sha256() and len(p["sha256"]) == 64
    assert p["source"] == str(path) and p["source_sha256"] == sources.source_sha256(str(path))


def test_jsonl_and_list_sources(corpus, tok, tmp_path):
    path = tmp_path / "pool.jsonl"
    path.write_text("\n".join(json.dumps({"body": t}) for t in corpus), encoding="utf-8")
    a = calibration_set(tok, str(path), select="zipcal-words", samples=4, seqlen=32, seed=1, field="body")
    b = calibration_set(tok, list(corpus), select="zipcal-words", samples=4, seqlen=32, seed=1)
    assert torch.equal(a.input_ids, b.input_ids)             # same texts, same selection
    assert b.provenance["source"] == "list"
    assert b.provenance["source_sha256"] != sources.source_sha256(list(corpus[:-1]))
    with pytest.raises(UserError, match="field"):
        calibration_set(tok, str(path), select="random", samples=2, seqlen=16, field="text")


@pytest.mark.parametrize("method", FAST)
def test_deterministic_per_seed(method, corpus, tok):
    fn = S.SELECTORS[method]
    a = fn(corpus, tok, samples=5, seqlen=48, seed=7)
    b = fn(corpus, tok, samples=5, seqlen=48, seed=7)
    c = fn(corpus, tok, samples=5, seqlen=48, seed=8)
    assert torch.equal(a, b)
    # zipcal-coverage scores every remaining sentence while fewer than 2000 remain (the authors' search
    # pool): then the greedy has nothing random in it
    assert torch.equal(a, c) if method == "zipcal-coverage" else not torch.equal(a, c)


def test_zipcal_words_follows_pool_unigrams(corpus, tok):
    pool = Counter(S.pool_words(corpus))
    ids = S.select_zipcal_words(corpus, tok, samples=32, seqlen=128, seed=0)
    rnd = S.select_random(corpus, tok, samples=32, seqlen=128, seed=0)
    jsd_zip = js_divergence(pool, sample_words(ids, tok))
    jsd_rnd = js_divergence(pool, sample_words(rnd, tok))
    assert jsd_zip < 0.12, jsd_zip
    assert jsd_zip < 0.6 * jsd_rnd, (jsd_zip, jsd_rnd)    # bursty windows drift far from the pool


def union_types(ids: torch.Tensor, tok) -> int:
    types = S.normalised_types(ids.numpy(), tok)
    return len(set(types[types >= 0].tolist()))


def test_coverage_beats_random_on_bursty_corpus(corpus, tok):
    """zipcal-coverage maximises the concepts covered by the whole set (its objective); zipcal-words spreads
    the pool's words over every sample."""
    kw = dict(samples=12, seqlen=64)
    rnd_u = np.mean([union_types(S.select_random(corpus, tok, seed=s, **kw), tok) for s in range(3)])
    cov_u = union_types(S.select_zipcal_coverage(corpus, tok, seed=0, **kw), tok)
    assert cov_u > 1.3 * rnd_u, (cov_u, rnd_u)
    rnd = np.mean([types_per_sample(S.select_random(corpus, tok, seed=s, **kw), tok) for s in range(3)])
    zw = np.mean([types_per_sample(S.select_zipcal_words(corpus, tok, seed=s, **kw), tok) for s in range(3)])
    assert zw > 1.3 * rnd, (zw, rnd)


def test_greedy_cover_is_the_authors_greedy():
    """Below the 2000-candidate search pool every remaining sentence is scored each round: the picks equal a
    plain greedy on new concepts with ties to the sentence with more concepts, until the token budget."""
    rng = np.random.default_rng(0)
    sets = [np.unique(rng.integers(0, 60, rng.integers(1, 15))) for _ in range(40)]
    flat = np.concatenate(sets)
    offsets = np.concatenate(([0], np.cumsum([len(x) for x in sets])))
    lengths = np.full(40, 10)
    got = S.greedy_concept_cover(flat, offsets, lengths, token_budget=55, seed=0)
    covered: set = set()
    want: list[int] = []
    while 10 * len(want) < 55:
        best = max((i for i in range(40) if i not in want),
                   key=lambda i: (len(set(sets[i].tolist()) - covered), len(sets[i]), -i))
        want.append(best)
        covered |= set(sets[best].tolist())
    assert got == want and len(got) == 6
    # a search pool smaller than the candidates samples them (seeded) and still covers most of it
    sub = S.greedy_concept_cover(flat, offsets, lengths, 55, seed=1, search_pool=10)
    assert len(sub) == 6 and len(set(np.concatenate([sets[i] for i in sub]).tolist())) >= 0.7 * len(covered)


def test_coverage_selects_whole_sentences(tok):
    texts = ["Zebra yak xenon. Aa aa aa aa. Bb cc dd ee ff gg hh!", "Ii jj. Aa bb."]
    sent = S.pool_sentences(texts, tok, seqlen=64)
    assert [tok.decode(x) for x in sent] == ["Zebra yak xenon.", "Aa aa aa aa.", "Bb cc dd ee ff gg hh!",
                                            "Ii jj.", "Aa bb."]
    _, _, counts = S.sentence_concepts(sent, tok)
    first = sent[int(np.argmax(counts))]
    ids = S.select_zipcal_coverage(texts, tok, samples=1, seqlen=len(first) + 2, seed=0)
    assert ids[0, :len(first)].tolist() == first            # the sentence with the most concepts, whole


def test_normalised_types_merge_case_and_space(tok):
    ids = tok(" abc Abc abc. abd", add_special_tokens=False)["input_ids"]
    types = S.normalised_types(np.array(ids), tok)
    strings = [tok.decode([i]).strip().lower() for i in ids]
    for i in range(len(ids)):
        for j in range(len(ids)):
            same = strings[i] == strings[j] and strings[i] != ""
            assert (types[i] == types[j]) == same or types[i] == types[j] == -1


@pytest.fixture(scope="module")
def tiny_lm(tok):
    from transformers import LlamaConfig, LlamaForCausalLM
    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=len(tok), hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=128)
    return LlamaForCausalLM(cfg).eval()


def test_perplexity_selector_keeps_the_lowest(corpus, tok, tiny_lm):
    with pytest.raises(UserError, match="needs the model"):
        S.select_perplexity(corpus, tok, samples=4, seqlen=32, seed=0)
    texts = [" ".join(corpus[i].split()[:8]) + ". " + " ".join(corpus[i + 1].split()[:6]) + "." for i in range(0, 40, 2)]
    ids = S.select_perplexity(texts, tok, samples=2, seqlen=16, seed=0, model=tiny_lm)
    assert ids.shape == (2, 16)
    sent = S.pool_sentences(texts, tok, 16)
    lp = S.sentence_log_perplexity(tiny_lm, sent)                                # (n,)
    best = sent[int(torch.argmin(lp))]
    assert ids[0, :len(best)].tolist() == best                                   # lowest perplexity first
    # equal-length batching gives the per-sentence values of one-at-a-time scoring
    one = torch.stack([S.sentence_log_perplexity(tiny_lm, [x]) for x in sent[:5]]).reshape(-1)
    torch.testing.assert_close(lp[:5], one)
    again = calibration_set(tok, list(texts), "perplexity", samples=2, seqlen=16, seed=0, model=tiny_lm)
    assert again.input_ids.shape == (2, 16) and again.provenance["select"] == "perplexity"


def test_user_errors(corpus, tok):
    with pytest.raises(UserError, match="calibration.select"):
        calibration_set(tok, list(corpus), select="nope", samples=2, seqlen=16)
    with pytest.raises(UserError, match="calibration.samples"):
        S.select_zipcal_coverage(corpus[:2], tok, samples=50, seqlen=64, seed=0)
    with pytest.raises(UserError, match="no texts"):
        S.select_zipcal_words([], tok, samples=2, seqlen=8, seed=0)
    with pytest.raises(UserError, match="strings"):
        sources.texts([1, 2])


def test_export_records_selection_provenance(corpus, tok, tiny_lm, tmp_path):
    from modelpress.api import run_recipe
    from modelpress.recipe import Recipe
    tiny_lm.save_pretrained(tmp_path / "m")
    tok.save_pretrained(tmp_path / "m")
    (tmp_path / "pool.txt").write_text("\n\n".join(corpus), encoding="utf-8")
    recipe = Recipe.from_dict({
        "stages": [{"prune": {"method": "wanda", "sparsity": 0.5}}],
        "calibration": {"source": str(tmp_path / "pool.txt"), "select": "zipcal-coverage", "samples": 4,
                        "seqlen": 32, "seed": 5},
        "evaluate": {"text": str(tmp_path / "pool.txt"), "seqlen": 32, "windows": 2}})
    run_recipe(recipe, str(tmp_path / "m"), tmp_path / "out")
    prov = json.loads((tmp_path / "out" / "calibration.json").read_text())
    again = calibration_set(tok, str(tmp_path / "pool.txt"), "zipcal-coverage", samples=4, seqlen=32, seed=5)
    assert prov["select"] == "zipcal-coverage" and prov["seed"] == 5
    assert prov["sha256"] == again.sha256() == CalibrationSet.from_ids(again.input_ids).provenance["sha256"]
    assert prov["source_sha256"] == sources.source_sha256(str(tmp_path / "pool.txt"))


@pytest.mark.slow
def test_real_tokenizer_on_wikipedia_pool():
    """The SmolLM2 tokenizer on the bundled Wikipedia pool: zipcal-words tracks the pool's unigrams more
    closely than random windows, and both ZipCal selectors cover more types per sample."""
    from transformers import AutoTokenizer
    from modelpress.model import smollm2_dir
    tok = AutoTokenizer.from_pretrained(smollm2_dir())
    pool_texts = sources.wiki_texts("calib")
    pool = Counter(S.pool_words(pool_texts))
    kw = dict(samples=16, seqlen=256, seed=0)
    ids = {m: S.SELECTORS[m](pool_texts, tok, **kw) for m in FAST}
    assert all(v.shape == (16, 256) for v in ids.values())
    jsd = {m: js_divergence(pool, sample_words(v, tok)) for m, v in ids.items()}
    assert jsd["zipcal-words"] < jsd["random"], jsd
    tps = {m: types_per_sample(v, tok) for m, v in ids.items()}
    assert tps["zipcal-words"] > tps["random"] and tps["zipcal-coverage"] > tps["random"], tps


def test_kmeans_representatives_one_per_blob():
    rng = np.random.default_rng(0)
    centres = rng.normal(size=(4, 8)) * 10
    sizes = [30, 12, 5, 2]                                  # unbalanced: random picks would miss the small ones
    x = np.concatenate([c + 0.01 * rng.normal(size=(n, 8)) for c, n in zip(centres, sizes)])
    blob = np.repeat(np.arange(4), sizes)
    rows = S.kmeans_representatives(x, 4, seed=0)
    assert sorted(blob[rows].tolist()) == [0, 1, 2, 3]
    # fewer distinct points than clusters: still k distinct rows (empty clusters take the nearest free row)
    dup = np.repeat(np.eye(2), 3, axis=0)                    # (6, 2), two distinct points
    rows = S.kmeans_representatives(dup, 3, seed=0)
    assert len(set(rows)) == 3


def test_cola_picks_one_window_per_activation_cluster(tok, tiny_lm, caplog):
    with pytest.raises(UserError, match="needs the model"):
        S.select_cola(["a b c"], tok, samples=1, seqlen=4, seed=0)
    # four kinds of document with disjoint vocabularies, in unbalanced amounts: COLA's k-means over the
    # windows' mean activations has one cluster per kind, so its 4 windows cover all four kinds
    kinds = [[_word(100 * k + j) for j in range(12)] for k in range(4)]
    rng = np.random.default_rng(0)
    texts = [" ".join(rng.choice(kinds[k], 400)) for k, n in enumerate([8, 4, 2, 1]) for _ in range(n)]
    vocab = [set(tok(" ".join(w), add_special_tokens=False)["input_ids"]) for w in kinds]

    def kind(row):
        return max(range(4), key=lambda k: len(vocab[k] & set(row.tolist())))

    for seed in range(3):
        ids = S.select_cola(texts, tok, samples=4, seqlen=24, seed=seed, model=tiny_lm)
        assert ids.shape == (4, 24)
        cand = S.pool_windows(texts, tok, 24, None, 4)                           # seed-free candidates
        assert all(any(torch.equal(r, c) for c in cand) for r in ids)          # whole windows of the pool
        assert sorted(kind(r) for r in ids) == [0, 1, 2, 3]
    assert torch.equal(ids, S.select_cola(texts, tok, samples=4, seqlen=24, seed=2, model=tiny_lm))
    act = S.window_activations(tiny_lm, cand)                                   # the parts the benchmark reuses
    assert torch.equal(ids, cand[S.cola_pick(act, 4, 2)])
    act = S.window_activations(tiny_lm, cand[:3], bos=0)                        # (3, layers * hidden)
    assert act.shape == (3, 2 * 32)
    torch.testing.assert_close(act.reshape(3, 2, 32).norm(dim=-1), torch.ones(3, 2))
    caplog.set_level("INFO", logger="modelpress")
    c = calibration_set(tok, texts, "cola", samples=4, seqlen=24, seed=1, model=tiny_lm)
    assert c.input_ids.shape == (4, 24) and c.provenance["select"] == "cola"
    n = cand.shape[0]                                                             # progress, also off a terminal
    assert f"calibration.select cola: windows embedded: {n}/{n}" in caplog.text


def test_model_based_selectors_cannot_stream():
    from modelpress.engine.offload import check_recipe
    from modelpress.recipe import Recipe
    for sel in S.MODEL_BASED:
        r = Recipe.from_dict({"stages": [{"prune": {"method": "wanda", "sparsity": 0.5}}],
                              "calibration": {"select": sel}})
        with pytest.raises(UserError, match=f"select {sel} .*--offload"):
            check_recipe(r)
