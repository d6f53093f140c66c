"""Sound dual interval propagation of an original MLP f and its compressed copy g over an input box.

SimCert (arXiv 2603.14818) pairs sampled bounds with a deterministic part for small networks: the
guaranteed range R of the per-sample discrepancy d(x) = max_i |f_i(x) - g_i(x)| over the input box B,
which feeds the range of the empirical Bernstein bound (and decides the certificate outright when
R <= eps).

The difference is propagated *jointly*, not as [f] - [g]:
- Joint network on the state (a_g, D) with D = a_f - a_g (differential verification, cf. ReluDiff /
  NeuroDiff, Paulsen et al. 2020):  z_g' = W_g a_g + b_g,  Dz' = W_f D + (W_f - W_g) a_g + (b_f - b_g),
  which is exact and linear. When g == f the difference rows are zero and the bound is exactly 0.
- ReLU of the difference, D' = relu(z_f) - relu(z_g), is 1-Lipschitz and monotone, so per unit
  min(0, Dz) <= D' <= max(0, Dz), tightened by the stability of each side:
  f active (l_f >= 0): D' <= Dz;  g active: D' >= Dz;  f inactive (u_f <= 0): D' <= 0;
  g inactive: D' >= 0; otherwise the chords of max(0, .) / min(0, .) over [l_D, u_D].
- Linear bounds are back-substituted to the input (CROWN, Zhang et al. 2018, arXiv 1811.00866) and
  concretized over B; every pre-activation bound is intersected with a joint interval (IBP) pass and
  with the identities z_f = z_g + Dz.

Convolutional networks: nn.Conv2d, nn.AvgPool2d and nn.Flatten are linear maps of the flattened
(C, H, W) input, so `mlp_blocks(net, input_shape)` turns each into an exact dense affine block (its matrix
is the layer applied to the identity basis; C-major order, as nn.Flatten reads it) and the propagation
above applies unchanged: Conv2d + ReLU + AvgPool2d / Flatten + Linear nets are bounded as soundly as
MLPs. Max pooling is not linear and is refused (it would need its own relaxation). The dense blocks cost
(C*H*W)^2 memory per layer: small images only.

Pruned units (zero rows/columns) and quantized weights (any values) need no special case: the
propagation is exact for whatever weights the layers hold. Arithmetic is float64; `fp_pad` widens the
final bounds to cover float32 evaluation of the nets (no widening when f and g hold identical weights,
whose float evaluations are bitwise identical).
"""
from __future__ import annotations

import copy
from dataclasses import dataclass

import torch
from torch import nn

from modelpress.errors import UserError

Block = tuple[torch.Tensor, torch.Tensor, bool]  # W (out, in), b (out,), relu after?
Relax = tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]  # al, bl, au, bu: al z + bl <= a <= au z + bu


def _leaves(net: nn.Module) -> list[nn.Module]:
    if isinstance(net, nn.Sequential):
        return [m for sub in net for m in _leaves(sub)]
    return [net]


def _dense_linear_map(m: nn.Module, shape: tuple[int, ...]) -> tuple[torch.Tensor, torch.Tensor, tuple[int, ...]]:
    """A linear spatial layer (Conv2d / AvgPool2d) on inputs of `shape` (C, H, W) as an exact dense affine
    map of the flattened input: (W (out_numel, in_numel), b (out_numel,), output shape)."""
    n = 1
    for d in shape:
        n *= d
    m64 = copy.deepcopy(m).to(torch.float64).cpu()
    with torch.no_grad():
        zero = m64(torch.zeros((1, *shape), dtype=torch.float64))                 # (1, C', H', W'): the bias
        basis = m64(torch.eye(n, dtype=torch.float64).reshape(n, *shape))        # (n, C', H', W')
    b = zero.reshape(-1)
    W = (basis.reshape(n, -1) - b[None, :]).T.contiguous()                       # (out_numel, n)
    return W, b, tuple(zero.shape[1:])


