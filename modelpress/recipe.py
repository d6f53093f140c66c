"""Recipes: a YAML file with a flat list of stages whose keys map 1:1 to the stage config fields,
plus calibration / evaluate / certify / export settings. STAGES is the only registry."""
from __future__ import annotations

import dataclasses
import os
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path

import yaml

from .errors import UserError, excerpt, read_text, yaml_load
from .stages.cluster import Cluster
from .stages.lossless import Lossless
from .stages.lowrank import LowRank
from .stages.prune import Prune
from .stages.quantize import Quantize
from .stages.quantize_embedding import QuantizeEmbedding
from .stages.safety_prune import SafetyPrune

STAGES: dict[str, type] = {
    "quantize": Quantize,
    "quantize_embedding": QuantizeEmbedding,
    "prune": Prune,
    "cluster": Cluster,
    "lowrank": LowRank,
    "lossless": Lossless,
    "safety_prune": SafetyPrune,
}

RECIPES_DIR = Path(__file__).parent / "recipes"
EXPORT_FORMATS = ("native", "compressed-tensors", "gguf")


@dataclass(frozen=True)
class Calibration:
    source: str = "wiki"          # wiki | path to .txt / .jsonl
    select: str = "random"        # see modelpress.calib.select.SELECTORS
    samples: int = 128
    seqlen: int = 512
    seed: int = 0
    field: str = "text"           # JSONL field
    protocol: str = "modelpress-eval/2"   # /2: windows start with the tokenizer's default BOS (if any) | /1: never

    def __post_init__(self):
        from .calib.protocol import check
        check(self.protocol, "calibration.protocol")
        from .calib.select import SELECTORS
        if self.select not in SELECTORS:
            raise UserError(f"calibration.select {excerpt(self.select)} is unknown: use one of {', '.join(sorted(SELECTORS))}")
        _positive_int("calibration.samples", self.samples, 1)
        _positive_int("calibration.seqlen", self.seqlen, 2)
        _positive_int("calibration.seed", self.seed, 0)
        if not isinstance(self.source, str) or not isinstance(self.field, str):
            raise UserError("calibration.source and calibration.field must be strings (a source name or a file path)")


def _positive_int(where: str, value, lo: int) -> None:
    if not isinstance(value, int) or isinstance(value, bool) or value < lo:
        raise UserError(f"{where} must be an integer >= {lo}, got {excerpt(value)}")


@dataclass(frozen=True)
class Evaluate:
    text: str = "wiki-eval"       # wiki-eval | novels-eval | path to .txt / .jsonl
    off_domain: str | None = "novels-eval"   # a second text, reported beside `text` (null: `text` only, as before)
    seqlen: int | None = None     # null = 512 on CPU, 2048 on GPU (modelpress.eval.default_seqlen)
    windows: int = 32
    batch_size: int = 2
    agreement: bool = True
    protocol: str = "modelpress-eval/2"   # /2: windows start with the tokenizer's default BOS (if any) | /1: never

    def __post_init__(self):
        from .calib.protocol import check
        check(self.protocol, "evaluate.protocol")
        if self.seqlen is not None:
            _positive_int("evaluate.seqlen", self.seqlen, 2)
        _positive_int("evaluate.windows", self.windows, 1)
        _positive_int("evaluate.batch_size", self.batch_size, 1)
        if not isinstance(self.text, str):
            raise UserError(f"evaluate.text must be wiki-eval or a .txt/.jsonl path, got {excerpt(self.text)}")


@dataclass(frozen=True)
class Export:
    path: str | None = None
    formats: tuple[str, ...] = ("native",)    # native | compressed-tensors (into <path>/compressed-tensors) | gguf (<path>/model.gguf)
    dtype: str = "auto"                       # unquantized floating tensors: auto (16-bit: bf16 or the source's fp16) | bfloat16 | float16 | float32

    def __post_init__(self):
        bad = [f for f in self.formats if f not in EXPORT_FORMATS]
        if bad:
            raise UserError(f"export.formats: unknown format {bad[0]!r}; use {', '.join(EXPORT_FORMATS)}")
        if self.dtype not in ("auto", "bfloat16", "float16", "float32"):
            raise UserError(f"export.dtype must be auto, bfloat16, float16 or float32, got {self.dtype!r}")


