"""Soundness and tightness of the dual interval propagation (modelpress/certify/interval.py)."""
import copy

import pytest
import torch
from torch import nn

from modelpress.certify import interval as I
from modelpress.errors import UserError


def _mlp(seed: int, dims=(6, 32, 32, 3)) -> nn.Sequential:
    torch.manual_seed(seed)
    layers = []
    for i in range(len(dims) - 1):
        layers.append(nn.Linear(dims[i], dims[i + 1]))
        if i < len(dims) - 2:
            layers.append(nn.ReLU())
    return nn.Sequential(*layers).eval()


def _compress(f: nn.Sequential, step: float, sparsity: float) -> nn.Sequential:
    """Direct tensor edits: round weights to a grid of `step`, zero the smallest |w| and one hidden unit."""
    g = copy.deepcopy(f)
    with torch.no_grad():
        for m in g:
            if isinstance(m, nn.Linear):
                w = m.weight
                k = int(sparsity * w.numel())
                if k:
                    thr = w.abs().flatten().kthvalue(k).values
                    w[w.abs() <= thr] = 0.0
                w.copy_(torch.round(w / step) * step)
        g[0].weight[3].zero_()  # a pruned unit
        g[0].bias[3] = 0.0
    return g


def _sample(f, g, lo, hi, n=4000, seed=0):
    gen = torch.Generator().manual_seed(seed)
    x = lo + (hi - lo) * torch.rand(n, lo.numel(), generator=gen)
    # include the corners of a few random faces too
    corners = torch.where(torch.rand(200, lo.numel(), generator=gen) < 0.5, lo, hi)
    x = torch.cat([x, corners]).float()
    with torch.no_grad():
        return f(x).double(), g(x).double()


@pytest.mark.parametrize("step,sparsity,width", [(0.02, 0.3, 1.0), (0.1, 0.6, 0.5), (0.005, 0.0, 2.0)])
def test_sampled_outputs_and_differences_lie_inside_the_bounds(step, sparsity, width):
    f = _mlp(0)
    g = _compress(f, step, sparsity)
    lo, hi = -width * torch.ones(6), width * torch.linspace(0.5, 1.5, 6)
    b = I.dual_bounds(f, g, lo, hi)
    yf, yg = _sample(f, g, lo, hi)
    d = yf - yg
    assert (yf >= b.f_lo).all() and (yf <= b.f_hi).all()
    assert (yg >= b.g_lo).all() and (yg <= b.g_hi).all()
    assert (d >= b.d_lo).all() and (d <= b.d_hi).all()
    assert d.abs().max(1).values.max() <= b.linf_range
    # not vacuous: the bound is within a modest factor of the largest sampled gap
    assert b.linf_range <= 10 * d.abs().max().item()


def test_identical_nets_give_a_zero_difference_bound():
    f = _mlp(1)
    g = copy.deepcopy(f)
    b = I.dual_bounds(f, g, -torch.ones(6), torch.ones(6))
    assert torch.equal(b.d_lo, torch.zeros(3)) and torch.equal(b.d_hi, torch.zeros(3))
    assert I.guaranteed_range(f, g, -torch.ones(6), torch.ones(6)) == (0.0, 0.0)
    # the independent-interval baseline cannot see this
    nl, nu = I.naive_difference_bounds(f, g, -torch.ones(6), torch.ones(6))
    assert (nu - nl).min() > 0.1


def test_joint_difference_is_much_tighter_than_independent_intervals():
    f = _mlp(2)
    g = _compress(f, 0.01, 0.0)
    lo, hi = -torch.ones(6), torch.ones(6)
    b = I.dual_bounds(f, g, lo, hi)
    nl, nu = I.naive_difference_bounds(f, g, lo, hi)
    joint = (b.d_hi - b.d_lo).max().item()
    naive = (nu - nl).max().item()
    assert joint < naive / 5


def test_input_splitting_is_sound_and_tightens_the_range():
    f = _mlp(3)
    g = _compress(f, 0.05, 0.3)
    lo, hi = -torch.ones(6), torch.ones(6)
    one = I.dual_bounds(f, g, lo, hi)
    split, leaves = I.dual_bounds_split(f, g, lo, hi, max_boxes=12)
    assert leaves == 12
    assert split.linf_range < 0.8 * one.linf_range
    assert (split.d_lo >= one.d_lo - 1e-12).all() and (split.d_hi <= one.d_hi + 1e-12).all()
    yf, yg = _sample(f, g, lo, hi, seed=1)
    d = yf - yg
    assert (d >= split.d_lo).all() and (d <= split.d_hi).all()


def test_single_net_bounds_are_sound_and_exact_for_a_linear_net():
    lin = nn.Sequential(nn.Linear(4, 2)).eval()
    lo, hi = -torch.ones(4), 2 * torch.ones(4)
    l, u = I.single_bounds(lin, lo, hi)
    W, b = lin[0].weight.double().detach(), lin[0].bias.double().detach()
    exact_u = b + W.clamp(min=0) @ hi.double() + W.clamp(max=0) @ lo.double()
    assert torch.allclose(u, exact_u, atol=1e-12)


def test_unsupported_layers_and_shapes_are_refused():
    with pytest.raises(UserError, match="Tanh"):
        I.mlp_blocks(nn.Sequential(nn.Linear(3, 3), nn.Tanh()))
    with pytest.raises(UserError, match="same"):
        I.dual_bounds(_mlp(0), _mlp(0, dims=(6, 16, 3)), -torch.ones(6), torch.ones(6))
    with pytest.raises(UserError, match="box"):
        I.dual_bounds(_mlp(0), _mlp(0), torch.ones(6), -torch.ones(6))


