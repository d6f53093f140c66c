"""Stage `cluster`: weight clustering into K-entry fp16 codebooks with log2(K)-bit indices (arXiv 2603.17917),
one codebook per matrix or per group of output channels, optionally sensitivity-weighted (SqueezeLLM-style,
arXiv 2306.07629, with per-input-channel statistics from the layer-wise engine), optionally followed by
centroid fine-tuning: indices frozen, only the centroids trained on the calibration text, by next-token loss
over the whole model or by layer-output MSE layer by layer (dL/dc = sum of dL/dw over each cluster)."""
from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass

import torch
from torch import Tensor, nn

from ..engine import layerwise
from ..algos import cluster as C
from ..algos import quant
from ..errors import UserError
from ..model import set_module
from ..modules.cluster import ClusteredLinear
from ..targets import Target
from . import _check


@dataclass(frozen=True)
class Cluster:
    k: int = 16                           # centroids per codebook: 8 | 16 | 32 | 64 | 256
    group_rows: int | None = None         # null = one codebook per matrix; N = one per N output channels
    weighting: str = "none"               # none | activation (||x_j||) | hessian-diag (H_jj ~ sum x_j^2)
    iters: int = 100                      # Lloyd iterations (stops earlier when assignments settle)
    seed: int = 0                         # jitter of the quantile init
    finetune: bool = False                # train the centroids (indices frozen) on the calibration text
    steps: int = 32                       # fine-tuning steps (per layer for layer-mse)
    lr: float = 1e-3                      # Adam step, relative to each matrix's weight std
    objective: str = "next-token"         # next-token | layer-mse
    batch_size: int = 4                   # next-token: calibration samples per step
    include: tuple[str, ...] = ()
    exclude: tuple[str, ...] = ("lm_head",)
    budget: str = "uniform"               # uniform | capability | sensitivity | owl: per-linear K, mean log2 K ~ log2 k
    budget_spread: float | None = None    # how far budgets move from the mean (bits of log2 K; default 1.0)

    def __post_init__(self):
        _check.choice("cluster", "k", self.k, C.KS)
        _check.budget("cluster", self.budget, self.budget_spread, 6.0)
        if self.group_rows is not None:
            _check.int_range("cluster", "group_rows", self.group_rows, 1, 1 << 20)
        _check.choice("cluster", "weighting", self.weighting, ("none", "activation", "hessian-diag"))
        _check.int_range("cluster", "iters", self.iters, 1, 10000)
        _check.int_range("cluster", "seed", self.seed, 0, 2 ** 63 - 1)
        if not isinstance(self.finetune, bool):
            raise UserError(f"cluster.finetune must be true or false, got {self.finetune!r}")
        _check.int_range("cluster", "steps", self.steps, 1, 100000)
        _check.float_range("cluster", "lr", self.lr, 0.0, 1.0)
        _check.choice("cluster", "objective", self.objective, ("next-token", "layer-mse"))
        _check.int_range("cluster", "batch_size", self.batch_size, 1, 4096)
        _check.patterns("cluster", "include", self.include)
        _check.patterns("cluster", "exclude", self.exclude)

    @property
    def target(self) -> Target:
        return Target(self.include, self.exclude)

    @property
    def needs_calibration(self) -> bool:
        return self.weighting != "none" or self.finetune or self.budget != "uniform"

    def budget_map(self, model, calib) -> dict[str, int]:
        """{linear name: K} from modelpress.plan's per-linear bits (K = the allowed size nearest 2^bits)."""
        if self.budget == "uniform":
            return {}
        from ..plan import budget_map
        bits = budget_map(model, calib, self.budget, math.log2(self.k), "bits", self.target, self.budget_spread)
        return {n: min(C.KS, key=lambda k: abs(math.log2(k) - b)) for n, b in bits.items()}

    def describe(self) -> str:
        g = f"per {self.group_rows} rows" if self.group_rows else "per matrix"
        w = "" if self.weighting == "none" else f" {self.weighting}-weighted"
        return f"K={self.k} {g}{w}" + (f" + {self.objective} fine-tuning ({self.steps} steps)" if self.finetune else "")

    def col_weight(self, stat: Tensor | None) -> Tensor | None:
        """Per-input-channel sensitivity from sum_t x_tj^2."""
        if self.weighting == "none" or stat is None:
            return None
        return stat.float().clamp(min=0).sqrt() if self.weighting == "activation" else stat.float()

    def cluster_one(self, name: str, lin: nn.Linear, stat: Tensor | None) -> tuple[ClusteredLinear, dict]:
        if type(lin) is not nn.Linear:
            raise UserError(f"{name} is already compressed ({type(lin).__name__}): put cluster first or exclude it")
        if self.group_rows and lin.out_features % self.group_rows:
            raise UserError(f"cluster.group_rows {self.group_rows} does not divide {name}'s {lin.out_features} "
                            "output channels: choose a divisor or exclude that layer")
        W = lin.weight.detach().float()
        cw = self.col_weight(stat)
        codebook, idx = C.cluster_matrix(W, self.k, self.group_rows, cw, self.iters, self.seed)
        new = ClusteredLinear.build(lin, codebook, idx, self.group_rows)
        W_hat = new.weight.detach().float()
        info = {"kind": "ClusteredLinear", "k": self.k, "codebooks": codebook.shape[0],
                "bits": new.bits_per_weight(), "sqnr": quant.sqnr(W, W_hat),
                "unique": int(torch.unique(W_hat).numel())}
        if cw is not None:
            info["weighted_sse"] = C.sse(W, W_hat, cw)
        return new, info

    def apply(self, model, calib=None) -> dict:
        if self.needs_calibration and calib is None:
            raise UserError("cluster.weighting / cluster.finetune need calibration data: add a `calibration:` "
                            "block, or use weighting: none and finetune: false")
        names = {id(m): n for n, m in model.named_modules()}
        collect = "none" if self.weighting == "none" else "input_sq_norm"

        per = self.budget_map(model, calib)

        def do(linears, stats):
            out, mods = {}, {}
            for name, lin in linears.items():
                cfg = dataclasses.replace(self, k=per[name], budget="uniform") if name in per else self
                new, info = cfg.cluster_one(name, lin, stats.get(name))
                set_module(model, names[id(lin)], new)
                out[name], mods[name] = info, new
            return out, mods

        ft: dict = {}
        if self.finetune and self.objective == "layer-mse":
            layers = {}
            for step in layerwise.steps(model, calib):
                linears = step.linears(self.target)
                if not linears:
                    continue
                stats = step.collect(linears, collect)
                targets = step.outputs()                      # the layer's outputs before clustering
                out, mods = do(linears, stats)
                first, last = finetune_layer(step, mods, targets, self.steps, self.lr)
                for n in out:
                    out[n].update(ft_loss_before=first, ft_loss_after=last)
                layers.update(out)
            if layers:
                v = list(layers.values())
                ft = {"loss_before": sum(x["ft_loss_before"] for x in v) / len(v),
                      "loss_after": sum(x["ft_loss_after"] for x in v) / len(v)}
        else:
            mods_all: dict = {}
            if collect != "none":
                def fn(linears, stats):
                    out, mods = do(linears, stats)
                    mods_all.update(mods)
                    return out
                layers = layerwise.run(model, calib, self.target, fn, collect=collect,
                                       progress=f"cluster {self.describe()}")
            else:
                layers, mods_all = do(self.target.select(model), {})
            if self.finetune and mods_all:
                first, last = finetune_next_token(model, calib, mods_all, self.steps, self.lr, self.batch_size)
                ft = {"loss_before": first, "loss_after": last}
        if not layers:
            raise UserError("cluster matched no linear layers: check cluster.include / cluster.exclude")
        sq = [v["sqnr"] for v in layers.values()]
        bits = [v["bits"] for v in layers.values()]
        ok = all(v["unique"] <= v["k"] * v["codebooks"] for v in layers.values())
        summary = (f"cluster {self.describe()}: {len(layers)} linears, mean SQNR {sum(sq) / len(sq):.2f} dB, "
                   f"{sum(bits) / len(bits):.3f} bits/weight, unique values <= K per codebook: {ok}")
        if ft:
            summary += f", fine-tune loss {ft['loss_before']:.4f} -> {ft['loss_after']:.4f}"
        return {"summary": summary, "layers": layers, **({"finetune": ft} if ft else {})}


