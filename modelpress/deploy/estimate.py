"""Deployment estimates: does a (compressed) model fit on a device, how long does a token take, how much
energy does it cost, and does a control loop meet its deadline. The "Deployment Gauntlet" of
"Embodied Foundation Models at the Edge" (arXiv 2603.16952): autoregressive decode is bound by memory
bandwidth, prefill by compute, and sustained (thermally derated) throughput decides real-time control.

Roofline per phase (both terms always computed, the larger one wins):

    t = max(W / (B * eta_B * r_B),  F / (P * eta_P * r_clk))  +  L * tau

  W   bytes moved (weights read once per forward pass + the KV cache read/written)
  F   FLOPs (2 per multiply-accumulate)
  B   peak memory bandwidth (B/s), P peak dense throughput of the compute precision (FLOP/s)
  eta efficiencies (achieved / peak, 1.0 = ideal roofline), r sustained / peak ratios (thermal
      derating; 1.0 = peak clocks), L decoder layers, tau per-layer runtime overhead (kernel dispatch;
      0 = ideal kernels, measured by `modelpress deploy --measure`).

Energy per token = TDP * t_decode (the device at its power limit: an upper bound). A control step at
f Hz that encodes `obs_tokens` new tokens and decodes `action_tokens` tokens meets its deadline when
prefill(obs_tokens) + action_tokens * t_decode <= 1 / f (sustained clocks).

Units: capacities in GiB (vendors' "GB" of DRAM are binary), bandwidth in GB/s (10^9 B/s), throughput
in TFLOPS/TOPS (10^12 /s). Everything here is a pure function of its arguments; only the profile and
safetensors-header readers touch files."""
from __future__ import annotations

import json
import math
import re
import struct
from collections.abc import Mapping
from dataclasses import asdict, dataclass, fields
from importlib import resources
from pathlib import Path

import yaml

from ..errors import UserError, read_text, yaml_load

GiB = 1024 ** 3
GB = 1e9
TERA = 1e12
PROFILE_DIR = "profiles"
COMPUTE_FIELDS = {"fp16": "peak_fp16_tflops", "int8": "peak_int8_tops", "fp32": "peak_fp32_tflops"}


# ----------------------------------------------------------------------------------------------- devices
@dataclass(frozen=True)
class DeviceProfile:
    name: str
    memory_gib: float
    bandwidth_gbs: float
    peak_fp16_tflops: float
    peak_int8_tops: float
    tdp_w: float | None
    sustained_clock_ratio: float
    title: str = ""
    peak_fp32_tflops: float | None = None
    sustained_bandwidth_ratio: float = 1.0
    bandwidth_efficiency: float = 1.0
    compute_efficiency: float = 1.0
    overhead_us_per_layer: float = 0.0
    source: str = ""

    @property
    def memory_bytes(self) -> float:
        return self.memory_gib * GiB

    @property
    def bandwidth(self) -> float:
        """Peak bandwidth in B/s."""
        return self.bandwidth_gbs * GB

    def peak(self, compute: str) -> float:
        """Peak dense throughput (FLOP/s or OP/s) for compute precision fp16 | int8 | fp32."""
        if compute not in COMPUTE_FIELDS:
            raise UserError(f"compute precision '{compute}' is unknown: use one of {', '.join(COMPUTE_FIELDS)}")
        value = getattr(self, COMPUTE_FIELDS[compute])
        if value is None:
            raise UserError(f"device profile {self.name} has no {COMPUTE_FIELDS[compute]}: add it to the profile "
                            f"YAML or pick another --compute")
        return value * TERA


_REQUIRED = ("name", "memory_gib", "bandwidth_gbs", "peak_fp16_tflops", "peak_int8_tops", "tdp_w",
             "sustained_clock_ratio")
_RATIOS = ("sustained_clock_ratio", "sustained_bandwidth_ratio", "bandwidth_efficiency", "compute_efficiency")
_POSITIVE = ("memory_gib", "bandwidth_gbs", "peak_fp16_tflops", "peak_int8_tops", "peak_fp32_tflops", "tdp_w")


