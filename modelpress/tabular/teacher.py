"""Teacher access for data-free tabular distillation (TabKD, arXiv 2603.15481).

`Teacher` wraps anything with `predict_proba` / `predict` (scikit-learn, XGBoost, LightGBM)
or a torch module (logits or probabilities) behind one call, `proba(X) -> (n, C)`, and counts
every row it is asked about so query budgets are exact. `split_thresholds` reads the split
thresholds of tree teachers (scikit-learn trees/forests/GBMs/HistGB, XGBoost, LightGBM).
Loading a pickle runs code from the file: only load teachers you trust.
"""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import torch

from modelpress.errors import UserError


class Teacher:
    """Uniform soft-output access to a classifier; `n_queries` counts rows asked so far."""

    def __init__(self, model: object, n_classes: int | None = None, torch_outputs: str = "logits"):
        if torch_outputs not in ("logits", "probs"):
            raise UserError(f"teacher.torch_outputs '{torch_outputs}' unknown; use 'logits' or 'probs'")
        self.model = model
        self.torch_outputs = torch_outputs
        self.n_queries = 0
        self.is_torch = isinstance(model, torch.nn.Module)
        self.has_proba = hasattr(model, "predict_proba")
        if not (self.is_torch or self.has_proba or hasattr(model, "predict")):
            raise UserError(f"teacher of type {type(model).__name__} has no predict_proba/predict "
                            "and is not a torch module; pass a fitted classifier")
        classes = getattr(model, "classes_", None)
        self.classes = None if classes is None else np.asarray(classes)
        self.n_classes = n_classes or (None if self.classes is None else len(self.classes))
        if self.n_classes is None and not self.is_torch:
            raise UserError(f"teacher of type {type(model).__name__} exposes no classes_; "
                            "pass n_classes explicitly")

    def proba(self, X: np.ndarray) -> np.ndarray:
        """Teacher soft outputs p_T(x).  X (n, d) -> (n, C), rows sum to 1."""
        X = np.asarray(X, dtype=np.float64)
        self.n_queries += len(X)
        if len(X) == 0:
            return np.zeros((0, self.n_classes or 1))
        if self.is_torch:
            with torch.no_grad():
                out = self.model(torch.as_tensor(X, dtype=torch.float32)).double()
            p = torch.softmax(out, -1) if self.torch_outputs == "logits" else out
            p = p.numpy()
            self.n_classes = p.shape[1]
        elif self.has_proba:
            p = np.asarray(self.model.predict_proba(X), dtype=np.float64)
            if p.ndim == 1:  # some wrappers return P(class 1) only
                p = np.stack([1 - p, p], 1)
        else:
            pred = np.asarray(self.model.predict(X))
            idx = np.searchsorted(self.classes, pred)
            p = np.eye(self.n_classes)[idx]
        return p / np.clip(p.sum(1, keepdims=True), 1e-12, None)


def load_teacher(path: str | Path) -> object:
    """Load a pickled/joblib classifier (.pkl/.joblib) or a whole torch module (.pt/.pth)."""
    path = Path(path)
    if not path.is_file():
        raise UserError(f"teacher file {path} not found; pass a fitted model saved with pickle/joblib")
    try:
        if path.suffix.lower() in (".pt", ".pth"):
            return torch.load(path, map_location="cpu", weights_only=False)
        import joblib
        return joblib.load(path)
    except Exception as e:
        raise UserError(f"teacher file {path}: cannot load ({type(e).__name__}: {e}); "
                        "save it with joblib.dump / pickle.dump (or torch.save for modules)") from None


def _walk_sklearn(model: object, out: list[list[float]]) -> bool:
    """Collect thresholds of sklearn trees (recursively through ensembles). True if any tree."""
    found = False
    if hasattr(model, "tree_") and hasattr(model.tree_, "threshold"):
        t = model.tree_
        split = t.feature >= 0  # leaves have feature -2
        for f, thr in zip(t.feature[split], t.threshold[split]):
            out[int(f)].append(float(thr))
        return True
    if hasattr(model, "_predictors"):  # HistGradientBoosting*
        for per_iter in model._predictors:
            for pred in per_iter:
                nodes = pred.nodes[~pred.nodes["is_leaf"].astype(bool)]
                for f, thr in zip(nodes["feature_idx"], nodes["num_threshold"]):
                    out[int(f)].append(float(thr))
        return True
    ests = getattr(model, "estimators_", None)
    if ests is not None:
        for e in np.asarray(ests, dtype=object).ravel():
            found |= _walk_sklearn(e, out)
    return found


def _walk_json(node: dict, out: list[list[float]], fmap: dict[str, int], split_key: str,
               thr_key: str) -> None:
    stack = [node]
    while stack:
        n = stack.pop()
        if split_key in n:
            f = n[split_key]
            j = fmap.get(str(f), None) if not isinstance(f, int) else f
            thr = n.get(thr_key)
            if j is not None and isinstance(thr, (int, float)):
                out[j].append(float(thr))
            for k in ("children", "left_child", "right_child"):
                c = n.get(k)
                if isinstance(c, list):
                    stack.extend(c)
                elif isinstance(c, dict):
                    stack.append(c)


def split_thresholds(model: object, n_features: int) -> list[np.ndarray] | None:
    """Split thresholds per feature with multiplicity (sorted), or None for non-tree teachers.

    Multiplicity matters: a threshold used by many trees marks a boundary many trees agree on.
    """
    out: list[list[float]] = [[] for _ in range(n_features)]
    if _walk_sklearn(model, out):
        return [np.sort(np.asarray(v)) for v in out]
    if hasattr(model, "get_booster"):  # XGBoost sklearn API
        booster = model.get_booster()
        names = booster.feature_names or [f"f{j}" for j in range(n_features)]
        fmap = {n: j for j, n in enumerate(names)}
        fmap.update({f"f{j}": j for j in range(n_features)})
        for tree in booster.get_dump(dump_format="json"):
            _walk_json(json.loads(tree), out, fmap, "split", "split_condition")
        return [np.sort(np.asarray(v)) for v in out]
    if hasattr(model, "booster_"):  # LightGBM sklearn API
        dump = model.booster_.dump_model()
        for info in dump["tree_info"]:
            _walk_json(info["tree_structure"], out, {}, "split_feature", "threshold")
        return [np.sort(np.asarray(v)) for v in out]
    return None
