"""The token protocol shared by calibration and evaluation windows: which tokens a window holds.

modelpress-eval/1: texts tokenized without special tokens; a window is `seqlen` text tokens.
modelpress-eval/2 (the default): as /1, except where the tokenizer adds a BOS token by default. That is
    read from the tokenizer itself: `tokenizer("a")` (special tokens on) starts with one token more than
    `tokenizer("a", add_special_tokens=False)`, the rest being equal. Then every window is that BOS token
    followed by `seqlen - 1` text tokens, as the model saw text in training (the first position is the
    attention sink many families are trained with; without it perplexity can be several times worse and
    calibration activations lose that position). The BOS position is never a prediction target: next-token
    scoring predicts positions 2..seqlen from the ones before. Where the tokenizer adds no BOS (SmolLM2,
    Qwen2.5), /2 windows are exactly /1 windows, so /1 figures stay comparable.
"""
from __future__ import annotations

import torch
from torch import Tensor

from ..errors import UserError

V1, V2 = "modelpress-eval/1", "modelpress-eval/2"
PROTOCOLS = (V1, V2)
DEFAULT = V2


def check(protocol: str, field: str = "protocol") -> str:
    """The protocol name, validated (a one-line UserError naming `field` otherwise)."""
    if protocol not in PROTOCOLS:
        raise UserError(f"{field} {protocol!r} is unknown: use {V2} (BOS where the tokenizer adds one, the default) "
                        f"or {V1} (no special tokens, the earlier figures)")
    return protocol


def default_bos(tokenizer) -> int | None:
    """The token id the tokenizer prepends by default (its BOS), or None when it prepends nothing."""
    with_sp = list(tokenizer("a")["input_ids"])
    plain = list(tokenizer("a", add_special_tokens=False)["input_ids"])
    if len(with_sp) > len(plain) and with_sp[1:1 + len(plain)] == plain:
        return int(with_sp[0])
    return None


def window_bos(tokenizer, protocol: str = DEFAULT) -> int | None:
    """The token every window of `protocol` starts with for this tokenizer (None: windows are text only)."""
    return default_bos(tokenizer) if check(protocol) == V2 else None


def body_len(seqlen: int, bos: int | None) -> int:
    """Text tokens per window of `seqlen` tokens."""
    return seqlen - 1 if bos is not None else seqlen


def prepend(ids: Tensor, bos: int | None) -> Tensor:
    """Windows (n, L) of text tokens -> (n, L + 1) starting with `bos` (unchanged when bos is None)."""
    if bos is None:
        return ids
    return torch.cat([torch.full((ids.shape[0], 1), bos, dtype=ids.dtype), ids], dim=1)


def describe(tokenizer, protocol: str = DEFAULT) -> dict:
    """What a report / calibration.json records about the windows: the protocol and the BOS choice."""
    bos = window_bos(tokenizer, protocol)
    out = {"protocol": protocol, "bos": bos is not None, "bos_token_id": bos}
    if bos is not None:
        out["bos_token"] = tokenizer.convert_ids_to_tokens(bos)
    return out