def mlp_blocks(net: nn.Module, input_shape: tuple[int, ...] | None = None) -> list[Block]:
    """nn.Sequential of nn.Linear / nn.ReLU (Identity, Dropout, Flatten ignored) -> [(W, b, relu)] in float64.
    With `input_shape` (C, H, W) it also takes nn.Conv2d and nn.AvgPool2d (exact dense blocks over the
    flattened input, see the module docstring); the input box is then the flattened image.

    Also takes a module computing `self.net((x - self.center) / self.scale)` (the tabular MLPStudent):
    the input normalisation becomes an exact diagonal affine block."""
    blocks: list[list] = []
    shape = tuple(int(d) for d in input_shape) if input_shape is not None else None
    inner = getattr(net, "net", None)
    if not isinstance(net, nn.Sequential) and isinstance(inner, nn.Sequential) and \
            isinstance(getattr(net, "center", None), torch.Tensor) and isinstance(getattr(net, "scale", None), torch.Tensor):
        c = net.center.detach().to(torch.float64).cpu().reshape(-1)
        s = net.scale.detach().to(torch.float64).cpu().reshape(-1)
        blocks.append([torch.diag(1.0 / s), -c / s, False])
        net = inner
    for m in _leaves(net):
        if isinstance(m, nn.Linear):
            w = m.weight.detach().to(torch.float64).cpu()
            b = (m.bias.detach().to(torch.float64).cpu() if m.bias is not None
                 else torch.zeros(w.shape[0], dtype=torch.float64))
            if blocks and blocks[-1][0].shape[0] != w.shape[1]:
                raise UserError(f"layer shapes do not chain: {blocks[-1][0].shape[0]} -> Linear({w.shape[1]}, ...)")
            blocks.append([w, b, False])
        elif isinstance(m, (nn.Conv2d, nn.AvgPool2d)):
            if shape is None or len(shape) != 3:
                raise UserError(f"interval propagation through {type(m).__name__} needs the input shape: pass "
                                f"input_shape=(channels, height, width), got {input_shape!r}")
            w, b, shape = _dense_linear_map(m, shape)
            if blocks and blocks[-1][0].shape[0] != w.shape[1]:
                raise UserError(f"layer shapes do not chain: {blocks[-1][0].shape[0]} -> {type(m).__name__} "
                                f"over {w.shape[1]} inputs")
            blocks.append([w, b, False])
            continue
        elif isinstance(m, nn.ReLU):
            if not blocks or blocks[-1][2]:
                raise UserError("interval propagation needs each nn.ReLU to follow an nn.Linear")
            blocks[-1][2] = True
        elif isinstance(m, nn.Flatten):
            if shape is not None:
                n = 1
                for d in shape:
                    n *= d
                shape = (n,)
            continue
        elif isinstance(m, (nn.Identity, nn.Dropout)):
            continue
        else:
            raise UserError(f"interval propagation supports nn.Sequential of nn.Linear, nn.Conv2d, nn.AvgPool2d, "
                            f"nn.Flatten and nn.ReLU; got {type(m).__name__}: rewrite the net as such a Sequential")
    if not blocks:
        raise UserError("interval propagation needs at least one nn.Linear")
    return [tuple(b) for b in blocks]


def _relu_relax(l: torch.Tensor, u: torch.Tensor) -> Relax:
    """CROWN relaxation of relu(z), z in [l, u]: upper chord, lower slope 0 or 1 (adaptive)."""
    active, inactive = l >= 0, u <= 0
    unstable = ~(active | inactive)
    den = torch.where(unstable, u - l, torch.ones_like(u))
    au = torch.where(active, 1.0, torch.where(unstable, u / den, 0.0))
    bu = torch.where(unstable, -l * u / den, 0.0)
    al = torch.where(active, 1.0, torch.where(unstable & (u >= -l), 1.0, 0.0))
    return al.double(), torch.zeros_like(l), au.double(), bu


