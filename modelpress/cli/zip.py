"""`modelpress zip MODEL --out DIR` and `modelpress unzip DIR --out DIR`: lossless compression of a
whole model's BF16/FP16 Linear and Embedding weights (stage `lossless`, TCA-TBE of ZipServ,
arXiv 2603.17435) into a native modelpress export, and back to a plain Hugging Face folder whose
weights are bit-identical to the original."""
from __future__ import annotations

import argparse
from pathlib import Path
from typing import TYPE_CHECKING

from ..errors import UserError
from ..io import atomic_dir

if TYPE_CHECKING:
    from torch import nn


def add_parser(subparsers) -> tuple[str, ...]:
    z = subparsers.add_parser("zip", help="losslessly compress a model's bf16/fp16 weights (~30%% smaller)",
                              description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    z.add_argument("model", help="HF folder, hub id, .gguf file, or 'smollm2'")
    z.add_argument("--out", required=True, help="output folder (native modelpress export)")
    z.add_argument("--codec", choices=("tca-tbe", "huffman"), default="tca-tbe")
    z.add_argument("--cast", choices=("bf16",), default=None,
                   help="round fp32 weights to bf16 first (lossy); without it fp32 models are refused")
    z.add_argument("--include", nargs="*", default=[], help="regexes of module names to compress (default all)")
    z.add_argument("--exclude", nargs="*", default=[], help="regexes of module names to leave as they are")
    z.set_defaults(zip_command="zip", func=run)
    u = subparsers.add_parser("unzip", help="turn a zipped export back into a plain HF folder (bit-identical)")
    u.add_argument("src", help="folder written by `modelpress zip`")
    u.add_argument("--out", required=True, help="output plain Hugging Face folder")
    u.set_defaults(zip_command="unzip", func=run)
    return ("zip", "unzip")


def run(args) -> int:
    if args.zip_command == "zip":
        return _zip(args)
    return _unzip(args)


def _registered() -> None:
    from ..modules import MODULE_TYPES
    from ..modules.zip import ZipEmbedding, ZipLinear
    if MODULE_TYPES.get("ZipLinear") is not ZipLinear or MODULE_TYPES.get("ZipEmbedding") is not ZipEmbedding:
        raise RuntimeError("ZipLinear/ZipEmbedding are not registered in modelpress.modules.MODULE_TYPES: "
                           "the export would lose their weights")


def _zip(args) -> int:
    from ..export import save
    from ..export import load_model as load
    from ..stages.lossless import Lossless
    _registered()
    stage = Lossless(codec=args.codec, include=tuple(args.include), exclude=tuple(args.exclude), cast=args.cast)
    model, tok = load(args.model, dtype="auto")
    stats = stage.apply(model, None)
    recipe = {"stages": [{"lossless": {"codec": stage.codec, "include": list(stage.include),
                                       "exclude": list(stage.exclude), "cast": stage.cast}}]}
    save(model, tok, args.out, recipe=recipe, report={"source": str(args.model), "lossless": stats})
    print(stats["summary"])
    print(f"wrote {args.out}")
    return 0


def unzip_model(model: nn.Module) -> int:
    """Replace every ZipLinear/ZipEmbedding by the plain module with the decoded weight, keeping ties.
    Returns the number of modules replaced."""
    from torch import nn
    from ..model import set_module
    from ..modules.zip import _ZipWeight, retie, unzip_module
    retie(model)
    zips = {n: m for n, m in model.named_modules() if isinstance(m, _ZipWeight)}
    plain: dict[str, nn.Module] = {}
    for n, m in zips.items():                      # holders first, then tied aliases
        if m.meta.get("tied_to") is None:
            plain[n] = unzip_module(m)
    for n, m in zips.items():
        if m.meta.get("tied_to") is not None:
            src = plain[m.meta["tied_to"]]
            lin = nn.Linear(m.in_features, m.out_features, bias=m.bias is not None, device="meta")
            lin.weight = src.weight                  # the tie: one Parameter
            if m.bias is not None:
                lin.bias = nn.Parameter(m.bias.detach().clone(), requires_grad=False)
            plain[n] = lin
    for n, p in plain.items():
        set_module(model, n, p)
    return len(plain)


def _unzip(args) -> int:
    from ..export import load_model as load
    src = Path(args.src)
    if not (src / "modelpress.json").exists():
        raise UserError(f"{src} is not a modelpress export (no modelpress.json): pass a folder written by `modelpress zip`")
    model, tok = load(src)
    n = unzip_model(model)
    out = Path(args.out)
    if out.exists() and any(out.iterdir()):
        raise UserError(f"output folder {out} exists and is not empty: choose a new --out")
    with atomic_dir(out) as tmp:
        model.save_pretrained(tmp)
        if tok is not None:
            tok.save_pretrained(tmp)
    print(f"unzipped {n} modules into {out}")
    return 0
