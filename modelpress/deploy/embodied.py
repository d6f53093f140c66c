"""Embodied-efficiency metrics of a robot trajectory, reported next to the usual inference metrics
(params, FLOPs, latency): "From Inference Efficiency to Embodied Efficiency: Revisiting Efficiency Metrics
for Vision-Language-Action Models" (arXiv 2603.19131). A compressed policy can be cheaper per inference
and still cost more per task (slower completion, jerkier or longer motions); these numbers show it.

Trajectory: times t (T,) strictly increasing, positions q (T, J) (joint angles in rad, or Cartesian
coordinates), optional actions a (T, A), torques tau (T, J) and a `done` flag (T,).

  completion time      t[first done] - t[0]; inf when the task never completes; t[-1] - t[0] without flags
  jerk                 d^3 q / dt^3 by third divided differences, j_k = 6 * q[t_k, .., t_k+3] (exact for
                       cubics on any time grid); reported as the mean over k of ||j_k||_2
  action rate          mean over k of ||a_{k+1} - a_k||_2^2 (the action-rate penalty of robot learning)
  joint rotation       sum_k sum_j |q_{k+1,j} - q_{k,j}| (cumulative, rad)
  motion energy        with torques: sum_k sum_j |tau_{k,j} (q_{k+1,j} - q_{k,j})| (mechanical work, J);
                       without: sum_k ||q_{k+1} - q_k||^2 / (t_{k+1} - t_k) = integral of ||qdot||^2 dt
                       (a unit-inertia kinetic proxy); the `motion_energy_kind` key says which.
"""
from __future__ import annotations

import csv
import math
import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from ..errors import UserError


@dataclass(frozen=True)
class Trajectory:
    t: np.ndarray                       # (T,) seconds
    q: np.ndarray                       # (T, J)
    action: np.ndarray | None = None    # (T, A)
    torque: np.ndarray | None = None    # (T, J)
    done: np.ndarray | None = None      # (T,) bool

    def __post_init__(self):
        validate(self, "trajectory")


def validate(tr: Trajectory, source: str) -> None:
    t, q = np.asarray(tr.t), np.asarray(tr.q)
    if t.ndim != 1 or t.shape[0] < 2:
        raise UserError(f"{source}: field 't' must be a 1-D array of at least 2 times, got shape {t.shape}")
    if q.ndim != 2 or q.shape[0] != t.shape[0]:
        raise UserError(f"{source}: field 'q' must have shape (T, J) with T = len(t) = {t.shape[0]}, got {q.shape}")
    if not np.all(np.isfinite(t)) or not np.all(np.diff(t) > 0):
        raise UserError(f"{source}: field 't' must be finite and strictly increasing")
    if not np.all(np.isfinite(q)):
        raise UserError(f"{source}: field 'q' contains NaN or inf")
    for name in ("action", "torque", "done"):
        v = getattr(tr, name)
        if v is not None and np.asarray(v).shape[0] != t.shape[0]:
            raise UserError(f"{source}: field '{name}' must have {t.shape[0]} rows (one per time), got {np.asarray(v).shape}")
    if tr.torque is not None and np.asarray(tr.torque).shape != q.shape:
        raise UserError(f"{source}: field 'torque' must have the shape of 'q' {q.shape}, got {np.asarray(tr.torque).shape}")


def uniform(q: np.ndarray, dt: float, **kw) -> Trajectory:
    """A trajectory sampled every `dt` seconds from t = 0."""
    q = np.asarray(q, dtype=np.float64)
    q = q[:, None] if q.ndim == 1 else q
    return Trajectory(t=np.arange(q.shape[0]) * float(dt), q=q, **kw)


# ----------------------------------------------------------------------------------------------- metrics
def completion_time(t: np.ndarray, done: np.ndarray | None = None) -> float:
    """Seconds from t[0] to the first step flagged done (inf if never); t[-1] - t[0] without flags."""
    if done is None:
        return float(t[-1] - t[0])
    hit = np.flatnonzero(np.asarray(done, dtype=bool))
    return float(t[hit[0]] - t[0]) if hit.size else math.inf


def divided_differences(t: np.ndarray, q: np.ndarray, order: int) -> np.ndarray:
    """order-th divided differences q[t_k, ..., t_{k+order}], shape (T - order, J)."""
    d = np.asarray(q, dtype=np.float64)
    for n in range(1, order + 1):
        d = (d[1:] - d[:-1]) / (t[n:] - t[:-n])[:, None]
    return d


def jerk(t: np.ndarray, q: np.ndarray) -> np.ndarray:
    """Jerk d^3q/dt^3 = 6 * third divided difference, shape (T - 3, J)."""
    if len(t) < 4:
        raise UserError(f"jerk needs at least 4 samples, got {len(t)}")
    return 6.0 * divided_differences(np.asarray(t, dtype=np.float64), q, 3)


def mean_jerk(t: np.ndarray, q: np.ndarray) -> float:
    """Mean over samples of the jerk's Euclidean norm across joints."""
    return float(np.linalg.norm(jerk(t, q), axis=1).mean())


def action_rate(action: np.ndarray) -> float:
    """Mean squared change between consecutive actions: mean_k ||a_{k+1} - a_k||^2."""
    a = np.asarray(action, dtype=np.float64)
    a = a[:, None] if a.ndim == 1 else a
    return float((np.diff(a, axis=0) ** 2).sum(axis=1).mean())


