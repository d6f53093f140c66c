"""Perplexity and agreement with a frozen, documented protocol."""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..calib import protocol as _protocol
from ..errors import UserError

PROTOCOL = ("modelpress-eval/1: texts joined by blank lines, tokenized once without special tokens, cut "
            "into non-overlapping windows of `seqlen` tokens (remainder dropped), first `windows` windows; "
            "each window scored independently (no carried context); NLL over positions 2..seqlen; "
            "perplexity = exp(total NLL / predicted tokens). Agreement = fraction of predicted positions "
            "where argmax logits match the reference model; KL = mean KL(reference || model) per position.")
PROTOCOLS = {_protocol.V1: PROTOCOL,
             _protocol.V2: ("modelpress-eval/2 (default): as modelpress-eval/1, except where the tokenizer adds a "
                            "BOS token by default (tokenizer('a') with special tokens starts with one token more; "
                            "modelpress.calib.protocol): then every window is that BOS followed by `seqlen` - 1 text "
                            "tokens, and the BOS is never a prediction target. Calibration windows likewise.")}


def default_seqlen() -> int:
    """The protocol's default window: 512 tokens on CPU, 2048 on GPU."""
    return 2048 if torch.cuda.is_available() else 512


def eval_windows(tokenizer, texts: list[str], seqlen: int | None = None, windows: int | None = 32,
                 protocol: str = _protocol.DEFAULT) -> Tensor:
    """Non-overlapping token windows (n, seqlen) of the joined texts (seqlen None: default_seqlen()). Under
    modelpress-eval/2 (the default) each window is the tokenizer's default BOS (if it adds one) followed by
    seqlen - 1 text tokens; the BOS is never a prediction target (next-token scoring starts at position 2)."""
    seqlen = seqlen or default_seqlen()
    if seqlen < 2:
        raise UserError(f"evaluate.seqlen must be >= 2, got {seqlen}")
    _protocol.check(protocol, "evaluate.protocol")
    bos = _protocol.window_bos(tokenizer, protocol)
    full, seqlen = seqlen, _protocol.body_len(seqlen, bos)
    ids: list[int] = []
    limit = None if windows is None else windows * seqlen
    for t in texts:
        ids.extend(tokenizer(t + "\n\n", add_special_tokens=False)["input_ids"])
        if limit is not None and len(ids) >= limit:
            break
    n = len(ids) // seqlen if windows is None else min(windows, len(ids) // seqlen)
    if n == 0:
        raise UserError(f"evaluation text has {len(ids)} tokens, fewer than one window of {full}: "
                        "give more text or lower --seqlen")
    return _protocol.prepend(torch.tensor(ids[: n * seqlen], dtype=torch.long).reshape(n, seqlen), bos)


def _device(model: nn.Module) -> torch.device:
    return next(model.parameters()).device


@torch.no_grad()
def evaluate(model: nn.Module, windows: Tensor, reference: nn.Module | None = None,
             batch_size: int = 2) -> dict:
    """Perplexity of `model` on `windows`; with `reference`, also agreement, KL and max |logit diff|,
    plus per-token arrays under "per_token" (agree, kl, linf, nll: (n, seqlen - 1))."""
    nll, agree, kl, linf, ref_nll = [], [], [], [], []
    for b in range(0, windows.shape[0], batch_size):
        ids = windows[b:b + batch_size]
        logits = model(input_ids=ids.to(_device(model)), use_cache=False).logits[:, :-1].float().cpu()
        tgt = ids[:, 1:]
        lp = F.log_softmax(logits, -1)
        nll.append(-lp.gather(-1, tgt[..., None])[..., 0])
        if reference is not None:
            rlogits = reference(input_ids=ids.to(_device(reference)), use_cache=False).logits[:, :-1].float().cpu()
            rlp = F.log_softmax(rlogits, -1)
            ref_nll.append(-rlp.gather(-1, tgt[..., None])[..., 0])
            agree.append(logits.argmax(-1) == rlogits.argmax(-1))
            kl.append((rlp.exp() * (rlp - lp)).sum(-1).clamp(min=0))
            linf.append((logits - rlogits).abs().amax(-1))
    nll_t = torch.cat(nll)
    out = {"perplexity": math.exp(float(nll_t.double().mean())), "tokens": nll_t.numel(),
           "windows": windows.shape[0], "seqlen": windows.shape[1]}
    if reference is not None:
        a, k, li, rn = torch.cat(agree), torch.cat(kl), torch.cat(linf), torch.cat(ref_nll)
        out.update(reference_perplexity=math.exp(float(rn.double().mean())), agreement=float(a.float().mean()),
                   kl=float(k.double().mean()), linf=float(li.max()),
                   per_token={"agree": a, "kl": k, "linf": li, "nll": nll_t})
    return out


def perplexity(model: nn.Module, windows: Tensor, batch_size: int = 2) -> float:
    return evaluate(model, windows, batch_size=batch_size)["perplexity"]


def compare(orig: nn.Module, comp: nn.Module, windows: Tensor, batch_size: int = 2) -> dict:
    """Agreement/KL/linf of `comp` against `orig` (with per-token arrays) and both perplexities."""
    return evaluate(comp, windows, reference=orig, batch_size=batch_size)
