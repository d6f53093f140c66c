"""Calibration-sample selection: turn a pool of texts into `samples` token windows of `seqlen`.

Every selector has the signature
    fn(texts: list[str], tokenizer, samples: int, seqlen: int, seed: int, model=None, bos=None, **_)
        -> LongTensor (samples, seqlen)
and is deterministic for a given seed. Registry: SELECTORS. `seqlen` is the number of TEXT tokens; the
caller (calib.calibration_set) prepends `bos` under protocol modelpress-eval/2 (calib.protocol).

`random`: the pool's texts are concatenated in a seeded random order, tokenized, and `samples`
    windows are taken at seeded random offsets (the classic GPTQ/Wanda protocol).
ZipCal ("Frequency Matters: Fast Model-Agnostic Data Curation for Pruning and Quantization", arXiv
2603.16105; authors' code github.com/FrancescoMonaco/ZipCal, source/similarity_check.py) ships two
model-free samplers, both here, as the authors' code does them:
`zipcal-coverage`: the authors' `unique_tokens_sampling`, the sampler their scalability test times as
    "our method" and their result tables compare with COLA. Candidates are the pool's *sentences* (each
    text split at sentence ends, each sentence truncated to `seqlen` tokens). Every token id maps to a
    normalised concept (decoded, lowercased, spaces and the byte-level "G-dot" marker removed; special
    tokens and empty strings dropped); each greedy round picks, among all remaining sentences (or a seeded
    random 2000 of them when more remain: the authors' constant), the one adding the most not-yet-covered
    concepts, ties to the sentence with more concepts. Adaptation: the authors select `samples` padded
    sentences; modelpress calibration windows are unpadded, so rounds continue until the chosen sentences
    hold `samples * seqlen` tokens, and they are packed in selection order (joined by a space).
`zipcal-words`: the authors' `words_dataset_sampling` (what their token-distribution plot labels
    "ZipCal"): all lowercased whitespace words of the pool shuffled once with the seed and read cyclically,
    `seqlen` words per sample, each sample tokenized and truncated to `seqlen` tokens. The samples follow the
    pool's unigram distribution but have no syntax.
`perplexity`: the model-based baseline the paper compares with, the authors' `least_perplexity_sampling`:
    every candidate sentence (as in zipcal-coverage) is scored by the model's perplexity and the lowest-
    perplexity sentences are kept (packed like zipcal-coverage). `candidates` caps the scored sentences to
    a seeded random subset (default: all of them, as the authors do). Needs `model`.
`cola`: the model-based method ZipCal's result tables compare with, COLA's sample selection (stage 3 of
    "Preserving LLM Capabilities through Calibration Data Curation", arXiv 2510.10618; official code
    github.com/BokwaiHo/COLA, cola/sample_selection.py): every candidate's activation vector is the mean over
    its tokens of each decoder layer's output, L2-normalised per layer and concatenated; a Gaussian random
    projection (N(0, 1/64)) takes it to 64 dimensions; k-means with k = `samples` (best of 10 k-means++
    restarts, as their sklearn `KMeans(n_init=10)`) clusters the candidates, and the candidate closest to each
    centroid is kept. The candidates do not depend on the seed (COLA clusters one fixed processed pool): the
    seed draws the projection and the k-means starts. Deviations, and why: candidates are the pool's
    non-overlapping `seqlen`-token windows in pool order (COLA's stage-2 samples are whole documents padded
    to 2048; modelpress calibration windows are unpadded), padding never enters the mean (their mean
    includes the pad positions); the activations are the decoder
    layers' outputs (what their hook reads where its layer detection works, e.g. BERT's `layer.N.output`; on
    Llama-style models their detection finds no layer); the projection and k-means are seeded by `seed`
    (theirs: unseeded projection, fixed k-means seed 42); an empty cluster takes the nearest unchosen window.
    COLA's stages 1-2 (choosing the dataset, formatting) are the user's `calibration.source`. Needs `model`."""
from __future__ import annotations

import re

import numpy as np
import torch

from ..errors import UserError
from ..progress import bar
from .protocol import prepend

SEARCH_POOL = 2000             # zipcal-coverage: candidates scored per greedy round (the authors' constant)


