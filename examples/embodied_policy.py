"""Worked example: inference efficiency vs embodied efficiency (arXiv 2603.19131) for an original and a
compressed policy.

A planar 2-link arm (point masses at the link ends, joint damping, no gravity) reaches Cartesian goals.
A torch MLP policy (sin q, cos q, qdot, goal) -> joint torques is trained by behaviour cloning on a
joint-space PD expert (goal angles from inverse kinematics), then its weights are quantized per output
row with modelpress' round-to-nearest (8, 4 and 3 bits). Every policy drives the same simulated arm
from the same start states to the same goals; the table puts params / FLOPs / weight bytes / measured
latency next to success, completion time, jerk, action rate, joint rotation and motion energy.

    .venv/bin/python examples/embodied_policy.py [--episodes 20] [--out trajs/]
"""
from __future__ import annotations

import argparse
import copy
import math
import sys
import time
from pathlib import Path

import numpy as np
import torch
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from modelpress.deploy import embodied  # noqa: E402
from modelpress.algos.quant import quant_dequant, scale_zero  # noqa: E402

L1, L2, M1, M2, DAMP = 0.5, 0.4, 1.0, 0.7, 0.6   # link lengths (m), end masses (kg), joint damping (N m s/rad)
CTRL_DT, SUBSTEPS = 0.02, 4                        # 50 Hz control, 200 Hz physics
KP, KD, TAU_MAX = 18.0, 5.0, 8.0                   # expert PD gains, torque limit (N m)
HORIZON, TOL, VTOL = 150, 0.01, 0.05               # 3 s episodes; done within 1 cm and |qdot| < 0.05 rad/s


def dynamics(q: np.ndarray, qd: np.ndarray, tau: np.ndarray) -> np.ndarray:
    """Joint accelerations from M(q) qdd + c(q, qd) + D qd = tau (planar 2-link, point masses)."""
    c2, s2 = math.cos(q[1]), math.sin(q[1])
    m11 = (M1 + M2) * L1 ** 2 + M2 * L2 ** 2 + 2 * M2 * L1 * L2 * c2
    m12 = M2 * L2 ** 2 + M2 * L1 * L2 * c2
    m22 = M2 * L2 ** 2
    h = M2 * L1 * L2 * s2
    cor = np.array([-h * (2 * qd[0] * qd[1] + qd[1] ** 2), h * qd[0] ** 2])
    return np.linalg.solve(np.array([[m11, m12], [m12, m22]]), tau - cor - DAMP * qd)


def forward_kin(q: np.ndarray) -> np.ndarray:
    return np.array([L1 * math.cos(q[0]) + L2 * math.cos(q[0] + q[1]), L1 * math.sin(q[0]) + L2 * math.sin(q[0] + q[1])])


def inverse_kin(goal: np.ndarray) -> np.ndarray:
    c2 = np.clip((goal @ goal - L1 ** 2 - L2 ** 2) / (2 * L1 * L2), -1.0, 1.0)
    q2 = math.acos(c2)
    return np.array([math.atan2(goal[1], goal[0]) - math.atan2(L2 * math.sin(q2), L1 + L2 * math.cos(q2)), q2])


def expert(q: np.ndarray, qd: np.ndarray, goal: np.ndarray) -> np.ndarray:
    err = (inverse_kin(goal) - q + math.pi) % (2 * math.pi) - math.pi
    return np.clip(KP * err - KD * qd, -TAU_MAX, TAU_MAX)


def features(q: np.ndarray, qd: np.ndarray, goal: np.ndarray) -> np.ndarray:
    return np.concatenate([np.sin(q), np.cos(q), qd, goal]).astype(np.float32)  # (8,)


def sample_task(rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    """A start configuration and a reachable goal in the upper half plane."""
    q0 = np.array([rng.uniform(-0.5, 1.5), rng.uniform(0.3, 2.2)])
    r, phi = rng.uniform(0.25, 0.8), rng.uniform(0.2, math.pi - 0.2)
    return q0, np.array([r * math.cos(phi), r * math.sin(phi)])


def rollout(act, q0: np.ndarray, goal: np.ndarray, noise: float = 0.0, rng=None) -> tuple[embodied.Trajectory, list]:
    """Run one episode with controller act(q, qd, goal) -> tau; returns the trajectory and visited states."""
    q, qd = q0.astype(np.float64).copy(), np.zeros(2)
    ts, qs, taus, dones, states = [], [], [], [], []
    for k in range(HORIZON):
        tau = np.clip(np.asarray(act(q, qd, goal), dtype=np.float64), -TAU_MAX, TAU_MAX)
        states.append((q.copy(), qd.copy()))
        ts.append(k * CTRL_DT)
        qs.append(q.copy())
        taus.append(tau.copy())
        dones.append(bool(np.linalg.norm(forward_kin(q) - goal) < TOL and np.linalg.norm(qd) < VTOL))
        if noise:
            tau = tau + rng.normal(0, noise, 2)
        for _ in range(SUBSTEPS):  # semi-implicit Euler
            qd = qd + dynamics(q, qd, tau) * (CTRL_DT / SUBSTEPS)
            q = q + qd * (CTRL_DT / SUBSTEPS)
    tr = embodied.Trajectory(t=np.array(ts), q=np.array(qs), action=np.array(taus), torque=np.array(taus),
                             done=np.array(dones))
    return tr, states


class Policy(nn.Module):
    def __init__(self, hidden: int = 128):
        super().__init__()
        self.net = nn.Sequential(nn.Linear(8, hidden), nn.Tanh(), nn.Linear(hidden, hidden), nn.Tanh(),
                                 nn.Linear(hidden, 2))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x) * TAU_MAX


