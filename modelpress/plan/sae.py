"""Capability density of attention heads and MLPs from small sparse autoencoders (SAEs), after
"Capability-Guided Compression" (Gupta, arXiv 2603.16440).

For every decoder layer, activations over the calibration text are collected per component:
  head h  the head's attention output, the o_proj input columns [h*d_h, (h+1)*d_h)      (tokens, d_h)
  MLP     the MLP output, down_proj(x) without bias                                   (tokens, hidden)
and one overcomplete SAE per component is trained on them (all heads of a layer at once, batched), with
F = expansion x d features (default 4x the component's width, no cap: 256 for a 64-wide head, 2304 for a
576-wide MLP output), a fixed seed, and one of two sparsity mechanisms:
  l1    f = relu((x - b_dec) W_enc + b_enc)  (tokens, F);   L = mean_t ||x_t - x_hat_t||^2 + l1 * mean_t sum_j f_tj
  topk  f = the k largest of relu((x - b_dec) W_enc + b_enc) per token, the rest 0;   L = mean_t ||x_t - x_hat_t||^2
x_hat = f W_dec + b_dec, rows of W_dec kept at unit norm; x is centred and scaled to mean ||x_t||^2 = 1 per
component, so l1 means the same everywhere. The reconstruction error of every SAE is recorded
(`nmse` = mean ||x - x_hat||^2 / mean ||x||^2 on the normalised activations, `fve` = 1 - nmse).

From the codes f over the calibration tokens, three numbers in [0, 1]:
  breadth      exp(H(u)) / F, u_j = sum_t f_tj / sum_tj f_tj: the effective share of the dictionary used;
  entropy      mean over active tokens of H(f_t / sum_j f_tj) / log F: how many features co-fire per token;
  consistency  mean pairwise cosine of the per-sample mean codes: the same features across inputs;
capability density = their weighted geometric mean (weights configurable; all 1 by default).

Source of the definitions: the paper's abstract names the three quantities (feature breadth, activation
entropy, cross-input consistency of a component's SAE feature activation distribution) and their
combination into a scalar capability density; its full text (exact formulas, SAE width and sparsity
mechanism) was not available to us. The formulas above are our reconstruction, an effective-number /
normalised-entropy / mean-cosine reading of those names, each scaled to [0, 1].

Also returned per component: the Wanda importance (mean |W_ij| ||X_j||_2 over the weights it owns: q_proj
rows and o_proj columns of a head; gate/up/down of an MLP) and the SAE's fraction of variance explained.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import Tensor, nn

from ..errors import UserError

METRICS = ("breadth", "entropy", "consistency")


@dataclass(frozen=True)
class SAEConfig:
    expansion: float = 4.0          # features per input dimension (>= 1: overcomplete)
    max_features: int | None = None  # optional cap on F (None: expansion x width, always)
    steps: int = 150                # Adam steps
    batch: int = 256                # tokens per step
    lr: float = 3e-3
    sparsity: str = "l1"            # l1 (ReLU codes + L1 penalty) | topk (k largest ReLU codes per token)
    l1: float = 0.05                # sparsity penalty on the normalised activations (sparsity l1)
    k: int = 16                     # active features per token (sparsity topk)
    max_tokens: int = 2048          # calibration tokens kept per component (evenly strided)
    seed: int = 0

    def __post_init__(self):
        if self.expansion < 1:
            raise UserError(f"SAE expansion must be >= 1 (overcomplete dictionary), got {self.expansion}")
        if self.sparsity not in ("l1", "topk"):
            raise UserError(f"SAE sparsity {self.sparsity!r} is unknown: use l1 or topk")
        if self.k < 1 or self.steps < 1 or self.batch < 1:
            raise UserError(f"SAE k, steps and batch must be >= 1, got {self.k}, {self.steps}, {self.batch}")

    def features(self, d: int) -> int:
        f = int(round(self.expansion * d))
        return max(4, f if self.max_features is None else min(self.max_features, f))

    def activate(self, pre: Tensor) -> Tensor:
        """Codes from encoder pre-activations (C, n, F): ReLU, then (topk) only the k largest per token."""
        f = torch.relu(pre)
        if self.sparsity == "topk" and self.k < f.shape[-1]:
            v, i = torch.topk(f, self.k, dim=-1)
            f = torch.zeros_like(f).scatter(-1, i, v)
        return f


@dataclass
class SAE:
    W_enc: Tensor                   # (C, d, F)
    b_enc: Tensor                   # (C, F)
    W_dec: Tensor                   # (C, F, d)
    b_dec: Tensor                   # (C, d)
    cfg: SAEConfig = SAEConfig()

    def encode(self, x: Tensor) -> Tensor:
        """x (C, n, d) -> codes (C, n, F) >= 0."""
        return self.cfg.activate(torch.bmm(x - self.b_dec[:, None], self.W_enc) + self.b_enc[:, None])

    def decode(self, f: Tensor) -> Tensor:
        return torch.bmm(f, self.W_dec) + self.b_dec[:, None]


def normalize(x: Tensor) -> Tensor:
    """Centre each component's activations and scale them to mean squared norm 1. x: (C, n, d)."""
    x = x.float() - x.float().mean(1, keepdim=True)
    return x / x.pow(2).sum(-1).mean(1).clamp(min=1e-12).sqrt()[:, None, None]