def _token_stream(texts: list[str], tokenizer, order: list[int]) -> torch.Tensor:
    ids: list[int] = []
    sep = tokenizer("\n\n", add_special_tokens=False)["input_ids"]
    for i in order:
        ids.extend(tokenizer(texts[i], add_special_tokens=False)["input_ids"])
        ids.extend(sep)
    return torch.tensor(ids, dtype=torch.long)


def _check_pool(texts: list[str]) -> None:
    if not texts:
        raise UserError("calibration source has no texts: give a non-empty text file, JSONL file or dataset")


def select_random(texts: list[str], tokenizer, samples: int, seqlen: int, seed: int, **_) -> torch.Tensor:
    """`samples` windows of `seqlen` tokens at seeded random offsets of the shuffled pool.  # (samples, seqlen)"""
    _check_pool(texts)
    g = torch.Generator().manual_seed(seed)
    order = torch.randperm(len(texts), generator=g).tolist()
    # tokenize only as much of the pool as needed (4x the requested tokens, or all of it)
    need, acc, used = 4 * samples * seqlen, 0, []
    for i in order:
        used.append(i)
        acc += max(1, len(texts[i]) // 4)
        if acc >= need:
            break
    stream = _token_stream(texts, tokenizer, used)
    if stream.numel() < seqlen + 1:
        raise UserError(f"calibration text has {stream.numel()} tokens, fewer than one sample of seqlen {seqlen}: "
                        "give more text or lower calibration.seqlen")
    starts = torch.randint(0, stream.numel() - seqlen, (samples,), generator=g)
    return torch.stack([stream[s:s + seqlen] for s in starts.tolist()])


# ---------------------------------------------------------------------------------------------- zipcal-words

def pool_words(texts: list[str]) -> list[str]:
    """Lowercased whitespace words of the whole pool, in pool order."""
    return [w for t in texts for w in t.lower().split()]


def select_zipcal_words(texts: list[str], tokenizer, samples: int, seqlen: int, seed: int, **_) -> torch.Tensor:
    """Samples of `seqlen` consecutive words of the seeded global shuffle of the pool's words (read
    cyclically), each tokenized and truncated to `seqlen` tokens.  # (samples, seqlen)

    Each whitespace word gives at least one token, so `seqlen` words always give >= `seqlen` tokens."""
    _check_pool(texts)
    words = pool_words(texts)
    if not words:
        raise UserError("calibration source has no words: give it some text")
    perm = np.random.default_rng(seed).permutation(len(words))
    out = []
    for k in range(samples):
        idx = perm[(np.arange(k * seqlen, (k + 1) * seqlen)) % len(words)]
        ids = tokenizer(" ".join(words[j] for j in idx), add_special_tokens=False)["input_ids"]
        out.append(ids[:seqlen])
    return torch.tensor(out, dtype=torch.long)


# -------------------------------------------------------------------------------------- windows of the pool

def pool_windows(texts: list[str], tokenizer, seqlen: int, seed: int | None, samples: int,
                 limit: int | None = None) -> torch.Tensor:
    """Non-overlapping `seqlen` windows of the pool joined in a seeded random document order (seed None:
    pool order); with `limit`, only as many documents are tokenized as give `limit` windows.  # (n, seqlen)"""
    _check_pool(texts)
    order = list(range(len(texts))) if seed is None else np.random.default_rng(seed).permutation(len(texts)).tolist()
    sep = tokenizer("\n\n", add_special_tokens=False)["input_ids"]
    ids: list[int] = []
    for i in order:
        ids.extend(tokenizer(texts[i], add_special_tokens=False)["input_ids"])
        ids.extend(sep)
        if limit is not None and len(ids) >= limit * seqlen:
            break
    n = len(ids) // seqlen if limit is None else min(limit, len(ids) // seqlen)
    if n < samples:
        raise UserError(f"calibration text has {n} windows of seqlen {seqlen}, fewer than calibration.samples "
                        f"{samples}: give more text, lower calibration.samples or calibration.seqlen")
    return torch.tensor(ids[: n * seqlen], dtype=torch.long).reshape(n, seqlen)


def normalised_types(ids: np.ndarray, tokenizer) -> np.ndarray:
    """Map token ids to normalised concept indices as the authors' `unique_tokens_sampling` does: the token
    decoded, lowercased, spaces and the byte-level marker "\u0120" removed, stripped; special tokens and
    empty strings map to -1 (so "The", " the", "the" are one concept).  # same shape as ids"""
    uniq, inv = np.unique(ids, return_inverse=True)
    strings = tokenizer.batch_decode([[int(u)] for u in uniq])
    special = set(getattr(tokenizer, "all_special_ids", []) or [])
    index: dict[str, int] = {}
    tmap = np.empty(len(uniq), dtype=np.int64)
    for j, (u, s) in enumerate(zip(uniq.tolist(), strings)):
        key = s.lower().replace(" ", "").replace("\u0120", "").strip()
        tmap[j] = index.setdefault(key, len(index)) if key and u not in special else -1
    return tmap[inv].reshape(ids.shape)


SENTENCE_END = re.compile(r"(?<=[.!?])\s+|\n+")


def pool_sentences(texts: list[str], tokenizer, seqlen: int) -> list[list[int]]:
    """The pool's sentences (split after . ! ? and at line breaks), tokenized, each truncated to `seqlen`
    tokens, in pool order; empty ones dropped."""
    _check_pool(texts)
    sents = [x.strip() for t in texts for x in SENTENCE_END.split(t)]
    sents = [x for x in sents if x]
    if not sents:
        raise UserError("calibration source has no sentences: give it some text")
    enc = tokenizer(sents, add_special_tokens=False)["input_ids"]
    return [e[:seqlen] for e in enc if e]


def sentence_concepts(sent_ids: list[list[int]], tokenizer) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Distinct normalised concepts of every sentence as CSR (flat, offsets) and the number of concepts."""
    lens = np.array([len(x) for x in sent_ids], dtype=np.int64)
    flat_ids = np.fromiter((t for x in sent_ids for t in x), dtype=np.int64, count=int(lens.sum()))
    types = normalised_types(flat_ids, tokenizer)                        # (total tokens,)
    row = np.repeat(np.arange(len(sent_ids)), lens)
    pairs = np.unique(np.stack([row[types >= 0], types[types >= 0]], 1), axis=0)   # distinct (sentence, concept)
    counts = np.bincount(pairs[:, 0], minlength=len(sent_ids))
    offsets = np.zeros(len(sent_ids) + 1, dtype=np.int64)
    np.cumsum(counts, out=offsets[1:])
    return pairs[:, 1].copy(), offsets, counts


def greedy_concept_cover(flat: np.ndarray, offsets: np.ndarray, lengths: np.ndarray, token_budget: int,
                         seed: int, search_pool: int = SEARCH_POOL) -> list[int]:
    """The authors' greedy unique-concept selection over CSR sets: each round scores all remaining rows (a
    seeded random `search_pool` of them when more remain), picks the largest number of new concepts (ties:
    more concepts in total, then the earlier candidate), until the picked rows hold `token_budget` tokens
    (`lengths`: tokens per row) or none remain. Returns the picked rows in order."""
    n = len(offsets) - 1
    rng = np.random.default_rng(seed)
    n_types = int(flat.max()) + 1 if flat.size else 1
    covered = np.zeros(n_types, dtype=bool)
    remaining = np.ones(n, dtype=bool)
    total = offsets[1:] - offsets[:-1]                                   # (n,) concepts per row
    chosen: list[int] = []
    tokens = 0
    while tokens < token_budget and remaining.any():
        pool = np.flatnonzero(remaining)
        cand = pool if len(pool) <= search_pool else rng.choice(pool, search_pool, replace=False)
        lens = total[cand]
        starts = np.repeat(offsets[cand] - np.concatenate(([0], np.cumsum(lens)[:-1])), lens)
        elems = flat[np.arange(lens.sum()) + starts]                    # concatenated sets of the candidates
        seg = np.repeat(np.arange(len(cand)), lens)
        gain = np.bincount(seg, weights=~covered[elems], minlength=len(cand))      # (m,)
        best_gain = gain.max()
        ties = np.flatnonzero(gain == best_gain)
        best = int(cand[ties[int(np.argmax(lens[ties]))]])
        chosen.append(best)
        remaining[best] = False
        covered[flat[offsets[best]:offsets[best + 1]]] = True
        tokens += int(lengths[best])
    return chosen


def pack_sentences(sent_ids: list[list[int]], order: list[int], tokenizer, samples: int, seqlen: int) -> torch.Tensor:
    """The sentences `order` joined by a space token sequence, cut into `samples` windows of `seqlen`."""
    sep = tokenizer(" ", add_special_tokens=False)["input_ids"]
    ids: list[int] = []
    for i in order:
        ids.extend(sent_ids[i])
        ids.extend(sep)
        if len(ids) >= samples * seqlen:
            break
    if len(ids) < samples * seqlen:
        raise UserError(f"calibration text has {len(ids)} tokens of sentences, fewer than calibration.samples x "
                        f"seqlen = {samples * seqlen}: give more text or lower calibration.samples / seqlen")
    return torch.tensor(ids[: samples * seqlen], dtype=torch.long).reshape(samples, seqlen)


def select_zipcal_coverage(texts: list[str], tokenizer, samples: int, seqlen: int, seed: int, **_) -> torch.Tensor:
    """Sentences chosen by the authors' greedy unique-concept coverage, packed.  # (samples, seqlen)"""
    sent = pool_sentences(texts, tokenizer, seqlen)
    flat, offsets, _ = sentence_concepts(sent, tokenizer)
    lengths = np.array([len(x) + 1 for x in sent])                     # + the separator
    chosen = greedy_concept_cover(flat, offsets, lengths, samples * seqlen, seed)
    return pack_sentences(sent, chosen, tokenizer, samples, seqlen)


