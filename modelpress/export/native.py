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


def collect_tensors(model: nn.Module, storage: torch.dtype | None = None
                    ) -> tuple[dict[str, torch.Tensor], dict, dict[str, str]]:
    """Everything an export stores: (tensors, {module: {kind, config}}, {alias: tensor name}).
    storage: the dtype unquantized floating tensors are stored in (see storage_names); None keeps them as
    they are in memory. A tensor tied to a compressed module's weight (a tied lm_head) becomes an alias of it."""
    return _collect(model, storage)[:3]


def _collect(model: nn.Module, storage: torch.dtype | None) -> tuple[dict, dict, dict, list[str]]:
    """collect_tensors plus the names of the tensors cast to `storage`."""
    comp = compressed_modules(model)
    tensors: dict[str, torch.Tensor] = {}
    modules = {}
    seen: dict[int, str] = {}
    for name, m in comp.items():
        t, cfg = m.to_state()
        modules[name] = {"kind": type(m).__name__, "config": cfg}
        tensors.update({f"{name}.{k}": v.detach().cpu().contiguous() for k, v in t.items()})
        for k, v in m.named_parameters(recurse=False):
            seen.setdefault(id(v), f"{name}.{k}")
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
    cast = storage_names(tensors, comp, storage) if storage is not None else []
    for k in cast:
        tensors[k] = tensors[k].to(storage)
    return tensors, modules, aliases, cast


# ------------------------------------------------------------------------------------------ storage dtype
STORAGE_DTYPES = ("auto", "bfloat16", "float16", "float32")


def storage_dtype(model: nn.Module, requested: str = "auto") -> torch.dtype:
    """The dtype an export stores unquantized floating tensors in: `auto` = 16-bit, the model's own 16-bit
    dtype when it computes in one, else the source checkpoint's (config `dtype` float16), else bfloat16;
    float32 only when a recipe asks (`export: {dtype: float32}`)."""
    if requested not in STORAGE_DTYPES:
        raise UserError(f"export.dtype must be one of {', '.join(STORAGE_DTYPES)}, got {requested!r}")
    if requested != "auto":
        return getattr(torch, requested)
    own = next((p.dtype for p in model.parameters() if p.is_floating_point()), torch.float32)
    if own in (torch.bfloat16, torch.float16):
        return own
    src = getattr(getattr(model, "config", None), "dtype", None)
    return torch.float16 if str(src).replace("torch.", "") == "float16" else torch.bfloat16


def storage_names(tensors: dict[str, torch.Tensor], comp: dict[str, nn.Module], storage: torch.dtype) -> list[str]:
    """Names of the stored tensors cast to `storage`: floating tensors wider than it that are plain (outside
    compressed modules) or listed in a compressed module's `storage_keys` (its biases, SparseLinear values).
    Codes, scales and codec tensors keep their own dtype."""
    keys = {f"{n}.{k}" for n, m in comp.items() for k in getattr(m, "storage_keys", ())}
    out = []
    for k, v in tensors.items():
        if not v.is_floating_point() or v.element_size() <= storage.itemsize:
            continue
        if k in keys or not any(k.startswith(p + ".") for p in comp):
            out.append(k)
    return out


@torch.no_grad()
def to_storage(model: nn.Module, storage: torch.dtype) -> int:
    """Round, in place, every tensor the export will store in `storage` to a value that dtype holds exactly
    (the tensors keep the model's compute dtype). After it, the in-memory model computes exactly what a
    reload of its export computes; run_recipe calls it before evaluating. Idempotent; returns how many
    tensors changed."""
    if storage.itemsize >= 4:
        return 0
    comp = compressed_modules(model)
    params: dict[str, torch.Tensor] = {}
    for n, m in comp.items():
        for k in getattr(m, "storage_keys", ()):
            t = getattr(m, "weight" if k == "values" else k, None)
            if isinstance(t, torch.Tensor):
                params[f"{n}.{k}"] = t
    owned = {id(p) for m in comp.values() for p in m.parameters()} - {id(t) for t in params.values()}
    for k, v in model.state_dict(keep_vars=True).items():
        if not any(k.startswith(p + ".") for p in comp) and id(v) not in owned:    # (a tied lm_head: owned)
            params.setdefault(k, v)
    changed, done = 0, set()
    for k, t in params.items():
        if id(t) in done or not t.is_floating_point() or t.element_size() <= storage.itemsize:
            continue
        done.add(id(t))
        r = t.data.to(storage).to(t.dtype)
        if not torch.equal(r, t.data):
            t.data.copy_(r)
            changed += 1
    return changed