def _diff_relax(lf, uf, lg, ug, ld, ud) -> Relax:
    """Linear bounds on D' = relu(z_f) - relu(z_g) in terms of Dz = z_f - z_g (see module docstring)."""
    zero, one = torch.zeros_like(ld), torch.ones_like(ld)
    cross = (ld < 0) & (ud > 0)
    den = torch.where(cross, ud - ld, one)
    # upper: max(0, Dz) <= chord; Dz if ld >= 0; 0 if ud <= 0
    au = torch.where(ld >= 0, one, torch.where(cross, ud / den, zero))
    bu = torch.where(cross, -ld * ud / den, zero)
    # lower: min(0, Dz) >= chord; Dz if ud <= 0; 0 if ld >= 0
    al = torch.where(ud <= 0, one, torch.where(cross, -ld / den, zero))
    bl = torch.where(cross, ld * ud / den, zero)
    # stability of either side gives exact one-sided forms
    f_act, f_off, g_act, g_off = lf >= 0, uf <= 0, lg >= 0, ug <= 0
    au = torch.where(f_act, one, torch.where(f_off, zero, au))
    bu = torch.where(f_act | f_off, zero, bu)
    al = torch.where(g_act, one, torch.where(g_off, zero, al))
    bl = torch.where(g_act | g_off, zero, bl)
    return al, bl, au, bu


def _identity_relax(n: int) -> Relax:
    one, zero = torch.ones(n, dtype=torch.float64), torch.zeros(n, dtype=torch.float64)
    return one, zero, one, zero


def _crown_upper(A: torch.Tensor, c: torch.Tensor, Ms: list[torch.Tensor], cs: list[torch.Tensor],
                 relax: list[Relax], xc: torch.Tensor, xr: torch.Tensor) -> torch.Tensor:
    """Upper bound of A z_k + c over the box (xc +- xr); z_j = Ms[j] a_{j-1} + cs[j], a_j relaxed by relax[j].

    A: (p, n_k) with k = len(Ms) - 1. Returns (p,)."""
    for j in range(len(Ms) - 1, -1, -1):
        c = c + A @ cs[j]
        A = A @ Ms[j]  # (p, n_{j-1}): coefficients on a_{j-1} (the input when j == 0)
        if j == 0:
            break
        al, bl, au, bu = relax[j - 1]
        Ap, An = A.clamp(min=0), A.clamp(max=0)
        c = c + Ap @ bu + An @ bl
        A = Ap * au + An * al
    return c + A @ xc + A.abs() @ xr


def _crown(Ms, cs, relax, xc, xr) -> tuple[torch.Tensor, torch.Tensor]:
    n = Ms[-1].shape[0]
    eye, zero = torch.eye(n, dtype=torch.float64), torch.zeros(n, dtype=torch.float64)
    up = _crown_upper(eye, zero, Ms, cs, relax, xc, xr)
    lo = -_crown_upper(-eye, zero, Ms, cs, relax, xc, xr)
    return lo, up


