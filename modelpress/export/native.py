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
    own = next((p.dtype for p in model.parameters() if p.is_floating_point()), torch.float32)
    return storage_dtype_of(own, getattr(getattr(model, "config", None), "dtype", None), requested)


def storage_dtype_of(compute: torch.dtype, source=None, requested: str = "auto") -> torch.dtype:
    """storage_dtype from the model's compute dtype and its config's `dtype` (the source checkpoint's)."""
    if requested not in STORAGE_DTYPES:
        raise UserError(f"export.dtype must be one of {', '.join(STORAGE_DTYPES)}, got {requested!r}")
    if requested != "auto":
        return getattr(torch, requested)
    if compute in (torch.bfloat16, torch.float16):
        return compute
    return torch.float16 if str(source).replace("torch.", "") == "float16" else torch.bfloat16


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


# ---------------------------------------------------------------------------- verification on load
# Everything read from an export folder is untrusted: names stay inside the folder and name regular
# files, JSON is parsed into one-line errors, dtypes come from an allow-list, every tensor is checked
# against its sha256 and shape in the manifest, and every module's config against its tensors.

DTYPES: dict[str, torch.dtype] = {"float32": torch.float32, "float16": torch.float16,
                                  "bfloat16": torch.bfloat16, "float64": torch.float64}
REQUIRED = (MANIFEST, WEIGHTS, "config.json")
MAX_JSON_BYTES = 64 << 20


def parse_dtype(value, where: str) -> torch.dtype:
    """'float32' / 'torch.float32' -> torch.float32, only from DTYPES (never getattr(torch, ...))."""
    name = value.removeprefix("torch.") if isinstance(value, str) else None
    if name not in DTYPES:
        raise UserError(f"{where}: dtype {str(value)[:40]!r} is not one of {', '.join(DTYPES)}: the export is "
                        "corrupted or was not written by modelpress; re-export it")
    return DTYPES[name]


def member(folder: Path, name, where: str) -> Path:
    """folder/name after checking that `name` is a relative path that stays inside `folder` and names a
    regular file (no '..', no absolute path, no symlink, no device or fifo)."""
    import stat
    if not isinstance(name, str) or not name or "\\" in name or "\0" in name:
        raise UserError(f"{where} names an invalid file {str(name)[:60]!r}: the export is corrupted; re-export it")
    rel = Path(name)
    if rel.is_absolute() or any(part in ("..", "") for part in name.split("/")):
        raise UserError(f"{where} names {name[:60]!r}, which is outside the export folder: refusing to read it")
    f = folder / rel
    try:
        st = os.lstat(f)
    except FileNotFoundError:
        raise UserError(f"{f} is missing from the export: re-export the model") from None
    except OSError as e:
        raise UserError(f"{f} cannot be read ({e.strerror}): check the export folder") from None
    if not stat.S_ISREG(st.st_mode):
        raise UserError(f"{f} is not a regular file (a symlink, device or folder): refusing to read it; re-export the model")
    if not str(f.resolve()).startswith(str(folder.resolve()) + os.sep):
        raise UserError(f"{where} names {name[:60]!r}, which is outside the export folder: refusing to read it")
    return f


def read_json(path: Path, what: str = "file"):
    """Parse a JSON file of the export; any fault is a one-line UserError."""
    try:
        if path.stat().st_size > MAX_JSON_BYTES:
            raise UserError(f"{path} is {path.stat().st_size} bytes, too large for an export {what}: it is corrupted")
        return json.loads(path.read_bytes().decode("utf-8"))
    except UserError:
        raise
    except FileNotFoundError:
        raise UserError(f"{path} is missing: the export is incomplete; re-export the model") from None
    except UnicodeDecodeError:
        raise UserError(f"{path} is not UTF-8 text: the export is corrupted; re-export the model") from None
    except json.JSONDecodeError as e:
        raise UserError(f"{path} is not valid JSON (line {e.lineno}, column {e.colno}): the export is corrupted; "
                        "re-export the model") from None
    except OSError as e:
        raise UserError(f"{path} cannot be read ({e.strerror}): check the export folder") from None


