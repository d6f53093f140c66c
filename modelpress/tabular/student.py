"""Student models for data-free tabular distillation (TabKD, arXiv 2603.15481).

* `MLPStudent`: input normalisation to the spec box (buffers, so it exports), optionally a
  piecewise-linear encoding (PLE, Gorishniy et al. 2022, arXiv 2203.05556) of every feature
  over K quantile bins of the student's own training inputs,
      e_jt(x) = clamp((x_j - q_j,t-1) / (q_j,t - q_j,t-1), 0, 1),  t = 1..K,
  (a zero-width bin, e.g. a point mass at 0, becomes the step 1[x_j > q]), hidden ReLU
  layers, class logits. PLE lets a small MLP bend sharply where its inputs are dense. Trained with the distillation loss
      L = KL(p_T || softmax(z_S / tau)) * tau^2 + alpha * CE(argmax p_T, z_S)
  on the teacher's soft outputs p_T (tau = 1, alpha = 0 gives plain KL).
* `TreeStudent`: a shallow regression tree fitted to p_T (scikit-learn), stored as tensors
  and evaluated in torch by `depth` gather steps, so it exports like the MLP.
Both save to safetensors (weights + JSON config in the metadata) and to ONNX.
"""
from __future__ import annotations

import json
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from modelpress.errors import UserError
from modelpress.io import atomic_save_file, atomic_write_bytes


def quantile_edges(X: np.ndarray, k: int) -> np.ndarray:
    """PLE bin edges: per feature the 0, 1/k, ..., 1 quantiles of X.  X (n, d) -> (d, k + 1)"""
    return np.quantile(X, np.linspace(0, 1, k + 1), axis=0).T


class MLPStudent(nn.Module):
    """x (n, d) -> logits (n, C); x is normalised by (x - center) / scale inside and, when
    `edges` (d, K + 1) is given, also piecewise-linearly encoded over those K bins."""

    def __init__(self, d: int, n_classes: int, hidden: tuple[int, ...] = (64, 64),
                 center: np.ndarray | None = None, scale: np.ndarray | None = None,
                 edges: np.ndarray | None = None, ple_bins: int = 0):
        super().__init__()
        k = ple_bins if edges is None else edges.shape[1] - 1
        self.config = {"kind": "mlp", "d": d, "n_classes": n_classes, "hidden": list(hidden), "ple_bins": int(k)}
        self.register_buffer("center", torch.as_tensor(np.zeros(d) if center is None else center,
                                                       dtype=torch.float32))
        self.register_buffer("scale", torch.as_tensor(np.ones(d) if scale is None else scale,
                                                      dtype=torch.float32))
        self.ple = k > 0
        if self.ple:
            e = np.zeros((d, k + 1)) if edges is None else np.asarray(edges, dtype=np.float64)
            width = np.diff(e, axis=1)  # (d, k)
            s = np.asarray(self.scale, dtype=np.float64)[:, None]
            self.register_buffer("ple_lo", torch.as_tensor(e[:, :-1], dtype=torch.float32))  # (d, k)
            # zero-width bins (point masses) become steps: divide by a width far below any gap
            self.register_buffer("ple_w", torch.as_tensor(np.maximum(width, 1e-6 * s), dtype=torch.float32))
        layers, prev = [], d * (k + 1)
        for h in hidden:
            layers += [nn.Linear(prev, h), nn.ReLU()]
            prev = h
        layers.append(nn.Linear(prev, n_classes))
        self.net = nn.Sequential(*layers)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        z = (x - self.center) / self.scale  # (n, d)
        if self.ple:
            e = ((x.unsqueeze(-1) - self.ple_lo) / self.ple_w).clamp(0, 1)  # (n, d, k)
            z = torch.cat([z, e.flatten(1)], 1)  # (n, d (k + 1))
        return self.net(z)


class TreeStudent(nn.Module):
    """Array-encoded binary tree: x (n, d) -> log p (n, C) (log of the leaf's soft label)."""

    def __init__(self, feature: torch.Tensor, threshold: torch.Tensor, left: torch.Tensor,
                 right: torch.Tensor, value: torch.Tensor, depth: int, d: int):
        super().__init__()
        n_nodes, C = value.shape
        self.config = {"kind": "tree", "d": int(d), "n_classes": int(C), "depth": int(depth)}
        self.depth = int(depth)
        self.register_buffer("feature", feature.long())  # (nodes,) leaf: 0
        self.register_buffer("threshold", threshold.float())  # (nodes,)
        self.register_buffer("left", left.long())  # (nodes,) leaf: itself
        self.register_buffer("right", right.long())  # (nodes,) leaf: itself
        self.register_buffer("value", value.float())  # (nodes, C)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        node = torch.zeros(x.shape[0], dtype=torch.long)
        for _ in range(self.depth):
            xv = torch.gather(x, 1, self.feature[node].unsqueeze(1)).squeeze(1)  # (n,)
            node = torch.where(xv <= self.threshold[node], self.left[node], self.right[node])
        return torch.log(self.value[node].clamp_min(1e-6))


def distill_loss(z_s: torch.Tensor, p_t: torch.Tensor, tau: float = 1.0, alpha: float = 0.0) -> torch.Tensor:
    """KL(p_T^tau || softmax(z_S / tau)) tau^2 + alpha CE(argmax p_T, z_S).  (n, C), (n, C) -> ()"""
    log_q = F.log_softmax(z_s / tau, -1)
    p = p_t
    if tau != 1.0:
        p = F.softmax(torch.log(p_t.clamp_min(1e-8)) / tau, -1)
    kl = (p * (torch.log(p.clamp_min(1e-8)) - log_q)).sum(-1).mean() * tau * tau
    if alpha > 0:
        kl = kl + alpha * F.cross_entropy(z_s, p_t.argmax(-1))
    return kl