def train(seed: int = 0, rollouts: int = 200, steps: int = 2000) -> Policy:
    """Behaviour cloning on expert rollouts with torque noise (so off-trajectory states are covered)."""
    rng = np.random.default_rng(seed)
    torch.manual_seed(seed)
    xs, ys = [], []
    for _ in range(rollouts):
        q0, goal = sample_task(rng)
        _, states = rollout(expert, q0, goal, noise=1.5, rng=rng)
        for q, qd in states:
            xs.append(features(q, qd, goal))
            ys.append(expert(q, qd, goal) / TAU_MAX)
    x, y = torch.from_numpy(np.stack(xs)), torch.from_numpy(np.stack(ys).astype(np.float32))
    pol = Policy()
    opt = torch.optim.Adam(pol.parameters(), lr=3e-3)
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, steps)
    for _ in range(steps):
        idx = torch.randint(0, x.shape[0], (512,))
        loss = ((pol.net(x[idx]) - y[idx]) ** 2).mean()
        opt.zero_grad()
        loss.backward()
        opt.step()
        sched.step()
    return pol.eval()


def quantized(pol: Policy, bits: int) -> Policy:
    """Per-output-row symmetric round-to-nearest of every linear weight (biases kept in fp32)."""
    out = copy.deepcopy(pol)
    for m in out.modules():
        if isinstance(m, nn.Linear):
            s, z = scale_zero(m.weight.data, bits, sym=True)
            m.weight.data = quant_dequant(m.weight.data, s[:, None], z[:, None], bits).to(m.weight.dtype)
    return out


def controller(pol: Policy):
    def act(q, qd, goal):
        with torch.inference_mode():
            return pol(torch.from_numpy(features(q, qd, goal))[None])[0].numpy()
    return act


def inference_metrics(pol: Policy, bits: int) -> dict:
    lins = [m for m in pol.modules() if isinstance(m, nn.Linear)]
    params = sum(p.numel() for p in pol.parameters())
    flops = sum(2 * m.in_features * m.out_features for m in lins)
    wbytes = sum(m.weight.numel() * bits / 8 + m.out_features * (2 if bits < 32 else 0) + m.bias.numel() * 4 for m in lins)
    x = torch.from_numpy(features(np.zeros(2), np.zeros(2), np.array([0.3, 0.3])))[None]
    with torch.inference_mode():
        for _ in range(50):
            pol(x)
        t0 = time.thread_time()
        for _ in range(500):
            pol(x)
        lat = (time.thread_time() - t0) / 500
    return {"params": params, "flops": flops, "weight_bytes": int(wbytes), "latency_s": lat}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--episodes", type=int, default=20)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--out", help="folder to save every trajectory as .npz")
    a = ap.parse_args()
    torch.set_num_threads(1)
    t0 = time.time()
    pol = train(a.seed)
    print(f"trained the MLP policy by behaviour cloning in {time.time() - t0:.1f} s")
    policies = {"expert (PD + IK)": (None, 0), "MLP fp32": (pol, 32), "MLP int8": (quantized(pol, 8), 8),
                "MLP int4": (quantized(pol, 4), 4), "MLP int3": (quantized(pol, 3), 3)}
    tasks = [sample_task(np.random.default_rng(10_000 + a.seed + i)) for i in range(a.episodes)]
    rows = []
    for name, (p, bits) in policies.items():
        act = expert if p is None else controller(p)
        trs = [rollout(act, q0, goal)[0] for q0, goal in tasks]
        if a.out:
            for i, tr in enumerate(trs):
                embodied.save(tr, Path(a.out) / f"{name.split()[0]}-{name.split()[-1]}-{i:03d}.npz")
        inf = inference_metrics(p, bits) if p is not None else {"params": 0, "flops": 0, "weight_bytes": 0, "latency_s": 0.0}
        rep = embodied.report(trs, params=inf["params"], flops_per_action=inf["flops"], latency_s=inf["latency_s"],
                              weight_bytes=inf["weight_bytes"])
        rows.append((name, rep))
    head = ("policy", "params", "FLOPs/act", "weight B", "latency us", "success", "completion s", "jerk rad/s^3",
            "action rate", "joint rot rad", "work J")
    print(" | ".join(head))
    for name, r in rows:
        print(" | ".join([name, str(r["params"]), str(r["flops_per_action"]), str(r["weight_bytes"]),
                          f"{r['latency_s'] * 1e6:.1f}", f"{r['success_rate']:.2f}", f"{r['completion_time_s']:.3f}",
                          f"{r['mean_jerk']:.1f}", f"{r['action_rate']:.4f}", f"{r['joint_rotation']:.3f}",
                          f"{r['motion_energy']:.3f}"]))
    print("completion time averages the completed episodes; motion energy is the mechanical work sum|tau*dq|.\n"
          "The quantized policies are simulated (weights rounded to the b-bit grid, forward in fp32), so their\n"
          "latency equals the fp32 policy's up to timing noise; weight bytes count b-bit codes + fp16 row scales.")


if __name__ == "__main__":
    main()
