"""Embodied-efficiency metrics (arXiv 2603.19131): hand-computed values, file round trips, errors, and
the worked example's simulated arm."""
from __future__ import annotations

import importlib.util
import math
from pathlib import Path

import numpy as np
import pytest

from modelpress.deploy import embodied
from modelpress.errors import UserError


def test_jerk_of_a_cubic_is_exact_on_any_grid():
    for t in (np.arange(6.0), np.array([0.0, 0.5, 2.0, 2.5, 4.0, 4.1])):
        q = np.stack([t ** 3, 2 * t ** 3 - t ** 2 + 5], axis=1)  # jerks 6 and 12
        j = embodied.jerk(t, q)
        assert j.shape == (3, 2)
        np.testing.assert_allclose(j, [[6.0, 12.0]] * 3, rtol=1e-9)
        assert embodied.mean_jerk(t, q) == pytest.approx(math.hypot(6, 12), rel=1e-9)
    # a straight line (constant velocity) has no jerk
    assert embodied.mean_jerk(np.arange(5.0), np.arange(5.0)[:, None] * 3) == pytest.approx(0.0, abs=1e-12)


def test_hand_computed_rotation_energy_action_rate_completion():
    t = np.array([0.0, 1.0, 2.0, 3.0])
    q = np.array([[0, 0], [1, 0], [1, 2], [0, 2]], dtype=float)
    assert embodied.joint_rotation(q) == 4.0                             # 1 + 2 + 1
    assert embodied.motion_energy(t, q)[0] == 6.0                        # (1 + 4 + 1) / 1 s
    assert embodied.motion_energy(t * 2, q)[0] == 3.0                    # same path, half the speed
    tau = np.array([[1, 1], [2, 2], [3, 3], [9, 9]], dtype=float)
    assert embodied.motion_energy(t, q, tau) == (8.0, "mechanical work sum|tau*dq| (J)")  # |1*1| + |2*2| + |3*-1|
    assert embodied.action_rate(np.array([0.0, 1.0, 3.0])) == 2.5          # (1 + 4) / 2
    assert embodied.action_rate(np.array([[0, 0], [3, 4]])) == 25.0
    assert embodied.completion_time(np.array([0.0, 0.1, 0.2, 0.3]), np.array([0, 0, 1, 1])) == pytest.approx(0.2)
    assert embodied.completion_time(t, np.zeros(4)) == math.inf
    assert embodied.completion_time(t) == 3.0


def test_report_averages_completed_episodes_and_keeps_inference_metrics():
    t = np.arange(5) * 0.5
    a = embodied.Trajectory(t=t, q=(t ** 3)[:, None], action=np.zeros((5, 1)), done=np.array([0, 0, 1, 1, 1]))
    b = embodied.Trajectory(t=t, q=np.zeros((5, 1)), action=np.arange(5.0)[:, None], done=np.zeros(5))
    r = embodied.report([a, b], params=10, flops_per_action=20.0, latency_s=1e-3, weight_bytes=40)
    assert r["episodes"] == 2 and r["success_rate"] == 0.5
    assert r["completion_time_s"] == pytest.approx(1.0)        # only the completed episode
    assert r["mean_jerk"] == pytest.approx(3.0)                # (6 + 0) / 2
    assert r["action_rate"] == pytest.approx(0.5)              # (0 + 1) / 2
    assert (r["params"], r["flops_per_action"], r["latency_s"], r["weight_bytes"]) == (10, 20.0, 1e-3, 40)


def test_npz_and_csv_round_trip(tmp_path):
    t = np.linspace(0, 1, 6)
    tr = embodied.Trajectory(t=t, q=np.stack([t, t ** 2], 1), action=np.stack([t, -t], 1),
                             torque=np.ones((6, 2)), done=t > 0.5)
    embodied.save(tr, tmp_path / "a.npz")
    back = embodied.load(tmp_path / "a.npz")
    assert embodied.metrics(back) == embodied.metrics(tr)
    lines = ["t,q0,q1,a0,a1,tau0,tau1,done"] + [
        ",".join(str(float(x)) for x in (t[i], tr.q[i, 0], tr.q[i, 1], tr.action[i, 0], tr.action[i, 1], 1, 1, tr.done[i]))
        for i in range(6)]
    (tmp_path / "a.csv").write_text("\n".join(lines) + "\n")
    m_csv = embodied.metrics(embodied.load(tmp_path / "a.csv"))
    for k, v in embodied.metrics(tr).items():
        assert m_csv[k] == (pytest.approx(v) if isinstance(v, float) else v)


@pytest.mark.parametrize("content,name,match", [
    ("t,x0\n0,1\n1,2\n", "b.csv", "header must name a 't' column and q0"),
    ("t,q0\n0,1\n0,2\n", "b.csv", "b.csv: field 't' must be finite and strictly increasing"),
    ("t,q0\n0,abc\n1,2\n", "b.csv", "non-numeric"),
    ("x", "b.json", "unsupported trajectory format"),
])
def test_bad_files_name_the_problem(tmp_path, content, name, match):
    (tmp_path / name).write_text(content)
    with pytest.raises(UserError, match=match):
        embodied.load(tmp_path / name)


def test_bad_arrays(tmp_path):
    with pytest.raises(UserError, match="field 'q' must have shape"):
        embodied.Trajectory(t=np.arange(3.0), q=np.zeros((4, 1)))
    with pytest.raises(UserError, match="field 'torque' must have the shape of 'q'"):
        embodied.Trajectory(t=np.arange(3.0), q=np.zeros((3, 2)), torque=np.zeros((3, 1)))
    np.savez(tmp_path / "missing_q.npz", t=np.arange(3.0))
    with pytest.raises(UserError, match="missing array 'q'"):
        embodied.load(tmp_path / "missing_q.npz")


def _example():
    path = Path(__file__).resolve().parent.parent / "examples" / "embodied_policy.py"
    spec = importlib.util.spec_from_file_location("embodied_policy_example", path)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def test_example_arm_expert_reaches_and_unactuated_arm_stays():
    ex = _example()
    rng = np.random.default_rng(3)
    q0, goal = ex.sample_task(rng)
    np.testing.assert_allclose(ex.forward_kin(ex.inverse_kin(goal)), goal, atol=1e-12)
    tr, _ = ex.rollout(ex.expert, q0, goal)
    m = embodied.metrics(tr)
    assert math.isfinite(m["completion_time_s"]) and 0 < m["completion_time_s"] < 3.0
    assert m["motion_energy"] > 0 and m["joint_rotation"] > 0
    # zero torque from rest: the arm stays put
    still, _ = ex.rollout(lambda q, qd, g: np.zeros(2), q0, goal)
    assert embodied.joint_rotation(still.q) == 0.0