class CentroidAdam:
    """Adam on the codebooks of ClusteredLinears with frozen indices. Each module's dense weight carries the
    gradient; dL/dc = sum of dL/dw per cluster (index_add). Parameters are u = c / sigma (sigma = the
    matrix's weight std), so `lr` is a step relative to the matrix's scale."""

    def __init__(self, mods: dict[str, ClusteredLinear], lr: float):
        self.mods = mods
        self.sigma = {n: float(m.weight.detach().float().std()) or 1.0 for n, m in mods.items()}
        self.u = {n: nn.Parameter(m.codebook.float() / self.sigma[n]) for n, m in mods.items()}
        self.opt = torch.optim.Adam(list(self.u.values()), lr=lr)

    def step(self) -> None:
        for n, m in self.mods.items():
            g = m.weight.grad
            self.u[n].grad = None if g is None else C.centroid_grad(g, m.idx, m.group_rows, m.k) * self.sigma[n]
            m.weight.grad = None
        self.opt.step()
        self.opt.zero_grad(set_to_none=True)
        with torch.no_grad():
            for n, m in self.mods.items():
                m.set_codebook(self.u[n].detach() * self.sigma[n])


class _TrainOnly:
    """Inside the block only the ClusteredLinears' dense weights require gradients."""

    def __init__(self, root: nn.Module, mods: dict[str, ClusteredLinear]):
        self.root, self.mods = root, mods

    def __enter__(self):
        self.flags = [(p, p.requires_grad) for p in self.root.parameters()]
        for p, _ in self.flags:
            p.requires_grad_(False)
        for m in self.mods.values():
            m.weight.requires_grad_(True)
        return self

    def __exit__(self, *exc):
        for m in self.mods.values():
            m.weight.grad = None
            m.weight.requires_grad_(False)
        for p, f in self.flags:
            p.requires_grad_(f)


