"""The one sequential engine used by every calibrated stage (the GPTQ/SparseGPT/Wanda protocol).

1. Capture the inputs of decoder layer 0 for every calibration sample (with the keyword arguments the
   model passes to its layers: attention mask, position ids/embeddings, ...), stopping the forward there.
2. For each decoder layer in order: move it to the compute device, collect per-linear input statistics
   with forward hooks over all samples, let the stage modify the layer, then recompute the layer's
   outputs with the modified layer; those become the next layer's inputs (errors propagate as in the
   deployed model). At most one layer plus the activations live on the compute device."""
from __future__ import annotations

import contextlib
import logging
import threading
import weakref
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field

import torch
from torch import Tensor, nn

from ..calib import CalibrationSet
from ..errors import UserError
from .memory import trim_heap
from ..model import compute_device, decoder_layers, layer_linears
from ..targets import Target

log = logging.getLogger("modelpress")


class _Stop(Exception):
    pass


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


def symmetrize_(H: Tensor, strip: int = 384) -> None:
    """Fill the lower triangle of H from its upper triangle, in place, one block column at a time (temporaries
    of one (strip, strip) block: H.triu() + H.triu(1).t() held three (cols, cols) copies, the peak of a GPTQ
    layer on a 4864-wide down_proj). Bitwise that expression's result, -0.0 turned +0.0 as its "+ 0" did."""
    cols = H.shape[0]
    for a in range(0, cols, strip):
        b = min(a + strip, cols)
        D = H[a:b, a:b]
        D.copy_(D.triu() + D.triu(1).t())
        H[b:, a:b].copy_(H[a:b, b:].t())            # below the diagonal block <- right of it (disjoint)
    H.add_(0.0)


def _to(x, dev):
    if isinstance(x, Tensor):
        return x.to(dev)
    if isinstance(x, tuple):
        return tuple(_to(v, dev) for v in x)
    if isinstance(x, dict):
        return {k: _to(v, dev) for k, v in x.items()}
    return x


class StandIn(nn.Module):
    """Takes a decoder layer's place in the model's forward; attribute reads fall through to the real layer
    (some models read e.g. `attention_type`), which is held in a tuple so it is not registered as a submodule."""

    def __init__(self, inner: nn.Module):
        super().__init__()
        self.held = (inner,)

    def __getattr__(self, name):
        try:
            return super().__getattr__(name)
        except AttributeError:
            return getattr(self.__dict__["held"][0], name)


class _Probe(StandIn):
    """Stands in for one decoder layer while the inputs are captured: records the keyword arguments the model
    passes to that layer and returns the hidden states unchanged (no layer computes; the last one stops the
    forward)."""

    def __init__(self, inner: nn.Module, record: Callable, last: bool):
        super().__init__(inner)
        self.record, self.last = record, last

    def forward(self, *args, **kw):
        hs = args[0] if args else kw.pop("hidden_states")
        self.record(hs, kw)
        if self.last:
            raise _Stop
        return hs


@torch.no_grad()
def capture_inputs(model: nn.Module, calib: CalibrationSet, batch_size: int, device: torch.device):
    """Inputs of decoder layer 0, one entry per batch of calibration samples, and the keyword arguments the
    model passes to EVERY layer: kwargs[i][b] for layer i, batch b. Layers may differ in those (Gemma 2/3, and
    Qwen2/Mistral configs with `layer_types`, give sliding-window layers their own attention mask and rotary
    tables); identical objects are kept once. Each layer is replaced by a _Probe for the pass, so nothing
    but the embeddings (and the model's mask / rotary set-up) computes."""
    _, layers = decoder_layers(model)
    inputs: list[Tensor] = []
    kwargs: list[list[dict]] = [[] for _ in layers]

    def make(i: int, memo: dict):
        def record(hs: Tensor, kw: dict) -> None:
            if i == 0:
                inputs.append(hs.detach().to(device))
            kwargs[i].append({k: _to_memo(v, device, memo) for k, v in kw.items()
                              if k not in ("past_key_values", "past_key_value")})
        return record

    real = list(layers)
    mdev = next(model.parameters()).device
    try:
        for b in range(0, len(calib), batch_size):
            memo: dict[int, object] = {}       # id(original) -> moved copy: one copy of what layers share
            for i, layer in enumerate(real):
                layers[i] = _Probe(layer, make(i, memo), last=i == len(real) - 1)
            ids = calib.input_ids[b:b + batch_size].to(mdev)
            mask = (None if calib.attention_mask is None           # (evaluation windows: no mask, as scored)
                    else calib.attention_mask[b:b + batch_size].to(mdev))
            try:
                model(input_ids=ids, attention_mask=mask, use_cache=False)
            except _Stop:
                pass
    finally:
        for i, layer in enumerate(real):
            layers[i] = layer
    return inputs, kwargs


