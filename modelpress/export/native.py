"""The native modelpress export format (see the package docstring) and its exact reload."""
from __future__ import annotations

import json
import os
from pathlib import Path

import torch
import yaml
from safetensors.torch import load_file
from torch import nn

from ..errors import UserError
from ..io import atomic_dir, atomic_save_file, atomic_write_text, sha256_file, sha256_tensor
from ..model import REFERENCE, load, normalize, set_module

FORMAT = "modelpress/1"
MANIFEST = "modelpress.json"
WEIGHTS = "model.safetensors"


def compressed_modules(model: nn.Module) -> dict[str, nn.Module]:
    from ..modules import MODULE_TYPES
    out = {}
    for n, m in model.named_modules():
        if type(m).__name__ in MODULE_TYPES and hasattr(m, "to_state"):
            if not any(n.startswith(p + ".") for p in out):
                out[n] = m
    return out


def collect_tensors(model: nn.Module) -> tuple[dict[str, torch.Tensor], dict, dict[str, str]]:
    """Everything an export stores: (tensors, {module: {kind, config}}, {alias: tensor name})."""
    comp = compressed_modules(model)
    tensors: dict[str, torch.Tensor] = {}
    modules = {}
    for name, m in comp.items():
        t, cfg = m.to_state()
        modules[name] = {"kind": type(m).__name__, "config": cfg}
        tensors.update({f"{name}.{k}": v.detach().cpu().contiguous() for k, v in t.items()})
    seen: dict[int, str] = {}
    aliases = {}
    for k, v in model.state_dict(keep_vars=True).items():
        if any(k.startswith(p + ".") for p in comp):
            continue
        ptr = id(v)
        if ptr in seen:
            aliases[k] = seen[ptr]
            continue
        seen[ptr] = k
        tensors[k] = v.detach().cpu().contiguous()
    return tensors, modules, aliases


def _config_dict(model) -> dict:
    cfg = model.config.to_dict()
    cfg.pop("quantization_config", None)
    return cfg


def save(model: nn.Module, tokenizer, out: str | os.PathLike, recipe: dict | None = None,
         report: dict | None = None, calibration: dict | None = None, extra_files: dict[str, str] | None = None) -> Path:
    """Write the native export folder atomically (exposed as `modelpress.export`). Returns its path.

    >>> modelpress.export(model, tok, "out/smollm2-w4", recipe=recipe.to_dict())
    >>> model, tok = modelpress.load("out/smollm2-w4")        # identical logits
    """
    out = Path(out)
    if out.exists() and not (out / MANIFEST).exists() and any(out.iterdir()):
        raise UserError(f"output folder {out} exists and is not a modelpress export: choose a new --out")
    with atomic_dir(out) as tmp:
        tensors, modules, aliases = collect_tensors(model)
        atomic_save_file(tensors, tmp / WEIGHTS, metadata={"format": FORMAT})
        sha = {k: sha256_tensor(v) for k, v in tensors.items()}
        write_folder_files(tmp, model, tokenizer, str(next(model.parameters()).dtype), modules, aliases, sha,
                           recipe, report, calibration, extra_files)
    return out


def write_folder_files(tmp: Path, model: nn.Module, tokenizer, dtype: str, modules: dict, aliases: dict,
                       tensor_sha256: dict, recipe: dict | None = None, report: dict | None = None,
                       calibration: dict | None = None, extra_files: dict[str, str] | None = None) -> None:
    """Everything of an export folder beside model.safetensors, checksums.json last."""
    manifest = {"format": FORMAT, "dtype": dtype, "model_type": model.config.model_type,
                "modules": modules, "aliases": aliases, "tensor_sha256": tensor_sha256}
    (tmp / MANIFEST).write_text(json.dumps(manifest, indent=1))
    (tmp / "config.json").write_text(json.dumps(_config_dict(model), indent=1))
    if tokenizer is not None:
        tokenizer.save_pretrained(tmp)
    if recipe is not None:
        (tmp / "recipe.yaml").write_text(yaml.safe_dump(recipe, sort_keys=False))
    if report is not None:
        (tmp / "report.json").write_text(json.dumps(report, indent=1, default=float))
    if calibration is not None:
        (tmp / "calibration.json").write_text(json.dumps(calibration, indent=1))
    for name, text in (extra_files or {}).items():
        (tmp / name).write_text(text)
    write_checksums(tmp)