def train_sae(x: Tensor, cfg: SAEConfig = SAEConfig()) -> SAE:
    """Train C independent SAEs at once on normalised activations x (C, n, d)."""
    C, n, d = x.shape
    F = cfg.features(d)
    g = torch.Generator().manual_seed(cfg.seed)
    W_dec = torch.randn(C, F, d, generator=g)
    W_dec = W_dec / W_dec.norm(dim=-1, keepdim=True)
    p = {"W_enc": W_dec.transpose(1, 2).clone(), "b_enc": torch.zeros(C, F), "W_dec": W_dec,
         "b_dec": x.mean(1).clone()}
    for t in p.values():
        t.requires_grad_(True)
    opt = torch.optim.Adam(p.values(), lr=cfg.lr)
    with torch.enable_grad():
        for _ in range(cfg.steps):
            idx = torch.randint(0, n, (min(cfg.batch, n),), generator=g)
            xb = x[:, idx]                                                          # (C, b, d)
            f = cfg.activate(torch.bmm(xb - p["b_dec"][:, None], p["W_enc"]) + p["b_enc"][:, None])
            xh = torch.bmm(f, p["W_dec"]) + p["b_dec"][:, None]
            loss = (xb - xh).pow(2).sum(-1).mean() * C
            if cfg.sparsity == "l1":
                loss = loss + cfg.l1 * f.sum(-1).mean() * C
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            with torch.no_grad():
                p["W_dec"] /= p["W_dec"].norm(dim=-1, keepdim=True).clamp(min=1e-8)
    return SAE(*(p[k].detach() for k in ("W_enc", "b_enc", "W_dec", "b_dec")), cfg)


def _entropy(p: Tensor, dim: int = -1) -> Tensor:
    return -(p * torch.log(p.clamp(min=1e-30))).sum(dim)


def feature_breadth(f: Tensor) -> Tensor:
    """exp(H(u)) / F with u the share of total activation per feature. f: (C, n, F) -> (C,)."""
    u = f.sum(1)                                                                    # (C, F)
    u = u / u.sum(-1, keepdim=True).clamp(min=1e-30)
    return torch.exp(_entropy(u)) / f.shape[-1]


def activation_entropy(f: Tensor) -> Tensor:
    """Mean normalised entropy of each active token's code distribution. f: (C, n, F) -> (C,)."""
    s = f.sum(-1, keepdim=True)                                                     # (C, n, 1)
    h = _entropy(f / s.clamp(min=1e-30)) / math.log(f.shape[-1])                    # (C, n)
    act = (s[..., 0] > 0).float()
    return (h * act).sum(1) / act.sum(1).clamp(min=1)


def cross_input_consistency(f: Tensor, sample: Tensor) -> Tensor:
    """Mean pairwise cosine similarity of per-sample mean codes. f: (C, n, F); sample: (n,) ids -> (C,)."""
    ids = torch.unique(sample)
    if len(ids) < 2:
        raise UserError("capability density needs at least 2 calibration samples (cross-input consistency)")
    u = torch.stack([f[:, sample == i].mean(1) for i in ids], 1)                    # (C, S, F)
    u = u / u.norm(dim=-1, keepdim=True).clamp(min=1e-30)
    sim = torch.bmm(u, u.transpose(1, 2))                                           # (C, S, S)
    S = len(ids)
    return (sim.sum((1, 2)) - sim.diagonal(dim1=1, dim2=2).sum(-1)) / (S * (S - 1))