def profile_from_dict(d: object, source: str) -> DeviceProfile:
    """Validate one profile mapping; errors name the file and the field."""
    if not isinstance(d, dict):
        raise UserError(f"{source}: a device profile must be a YAML mapping of fields (name: ..., memory_gib: ...)")
    allowed = [f.name for f in fields(DeviceProfile)]
    for k in d:
        if k not in allowed:
            raise UserError(f"{source}: unknown field '{k}' (allowed: {', '.join(allowed)})")
    for k in _REQUIRED:
        if k not in d:
            raise UserError(f"{source}: missing field '{k}': add `{k}: <value>` (see the shipped profiles)")
    for k in ("name", "title", "source"):
        if k in d and not isinstance(d[k], str):
            raise UserError(f"{source}: field '{k}' must be a string, got {d[k]!r}")
    if not d["name"].strip():
        raise UserError(f"{source}: field 'name' must not be empty")
    for k in _POSITIVE:
        v = d.get(k)
        if v is None and k in ("peak_fp32_tflops", "tdp_w"):
            continue
        if isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v) or v <= 0:
            raise UserError(f"{source}: field '{k}' must be a number > 0, got {v!r}")
    for k in _RATIOS:
        if k in d:
            v = d[k]
            if isinstance(v, bool) or not isinstance(v, (int, float)) or not 0 < v <= 1:
                raise UserError(f"{source}: field '{k}' must be a number in (0, 1], got {v!r}")
    if "overhead_us_per_layer" in d:
        v = d["overhead_us_per_layer"]
        if isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v) or v < 0:
            raise UserError(f"{source}: field 'overhead_us_per_layer' must be a number >= 0, got {v!r}")
    kw = {k: (float(v) if isinstance(v, int) and not isinstance(v, bool) else v) for k, v in d.items()}
    kw.setdefault("source", source)
    return DeviceProfile(**kw)


def builtin_profiles() -> list[str]:
    """Names of the shipped device profiles."""
    root = resources.files(__package__) / PROFILE_DIR
    return sorted(p.name[:-5] for p in root.iterdir() if p.name.endswith(".yaml"))


def load_profile(spec: str | Path) -> DeviceProfile:
    """A shipped profile by name (e.g. "jetson-agx-orin") or a user YAML file by path."""
    spec = str(spec)
    path = Path(spec)
    if spec.endswith((".yaml", ".yml")) or path.is_file():
        if not path.is_file():
            raise UserError(f"device profile {spec} does not exist: pass a YAML file or one of "
                            f"{', '.join(builtin_profiles())}")
        text, source = read_text(path, "device profile"), str(path)
    else:
        res = resources.files(__package__) / PROFILE_DIR / f"{spec}.yaml"
        if not res.is_file():
            raise UserError(f"unknown device '{spec}': use one of {', '.join(builtin_profiles())} "
                            "or a path to your own profile YAML")
        text, source = res.read_text(), f"{spec}.yaml"
    try:
        data = yaml_load(text)
    except yaml.YAMLError as e:
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise UserError(f"{source}: not valid YAML ({first})") from None
    return profile_from_dict(data, source)


# ----------------------------------------------------------------------------------------------- model shape
@dataclass(frozen=True)
class DecoderShape:
    layers: int
    hidden: int
    heads: int
    kv_heads: int
    head_dim: int
    intermediate: int
    vocab: int
    gated_mlp: bool = True
    tied_embeddings: bool = True

    @property
    def layer_linear_params(self) -> int:
        """Weights of one decoder layer's linears: q, k, v, o and the MLP (3 for gated, 2 otherwise)."""
        h, q, kv = self.hidden, self.heads * self.head_dim, self.kv_heads * self.head_dim
        return h * q + 2 * h * kv + q * h + (3 if self.gated_mlp else 2) * h * self.intermediate

    @property
    def lm_head_params(self) -> int:
        return self.vocab * self.hidden

    @property
    def linear_params(self) -> int:
        """Every weight that multiplies the hidden state once per token (decoder linears + LM head)."""
        return self.layers * self.layer_linear_params + self.lm_head_params


_CONFIG_KEYS = {
    "layers": ("num_hidden_layers", "n_layer", "num_layers"),
    "hidden": ("hidden_size", "n_embd", "d_model"),
    "heads": ("num_attention_heads", "n_head"),
    "vocab": ("vocab_size",),
}
# families whose MLP is up -> act -> down (two matrices); every other family is treated as gated (three)
UNGATED = {"gpt2", "opt", "gpt_neox", "gptj", "bloom", "falcon", "phi", "gpt_bigcode", "starcoder2", "codegen"}