def _config_dict(model) -> dict:
    cfg = model.config.to_dict()
    cfg.pop("quantization_config", None)
    return cfg


def save(model: nn.Module, tokenizer, out: str | os.PathLike, recipe: dict | None = None,
         report: dict | None = None, calibration: dict | None = None, extra_files: dict[str, str] | None = None,
         dtype: str | torch.dtype = "auto") -> Path:
    """Write the native export folder atomically (exposed as `modelpress.export`). Returns its path.

    Unquantized floating tensors (embeddings that are not quantized, norms, biases, pruned layers' values)
    are stored in `dtype`: "auto" = 16-bit (see storage_dtype), "float32" on request. The model is first
    rounded in place to what is stored (to_storage), so the model you hold and `modelpress.load(out)` give
    identical logits; the manifest lists the tensors stored narrower than the model computes (`upcast`),
    which load widens back exactly. With a `report` holding a "size" section, its file_bytes (the bytes of
    model.safetensors) is filled in before report.json is written.

    >>> modelpress.export(model, tok, "out/smollm2-w4", recipe=recipe.to_dict())
    >>> model, tok = modelpress.load("out/smollm2-w4")        # identical logits
    """
    out = Path(out)
    if out.exists() and not (out / MANIFEST).exists() and any(out.iterdir()):
        raise UserError(f"output folder {out} exists and is not a modelpress export: choose a new --out")
    storage = dtype if isinstance(dtype, torch.dtype) else storage_dtype(model, dtype)
    to_storage(model, storage)
    with atomic_dir(out) as tmp:
        tensors, modules, aliases, cast = _collect(model, storage)
        atomic_save_file(tensors, tmp / WEIGHTS, metadata={"format": FORMAT})
        sha = {k: sha256_tensor(v) for k, v in tensors.items()}
        if report is not None and isinstance(report.get("size"), dict):
            report["size"]["file_bytes"] = (tmp / WEIGHTS).stat().st_size
            report["size"]["storage_dtype"] = str(storage).replace("torch.", "")
        write_folder_files(tmp, model, tokenizer, str(next(model.parameters()).dtype), modules, aliases, sha,
                           recipe, report, calibration, extra_files,
                           storage={"dtype": str(storage).replace("torch.", ""), "upcast": cast})
    return out


def write_folder_files(tmp: Path, model: nn.Module, tokenizer, dtype: str, modules: dict, aliases: dict,
                       tensor_sha256: dict, recipe: dict | None = None, report: dict | None = None,
                       calibration: dict | None = None, extra_files: dict[str, str] | None = None,
                       storage: dict | None = None) -> None:
    """Everything of an export folder beside model.safetensors, checksums.json last.
    storage: {"dtype": the storage dtype, "upcast": tensors stored narrower than `dtype`, widened on load}."""
    manifest = {"format": FORMAT, "dtype": dtype, "model_type": model.config.model_type,
                "modules": modules, "aliases": aliases, "tensor_sha256": tensor_sha256}
    if storage is not None:
        manifest["storage"] = storage
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


def update_report(folder: str | os.PathLike, report: dict) -> None:
    """Rewrite an export's report.json (after the other formats were written into it) and its checksums."""
    folder = Path(folder)
    plain = {k: v for k, v in report.items() if not k.startswith("_")}
    atomic_write_text(folder / "report.json", json.dumps(plain, indent=1, default=float))
    write_checksums(folder)


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
    for alias, src in aliases.items():         # a tensor tied to a rebuilt module's weight reads that weight
        tensors[alias] = tensors[src] if src in tensors else root.get_parameter(src)
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
    tensors = load_file(folder / WEIGHTS)
    for k in (manifest.get("storage") or {}).get("upcast", []):      # stored 16-bit, computed in `dtype`
        if k in tensors:
            tensors[k] = tensors[k].to(dtype)
    apply_state(model, tensors, manifest["modules"], manifest.get("aliases", {}), str(folder))
    tok = AutoTokenizer.from_pretrained(folder) if (folder / "tokenizer_config.json").exists() else None
    return model.eval(), tok