def combine(metrics: dict[str, Tensor], weights: dict[str, float] | None = None) -> Tensor:
    """Capability density: weighted geometric mean of the metrics (each (C,) in [0, 1])."""
    weights = weights or {k: 1.0 for k in METRICS}
    bad = [k for k in weights if k not in METRICS]
    if bad or not any(weights.values()) or any(v < 0 for v in weights.values()):
        raise UserError(f"density weights must be non-negative over {', '.join(METRICS)} (not all zero), got {weights}")
    tot = sum(weights.values())
    return torch.exp(sum(w * torch.log(metrics[k].clamp(min=1e-12)) for k, w in weights.items()) / tot)


def density_metrics(x: Tensor, sample: Tensor, cfg: SAEConfig = SAEConfig(),
                    weights: dict[str, float] | None = None) -> dict[str, Tensor]:
    """Train SAEs on raw activations x (C, n, d) (sample: (n,) calibration-sample id of each token) and
    return breadth, entropy, consistency, density, nmse (normalised reconstruction error), fve = 1 - nmse,
    l0 (active features per token) and features (F), each (C,)."""
    xn = normalize(x)
    sae = train_sae(xn, cfg)
    with torch.no_grad():
        f = sae.encode(xn)
        nmse = (xn - sae.decode(f)).pow(2).sum(-1).mean(1)                        # mean ||x||^2 = 1
        m = {"breadth": feature_breadth(f), "entropy": activation_entropy(f),
             "consistency": cross_input_consistency(f, sample)}
        m["density"] = combine(m, weights)
        m["nmse"] = nmse
        m["fve"] = 1 - nmse
        m["l0"] = (f > 0).float().sum(-1).mean(1)
        m["features"] = torch.full_like(nmse, float(f.shape[-1]))
    return m


def _wanda(W: Tensor, x_sq: Tensor) -> Tensor:
    return W.abs().float() * torch.sqrt(x_sq.float())[None, :]                     # (rows, cols)


def capability_scores(model: nn.Module, calib, target=None, cfg: SAEConfig | None = None,
                      weights: dict[str, float] | None = None) -> dict[tuple[int, str], dict[str, float]]:
    """{(layer, "head h" | "mlp"): {breadth, entropy, consistency, density, fve, l0, wanda}} for every decoder
    layer with targeted linears. One layer-wise pass over `calib`; `model` is not modified."""
    from ..engine import layerwise
    from ..model import attention_mlp_split, layer_linears
    from ..targets import Target
    cfg = cfg or SAEConfig()
    target = target or Target()
    cfg_m = getattr(model, "config", None)
    heads = getattr(cfg_m, "num_attention_heads", None) or getattr(cfg_m, "n_head", None)
    out: dict[tuple[int, str], dict[str, float]] = {}
    for step in layerwise.steps(model, calib):
        if not step.linears(target):
            continue
        full = layer_linears(step.layer, step.prefix)
        attn, mlp = attention_mlp_split(full)
        need = {n: full[n] for n in ([attn[0], attn[-1]] if attn else []) + mlp}
        x = step.collect(need, "inputs")
        n_tok = x[next(iter(need))].shape[0]
        sample = torch.arange(n_tok) // calib.seqlen
        keep = torch.arange(0, n_tok, max(1, n_tok // cfg.max_tokens))[: cfg.max_tokens]
        if attn:
            if not heads:
                raise UserError("capability budgets need config.num_attention_heads: use budget sensitivity or owl")
            q, o = attn[0], attn[-1]
            xo = x[o][keep]                                                          # (n, H * d_h)
            dh = xo.shape[1] // heads
            xh = xo.reshape(len(keep), heads, dh).transpose(0, 1)                   # (H, n, d_h)
            m = density_metrics(xh, sample[keep], cfg, weights)
            sq, so = _wanda(full[q].weight.detach(), (x[q] ** 2).sum(0)), _wanda(full[o].weight.detach(), (x[o] ** 2).sum(0))
            qd = sq.shape[0] // heads
            for h in range(heads):
                own = torch.cat([sq[h * qd:(h + 1) * qd].reshape(-1), so[:, h * dh:(h + 1) * dh].reshape(-1)])
                out[(step.index, f"head {h}")] = {k: float(v[h]) for k, v in m.items()} | {"wanda": float(own.mean())}
        if mlp:
            down = mlp[-1]
            y = (x[down][keep] @ full[down].weight.detach().float().t())[None]         # (1, n, hidden)
            m = density_metrics(y, sample[keep], cfg, weights)
            own = torch.cat([_wanda(full[n].weight.detach(), (x[n] ** 2).sum(0)).reshape(-1) for n in mlp])
            out[(step.index, "mlp")] = {k: float(v[0]) for k, v in m.items()} | {"wanda": float(own.mean())}
    return out