# ---------------------------------------------------------------------------------------------- perplexity

@torch.no_grad()
def sentence_log_perplexity(model, sent_ids: list[list[int]], batch_size: int = 32) -> torch.Tensor:
    """Mean next-token NLL (log-perplexity) of each sentence under `model`, sentences batched by equal
    length (no padding); one-token sentences score +inf (nothing to predict).  -> (n,)"""
    dev = next(model.parameters()).device
    out = torch.full((len(sent_ids),), float("inf"))
    by_len: dict[int, list[int]] = {}
    for i, s in enumerate(sent_ids):
        if len(s) >= 2:
            by_len.setdefault(len(s), []).append(i)
    with bar("calibration.select perplexity: sentences scored", sum(map(len, by_len.values()))) as advance:
        for L, idx in by_len.items():
            for b in range(0, len(idx), batch_size):
                rows = idx[b:b + batch_size]
                ids = torch.tensor([sent_ids[i] for i in rows], dtype=torch.long, device=dev)     # (k, L)
                logits = model(input_ids=ids, use_cache=False).logits[:, :-1].float()
                nll = torch.nn.functional.cross_entropy(logits.transpose(1, 2), ids[:, 1:], reduction="none")
                out[rows] = nll.mean(1).cpu()
                advance(len(rows))
    return out