def _to_memo(x, dev, memo: dict):
    """_to, moving each distinct object once (layers handed the same mask share one copy)."""
    if isinstance(x, (Tensor, tuple, dict)):
        key = id(x)
        if key not in memo:
            memo[key] = (x, _to(x, dev))         # the original kept alive so its id stays unique
        return memo[key][1]
    return x


def _out(o):
    return o[0] if isinstance(o, (tuple, list)) else o


class _Stats:
    """Per-linear input statistics summed over batches: "hessian": H = 2 X^T X / n (cols, cols);
    "input_sq_norm": sum_t x_tj^2 (cols,); "inputs": the raw inputs (tokens, cols) (small models only)."""

    def __init__(self, kind: str):
        if kind not in ("hessian", "input_sq_norm", "inputs"):
            raise ValueError(f"unknown statistic {kind!r}")
        self.kind, self.stats, self.rows = kind, {}, {}

    def add(self, name, raw: Tensor) -> None:
        x = raw.detach().reshape(-1, raw.shape[-1]).float()                   # (tokens, cols)
        self.rows[name] = self.rows.get(name, 0) + x.shape[0]
        if self.kind == "hessian":
            if name not in self.stats:
                self.stats[name] = torch.zeros(x.shape[1], x.shape[1], device=x.device)
            gram_add_(self.stats[name], x)
        elif self.kind == "input_sq_norm":
            self.stats[name] = self.stats.get(name, 0) + (x ** 2).sum(0)
        else:
            self.stats[name] = torch.cat([self.stats[name], x]) if name in self.stats else x

    def finish(self, name) -> Tensor | None:
        """The statistic of `name` (None if it never saw an input); hands it over (no longer kept here)."""
        st = self.stats.pop(name, None)
        if st is not None and self.kind == "hessian":
            symmetrize_(st)
            st.mul_(2.0 / self.rows[name])                                     # H = 2 X^T X / n
        return st


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
    out: list[Tensor] | None = None   # the outputs, when a one-pass sweep already computed them
    amp: torch.dtype | None = None    # forward passes under torch.autocast to this dtype (statistics stay float32)

    def forward(self, x: Tensor, kw: dict) -> Tensor:
        """The layer on one batch, under autocast when `amp` is set; the output in the input's dtype."""
        with torch.autocast(self.device.type, dtype=self.amp) if self.amp else contextlib.nullcontext():
            return _out(self.layer(x, **kw)).to(x.dtype)

    def linears(self, target: Target) -> dict[str, nn.Linear]:
        return target.filter(layer_linears(self.layer, self.prefix))

    @torch.no_grad()
    def outputs(self) -> list[Tensor]:
        return [self.forward(x, kw) for x, kw in zip(self.inputs, self.kwargs)]

    @torch.no_grad()
    def collect(self, linears: dict[str, nn.Module], kind: str, first_input: bool = False) -> dict[str, Tensor]:
        """Run the layer over all samples and return per-linear input statistics (see _Stats for the kinds).
        Statistics are taken in forward pre-hooks, and each batch stops once every targeted linear has its input
        (the collect pass never runs the last linear, e.g. down_proj, whose output nobody reads). first_input:
        only the linears that read the first input reached (e.g. q/k/v), and each batch stops at the next
        linear: the first pass of a true-sequential layer (see run)."""
        if kind == "none" or not linears:
            return {}
        acc = _Stats(kind)
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
                acc.add(name, raw)
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
                    self.forward(x, kw)
                except _Stop:
                    pass
        finally:
            for h in hooks:
                h.remove()
            seen.clear()
        stats = {name: acc.finish(name) for name in list(acc.stats)}
        for name, first in alias.items():
            stats[name] = stats[first]
        return stats

    def grouped(self, linears: dict[str, nn.Module], kind: str, fn, sequential: bool) -> tuple[dict, list[list[str]]]:
        """collect + fn: all linears at once, or (sequential) one input group at a time, each found and measured
        by a partial pass (collect(first_input=True)). Returns fn's merged results and the groups in order."""
        res: dict = {}
        groups: list[list[str]] = []
        rest = dict(linears)
        while rest:
            stats = self.collect(rest, kind, first_input=sequential)
            group = {n: m for n, m in rest.items() if n in stats} if sequential else {}
            group = group or rest            # not sequential, or a linear the forward never reached
            rest = {n: m for n, m in rest.items() if n not in group}
            groups.append(list(group))
            trim_heap()                      # the forward's temporaries, before the stage allocates its own
            res.update(fn(group, stats) or {})
            del stats, group                 # the replaced linears and the statistics die here
        return res, groups

    @torch.no_grad()
    def sweep(self, linears: dict[str, nn.Module], groups: list[list[str]], kind: str,
              fn: Callable[[dict[str, nn.Module], dict[str, Tensor]], dict]) -> dict:
        """True-sequential compression in ONE forward pass: each batch runs through the layer and parks at the
        first linear of every input group (e.g. q/k/v, o_proj, gate/up, down_proj; `groups` in forward order, as
        run() found them on an earlier layer with the same linears); once every batch has parked there (or
        finished without reaching it), the group's statistics are complete, fn(group, stats) compresses it, and
        the batches go on through the compressed group. The outputs (self.out) come out of the same pass, so a
        layer costs one forward instead of one per group plus one. Same numbers as the multi-pass path: the
        statistics are summed batch by batch in the same order. Each batch runs in its own Python thread, one at a
        time (a baton, no concurrency), holding its live activations while parked."""
        return _Sweep(self, linears, groups, kind, fn).run()


