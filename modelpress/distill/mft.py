"""Mask fine-tuning (MFT, "Boosting LLMs with Mask Fine-Tuning", arXiv 2503.22764).

The weights of a trained model stay frozen; the linear layers of chosen decoder layers get one
real-valued score per weight, and the forward uses W * M with M the binary top-k mask of the scores
over the whole matrix (keep ratio, default 0.9: 10% of each matrix is removed). Scores train through
the straight-through estimator (modelpress.algos.mask.ste_mask); nothing else trains. `bake` turns
every MaskedLinear back into an ordinary nn.Linear holding W * M, so the result is a plain model that
transformers saves and loads.

Scores start at |W| / mean|W| (the initial mask is magnitude pruning; normalising makes the learning
rate independent of the weight scale) - our choice, documented here.
"""
from __future__ import annotations

import math
import re

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..algos import mask as MK
from ..errors import UserError
from ..model import decoder_layers, set_module


class MaskedLinear(nn.Module):
    """A frozen linear layer whose weight is multiplied by a learned top-k binary mask."""

    def __init__(self, lin: nn.Linear, keep: float = 0.9):
        super().__init__()
        if not 0.0 < keep <= 1.0:
            raise UserError(f"mft keep must be in (0, 1], got {keep}")
        self.in_features, self.out_features, self.keep = lin.in_features, lin.out_features, keep
        W = lin.weight.detach()
        self.weight = nn.Parameter(W.clone(), requires_grad=False)                        # (out, in)
        self.bias = None if lin.bias is None else nn.Parameter(lin.bias.detach().clone(), requires_grad=False)
        a = W.abs().float()
        self.scores = nn.Parameter((a / a.mean().clamp(min=1e-12)).to(W.dtype))           # (out, in)

    def mask(self) -> Tensor:
        """The current binary keep mask (bool, (out, in))."""
        return MK.topk_mask(self.scores, self.keep)

    def forward(self, x: Tensor) -> Tensor:
        return F.linear(x, self.weight * MK.ste_mask(self.scores, self.keep), self.bias)

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


def apply_masks(model: nn.Module, layers: list[int], keep: float = 0.9,
                include: str | None = None) -> dict[str, MaskedLinear]:
    """Replace the nn.Linear modules of the chosen decoder layers (optionally only names matching the
    regex `include`) by MaskedLinear, and freeze every parameter except the scores."""
    prefix, stack = decoder_layers(model)
    for p in model.parameters():
        p.requires_grad_(False)
    out: dict[str, MaskedLinear] = {}
    for i in layers:
        for name, mod in list(stack[i].named_modules()):
            full = f"{prefix}.{i}.{name}"
            if type(mod) is nn.Linear and (include is None or re.search(include, full)):
                m = MaskedLinear(mod, keep)
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


def lm_loss(model: nn.Module, ids: Tensor) -> Tensor:
    """Mean next-token cross entropy of a causal LM on token windows (batch, seq)."""
    logits = model(input_ids=ids, use_cache=False).logits[:, :-1]
    return F.cross_entropy(logits.reshape(-1, logits.shape[-1]).float(), ids[:, 1:].reshape(-1))


def train_masks(model: nn.Module, windows: Tensor, steps: int = 100, lr: float = 1e-2, batch_size: int = 4,
                seed: int = 0, log=None) -> list[float]:
    """Adam on the scores only, next-token loss on random batches of `windows` (n, seqlen).
    Returns the per-step training losses."""
    scores = [m.scores for m in masked_modules(model).values()]
    if not scores:
        raise UserError("mft: the model has no masked layers; call apply_masks first")
    opt = torch.optim.Adam(scores, lr=lr)
    g = torch.Generator().manual_seed(seed)
    dev = next(model.parameters()).device
    losses = []
    model.train()
    try:
        for step in range(steps):
            idx = torch.randint(0, windows.shape[0], (min(batch_size, windows.shape[0]),), generator=g)
            loss = lm_loss(model, windows[idx].to(dev))
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            losses.append(float(loss.detach()))
            if log is not None and (step % 10 == 0 or step == steps - 1):
                log(f"mft step {step + 1}/{steps}: loss {losses[-1]:.4f}")
    finally:
        model.eval()
    if not all(math.isfinite(x) for x in losses):
        raise UserError("mft: training loss became non-finite: lower --lr")
    return losses
