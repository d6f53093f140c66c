"""Calibration: measure this machine (CPU, or the CUDA GPU when present) and compare the roofline estimate
of estimate.py (arXiv 2603.16952) with the measured prefill and decode time of a real model.

Probes (minimum over timed repeats after a warm-up: interference from other processes only adds time):
  copy       dst <- src for a buffer far larger than the last-level cache: 2 * bytes / t (read + write)
  gemv       y = W x over random linears with the model's own (out, in) shapes in the model's runtime
             form (dtype, or a conversion such as int8 dynamic quantization), minus the same probe on
             the width-64 twin (pure dispatch): bytes / t, the effective weight-streaming bandwidth
  matmul     `context` activations through one decoder layer's linears in the same runtime form (the
             prefill pattern): FLOPs / t
  overhead   decode of a twin of the model's architecture shrunk to width 64 (same class, same layer
             count): its time per token is the runtime's fixed cost per forward pass, divided by layers
On a single-threaded CPU run the timer is the calling thread's CPU time, which leaves out the time a
shared machine's scheduler gives to other users (memory-bandwidth interference is still counted).
The measured profile feeds the same `estimate()` used for vendor profiles."""
from __future__ import annotations

import copy
import time
from collections.abc import Callable

import torch
from torch import nn

from .estimate import DecoderShape, DeviceProfile, WeightBytes, decoder_shape, estimate, weight_bytes

Convert = Callable[[nn.Module], nn.Module] | None
_COMPUTE = {torch.float16: "fp16", torch.bfloat16: "fp16", torch.float32: "fp32"}


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def clock(device: torch.device) -> Callable[[], float]:
    """Thread CPU time for single-threaded CPU runs (robust on shared machines), wall time otherwise."""
    if device.type == "cpu" and torch.get_num_threads() == 1:
        return time.thread_time
    return time.perf_counter


def timed(fn: Callable[[], object], device: torch.device, repeats: int = 5, warmup: int = 1) -> float:
    """Minimum time of fn() in seconds over `repeats` calls (device synchronised around each)."""
    now = clock(device)
    with torch.inference_mode():
        for _ in range(warmup):
            fn()
        _sync(device)
        best = float("inf")
        for _ in range(repeats):
            t0 = now()
            fn()
            _sync(device)
            best = min(best, now() - t0)
    return best


# ----------------------------------------------------------------------------------------------- bytes
def module_tensor_bytes(model: nn.Module) -> dict[str, int]:
    """Bytes of the parameters and buffers this runtime reads (shared storage counted once), including the
    packed weights of torch.ao dynamically quantized linears, which are not parameters."""
    seen: set[int] = set()
    out: dict[str, int] = {}

    def add(name: str, t: torch.Tensor | None) -> None:
        if t is None or t.device.type == "meta":
            return
        if not t.is_quantized:  # quantized weights are fresh tensors unpacked per module: never shared
            if t.data_ptr() in seen:
                return
            seen.add(t.data_ptr())
        out[name] = t.numel() * t.element_size()

    # modelpress replacement layers (modules/quant.py) run F.linear on a dense weight derived from their
    # stored codes; the code / scale / mask buffers are storage, not read per token
    storage_only = {n for n, m in model.named_modules() if hasattr(m, "to_state")}
    for name, t in model.named_parameters():
        add(name, t)
    for name, t in model.named_buffers():
        if name.rpartition(".")[0] not in storage_only:
            add(name, t)
    for name, m in model.named_modules():
        if callable(getattr(m, "weight", None)) and hasattr(m, "_packed_params"):
            w = m.weight()  # torch.ao quantized: int8 codes + per-tensor/per-channel scales
            add(f"{name}.weight", w)
            b = m.bias()
            if b is not None:
                add(f"{name}.bias", b)
    return out


def runtime_weight_bytes(model: nn.Module) -> WeightBytes:
    """Resident / per-token weight bytes of a loaded model (tied LM head detected by shared storage)."""
    out, inp = model.get_output_embeddings(), model.get_input_embeddings()
    w_out = getattr(out, "weight", None)
    tied = isinstance(w_out, torch.Tensor) and w_out.data_ptr() == inp.weight.data_ptr()
    return weight_bytes(module_tensor_bytes(model), tied)


# ----------------------------------------------------------------------------------------------- probes
def linear_shapes(shape: DecoderShape) -> list[tuple[int, int]]:
    """(out, in) of every matmul one decode step runs: per layer q, k, v, o, MLP; then the LM head."""
    h, q, kv, i = shape.hidden, shape.heads * shape.head_dim, shape.kv_heads * shape.head_dim, shape.intermediate
    mlp = [(i, h), (i, h), (h, i)] if shape.gated_mlp else [(i, h), (h, i)]
    return [(q, h), (kv, h), (kv, h), (h, q), *mlp] * shape.layers + [(shape.vocab, h)]


