"""Mask fine-tuning (MFT, "Boosting LLMs with Mask Fine-Tuning", arXiv 2503.22764; official code
Ming-K9/MFT on GitHub).

The weights of a (fully fine-tuned) model stay frozen; the linear layers of chosen decoder layers get one
real-valued score per weight, and the forward uses W * M with M the binary mask of the top-k |scores| over
the whole matrix (keep ratio, default 0.9: 10% of each matrix is removed; the official configs call this
`sparsity_attn/mlp: 0.9` and keep that share). Scores train through the straight-through estimator
(modelpress.algos.mask.ste_mask); nothing else trains. `bake` turns every MaskedLinear back into an
ordinary nn.Linear holding W * M, so the result is a plain model that transformers saves and loads.

As the official code does it (its patched modeling_llama.py and configs/train_configs/*_local_masktune.yaml):
- init "random" (default): scores ~ N(0, initializer_range), which is what transformers' `_init_weights`
  gives the score tensors missing from the fine-tuned checkpoint; the starting mask is a random 10% cut;
- training (`fit`): AdamW, weight decay 0, lr 2e-5, linear schedule with 3% warmup, 2 epochs over the
  shuffled data, loss on the response tokens only (`sft_tensors` sets the prompt's labels to -100);
- the official script for LLaMA2-7B masks layers 4-7 of 32 ("local" subnet, attention and MLP).
Deviation, offered as an option: init "magnitude" starts from |W| / mean|W| (the initial mask is magnitude
pruning); it needs a larger learning rate (~1e-2) because the scores then have scale 1, not 0.02.
"""
from __future__ import annotations

import math
import re
import time

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..algos import mask as MK
from ..errors import UserError
from ..model import decoder_layers, set_module


INITS = ("random", "magnitude")


class MaskedLinear(nn.Module):
    """A frozen linear layer whose weight is multiplied by a learned binary mask: the top-k |scores|."""

    def __init__(self, lin: nn.Linear, keep: float = 0.9, init: str = "random", std: float = 0.02,
                 generator: torch.Generator | None = None):
        super().__init__()
        if not 0.0 < keep <= 1.0:
            raise UserError(f"mft keep must be in (0, 1], got {keep}")
        if init not in INITS:
            raise UserError(f"mft init must be one of {', '.join(INITS)}, got {init!r}")
        self.in_features, self.out_features, self.keep = lin.in_features, lin.out_features, keep
        W = lin.weight.detach()
        self.weight = nn.Parameter(W.clone(), requires_grad=False)                        # (out, in)
        self.bias = None if lin.bias is None else nn.Parameter(lin.bias.detach().clone(), requires_grad=False)
        if init == "random":
            S = torch.randn(W.shape, generator=generator) * std                           # (out, in)
        else:
            a = W.abs().float()
            S = a / a.mean().clamp(min=1e-12)
        self.scores = nn.Parameter(S.to(device=W.device, dtype=W.dtype))

    def mask(self) -> Tensor:
        """The current binary keep mask (bool, (out, in))."""
        return MK.topk_mask(self.scores.abs(), self.keep)

    def forward(self, x: Tensor) -> Tensor:
        return F.linear(x, self.weight * MK.ste_mask(self.scores.abs(), self.keep), self.bias)

    def baked(self) -> nn.Linear:
        lin = nn.Linear(self.in_features, self.out_features, bias=self.bias is not None,
                        dtype=self.weight.dtype, device=self.weight.device)
        lin.weight.data = (self.weight.detach() * self.mask()).clone()
        if self.bias is not None:
            lin.bias.data = self.bias.detach().clone()
        return lin

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, keep={self.keep}"