def test_tabular_student_with_input_normalisation():
    student = pytest.importorskip("modelpress.tabular.student")
    import numpy as np
    torch.manual_seed(4)
    f = student.MLPStudent(5, 3, (16, 16), center=np.linspace(-1, 1, 5), scale=np.linspace(0.5, 2, 5)).eval()
    g = copy.deepcopy(f)
    with torch.no_grad():
        for m in g.net:
            if isinstance(m, nn.Linear):
                m.weight.copy_(torch.round(m.weight / 0.03) * 0.03)
    lo, hi = -3 * torch.ones(5), 3 * torch.ones(5)
    b = I.dual_bounds(f, g, lo, hi)
    yf, yg = _sample(f, g, lo, hi, seed=2)
    assert (yf >= b.f_lo).all() and (yf <= b.f_hi).all()
    assert ((yf - yg) >= b.d_lo).all() and ((yf - yg) <= b.d_hi).all()
    assert 0 < b.linf_range <= 10 * (yf - yg).abs().max().item()


def _cnn(seed: int) -> nn.Sequential:
    """Conv2d + ReLU + AvgPool2d + Conv2d (strided) + ReLU + Flatten + Linear + ReLU + Linear on 2x6x6 images."""
    torch.manual_seed(seed)
    return nn.Sequential(nn.Conv2d(2, 4, 3, padding=1), nn.ReLU(), nn.AvgPool2d(2),
                         nn.Conv2d(4, 3, 2, stride=1), nn.ReLU(), nn.Flatten(),
                         nn.Linear(3 * 2 * 2, 8), nn.ReLU(), nn.Linear(8, 3)).eval()


def _compress_cnn(f: nn.Sequential, step: float) -> nn.Sequential:
    g = copy.deepcopy(f)
    with torch.no_grad():
        for m in g:
            if isinstance(m, (nn.Conv2d, nn.Linear)):
                m.weight.copy_(torch.round(m.weight / step) * step)
        g[0].weight[1].zero_()            # a pruned filter
    return g


def test_conv_blocks_are_exact_dense_maps():
    f = _cnn(0)
    blocks = I.mlp_blocks(f, (2, 6, 6))
    assert [b[0].shape for b in blocks] == [(144, 72), (36, 144), (12, 36), (8, 12), (3, 8)]
    assert [b[2] for b in blocks] == [True, False, True, True, False]
    x = torch.randn(5, 2, 6, 6, dtype=torch.float64)
    a = x.reshape(5, -1)
    for W, b, relu in blocks:
        a = a @ W.T + b
        a = a.clamp(min=0) if relu else a
    with torch.no_grad():
        ref = copy.deepcopy(f).double()(x)
    torch.testing.assert_close(a, ref)
    with pytest.raises(UserError, match="input_shape"):
        I.mlp_blocks(f)
    with pytest.raises(UserError, match="MaxPool2d"):
        I.mlp_blocks(nn.Sequential(nn.Conv2d(1, 1, 3), nn.MaxPool2d(2)), (1, 6, 6))


@pytest.mark.parametrize("step,width", [(0.05, 0.5), (0.01, 1.0)])
def test_conv_bounds_contain_sampled_outputs(step, width):
    f = _cnn(1)
    g = _compress_cnn(f, step)
    shape = (2, 6, 6)
    gen = torch.Generator().manual_seed(0)
    centre = torch.rand(72, generator=gen, dtype=torch.float64)
    lo, hi = centre - width / 2, centre + width / 2
    b = I.dual_bounds(f, g, lo, hi, input_shape=shape)
    x = lo + (hi - lo) * torch.rand(3000, 72, generator=gen, dtype=torch.float64)
    x = torch.cat([x, torch.where(torch.rand(200, 72, generator=gen) < 0.5, lo, hi)]).float()
    with torch.no_grad():
        fx, gx = f(x.reshape(-1, *shape)).double(), g(x.reshape(-1, *shape)).double()
    assert (fx >= b.f_lo).all() and (fx <= b.f_hi).all()
    assert (gx >= b.g_lo).all() and (gx <= b.g_hi).all()
    d = fx - gx
    assert (d >= b.d_lo).all() and (d <= b.d_hi).all()
    assert float(d.abs().max()) > 0                      # the compression changed the outputs
    # the joint propagation beats [f] - [g] and splitting is still sound and no looser
    nl, nu = I.naive_difference_bounds(f, g, lo, hi, shape)
    assert b.linf_range < float(torch.maximum(nl.abs(), nu.abs()).max())
    split, _ = I.dual_bounds_split(f, g, lo, hi, max_boxes=4, input_shape=shape)
    assert split.linf_range <= b.linf_range + 1e-12
    assert (d >= split.d_lo).all() and (d <= split.d_hi).all()
    # identical nets: the difference bound is exactly zero
    assert I.guaranteed_range(f, copy.deepcopy(f), lo, hi, input_shape=shape) == (0.0, 0.0)


def test_certify_mlp_takes_a_conv_net():
    from modelpress.certify import certificate as C
    f = _cnn(2)
    g = _compress_cnn(f, 0.05)
    gen = torch.Generator().manual_seed(1)
    lo, hi = torch.zeros(72), torch.ones(72)
    X = torch.rand(200, 72, generator=gen)
    cert = C.certify_mlp(f, g, X, lo, hi, eps=0.5, delta=0.05, stat="mean", input_shape=(2, 6, 6))
    R = cert.deterministic["R"]
    with torch.no_grad():
        d = (f(X.reshape(-1, 2, 6, 6)) - g(X.reshape(-1, 2, 6, 6))).abs().amax(1)
    assert float(d.max()) <= R and cert.range == [0.0, R]
    assert cert.observed == pytest.approx(float(d.double().mean()), rel=1e-6)