def verify(folder: str | os.PathLike) -> dict[str, str]:
    """Check every file named in checksums.json (inside the folder, regular files only) against its
    sha256; the manifest, weights and config must be covered. Returns {name: sha256}; raises UserError
    naming the first corrupted file."""
    folder = Path(folder)
    path = folder / "checksums.json"
    if not path.exists():
        raise UserError(f"{folder} has no checksums.json: it is not a complete modelpress export; re-export it")
    sums = read_json(member(folder, "checksums.json", str(folder)), "checksum list")
    if not isinstance(sums, dict) or not all(isinstance(v, str) and len(v) == 64 for v in sums.values()):
        raise UserError(f"{path} must map file names to sha256 hex digests: the export is corrupted; re-export it")
    uncovered = [n for n in REQUIRED if n not in sums]
    if uncovered:
        raise UserError(f"{path} does not cover {uncovered[0]}: the export is incomplete or was edited; re-export it")
    for name, digest in sums.items():
        f = member(folder, name, str(path))
        if sha256_file(f) != digest.lower():
            raise UserError(f"{f} is corrupted (sha256 mismatch with checksums.json): re-export the model")
    return sums


def read_manifest(folder: Path) -> dict:
    man = read_json(member(folder, MANIFEST, str(folder)), "manifest")
    if not isinstance(man, dict):
        raise UserError(f"{folder / MANIFEST} is not a JSON object: the export is corrupted; re-export it")
    if man.get("format") != FORMAT:
        raise UserError(f"{folder} has export format {str(man.get('format'))[:40]!r}; this modelpress reads {FORMAT}")
    for key, kind in (("modules", dict), ("aliases", dict), ("tensor_sha256", dict)):
        if not isinstance(man.get(key, {}), kind):
            raise UserError(f"{folder / MANIFEST}: {key!r} must be a JSON object: the export is corrupted; re-export it")
    parse_dtype(man.get("dtype"), str(folder / MANIFEST))
    return man


def check_tensors(tensors: dict[str, torch.Tensor], recorded: dict, where: str) -> None:
    """Every tensor equals its sha256 (dtype, shape and bytes) in the manifest, and the sets agree."""
    if set(tensors) != set(recorded):
        extra = sorted(set(tensors) - set(recorded))
        missing = sorted(set(recorded) - set(tensors))
        raise UserError(f"{where}: tensors {(extra or missing)[:2]} are {'not recorded in' if extra else 'missing from'} "
                        "the manifest: the export was edited; re-export it")
    for k, v in tensors.items():
        if sha256_tensor(v) != recorded[k]:
            raise UserError(f"{where}: tensor {k[:120]} does not match its sha256 in {MANIFEST} (tampered or "
                            "corrupted): re-export the model")


def _int(cfg: dict, key: str, where: str, lo: int = 1, hi: int = 1 << 31) -> int:
    v = cfg.get(key)
    if not isinstance(v, int) or isinstance(v, bool) or not lo <= v <= hi:
        raise UserError(f"{where}: config {key}={str(v)[:30]} is not an integer in [{lo}, {hi}]: the export is "
                        "corrupted; re-export it")
    return v