def parse_layers(spec: str, n_layers: int) -> list[int]:
    """"4-7" -> [4, 5, 6, 7]; "4-7,10" and "all" also work; indices checked against the model depth."""
    if spec.strip() == "all":
        return list(range(n_layers))
    out: list[int] = []
    for part in spec.split(","):
        m = re.fullmatch(r"\s*(\d+)\s*(?:-\s*(\d+))?\s*", part)
        if not m:
            raise UserError(f"--layers {spec!r}: use ranges of decoder layer indices like 4-7 or 4-7,10 or all")
        a, b = int(m[1]), int(m[2] if m[2] is not None else m[1])
        if a > b or b >= n_layers:
            raise UserError(f"--layers {spec!r}: the model has decoder layers 0-{n_layers - 1}; give a range inside it")
        out.extend(range(a, b + 1))
    return sorted(set(out))


def apply_masks(model: nn.Module, layers: list[int], keep: float = 0.9, include: str | None = None,
                init: str = "random", seed: int = 0) -> dict[str, MaskedLinear]:
    """Replace the nn.Linear modules of the chosen decoder layers (optionally only names matching the
    regex `include`) by MaskedLinear, and freeze every parameter except the scores. Random scores use the
    model config's initializer_range (0.02 if absent) and one generator seeded with `seed`."""
    prefix, stack = decoder_layers(model)
    std = float(getattr(getattr(model, "config", None), "initializer_range", 0.02) or 0.02)
    gen = torch.Generator().manual_seed(seed)
    for p in model.parameters():
        p.requires_grad_(False)
    out: dict[str, MaskedLinear] = {}
    for i in layers:
        for name, mod in list(stack[i].named_modules()):
            full = f"{prefix}.{i}.{name}"
            if type(mod) is nn.Linear and (include is None or re.search(include, full)):
                m = MaskedLinear(mod, keep, init, std, gen)
                set_module(model, full, m)
                out[full] = m
    if not out:
        raise UserError(f"mft found no linear layers in decoder layers {layers}"
                        + (f" matching {include!r}" if include else "") + ": check --layers")
    return out


def masked_modules(model: nn.Module) -> dict[str, MaskedLinear]:
    return {n: m for n, m in model.named_modules() if isinstance(m, MaskedLinear)}


def bake(model: nn.Module) -> nn.Module:
    """Replace every MaskedLinear by a plain nn.Linear holding W * M (in place); returns the model."""
    for name, m in masked_modules(model).items():
        set_module(model, name, m.baked())
    return model


def mask_stats(model: nn.Module) -> dict[str, dict]:
    """Per masked layer: kept and pruned weight counts and the fraction that changed from |W| order."""
    out = {}
    for name, m in masked_modules(model).items():
        mk = m.mask()
        init = MK.topk_mask(m.weight.abs(), m.keep)
        out[name] = {"kept": int(mk.sum()), "pruned": int((~mk).sum()),
                     "changed_vs_magnitude": float((mk != init).float().mean())}
    return out


def sft_tensors(tok, pairs: list[tuple[str, str]], max_len: int) -> tuple[Tensor, Tensor]:
    """Token ids and labels for supervised fine-tuning on (prompt, response) pairs: prompt + response + EOS,
    right-padded to the longest row (at most max_len, cut from the left of the prompt); labels are -100
    everywhere except the response and its EOS (the response-masked loss of the official finetune.py).
    Returns ids (n, seq) and labels (n, seq)."""
    rows = []
    for prompt, response in pairs:
        p = tok(prompt, add_special_tokens=False)["input_ids"]
        r = tok(response, add_special_tokens=False)["input_ids"] + [tok.eos_token_id]
        if len(r) >= max_len:
            raise UserError(f"a response is {len(r)} tokens, max_len {max_len} leaves no room for its prompt: raise max_len")
        p = p[max(0, len(p) + len(r) - max_len):]
        rows.append((p + r, [-100] * len(p) + r))
    seq = max(len(i) for i, _ in rows)
    pad = tok.pad_token_id if tok.pad_token_id is not None else tok.eos_token_id
    ids = torch.full((len(rows), seq), pad, dtype=torch.long)
    labels = torch.full((len(rows), seq), -100, dtype=torch.long)
    for k, (i, lab) in enumerate(rows):
        ids[k, :len(i)] = torch.tensor(i)
        labels[k, :len(lab)] = torch.tensor(lab)
    return ids, labels


