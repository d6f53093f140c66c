"""TCA-TBE decode on the GPU (ZipServ, arXiv 2603.17435): a tile-parallel decompression kernel and a fused
decode+GEMM for small batch (N <= 16 tokens, the decode phase), in Triton, plus a pure-torch reference of
exactly the same per-tile arithmetic (what the CPU tests check).

Decoding one 16x64 tensor-core tile g (16 8x8 tiles t, 64 bits j each; layout in modelpress/algos/lossless.py):
  code[t, j]  = bit j of bitmaps[16 g + t, 0] | bit j of [.., 1] << 1 | bit j of [.., 2] << 2
  inw         = code != 0
  rank[t, j]  = number of in-window elements before (t, j) inside the tile (storage order)
  off(g)      = block_offsets[g // 4] + (sub_offsets[g // 4, g % 4 - 1] if g % 4 else 0)
  word        = sign/mantissa byte h = hi[off(g) + rank]  -> h>>7 << 15 | (code+e0-1) << 7 | h & 0x7F
                or fallback[1024 g - off(g) + (64 t + j - rank)] when code == 0
  position    = g -> (block row rb, block col cb, r16), t -> (k16, k8, r8), j -> (i, jj):
                row = 64 rb + 16 r16 + 8 r8 + i, col = 64 cb + 16 k16 + 8 k8 + jj

The kernels follow ZipServ's ZipGEMM structure (its `LoadBF16FragWithTripleBitmap`) as far as Triton
expresses it. A program owns a 64-row stripe and decodes one 64x64 block (4096 weights) per K step; each
of its 128 threads owns half (4 rows) of one 8x8 tile, i.e. four "groups" (one tile row: 8 consecutive k
of one output row, byte i of each 64-bit bit plane):
  tile prefix  = in-window elements of the earlier 8x8 tiles of the 16x64 tile: a 16-wide scan that
                 stays inside a warp (shuffles, no barrier);
  group rank   = tile prefix + popcount (32-bit POPC) of the indicator bits of the earlier rows;
  codes        = the three plane bytes interleaved by a 256-entry table (code jj = bits 3jj..3jj+2),
                 shifted straight into the exponent field;
  sign+mantissa = the group's 8-byte hi window (three aligned 32-bit loads per group, funnel-shifted),
                 split in two 32-bit windows (elements 0-3, 4-7) consumed in order: a weight in the
                 window takes the low byte, then the window shifts by 8 (one predicated SHF); no
                 per-weight load, no per-weight rank;
  fallback     = one masked 16-bit load per weight through a pointer that advances past each fallback
                 (a predicated 64-bit add); the in-window value is the load's `other`, so the masked load
                 is also the select (executed, masked off, for in-window weights).
The in-window words are built in the low half of 32-bit registers and taken as bf16 bits (no conversion
instruction), then fed to tl.dot (wgmma m64n16k16 on sm_90; Triton moves the tile into the operand
registers through shared memory, 2 barriers per K step). The next block's bit planes are loaded one step
ahead (register double buffer; Triton's own pipelining is off, it costs more instructions than it saves).
Split-K writes fp32 partials to a workspace that a second kernel sums in a fixed order (deterministic),
adding the bias and casting; with one split the GEMM kernel stores y (+ bias) itself. Splits are sized
so the programs fill every SM at the occupancy the compiled kernel reaches (registers, shared memory).
What is left (measured by modelpress.kernels.static: ~19 thread-instructions per weight on sm_90, the
issue's target is 12): per weight ~12 (code shift and test 2, word assembly 4, window advance 1,
fallback pointer advance 3, masked load 1, register copies ~1); per group, amortised over its 8
weights, the spread-table and window loads with their 64-bit addresses and ranks (~5 per weight); the
register->shared->ldmatrix move of the tile into the wgmma operand and x (~2).
Below that needs what Triton does not expose: byte permutes (PRMT) and two weights per 32-bit operation.

Triton is optional: the kernels are defined only when it imports, so this module imports without triton
or CUDA. Under Triton's CPU interpreter (TRITON_INTERPRET=1) popcount is computed with shifts (the
interpreter has no libdevice) and tl.dot runs in fp32 (the interpreter mis-computes bf16 dots)."""
from __future__ import annotations

import os

import torch
from torch import Tensor

from ..errors import UserError