class _Abort(BaseException):
    pass


class _Gate(nn.Module):
    """Stands in for one targeted linear during a sweep: parks the batch until the linear's group is compressed,
    then calls whatever module holds the linear's place by then (the stage may have replaced it)."""

    def __init__(self, sweep: "_Sweep", name: str, parent: nn.Module, attr: str, inner: nn.Module):
        super().__init__()
        self.sweep, self.name, self.attr = sweep, name, attr
        self.held = (parent, inner)          # a tuple: not registered as submodules

    def forward(self, x, *args, **kwargs):
        self.sweep.arrive(self.name, x)
        parent, inner = self.held
        now = getattr(parent, self.attr)
        return (inner if now is self else now)(x, *args, **kwargs)


class _Sweep:
    """The baton scheduler behind Step.sweep."""

    def __init__(self, step: Step, linears: dict[str, nn.Module], groups: list[list[str]], kind: str, fn):
        self.step, self.linears, self.fn = step, linears, fn
        self.group_of = {n: g for g, names in enumerate(groups) for n in names}
        missing = set(linears) - set(self.group_of)
        if missing:
            raise ValueError(f"sweep: {sorted(missing)} belong to no group")
        self.acc = _Stats(kind)
        self.done: set[int] = set()          # compressed groups
        self.first: dict[tuple[int, int], weakref.ref] = {}   # (batch, group) -> the input its first linear read
        self.parked: dict[int, int] = {}     # batch -> the group it waits at
        self.cv = threading.Condition()
        self.turn: int | None = None         # the batch allowed to run
        self.abort = False
        self.local = threading.local()
        self.errors: list[BaseException] = []
        self.res: dict = {}

    def arrive(self, name: str, raw: Tensor) -> None:                   # in a batch's thread
        b, g = self.local.batch, self.group_of[name]
        if g in self.done:
            ref = self.first.get((b, g))
            if ref is not None and ref() is not raw:
                raise RuntimeError(f"{name} does not read the same input as the other linears of its group on this "
                                   "layer (the layers differ in structure): set `sequential: false` in the recipe")
            return
        self.first[(b, g)] = weakref.ref(raw)
        self.acc.add(g, raw)
        self.parked[b] = g
        self._wait(b)

    def _wait(self, b: int) -> None:
        with self.cv:
            self.turn = None
            self.cv.notify_all()
            self.cv.wait_for(lambda: self.turn == b or self.abort)
        if self.abort:
            raise _Abort

    def _work(self, b: int, threads: int) -> None:
        self.local.batch = b
        torch.set_num_threads(threads)
        if self.step.device.type == "cuda":
            torch.cuda.set_device(self.step.device)
        try:
            with self.cv:
                self.cv.wait_for(lambda: self.turn == b or self.abort)
            if not self.abort:
                with torch.no_grad():
                    self.outs[b] = self.step.forward(self.step.inputs[b], self.step.kwargs[b])
        except _Abort:
            pass
        except BaseException as e:           # handed to the calling thread
            self.errors.append(e)
        finally:
            with self.cv:
                self.turn = None
                self.cv.notify_all()

    def _hand(self, b: int) -> None:
        """Let batch b run until it parks or ends."""
        with self.cv:
            self.turn = b
            self.cv.notify_all()
            self.cv.wait_for(lambda: self.turn is None)
        if self.errors:
            raise self.errors[0]

    def _compress(self, g: int) -> None:
        names = [n for n in self.linears if self.group_of[n] == g]
        st = self.acc.finish(g)
        stats = {n: st for n in names} if st is not None else {}
        del st
        if self.done:                        # (before the first group, only a norm ran since the last trim)
            trim_heap()                      # the forward's freed temporaries, before the stage allocates its own
        self.res.update(self.fn({n: self.linears[n] for n in names}, stats) or {})
        self.done.add(g)

    def run(self) -> dict:
        layer, B = self.step.layer, len(self.step.inputs)
        self.outs: list[Tensor | None] = [None] * B
        gates = []
        for name, lin in self.linears.items():
            rel = name[len(self.step.prefix) + 1:]
            parent_name, _, attr = rel.rpartition(".")
            parent = layer.get_submodule(parent_name)
            gate = _Gate(self, name, parent, attr, lin)
            setattr(parent, attr, gate)
            gates.append(gate)
        threads = [threading.Thread(target=self._work, args=(b, torch.get_num_threads()), daemon=True)
                   for b in range(B)]
        try:
            for t in threads:
                t.start()
            for b in range(B):
                self._hand(b)
            while self.parked:
                g = min(self.parked.values())            # the earliest group in forward order
                self._compress(g)
                for b in sorted(b for b, at in self.parked.items() if at == g):
                    del self.parked[b]
                    self._hand(b)
            for g in sorted(set(self.group_of.values()) - self.done):   # never reached: no statistics
                self._compress(g)
        finally:
            with self.cv:
                self.abort = True
                self.cv.notify_all()
            for t in threads:
                t.join()
            for gate in gates:                            # a linear the stage kept (changed in place) goes back
                parent, inner = gate.held
                if getattr(parent, gate.attr) is gate:
                    setattr(parent, gate.attr, inner)
                gate.held = (None, None)
            self.first.clear()
        self.step.out = self.outs
        return self.res


