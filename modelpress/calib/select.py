"""Calibration-sample selection: turn a pool of texts into `samples` token windows of `seqlen`.

`random`: the pool's texts are concatenated in a seeded random order, tokenized, and `samples`
windows are taken at seeded random offsets (the classic GPTQ/Wanda protocol)."""
from __future__ import annotations

import torch

from ..errors import UserError


def _token_stream(texts: list[str], tokenizer, order: list[int]) -> torch.Tensor:
    ids: list[int] = []
    sep = tokenizer("\n\n", add_special_tokens=False)["input_ids"]
    for i in order:
        ids.extend(tokenizer(texts[i], add_special_tokens=False)["input_ids"])
        ids.extend(sep)
    return torch.tensor(ids, dtype=torch.long)


def select_random(texts: list[str], tokenizer, samples: int, seqlen: int, seed: int, **_) -> torch.Tensor:
    """`samples` windows of `seqlen` tokens at seeded random offsets of the shuffled pool.  # (samples, seqlen)"""
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


SELECTORS = {"random": select_random}