def train_mlp(X: np.ndarray, P: np.ndarray, center: np.ndarray, scale: np.ndarray, seed: int,
              hidden: tuple[int, ...] = (64, 64), steps: int = 600, batch: int = 256, lr: float = 3e-3,
              tau: float = 1.0, alpha: float = 0.0, init: MLPStudent | None = None,
              ple_bins: int = 0) -> MLPStudent:
    """Fit an MLP student to teacher soft outputs P on queries X (Adam, cosine lr); with
    ple_bins = K > 0 its inputs are PLE-encoded over K quantile bins of X itself."""
    g = torch.Generator().manual_seed(seed)
    if init is None:
        with torch.random.fork_rng(devices=[]):  # seeded init without touching the caller's RNG
            torch.manual_seed(seed)
            edges = quantile_edges(X, ple_bins) if ple_bins > 0 else None
            model = MLPStudent(X.shape[1], P.shape[1], hidden, center, scale, edges)
    else:
        model = init
    Xt = torch.as_tensor(X, dtype=torch.float32)
    Pt = torch.as_tensor(P, dtype=torch.float32)
    opt = torch.optim.Adam(model.parameters(), lr=lr)
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, steps)
    n = len(Xt)
    model.train()
    for _ in range(steps):
        idx = torch.randint(0, n, (min(batch, n),), generator=g)
        loss = distill_loss(model(Xt[idx]), Pt[idx], tau, alpha)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        sched.step()
    return model.eval()


def train_tree(X: np.ndarray, P: np.ndarray, seed: int, max_depth: int = 6) -> TreeStudent:
    """Fit a depth-limited regression tree to the soft labels (multi-output squared error)."""
    from sklearn.tree import DecisionTreeRegressor
    reg = DecisionTreeRegressor(max_depth=max_depth, random_state=seed).fit(X, P)
    t = reg.tree_
    leaf = t.children_left < 0
    idx = torch.arange(t.node_count)
    left = torch.where(torch.as_tensor(leaf), idx, torch.as_tensor(t.children_left))
    right = torch.where(torch.as_tensor(leaf), idx, torch.as_tensor(t.children_right))
    feature = torch.as_tensor(np.where(leaf, 0, t.feature))
    value = torch.as_tensor(t.value[:, :, 0])
    value = value / value.sum(1, keepdim=True).clamp_min(1e-12)
    return TreeStudent(feature, torch.as_tensor(t.threshold), left, right, value, max(reg.get_depth(), 1),
                       X.shape[1]).eval()


def predict_proba(model: nn.Module, X: np.ndarray) -> np.ndarray:
    """Student soft outputs.  X (n, d) -> (n, C)"""
    with torch.no_grad():
        return torch.softmax(model(torch.as_tensor(X, dtype=torch.float32)), -1).double().numpy()


def size_bytes(model: nn.Module) -> int:
    """Bytes of all parameters and buffers (what the safetensors file holds, minus header)."""
    return sum(t.numel() * t.element_size() for t in model.state_dict().values())


def latency_ms(fn, X: np.ndarray, repeats: int = 20) -> float:
    """Median wall time of fn(X) in milliseconds."""
    fn(X)
    ts = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn(X)
        ts.append(time.perf_counter() - t0)
    return float(np.median(ts) * 1e3)


def save_student(model: nn.Module, path: str | Path, extra: dict | None = None) -> None:
    """safetensors with the architecture config (and `extra`) as JSON in the metadata."""
    meta = {"config": json.dumps(model.config), "format": "modelpress.tabular"}
    if extra:
        meta["extra"] = json.dumps(extra)
    atomic_save_file({k: v.detach().cpu() for k, v in model.state_dict().items()}, path, metadata=meta)


def load_student(path: str | Path) -> nn.Module:
    """Rebuild a student saved by `save_student`."""
    from safetensors import safe_open
    from safetensors.torch import load_file
    path = Path(path)
    if not path.is_file():
        raise UserError(f"student file {path} not found")
    with safe_open(str(path), "pt") as f:
        meta = f.metadata() or {}
    if "config" not in meta:
        raise UserError(f"student file {path} has no modelpress.tabular config in its metadata")
    cfg = json.loads(meta["config"])
    sd = load_file(str(path))
    if cfg["kind"] == "mlp":
        m = MLPStudent(cfg["d"], cfg["n_classes"], tuple(cfg["hidden"]), ple_bins=int(cfg.get("ple_bins", 0)))
    else:
        m = TreeStudent(sd["feature"], sd["threshold"], sd["left"], sd["right"], sd["value"], cfg["depth"], cfg["d"])
    m.load_state_dict(sd)
    return m.eval()


def export_onnx(model: nn.Module, d: int, path: str | Path) -> None:
    """ONNX export (input 'x' (batch, d) float32 -> 'logits'); clear error if onnx is missing."""
    try:
        import onnx  # noqa: F401
    except ImportError:
        raise UserError("ONNX export needs the 'onnx' package: pip install 'modelpress[tabular]' "
                        "(or pass --no-onnx)") from None
    import io
    import warnings
    buf = io.BytesIO()
    x = torch.zeros(2, d)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        try:
            torch.onnx.export(model, (x,), buf, input_names=["x"], output_names=["logits"],
                              dynamic_axes={"x": {0: "batch"}, "logits": {0: "batch"}}, dynamo=False)
        except ImportError as e:
            raise UserError(f"ONNX export failed: {e}; pip install 'modelpress[tabular]'") from None
    atomic_write_bytes(path, buf.getvalue())