def fast_bf16(device: torch.device) -> bool:
    """Whether `device` multiplies bfloat16 matrices natively: CUDA with bf16 support, a CPU with AVX512-BF16 or
    AMX (elsewhere bf16 GEMMs are emulated and slower than float32 ones)."""
    if device.type == "cuda":
        return torch.cuda.is_bf16_supported()
    return device.type == "cpu" and (torch.cpu._is_avx512_bf16_supported() or torch.cpu._is_amx_tile_supported())


def autocast_dtype(calib_dtype: str, model: nn.Module, device: torch.device | None = None) -> torch.dtype | None:
    """The autocast dtype of a stage's `calib_dtype` for the calibration forward passes (None: none).
    "auto": bfloat16 for a float32 model on a device with native bf16 GEMMs (fast_bf16), else none; "float32":
    none; "bfloat16": bfloat16."""
    if calib_dtype == "auto":
        fp32 = next(model.parameters()).dtype == torch.float32
        return torch.bfloat16 if fp32 and fast_bf16(device or compute_device()) else None
    return None if calib_dtype == "float32" else getattr(torch, calib_dtype)


def steps(model: nn.Module, calib: CalibrationSet, batch_size: int = 8,
          device: torch.device | None = None, checkpoint=None, amp: torch.dtype | None = None) -> Iterator[Step]:
    """Yield one Step per decoder layer; after the caller is done with a step, the layer's outputs are
    recomputed (with the caller's modifications) and fed to the next layer. With a checkpoint
    (modelpress.engine.checkpoint.StageCheckpoint), finished layers are restored and skipped, and each
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
            checkpoint.load_layer(i, layer)      # offload (modelpress.engine.offload): materialize the layer from disk
        home = next(layer.parameters()).device
        layer.to(device)
        step = Step(i, f"{prefix}.{i}", layer, inputs, kwargs[i], device, amp=amp)
        yield step
        if step.out is None:                     # (after a sweep the outputs exist: the trim below suffices)
            trim_heap()
            with torch.no_grad():                # in place, batch by batch: one copy of the activations, not two
                for b, kw in enumerate(kwargs[i]):
                    inputs[b] = step.forward(inputs[b], kw)
        else:
            inputs = step.out
        step.inputs, step.out = [], None
        layer.to(home)
        trim_heap()
        if checkpoint is not None:
            checkpoint.save(i, layer, inputs, step.extra.get("stats", {}))


SWEEP_BUDGET = 1 << 30   # bytes of activations Step.sweep may park at once (see run and sweep_bytes)


def sweep_bytes(step: Step, linears: dict[str, nn.Module]) -> int:
    """Estimated activations Step.sweep holds at its deepest gate: every batch parked at once, each with its
    layer input, the residual, the normed input and the widest linear's input and its factors, about
    (4 + 3 x widest input / hidden) layer inputs' worth (measured 12-13x on SmolLM2-shaped layers, against
    3-4x for the multi-pass path; BENCHMARKS.md "pipeline memory")."""
    inp = sum(x.numel() * x.element_size() for x in step.inputs)
    hidden = step.inputs[0].shape[-1] if step.inputs else 1
    widest = max((m.in_features for m in linears.values() if hasattr(m, "in_features")), default=hidden)
    return int(inp * (4 + 3 * widest / hidden))


def run(model: nn.Module, calib: CalibrationSet, target: Target,
        fn: Callable[[dict[str, nn.Module], dict[str, Tensor]], dict],
        collect: str = "hessian", batch_size: int = 8, progress: str | None = None, checkpoint=None,
        sequential: bool = False, amp: torch.dtype | None = None, sweep_budget: int | None = None) -> dict:
    """For each decoder layer: stats = collect(targeted linears); fn(linears, stats) -> per-linear dict.
    sequential ("true sequential", GPTQ repo): within a layer, the linears are compressed one input group at a
    time in forward order (q/k/v, then o_proj, gate/up, down_proj), each group's statistics taken with the
    groups before it already compressed. The first layer with a given set of linears finds its groups with one
    partial pass per group; later layers with the same linears run Step.sweep: one forward pass per layer in all,
    against two (statistics, then outputs) without `sequential`, as long as the activations the sweep parks
    (sweep_bytes) fit in `sweep_budget` bytes (None: SWEEP_BUDGET); beyond it (e.g. the shipped 128 x 512 calibration on SmolLM2),
    every layer takes the multi-pass path, which holds one copy of the activations plus one batch's (the very
    same numbers, more forward passes). amp (see autocast_dtype): run the forward passes
    under torch.autocast to this dtype (bfloat16: about 1.8x faster layer forwards on CPUs with AVX512-BF16 or AMX);
    the weights, the statistics and the solves stay float32.
    Returns the merged per-linear results (those of layers restored from a checkpoint included)."""
    from ..progress import bar
    prefix, layers = decoder_layers(model)
    outside = [n for n in target.select(model) if not n.startswith(f"{prefix}.")]
    if outside and target.include:             # asked for by name: say so rather than leave it uncompressed
        raise UserError(f"{', '.join(outside)} matched but lies outside the decoder layers, which calibrated stages "
                        "walk: compress it in a stage of its own without calibration (e.g. quantize with method rtn "
                        "and include: [lm_head]), or exclude it")
    if outside:                                # the default target (e.g. OPT's project_in/out, a vision tower)
        log.warning("left uncompressed (outside the decoder layers that calibrated stages walk): %s",
                    ", ".join(outside))
    out: dict = dict(checkpoint.progress["stats"]) if checkpoint is not None else {}
    touched = [i for i, layer in enumerate(layers) if target.filter(layer_linears(layer, f"{prefix}.{i}"))]
    if not touched:
        return out
    sequential = sequential and collect != "none"
    budget = SWEEP_BUDGET if sweep_budget is None else sweep_budget
    known: dict[tuple[str, ...], list[list[str]]] = {}   # a layer's linears (relative names) -> its input groups
    with bar(progress, total=touched[-1] + 1) as advance:
        advance(checkpoint.done if checkpoint is not None else 0)
        for step in steps(model, calib, batch_size, checkpoint=checkpoint, amp=amp):
            rest = step.linears(target)
            cut = len(step.prefix) + 1
            key = tuple(n[cut:] for n in rest)
            if sequential and key in known and sweep_bytes(step, rest) <= budget:
                res = step.sweep(rest, [[f"{step.prefix}.{r}" for r in g] for g in known[key]], collect, fn)
            else:
                res, groups = step.grouped(rest, collect, fn, sequential)
                if sequential:
                    known[key] = [[n[cut:] for n in g] for g in groups]
            step.extra["stats"] = res
            out.update(res)
            advance()
            if step.index == touched[-1]:
                trim_heap()
                break          # later layers are untouched: no need to propagate further
    return out