def write_checksums(folder: Path) -> None:
    sums = {p.name: sha256_file(p) for p in sorted(folder.iterdir()) if p.is_file() and p.name != "checksums.json"}
    atomic_write_text(folder / "checksums.json", json.dumps(sums, indent=1))


def verify(folder: str | os.PathLike) -> None:
    """Check every file against checksums.json; raises UserError naming the first corrupted file."""
    folder = Path(folder)
    path = folder / "checksums.json"
    if not path.exists():
        raise UserError(f"{folder} has no checksums.json: it is not a complete modelpress export; re-export it")
    for name, digest in json.loads(path.read_text()).items():
        f = folder / name
        if not f.exists():
            raise UserError(f"{f} is missing from the export: re-export the model")
        if sha256_file(f) != digest:
            raise UserError(f"{f} is corrupted (sha256 mismatch with checksums.json): re-export the model")


def apply_state(root: nn.Module, tensors: dict[str, torch.Tensor], modules: dict, aliases: dict,
                where: str = "checkpoint") -> None:
    """Rebuild compressed modules inside `root` from their stored state and assign every plain tensor
    (the inverse of collect_tensors on the same module tree)."""
    from ..modules import MODULE_TYPES
    tensors = dict(tensors)
    for name, spec in modules.items():
        kind = spec["kind"]
        if kind not in MODULE_TYPES:
            raise UserError(f"{where} uses module kind {kind!r} unknown to this modelpress: upgrade modelpress")
        pre = name + "."
        sub = {k[len(pre):]: tensors.pop(k) for k in [k for k in tensors if k.startswith(pre)]}
        set_module(root, name, MODULE_TYPES[kind].from_state(sub, spec["config"]))
    for alias, src in aliases.items():
        tensors[alias] = tensors[src]
    missing, unexpected = root.load_state_dict(tensors, strict=False, assign=True)
    comp = tuple(n + "." for n in modules)
    missing = [k for k in missing if not k.startswith(comp)]
    if missing or unexpected:
        raise UserError(f"{where} does not match the model (missing {missing[:3]}, unexpected {unexpected[:3]}): "
                        "re-export the model")
    if aliases and hasattr(root, "tie_weights"):
        root.tie_weights()
    from ..modules import retie
    retie(root)


def load_model(src: str | os.PathLike = REFERENCE, dtype: torch.dtype | str = torch.float32):
    """(model, tokenizer) from a modelpress export (kept in its own dtype: its logits must match exactly)
    or anything modelpress.model.load reads ("smollm2", an HF folder, a .gguf file, a hub id)."""
    path = Path(str(src))
    if path.is_dir() and (path / MANIFEST).exists():
        return load_compressed(path)
    return load(src, dtype)


def load_compressed(folder: str | os.PathLike, check: bool = True):
    """Rebuild (model, tokenizer) from a native export; logits equal the in-memory compressed model's."""
    from accelerate import init_empty_weights
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    folder = Path(folder)
    if check:
        verify(folder)
    manifest = json.loads((folder / MANIFEST).read_text())
    if manifest.get("format") != FORMAT:
        raise UserError(f"{folder} has export format {manifest.get('format')!r}; this modelpress reads {FORMAT}")
    dtype = getattr(torch, manifest["dtype"].replace("torch.", ""))
    config = AutoConfig.from_pretrained(folder)
    with init_empty_weights():
        model = AutoModelForCausalLM.from_config(config, dtype=dtype)
    normalize(model)
    apply_state(model, load_file(folder / WEIGHTS), manifest["modules"], manifest.get("aliases", {}), str(folder))
    tok = AutoTokenizer.from_pretrained(folder) if (folder / "tokenizer_config.json").exists() else None
    return model.eval(), tok
