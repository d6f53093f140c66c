"""Calibration-sample selection: turn a pool of texts into `samples` token windows of `seqlen`.

Every selector has the signature
    fn(texts: list[str], tokenizer, samples: int, seqlen: int, seed: int, model=None, bos=None, **_)
        -> LongTensor (samples, seqlen)
and is deterministic for a given seed. Registry: SELECTORS. `seqlen` is the number of TEXT tokens; the
caller (calib.calibration_set) prepends `bos` under protocol modelpress-eval/2 (calib.protocol).

`random`: the pool's texts are concatenated in a seeded random order, tokenized, and `samples`
    windows are taken at seeded random offsets (the classic GPTQ/Wanda protocol).
`zipcal-words`: ZipCal's frequency-preserving sampler ("Frequency Matters: Fast Model-Agnostic Data
    Curation for Pruning and Quantization", arXiv 2603.16105). All lowercased whitespace words of the
    pool are shuffled globally with the seed, so every sample is an i.i.d.-like draw from the pool's
    Zipfian unigram distribution instead of a few bursty documents; the shuffled words are joined,
    tokenized and packed into fixed-length samples. O(pool words).
`zipcal-coverage`: ZipCal's lexical-diversity objective as greedy maximum coverage of normalised
    token types (token strings stripped of whitespace markers and lowercased) over the pool's
    non-overlapping windows. Each round scores a random subset of the remaining windows by the number
    of not-yet-covered types and keeps the best ("stochastic greedy", Mirzasoleiman et al., arXiv
    1409.7938: subsets of (n / samples) ln(1/eps) candidates give a (1 - 1/e - eps) approximation in
    O(n ln(1/eps)) set evaluations, i.e. linear in the pool).
`perplexity`: the model-based slow baseline. `candidates` windows (default 4 x samples) cut from
    the pool's documents in a seeded random order are scored by the model's perplexity and the
    `samples` windows closest to the median log-perplexity are kept. Keeping the middle of the perplexity distribution (dropping both the
    lowest, often boilerplate/repetitive, and the highest, often noisy, text) follows the
    perplexity-based data-pruning practice of Marion et al. (arXiv 2309.04564) and the outlier
    filtering used for self-generated calibration data (Ji et al., arXiv 2410.17711). Needs `model`."""
from __future__ import annotations

import math

import numpy as np
import torch

from ..errors import UserError

PERPLEXITY_CANDIDATES = 4      # perplexity selector scores this many candidates per requested sample
COVERAGE_EPS = 0.01            # stochastic-greedy accuracy: candidates per round = (n / samples) ln(1/eps)


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
    """Globally shuffled pool words packed into `samples` windows of `seqlen` tokens.  # (samples, seqlen)

    Each whitespace word gives at least one token, so `samples * seqlen` shuffled words always suffice;
    a pool with fewer words is reshuffled (a fresh permutation per pass) until the budget is met."""
    _check_pool(texts)
    words = pool_words(texts)
    if not words:
        raise UserError("calibration source has no words: give it some text")
    rng = np.random.default_rng(seed)
    need = samples * seqlen
    ids: list[int] = []
    while len(ids) < need:
        perm = rng.permutation(len(words))
        chunk = perm[: need - len(ids)]                       # >= 1 token per word
        ids.extend(tokenizer(" ".join(words[j] for j in chunk), add_special_tokens=False)["input_ids"])
    return torch.tensor(ids[:need], dtype=torch.long).reshape(samples, seqlen)


# -------------------------------------------------------------------------------------- windows of the pool

def pool_windows(texts: list[str], tokenizer, seqlen: int, seed: int, samples: int,
                 limit: int | None = None) -> torch.Tensor:
    """Non-overlapping `seqlen` windows of the pool joined in a seeded random document order; with
    `limit`, only as many documents are tokenized as give `limit` windows.  # (n, seqlen)"""
    _check_pool(texts)
    order = np.random.default_rng(seed).permutation(len(texts)).tolist()
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
    """Map token ids to normalised type indices: the token's text stripped of whitespace markers and
    lowercased (so "The", " the", "the" are one type); whitespace-only tokens map to -1.  # same shape as ids"""
    uniq, inv = np.unique(ids, return_inverse=True)
    strings = tokenizer.batch_decode([[int(u)] for u in uniq])
    index: dict[str, int] = {}
    tmap = np.empty(len(uniq), dtype=np.int64)
    for j, s in enumerate(strings):
        key = s.strip().lower()
        tmap[j] = index.setdefault(key, len(index)) if key else -1
    return tmap[inv].reshape(ids.shape)


