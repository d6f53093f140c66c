"""Export to the compressed-tensors format (PyPI `compressed-tensors`), which transformers loads through its
compressed-tensors integration and vLLM serves: W{2..8}A16 `pack-quantized` (group or channel, symmetric or
asymmetric; vLLM serves 4 and 8 bits, groups 32/64/128 or per channel) and pruned layers as dense weights with
sparsity metadata (`sparsity_config`, structure 2:4 where the masks are 2:4, which vLLM's CUTLASS 2:4 path
reads for unquantized layers).

The codes are packed by the library's own compressor (PackedQuantizationCompressor, per module) and the
`quantization_config` is written by its ModelCompressor; we hand it our exact dequantized weights and scales,
and it recovers our codes exactly (w = s (q - z), so round(w / s) + z_ct = q - 2^(b-1)). Pruned weights of a
quantized layer are 0 and so get the code of their zero point, which dequantizes to exactly 0.

Policy for shapes the format cannot represent (checked by `preflight` from the recipe and the model's shapes
before any compression starts):
  * group size that does not divide a module's input size (SmolLM2: 576 inputs, group 128). Our quantizer
    gives such a module a ragged last group; compressed-tensors and vLLM need equal groups. The module is
    written with the largest group among 128/64/32 that divides both its input size and the group size (64
    for 576 with g128), each of our scales written once per sub-group, in its own config group (asymmetric
    schemes: every module of the scheme takes the smallest such group, one config group, because
    transformers' dequantize path applies the first config group to all dense layers). The weights
    are bit-identical (the same codes and scales), so perplexity is unchanged; the cost is the repeated
    scales (+16/g' - 16/g bits per weight on those modules, printed). No such group: refused before compression.
  * clustered, low-rank and losslessly coded layers: compressed-tensors has no form for them: refused before
    compression (export them in the native format).
  * per-head bit widths inside one linear (quantize `budget: capability`, QuantLinear.bits_map): a
    compressed-tensors scheme is per module, so the module is written at its widest width B (in the config
    group of B-bit modules) with the same scales and its codes moved onto the B-bit grid (QuantLinear.widest:
    every b-bit code is exactly a B-bit one), so the weights a runtime loads are bit-identical; the file
    stores B bits for every weight of the module, so the lower-width heads save memory in the native format
    only (noted before compression).
  * a quantized embedding (stage quantize_embedding): vLLM's compressed-tensors integration quantizes linear
    layers only, so the embedding is written dequantized in the storage dtype (16-bit; noted).
  * 2:4 sparsity: compressed-tensors 0.20 no longer has a compressor for the `sparse-24-bitmask` form
    (ModelCompressor: "Sparse24 ... not supported as of compressed-tensors>0.14") and transformers 5 cannot load
    it, so pruned layers are written dense with `sparsity_config` format `dense`, structure 2:4 (vLLM accepts
    both `dense` and `sparse-24-bitmask` for its 2:4 kernels)."""
from __future__ import annotations

import json
import os
from pathlib import Path

import torch
from torch import nn

from ..algos import kquant
from ..errors import UserError
from ..io import atomic_dir, atomic_save_file
from ..modules import QuantEmbedding, QuantLinear, SparseLinear
from .native import _config_dict, storage_dtype, to_storage, write_checksums

GROUPS = (128, 64, 32)              # group sizes vLLM's WNA16 kernels serve (and -1: per channel)
VLLM_BITS = (4, 8)                  # vLLM's WNA16_SUPPORTED_BITS
UNSUPPORTED = ("ClusteredLinear", "LowRankLinear", "ZipLinear", "ZipEmbedding")


def ct_group(in_features: int, group_size: int | None) -> int | None:
    """The group size a module with a ragged last group is written with: group_size itself when it divides
    in_features, else the largest of 128/64/32 dividing both (the same codes and scales, exactly). None =
    per channel. Raises UserError when there is none."""
    if group_size is None or in_features % group_size == 0:
        return group_size
    for g in GROUPS:
        if g < group_size and group_size % g == 0 and in_features % g == 0:
            return g
    raise UserError(f"compressed-tensors needs equal groups, but {in_features} inputs with group_size {group_size} "
                    f"leave a ragged last group and no group of {', '.join(map(str, GROUPS))} divides both: use a "
                    "group_size that divides the input sizes (e.g. 32 or 64) or export in the native format only")


def plan_groups(items: list[tuple[str, int, int | None, int, bool]]) -> dict[str, int | None]:
    """{module: the group size it is written with} for (name, in_features, group_size, bits, sym) items.
    Symmetric modules: ct_group each (a fallback module lands in its own config group). Asymmetric ones: one
    group per (bits, group_size), the smallest of their ct_groups (it divides all of them, so the weights stay
    exact), because transformers' dequantize path, the only one that loads packed asymmetric zero points,
    applies the first config group's scheme to every dense layer."""
    own = {n: ct_group(cols, g) for n, cols, g, _, _ in items}
    common: dict[tuple, int] = {}
    for n, _, g, bits, sym in items:
        if not sym and own[n] is not None:
            common[(bits, g)] = min(common.get((bits, g), own[n]), own[n])
    return {n: common.get((bits, g), own[n]) if not sym else own[n] for n, _, g, bits, sym in items}


