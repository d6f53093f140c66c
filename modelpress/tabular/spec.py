"""Feature specifications for data-free tabular distillation (TabKD, arXiv 2603.15481).

A spec is all TabKD knows about the input space: per feature a numeric range, an integer
range, or a list of categorical levels (the encoded values the teacher sees). It comes from
the user (YAML/JSON) or is inferred from a tree teacher's split thresholds; the benchmark
builds it from per-column min/max/levels of the training split (what a data owner would
write down), never from rows.

YAML format::

    features:
      - {name: balance, type: numeric, range: [0, 2700]}
      - {name: age, type: integer, range: [18, 90]}
      - {name: student, type: categorical, levels: [0, 1]}
"""
from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from modelpress.errors import UserError, read_text, yaml_load

KINDS = ("numeric", "integer", "categorical")


@dataclass(frozen=True)
class Feature:
    """One input column: `kind` in KINDS; numeric/integer use [low, high], categorical `levels`."""

    name: str
    kind: str
    low: float = 0.0
    high: float = 1.0
    levels: tuple[float, ...] = ()

    def __post_init__(self):
        where = f"spec feature '{self.name}'"
        if self.kind not in KINDS:
            raise UserError(f"{where}: type '{self.kind}' unknown; use one of {', '.join(KINDS)}")
        if self.kind == "categorical":
            if len(self.levels) < 1:
                raise UserError(f"{where}: categorical needs a non-empty 'levels' list")
            if len(set(self.levels)) != len(self.levels):
                raise UserError(f"{where}: 'levels' has duplicates; list each level once")
        else:
            if not (np.isfinite(self.low) and np.isfinite(self.high)) or self.low > self.high:
                raise UserError(f"{where}: range [{self.low}, {self.high}] is invalid; "
                                "give finite [low, high] with low <= high")
            if self.kind == "integer" and np.floor(self.high) < np.ceil(self.low):
                raise UserError(f"{where}: integer range [{self.low}, {self.high}] holds no integer")

    @property
    def lo(self) -> float:
        return float(min(self.levels)) if self.kind == "categorical" else float(self.low)

    @property
    def hi(self) -> float:
        return float(max(self.levels)) if self.kind == "categorical" else float(self.high)


@dataclass(frozen=True)
class FeatureSpec:
    """Ordered features (column order of the teacher's input matrix)."""

    features: tuple[Feature, ...]

    def __post_init__(self):
        if not self.features:
            raise UserError("spec: 'features' is empty; list at least one feature")
        names = [f.name for f in self.features]
        if len(set(names)) != len(names):
            raise UserError("spec: feature names repeat; give every feature a unique name")

    def __len__(self) -> int:
        return len(self.features)

    @property
    def names(self) -> list[str]:
        return [f.name for f in self.features]

    def bounds(self) -> tuple[np.ndarray, np.ndarray]:
        """(low, high) per feature, categorical ones spanning their levels.  # (d,), (d,)"""
        lo = np.array([f.lo for f in self.features], dtype=np.float64)
        hi = np.array([f.hi for f in self.features], dtype=np.float64)
        return lo, hi

    def to_dict(self) -> dict:
        out = []
        for f in self.features:
            if f.kind == "categorical":
                out.append({"name": f.name, "type": f.kind, "levels": [float(v) for v in f.levels]})
            else:
                out.append({"name": f.name, "type": f.kind, "range": [float(f.low), float(f.high)]})
        return {"features": out}


def spec_from_dict(data: object, source: str = "spec") -> FeatureSpec:
    """Parse the YAML/JSON structure documented in the module docstring."""
    if not isinstance(data, dict) or not isinstance(data.get("features"), list):
        raise UserError(f"{source}: expected a mapping with a 'features' list "
                        "(e.g. features: [{name: x, type: numeric, range: [0, 1]}])")
    feats = []
    for i, item in enumerate(data["features"]):
        if not isinstance(item, dict) or "name" not in item:
            raise UserError(f"{source}: features[{i}] must be a mapping with a 'name'")
        name = str(item["name"])
        kind = str(item.get("type", "numeric"))
        try:
            if kind == "categorical":
                levels = item.get("levels")
                if not isinstance(levels, list):
                    raise UserError(f"{source}: feature '{name}' is categorical but has no 'levels' list")
                feats.append(Feature(name, kind, levels=tuple(float(v) for v in levels)))
            else:
                rng = item.get("range")
                if not (isinstance(rng, list) and len(rng) == 2):
                    raise UserError(f"{source}: feature '{name}' needs 'range: [low, high]'")
                feats.append(Feature(name, kind, low=float(rng[0]), high=float(rng[1])))
        except (TypeError, ValueError) as e:
            if isinstance(e, UserError):
                raise
            raise UserError(f"{source}: feature '{name}' has a non-numeric range or level ({e})") from None
    return FeatureSpec(tuple(feats))


