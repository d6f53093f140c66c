"""ZipGEMM kernels (modelpress.kernels.zip_gemm): correctness in Triton's CPU interpreter, argument checks,
an ahead-of-time sm_90 compile (lowering errors the interpreter cannot see, registers, spills, occupancy,
SASS per weight), and the launch arithmetic. The interpreter runs in a subprocess: TRITON_INTERPRET must
be set before triton is imported."""
from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap

import numpy as np
import pytest
import torch

from modelpress.algos import lossless as LL
from modelpress.errors import UserError
from modelpress.kernels import zip_gemm as ZG

needs_triton = pytest.mark.skipif(not ZG.triton_available(), reason="triton not installed")

_PRELUDE = textwrap.dedent("""
    import json, numpy as np, torch
    from modelpress.algos import lossless as LL
    from modelpress.kernels import zip_gemm as ZG
    torch.set_num_threads(1)
    SPECIALS = [0x0000, 0x8000, 0x0001, 0x807F, 0x0040, 0x7F80, 0xFF80, 0x7FC0, 0x7F81, 0xFFFF, 0x7FFF, 0x7F7F,
                0x0080, 0x3F80]
    def args(e):                                                # the kernels' device layout
        h, f = ZG.device_layout(e.bitmaps, e.hi, e.fallback)
        return (torch.from_numpy(e.bitmaps.view(np.int64)), torch.from_numpy(h), torch.from_numpy(f),
                torch.from_numpy(e.block_offsets), torch.from_numpy(e.sub_offsets), e.e0)
    def weight(rows, cols, seed, mode):
        g = torch.Generator().manual_seed(seed)
        w = (torch.randn(rows, cols, generator=g) * 0.02).bfloat16()
        u = w.view(torch.int16).reshape(-1)
        if mode == "random16":                                  # every bit pattern: most tiles all-fallback
            u[:] = torch.randint(-2 ** 15, 2 ** 15, (u.numel(),), generator=g, dtype=torch.int16)
        elif mode == "specials":                                # NaN payloads, +-Inf, subnormals, -0
            k = min(len(SPECIALS), u.numel())
            u[:k] = torch.tensor(np.array(SPECIALS[:k], dtype=np.uint16).view(np.int16))
        elif mode == "finite-specials":                         # subnormals, -0, 2**63, min normal
            sp = [0x8000, 0x0001, 0x807F, 0x0040, 0x5F00, 0x0080, 0x0000]
            u[:: max(1, u.numel() // 7)][: len(sp)] = torch.tensor(np.array(sp, dtype=np.uint16).view(np.int16))[
                : len(u[:: max(1, u.numel() // 7)])]
        elif mode == "top":                                     # window at the top: in-window Inf and NaN
            u[:] = (u & -0x7F81) | (torch.randint(249, 256, (u.numel(),), generator=g, dtype=torch.int16) << 7)
        elif mode == "wide":                                    # out-of-window exponents (2**-67..2**63)
            far = torch.rand(u.numel(), generator=g) < 0.3
            u[far] = (u[far] & -0x7F81) | (torch.randint(60, 190, (int(far.sum()),), generator=g,
                                                          dtype=torch.int16) << 7)
        return w
    out = {}
    """)