def check_module_state(name: str, kind: str, t: dict[str, torch.Tensor], cfg, where: str) -> None:
    """A compressed module's config fits its tensors: shapes, scale groups vs group size, packed code width
    vs bits, mask size, codebook size. Raises UserError naming the module and the mismatch."""
    import math
    w = f"{where}: module {name[:80]} ({kind})"
    if not isinstance(cfg, dict):
        raise UserError(f"{w}: config is not a JSON object: the export is corrupted; re-export it")
    if "dtype" in cfg:
        parse_dtype(cfg["dtype"], w)

    def shape(key, want):
        got = tuple(t[key].shape) if key in t else None
        if got != tuple(want):
            raise UserError(f"{w}: tensor {key} has shape {got}, but its config implies {tuple(want)}: the export "
                            "is inconsistent (edited?); re-export it")

    def packed(n, bits):
        return (math.ceil(n * bits / 8),)

    if kind in ("ZipLinear", "ZipEmbedding"):
        return                                     # checked by the module itself (CRC32 of the coded streams)
    rows, cols = _int(cfg, "out", w), _int(cfg, "in", w)
    if "bias" in t:
        shape("bias", (rows,))
    n_keep = rows * cols
    if "keep" in t:
        shape("keep", packed(rows * cols, 1))
        from ..modules import unpack_mask
        n_keep = int(unpack_mask(t["keep"], (rows, cols)).sum())
    if kind == "QuantLinear":
        bits = _int(cfg, "bits", w, 1, 8)
        gs = cfg.get("group_size")
        if gs is not None:
            gs = _int(cfg, "group_size", w)
        if not isinstance(cfg.get("sym"), bool):
            raise UserError(f"{w}: config sym must be true or false: the export is corrupted; re-export it")
        groups = -(-cols // gs) if gs else 1
        fmt = cfg.get("format")
        if fmt is not None:                        # a k-quant grid: fp16 d (dmin) per 256 weights, sc (m) per sub-block
            from ..algos import kquant
            if fmt not in kquant.FORMATS or gs != kquant.FORMATS[fmt].sub or not kquant.fits(cols):
                raise UserError(f"{w}: config format {str(fmt)[:20]} with group_size {gs} and {cols} inputs is not a "
                                "k-quant layout modelpress writes: the export is corrupted; re-export it")
            sup, sub = cols // kquant.SUPER, cols // gs
            shape("kd", (rows, sup))
            shape("ksc", (rows, sub))
            if not cfg["sym"]:
                shape("kdmin", (rows, sup))
                shape("km", (rows, sub))
            shape("qweight", packed(rows * cols, bits))
            return
        shape("scales", (rows, groups))
        if "bits_map" in t:                        # mixed widths: one packed stream per width
            from ..modules.quant import check_bits_map, element_bits, group_bits, mixed_bytes, unpack_mask
            check_bits_map(t["bits_map"], rows, cols, gs, w)
            eb = element_bits(t["bits_map"], rows, cols)
            shape("qweight", (mixed_bytes(eb if "keep" not in t else eb[unpack_mask(t["keep"], (rows, cols))]),))
            if not cfg["sym"]:
                shape("zeros", (mixed_bytes(group_bits(t["bits_map"], rows, cols, gs)),))
        else:
            shape("qweight", packed(n_keep, bits))
            if not cfg["sym"]:
                shape("zeros", packed(rows * groups, bits))
    elif kind == "SparseLinear":
        if "keep" not in t:
            raise UserError(f"{w}: tensor keep (the mask) is missing: the export is incomplete; re-export it")
        shape("values", (n_keep,))
    elif kind == "ClusteredLinear":
        k = _int(cfg, "k", w, 1, 256)
        gr = cfg.get("group_rows")
        if gr is not None:
            gr = _int(cfg, "group_rows", w)
        from ..modules.cluster import index_bits
        shape("codebook", (rows // (gr or rows), k))
        shape("indices", packed(rows * cols, index_bits(k)))
    elif kind == "LowRankLinear":
        r = _int(cfg, "rank", w)
        shape("A", (rows, r))
        shape("B", (r, cols))


def provenance(folder: str | os.PathLike) -> dict[str, str | None]:
    """The export's hash chain, each link a sha256: recipe (recipe.yaml, equal to a certificate's recipe
    hash), calibration (the calibration token windows, from calibration.json), tensors (the manifest's
    per-tensor hashes, each checked on load), weights (model.safetensors), manifest (modelpress.json) and
    export (checksums.json, which covers every file above). Call after verify()."""
    import hashlib
    folder = Path(folder)
    man = read_manifest(folder)
    calib = read_json(member(folder, "calibration.json", str(folder))) if (folder / "calibration.json").exists() else {}
    recipe = folder / "recipe.yaml"
    tensors = hashlib.sha256(json.dumps(man.get("tensor_sha256", {}), sort_keys=True).encode()).hexdigest()
    return {"recipe": sha256_file(member(folder, "recipe.yaml", str(folder))) if recipe.exists() else None,
            "calibration": calib.get("sha256") if isinstance(calib, dict) else None,
            "tensors": tensors,
            "weights": sha256_file(member(folder, WEIGHTS, str(folder))),
            "manifest": sha256_file(member(folder, MANIFEST, str(folder))),
            "export": sha256_file(member(folder, "checksums.json", str(folder)))}


def apply_state(root: nn.Module, tensors: dict[str, torch.Tensor], modules: dict, aliases: dict,
                where: str = "checkpoint", missing_ok: str | None = None) -> None:
    """Rebuild compressed modules inside `root` from their stored state and assign every plain tensor
    (the inverse of collect_tensors on the same module tree). missing_ok: a name prefix whose tensors may be
    absent (the decoder layers, when only the rest of a model is applied)."""
    from ..modules import MODULE_TYPES
    tensors = dict(tensors)
    for name, spec in modules.items():
        kind = spec.get("kind") if isinstance(spec, dict) else None
        if kind not in MODULE_TYPES:
            raise UserError(f"{where} uses module kind {str(kind)[:40]!r} unknown to this modelpress: upgrade modelpress")
        pre = name + "."
        sub = {k[len(pre):]: tensors.pop(k) for k in [k for k in tensors if k.startswith(pre)]}
        check_module_state(name, kind, sub, spec.get("config"), where)
        try:
            set_module(root, name, MODULE_TYPES[kind].from_state(sub, spec["config"]))
        except UserError:
            raise
        except (KeyError, ValueError, TypeError, RuntimeError, IndexError, AttributeError) as e:
            raise UserError(f"{where}: module {name[:80]} ({kind}) cannot be rebuilt from its stored state "
                            f"({type(e).__name__}: {str(e)[:120]}): the export is inconsistent; re-export it") from None
    for alias, src in aliases.items():         # a tensor tied to a rebuilt module's weight reads that weight
        if src in tensors:
            tensors[alias] = tensors[src]
            continue
        try:
            tensors[alias] = root.get_parameter(src)
        except AttributeError:
            raise UserError(f"{where}: alias {str(alias)[:80]} points to {str(src)[:80]}, which is not stored: "
                            "re-export the model") from None
    try:
        missing, unexpected = root.load_state_dict(tensors, strict=False, assign=True)
    except RuntimeError as e:                       # e.g. a tensor whose shape does not fit the config
        first = (str(e).strip().splitlines() or [""])[-1].strip()[:160]
        raise UserError(f"{where} does not fit the model config ({first}): re-export the model") from None
    comp = tuple(n + "." for n in modules) + ((missing_ok,) if missing_ok else ())
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


def export_skeleton(folder: str | os.PathLike, check: bool = True) -> tuple[nn.Module, dict, torch.dtype]:
    """(the export's model on the meta device, its manifest, its compute dtype), the files' checksums verified
    first when `check`."""
    from accelerate import init_empty_weights
    from transformers import AutoModelForCausalLM

    folder = Path(folder)
    if check:
        verify(folder)
    manifest = read_manifest(folder)
    dtype = parse_dtype(manifest["dtype"], str(folder / MANIFEST))
    config = _config(folder)
    with init_empty_weights():
        try:
            model = AutoModelForCausalLM.from_config(config, dtype=dtype)
        except Exception as e:                  # e.g. hidden size not a multiple of the heads
            raise UserError(f"{folder / 'config.json'}: its values do not fit together ({type(e).__name__}: "
                            f"{str(e)[:120]}): re-export the model") from None
    normalize(model)
    return model.eval(), manifest, dtype


def load_compressed(folder: str | os.PathLike, check: bool = True):
    """Rebuild (model, tokenizer) from a native export; logits equal the in-memory compressed model's."""
    from transformers import AutoTokenizer

    folder = Path(folder)
    model, manifest, dtype = export_skeleton(folder, check)
    tensors = read_safetensors(member(folder, WEIGHTS, str(folder)))
    if check:
        check_tensors(tensors, manifest.get("tensor_sha256", {}), str(folder / WEIGHTS))
    for k in (manifest.get("storage") or {}).get("upcast", []):      # stored 16-bit, computed in `dtype`
        if k in tensors:
            tensors[k] = tensors[k].to(dtype)
    apply_state(model, tensors, manifest["modules"], manifest.get("aliases", {}), str(folder))
    try:
        tok = AutoTokenizer.from_pretrained(folder) if (folder / "tokenizer_config.json").exists() else None
    except Exception as e:                      # corrupted tokenizer files: one line, never a traceback
        raise UserError(f"{folder}: the tokenizer files cannot be read ({type(e).__name__}: {str(e)[:120]}): "
                        "re-export the model") from None
    return model.eval(), tok


def _config(folder: Path):
    from transformers import AutoConfig
    read_json(member(folder, "config.json", str(folder)), "model config")     # one-line errors for bad JSON
    try:
        return AutoConfig.from_pretrained(folder)
    except Exception as e:
        raise UserError(f"{folder / 'config.json'} is not a usable model config ({type(e).__name__}: "
                        f"{str(e)[:120]}): re-export the model") from None


def read_safetensors(path: Path) -> dict[str, torch.Tensor]:
    """safetensors.load_file with truncated / header-corrupted files as one-line errors."""
    try:
        return load_file(path)
    except Exception as e:                       # SafetensorError, OSError, ValueError from the parser
        first = (str(e).strip().splitlines() or [type(e).__name__])[0][:160]
        raise UserError(f"{path} is not a readable safetensors file ({first}): it is truncated or corrupted; "
                        "re-export the model") from None
