"""Size accounting from exactly what an export stores: every packed code, scale, zero point, mask and
index counts. Reference size = every parameter at 16 bits (the BF16 checkpoint users start from)."""
from __future__ import annotations

from torch import nn

from ..export.native import collect_tensors
from ..model import count_params


def size_report(model: nn.Module) -> dict:
    tensors, modules, _ = collect_tensors(model)
    total = sum(t.numel() * t.element_size() for t in tensors.values())
    layers, comp_bytes, comp_weights = {}, 0, 0
    for name, spec in modules.items():
        nbytes = sum(t.numel() * t.element_size() for k, t in tensors.items() if k.startswith(name + "."))
        cfg = spec["config"]
        n = cfg.get("in", 0) * cfg.get("out", 0) or 1
        layers[name] = {"kind": spec["kind"], "bytes": nbytes, "bits": 8 * nbytes / n}
        comp_bytes += nbytes
        comp_weights += n
    params = count_params(model)
    return {"params": params, "original_bytes": 2 * params, "compressed_bytes": total,
            "ratio": 2 * params / total if total else 0.0,
            "bits_per_weight": 8 * comp_bytes / comp_weights if comp_weights else 16.0,
            "compressed_modules": len(modules), "layers": layers}
