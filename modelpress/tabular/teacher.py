"""Teacher access for data-free tabular distillation (TabKD, arXiv 2603.15481).

`Teacher` wraps anything with `predict_proba` / `predict` (scikit-learn, XGBoost, LightGBM)
or a torch module (logits or probabilities) behind one call, `proba(X) -> (n, C)`, and counts
every row it is asked about so query budgets are exact. `split_thresholds` reads the split
thresholds of tree teachers (scikit-learn trees/forests/GBMs/HistGB, XGBoost, LightGBM, ONNX tree
ensembles).

`load_teacher` reads only formats that cannot run code by default: ONNX (scikit-learn via skl2onnx,
XGBoost/LightGBM via onnxmltools, torch via torch.onnx.export; run by onnxruntime when installed,
else by onnx's pure-Python reference evaluator), XGBoost JSON/UBJ, LightGBM text models and
modelpress tabular students (.safetensors). A pickle/joblib file or a whole pickled torch module
runs arbitrary code from the file while it loads, so it is read only with `trust_pickle=True`
(CLI `--trust-pickle`); a `.pt` file is otherwise read with `torch.load(weights_only=True)`.
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


PICKLE_SUFFIXES = (".pkl", ".pickle", ".joblib")
SAFE_FORMATS = ".onnx (scikit-learn via skl2onnx, XGBoost/LightGBM via onnxmltools, torch via torch.onnx.export), " \
               "XGBoost .json/.ubj (save_model), LightGBM .txt (save_model), a modelpress student .safetensors"
PICKLE_RISK = ("loading a pickle runs any code its author put in the file, with your permissions: pass "
               "--trust-pickle (API: trust_pickle=True) only for files you made or fully trust")


def load_teacher(path: str | Path, trust_pickle: bool = False) -> object:
    """Load a fitted classifier from a format that cannot run code: .onnx, XGBoost .json/.ubj, LightGBM
    .txt, a modelpress student .safetensors. Pickles (.pkl/.pickle/.joblib) and pickled torch modules
    (.pt/.pth) run code while loading: read only with trust_pickle=True."""
    path = Path(path)
    if not path.is_file():
        raise UserError(f"teacher file {path} not found; pass a fitted model saved as {SAFE_FORMATS}")
    suffix = path.suffix.lower()
    try:
        if suffix == ".onnx":
            return OnnxTeacher(path)
        if suffix == ".safetensors":
            from .student import load_student
            return load_student(path)
        if suffix in (".json", ".ubj"):
            return _xgboost(path)
        if suffix in (".txt", ".lgb"):
            return _lightgbm(path)
        if suffix in (".pt", ".pth"):
            return _torch(path, trust_pickle)
        if suffix in PICKLE_SUFFIXES:
            if not trust_pickle:
                raise UserError(f"teacher file {path} is a pickle: {PICKLE_RISK}; better, save the model as "
                                f"{SAFE_FORMATS}")
            import joblib
            return joblib.load(path)
    except UserError:
        raise
    except Exception as e:
        first = (str(e).strip().splitlines() or [type(e).__name__])[0][:200]
        raise UserError(f"teacher file {path}: cannot load ({type(e).__name__}: {first}); save it as "
                        f"{SAFE_FORMATS}") from None
    raise UserError(f"teacher file {path}: unknown format {suffix or '(no suffix)'}; save the model as "
                    f"{SAFE_FORMATS} (or a pickle .pkl/.joblib with --trust-pickle)")


def _torch(path: Path, trust_pickle: bool) -> object:
    if trust_pickle:
        return torch.load(path, map_location="cpu", weights_only=False)
    try:
        obj = torch.load(path, map_location="cpu", weights_only=True)
    except Exception:
        raise UserError(f"teacher file {path} holds pickled Python objects (a whole torch module?), which can run "
                        f"code when loaded: export the module with torch.onnx.export and pass the .onnx, or "
                        f"{PICKLE_RISK}") from None
    if not isinstance(obj, torch.nn.Module):
        raise UserError(f"teacher file {path} holds tensors only ({type(obj).__name__}), not a model: export "
                        "the module with torch.onnx.export and pass the .onnx")
    return obj


def _need(module: str, what: str):
    import importlib
    try:
        return importlib.import_module(module)
    except ImportError:
        raise UserError(f"{what} needs the '{module}' package: pip install {module}") from None


def _xgboost(path: Path) -> object:
    xgb = _need("xgboost", f"teacher file {path} (an XGBoost model)")
    model = xgb.XGBClassifier()
    model.load_model(str(path))
    return model


class _LightGBMTeacher:
    """A LightGBM Booster read from its text model file, with the sklearn-style surface Teacher uses."""

    def __init__(self, booster):
        self.booster_ = booster
        self.n_features_in_ = booster.num_feature()
        n = booster.num_model_per_iteration()
        self.classes_ = np.arange(max(2, n))

    def predict_proba(self, X: np.ndarray) -> np.ndarray:
        p = np.asarray(self.booster_.predict(X), dtype=np.float64)
        return np.stack([1 - p, p], 1) if p.ndim == 1 else p


def _lightgbm(path: Path) -> object:
    lgb = _need("lightgbm", f"teacher file {path} (a LightGBM model)")
    return _LightGBMTeacher(lgb.Booster(model_file=str(path)))


class OnnxTeacher:
    """An ONNX classifier: onnxruntime when installed, else onnx's reference evaluator (pure Python).
    Outputs: (label, probabilities) as written by skl2onnx/onnxmltools (a ZipMap is bypassed), or one
    float output, read as probabilities when its rows are non-negative and sum to 1, else as logits."""

    def __init__(self, path: Path):
        import onnx
        model = onnx.load(str(path))
        g = model.graph
        for node in [n for n in g.node if n.op_type == "ZipMap"]:      # list of dicts -> the plain tensor
            for o in g.output:
                if o.name == node.output[0]:
                    o.name = node.input[0]
            g.node.remove(node)
        self.onnx = model
        self.input = g.input[0].name
        dims = g.input[0].type.tensor_type.shape.dim
        if len(dims) == 2 and dims[1].dim_value > 0:
            self.n_features_in_ = int(dims[1].dim_value)
        labels = None
        for n in g.node:
            for a in n.attribute:
                if a.name == "classlabels_int64s" and a.ints:
                    labels = np.asarray(a.ints)
                elif a.name == "classlabels_strings" and a.strings:
                    labels = np.asarray([x.decode() for x in a.strings])
        self.outputs = [o.name for o in g.output]
        try:
            import onnxruntime
            sess = onnxruntime.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
            self._run = lambda X: sess.run(None, {self.input: X})
        except ImportError:
            from onnx.reference import ReferenceEvaluator
            ev = ReferenceEvaluator(model)
            self._run = lambda X: ev.run(None, {self.input: X})
        if labels is not None:
            self.classes_ = labels
        elif hasattr(self, "n_features_in_"):            # e.g. a torch module: classes = output width
            self.classes_ = np.arange(self.predict_proba(np.zeros((1, self.n_features_in_))).shape[1])

    def predict_proba(self, X: np.ndarray) -> np.ndarray:
        outs = self._run(np.asarray(X, dtype=np.float32))
        floats = [np.asarray(o, dtype=np.float64) for o in outs
                  if np.asarray(o).dtype.kind == "f" and np.asarray(o).ndim == 2]
        if not floats:
            raise UserError("ONNX teacher has no (rows, classes) float output: export it with class "
                            "probabilities or logits as an output")
        p = floats[-1]
        if p.min() < 0 or not np.allclose(p.sum(1), 1.0, atol=1e-4):
            p = np.exp(p - p.max(1, keepdims=True))
            p /= p.sum(1, keepdims=True)
        if not hasattr(self, "classes_"):
            self.classes_ = np.arange(p.shape[1])
        return p

    def tree_thresholds(self, n_features: int) -> list[list[float]] | None:
        """Split thresholds of TreeEnsemble* nodes (None when the graph has no tree ensemble)."""
        out: list[list[float]] = [[] for _ in range(n_features)]
        found = False
        for n in self.onnx.graph.node:
            if not n.op_type.startswith("TreeEnsemble"):
                continue
            a = {x.name: x for x in n.attribute}
            if "nodes_featureids" not in a:
                continue
            found = True
            from onnx import numpy_helper
            feats = list(a["nodes_featureids"].ints)
            if "nodes_splits" in a:                        # ai.onnx.ml opset 5 TreeEnsemble: no leaf rows
                values, modes = numpy_helper.to_array(a["nodes_splits"].t), [b""] * len(feats)
            else:
                values = (numpy_helper.to_array(a["nodes_values_as_tensor"].t) if "nodes_values_as_tensor" in a
                          else a["nodes_values"].floats)
                modes = a["nodes_modes"].strings
            for f, v, mode in zip(feats, values, modes):
                if mode != b"LEAF" and 0 <= f < n_features:
                    out[int(f)].append(float(v))
        return out if found else None


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
    if isinstance(model, OnnxTeacher):
        onnx_thr = model.tree_thresholds(n_features)
        return None if onnx_thr is None else [np.sort(np.asarray(v)) for v in onnx_thr]
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