def finetune_next_token(model: nn.Module, calib, mods: dict[str, ClusteredLinear], steps: int, lr: float,
                        batch_size: int) -> tuple[float, float]:
    """Train the centroids on next-token loss over cyclic mini-batches of the calibration set.
    Returns (mean loss of the first pass over the set, mean loss of the last), per step-sized window."""
    dev = next(model.parameters()).device
    n = len(calib)
    losses = []
    opt = CentroidAdam(mods, lr)
    with _TrainOnly(model, mods), torch.enable_grad():
        for s in range(steps):
            rows = [(s * batch_size + i) % n for i in range(min(batch_size, n))]
            ids = calib.input_ids[rows].to(dev)
            mask = calib.attention_mask[rows].to(dev)
            labels = ids.masked_fill(mask == 0, -100)
            loss = model(input_ids=ids, attention_mask=mask, labels=labels, use_cache=False).loss
            loss.backward()
            opt.step()
            losses.append(float(loss.detach()))
    w = max(1, min(len(losses) // 2, -(-n // batch_size)))
    return sum(losses[:w]) / w, sum(losses[-w:]) / w


def _out(o):
    return o[0] if isinstance(o, (tuple, list)) else o


def finetune_layer(step, mods: dict[str, ClusteredLinear], targets: list[Tensor], steps: int,
                   lr: float) -> tuple[float, float]:
    """Train one layer's centroids on the relative output MSE ||y - y_ref||^2 / ||y_ref||^2 over the step's
    input batches (cyclic). Returns (loss before, loss after) over all batches."""
    def full_loss() -> float:
        with torch.no_grad():
            num = sum(float(((_out(step.layer(x, **kw)) - t) ** 2).sum()) for x, kw, t in
                      zip(step.inputs, step.kwargs, targets))
        return num / max(sum(float((t ** 2).sum()) for t in targets), 1e-30)

    before = full_loss()
    start = {n: m.codebook.clone() for n, m in mods.items()}
    opt = CentroidAdam(mods, lr)
    with _TrainOnly(step.layer, mods), torch.enable_grad():
        for s in range(steps):
            j = s % len(step.inputs)
            t = targets[j]
            y = _out(step.layer(step.inputs[j], **step.kwargs[j]))
            loss = ((y - t) ** 2).sum() / (t ** 2).sum().clamp(min=1e-30)
            loss.backward()
            opt.step()
    after = full_loss()
    if after > before:                       # never leave a layer worse than plain clustering
        for n, m in mods.items():
            m.set_codebook(start[n])
        after = before
    return before, after