@dataclass(frozen=True)
class Recipe:
    """Ordered compression stages plus calibration / evaluate / certify / export settings.

    >>> recipe = modelpress.Recipe.from_yaml("w4a16-gptq-g128")           # shipped name or a YAML path
    >>> recipe = modelpress.Recipe.from_dict({"stages": [{"quantize": {"bits": 4, "group_size": 32}}]})
    >>> recipe = modelpress.Recipe(stages=(("quantize", modelpress.Quantize(bits=4, group_size=32)),))
    >>> print(recipe.to_yaml())
    """
    stages: tuple = ()                              # ((name, config), ...)
    model: str | None = None
    dtype: str = "float32"                          # float32 | bfloat16 | float16: the working/export dtype
    order: str = "as-written"                       # as-written | auto (weaker first) | measured (best of all)
    calibration: Calibration = field(default_factory=Calibration)
    evaluate: Evaluate = field(default_factory=Evaluate)
    certify: dict | None = None
    export: Export = field(default_factory=Export)

    def __post_init__(self):
        if self.dtype not in ("float32", "bfloat16", "float16"):
            raise UserError(f"recipe dtype must be float32, bfloat16 or float16, got {excerpt(self.dtype)}")
        if self.order not in ("as-written", "auto", "measured"):
            raise UserError(f"recipe order must be 'as-written', 'auto' or 'measured', got {excerpt(self.order)}")
        if self.certify is not None:
            from .certify.certificate import RECIPE_KEYS
            if not isinstance(self.certify, dict):
                raise UserError("recipe certify must be a mapping, e.g. certify: {property: agreement, eps: 0.2, delta: 0.05}")
            bad = [k for k in self.certify if k not in RECIPE_KEYS]
            if bad:
                raise UserError(f"certify: unknown key {bad[0]!r}; allowed keys: {', '.join(RECIPE_KEYS)}")

    @classmethod
    def from_dict(cls, d: dict, where: str = "recipe") -> "Recipe":
        if not isinstance(d, dict):
            raise UserError(f"{where} must be a mapping with a `stages:` list")
        d = dict(d)
        raw = d.pop("stages", None)
        if not isinstance(raw, list) or not raw:
            raise UserError(f"{where} needs a non-empty `stages:` list, e.g. stages: [{{quantize: {{bits: 4}}}}]")
        stages = tuple(parse_stage(s, f"{where} stage {i + 1}") for i, s in enumerate(raw))
        sub = {"calibration": Calibration, "evaluate": Evaluate, "export": Export}
        kw = {k: build(sub[k], v or {}, k) if k in sub else v for k, v in d.items()}
        return build(cls, {**kw, "stages": stages}, where, nested=False)

    @classmethod
    def from_yaml(cls, path: str | os.PathLike) -> "Recipe":
        p = resolve(path)
        text = read_text(p, "recipe")
        try:
            data = yaml_load(text)
        except yaml.YAMLError as e:
            mark = getattr(e, "problem_mark", None)
            at = f" at line {mark.line + 1}" if mark else ""
            why = "uses a YAML alias (*name), which recipes do not allow" if "alias" in str(e) else "is not valid YAML"
            raise UserError(f"recipe {p} {why}{at}: fix the syntax") from None
        return cls.from_dict(data, str(p))

    def to_dict(self) -> dict:
        def plain(obj):
            if dataclasses.is_dataclass(obj):
                return {f.name: plain(getattr(obj, f.name)) for f in dataclasses.fields(obj)}
            if isinstance(obj, tuple):
                return [plain(x) for x in obj]
            return obj
        d = {k: plain(getattr(self, k)) for k in ("model", "dtype", "order", "calibration", "evaluate",
                                                   "certify", "export")}
        d["stages"] = [{name: plain(cfg)} for name, cfg in self.stages]
        return d

    @staticmethod
    def stage(name: str, **kw):
        """A stage config from the registry, e.g. Recipe.stage("quantize", method="rtn", bits=4): how code
        below the stages (planners, the engine) is handed the stages it runs."""
        return STAGES[name](**kw)

    @staticmethod
    def stage_dict(name: str, cfg) -> dict:
        """One stage's config as it appears in a recipe's `stages:` list."""
        return Recipe(stages=((name, cfg),)).to_dict()["stages"][0][name]

    def to_yaml(self) -> str:
        return yaml.safe_dump(self.to_dict(), sort_keys=False)

    @property
    def needs_calibration(self) -> bool:
        return self.order != "as-written" or any(
            getattr(cfg, "method", None) in ("gptq", "wanda", "sparsegpt") or getattr(cfg, "needs_calibration", False)
            for _, cfg in self.stages)


def resolve(path: str | os.PathLike) -> Path:
    """A recipe file path, or the name of a shipped recipe (modelpress/recipes/NAME.yaml)."""
    p = Path(path)
    if p.is_file():
        return p
    shipped = RECIPES_DIR / f"{path}.yaml"
    if shipped.is_file():
        return shipped
    names = sorted(q.stem for q in RECIPES_DIR.glob("*.yaml"))
    raise UserError(f"recipe {path} does not exist: pass a YAML file or a shipped recipe name ({', '.join(names)})")


def parse_stage(item, where: str) -> tuple[str, object]:
    if not isinstance(item, dict) or len(item) != 1:
        raise UserError(f"{where} must be a single-key mapping like `- quantize: {{bits: 4}}`, got {excerpt(item)}")
    (name, cfg), = item.items()
    if name not in STAGES:
        raise UserError(f"{where}: unknown stage {excerpt(name)}; known stages: {', '.join(sorted(STAGES))}")
    return name, build(STAGES[name], cfg or {}, name)


def _coerce(value, hint):
    """YAML lists -> tuples where the field is a tuple."""
    origin = typing.get_origin(hint)
    if isinstance(value, list) and (origin is tuple or hint is tuple or "tuple" in str(hint)):
        return tuple(value)
    if isinstance(value, str) and origin in (typing.Union, types.UnionType) and "tuple" in str(hint):
        return (value,)
    return value


def build(cls, d, where: str, nested: bool = True):
    """Instantiate config dataclass `cls` from mapping d; unknown keys are errors naming the allowed ones."""
    if not isinstance(d, dict):
        raise UserError(f"{where} must be a mapping of settings, got {excerpt(d)}")
    fields = {f.name: f for f in dataclasses.fields(cls)}
    unknown = [k for k in d if k not in fields]
    if unknown:
        raise UserError(f"{where}: unknown key {excerpt(unknown[0])}; allowed keys: {', '.join(fields)}")
    hints = typing.get_type_hints(cls)
    try:
        return cls(**{k: _coerce(v, hints.get(k)) for k, v in d.items()})
    except TypeError as e:
        raise UserError(f"{where}: {str(e)[:200]}") from None