TILE_ROWS, TILE_COLS = 16, 64
BLOCK_M = 64                      # rows per program of the fused kernel (one 64x64 block per K step)
FUSED_MAX_N = 16
NUM_WARPS = 4
NUM_STAGES = 1                    # software pipelining off: the prefetch is explicit (fewer instructions, 16 warps/SM)


# --------------------------------------------------------------------------- pure-torch reference

def decode_tiles_torch(bitmaps: Tensor, hi: Tensor, fallback: Tensor, block_offsets: Tensor, sub_offsets: Tensor,
                       e0: int, tiles: Tensor) -> Tensor:
    """Decode 16x64 tiles `tiles` (g,) -> (g, 16, 64) int16 words in row-major tile layout, with the
    kernel's arithmetic. bitmaps (T, 3) int64, hi (n_in,) uint8, fallback (n_fb,) int16,
    block_offsets (B + 1,) int32/int64, sub_offsets (B, 3) int16."""
    dev = bitmaps.device
    g = tiles.to(device=dev, dtype=torch.int64)                                  # (g,)
    t = torch.arange(16, device=dev)
    j = torch.arange(64, device=dev)
    bm = bitmaps[(g[:, None] * 16 + t[None, :])]                                 # (g, 16, 3)
    bits = (bm[..., None] >> j) & 1                                              # (g, 16, 3, 64)
    code = bits[:, :, 0] | (bits[:, :, 1] << 1) | (bits[:, :, 2] << 2)            # (g, 16, 64)
    inw = (code != 0).to(torch.int64)
    row_cnt = inw.sum(dim=2)                                                     # (g, 16)
    rank = inw.cumsum(dim=2) - inw + (row_cnt.cumsum(dim=1) - row_cnt)[:, :, None]
    blk, r16 = g // 4, g % 4
    sub = sub_offsets.to(torch.int64)[blk, (r16 - 1).clamp(min=0)] * (r16 > 0)
    hoff = (block_offsets.to(torch.int64)[blk] + sub)[:, None, None]             # (g, 1, 1)
    s = t[:, None] * 64 + j[None, :]                                             # (16, 64)
    inw_b = inw.bool()
    h_idx = torch.where(inw_b, hoff + rank, 0)
    f_idx = torch.where(inw_b, 0, g[:, None, None] * 1024 - hoff + (s - rank))
    h = hi[h_idx.clamp(max=max(hi.numel() - 1, 0))].to(torch.int64) if hi.numel() else torch.zeros_like(code)
    f = fallback[f_idx.clamp(max=max(fallback.numel() - 1, 0))].to(torch.int64) & 0xFFFF \
        if fallback.numel() else torch.zeros_like(code)
    word = torch.where(inw_b, ((h & 0x80) << 8) | ((code + e0 - 1) << 7) | (h & 0x7F), f)
    # (t, j) = (k16, k8, r8, i, jj) -> (r8, i, k16, k8, jj) = (row, col) of the 16x64 tile
    word = word.reshape(-1, 4, 2, 2, 8, 8).permute(0, 3, 4, 1, 2, 5).reshape(-1, 16, 64)
    return word.to(torch.int32).to(torch.int16)  # values < 2**16: int32 -> int16 wraps to the same bits