def select_perplexity(texts: list[str], tokenizer, samples: int, seqlen: int, seed: int, model=None,
                      candidates: int | None = None, bos: int | None = None, **_) -> torch.Tensor:
    """The lowest-perplexity sentences of the pool (all of them, or a seeded random `candidates`), packed in
    ascending perplexity.  # (samples, seqlen)
    With `bos` (protocol modelpress-eval/2), sentences are scored as the model will see them: after BOS."""
    if model is None:
        raise UserError("calibration.select perplexity needs the model to score texts: pass model= to "
                        "calibration_set, or choose random / zipcal-words / zipcal-coverage")
    sent = pool_sentences(texts, tokenizer, seqlen)
    if candidates is not None and candidates < len(sent):
        keep = np.sort(np.random.default_rng(seed).choice(len(sent), candidates, replace=False))
        sent = [sent[i] for i in keep]
    lp = sentence_log_perplexity(model, sent if bos is None else [[bos, *x] for x in sent])   # (n,)
    order = torch.argsort(lp, stable=True).tolist()
    return pack_sentences(sent, order, tokenizer, samples, seqlen)


# -------------------------------------------------------------------------------------------------------- cola

@torch.no_grad()
def window_activations(model, windows: torch.Tensor, bos: int | None = None, batch_size: int = 8) -> torch.Tensor:
    """COLA's per-sample activation vector: the mean over the window's tokens of every decoder layer's output
    (the BOS position, when given, is fed but not averaged), each layer's mean L2-normalised, concatenated.
    windows (n, T) -> (n, layers * hidden)"""
    dev = next(model.parameters()).device
    out = []
    with bar("calibration.select cola: windows embedded", windows.shape[0]) as advance:
        for b in range(0, windows.shape[0], batch_size):
            ids = windows[b:b + batch_size]                                                # (k, T)
            ids = prepend(ids, bos)
            hs = model(input_ids=ids.to(dev), output_hidden_states=True, use_cache=False).hidden_states[1:]
            means = [h[:, 0 if bos is None else 1:].float().mean(1) for h in hs]         # layers x (k, d)
            out.append(torch.cat([m / (m.norm(dim=1, keepdim=True) + 1e-8) for m in means], 1).cpu())
            advance(ids.shape[0])
    return torch.cat(out)