def decoder_shape(config: Mapping, source: str = "config.json") -> DecoderShape:
    """Read the decoder geometry from a Hugging Face config dict (Llama/Qwen/Mistral/Gemma/GPT-2/OPT keys)."""
    if "text_config" in config and not any(k in config for k in _CONFIG_KEYS["layers"]):
        config = config["text_config"]

    def get(field: str) -> int:
        for k in _CONFIG_KEYS[field]:
            if config.get(k) is not None:
                return int(config[k])
        raise UserError(f"{source}: missing field '{_CONFIG_KEYS[field][0]}' (needed for the deployment estimate)")

    layers, hidden, heads, vocab = get("layers"), get("hidden"), get("heads"), get("vocab")
    kv_heads = int(config.get("num_key_value_heads") or heads)
    head_dim = int(config.get("head_dim") or hidden // heads)
    inter = next((int(config[k]) for k in ("intermediate_size", "ffn_dim", "n_inner") if config.get(k)), 4 * hidden)
    return DecoderShape(layers=layers, hidden=hidden, heads=heads, kv_heads=kv_heads, head_dim=head_dim,
                        intermediate=inter, vocab=vocab,
                        gated_mlp=str(config.get("model_type", "")) not in UNGATED,
                        tied_embeddings=bool(config.get("tie_word_embeddings", True)))


def read_config(folder: str | Path) -> dict:
    path = Path(folder) / "config.json"
    if not path.is_file():
        raise UserError(f"{path} does not exist: the deployment estimate needs the model's config.json")
    try:
        return json.loads(path.read_text())
    except json.JSONDecodeError as e:
        raise UserError(f"{path}: not valid JSON ({e.msg} at line {e.lineno})") from None


# ----------------------------------------------------------------------------------------------- weights
@dataclass(frozen=True)
class WeightBytes:
    resident: int   # bytes held in device memory
    per_token: int  # bytes read by one forward pass (the input-embedding table is only gathered, unless tied)


EMBEDDING_RE = re.compile(r"(^|\.)(embed_tokens|wte|word_embeddings|embed_in)\.weight$")
LM_HEAD_RE = re.compile(r"(^|\.)(lm_head|embed_out)\.")
FLOAT_DTYPES = ("F64", "F32", "F16", "BF16")


def safetensors_header(path: str | Path) -> dict[str, dict]:
    """Tensor table of a .safetensors file ({name: {dtype, shape, data_offsets}}) read from its header only."""
    path = Path(path)
    with open(path, "rb") as f:
        raw = f.read(8)
        if len(raw) < 8:
            raise UserError(f"{path}: truncated safetensors file (no header): re-export the model")
        (n,) = struct.unpack("<Q", raw)
        body = f.read(n)
    try:
        header = json.loads(body)
    except (json.JSONDecodeError, UnicodeDecodeError):
        raise UserError(f"{path}: corrupted safetensors header: re-export the model") from None
    header.pop("__metadata__", None)
    return header


def tensor_bytes(folder: str | Path, float_bits: int | None = 16) -> dict[str, int]:
    """Bytes of every tensor in a folder's *.safetensors files. Floating tensors are counted at
    `float_bits` (the precision they are deployed in; None = as stored); integer/packed ones as stored."""
    files = sorted(Path(folder).glob("*.safetensors"))
    if not files:
        raise UserError(f"{folder} has no .safetensors file: pass an export folder or a Hugging Face model folder")
    out: dict[str, int] = {}
    for f in files:
        for name, spec in safetensors_header(f).items():
            numel = math.prod(spec["shape"])
            dt = spec["dtype"]
            if dt in FLOAT_DTYPES and float_bits is not None:
                out[name] = numel * float_bits // 8
            else:
                b, e = spec["data_offsets"]
                out[name] = e - b
    return out


def weight_bytes(tensors: Mapping[str, int], tied: bool) -> WeightBytes:
    """Resident and per-token bytes from {tensor name: bytes}. The input-embedding table stays resident but
    a decode step gathers one row of it (neglected) - unless the LM head shares it, then it is read whole."""
    resident = sum(tensors.values())
    emb = sum(v for k, v in tensors.items() if EMBEDDING_RE.search(k))
    has_head = any(LM_HEAD_RE.search(k) for k in tensors)
    per_token = resident - emb + (emb if tied and not has_head else 0)
    return WeightBytes(resident=resident, per_token=per_token)


def weight_bytes_from_dir(folder: str | Path, float_bits: int | None = 16) -> WeightBytes:
    folder = Path(folder)
    tied = decoder_shape(read_config(folder), str(folder / "config.json")).tied_embeddings
    manifest = folder / "modelpress.json"
    if manifest.is_file() and any(LM_HEAD_RE.search(k) for k in json.loads(manifest.read_text()).get("aliases", {})):
        tied = True
    return weight_bytes(tensor_bytes(folder, float_bits), tied)


def weight_bytes_from_params(shape: DecoderShape, bits: float, embedding_bits: float = 16) -> WeightBytes:
    """What-if sizing: every linear (incl. an untied LM head) at `bits`, the embedding table at `embedding_bits`."""
    emb = shape.vocab * shape.hidden * embedding_bits / 8
    dec = shape.layers * shape.layer_linear_params * bits / 8
    if shape.tied_embeddings:
        return WeightBytes(resident=round(dec + emb), per_token=round(dec + emb))
    head = shape.lm_head_params * bits / 8
    return WeightBytes(resident=round(dec + head + emb), per_token=round(dec + head))


# ----------------------------------------------------------------------------------------------- roofline terms
def kv_cache_bytes(layers: int, kv_heads: int, head_dim: int, tokens: int, bits: float = 16, batch: int = 1) -> int:
    """K and V for `tokens` positions: 2 * L * n_kv * d_head * T * batch * bits / 8."""
    return round(2 * layers * kv_heads * head_dim * tokens * batch * bits / 8)


def attention_flops(shape: DecoderShape, query_positions: float) -> float:
    """QK^T and AV over `query_positions` (query, key) pairs summed over queries: 4 * L * n_h * d_head each."""
    return 4.0 * shape.layers * shape.heads * shape.head_dim * query_positions


def decode_flops(shape: DecoderShape, context: int) -> float:
    """One new token attending to `context` cached positions: 2 * linear params + attention."""
    return 2.0 * shape.linear_params + attention_flops(shape, context)


def prefill_flops(shape: DecoderShape, tokens: int, past: int = 0) -> float:
    """`tokens` new positions after `past` cached ones, causal attention, LM head on the last position only."""
    pairs = tokens * past + tokens * (tokens + 1) / 2
    return 2.0 * tokens * shape.layers * shape.layer_linear_params + 2.0 * shape.lm_head_params \
        + attention_flops(shape, pairs)


def roofline_seconds(flops: float, nbytes: float, peak: float, bandwidth: float) -> tuple[float, str]:
    """max(F / P, W / B) and which term bound it ("memory" or "compute")."""
    t_mem, t_comp = nbytes / bandwidth, flops / peak
    return (t_mem, "memory") if t_mem >= t_comp else (t_comp, "compute")


def energy_joules(power_w: float, seconds: float) -> float:
    return power_w * seconds


def deadline_met(step_seconds: float, control_hz: float) -> bool:
    return step_seconds <= 1.0 / control_hz


# ----------------------------------------------------------------------------------------------- the estimate
@dataclass(frozen=True)
class Estimate:
    device: str
    context: int
    compute: str
    weight_bytes: int
    kv_bytes: int
    total_bytes: int
    capacity_bytes: float
    fits: bool
    decode_bytes: int
    decode_flops: float
    decode_s: float            # peak clocks
    decode_s_sustained: float  # thermally derated
    decode_bound: str
    tokens_per_s: float        # sustained
    prefill_flops: float       # the whole context (time to first token)
    prefill_s: float
    prefill_s_sustained: float
    prefill_bound: str
    energy_j_per_token: float | None
    control_hz: float | None
    control_step_s: float | None
    deadline_met: bool | None

    def as_dict(self) -> dict:
        return asdict(self)


def estimate(profile: DeviceProfile, shape: DecoderShape, weights: WeightBytes, context: int, *,
             compute: str = "fp16", kv_bits: float = 16, control_hz: float | None = None,
             action_tokens: int = 1, obs_tokens: int = 0, bandwidth_efficiency: float | None = None,
             compute_efficiency: float | None = None, overhead_us_per_layer: float | None = None) -> Estimate:
    """Memory fit, decode/prefill roofline at peak and sustained clocks, energy and control deadline."""
    if context < 1:
        raise UserError(f"--context must be >= 1, got {context}")
    if control_hz is not None and control_hz <= 0:
        raise UserError(f"--control-hz must be > 0, got {control_hz}")
    if action_tokens < 0 or obs_tokens < 0 or obs_tokens > context:
        raise UserError(f"--action-tokens/--obs-tokens must be >= 0 and obs <= context, got {action_tokens}/{obs_tokens}")
    eta_b = profile.bandwidth_efficiency if bandwidth_efficiency is None else bandwidth_efficiency
    eta_p = profile.compute_efficiency if compute_efficiency is None else compute_efficiency
    for name, v in (("bandwidth efficiency", eta_b), ("compute efficiency", eta_p)):
        if not 0 < v <= 1:
            raise UserError(f"{name} must be in (0, 1], got {v}")
    tau = (profile.overhead_us_per_layer if overhead_us_per_layer is None else overhead_us_per_layer) * 1e-6
    fixed = shape.layers * tau  # per forward pass

    bw, peak = profile.bandwidth * eta_b, profile.peak(compute) * eta_p
    bw_s, peak_s = bw * profile.sustained_bandwidth_ratio, peak * profile.sustained_clock_ratio
    kv_total = kv_cache_bytes(shape.layers, shape.kv_heads, shape.head_dim, context, kv_bits)

    dec_bytes = weights.per_token + kv_total
    dec_flops = decode_flops(shape, context)
    dec, bound = roofline_seconds(dec_flops, dec_bytes, peak, bw)
    dec_sus = roofline_seconds(dec_flops, dec_bytes, peak_s, bw_s)[0] + fixed
    dec += fixed

    def prefill(tokens: int, past: int, p: float, b: float) -> tuple[float, str]:
        f = prefill_flops(shape, tokens, past)
        w = weights.per_token + kv_cache_bytes(shape.layers, shape.kv_heads, shape.head_dim, past + tokens, kv_bits)
        t, bd = roofline_seconds(f, w, p, b)
        return t + fixed, bd

    pre, pre_bound = prefill(context, 0, peak, bw)
    pre_sus = prefill(context, 0, peak_s, bw_s)[0]
    step = None
    if control_hz is not None:
        step = action_tokens * dec_sus + (prefill(obs_tokens, context - obs_tokens, peak_s, bw_s)[0] if obs_tokens else 0.0)
    total = weights.resident + kv_total
    return Estimate(
        device=profile.name, context=context, compute=compute, weight_bytes=weights.resident, kv_bytes=kv_total,
        total_bytes=total, capacity_bytes=profile.memory_bytes, fits=total <= profile.memory_bytes,
        decode_bytes=dec_bytes, decode_flops=dec_flops, decode_s=dec, decode_s_sustained=dec_sus, decode_bound=bound,
        tokens_per_s=1.0 / dec_sus, prefill_flops=prefill_flops(shape, context), prefill_s=pre,
        prefill_s_sustained=pre_sus, prefill_bound=pre_bound,
        energy_j_per_token=None if profile.tdp_w is None else energy_joules(profile.tdp_w, dec_sus),
        control_hz=control_hz, control_step_s=step,
        deadline_met=None if step is None else deadline_met(step, control_hz))


def estimate_dir(folder: str | Path, devices: list[str | Path], context: int, *, bits: float | None = None,
                 float_bits: int | None = 16, **kw) -> list[Estimate]:
    """Estimates for a model folder (export or HF folder with config.json + *.safetensors) on each device.
    `bits` sizes every linear at that width instead of reading the stored tensor bytes (what-if)."""
    folder = Path(folder)
    shape = decoder_shape(read_config(folder), str(folder / "config.json"))
    weights = weight_bytes_from_params(shape, bits) if bits is not None else weight_bytes_from_dir(folder, float_bits)
    return [estimate(load_profile(d), shape, weights, context, **kw) for d in devices]
