"""The one sequential engine used by every calibrated stage (the GPTQ/SparseGPT/Wanda protocol).

1. Capture the inputs of decoder layer 0 for every calibration sample (with the keyword arguments the
   model passes to its layers: attention mask, position ids/embeddings, ...), stopping the forward there.
2. For each decoder layer in order: move it to the compute device, collect per-linear input statistics
   with forward hooks over all samples, let the stage modify the layer, then recompute the layer's
   outputs with the modified layer; those become the next layer's inputs (errors propagate as in the
   deployed model). At most one layer plus the activations live on the compute device."""
from __future__ import annotations

from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field

import torch
from torch import Tensor, nn

from .calib import CalibrationSet
from .memory import trim_heap
from .model import compute_device, decoder_layers, layer_linears
from .targets import Target


class _Stop(Exception):
    pass


def parallel_map(fn: Callable, items: list, cost: Callable | None = None) -> list:
    """[fn(x) for x in items], spread over W = min(torch.get_num_threads(), len(items)) Python
    threads that each run torch on threads // W threads: inter-op instead of intra-op
    parallelism, for the per-linear solvers (GPTQ, SparseGPT), whose column loops are thousands of small ops
    that one thread runs best. The caller's grad mode is kept. `cost` orders the work largest first. Results
    come back in the order of `items`. (Not for forward passes: two concurrent batches measured no faster than
    one batch on two OpenMP threads here, and each thread's allocator arena raised the peak RSS.)"""
    n = torch.get_num_threads()
    w = min(n, len(items))
    if w <= 1:
        return [fn(x) for x in items]
    per = max(1, n // w)
    grad = torch.is_grad_enabled()
    order = sorted(range(len(items)), key=lambda i: -cost(items[i])) if cost else list(range(len(items)))

    def one(i):
        torch.set_num_threads(per)           # this thread's OpenMP/MKL setting
        with torch.set_grad_enabled(grad):
            return i, fn(items[i])

    try:
        with ThreadPoolExecutor(w) as pool:
            done = dict(pool.map(one, order))
    finally:
        torch.set_num_threads(n)
    return [done[i] for i in range(len(items))]


def gram_add_(H: Tensor, x: Tensor, strip: int = 384) -> None:
    """H += x^T x for x (tokens, cols) and H (cols, cols), in place; only the upper triangle is right: finish
    with symmetrize_(H). Computed as row strips of `strip` columns from the diagonal on
    (H[a:b, a:] += x[:, a:b]^T x[:, a:]): (k+1)/2k of the GEMM's flops for k strips, in torch's own BLAS
    (scipy's ssyrk halves the flops but its threads and torch's OpenMP threads spin against each other
    between calls: the layer-wise collect pass ran 40% slower with it)."""
    cols = H.shape[0]
    k = max(1, round(cols / strip))
    edges = [round(i * cols / k) for i in range(k + 1)]
    for a, b in zip(edges[:-1], edges[1:]):
        H[a:b, a:].addmm_(x[:, a:b].t(), x[:, a:])


def symmetrize_(H: Tensor) -> None:
    """Fill the lower triangle of H from its upper triangle, in place."""
    H.copy_(H.triu() + H.triu(1).t())


def _to(x, dev):
    if isinstance(x, Tensor):
        return x.to(dev)
    if isinstance(x, tuple):
        return tuple(_to(v, dev) for v in x)
    if isinstance(x, dict):
        return {k: _to(v, dev) for k, v in x.items()}
    return x


@torch.no_grad()
def capture_inputs(model: nn.Module, calib: CalibrationSet, batch_size: int, device: torch.device):
    """Inputs and keyword arguments of decoder layer 0, one entry per batch of calibration samples."""
    _, layers = decoder_layers(model)
    inputs, kwargs = [], []

    def hook(_mod, args, kw):
        hs = args[0] if args else kw.pop("hidden_states")
        inputs.append(hs.detach().to(device))
        kwargs.append({k: _to(v, device) for k, v in kw.items() if k not in ("past_key_values", "past_key_value")})
        raise _Stop

    h = layers[0].register_forward_pre_hook(hook, with_kwargs=True)
    mdev = next(model.parameters()).device
    try:
        for b in range(0, len(calib), batch_size):
            ids = calib.input_ids[b:b + batch_size].to(mdev)
            mask = calib.attention_mask[b:b + batch_size].to(mdev)
            try:
                model(input_ids=ids, attention_mask=mask, use_cache=False)
            except _Stop:
                pass
    finally:
        h.remove()
    return inputs, kwargs


def _out(o):
    return o[0] if isinstance(o, (tuple, list)) else o


@dataclass
class Step:
    """One decoder layer during a layer-wise pass."""
    index: int
    prefix: str                  # module name of the layer, e.g. "model.layers.3"
    layer: nn.Module
    inputs: list[Tensor]         # per batch (batch, seq, hidden)
    kwargs: list[dict]
    device: torch.device
    extra: dict = field(default_factory=dict)

    def linears(self, target: Target) -> dict[str, nn.Linear]:
        return target.filter(layer_linears(self.layer, self.prefix))

    @torch.no_grad()
    def outputs(self) -> list[Tensor]:
        return [_out(self.layer(x, **kw)) for x, kw in zip(self.inputs, self.kwargs)]

    @torch.no_grad()
    def collect(self, linears: dict[str, nn.Module], kind: str, first_input: bool = False) -> dict[str, Tensor]:
        """Run the layer over all samples and return per-linear input statistics:
        "hessian": H = 2 X^T X / n (cols, cols); "input_sq_norm": sum_t x_tj^2 (cols,);
        "inputs": the raw inputs (tokens, cols) (small models only); "none": nothing. Statistics are taken in
        forward pre-hooks, and each batch stops once every targeted linear has its input (the collect pass never
        runs the last linear, e.g. down_proj, whose output nobody reads). first_input: only the linears that read
        the first input reached (e.g. q/k/v), and each batch stops at the next linear: for true-sequential
        stages (see run)."""
        if kind == "none" or not linears:
            return {}
        if kind not in ("hessian", "input_sq_norm", "inputs"):
            raise ValueError(f"unknown statistic {kind!r}")
        stats: dict[str, Tensor] = {}
        rows: dict[str, int] = {}
        alias: dict[str, str] = {}     # linears fed the very same input tensor share one statistic
        seen: list[tuple[Tensor, str]] = []
        pending: set[str] = set()      # targeted linears not yet reached in this batch

        def record(name: str, raw: Tensor) -> bool:
            """Add one linear's input of this batch; True once the batch can stop."""
            first = next((f for t, f in seen if t is raw), None)
            if first is not None:
                alias[name] = first
            elif first_input and seen:
                return True                # a second input: the first group is complete
            else:
                seen.append((raw, name))
                x = raw.detach().reshape(-1, raw.shape[-1]).float()           # (tokens, cols)
                rows[name] = rows.get(name, 0) + x.shape[0]
                if kind == "hessian":
                    if name not in stats:
                        stats[name] = torch.zeros(x.shape[1], x.shape[1], device=x.device)
                    gram_add_(stats[name], x)
                elif kind == "input_sq_norm":
                    stats[name] = stats.get(name, 0) + (x ** 2).sum(0)
                else:
                    stats[name] = torch.cat([stats[name], x]) if name in stats else x
            pending.discard(name)
            return not pending

        def make(name):
            def hook(_m, args):
                if record(name, args[0]):
                    raise _Stop                # every targeted linear has its input: skip the rest of the layer
            return hook

        hooks = [m.register_forward_pre_hook(make(n)) for n, m in linears.items()]
        try:
            for x, kw in zip(self.inputs, self.kwargs):
                seen.clear()
                pending.update(linears)
                try:
                    self.layer(x, **kw)
                except _Stop:
                    pass
        finally:
            for h in hooks:
                h.remove()
            seen.clear()
        if kind == "hessian":
            for name, H in stats.items():
                symmetrize_(H)
                H.mul_(2.0 / rows[name])                                       # H = 2 X^T X / n
        for name, first in alias.items():
            stats[name] = stats[first]
        return stats


def steps(model: nn.Module, calib: CalibrationSet, batch_size: int = 8,
          device: torch.device | None = None, checkpoint=None) -> Iterator[Step]:
    """Yield one Step per decoder layer; after the caller is done with a step, the layer's outputs are
    recomputed (with the caller's modifications) and fed to the next layer. With a checkpoint
    (modelpress.checkpoint.StageCheckpoint), finished layers are restored and skipped, and each
    finished layer is saved with the next layer's inputs (step.extra["stats"] is saved with it)."""
    device = device or compute_device()
    prefix, layers = decoder_layers(model)
    inputs, kwargs = capture_inputs(model, calib, batch_size, device)
    start = 0
    if checkpoint is not None:
        start, saved, _ = checkpoint.restore(layers)
        if saved is not None:
            inputs = [x.to(device) for x in saved]
    for i in range(start, len(layers)):
        layer = layers[i]
        if checkpoint is not None and hasattr(checkpoint, "load_layer"):
            checkpoint.load_layer(i, layer)      # offload (modelpress.offload): materialize the layer from disk
        home = next(layer.parameters()).device
        layer.to(device)
        step = Step(i, f"{prefix}.{i}", layer, inputs, kwargs, device)
        yield step
        trim_heap()
        inputs = step.outputs()
        step.inputs = []
        layer.to(home)
        trim_heap()
        if checkpoint is not None:
            checkpoint.save(i, layer, inputs, step.extra.get("stats", {}))


def run(model: nn.Module, calib: CalibrationSet, target: Target,
        fn: Callable[[dict[str, nn.Module], dict[str, Tensor]], dict],
        collect: str = "hessian", batch_size: int = 8, progress: str | None = None, checkpoint=None,
        sequential: bool = False) -> dict:
    """For each decoder layer: stats = collect(targeted linears); fn(linears, stats) -> per-linear dict.
    sequential ("true sequential", GPTQ repo): within a layer, the linears are compressed one input group at a
    time in forward order (q/k/v, then o_proj, gate/up, down_proj), each group's statistics taken with the
    groups before it already compressed; about one more forward pass per layer.
    Returns the merged per-linear results (those of layers restored from a checkpoint included)."""
    from .progress import bar
    prefix, layers = decoder_layers(model)
    out: dict = dict(checkpoint.progress["stats"]) if checkpoint is not None else {}
    touched = [i for i, layer in enumerate(layers) if target.filter(layer_linears(layer, f"{prefix}.{i}"))]
    if not touched:
        return out
    with bar(progress, total=touched[-1] + 1) as advance:
        advance(checkpoint.done if checkpoint is not None else 0)
        for step in steps(model, calib, batch_size, checkpoint=checkpoint):
            rest = step.linears(target)
            res: dict = {}
            while rest:
                stats = step.collect(rest, collect, first_input=sequential and collect != "none")
                group = {n: m for n, m in rest.items() if n in stats} if sequential else {}
                group = group or rest            # not sequential, or a linear the forward never reached
                rest = {n: m for n, m in rest.items() if n not in group}
                trim_heap()                      # the forward's temporaries, before the stage allocates its own
                res.update(fn(group, stats) or {})
                del stats, group                 # the replaced linears and the statistics die here
            step.extra["stats"] = res
            out.update(res)
            advance()
            if step.index == touched[-1]:
                trim_heap()
                break          # later layers are untouched: no need to propagate further
    return out