def _affine_interval(W: torch.Tensor, lo: torch.Tensor, hi: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    c, r = (lo + hi) / 2, (hi - lo) / 2
    mid, rad = W @ c, W.abs() @ r
    return mid - rad, mid + rad


@dataclass
class DualBounds:
    """Sound bounds over the box, per output unit: f(x) in [f_lo, f_hi], g(x) in [g_lo, g_hi],
    f(x) - g(x) in [d_lo, d_hi]."""
    f_lo: torch.Tensor
    f_hi: torch.Tensor
    g_lo: torch.Tensor
    g_hi: torch.Tensor
    d_lo: torch.Tensor
    d_hi: torch.Tensor

    @property
    def linf_range(self) -> float:
        """R with max_i |f_i(x) - g_i(x)| in [0, R] for every x in the box."""
        return float(torch.maximum(self.d_lo.abs(), self.d_hi.abs()).max())


def _check_box(lo, hi, d_in: int) -> tuple[torch.Tensor, torch.Tensor]:
    lo = torch.as_tensor(lo, dtype=torch.float64).reshape(-1)
    hi = torch.as_tensor(hi, dtype=torch.float64).reshape(-1)
    if lo.shape != (d_in,) or hi.shape != (d_in,):
        raise UserError(f"input box has {lo.numel()}/{hi.numel()} bounds but the net takes {d_in} inputs")
    if not (torch.isfinite(lo).all() and torch.isfinite(hi).all()) or (lo > hi).any():
        raise UserError("input box is invalid: need finite lo <= hi for every input feature")
    return lo, hi


def single_bounds(net: nn.Module, lo, hi, input_shape: tuple[int, ...] | None = None
                  ) -> tuple[torch.Tensor, torch.Tensor]:
    """CROWN bounds on net(x) over the box (one net, no difference)."""
    blocks = mlp_blocks(net, input_shape)
    lo, hi = _check_box(lo, hi, blocks[0][0].shape[1])
    xc, xr = (lo + hi) / 2, (hi - lo) / 2
    Ms, cs, relax = [], [], []
    for k, (W, b, relu) in enumerate(blocks):
        Ms.append(W)
        cs.append(b)
        l, u = _crown(Ms, cs, relax, xc, xr)
        if relu:
            relax.append(_relu_relax(l, u))
        else:
            relax.append(_identity_relax(W.shape[0]))
    return l, u


def naive_difference_bounds(f: nn.Module, g: nn.Module, lo, hi, input_shape: tuple[int, ...] | None = None
                            ) -> tuple[torch.Tensor, torch.Tensor]:
    """[f] - [g] from independent bounds: the baseline the joint propagation improves on."""
    fl, fu = single_bounds(f, lo, hi, input_shape)
    gl, gu = single_bounds(g, lo, hi, input_shape)
    return fl - gu, fu - gl


def dual_bounds(f: nn.Module, g: nn.Module, lo, hi, fp_pad: float = 1e-5,
                input_shape: tuple[int, ...] | None = None) -> DualBounds:
    """Joint bounds on f, g and f - g over the box [lo, hi] (see module docstring); `input_shape` (C, H, W)
    for convolutional nets, whose box is the flattened image."""
    F, G = mlp_blocks(f, input_shape), mlp_blocks(g, input_shape)
    if len(F) != len(G) or any(a[0].shape != b[0].shape or a[2] != b[2] for a, b in zip(F, G)):
        raise UserError("original and compressed nets differ in layer shapes: dual propagation needs the same "
                        "architecture (prune by zeroing weights, not by removing units)")
    lo, hi = _check_box(lo, hi, F[0][0].shape[1])
    d_in = lo.numel()
    xc, xr = (lo + hi) / 2, (hi - lo) / 2
    # joint network on s = (a_g, D); its input is (x, 0)
    sc = torch.cat([xc, torch.zeros(d_in, dtype=torch.float64)])
    sr = torch.cat([xr, torch.zeros(d_in, dtype=torch.float64)])
    Mf, cf, rf = [], [], []
    Ms, cs, rs = [], [], []
    # IBP state: intervals of a_f, a_g, D
    af_l, af_u, ag_l, ag_u = lo, hi, lo, hi
    D_l = D_u = torch.zeros(d_in, dtype=torch.float64)
    identical = True
    for (Wf, bf, relu), (Wg, bg, _) in zip(F, G):
        dW, db = Wf - Wg, bf - bg  # (n, m), (n,)
        identical = identical and bool((dW == 0).all() and (db == 0).all())
        n = Wf.shape[0]
        Mf.append(Wf)
        cf.append(bf)
        Ms.append(torch.cat([torch.cat([Wg, torch.zeros_like(Wg)], 1), torch.cat([dW, Wf], 1)], 0))  # (2n, 2m)
        cs.append(torch.cat([bg, db]))
        lf, uf = _crown(Mf, cf, rf, xc, xr)
        ls, us = _crown(Ms, cs, rs, sc, sr)
        lg, ug, ld, ud = ls[:n], us[:n], ls[n:], us[n:]
        # joint IBP pass (ReluDiff style) and intersections
        il, iu = _affine_interval(Wf, af_l, af_u)
        lf, uf = torch.maximum(lf, il + bf), torch.minimum(uf, iu + bf)
        il, iu = _affine_interval(Wg, ag_l, ag_u)
        lg, ug = torch.maximum(lg, il + bg), torch.minimum(ug, iu + bg)
        p_l, p_u = _affine_interval(Wf, D_l, D_u)
        q_l, q_u = _affine_interval(dW, ag_l, ag_u)
        r_l, r_u = _affine_interval(Wg, D_l, D_u)
        s_l, s_u = _affine_interval(dW, af_l, af_u)
        ld = torch.maximum(ld, torch.maximum(p_l + q_l, r_l + s_l) + db)
        ud = torch.minimum(ud, torch.minimum(p_u + q_u, r_u + s_u) + db)
        lf, uf = torch.maximum(lf, lg + ld), torch.minimum(uf, ug + ud)
        lg, ug = torch.maximum(lg, lf - ud), torch.minimum(ug, uf - ld)
        ld, ud = torch.maximum(ld, lf - ug), torch.minimum(ud, uf - lg)
        if relu:
            rf.append(_relu_relax(lf, uf))
            g_rel, d_rel = _relu_relax(lg, ug), _diff_relax(lf, uf, lg, ug, ld, ud)
            rs.append(tuple(torch.cat([x, y]) for x, y in zip(g_rel, d_rel)))
            # IBP of D' = relu(z_f) - relu(z_g)
            Dl = torch.where(lg >= 0, ld, torch.where(ug <= 0, 0.0, torch.clamp(ld, max=0))).double()
            Du = torch.where(lf >= 0, ud, torch.where(uf <= 0, 0.0, torch.clamp(ud, min=0))).double()
            D_l = torch.maximum(Dl, lf.clamp(min=0) - ug.clamp(min=0))
            D_u = torch.minimum(Du, uf.clamp(min=0) - lg.clamp(min=0))
            af_l, af_u, ag_l, ag_u = lf.clamp(min=0), uf.clamp(min=0), lg.clamp(min=0), ug.clamp(min=0)
        else:
            rf.append(_identity_relax(n))
            rs.append(_identity_relax(2 * n))
            af_l, af_u, ag_l, ag_u, D_l, D_u = lf, uf, lg, ug, ld, ud
    scale = 1.0 + float(torch.cat([lf.abs(), uf.abs(), lg.abs(), ug.abs()]).max())
    pf = fp_pad * scale
    pd = 0.0 if identical else pf
    return DualBounds(lf - pf, uf + pf, lg - pf, ug + pf, ld - pd, ud + pd)


def dual_bounds_split(f: nn.Module, g: nn.Module, lo, hi, max_boxes: int = 64,
                      fp_pad: float = 1e-5, input_shape: tuple[int, ...] | None = None) -> tuple[DualBounds, int]:
    """Best-first input splitting: bisect the sub-box with the largest R along its widest (weighted)
    feature until `max_boxes` leaves; the union of the leaves is the box, so the elementwise
    min/max of their bounds is sound. Returns (bounds, leaves used)."""
    if max_boxes < 1:
        raise UserError(f"max_boxes={max_boxes} is out of range: use an integer >= 1")
    F0, G0 = mlp_blocks(f, input_shape)[0][0], mlp_blocks(g, input_shape)[0][0]
    lo, hi = _check_box(lo, hi, F0.shape[1])
    w_in = F0.abs().sum(0) + G0.abs().sum(0)  # (d_in,) input sensitivity
    leaves = [(lo, hi, dual_bounds(f, g, lo, hi, fp_pad, input_shape))]
    while len(leaves) < max_boxes:
        i = max(range(len(leaves)), key=lambda j: leaves[j][2].linf_range)
        l, h, b = leaves[i]
        if b.linf_range == 0.0:
            break
        k = int(torch.argmax((h - l) * w_in))
        mid = (l[k] + h[k]) / 2
        h1, l2 = h.clone(), l.clone()
        h1[k], l2[k] = mid, mid
        leaves[i:i + 1] = [(l, h1, dual_bounds(f, g, l, h1, fp_pad, input_shape)),
                           (l2, h, dual_bounds(f, g, l2, h, fp_pad, input_shape))]
    bs = [b for _, _, b in leaves]

    def agg(name, op):
        return op(torch.stack([getattr(b, name) for b in bs]), 0).values
    out = DualBounds(agg("f_lo", torch.min), agg("f_hi", torch.max), agg("g_lo", torch.min),
                     agg("g_hi", torch.max), agg("d_lo", torch.min), agg("d_hi", torch.max))
    return out, len(leaves)


def guaranteed_range(f: nn.Module, g: nn.Module, lo, hi, max_boxes: int = 1,
                     input_shape: tuple[int, ...] | None = None) -> tuple[float, float]:
    """(0, R): the range of d(x) = max_i |f_i(x) - g_i(x)| over the box, for the Bernstein bound."""
    if max_boxes == 1:
        return 0.0, dual_bounds(f, g, lo, hi, input_shape=input_shape).linf_range
    return 0.0, dual_bounds_split(f, g, lo, hi, max_boxes, input_shape=input_shape)[0].linf_range