def lm_loss(model: nn.Module, ids: Tensor, labels: Tensor | None = None) -> Tensor:
    """Mean next-token cross entropy of a causal LM on token rows (batch, seq); with `labels` only the
    positions whose label is not -100 count (response-masked SFT loss)."""
    logits = model(input_ids=ids, use_cache=False).logits[:, :-1]                    # (batch, seq-1, vocab)
    target = (ids if labels is None else labels)[:, 1:]
    return F.cross_entropy(logits.reshape(-1, logits.shape[-1]).float(), target.reshape(-1), ignore_index=-100)


def _trim(ids: Tensor, labels: Tensor | None) -> tuple[Tensor, Tensor | None]:
    """Drop the trailing columns where no row has a label (right padding) - they cannot change the loss."""
    if labels is None:
        return ids, None
    cols = (labels != -100).any(0).nonzero()
    n = int(cols.max()) + 1 if cols.numel() else 1
    return ids[:, :n], labels[:, :n]


def fit(model: nn.Module, params: list[Tensor], ids: Tensor, labels: Tensor | None = None, steps: int = 100,
        lr: float = 2e-5, batch_size: int = 4, seed: int = 0, warmup_ratio: float = 0.03,
        log=None) -> list[float]:
    """The official training loop: AdamW (weight decay 0) on `params`, transformers' linear schedule with
    warmup_ratio * steps warmup steps, batches drawn without replacement from a seeded permutation of the
    rows (a new one each epoch). ids/labels: (n, seq). Returns the per-step training losses."""
    from transformers import get_linear_schedule_with_warmup
    if not params:
        raise UserError("fit: no trainable parameters (call apply_masks first, or pass the model's parameters)")
    opt = torch.optim.AdamW(params, lr=lr, weight_decay=0.0)
    sched = get_linear_schedule_with_warmup(opt, math.ceil(warmup_ratio * steps), steps)
    g = torch.Generator().manual_seed(seed)
    dev = next(model.parameters()).device
    n, bs = ids.shape[0], min(batch_size, ids.shape[0])
    order: list[int] = []
    losses = []
    t0 = time.perf_counter()
    model.train()
    try:
        for step in range(steps):
            if len(order) < bs:
                order += torch.randperm(n, generator=g).tolist()
            idx, order = order[:bs], order[bs:]
            x, y = _trim(ids[idx], None if labels is None else labels[idx])
            loss = lm_loss(model, x.to(dev), None if y is None else y.to(dev))
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            sched.step()
            losses.append(float(loss.detach()))
            if log is not None and (step % 10 == 0 or step == steps - 1):
                eta = (time.perf_counter() - t0) / (step + 1) * (steps - step - 1)
                log(f"step {step + 1}/{steps}: loss {losses[-1]:.4f}, ETA {eta:.0f} s")
    finally:
        model.eval()
    if not all(math.isfinite(x) for x in losses):
        raise UserError("training loss became non-finite: lower the learning rate (--lr)")
    return losses


def train_masks(model: nn.Module, windows: Tensor, steps: int = 100, lr: float = 2e-5, batch_size: int = 4,
                seed: int = 0, log=None, labels: Tensor | None = None, warmup_ratio: float = 0.03) -> list[float]:
    """Train the mask scores only (`fit` on them); windows (n, seq) with optional SFT labels (n, seq)."""
    scores = [m.scores for m in masked_modules(model).values()]
    if not scores:
        raise UserError("mft: the model has no masked layers; call apply_masks first")
    return fit(model, scores, windows, labels, steps, lr, batch_size, seed, warmup_ratio,
               log=None if log is None else (lambda m: log("mft " + m)))
