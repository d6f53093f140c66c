"""Export to the compressed-tensors format (PyPI `compressed-tensors`), which transformers loads through
its compressed-tensors integration and vLLM serves: W{2..8}A16 `pack-quantized` (group or channel,
symmetric or asymmetric) and dense weights with sparsity metadata.

Our codes map exactly: compressed-tensors stores signed codes q_ct = q - 2^(b-1) and zero points
z_ct = z - 2^(b-1), so w_hat = s (q - z) = s (q_ct - z_ct); pruned weights of a quantized layer get
the code of their zero point, which dequantizes to exactly 0. Packing and the config schema come
from the library itself."""
from __future__ import annotations

import json
import os
from pathlib import Path

import torch
from torch import nn

from ..errors import UserError
from ..io import atomic_dir, atomic_save_file
from ..modules import QuantLinear, SparseLinear
from .native import _config_dict, write_checksums


def _scheme_key(m: QuantLinear) -> tuple:
    return (m.bits, m.group_size, m.sym)


def _quant_tensors(m: QuantLinear, dtype: torch.dtype) -> dict[str, torch.Tensor]:
    from compressed_tensors.compressors.pack_quantized.helpers import pack_to_int32
    half = 1 << (m.bits - 1)
    q = m.q.to(torch.int16)
    if m.keep is not None:       # pruned weights: the code of the zero point dequantizes to exactly 0
        zcol = m.zero.to(torch.int16).repeat_interleave(m.group_size or m.in_features, 1)[:, : m.in_features]
        q = torch.where(m.keep, q, zcol)
    t = {"weight_packed": pack_to_int32((q - half).to(torch.int8), m.bits),
         "weight_scale": m.scale.to(dtype),
         "weight_shape": torch.tensor([m.out_features, m.in_features], dtype=torch.int64)}
    if not m.sym:
        t["weight_zero_point"] = pack_to_int32((m.zero.to(torch.int16) - half).to(torch.int8), m.bits, packed_dim=0)
    if m.bias is not None:
        t["bias"] = m.bias.detach()
    return t


def save_compressed_tensors(model: nn.Module, tokenizer, out: str | os.PathLike) -> Path:
    """Write a compressed-tensors checkpoint folder (atomically) that
    `transformers.AutoModelForCausalLM.from_pretrained(out)` loads."""
    from compressed_tensors.config import SparsityCompressionConfig
    from compressed_tensors.quantization import QuantizationArgs, QuantizationConfig, QuantizationScheme

    out = Path(out)
    if out.exists() and any(out.iterdir()) and not (out / "config.json").exists():
        raise UserError(f"output folder {out} exists and is not a model folder: choose a new path")
    dtype = next(model.parameters()).dtype
    groups: dict[tuple, list[str]] = {}
    tensors: dict[str, torch.Tensor] = {}
    sparse_names, zeros, total = [], 0, 0
    skip: list[str] = []
    for name, m in model.named_modules():
        if isinstance(m, QuantLinear):
            if getattr(m, "fmt", None):          # fractional zero points on a k-quant grid (issue 24)
                raise UserError(f"{name} sits on a {m.fmt} grid, which compressed-tensors cannot store: export it "
                                "as gguf or native, or quantize with format int")
            if m.group_size and m.in_features % m.group_size:
                raise UserError(f"compressed-tensors needs group_size to divide every input size, but {name} has "
                                f"{m.in_features} inputs and group_size {m.group_size}: quantize with a dividing "
                                "group_size (e.g. 32 or 64) or export in the native format")
            groups.setdefault(_scheme_key(m), []).append(name)
            tensors.update({f"{name}.{k}": v for k, v in _quant_tensors(m, dtype).items()})
            skip.append(name + ".")
        elif type(m).__name__ in ("ClusteredLinear", "LowRankLinear", "ZipLinear", "ZipEmbedding"):
            raise UserError(f"{name} is a {type(m).__name__}, which compressed-tensors cannot store: "
                            "export it in the native format (formats: [native])")
        if isinstance(m, (QuantLinear, SparseLinear)) and getattr(m, "keep", None) is not None:
            sparse_names.append(name)
            zeros += int((~m.keep).sum())
            total += m.keep.numel()
    seen = set()
    for k, v in model.state_dict(keep_vars=True).items():
        if any(k.startswith(p) for p in skip) or id(v) in seen:
            continue
        seen.add(id(v))
        tensors[k] = v.detach()
    if not groups and not sparse_names:
        raise UserError("the model has no quantized or pruned layers to export in compressed-tensors format")
    cfg = _config_dict(model)
    if groups:
        schemes = {}
        for i, ((bits, gs, sym), names) in enumerate(sorted(groups.items(), key=lambda kv: str(kv[0]))):
            args = QuantizationArgs(num_bits=bits, type="int", symmetric=sym, group_size=gs,
                                    strategy="group" if gs else "channel")
            schemes[f"group_{i}"] = QuantizationScheme(targets=names, weights=args)
        qc = QuantizationConfig(config_groups=schemes, format="pack-quantized", quantization_status="compressed")
        cfg["quantization_config"] = qc.model_dump(exclude_none=True, mode="json")
    if sparse_names:
        sc = SparsityCompressionConfig.load_from_registry("dense", targets=sparse_names,
                                                          global_sparsity=zeros / total,
                                                          sparsity_structure=_structure(model, sparse_names))
        cfg.setdefault("quantization_config", {"quant_method": "compressed-tensors"})
        cfg["quantization_config"]["sparsity_config"] = sc.model_dump(exclude_none=True, mode="json")
    cfg["quantization_config"]["quant_method"] = "compressed-tensors"
    with atomic_dir(out) as tmp:
        atomic_save_file({k: v.cpu().contiguous() for k, v in tensors.items()}, tmp / "model.safetensors",
                         metadata={"format": "pt"})
        (tmp / "config.json").write_text(json.dumps(cfg, indent=1))
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