def kmeans_representatives(x: np.ndarray, k: int, seed: int, restarts: int = 10, iters: int = 300) -> list[int]:
    """Row index of the point nearest each k-means centroid (best inertia of `restarts` k-means++ runs);
    an empty cluster takes the nearest point not yet chosen, so exactly k distinct rows come back.  x (n, D)"""
    import warnings

    from scipy.cluster.vq import kmeans2
    rng = np.random.default_rng(seed)
    best = None
    for _ in range(restarts):
        with warnings.catch_warnings():            # empty clusters are handled below
            warnings.simplefilter("ignore")
            cent, lab = kmeans2(x, k, iter=iters, minit="++", missing="warn", seed=rng)
        inertia = float(((x - cent[lab]) ** 2).sum())
        if best is None or inertia < best[0]:
            best = (inertia, cent, lab)
    _, cent, lab = best
    d = ((x[:, None, :] - cent[None]) ** 2).sum(-1)                                        # (n, k)
    chosen: list[int] = []
    for c in range(k):
        members = np.flatnonzero(lab == c)
        pick = members[np.argmin(d[members, c])] if members.size else None
        if pick is None or pick in chosen:
            free = np.setdiff1d(np.arange(x.shape[0]), chosen)
            pick = free[np.argmin(d[free, c])]
        chosen.append(int(pick))
    return chosen


def cola_pick(act: torch.Tensor, samples: int, seed: int, reduced_dim: int = 64) -> list[int]:
    """COLA's choice among candidates with activation vectors act (n, D): seeded Gaussian projection to
    `reduced_dim`, then one representative per k-means cluster (k = samples)."""
    g = torch.Generator().manual_seed(seed)
    proj = torch.randn(act.shape[1], reduced_dim, generator=g) / reduced_dim ** 0.5       # (D, 64)
    x = (act @ proj).double().numpy()                                                      # (n, 64)
    return kmeans_representatives(x, samples, seed)


def select_cola(texts: list[str], tokenizer, samples: int, seqlen: int, seed: int, model=None,
                bos: int | None = None, reduced_dim: int = 64, **_) -> torch.Tensor:
    """COLA sample selection over the pool's `seqlen` windows: one representative per activation cluster.
    # (samples, seqlen)"""
    if model is None:
        raise UserError("calibration.select cola needs the model to embed texts: pass model= to "
                        "calibration_set, or choose random / zipcal-words / zipcal-coverage")
    cand = pool_windows(texts, tokenizer, seqlen, None, samples)                          # (n, seqlen)
    return cand[cola_pick(window_activations(model, cand, bos), samples, seed, reduced_dim)]


SELECTORS = {
    "random": select_random,
    "zipcal-words": select_zipcal_words,
    "zipcal-coverage": select_zipcal_coverage,
    "perplexity": select_perplexity,
    "cola": select_cola,
}
MODEL_BASED = ("perplexity", "cola")     # selectors that run the model over the pool (need `model=`)
