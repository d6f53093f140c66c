"""Size accounting from exactly what an export stores: every packed code, scale, zero point, mask, index and
every unquantized tensor in its storage dtype (16-bit by default, modelpress.export.native.storage_dtype).
Headline figures are over the whole artifact and against two references: the 16-bit original (every
parameter at 16 bits: the BF16 checkpoint users start from) and the fp32 source (every parameter at 32 bits).
`bits_per_weight` counts the compressed modules alone; `bits_per_param` the whole artifact. A QuantLinear with
per-head widths (arXiv 2603.16440) stores each width's codes at that width, so its `bits` is exact as stored;
`code_bits` adds the mean code width alone."""
from __future__ import annotations

import torch
from torch import nn

from ..export.native import collect_tensors, compressed_modules, storage_dtype, storage_names
from ..model import count_params


def size_report(model: nn.Module, storage: torch.dtype | str | None = None) -> dict:
    """storage: the export's storage dtype (torch dtype or a recipe `export.dtype` string); None = auto."""
    storage = storage_dtype(model, storage or "auto") if not isinstance(storage, torch.dtype) else storage
    tensors, modules, _ = collect_tensors(model, storage)
    comp = compressed_modules(model)
    return size_of({k: t.numel() * t.element_size() for k, t in tensors.items()}, modules,
                   {n: module_extras(m) for n, m in comp.items()}, count_params(model), storage)


def plain_size(model: nn.Module, storage: torch.dtype | str | None = None) -> dict:
    """size_report of a model without compressed modules from its tensors' shapes and dtypes alone (they may
    sit on the meta device: modelpress.engine.store.skeleton): every stored tensor once, floating ones wider
    than the storage dtype counted at it, as collect_tensors stores them."""
    storage = storage_dtype(model, storage or "auto") if not isinstance(storage, torch.dtype) else storage
    tensors, seen = {}, set()
    for k, v in model.state_dict(keep_vars=True).items():
        if id(v) not in seen:
            seen.add(id(v))
            tensors[k] = v
    cast = set(storage_names(tensors, {}, storage))
    nbytes = {k: v.numel() * (storage.itemsize if k in cast else v.element_size()) for k, v in tensors.items()}
    return size_of(nbytes, {}, {}, count_params(model), storage)


def module_extras(m: nn.Module) -> dict:
    """What a compressed module adds to its size row: `code_bits` (per-head widths: the codes' mean width;
    `bits` counts everything stored) and `sparsity` (from its mask only, not weights that rounded to 0)."""
    out = {}
    if getattr(m, "bits_map", None) is not None:
        out["code_bits"] = m.mean_bits
    keep = getattr(m, "keep", None) if getattr(m, "keep_bits", None) is not None else None
    if keep is not None:
        out["sparsity"] = 1.0 - float(keep.float().mean())
    return out


def size_of(nbytes: dict[str, int], modules: dict, extras: dict[str, dict], params: int, storage: torch.dtype) -> dict:
    """size_report from the stored bytes of every tensor (by name), the compressed modules' specs, their
    module_extras and the parameter count: also computable from an export's header and manifest alone."""
    total = sum(nbytes.values())
    layers, comp_bytes, comp_weights = {}, 0, 0
    for name, spec in modules.items():
        b = sum(v for k, v in nbytes.items() if k.startswith(name + "."))
        cfg = spec["config"]
        n = cfg.get("in", 0) * cfg.get("out", 0) or 1
        layers[name] = {"kind": spec["kind"], "bytes": b, "bits": 8 * b / n, **extras.get(name, {})}
        comp_bytes += b
        comp_weights += n
    return {"params": params, "original_bytes": 2 * params, "fp32_bytes": 4 * params, "compressed_bytes": total,
            "storage_dtype": str(storage).replace("torch.", ""),
            "vs_16bit": total / (2 * params) if params else 0.0, "vs_fp32": total / (4 * params) if params else 0.0,
            "bits_per_weight": 8 * comp_bytes / comp_weights if comp_weights else 8.0 * storage.itemsize,
            "bits_per_param": 8 * total / params if params else 0.0,
            "compressed_modules": len(modules), "layers": layers}


def artifact_bytes(size: dict) -> float | None:
    """The artifact's bytes: the written weights file when known (file_bytes), else the stored tensor bytes."""
    v = size.get("file_bytes", size.get("compressed_bytes"))
    return float(v) if isinstance(v, (int, float)) else None


def headline(size: dict) -> str:
    """One line, the same in `compress`, `inspect` and the HTML report: artifact bytes and its ratio to the
    16-bit original and to the fp32 source."""
    b, params = artifact_bytes(size), size.get("params")
    if not b or not params:
        return "size unknown"
    what = "model.safetensors" if "file_bytes" in size else "stored tensors"
    return (f"{b / 1e6:.1f} MB ({what}) = {b / (2 * params):.3f}x the 16-bit original ({2 * params / 1e6:.1f} MB), "
            f"{b / (4 * params):.3f}x the fp32 source ({4 * params / 1e6:.1f} MB); {8 * b / params:.2f} bits / parameter")


def has_masks(size_or_layers: dict) -> bool:
    """True when some layer carries a pruning mask (sparsity is only reported then)."""
    return any(isinstance(v, dict) and "sparsity" in v for v in size_or_layers.values())