def joint_rotation(q: np.ndarray) -> float:
    """Cumulative absolute joint displacement sum_k sum_j |q_{k+1,j} - q_{k,j}|."""
    return float(np.abs(np.diff(np.asarray(q, dtype=np.float64), axis=0)).sum())


def motion_energy(t: np.ndarray, q: np.ndarray, torque: np.ndarray | None = None) -> tuple[float, str]:
    """(energy, kind): mechanical work sum |tau_k . dq_k| with torques, else integral ||qdot||^2 dt."""
    dq = np.diff(np.asarray(q, dtype=np.float64), axis=0)  # (T-1, J)
    if torque is not None:
        tau = np.asarray(torque, dtype=np.float64)[:-1]     # torque held over [t_k, t_k+1)
        return float(np.abs(tau * dq).sum()), "mechanical work sum|tau*dq| (J)"
    dt = np.diff(np.asarray(t, dtype=np.float64))
    return float(((dq ** 2).sum(axis=1) / dt).sum()), "kinetic proxy integral |qdot|^2 dt"


def metrics(tr: Trajectory) -> dict:
    """All embodied-efficiency metrics of one trajectory."""
    energy, kind = motion_energy(tr.t, tr.q, tr.torque)
    out = {"completion_time_s": completion_time(tr.t, tr.done),
           "mean_jerk": mean_jerk(tr.t, tr.q) if len(tr.t) >= 4 else math.nan,
           "joint_rotation": joint_rotation(tr.q), "motion_energy": energy, "motion_energy_kind": kind,
           "steps": int(len(tr.t)), "duration_s": float(tr.t[-1] - tr.t[0])}
    out["action_rate"] = action_rate(tr.action) if tr.action is not None else math.nan
    return out


def report(tr: Trajectory | list[Trajectory], params: int | None = None, flops_per_action: float | None = None,
           latency_s: float | None = None, weight_bytes: int | None = None) -> dict:
    """Embodied metrics (averaged over episodes; success = fraction completed) next to inference metrics."""
    trs = [tr] if isinstance(tr, Trajectory) else list(tr)
    if not trs:
        raise UserError("report needs at least one trajectory")
    per = [metrics(x) for x in trs]
    out: dict = {"episodes": len(per), "success_rate": float(np.mean([math.isfinite(m["completion_time_s"]) for m in per]))}
    for k in ("completion_time_s", "mean_jerk", "action_rate", "joint_rotation", "motion_energy"):
        vals = [m[k] for m in per if math.isfinite(m[k])]
        out[k] = float(np.mean(vals)) if vals else math.nan
    out["motion_energy_kind"] = per[0]["motion_energy_kind"]
    out.update({"params": params, "flops_per_action": flops_per_action, "latency_s": latency_s,
                "weight_bytes": weight_bytes})
    return out


# ----------------------------------------------------------------------------------------------- files
def load(path: str | os.PathLike) -> Trajectory:
    """Read a trajectory from .npz (arrays t, q and optional action, torque, done) or .csv (header with t,
    q0..qJ, optional a0.., tau0.., done)."""
    path = Path(path)
    if not path.is_file():
        raise UserError(f"trajectory file {path} does not exist")
    if path.suffix == ".npz":
        with np.load(path) as z:
            if "t" not in z or "q" not in z:
                raise UserError(f"{path}: missing array '{'t' if 't' not in z else 'q'}' (need t (T,) and q (T, J))")
            arrs = {k: z[k] for k in ("t", "q", "action", "torque", "done") if k in z}
    elif path.suffix == ".csv":
        with open(path, newline="") as f:
            rows = list(csv.reader(f))
        if len(rows) < 3:
            raise UserError(f"{path}: needs a header row and at least 2 data rows")
        head = [h.strip() for h in rows[0]]
        try:
            data = np.array([[float(x) for x in r] for r in rows[1:] if r], dtype=np.float64)
        except ValueError as e:
            raise UserError(f"{path}: non-numeric value ({e})") from None

        def cols(prefix: str) -> list[int]:
            idx = [(int(h[len(prefix):]), i) for i, h in enumerate(head) if h.startswith(prefix) and h[len(prefix):].isdigit()]
            return [i for _, i in sorted(idx)]

        if "t" not in head or not cols("q"):
            raise UserError(f"{path}: header must name a 't' column and q0, q1, ... columns, got {head}")
        arrs = {"t": data[:, head.index("t")], "q": data[:, cols("q")]}
        if cols("a"):
            arrs["action"] = data[:, cols("a")]
        if cols("tau"):
            arrs["torque"] = data[:, cols("tau")]
        if "done" in head:
            arrs["done"] = data[:, head.index("done")] > 0.5
    else:
        raise UserError(f"{path}: unsupported trajectory format {path.suffix!r}: use .npz or .csv")
    q = np.asarray(arrs["q"], dtype=np.float64)
    arrs["q"] = q[:, None] if q.ndim == 1 else q
    tr = Trajectory.__new__(Trajectory)
    object.__setattr__(tr, "t", np.asarray(arrs["t"], dtype=np.float64))
    for k in ("q", "action", "torque", "done"):
        object.__setattr__(tr, k, arrs.get(k))
    validate(tr, str(path))
    return tr


def save(tr: Trajectory, path: str | os.PathLike) -> None:
    """Write a trajectory as .npz (atomically)."""
    import io

    from ..io import atomic_write_bytes
    buf = io.BytesIO()
    np.savez(buf, **{k: getattr(tr, k) for k in ("t", "q", "action", "torque", "done") if getattr(tr, k) is not None})
    atomic_write_bytes(path, buf.getvalue())