def _linears(shapes: list[tuple[int, int]], device: torch.device, dtype: torch.dtype, convert: Convert) -> nn.Module:
    torch.manual_seed(0)
    mods = nn.ModuleList(nn.Linear(i, o, bias=False, dtype=dtype) for o, i in shapes).to(device).eval()
    return convert(mods) if convert is not None else mods


def probe_copy(device: torch.device, nbytes: int = 1 << 28, repeats: int = 5) -> float:
    """Copy bandwidth in B/s (bytes read + bytes written per second)."""
    src = torch.ones(nbytes // 4, dtype=torch.float32, device=device)
    dst = torch.empty_like(src)
    return 2 * nbytes / timed(lambda: dst.copy_(src), device, repeats)


def probe_gemv(device: torch.device, dtype: torch.dtype, shapes: list[tuple[int, int]], convert: Convert = None,
               repeats: int = 5) -> tuple[float, int]:
    """(seconds, bytes) to push one token through linears of `shapes` in the given runtime form."""
    mods = _linears(shapes, device, dtype, convert)
    xs = {i: torch.randn(1, 1, i, device=device).to(dtype) for _, i in shapes}
    ins = [i for _, i in shapes]

    def run():
        for m, i in zip(mods, ins):
            m(xs[i])

    t = timed(run, device, repeats)
    nbytes = sum(module_tensor_bytes(mods).values())
    del mods
    return t, nbytes


def probe_matmul(device: torch.device, dtype: torch.dtype, shapes: list[tuple[int, int]], tokens: int,
                 convert: Convert = None, repeats: int = 3) -> float:
    """Throughput in FLOP/s of `tokens` activations through linears of `shapes` in the runtime form
    (the prefill pattern): 2 * tokens * sum(out * in) / t."""
    mods = _linears(shapes, device, dtype, convert)
    xs = {i: torch.randn(1, tokens, i, device=device).to(dtype) for _, i in shapes}
    ins = [i for _, i in shapes]

    def run():
        for m, i in zip(mods, ins):
            m(xs[i])

    return 2.0 * tokens * sum(o * i for o, i in shapes) / timed(run, device, repeats)


def shrunk_config(config):
    """The same architecture (class, layer count) at width 64 with almost no weight bytes. When the config
    names head_dim explicitly (Llama, Qwen, Mistral, Gemma ...), the attention geometry (heads, KV heads,
    head_dim) is kept, so the twin's attention over the KV cache costs what the model's does."""
    c = copy.deepcopy(config)
    keep_attention = getattr(config, "head_dim", None) is not None
    sizes = [("hidden_size", 64), ("n_embd", 64), ("d_model", 64), ("intermediate_size", 128), ("ffn_dim", 128),
             ("n_inner", 128), ("vocab_size", 512), ("word_embed_proj_dim", 64)]
    if not keep_attention:
        sizes += [("num_attention_heads", 4), ("n_head", 4), ("num_key_value_heads", 1)]
    for k, v in sizes:
        if getattr(c, k, None) is not None:
            setattr(c, k, v)
    return c


def time_generation(model: nn.Module, input_ids: torch.Tensor, new_tokens: int, repeats: int = 3) -> dict:
    """Prefill `input_ids` (1, T) (LM head on the last position only), then greedy-decode `new_tokens`
    tokens one at a time with the KV cache. Minimum prefill time over `repeats` and minimum decode step
    (interference only adds time; the median step is reported too)."""
    device = input_ids.device
    now = clock(device)

    def prefill():
        return model(input_ids=input_ids, use_cache=True, logits_to_keep=1)

    pre = timed(prefill, device, repeats=repeats)
    steps = []
    with torch.inference_mode():
        out = prefill()
        past, nxt = out.past_key_values, out.logits[:, -1:].argmax(-1)
        for _ in range(new_tokens):
            _sync(device)
            t0 = now()
            out = model(input_ids=nxt, past_key_values=past, use_cache=True)
            past, nxt = out.past_key_values, out.logits[:, -1:].argmax(-1)
            _sync(device)
            steps.append(now() - t0)
    steps = sorted(steps[1:] if len(steps) > 2 else steps)
    return {"prefill_s": pre, "decode_s": steps[0], "decode_median_s": steps[len(steps) // 2]}


def twin(model: nn.Module, convert: Convert = None) -> nn.Module:
    """The width-64 twin of `model` (random weights, same dtype/device/runtime form)."""
    from transformers import AutoModelForCausalLM
    p = next(model.parameters())
    torch.manual_seed(0)
    t = AutoModelForCausalLM.from_config(shrunk_config(model.config), dtype=p.dtype).to(p.device).eval()
    return convert(t) if convert is not None else t


# ----------------------------------------------------------------------------------------------- calibration
def measured_profile(model: nn.Module, context: int, convert: Convert = None, new_tokens: int = 8) -> tuple[DeviceProfile, dict]:
    """This machine as a DeviceProfile for `model`'s runtime form, plus the raw probe numbers."""
    p = next(model.parameters())
    device, dtype = p.device, p.dtype
    shape = decoder_shape(model.config.to_dict())
    tw = twin(model, convert)
    tw_shape = decoder_shape(tw.config.to_dict())
    copy_bw = probe_copy(device, nbytes=(1 << 30) if device.type == "cuda" else (1 << 28))
    t_model, b_model = probe_gemv(device, dtype, linear_shapes(shape), convert)
    t_twin, b_twin = probe_gemv(device, dtype, linear_shapes(tw_shape), convert)
    # the bytes-per-second slope between the model and its twin removes fixed costs; it is a difference of two
    # timings, so only where the model streams clearly more bytes than its twin (else noise can make it any
    # sign: a tiny model timed on a loaded machine gave a negative bandwidth) and only where it is positive
    gemv_bw = b_model / t_model
    if b_model > 2 * b_twin and t_model > t_twin:
        gemv_bw = (b_model - b_twin) / (t_model - t_twin)
    layer_shapes = linear_shapes(shape)[:-1]  # prefill runs the LM head on one position only
    peak = probe_matmul(device, dtype, layer_shapes[:len(layer_shapes) // shape.layers], context, convert)
    ids = torch.randint(0, tw.config.vocab_size, (1, context), device=device)
    # fixed cost per layer: the twin's decode step minus the time its own (few) weight bytes take to stream
    t_tw = time_generation(tw, ids, new_tokens)["decode_s"]
    overhead = max(0.0, t_tw - runtime_weight_bytes(tw).per_token / gemv_bw) / tw_shape.layers
    if device.type == "cuda":
        props = torch.cuda.get_device_properties(device)
        mem, name = props.total_memory, f"measured-{props.name.replace(' ', '-').lower()}"
    else:
        import psutil
        mem, name = psutil.virtual_memory().total, f"measured-cpu-{torch.get_num_threads()}t"
    compute = _COMPUTE.get(dtype, "fp32")
    prof = DeviceProfile(name=name, title=f"this machine ({device.type}, {dtype})", memory_gib=mem / 1024 ** 3,
                         bandwidth_gbs=copy_bw / 1e9, peak_fp16_tflops=peak / 1e12, peak_int8_tops=peak / 1e12,
                         peak_fp32_tflops=peak / 1e12 if compute == "fp32" else None, tdp_w=None,
                         sustained_clock_ratio=1.0, bandwidth_efficiency=min(1.0, gemv_bw / copy_bw),
                         overhead_us_per_layer=overhead * 1e6, source="measured by modelpress deploy --measure")
    raw = {"copy_gbs": copy_bw / 1e9, "gemv_gbs": gemv_bw / 1e9, "matmul_tflops": peak / 1e12,
           "overhead_us_per_layer": overhead * 1e6, "compute": compute}
    return prof, raw


def calibrate(model: nn.Module, input_ids: torch.Tensor, new_tokens: int = 16, convert: Convert = None,
              vendor: DeviceProfile | None = None) -> dict:
    """Measured prefill / decode of `model` (already in its runtime form; `convert` rebuilds that form for
    the probes) against the roofline from this machine's probes and, optionally, a vendor profile."""
    shape = decoder_shape(model.config.to_dict())
    context = input_ids.shape[1]
    prof, raw = measured_profile(model, context, convert)
    meas = time_generation(model, input_ids, new_tokens)
    wb = runtime_weight_bytes(model)
    kv_bits = torch.finfo(next(model.parameters()).dtype).bits
    mid = context + new_tokens // 2  # the decode steps ran at context .. context + new_tokens
    variants = [("roofline: copy bandwidth, matmul peak", prof, dict(bandwidth_efficiency=1.0, overhead_us_per_layer=0.0)),
                ("roofline: gemv bandwidth + overhead", prof, {})]
    if vendor is not None:
        variants += [(f"roofline: {vendor.name} spec", vendor, dict(overhead_us_per_layer=0.0)),
                     (f"roofline: {vendor.name} spec + measured overhead", vendor,
                      dict(overhead_us_per_layer=prof.overhead_us_per_layer))]
    rows = {}
    for label, p, kw in variants:
        comp = raw["compute"] if getattr(p, f"peak_{raw['compute']}_tflops", None) else "fp16"
        dec = estimate(p, shape, wb, mid, compute=comp, kv_bits=kv_bits, **kw)
        pre = estimate(p, shape, wb, context, compute=comp, kv_bits=kv_bits, **kw)
        rows[label] = {"decode_s": dec.decode_s, "decode_bound": dec.decode_bound, "prefill_s": pre.prefill_s,
                       "prefill_bound": pre.prefill_bound, "decode_ratio": dec.decode_s / meas["decode_s"],
                       "prefill_ratio": pre.prefill_s / meas["prefill_s"]}
    return {"measured": meas, "probes": raw, "profile": prof, "context": context, "new_tokens": new_tokens,
            "weights": {"resident": wb.resident, "per_token": wb.per_token}, "estimates": rows}