def _extra_bits(in_features: int, g: int, g_ct: int, sym: bool, bits: int) -> float:
    """Bits per weight added by writing a ragged-g module with groups of g_ct (repeated fp16 scales, zeros)."""
    per_group = 16 + (0 if sym else bits)
    return per_group * (in_features // g_ct - -(-in_features // g)) / in_features


def preflight(model: nn.Module, stages) -> list[str]:
    """Check, before any compression starts, that the recipe's stages (a sequence of (name, config)) give a
    model compressed-tensors can write and vLLM can serve. Raises UserError for what cannot be written;
    returns notes (fallback group sizes with their cost, what vLLM will not serve) to print."""
    notes: list[str] = []
    for name, cfg in stages:
        if name in ("cluster", "lowrank", "lossless"):
            raise UserError(f"export format compressed-tensors cannot store the `{name}` stage's layers: remove "
                            "compressed-tensors from export.formats (the native format stores them) or the stage")
        if name == "quantize_embedding":
            notes.append("compressed-tensors: the quantized embedding is written dequantized at 16 bits (vLLM's "
                         "compressed-tensors integration quantizes linear layers only)")
        if name != "quantize":
            continue
        if getattr(cfg, "budget", "uniform") == "capability":
            notes.append("compressed-tensors: linears with per-head bit widths are written at their widest width "
                         "(identical weights; the narrower heads' savings exist in the native format only)")
        bits = {cfg.bits} if getattr(cfg, "budget", "uniform") == "uniform" else set(range(2, 9))
        if not bits <= set(VLLM_BITS):
            notes.append(f"compressed-tensors: {'mixed ' if len(bits) > 1 else ''}{'/'.join(map(str, sorted(bits)))}"
                         "-bit weights load in transformers; vLLM serves 4 and 8 bits only")
        lins = cfg.target.select(model)
        fmt = getattr(cfg, "format", "int")
        if fmt in kquant.FORMATS and any(kquant.fits(lin.in_features) for lin in lins.values()):
            raise UserError(f"quantize.format {fmt} puts the linears whose inputs are whole 256-weight super-blocks "
                            "on a k-quant grid, which compressed-tensors cannot store: remove compressed-tensors from "
                            "export.formats (gguf and native store it) or quantize with format int")
        plan = plan_groups([(n, lin.in_features, cfg.group_size, cfg.bits, cfg.sym)      # UserError here
                            for n, lin in lins.items()])
        moved: dict[tuple[int, int], list[int]] = {}
        for lname, lin in lins.items():
            if plan[lname] != cfg.group_size:
                moved.setdefault((lin.in_features, plan[lname]), []).append(lin.weight.numel())
        for (cols, g), sizes in moved.items():
            extra = _extra_bits(cols, cfg.group_size, g, cfg.sym, cfg.bits)
            why = (f"group_size {cfg.group_size} leaves a ragged last group" if cols % cfg.group_size
                   else "asymmetric: one group size per scheme")
            notes.append(f"compressed-tensors: {len(sizes)} modules with {cols} inputs are written with group {g} "
                         f"({why}): identical weights and "
                         f"perplexity, +{extra:.3f} bits / weight on them (+{extra * sum(sizes) / 8e6:.2f} MB)")
    return notes


def _module_tensors(m: QuantLinear, name: str, storage: torch.dtype, g: int | None
                    ) -> tuple[dict[str, torch.Tensor], object]:
    """compressed-tensors' own packing of one QuantLinear written with group g -> ({name.key: tensor}, args)."""
    from compressed_tensors.compressors.pack_quantized.base import PackedQuantizationCompressor
    from compressed_tensors.quantization import QuantizationArgs, QuantizationScheme
    args = QuantizationArgs(num_bits=m.bits, type="int", symmetric=m.sym, group_size=g,
                            strategy="group" if g else "channel")
    rep = (m.group_size // g) if g else 1                  # each of our groups = rep compressed-tensors groups
    n_ct = m.in_features // g if g else 1
    scale = m.scale.float().repeat_interleave(rep, 1)[:, :n_ct]                   # (rows, n_ct) fp16 values
    half = 1 << (m.bits - 1)
    _, z = m.widest()                                      # mixed widths: the zero points on the widest grid
    zero = (z.to(torch.int16) - half).to(torch.int8).repeat_interleave(rep, 1)[:, :n_ct]
    sd = {"weight": m.dequantized().float(), "weight_scale": scale, "weight_zero_point": zero}
    out = PackedQuantizationCompressor.compress(sd, QuantizationScheme(targets=[name], weights=args))
    out["weight_scale"] = out["weight_scale"].half()       # our scales are fp16 values: stored exactly
    if m.bias is not None:
        out["bias"] = m.bias.detach().to(storage)
    return {f"{name}.{k}": v.cpu().contiguous() for k, v in out.items()}, args


def save_compressed_tensors(model: nn.Module, tokenizer, out: str | os.PathLike,
                            dtype: str | torch.dtype = "auto") -> Path:
    """Write a compressed-tensors checkpoint folder (atomically) that
    `transformers.AutoModelForCausalLM.from_pretrained(out)` loads and vLLM serves. Unquantized tensors are
    stored in `dtype` (as the native export: see modelpress.export.native.storage_dtype; the model is
    rounded to it in place first), scales as fp16."""
    from compressed_tensors.compressors import ModelCompressor
    from compressed_tensors.config import SparsityCompressionConfig
    from compressed_tensors.quantization import QuantizationConfig, QuantizationScheme

    from ..model import conv1d_family
    if conv1d_family(model.config):
        raise UserError(f"compressed-tensors cannot store {model.config.model_type}: transformers keeps its linears as "
                        "Conv1D modules, which compressed-tensors does not target: export in the native format")
    out = Path(out)
    if out.exists() and any(out.iterdir()) and not (out / "config.json").exists():
        raise UserError(f"output folder {out} exists and is not a model folder: choose a new path")
    storage = dtype if isinstance(dtype, torch.dtype) else storage_dtype(model, dtype)
    to_storage(model, storage)
    groups: dict[str, tuple[object, list[str]]] = {}
    tensors: dict[str, torch.Tensor] = {}
    sparse_names, zeros, total = [], 0, 0
    skip: list[str] = []
    plan = plan_groups([(n, m.in_features, m.group_size, m.bits, m.sym) for n, m in model.named_modules()
                        if isinstance(m, QuantLinear)])
    for name, m in model.named_modules():
        if isinstance(m, QuantLinear) and getattr(m, "fmt", None):     # fractional zero points (issue 24)
            raise UserError(f"{name} sits on a {m.fmt} grid, which compressed-tensors cannot store: export it "
                            "as gguf or native, or quantize with format int")
        if type(m).__name__ in UNSUPPORTED:
            raise UserError(f"{name} is a {type(m).__name__}, which compressed-tensors cannot store: "
                            "export it in the native format (formats: [native])")
        if isinstance(m, QuantLinear):
            t, args = _module_tensors(m, name, storage, plan[name])
            tensors.update(t)
            key = json.dumps(args.model_dump(mode="json"), sort_keys=True)
            groups.setdefault(key, (args, []))[1].append(name)
            skip.append(name + ".")
        elif isinstance(m, QuantEmbedding):
            tensors[f"{name}.weight"] = m.weight.detach().to(storage).cpu().contiguous()
            skip.append(name + ".")
        if isinstance(m, (QuantLinear, SparseLinear)) and getattr(m, "keep_bits", None) is not None:
            keep = m.keep
            sparse_names.append(name)
            zeros += int((~keep).sum())
            total += keep.numel()
    seen = {id(p) for n, p in model.named_parameters() if any(n.startswith(s) for s in skip)}
    for k, v in model.state_dict(keep_vars=True).items():
        if any(k.startswith(p) for p in skip) or id(v) in seen:
            continue
        seen.add(id(v))
        tensors[k] = v.detach().to(storage if v.is_floating_point() else v.dtype).cpu().contiguous()
    if not groups and not sparse_names:
        raise UserError("the model has no quantized or pruned layers to export in compressed-tensors format")
    cfg = _config_dict(model)
    cfg["dtype"] = str(storage).replace("torch.", "")
    qc = None
    if groups:
        schemes = {f"group_{i}": QuantizationScheme(targets=names, weights=args)
                   for i, (args, names) in enumerate(groups.values())}
        qc = QuantizationConfig(config_groups=schemes, format="pack-quantized", quantization_status="compressed")
    with atomic_dir(out) as tmp:
        atomic_save_file(tensors, tmp / "model.safetensors", metadata={"format": "pt"})
        (tmp / "config.json").write_text(json.dumps(cfg, indent=1))
        ModelCompressor(quantization_config=qc).update_config(str(tmp))     # the library writes its own config
        if sparse_names:
            full = json.loads((tmp / "config.json").read_text())
            q = full.setdefault("quantization_config", {"quant_method": "compressed-tensors"})
            q["sparsity_config"] = SparsityCompressionConfig.load_from_registry(
                "dense", targets=sparse_names, global_sparsity=zeros / total,
                sparsity_structure=_structure(model, sparse_names)).model_dump(exclude_none=True, mode="json")
            (tmp / "config.json").write_text(json.dumps(full, indent=1))
        if tokenizer is not None:
            tokenizer.save_pretrained(tmp)
        write_checksums(tmp)
    return out


def _structure(model: nn.Module, names: list[str]) -> str:
    from ..algos.prune import is_nm
    for n, m in ((2, 4), (4, 8)):
        if all(is_nm(model.get_submodule(x).keep, n, m) for x in names):
            return f"{n}:{m}"
    return "unstructured"