def _interpret(body: str, timeout: int = 240) -> dict:
    env = {**os.environ, "TRITON_INTERPRET": "1", "OMP_NUM_THREADS": "1"}
    run = subprocess.run([sys.executable, "-c", _PRELUDE + textwrap.dedent(body) + "\nprint(json.dumps(out))"],
                         check=False, capture_output=True, text=True, env=env, timeout=timeout,
                         cwd=os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    assert run.returncode == 0, run.stderr[-3000:]
    return json.loads(run.stdout.strip().splitlines()[-1])


@needs_triton
def test_decompress_bit_exact_in_interpreter():
    """Every legal input decodes bit-exactly: odd shapes, all-fallback tiles, NaN payloads, +-Inf,
    subnormals, -0, an fp16 blob of the old format, a hi stream whose length is not a multiple of 4."""
    out = _interpret("""
        cases = [((1, 1), "gauss"), ((70, 130), "specials"), ((130, 200), "random16"), ((64, 64), "wide"),
                 ((65, 129), "gauss"), ((64, 197), "finite-specials")]
        for (r, c), mode in cases:
            w = weight(r, c, r * 1000 + c, mode)
            e = LL.tca_tbe_encode(w)
            d = ZG.decompress_triton(*args(e), e.shape, e.padded)
            out[f"{r}x{c}-{mode}"] = [bool(torch.equal(d.view(torch.int16), w.view(torch.int16))), int(e.hi.size % 4),
                                      int(e.fallback.size)]
        h = weight(70, 90, 5, "specials").view(torch.int16).view(torch.float16)
        e = LL._tca_tbe_encode(h)
        d = ZG.decompress_triton(*args(e), e.shape, e.padded, dtype=torch.float16)
        out["fp16-legacy"] = [bool(torch.equal(d.view(torch.int16), h.view(torch.int16))), 0, 0]
        """)
    assert all(v[0] for v in out.values()), out
    assert any(v[1] for v in out.values())                  # a hi stream not a multiple of 4 bytes
    assert out["130x200-random16"][2] > 0.9 * 130 * 200     # nearly all fallbacks


@needs_triton
def test_fused_within_one_bf16_ulp_in_interpreter():
    """Fused decode+GEMM against an fp32 reference: within one bf16 ulp (plus the fp32 accumulation
    error bound) on odd shapes, N = 1..16, with and without bias, every split-K setting; NaN/Inf
    weights give NaN/Inf where the reference does; N > 16 goes through decompress + matmul."""
    out = _interpret("""
        def check(w, N, bias, splits, seed, xscale=1.0):
            g = torch.Generator().manual_seed(seed)
            e = LL.tca_tbe_encode(w)
            M, K = w.shape
            x = (torch.randn(N, K, generator=g) * xscale).bfloat16()
            b = torch.randn(M, generator=g).bfloat16() if bias else None
            y = ZG.fused_linear_triton(x, *args(e), e.shape, e.padded, bias=b, splits=splits,
                                       weight_dtype=torch.bfloat16)
            ref = x.double() @ w.double().T + (b.double() if bias else 0)
            bound = (x.double().abs() @ w.double().abs().T) * K * 2.0 ** -24
            fin = torch.isfinite(ref)
            yd = y.double()
            m, ex = torch.frexp(ref[fin])
            ulp = torch.ldexp(torch.ones_like(m), ex - 8)        # one bf16 ulp of |ref|
            err_ok = bool(((yd[fin] - ref[fin]).abs() <= ulp + bound[fin] + 1e-30).all())
            same_special = bool(torch.equal(torch.isnan(yd), torch.isnan(ref)) and
                                torch.equal(torch.isinf(yd), torch.isinf(ref)) and
                                torch.equal(torch.sign(yd[torch.isinf(yd)]), torch.sign(ref[torch.isinf(ref)])))
            return [err_ok, same_special, y.dtype == torch.bfloat16, tuple(y.shape) == (N, M)]
        runs = [((80, 136), "gauss", 5, True, 1), ((80, 136), "gauss", 5, True, 2), ((80, 136), "gauss", 5, True, 3),
                ((80, 136), "gauss", 5, False, None), ((1, 1), "gauss", 1, True, None),
                ((130, 70), "finite-specials", 16, False, 2), ((64, 200), "wide", 3, True, 4),
                ((64, 130), "wide", 2, False, 1), ((70, 130), "specials", 4, True, 2),
                ((128, 256), "gauss", 16, True, 3)]
        for (r, c), mode, N, bias, splits in runs:
            w = weight(r, c, r + c, mode)
            out[f"{r}x{c}-{mode}-N{N}-b{int(bias)}-s{splits}"] = check(w, N, bias, splits, r * c + N)
        w = weight(64, 70, 9, "top")
        out["64x70-top-N3"] = check(w, 3, False, 1, 9, xscale=2.0 ** -100)
        w = weight(96, 130, 3, "gauss")
        e = LL.tca_tbe_encode(w)
        x = torch.randn(40, 130).bfloat16()
        y = ZG.decompress_triton(*args(e), e.shape, e.padded) @ x.T          # N > 16: ZipLinear's path
        out["N40-decompress"] = [bool(torch.equal(y, w @ x.T)), True, True, True]
        """)
    bad = {k: v for k, v in out.items() if not all(v)}
    assert not bad, bad


@needs_triton
def test_public_functions_check_their_arguments():
    w = (torch.randn(80, 136) * 0.02).bfloat16()
    e = LL.tca_tbe_encode(w)
    h, f = ZG.device_layout(e.bitmaps, e.hi, e.fallback)
    a = (torch.from_numpy(e.bitmaps.view(np.int64)), torch.from_numpy(h), torch.from_numpy(f),
         torch.from_numpy(e.block_offsets), torch.from_numpy(e.sub_offsets), e.e0)
    x = torch.randn(3, 136).bfloat16()
    bf = {"weight_dtype": torch.bfloat16}
    with pytest.raises(UserError, match="decodes bf16 weights"):
        ZG.fused_linear_triton(x, *a, e.shape, e.padded, weight_dtype=torch.float16)
    with pytest.raises(UserError, match=r"x has 100 features .* K = 136"):
        ZG.fused_linear_triton(x[:, :100], *a, e.shape, e.padded, **bf)
    with pytest.raises(UserError, match="N <= 16"):
        ZG.fused_linear_triton(torch.randn(17, 136).bfloat16(), *a, e.shape, e.padded, **bf)
    with pytest.raises(UserError, match="bf16"):
        ZG.fused_linear_triton(x.float(), *a, e.shape, e.padded, **bf)
    with pytest.raises(UserError, match="bitmaps must be"):
        ZG.fused_linear_triton(x, a[0].int(), *a[1:], e.shape, e.padded, **bf)
    with pytest.raises(UserError, match="do not match padded"):
        ZG.fused_linear_triton(x, *a, (40, 136), (64, 192), **bf)
    with pytest.raises(UserError, match="rounded up to 64"):
        ZG.fused_linear_triton(x, *a, (80, 136), (192, 192), **bf)
    with pytest.raises(UserError, match=r"bias must be .* \(80,\)"):
        ZG.fused_linear_triton(x, *a, e.shape, e.padded, bias=torch.zeros(81), **bf)
    with pytest.raises(UserError, match="splits"):
        ZG.fused_linear_triton(x, *a, e.shape, e.padded, splits=0, **bf)
    with pytest.raises(UserError, match="fallback must be"):                  # the codec's streams, not the
        ZG.decompress_triton(a[0], torch.from_numpy(e.hi), torch.from_numpy(e.fallback.view(np.int16)), *a[3:],
                             e.shape, e.padded)                                 # device layout
    with pytest.raises(UserError, match="one per weight"):
        ZG.decompress_triton(a[0], torch.from_numpy(e.hi), a[2], *a[3:], e.shape, e.padded)
    with pytest.raises(UserError, match="more than the fallback count"):       # padding cut off
        ZG.decompress_triton(a[0], a[1], a[2][: e.fallback.size + 3], *a[3:], e.shape, e.padded)
    with pytest.raises(UserError, match="dtype must be"):
        ZG.decompress_triton(*a, e.shape, e.padded, dtype=torch.float32)


def test_launch_arithmetic():
    # 128 regs x 4 warps: 16 KiB regs per warp -> 16 warps (4 CTAs); 255 regs -> 8 warps; shared memory caps
    assert ZG.resident_ctas(128, 10240, 4) == 4
    assert ZG.resident_ctas(255, 0, 4) == 2
    assert ZG.resident_ctas(32, 100 * 1024, 4) == 2
    assert ZG.resident_ctas(16, 0, 1) == 32                       # CTA limit
    assert ZG.split_k(64, 64, 132, 4) == 9                        # 64 stripes x 9 >= 528 = 132 x 4
    assert ZG.split_k(448, 64, 132, 4) == 2
    assert ZG.split_k(8, 3, 132, 4) == 3                          # never more slices than K blocks
    assert ZG.split_k(10 ** 4, 64, 132, 4) == 1


def _prmt_np(x: np.ndarray, y: np.ndarray, s: np.ndarray) -> np.ndarray:
    """PTX prmt.b32 (default mode) on uint32 arrays, selector nibbles < 8: byte n = byte s[4n:4n+3] of y:x."""
    v = (y.astype(np.uint64) << np.uint64(32)) | x.astype(np.uint64)
    out = np.zeros(np.broadcast(x, y, s).shape, dtype=np.uint64)
    for n in range(4):
        sel = (s.astype(np.uint64) >> np.uint64(4 * n)) & np.uint64(7)
        out |= ((v >> (sel * np.uint64(8))) & np.uint64(0xFF)) << np.uint64(8 * n)
    return out.astype(np.uint32)


@pytest.mark.parametrize("e0", [0, 1, 120, 249])
def test_decode_tables_build_every_group(e0):
    """The kernels' per-group arithmetic (decode_tables, PRMT, LOP3 and the device layout, re-implemented here
    in numpy on 32-bit words) gives the exact word of every element, in window and fallback, for groups of 8
    with random codes (all 256 indicator bytes among them), windows at both ends of the exponent range."""
    tab = ZG.decode_tables_np(e0).view(np.uint32)
    ex, per = tab[:3072].reshape(3, 256, 4), tab[3072:5120].reshape(256, 8)
    assert tab[5120] == 0x807F807F
    rng = np.random.default_rng(e0)
    codes = rng.integers(0, 8, size=(4096, 8))
    codes[:256] = np.where((np.arange(256)[:, None] >> np.arange(8)) & 1, codes[:256] % 7 + 1, 0)  # every mask
    h = rng.integers(0, 256, size=(4096, 8)).astype(np.uint32)                   # sign+mantissa bytes
    efb = rng.integers(0, 256, size=(4096, 8)).astype(np.uint32)                 # fallback exponents
    q = [((codes >> b) & 1) @ (1 << np.arange(8)) for b in range(3)]             # plane bytes (4096,)
    ind = q[0] | q[1] | q[2]
    inw = codes != 0
    fwin = np.zeros((4096, 8), dtype=np.uint32)                                  # the group's fallbacks, rotated
    for i in range(4096):
        e = efb[i, ~inw[i]]
        fwin[i, : e.size] = (e >> 1) | (e & 1) << 7
    word = lambda b: b[:, 0] | b[:, 1] << 8 | b[:, 2] << 16 | b[:, 3] << 24
    x = (ex[0, q[0]].astype(np.uint64) + ex[1, q[1]] + ex[2, q[2]]).astype(np.uint32)   # (4096, 4)
    s = _prmt_np(word(h)[:, None], word(h[:, 4:])[:, None], np.arange(4) * 0x2222 + 0x1100)
    w = (s & 0x807F807F) | (x & 0x7F807F80)
    f = _prmt_np(word(fwin)[:, None], word(fwin[:, 4:])[:, None], per[ind, 0:4])
    fm = per[ind, 4:8]
    w = (w & ~fm) | (f & fm)
    got = np.stack([w & 0xFFFF, w >> 16], axis=2).reshape(4096, 8)
    want = ((h & 0x80) << 8) | (np.where(inw, codes + e0 - 1, efb) << 7) | (h & 0x7F)
    assert np.array_equal(got, want)


def test_device_layout_round_trip():
    """device_layout keeps the byte count (+ FB_PAD), stream_layout gives the codec's streams back and
    decode_device_np decodes it (whole matrix, chosen rows), odd shape with fallbacks."""
    w = (torch.randn(130, 70) * 0.02).bfloat16()
    w.view(torch.int16)[::7] = 0x7F80                                             # +Inf rows: fallbacks
    e = LL.tca_tbe_encode(w)
    h, f = ZG.device_layout(e.bitmaps, e.hi, e.fallback)
    assert h.size + f.size == e.hi.size + 2 * e.fallback.size + ZG.FB_PAD and e.fallback.size > 0
    hi, fb = ZG.stream_layout(e.bitmaps, h, f)
    assert np.array_equal(hi, e.hi) and np.array_equal(fb, e.fallback)
    u = w.view(torch.int16).numpy().view(np.uint16)
    args = (e.bitmaps, h, f, e.block_offsets, e.sub_offsets, e.e0, e.shape, e.padded)
    assert np.array_equal(ZG.decode_device_np(*args), u)                         # the CPU decode of ZipLinear
    rows = np.array([129, 0, 64, 7, 129])
    assert np.array_equal(ZG.decode_device_np(*args, rows=rows), u[rows])


def test_sass_loop_parser():
    from modelpress.kernels.static import main_loop, parse_sass
    text = """
        /*0000*/                   MOV R1, c[0x0][0x28] ;
    .L_x_0:
        /*0010*/                   IADD3 R2, R2, 0x1, RZ ;
    .L_x_1:
        /*0020*/                   LDG.E R3, desc[UR4][R4.64] ;
        /*0030*/               @P0 BRA `(.L_x_1) ;
        /*0040*/                   BAR.SYNC.DEFER_BLOCKING 0x0 ;
        /*0050*/               @P1 BRA `(.L_x_0) ;
        /*0060*/                   EXIT ;
    """
    lines = parse_sass(textwrap.dedent(text))
    assert len(lines) == 7 and lines[1] == (".L_x_0", "IADD3 R2, R2, 0x1, RZ")
    assert main_loop(lines) == [ins for _, ins in lines[1:6]]     # the outer loop, inner one included


@needs_triton
def test_aot_compile_sm90_static_figures():
    """Compiles every kernel variant for sm_90 with Triton's bundled ptxas (no GPU): lowering errors show
    here; the fused kernel keeps no spills, >= 8 resident warps per SM and its instruction budget."""
    from modelpress.kernels import static as S
    try:
        S.tool("ptxas")
    except FileNotFoundError as e:
        pytest.skip(str(e))
    figs = {v.name: S.measure(v) for v in S.variants()}
    for f in figs.values():
        assert f.spill_bytes == 0 and f.regs <= 255 and f.warps_per_sm >= 8, f
    fused = [f for n, f in figs.items() if n.startswith("fused")]
    for f in fused:
        assert f.loop_sass > 0 and f.barriers <= 4, f
        assert f.per_weight <= 12, f"{f.name}: {f.per_weight:.1f} thread-instructions per weight (11.1 when written)"