def decompress_torch(bitmaps: Tensor, hi: Tensor, fallback: Tensor, block_offsets: Tensor, sub_offsets: Tensor, e0: int,
                     shape: tuple[int, int], padded: tuple[int, int], dtype: torch.dtype = torch.bfloat16,
                     chunk: int = 4096) -> Tensor:
    """Whole matrix through decode_tiles_torch (chunks of tiles), cropped to `shape`."""
    rp, cp = padded
    G = rp * cp // 1024
    out = torch.empty(G, 16, 64, dtype=torch.int16, device=bitmaps.device)
    for a in range(0, G, chunk):
        out[a: a + chunk] = decode_tiles_torch(bitmaps, hi, fallback, block_offsets, sub_offsets, e0,
                                               torch.arange(a, min(a + chunk, G), device=bitmaps.device))
    # g = (rb, cb, r16) -> rows (rb, r16, 16), cols (cb, 64)
    full = out.reshape(rp // 64, cp // 64, 4, 16, 64).permute(0, 2, 3, 1, 4).reshape(rp, cp)
    return full[: shape[0], : shape[1]].contiguous().view(dtype)


def decompress_rows_torch(bitmaps: Tensor, hi: Tensor, fallback: Tensor, block_offsets: Tensor, sub_offsets: Tensor,
                          e0: int, padded: tuple[int, int], rows: Tensor) -> Tensor:
    """Rows `rows` (r,) of the padded matrix as (r, cp) int16 words, decoding only the 16x64 tiles of the
    64-row block rows that hold them (embedding lookups)."""
    cp = padded[1]
    dev = bitmaps.device
    rows = rows.to(device=dev, dtype=torch.int64)
    rb = torch.unique(rows // 64)                                                # (nb,) block rows needed
    ncb = cp // 64
    g = ((rb[:, None] * ncb + torch.arange(ncb, device=dev)) * 4)[:, :, None] + torch.arange(4, device=dev)
    tiles = decode_tiles_torch(bitmaps, hi, fallback, block_offsets, sub_offsets, e0, g.reshape(-1))
    blocks = tiles.reshape(-1, ncb, 4, 16, 64).permute(0, 2, 3, 1, 4).reshape(-1, 64, cp)   # (nb, 64, cp)
    return blocks[torch.searchsorted(rb, rows // 64), rows % 64]


# --------------------------------------------------------------------------- launch arithmetic (pure)

def resident_ctas(regs: int, smem: int, warps: int, sm_regs: int = 65536, sm_smem: int = 228 * 1024,
                  max_warps: int = 64, max_ctas: int = 32) -> int:
    """CTAs one SM holds at once (sm_90 limits): registers are allocated per warp in units of 256, each
    CTA reserves 1 KiB of shared memory besides its own."""
    per_warp = -(-max(regs, 1) * 32 // 256) * 256
    by_regs = (sm_regs // per_warp) // warps
    by_smem = sm_smem // (smem + 1024)
    return max(0, min(by_regs, by_smem, max_warps // warps, max_ctas))


def split_k(n_stripes: int, n_cb: int, n_sm: int, ctas_per_sm: int) -> int:
    """K slices so that n_stripes * slices programs fill every SM at the kernel's occupancy (one wave),
    never more slices than 64-column K blocks."""
    want = n_sm * max(ctas_per_sm, 1)
    return max(1, min(n_cb, -(-want // max(n_stripes, 1))))


# --------------------------------------------------------------------------- Triton kernels

try:  # optional dependency: without triton (or CUDA) only the torch reference runs
    import triton
    import triton.language as tl
    from triton.language.extra.cuda import libdevice as _libdevice
except ImportError:  # pragma: no cover - depends on the environment
    triton = None


def triton_available() -> bool:
    return triton is not None


def _interp() -> bool:
    return os.environ.get("TRITON_INTERPRET") == "1"


def _need_triton() -> None:
    if triton is None:
        raise RuntimeError("triton is not installed: pip install 'modelpress[gpu]' (or use decompress_torch)")


if triton is not None:
    @triton.jit
    def _popc(x, INTERP: tl.constexpr):
        """Set bits of x (int32): POPC on the GPU, shifts and a multiply in the interpreter (no libdevice)."""
        if INTERP:
            x = x - ((x >> 1) & 0x55555555)
            x = (x & 0x33333333) + ((x >> 2) & 0x33333333)
            x = (x + (x >> 4)) & 0x0F0F0F0F
            return ((x * 0x01010101) >> 24) & 0xFF
        else:
            return _libdevice.popc(x)

    @triton.jit
    def _block_planes(bm_ptr, blk):
        """The three 64-bit bit planes of every 8x8 tile of 64x64 block blk, as (128,) int64 tensors:
        entry u is tile u % 64 (storage order (r16, k16, k8, r8)); entries u and u + 64 are the two
        threads that decode rows 0-3 and 4-7 of that tile."""
        t = tl.arange(0, 128) % 64
        p = bm_ptr + (blk.to(tl.int64) * 64 + t) * 3
        return tl.load(p), tl.load(p + 1), tl.load(p + 2)

    @triton.jit
    def _elem(z, win, fp, E, J: tl.constexpr, FLOAT: tl.constexpr):
        """Element jj = J of a group, and the group's streams advanced past it: FLOAT, its bf16 value;
        otherwise its exact 16 bits in an int32 (decompression). z: the group's eight 3-bit codes (code J at
        bits 3J..3J+2), moved straight to the exponent field (bits 7-9); E: (e0 - 1) << 7; win: the
        group's hi bytes not used yet (the next one in its low byte); fp: where its next fallback word is."""
        if 3 * J > 7:
            e7 = (z >> (3 * J - 7)) & 0x380                                          # code << 7
        else:
            e7 = (z << (7 - 3 * J)) & 0x380
        inw = e7 != 0
        w = (((win & 0xFF).to(tl.int32) * 0x0101) & 0x807F) | (e7 + E)
        if FLOAT:  # the in-window value is the masked load's `other`: the load is the select
            out = tl.load(fp.to(tl.pointer_type(tl.bfloat16)), mask=e7 == 0,
                          other=w.to(tl.int16).to(tl.bfloat16, bitcast=True))
        else:
            f = tl.load(fp, mask=e7 == 0).to(tl.int32)
            out = tl.where(inw, w, f & 0xFFFF)
        return out, tl.where(inw, win >> 8, win), tl.where(inw, fp, fp + 1)

    @triton.jit
    def _join8(w0, w1, w2, w3, w4, w5, w6, w7):
        """Eight (128,) tensors (element jj = 0..7 of a group) -> (128, 8); joined axes stay in-thread."""
        v = tl.join(tl.join(tl.join(w0, w1), tl.join(w2, w3)), tl.join(tl.join(w4, w5), tl.join(w6, w7)))
        return tl.reshape(tl.permute(v, (0, 3, 2, 1)), (128, 8))                     # [u, p, q, s] = w_{4s+2q+p}

    @triton.jit
    def _group_row(pl0, pl1, pl2, ind_w, hpos, fp, sp_ptr, hi_ptr, E, n_hw, K: tl.constexpr, FLOAT: tl.constexpr,
                   INTERP: tl.constexpr):
        """(128, 8) words of row i = 4 half + K of each thread's 8x8 tile, and the fallback pointer past the
        row. pl*: the thread's 32-bit half of each plane, ind_w: of the indicator; hpos: index in hi of the
        thread's first in-window weight (row 4 half); fp: the row's first fallback (the thread's four rows
        are consecutive in storage order, so their fallbacks are too)."""
        q0 = (pl0 >> (8 * K)) & 0xFF
        q1 = (pl1 >> (8 * K)) & 0xFF
        q2 = (pl2 >> (8 * K)) & 0xFF
        z = tl.load(sp_ptr + q0) | (tl.load(sp_ptr + q1) << 1) | (tl.load(sp_ptr + q2) << 2)  # 8 codes, 3 bits each
        # the group's (up to) 8 hi bytes: three aligned 32-bit words around its first byte, funnel-shifted
        gpos = hpos + _popc(ind_w & ((1 << (8 * K)) - 1), INTERP)                    # < 2**31 (checked)
        wi = gpos >> 2
        hw = hi_ptr.to(tl.pointer_type(tl.int32)) + wi
        w0 = tl.load(hw, mask=wi < n_hw, other=0).to(tl.uint32, bitcast=True).to(tl.uint64)
        w1 = tl.load(hw + 1, mask=wi + 1 < n_hw, other=0).to(tl.uint32, bitcast=True).to(tl.uint64)
        w2 = tl.load(hw + 2, mask=wi + 2 < n_hw, other=0).to(tl.uint32, bitcast=True).to(tl.uint64)
        sh = ((gpos & 3) * 8).to(tl.uint64)
        win = (((w0 | (w1 << 32)) >> sh) & 0xFFFFFFFF) | (((w1 | (w2 << 32)) >> sh) << 32)
        # two 32-bit windows (elements 0-3 and 4-7): each weight then advances a 32-bit register only
        n_lo = _popc(ind_w & (0xF << (8 * K)), INTERP)
        whi = ((win >> (n_lo * 8).to(tl.uint64)) & 0xFFFFFFFF).to(tl.uint32)
        win = (win & 0xFFFFFFFF).to(tl.uint32)
        e0_, win, fp = _elem(z, win, fp, E, 0, FLOAT)
        e1_, win, fp = _elem(z, win, fp, E, 1, FLOAT)
        e2_, win, fp = _elem(z, win, fp, E, 2, FLOAT)
        e3_, win, fp = _elem(z, win, fp, E, 3, FLOAT)
        e4_, win, fp = _elem(z, whi, fp, E, 4, FLOAT)
        e5_, win, fp = _elem(z, win, fp, E, 5, FLOAT)
        e6_, win, fp = _elem(z, win, fp, E, 6, FLOAT)
        e7_, win, fp = _elem(z, win, fp, E, 7, FLOAT)
        return _join8(e0_, e1_, e2_, e3_, e4_, e5_, e6_, e7_), fp

    @triton.jit
    def _decode_block(p0, p1, p2, sp_ptr, hi_ptr, fb_ptr, blk_ptr, sub_ptr, blk, e0, n_hw, FLOAT: tl.constexpr,
                      INTERP: tl.constexpr):
        """(64, 64) block blk (row-major) from its bit planes (_block_planes): bf16 values (FLOAT) or int32
        holding the 16-bit words. Entry u = (half, t) of the (128,) tensors (one per thread)
        decodes rows 4 half .. 4 half + 3 of 8x8 tile t; sp_ptr: the spread3 table."""
        u = tl.arange(0, 128)
        t = u % 64
        half = u // 64
        sh = (32 * half).to(tl.int64)
        pl0 = ((p0 >> sh) & 0xFFFFFFFF).to(tl.int32)                                 # the thread's 4 rows
        pl1 = ((p1 >> sh) & 0xFFFFFFFF).to(tl.int32)
        pl2 = ((p2 >> sh) & 0xFFFFFFFF).to(tl.int32)
        ind64 = p0 | p1 | p2                                                         # in-window bits
        cl = _popc((ind64 & 0xFFFFFFFF).to(tl.int32), INTERP)                        # rows 0-3
        c = cl + _popc((ind64 >> 32).to(tl.int32), INTERP)                           # whole 8x8 tile
        ind_w = pl0 | pl1 | pl2
        c3 = tl.reshape(c, (2, 4, 16))                                               # (half, r16, t16)
        pt = tl.reshape(tl.cumsum(c3, axis=2) - c3, (128,))                          # earlier tiles of the 16x64
        sub = tl.load(sub_ptr + blk * 3 + t // 16 - 1, mask=t >= 16, other=0).to(tl.int32)
        hb = tl.load(blk_ptr + blk).to(tl.int32)                                     # block's hi offset (< 2**31)
        E = (e0 - 1) << 7
        rank = sub + pt + half * cl                                                  # thread's first weight: rank
        # its fallback index: 1024 g - off(g) + 64 t16 + 32 half - rank in its 16x64 tile, g = 4 blk + r16
        fp = fb_ptr + (blk.to(tl.int64) * 4096 - hb) + (1024 * (t // 16) + 64 * (t % 16) + 32 * half - rank)
        hpos = hb + rank
        r0, fp = _group_row(pl0, pl1, pl2, ind_w, hpos, fp, sp_ptr, hi_ptr, E, n_hw, 0, FLOAT, INTERP)
        r1, fp = _group_row(pl0, pl1, pl2, ind_w, hpos, fp, sp_ptr, hi_ptr, E, n_hw, 1, FLOAT, INTERP)
        r2, fp = _group_row(pl0, pl1, pl2, ind_w, hpos, fp, sp_ptr, hi_ptr, E, n_hw, 2, FLOAT, INTERP)
        r3, fp = _group_row(pl0, pl1, pl2, ind_w, hpos, fp, sp_ptr, hi_ptr, E, n_hw, 3, FLOAT, INTERP)
        v = tl.join(tl.join(r0, r1), tl.join(r2, r3))                                # [u, jj, p, q], K = 2q + p
        v = tl.reshape(v, (2, 4, 8, 2, 8, 2, 2))                                     # [half, r16, cg, r8, jj, p, q]
        return tl.reshape(tl.permute(v, (1, 3, 0, 6, 5, 2, 4)), (64, 64))            # (r16, r8, half, q, p) x (cg, jj)

    @triton.jit
    def decompress_kernel(bm_ptr, sp_ptr, hi_ptr, fb_ptr, blk_ptr, sub_ptr, out_ptr, e0, n_hw, n_cb, rows, cols,
                          INTERP: tl.constexpr):
        """One 64x64 block per program, written row-major into out (rows, cols) int16."""
        blk = tl.program_id(0)
        p0, p1, p2 = _block_planes(bm_ptr, blk)
        word = _decode_block(p0, p1, p2, sp_ptr, hi_ptr, fb_ptr, blk_ptr, sub_ptr, blk, e0, n_hw, False, INTERP)
        row = (blk // n_cb) * 64 + tl.arange(0, 64)[:, None]
        col = (blk % n_cb) * 64 + tl.arange(0, 64)[None, :]
        tl.store(out_ptr + row.to(tl.int64) * cols + col, word.to(tl.int16), mask=(row < rows) & (col < cols))

    @triton.jit
    def fused_kernel(bm_ptr, sp_ptr, hi_ptr, fb_ptr, blk_ptr, sub_ptr, x_ptr, out_ptr, bias_ptr, e0, n_hw, n_cb, M, K,
                     N, cb_per_split, stride_xn, SPLIT: tl.constexpr, HAS_BIAS: tl.constexpr, INTERP: tl.constexpr,
                     BLOCK_N: tl.constexpr):
        """acc[m, n] = sum_k W[m, k] x[n, k] over the 64 rows of block row program_id(0) and the K blocks
        of slice program_id(1). SPLIT: fp32 partials to out (splits, N, M), summed by splitk_reduce_kernel;
        otherwise y (N, M) = acc (+ bias) stored in y's dtype."""
        pid_m = tl.program_id(0)
        pid_k = tl.program_id(1)
        kk = tl.arange(0, 64)
        nn = tl.arange(0, BLOCK_N)
        acc = tl.zeros((64, BLOCK_N), dtype=tl.float32)
        cb0 = pid_k * cb_per_split
        cb1 = tl.minimum(cb0 + cb_per_split, n_cb)
        blk = pid_m * n_cb + cb0
        p0, p1, p2 = _block_planes(bm_ptr, blk)
        for cb in range(cb0, cb1):
            blk = pid_m * n_cb + cb
            w = _decode_block(p0, p1, p2, sp_ptr, hi_ptr, fb_ptr, blk_ptr, sub_ptr, blk, e0, n_hw, True, INTERP)  # bf16
            # next block's bit planes one step ahead (the last step re-reads its own block: no branch)
            p0, p1, p2 = _block_planes(bm_ptr, tl.minimum(blk + 1, pid_m * n_cb + cb1 - 1))
            k = cb * 64 + kk
            xt = tl.load(x_ptr + nn[None, :] * stride_xn + k[:, None], mask=(k[:, None] < K) & (nn[None, :] < N),
                         other=0.0)                                                  # (64, BLOCK_N) = X^T chunk
            if INTERP:
                acc += tl.dot(w.to(tl.float32), xt.to(tl.float32))
            else:
                acc += tl.dot(w, xt)
        m = pid_m * 64 + tl.arange(0, 64)
        mask = (m[:, None] < M) & (nn[None, :] < N)
        if SPLIT:
            tl.store(out_ptr + (pid_k * N + nn[None, :]).to(tl.int64) * M + m[:, None], acc, mask=mask)
        else:
            if HAS_BIAS:
                acc += tl.load(bias_ptr + m, mask=m < M, other=0.0).to(tl.float32)[:, None]
            tl.store(out_ptr + nn[None, :].to(tl.int64) * M + m[:, None], acc.to(out_ptr.dtype.element_ty), mask=mask)

    @triton.jit
    def splitk_reduce_kernel(ws_ptr, y_ptr, bias_ptr, M, N, SPLITS: tl.constexpr, HAS_BIAS: tl.constexpr,
                             BLOCK: tl.constexpr):
        """y (N, M) = sum over s = 0..SPLITS-1 (in this order) of ws (SPLITS, N, M) (+ bias), cast to y."""
        n = tl.program_id(1)
        m = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
        acc = tl.zeros((BLOCK,), dtype=tl.float32)
        for s in tl.static_range(SPLITS):
            acc += tl.load(ws_ptr + (s * N + n).to(tl.int64) * M + m, mask=m < M, other=0.0)
        if HAS_BIAS:
            acc += tl.load(bias_ptr + m, mask=m < M, other=0.0).to(tl.float32)
        tl.store(y_ptr + n.to(tl.int64) * M + m, acc.to(y_ptr.dtype.element_ty), mask=m < M)


# --------------------------------------------------------------------------- host wrappers

_STREAMS = (("bitmaps", torch.int64), ("hi", torch.uint8), ("fallback", torch.int16),
            ("block_offsets", (torch.int32, torch.int64)), ("sub_offsets", torch.int16))


def check_streams(bitmaps: Tensor, hi: Tensor, fallback: Tensor, block_offsets: Tensor, sub_offsets: Tensor,
                  padded: tuple[int, int]) -> None:
    """One-line UserError unless the codec tensors have the dtypes and shapes of a (rp, cp) TCA-TBE matrix."""
    rp, cp = padded
    if rp % 64 or cp % 64 or rp <= 0 or cp <= 0:
        raise UserError(f"padded shape must be positive multiples of 64, got {padded}: pass TcaTbe.padded")
    for (name, dt), t in zip(_STREAMS, (bitmaps, hi, fallback, block_offsets, sub_offsets)):
        ok = t.dtype in dt if isinstance(dt, tuple) else t.dtype == dt
        if not ok:
            raise UserError(f"TCA-TBE stream {name} must be {dt}, got {t.dtype}: pass the tensors of "
                            "modules.zip._enc_tensors (bitmaps viewed as int64, fallback as int16)")
    B = rp * cp // 4096
    if (tuple(bitmaps.shape) != (rp * cp // 64, 3) or tuple(sub_offsets.shape) != (B, 3)
            or block_offsets.numel() != B + 1):
        raise UserError(f"TCA-TBE streams do not match padded shape {padded} (bitmaps {tuple(bitmaps.shape)}, "
                        f"sub_offsets {tuple(sub_offsets.shape)}): pass the padded shape of the same encoding")
    if hi.numel() >= 2 ** 31:
        raise UserError(f"TCA-TBE matrix has {hi.numel()} in-window weights (>= 2**31): the kernels index them in "
                        "32 bits; split the matrix (e.g. by rows) into several ZipLinear")
    devs = {t.device for t in (bitmaps, hi, fallback, block_offsets, sub_offsets)}
    if len(devs) != 1:
        raise UserError(f"TCA-TBE streams are on several devices {sorted(map(str, devs))}: move them together "
                        "(.to(device))")


_SPREAD3: dict = {}


def spread3(device: torch.device) -> Tensor:
    """(256,) int32 table, cached per device: bit j of the index moved to bit 3 j (interleaves the three
    bit planes of eight codes into one word: code j = bits 3j..3j+2)."""
    key = str(device)
    if key not in _SPREAD3:
        b = torch.arange(256)
        _SPREAD3[key] = sum(((b >> j) & 1) << (3 * j) for j in range(8)).to(torch.int32).to(device)
    return _SPREAD3[key]


def _nonempty(hi: Tensor, fallback: Tensor) -> tuple[Tensor, Tensor]:
    """Streams as the kernels read them: never empty; hi 4-byte aligned (read as aligned 32-bit words; the
    last word may extend up to 3 bytes past the data, inside the CUDA allocation, whose blocks are 512-byte
    multiples; CPU tensors, i.e. the interpreter, get a padded copy)."""
    _fb = fallback if fallback.numel() else torch.zeros(1, dtype=torch.int16, device=hi.device)
    if hi.is_cuda and hi.numel() and hi.data_ptr() % 4 == 0:
        return hi, _fb
    _hi = torch.zeros(-(-max(hi.numel(), 1) // 4) * 4, dtype=torch.uint8, device=hi.device)
    _hi[: hi.numel()] = hi
    return _hi, _fb


def decompress_triton(bitmaps: Tensor, hi: Tensor, fallback: Tensor, block_offsets: Tensor, sub_offsets: Tensor,
                      e0: int, shape: tuple[int, int], padded: tuple[int, int],
                      dtype: torch.dtype = torch.bfloat16) -> Tensor:
    """Block-parallel decompression: one program per 64x64 block, output (rows, cols) of `dtype`."""
    _need_triton()
    check_streams(bitmaps, hi, fallback, block_offsets, sub_offsets, padded)
    if dtype not in (torch.bfloat16, torch.float16):
        raise UserError(f"decompress dtype must be bfloat16 or float16 (the encoded dtype), got {dtype}")
    rows, cols = shape
    rp, cp = padded
    out = torch.empty(rows, cols, dtype=torch.int16, device=bitmaps.device)
    _hi, _fb = _nonempty(hi, fallback)
    decompress_kernel[(rp * cp // 4096,)](bitmaps, spread3(bitmaps.device), _hi, _fb, block_offsets, sub_offsets, out,
                                          e0, -(-hi.numel() // 4),
                                          cp // 64, rows, cols, INTERP=_interp(), num_warps=NUM_WARPS)
    return out.view(dtype)


_CTAS_PER_SM: dict = {}


def _ctas_per_sm(handle, device: torch.device) -> int:
    """Occupancy of the compiled fused kernel (from its registers and shared memory), cached per device."""
    key = str(device)
    if key not in _CTAS_PER_SM and handle is not None and getattr(handle, "n_regs", None):
        _CTAS_PER_SM[key] = max(1, resident_ctas(handle.n_regs, handle.metadata.shared, NUM_WARPS))
    return _CTAS_PER_SM.get(key, 2)


def fused_linear_triton(x: Tensor, bitmaps: Tensor, hi: Tensor, fallback: Tensor, block_offsets: Tensor,
                        sub_offsets: Tensor, e0: int, shape: tuple[int, int], padded: tuple[int, int],
                        bias: Tensor | None = None, splits: int | None = None, *,
                        weight_dtype: torch.dtype) -> Tensor:
    """y = x W^T (+ bias) for x (N, K) bf16 with N <= 16, W (bf16, TCA-TBE) decoded block by block in
    registers. weight_dtype: the encoded dtype (TcaTbe.dtype; the streams do not carry it), only bf16.
    splits: K slices (None: fill the SMs at the kernel's occupancy); more than one slice
    sums fp32 partials in a second kernel, in a fixed order (the result does not depend on timing)."""
    _need_triton()
    M, K = shape
    rp, cp = padded
    if weight_dtype != torch.bfloat16:
        raise UserError(f"fused_linear_triton decodes bf16 weights, these are {weight_dtype}: use "
                        "decompress_triton(..., dtype=torch.float16) and a matmul for fp16 weights")
    if x.dim() != 2 or x.dtype != torch.bfloat16 or not 1 <= x.shape[0] <= FUSED_MAX_N:
        raise UserError(f"fused_linear_triton takes x of shape (N, K) bf16 with 1 <= N <= {FUSED_MAX_N}, got "
                        f"{tuple(x.shape)} {x.dtype}: use decompress_triton and a matmul for larger N")
    if x.shape[1] != K:
        raise UserError(f"x has {x.shape[1]} features but the weight has in_features K = {K}: pass x of shape (N, {K})")
    if not (rp >= M and cp >= K and rp - M < 64 and cp - K < 64):
        raise UserError(f"padded {padded} is not shape {shape} rounded up to 64: pass TcaTbe.shape and .padded "
                        "together")
    check_streams(bitmaps, hi, fallback, block_offsets, sub_offsets, padded)
    if x.device != bitmaps.device:
        raise UserError(f"x is on {x.device} but the weight streams are on {bitmaps.device}: move x to "
                        f"{bitmaps.device}")
    if bias is not None and (bias.shape != (M,) or not bias.dtype.is_floating_point or bias.device != x.device):
        raise UserError(f"bias must be a float tensor of shape ({M},) on {x.device}, got {tuple(bias.shape)} "
                        f"{bias.dtype} on {bias.device}")
    x = x.contiguous()
    N = x.shape[0]
    n_stripes, n_cb = rp // 64, cp // 64
    if splits is None:
        n_sm = torch.cuda.get_device_properties(x.device).multi_processor_count if x.is_cuda else 1
        splits = split_k(n_stripes, n_cb, n_sm, _ctas_per_sm(None, x.device))
    if not isinstance(splits, int) or splits < 1:
        raise UserError(f"splits must be a positive int (K slices), got {splits!r}")
    per = -(-n_cb // min(splits, n_cb))
    splits = -(-n_cb // per)
    y = torch.empty(N, M, dtype=torch.bfloat16, device=x.device)
    out = torch.empty(splits, N, M, dtype=torch.float32, device=x.device) if splits > 1 else y
    _hi, _fb = _nonempty(hi, fallback)
    handle = fused_kernel[(n_stripes, splits)](
        bitmaps, spread3(x.device), _hi, _fb, block_offsets, sub_offsets, x, out, bias if bias is not None else y, e0,
        -(-hi.numel() // 4),
        n_cb, M, K, N, per, x.stride(0), SPLIT=splits > 1, HAS_BIAS=bias is not None, INTERP=_interp(),
        BLOCK_N=16, num_warps=NUM_WARPS, num_stages=NUM_STAGES)
    if x.is_cuda:
        _ctas_per_sm(handle, x.device)
    if splits > 1:
        splitk_reduce_kernel[(triton.cdiv(M, 256), N)](out, y, bias if bias is not None else y, M, N, SPLITS=splits,
                                                       HAS_BIAS=bias is not None, BLOCK=256, num_warps=4)
    return y