def load_spec(path: str | Path) -> FeatureSpec:
    """Read a spec file (.yaml/.yml/.json)."""
    path = Path(path)
    if not path.is_file():
        raise UserError(f"spec file {path} not found; pass an existing YAML/JSON file to --spec")
    text = read_text(path, "spec file")
    try:
        if path.suffix.lower() == ".json":
            data = json.loads(text)
        else:
            data = yaml_load(text)
    except Exception as e:  # parse errors of either format
        raise UserError(f"spec file {path}: cannot parse ({type(e).__name__}); fix the syntax") from None
    return spec_from_dict(data, str(path))


def spec_from_columns(X: np.ndarray, names: list[str] | None = None,
                      categorical: dict[int, list[float]] | None = None,
                      max_integer_levels: int = 0) -> FeatureSpec:
    """Describe columns by min/max (numeric), integer range, or level list only.

    This is the column summary a data owner hands over; no row survives in the spec.
    Columns whose values are all integers get kind 'integer'. `categorical` maps a column
    index to its levels; columns with <= `max_integer_levels` distinct integer values are
    also treated as categorical.
    """
    X = np.asarray(X, dtype=np.float64)  # (n, d)
    names = names or [f"x{j}" for j in range(X.shape[1])]
    categorical = categorical or {}
    feats = []
    for j in range(X.shape[1]):
        col = X[:, j]
        if j in categorical:
            feats.append(Feature(names[j], "categorical", levels=tuple(float(v) for v in categorical[j])))
            continue
        is_int = bool(np.all(col == np.round(col)))
        uniq = np.unique(col)
        if is_int and len(uniq) <= max_integer_levels:
            feats.append(Feature(names[j], "categorical", levels=tuple(float(v) for v in uniq)))
        else:
            feats.append(Feature(names[j], "integer" if is_int else "numeric",
                                 low=float(col.min()), high=float(col.max())))
    return FeatureSpec(tuple(feats))


def spec_from_thresholds(thresholds: list[np.ndarray], margin: float = 0.5) -> FeatureSpec:
    """Infer numeric ranges from a tree teacher's split thresholds when no spec is given.

    Range per feature = [t_min - margin * w, t_max + margin * w] with w = t_max - t_min
    (or 1 when the feature has one threshold); a feature never split on gets [0, 1]
    (the teacher ignores it, so any range gives the same labels).
    """
    feats = []
    for j, t in enumerate(thresholds):
        if len(t) == 0:
            feats.append(Feature(f"x{j}", "numeric", 0.0, 1.0))
            continue
        w = float(t.max() - t.min()) or 1.0
        feats.append(Feature(f"x{j}", "numeric", float(t.min() - margin * w), float(t.max() + margin * w)))
    return FeatureSpec(tuple(feats))


def uniform_queries(spec: FeatureSpec, n: int, rng: np.random.Generator) -> np.ndarray:
    """Uniform in the spec box (integers uniform, levels uniform).  -> (n, d)"""
    d = len(spec)
    X = np.empty((n, d), dtype=np.float64)
    U = rng.random((n, d))
    for j, f in enumerate(spec.features):
        if f.kind == "categorical":
            lv = np.asarray(f.levels, dtype=np.float64)
            X[:, j] = lv[np.minimum((U[:, j] * len(lv)).astype(np.int64), len(lv) - 1)]
        elif f.kind == "integer":
            a, b = np.ceil(f.low), np.floor(f.high)
            X[:, j] = a + np.minimum(np.floor(U[:, j] * (b - a + 1)), b - a)
        else:
            X[:, j] = f.low + U[:, j] * (f.high - f.low)
    return X