def window_type_sets(types: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Distinct non-negative types of every window as CSR (flat, offsets).  types: (n, seqlen)"""
    s = np.sort(types, axis=1)                                          # (n, seqlen)
    first = np.ones_like(s, dtype=bool)
    first[:, 1:] = s[:, 1:] != s[:, :-1]
    first &= s >= 0
    counts = first.sum(1)                                               # (n,)
    offsets = np.zeros(len(s) + 1, dtype=np.int64)
    np.cumsum(counts, out=offsets[1:])
    return s[first], offsets


def stochastic_greedy_cover(flat: np.ndarray, offsets: np.ndarray, n_types: int, k: int, seed: int,
                            eps: float = COVERAGE_EPS) -> list[int]:
    """Pick k sets (CSR rows) greedily maximising the number of covered elements; each round evaluates a
    seeded random subset of ceil((n / k) ln(1/eps)) remaining rows. O(n ln(1/eps)) set evaluations."""
    n = len(offsets) - 1
    rng = np.random.default_rng(seed)
    covered = np.zeros(max(n_types, 1), dtype=bool)
    remaining = np.ones(n, dtype=bool)
    m = max(1, math.ceil(n / k * math.log(1 / eps)))
    chosen: list[int] = []
    for _ in range(k):
        pool = np.flatnonzero(remaining)
        cand = pool if len(pool) <= m else rng.choice(pool, m, replace=False)
        lens = offsets[cand + 1] - offsets[cand]                         # (m,)
        starts = np.repeat(offsets[cand] - np.concatenate(([0], np.cumsum(lens)[:-1])), lens)
        elems = flat[np.arange(lens.sum()) + starts]                    # concatenated sets of the candidates
        new = ~covered[elems]
        seg = np.repeat(np.arange(len(cand)), lens)
        gain = np.bincount(seg, weights=new, minlength=len(cand))       # (m,)
        best = int(cand[int(np.argmax(gain))])
        chosen.append(best)
        remaining[best] = False
        covered[flat[offsets[best]:offsets[best + 1]]] = True
    return chosen


def select_zipcal_coverage(texts: list[str], tokenizer, samples: int, seqlen: int, seed: int, **_) -> torch.Tensor:
    """Pool windows chosen by stochastic-greedy max coverage of normalised token types.  # (samples, seqlen)"""
    win = pool_windows(texts, tokenizer, seqlen, seed, samples)         # (n, seqlen)
    types = normalised_types(win.numpy(), tokenizer)                   # (n, seqlen)
    flat, offsets = window_type_sets(types)
    chosen = stochastic_greedy_cover(flat, offsets, int(types.max()) + 1, samples, seed)
    return win[chosen]


# ---------------------------------------------------------------------------------------------- perplexity

@torch.no_grad()
def window_log_perplexity(model, windows: torch.Tensor, batch_size: int = 4) -> torch.Tensor:
    """Mean next-token NLL (log-perplexity) of each window under `model`.  windows: (n, seqlen) -> (n,)"""
    dev = next(model.parameters()).device
    out = []
    for b in range(0, windows.shape[0], batch_size):
        ids = windows[b:b + batch_size].to(dev)
        logits = model(input_ids=ids, use_cache=False).logits[:, :-1].float()
        nll = torch.nn.functional.cross_entropy(logits.transpose(1, 2), ids[:, 1:], reduction="none")
        out.append(nll.mean(1).cpu())
    return torch.cat(out)


def middle_ranks(scores: torch.Tensor, k: int) -> torch.Tensor:
    """Indices of the k scores closest to the median (ties by index).  scores: (n,) -> (k,)"""
    med = scores.median()
    return torch.sort(torch.argsort((scores - med).abs(), stable=True)[:k]).values


def select_perplexity(texts: list[str], tokenizer, samples: int, seqlen: int, seed: int, model=None,
                      candidates: int | None = None, bos: int | None = None, **_) -> torch.Tensor:
    """Middle-perplexity windows among a seeded random subset of candidate windows.  # (samples, seqlen)
    With `bos` (protocol modelpress-eval/2), candidates are scored as the model will see them: after BOS."""
    if model is None:
        raise UserError("calibration.select perplexity needs the model to score texts: pass model= to "
                        "calibration_set, or choose random / zipcal-words / zipcal-coverage")
    c = candidates or PERPLEXITY_CANDIDATES * samples
    cand = pool_windows(texts, tokenizer, seqlen, seed, samples, limit=c)   # (c, seqlen), seeded documents
    scored = cand if bos is None else torch.cat([torch.full((len(cand), 1), bos, dtype=cand.dtype), cand], 1)
    lp = window_log_perplexity(model, scored)                          # (c,)
    return cand[middle_ranks(lp, samples)]


SELECTORS = {
    "random": select_random,
    "zipcal-words": select_zipcal_words,
    "zipcal-coverage": select_zipcal_coverage,
    "perplexity": select_perplexity,
}
