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

from ..export.native import collect_tensors, compressed_modules, storage_dtype
from ..model import count_params


def size_report(model: nn.Module, storage: torch.dtype | str | None = None) -> dict:
    """storage: the export's storage dtype (torch dtype or a recipe `export.dtype` string); None = auto."""
    storage = storage_dtype(model, storage or "auto") if not isinstance(storage, torch.dtype) else storage
    tensors, modules, _ = collect_tensors(model, storage)
    comp = compressed_modules(model)
    total = sum(t.numel() * t.element_size() for t in tensors.values())
    layers, comp_bytes, comp_weights = {}, 0, 0
    for name, spec in modules.items():
        nbytes = sum(t.numel() * t.element_size() for k, t in tensors.items() if k.startswith(name + "."))
        cfg = spec["config"]
        n = cfg.get("in", 0) * cfg.get("out", 0) or 1
        layers[name] = {"kind": spec["kind"], "bytes": nbytes, "bits": 8 * nbytes / n}
        keep = getattr(comp[name], "keep", None) if getattr(comp[name], "keep_bits", None) is not None else None
        if getattr(comp[name], "bits_map", None) is not None:    # per-head widths: the codes' mean width
            layers[name]["code_bits"] = comp[name].mean_bits      # (`bits` counts everything stored)
        if keep is not None:                       # mask-based sparsity only (not weights that rounded to 0)
            layers[name]["sparsity"] = 1.0 - float(keep.float().mean())
        comp_bytes += nbytes
        comp_weights += n
    params = count_params(model)
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
