"""The layer-by-layer engine's numerics: one-triangle Hessian updates, the blocked triangular inverse, the same
statistics and outputs at any thread count, and true-sequential groups."""
import pytest
import torch

from modelpress.engine import layerwise
from modelpress.algos.gptq import inverse_hessian_chol, tril_inverse_
from modelpress.errors import UserError
from modelpress.recipe import Recipe
from modelpress.targets import Target

from .conftest import correlated_calib, tiny_gpt2, tiny_llama

P = "model.layers.0."


@pytest.fixture
def threads():
    n = torch.get_num_threads()
    yield lambda k: torch.set_num_threads(k)
    torch.set_num_threads(n)


@pytest.mark.parametrize("contiguous", [True, False])
def test_gram_add_matches_2xtx_over_n(contiguous):
    g = torch.Generator().manual_seed(0)
    x1, x2 = torch.randn(100, 37, generator=g), torch.randn(60, 37, generator=g)
    if not contiguous:                           # the GEMM fallback
        x1 = torch.randn(37, 100, generator=g).t()
    H = torch.zeros(37, 37)
    layerwise.gram_add_(H, x1, strip=16)                    # 37 columns: 2 strips
    layerwise.gram_add_(H, x2, strip=16)
    layerwise.symmetrize_(H)
    H *= 2 / 160
    X = torch.cat([x1, x2])
    assert torch.equal(H, H.t())
    assert torch.allclose(H, 2 * X.t() @ X / 160, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("n", [1, 7, 128, 129, 300])
def test_tril_inverse_is_the_inverse(n):
    g = torch.Generator().manual_seed(n)
    A = torch.randn(n, n, generator=g, dtype=torch.float64)
    L = torch.linalg.cholesky(A @ A.t() + n * torch.eye(n, dtype=torch.float64))
    Lt = L.clone()
    Li = tril_inverse_(Lt, leaf=32)
    assert Li is Lt                                                  # written over its argument
    assert torch.equal(Li, Li.tril())
    assert (Li @ L - torch.eye(n, dtype=torch.float64)).abs().max() < 1e-12


@pytest.mark.parametrize("n", [1, 5, 384, 385, 1000])
def test_symmetrize_in_place_equals_the_whole_matrix_expression(n):
    from modelpress.engine.layerwise import symmetrize_
    H = torch.randn(n, n, generator=torch.Generator().manual_seed(n))
    H[0, -1] = -0.0
    want = H.triu() + H.triu(1).t()
    symmetrize_(H)
    assert torch.equal(H.view(torch.int32), want.view(torch.int32))            # bitwise, signs of zero included


def test_inverse_hessian_factor_reproduces_the_inverse():
    g = torch.Generator().manual_seed(3)
    X = torch.randn(400, 300, generator=g)
    H = 2 * X.t() @ X / 400
    perm = torch.randperm(300, generator=g)
    U, d = inverse_hessian_chol(H, 0.01, perm)
    Hp = H[perm][:, perm].double()
    Hp += d * Hp.diagonal().mean() * torch.eye(300, dtype=torch.float64)
    assert torch.equal(U, U.triu())
    assert torch.allclose(U.double().t() @ U.double(), torch.linalg.inv(Hp), rtol=1e-3, atol=1e-6)


@pytest.mark.parametrize("kind", ["hessian", "input_sq_norm", "inputs"])
def test_statistics_do_not_depend_on_the_thread_count(kind, threads):
    m, calib = tiny_llama(), correlated_calib(n=10)
    res = {}
    for k in (1, 2):
        threads(k)
        step = next(layerwise.steps(m, calib, batch_size=3))     # 4 batches, the last one short
        lin = step.linears(Target())
        res[k] = (step.collect(lin, kind), step.outputs())
    (s1, o1), (s2, o2) = res[1], res[2]
    assert s1.keys() == s2.keys() == lin.keys()
    for name in s1:
        assert torch.allclose(s1[name], s2[name], rtol=1e-5, atol=1e-6), name
    assert s2[P + "self_attn.q_proj"] is s2[P + "self_attn.v_proj"]
    assert len(o1) == len(o2) == 4
    for a, b in zip(o1, o2):
        assert torch.allclose(a, b, rtol=1e-5, atol=1e-6)


def test_sequential_compresses_one_input_group_at_a_time(one_thread):
    m, calib = tiny_llama(layers=1), correlated_calib()
    calls = []

    def fn(linears, stats):
        calls.append(sorted(n.split(".")[-1] for n in linears))
        if "o_proj" in calls[-1][0]:             # o_proj's input must come from the q/k/v already changed
            calls.append(float(stats[P + "self_attn.o_proj"].trace()))
        for n, lin in linears.items():
            if n.endswith("v_proj"):             # values halved -> attention output halved
                lin.weight.data.mul_(0.5)
        return {n: {} for n in linears}

    layerwise.run(m, calib, Target(), fn, sequential=True)
    assert calls[0] == ["k_proj", "q_proj", "v_proj"]
    assert calls[1] == ["o_proj"] and calls[3] == ["gate_proj", "up_proj"] and calls[4] == ["down_proj"]
    one_pass = []
    layerwise.run(tiny_llama(layers=1), calib, Target(),
                  lambda lin, st: one_pass.append(float(st[P + "self_attn.o_proj"].trace())) or {}, sequential=False)
    # trace(H_o) drops by 4x: o_proj's statistics were taken after v_proj changed
    assert calls[2] == pytest.approx(one_pass[0] / 4, rel=1e-4)


def test_sequential_gptq_and_sparsegpt_run_and_reach_their_targets(one_thread):
    calib = correlated_calib()
    for stage in ({"quantize": {"method": "gptq", "bits": 4, "group_size": 32, "sequential": True}},
                  {"prune": {"method": "sparsegpt", "sparsity": 0.5, "sequential": True}}):
        m = tiny_llama()
        from modelpress.api import compress
        stats = compress(m, Recipe.from_dict({"stages": [stage]}), calib)[0]["layers"]
        assert len(stats) == 14
        if "prune" in stage:
            assert all(v["sparsity"] == pytest.approx(0.5, abs=1e-3) for v in stats.values())
        else:
            assert all(v["sqnr"] > 15 for v in stats.values())


def test_sequential_must_be_a_boolean():
    with pytest.raises(UserError, match=r"prune.sequential must be true or false, got 'yes'"):
        Recipe.from_dict({"stages": [{"prune": {"method": "wanda", "sequential": "yes"}}]})


def _multi_pass_sweep(self, linears, groups, kind, fn):
    return self.grouped(linears, kind, fn, True)[0]


@pytest.mark.parametrize("build", [tiny_llama, tiny_gpt2])
@pytest.mark.parametrize("stage", [
    {"quantize": {"method": "gptq", "bits": 3, "group_size": 16, "sequential": True}},
    {"prune": {"method": "sparsegpt", "sparsity": 0.5}},
    {"prune": {"method": "wanda", "sparsity": 0.5}}])
def test_one_pass_sweep_equals_one_pass_per_group(build, stage, one_thread, monkeypatch):
    """Step.sweep (one forward per layer) gives the very same weights, statistics and outputs as measuring each
    input group with its own partial pass; 20 samples in batches of 8: three batches parked at once, one short."""
    from modelpress.api import compress
    calib = correlated_calib(n=20)
    runs, swept, sweep = [], [], layerwise.Step.sweep
    monkeypatch.setattr(layerwise.Step, "sweep", lambda self, *a: swept.append(self.index) or sweep(self, *a))
    for multi in (False, True):
        if multi:
            monkeypatch.setattr(layerwise.Step, "sweep", _multi_pass_sweep)
        m = build(layers=3) if build is tiny_llama else build()
        stats = compress(m, Recipe.from_dict({"stages": [stage]}), calib)[0]["layers"]
        with torch.no_grad():
            runs.append((m.state_dict(), stats, m(calib.input_ids).logits))
    (sd1, st1, lo1), (sd2, st2, lo2) = runs
    assert swept == ([1, 2] if build is tiny_llama else [1])       # layer 0 found the groups
    assert sd1.keys() == sd2.keys() and all(torch.equal(sd1[k], sd2[k]) for k in sd1)
    assert st1 == st2
    assert torch.equal(lo1, lo2)


@pytest.mark.parametrize("where", ["stage", "forward"])
def test_a_failing_sweep_raises_and_leaves_no_gates_or_threads(where, one_thread):
    import threading
    m, calib = tiny_llama(layers=3), correlated_calib(n=20)
    before = threading.active_count()
    calls = []

    def fn(linears, stats):
        calls.append(list(linears))
        if where == "stage" and len(calls) == 6:           # layer 1's o_proj, inside the sweep
            raise ValueError("boom")
        return {n: {} for n in linears}

    class Boom(torch.nn.Module):
        def forward(self, x):
            raise ValueError("boom")

    if where == "forward":                                  # layer 1's MLP fails inside the sweep
        m.model.layers[1].mlp.act_fn = Boom()
    with pytest.raises(ValueError, match="boom"):
        layerwise.run(m, calib, Target(), fn, sequential=True)
    assert threading.active_count() == before
    assert all(type(mod).__name__ != "_Gate" for mod in m.modules())


def test_bfloat16_calibration_forward_stays_close_to_float32(one_thread):
    """amp="bfloat16": the forward passes run under autocast, the statistics and outputs come back float32 and
    within bf16 rounding of the float32 ones."""
    m, calib = tiny_llama(), correlated_calib(n=10)
    res = {}
    for amp in (None, torch.bfloat16):
        step = next(layerwise.steps(m, calib, batch_size=4, amp=amp))
        lin = step.linears(Target())
        res[amp] = (step.collect(lin, "hessian"), step.outputs())
    (h32, o32), (h16, o16) = res[None], res[torch.bfloat16]
    rel = {n: float((h16[n] - h32[n]).norm() / h32[n].norm()) for n in h32}
    assert all(h.dtype == torch.float32 for h in h16.values())
    assert all(r < 3e-2 for r in rel.values()), rel
    assert rel[P + "mlp.down_proj"] > 1e-5 and rel[P + "self_attn.o_proj"] > 1e-5   # read bf16 matmul outputs
    for a, b in zip(o32, o16):
        assert b.dtype == torch.float32 and float((a - b).norm() / a.norm()) < 3e-2


def test_bfloat16_calibration_sweep_equals_its_multi_pass(one_thread, monkeypatch):
    from modelpress.api import compress
    calib, runs = correlated_calib(n=20), []
    stage = {"quantize": {"method": "gptq", "bits": 4, "group_size": 16, "calib_dtype": "bfloat16"}}
    for multi in (False, True):
        if multi:
            monkeypatch.setattr(layerwise.Step, "sweep", _multi_pass_sweep)
        m = tiny_llama(layers=3)
        compress(m, Recipe.from_dict({"stages": [stage]}), calib)
        runs.append(m.state_dict())
    assert all(torch.equal(runs[0][k], runs[1][k]) for k in runs[0])


def test_calib_dtype_is_checked():
    with pytest.raises(UserError, match=r"quantize.calib_dtype must be one of \['auto', 'float32', 'bfloat16'\], got 'fp8'"):
        Recipe.from_dict({"stages": [{"quantize": {"calib_dtype": "fp8"}}]})


def test_auto_calib_dtype_is_bf16_only_for_float32_models_on_native_bf16_devices():
    cpu = torch.device("cpu")
    m = tiny_llama()
    assert layerwise.autocast_dtype("auto", m, cpu) == (torch.bfloat16 if layerwise.fast_bf16(cpu) else None)
    assert layerwise.autocast_dtype("auto", tiny_llama(dtype=torch.bfloat16), cpu) is None
    assert layerwise.autocast_dtype("float32", m, cpu) is None
    assert layerwise.autocast_dtype("bfloat16", m, cpu) is torch.bfloat16


def test_over_the_sweep_budget_every_layer_takes_the_multi_pass_path(one_thread, monkeypatch):
    """sweep_budget: beyond it no layer parks its batches (the multi-pass path, one copy of the activations);
    the very same weights either way."""
    calib = correlated_calib(n=20)
    swept = []
    sweep = layerwise.Step.sweep
    monkeypatch.setattr(layerwise.Step, "sweep", lambda self, *a: swept.append(self.index) or sweep(self, *a))
    states = []
    for budget in (layerwise.SWEEP_BUDGET, 0):
        monkeypatch.setattr(layerwise, "SWEEP_BUDGET", budget)
        m = tiny_llama(layers=3)
        __import__("modelpress").compress(
            m, Recipe.from_dict({"stages": [{"quantize": {"method": "gptq", "bits": 3, "group_size": 16}}]}), calib)
        states.append(m.state_dict())
    assert swept == [1, 2]                                # only under the default budget
    assert all(torch.equal(states[0][k], states[1][k]) for k in states[0])
