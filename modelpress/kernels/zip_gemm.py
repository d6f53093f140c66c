"""TCA-TBE decode on the GPU (ZipServ, Fan et al., ASPLOS'26, arXiv 2603.17435): a tile-parallel
decompression kernel and a fused decode+GEMM for small batch (N <= 16 tokens, the decode phase), in Triton,
plus a pure-torch reference of exactly the same per-tile arithmetic (what the CPU tests check).

Decoding one 16x64 tensor-core tile g (16 8x8 tiles t, 64 bits j each; layout in modelpress/algos/lossless.py):
  code[t, j]  = bit j of bitmaps[16 g + t, 0] | bit j of [.., 1] << 1 | bit j of [.., 2] << 2
  inw         = code != 0
  rank[t, j]  = number of in-window elements before (t, j) inside the tile (storage order)
  off(g)      = block_offsets[g // 4] + (sub_offsets[g // 4, g % 4 - 1] if g % 4 else 0)
  word        = sign/mantissa byte h -> h>>7 << 15 | exponent << 7 | h & 0x7F, exponent = code + e0 - 1,
                or the fallback's when code == 0 (fallback index 1024 g - off(g) + (64 t + j - rank))
  position    = g -> (block row rb, block col cb, r16), t -> (k16, k8, r8), j -> (i, jj):
                row = 64 rb + 16 r16 + 8 r8 + i, col = 64 cb + 16 k16 + 8 k8 + jj

Device layout (device_layout; where this deviates from ZipServ). The stored format is ZipServ's: the
sign+mantissa bytes of the in-window weights only (stream hi) and the full 16-bit word of each fallback. The
kernels read the same information rearranged once, at load (ZipLinear holds it; exports keep the format):
  hi          one sign+mantissa byte per weight, fallbacks included, in storage order (rp * cp bytes);
  fallback    the exponent byte of each fallback, in storage order, rotated right by one bit, then FB_PAD
              zero bytes;
the same number of bytes (+ FB_PAD): a fallback's sign and mantissa move from its 16-bit word into hi. A
thread's 32 sign+mantissa bytes are then two aligned 16-byte loads with no rank, and a group's fallback
exponents at most 8 bytes, a window that two registers hold.

The kernels follow ZipServ's ZipGEMM structure (its `LoadBF16FragWithTripleBitmap`) as far as Triton
expresses it. A program owns a 64-row stripe and decodes one 64x64 block (4096 weights) per K step; each
of its 128 threads owns half (4 rows) of one 8x8 tile, i.e. four "groups" (one tile row: 8 consecutive k
of one output row, byte i of each 64-bit bit plane). Weights are decoded two per 32-bit operation: a pair
(columns 2p, 2p + 1 of a group) is one int32 whose halves are the two bf16 words.
  exponents    = per plane byte, a 4-word table row with the plane's bits of the four pairs already in
                 both exponent fields (bits 7 + b and 23 + b; plane 0's rows carry e0 - 1): the sum of the
                 three rows (one IADD3 per pair) is the exponent fields of the group's four pairs;
  sign+mantissa = one byte permute (PRMT, libdevice byte_perm; constant selector) per pair spreads the two
                 hi bytes to [h1 h1 h0 h0]; one LOP3 keeps sign and mantissa from it, the exponent fields
                 from the sum;
  fallbacks    = tile prefix (in-window elements of the earlier 8x8 tiles of the 16x64 tile: a 16-wide scan
                 inside a warp, shuffles, no barrier) + popcount (32-bit POPC) of the earlier rows' indicator
                 bits give the group's first fallback; its <= 8 exponent bytes (three aligned words, two funnel
                 shifts) are spread by one PRMT per pair whose selector (each element's slot among the
                 group's fallbacks, written to both bytes of its half: the rotated exponent lands in the
                 exponent field) is a table row of the group's indicator byte, and replace the exponent
                 fields of the fallback halves (table mask, one LOP3 per pair). Branch-free: every pair pays
                 4 instructions for the rare fallback, no load per weight.
The decode tables (decode_tables_np: 20 KiB per e0, L1-resident) replace per-weight arithmetic with one
16-byte load per plane byte and two per indicator byte. The pairs go to tl.dot as bf16 (wgmma m64n16k16 on
sm_90; Triton moves the tile into the operand registers through shared memory: 4 STS.128, 4 LDSM, 2 barriers
per K step). The next block's bit planes are loaded one step ahead (register double buffer; Triton's own
pipelining is off, it costs more instructions than it saves). Split-K writes fp32 partials to a workspace
that a second kernel sums in a fixed order (deterministic), adding the bias and casting; with one split the
GEMM kernel stores y (+ bias) itself. Splits are sized so the programs fill every SM at the occupancy the
compiled kernel reaches (registers, shared memory).
Static cost (modelpress.kernels.static, sm_90): ~11 thread-instructions per weight (the issue's target 12;
~19 with the per-weight decode of the stored layout, ~16 two weights per operation on the stored layout,
where the compacted hi bytes need a rank window per group and every weight a 16-bit fallback load with a
64-bit address). Other differences from ZipServ: it stages each tile's streams in shared memory with
cp.async and addresses them in 32 bits; Triton has no shared-memory gather, so the streams and the decode
tables are read from global memory (L1) with 64-bit addresses (~3 instructions of address per table
lookup, 20 lookups per thread and K step: about a fifth of the loop); the 16 selectors read from the tables
cost one AND each (libdevice's byte_perm masks them; inline PTX would not, Triton's interpreter cannot run it).

Triton is optional: the kernels are defined only when it imports, so this module imports without triton
or CUDA. Under Triton's CPU interpreter (TRITON_INTERPRET=1) popcount and the byte permute are computed
with shifts (the interpreter has no libdevice; selector nibbles are always < 8, where PRMT and the shifts
agree bit for bit) and tl.dot runs in fp32 (the interpreter mis-computes bf16 dots)."""
from __future__ import annotations

import os

import numpy as np
import torch
from torch import Tensor

from ..algos import lossless as LL
from ..errors import UserError

TILE_ROWS, TILE_COLS = 16, 64
BLOCK_M = 64                      # rows per program of the fused kernel (one 64x64 block per K step)
FUSED_MAX_N = 16
NUM_WARPS = 4
NUM_STAGES = 1                    # software pipelining off: the prefetch is explicit (fewer instructions, 16 warps/SM)


# --------------------------------------------------------------------------- device layout (numpy, pure)

def _in_window(bitmaps: np.ndarray) -> np.ndarray:
    """(T, 3) uint64 bit planes -> (64 T,) bool, element in window, in storage order (bit j = element j)."""
    nz = np.ascontiguousarray(bitmaps[:, 0] | bitmaps[:, 1] | bitmaps[:, 2])
    return np.unpackbits(nz.view(np.uint8), bitorder="little").astype(bool)


FB_PAD = 16                       # bytes after the fallback exponents: the kernels read them unmasked


def device_layout(bitmaps: np.ndarray, hi: np.ndarray, fallback: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """The TCA-TBE streams hi (n_in,) uint8 and fallback (n_fb,) uint16 as the kernels read them, in the same
    number of bytes (+ FB_PAD): (h (64 T,) uint8, the sign+mantissa byte of every element in storage order,
    fallbacks included; fexp (n_fb + FB_PAD,) uint8, the fallbacks' exponent bytes in storage order, each
    rotated right by one bit (a byte permute that writes it to bytes 0 and 1 of a word puts the exponent in
    the bf16 field, bits 7-14), then zero padding). bitmaps: (T, 3) uint64."""
    inw = _in_window(bitmaps)
    h = np.empty(inw.size, dtype=np.uint8)
    h[inw] = hi
    fb = np.asarray(fallback).view(np.uint16)
    h[~inw] = ((fb >> 8) & 0x80 | fb & 0x7F).astype(np.uint8)
    e = (fb >> 7) & 0xFF
    fexp = np.zeros(fb.size + FB_PAD, dtype=np.uint8)
    fexp[: fb.size] = (e >> 1) | (e & 1) << 7
    return h, fexp


def stream_layout(bitmaps: np.ndarray, h: np.ndarray, fexp: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Inverse of device_layout: (hi (n_in,) uint8, fallback (n_fb,) uint16) of the TCA-TBE format."""
    inw = _in_window(bitmaps)
    hf = h[~inw].astype(np.uint16)
    r = fexp[: hf.size].astype(np.uint16)
    e = (r << 1 | r >> 7) & 0xFF
    return h[inw].copy(), ((hf & 0x80) << 8 | e << 7 | hf & 0x7F).astype(np.uint16)


def _decode_device_part(bitmaps: np.ndarray, h: np.ndarray, fexp: np.ndarray, e0: int, cp: int) -> np.ndarray:
    """Whole 64-row block rows from their slices of the device layout -> (64 k, cp) uint16 words."""
    planes = np.ascontiguousarray(bitmaps).view(np.uint8).reshape(-1, 3, 8)
    codes = sum(np.unpackbits(np.ascontiguousarray(planes[:, b]), bitorder="little") << b for b in range(3))
    inw = codes != 0
    ex = (codes.astype(np.uint16) + ((e0 - 1) & 0xFF)) & 0xFF
    r = fexp.astype(np.uint16)
    ex[~inw] = (r << 1 | r >> 7) & 0xFF                                          # stored rotated right by 1
    v = (h.astype(np.uint16) * 257) & 0x807F | ex << 7
    return LL.from_tile_order(v, v.size // cp, cp)


def decode_device_np(bitmaps: np.ndarray, h: np.ndarray, fexp: np.ndarray, block_offsets: np.ndarray,
                     sub_offsets: np.ndarray, e0: int, shape: tuple[int, int], padded: tuple[int, int],
                     rows: np.ndarray | None = None) -> np.ndarray:
    """The (rows, cols) uint16 words of a matrix held in the device layout (numpy, the CPU decode of
    ZipLinear / ZipEmbedding), block row by block row; `rows` given: only those rows, decoding only the
    64-row block rows that hold them. bitmaps (T, 3) uint64, h (64 T,) and fexp uint8 (device_layout)."""
    rp, cp = padded
    offs = LL.tile_offsets(block_offsets, sub_offsets)
    tiles_per_row = cp                                                           # 8x8 tiles per block row

    def part(rb0: int, rb1: int) -> np.ndarray:                                  # block rows [rb0, rb1)
        t0, t1 = rb0 * tiles_per_row, rb1 * tiles_per_row
        g0, g1 = t0 // 16, t1 // 16
        return _decode_device_part(bitmaps[t0:t1], h[t0 * 64: t1 * 64],
                                   fexp[g0 * 1024 - offs[g0]: g1 * 1024 - offs[g1]], e0, cp)

    if rows is None:
        out = np.empty(shape, dtype=np.uint16)
        step = max(1, (1 << 18) // (64 * cp))                                    # block rows per chunk
        for rb in range(0, rp // 64, step):
            p = part(rb, min(rb + step, rp // 64))
            r = rb * 64
            if r < shape[0]:
                out[r: r + p.shape[0]] = p[: shape[0] - r, : shape[1]]
        return out
    rows = np.asarray(rows, dtype=np.int64).reshape(-1)
    out = np.empty((rows.size, shape[1]), dtype=np.uint16)
    for rb in np.unique(rows // 64):                                             # the distinct block rows only
        sel = rows // 64 == rb
        out[sel] = part(int(rb), int(rb) + 1)[rows[sel] - rb * 64, : shape[1]]
    return out


# --------------------------------------------------------------------------- pure-torch reference

def decode_tiles_torch(bitmaps: Tensor, hi: Tensor, fallback: Tensor, block_offsets: Tensor, sub_offsets: Tensor,
                       e0: int, tiles: Tensor) -> Tensor:
    """Decode 16x64 tiles `tiles` (g,) -> (g, 16, 64) int16 words in row-major tile layout, with the
    kernel's arithmetic, from the device layout (device_layout): bitmaps (T, 3) int64, hi (64 T,) uint8,
    fallback (n_fb + FB_PAD,) uint8 rotated exponents, block_offsets (B + 1,) int32/int64, sub_offsets (B, 3) int16."""
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
    h = hi[(g[:, None, None] * 1024 + s).reshape(-1)].to(torch.int64).reshape(code.shape)
    f_idx = torch.where(inw_b, 0, g[:, None, None] * 1024 - hoff + (s - rank))
    r = fallback[f_idx.clamp(max=max(fallback.numel() - 1, 0))].to(torch.int64) & 0xFF \
        if fallback.numel() else torch.zeros_like(code)
    f = ((r << 1) | (r >> 7)) & 0xFF                                             # stored rotated right by 1
    word = ((h & 0x80) << 8) | (torch.where(inw_b, code + e0 - 1, f) << 7) | (h & 0x7F)
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
    def _prmt(x, y, s, INTERP: tl.constexpr):
        """Byte permute (PRMT, CUDA's __byte_perm): byte n of the result is byte (s >> 4n) & 7 of the eight
        bytes y:x (x the low four). Selector nibbles here are always < 8 (no sign replication), so the
        interpreter's shifts compute exactly what the GPU's PRMT does."""
        if INTERP:
            v = (y.to(tl.uint32, bitcast=True).to(tl.uint64) << 32) | x.to(tl.uint32, bitcast=True).to(tl.uint64)
            r = tl.zeros_like(x | y | s)
            for n in tl.static_range(4):
                b = (v >> (((s >> (4 * n)) & 7) * 8).to(tl.uint64)) & 0xFF
                r = r | (b.to(tl.int32) << (8 * n))
            return r
        else:
            return _libdevice.byte_perm(x, y, s)

    @triton.jit
    def _group_row(pl0, pl1, pl2, ind_w, fr, h_lo, h_hi, fbw, fsh, tab_ptr, smask, K: tl.constexpr,
                   INTERP: tl.constexpr):
        """(128, 4) int32: the four bf16 pairs (columns 2p, 2p + 1 in the low/high half) of row i = 4 half + K of
        each thread's 8x8 tile (a "group": 8 consecutive k of one output row, byte K of the thread's 32-bit half
        of each bit plane).
          exponent fields: one 4-word table row per plane byte (bit 2p -> bit 7 + b, bit 2p + 1 -> bit 23 + b
                           for plane b; (e0 - 1) in both fields of plane 0's rows), summed (IADD3);
          sign+mantissa:   h_lo, h_hi are the group's 8 hi bytes (every weight has its byte in the device
                           layout): one PRMT per pair ([h1 h1 h0 h0], constant selector), one LOP3 keeps sign
                           and mantissa from it and the exponent fields from the sum;
          fallbacks:       the group's fallback exponent bytes (at most 8: three aligned words, two funnel
                           shifts) are spread by one PRMT per pair (selector: the elements' slots among the
                           group's fallbacks, a table row of the indicator byte) and replace the exponent
                           fields of the fallback halves (table mask, one LOP3).
        fr: index of the thread's first fallback relative to the block's first one; fbw: int32 pointer to the
        word holding the block's first fallback, fsh its byte in that word."""
        pp = tl.arange(0, 4)[None, :]
        if K == 0:
            rho = tl.zeros_like(ind_w)
        else:
            rho = _popc(ind_w & ((1 << (8 * K)) - 1), INTERP)                     # in-window weights of rows < K
        q0 = ((pl0 >> (8 * K)) & 0xFF)[:, None]
        q1 = ((pl1 >> (8 * K)) & 0xFF)[:, None]
        q2 = ((pl2 >> (8 * K)) & 0xFF)[:, None]
        ind = ((ind_w >> (8 * K)) & 0xFF)[:, None]
        x = (tl.load(tab_ptr + q0 * 4 + pp) + tl.load(tab_ptr + 1024 + q1 * 4 + pp)
             + tl.load(tab_ptr + 2048 + q2 * 4 + pp))
        row = tab_ptr + 3072 + ind * 8
        fsel = tl.load(row + pp)                                                     # PRMT selectors (slots)
        fm = tl.load(row + 4 + pp)                                                   # exponent fields to replace
        s = _prmt(h_lo[:, None], h_hi[:, None], pp * 0x2222 + 0x1100, INTERP)        # [h1 h1 h0 h0]
        w = (s & smask) | (x & ~smask)                     # sign+mantissa of s, exponent fields of x (one LOP3)
        ob = fr + (8 * K) - rho + fsh                                                # the group's first fallback
        wi = ob >> 2
        w0 = tl.load(fbw + wi)                                                       # in range: FB_PAD
        w1 = tl.load(fbw + wi + 1).to(tl.uint32, bitcast=True).to(tl.uint64)
        w2 = tl.load(fbw + wi + 2)
        sh = ((ob & 3) * 8).to(tl.uint64)                                            # funnel shifts (SHF)
        lo = (((w1 << 32) | w0.to(tl.uint32, bitcast=True).to(tl.uint64)) >> sh).to(tl.uint32)
        hi = (((w2.to(tl.uint32, bitcast=True).to(tl.uint64) << 32) | w1) >> sh).to(tl.uint32)
        f = _prmt(lo.to(tl.int32, bitcast=True)[:, None], hi.to(tl.int32, bitcast=True)[:, None], fsel, INTERP)
        return (w & ~fm) | (f & fm)                        # rotated exponent in bytes 0-1 | 2-3: fields 7, 23

    @triton.jit
    def _decode_block(p0, p1, p2, tab_ptr, hi_ptr, fb_ptr, blk_ptr, sub_ptr, blk, INTERP: tl.constexpr):
        """(64, 64) int16 words of block blk (row-major) from its bit planes (_block_planes) and the device
        layout (device_layout). Entry u = (half, t) of the (128,) tensors (one per thread) decodes rows
        4 half .. 4 half + 3 of 8x8 tile t: 32 consecutive weights of the storage order; tab_ptr: the decode
        tables (decode_tables)."""
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
        hb = tl.load(blk_ptr + blk).to(tl.int64)                                     # in-window before the block
        rank = sub + pt + half * cl                                                  # ... before the thread, in it
        # the block's fallbacks start at 4096 blk - hb: the thread's first is its fallback rank in the block
        fb0 = blk.to(tl.int64) * 4096 - hb
        fbw = fb_ptr.to(tl.pointer_type(tl.int32)) + (fb0 >> 2)
        fsh = (fb0 & 3).to(tl.int32)
        fr = 1024 * (t // 16) + 64 * (t % 16) + 32 * half - rank
        smask = tl.load(tab_ptr + 5120)                        # 0x807F807F, from memory: LOP3 takes it as operand
        # the thread's 32 hi bytes: two aligned 16-byte loads, split into the four groups' word pairs
        hp = hi_ptr.to(tl.pointer_type(tl.int32)) + blk.to(tl.int64) * 1024 + (16 * t + 8 * half)[:, None]
        ev, od = tl.split(tl.reshape(tl.load(hp + tl.arange(0, 4)[None, :]), (128, 2, 2)))   # words 0, 2 | 1, 3
        h0, h2 = tl.split(ev)
        h1, h3 = tl.split(od)
        ev, od = tl.split(tl.reshape(tl.load(hp + 4 + tl.arange(0, 4)[None, :]), (128, 2, 2)))
        h4, h6 = tl.split(ev)
        h5, h7 = tl.split(od)
        r0 = _group_row(pl0, pl1, pl2, ind_w, fr, h0, h1, fbw, fsh, tab_ptr, smask, 0, INTERP)
        r1 = _group_row(pl0, pl1, pl2, ind_w, fr, h2, h3, fbw, fsh, tab_ptr, smask, 1, INTERP)
        r2 = _group_row(pl0, pl1, pl2, ind_w, fr, h4, h5, fbw, fsh, tab_ptr, smask, 2, INTERP)
        r3 = _group_row(pl0, pl1, pl2, ind_w, fr, h6, h7, fbw, fsh, tab_ptr, smask, 3, INTERP)
        w = tl.join(tl.join(r0, r1), tl.join(r2, r3))                                # [u, pp, p, q], K = 2q + p
        v = tl.join(w.to(tl.int16), (w >> 16).to(tl.int16))                          # [u, pp, p, q, s], col 2pp + s
        v = tl.reshape(v, (2, 4, 8, 2, 4, 2, 2, 2))                                  # [half, r16, cg, r8, pp, p, q, s]
        return tl.reshape(tl.permute(v, (1, 3, 0, 6, 5, 2, 4, 7)), (64, 64))         # (r16 r8 half q p) x (cg pp s)

    @triton.jit
    def decompress_kernel(bm_ptr, tab_ptr, hi_ptr, fb_ptr, blk_ptr, sub_ptr, out_ptr, n_cb, rows, cols,
                          INTERP: tl.constexpr):
        """One 64x64 block per program, written row-major into out (rows, cols) int16."""
        blk = tl.program_id(0)
        p0, p1, p2 = _block_planes(bm_ptr, blk)
        word = _decode_block(p0, p1, p2, tab_ptr, hi_ptr, fb_ptr, blk_ptr, sub_ptr, blk, INTERP)
        row = (blk // n_cb) * 64 + tl.arange(0, 64)[:, None]
        col = (blk % n_cb) * 64 + tl.arange(0, 64)[None, :]
        tl.store(out_ptr + row.to(tl.int64) * cols + col, word, mask=(row < rows) & (col < cols))

    @triton.jit
    def fused_kernel(bm_ptr, tab_ptr, hi_ptr, fb_ptr, blk_ptr, sub_ptr, x_ptr, out_ptr, bias_ptr, n_cb, M, K,
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
            w = _decode_block(p0, p1, p2, tab_ptr, hi_ptr, fb_ptr, blk_ptr, sub_ptr, blk, INTERP)
            w = w.to(tl.bfloat16, bitcast=True)
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

_STREAMS = (("bitmaps", torch.int64), ("hi", torch.uint8), ("fallback", torch.uint8),
            ("block_offsets", (torch.int32, torch.int64)), ("sub_offsets", torch.int16))


def check_streams(bitmaps: Tensor, hi: Tensor, fallback: Tensor, block_offsets: Tensor, sub_offsets: Tensor,
                  padded: tuple[int, int]) -> None:
    """One-line UserError unless the tensors are a (rp, cp) TCA-TBE matrix in the kernels' device layout
    (device_layout: one hi byte per weight, fallback exponent bytes)."""
    rp, cp = padded
    if rp % 64 or cp % 64 or rp <= 0 or cp <= 0:
        raise UserError(f"padded shape must be positive multiples of 64, got {padded}: pass TcaTbe.padded")
    for (name, dt), t in zip(_STREAMS, (bitmaps, hi, fallback, block_offsets, sub_offsets)):
        ok = t.dtype in dt if isinstance(dt, tuple) else t.dtype == dt
        if not ok:
            raise UserError(f"TCA-TBE stream {name} must be {dt}, got {t.dtype}: pass the device layout "
                            "(kernels.device_layout of the codec's hi and fallback; bitmaps viewed as int64)")
    B = rp * cp // 4096
    if (tuple(bitmaps.shape) != (rp * cp // 64, 3) or tuple(sub_offsets.shape) != (B, 3)
            or block_offsets.numel() != B + 1):
        raise UserError(f"TCA-TBE streams do not match padded shape {padded} (bitmaps {tuple(bitmaps.shape)}, "
                        f"sub_offsets {tuple(sub_offsets.shape)}): pass the padded shape of the same encoding")
    n_fb = rp * cp - int(block_offsets[-1]) if block_offsets.device.type == "cpu" else 0   # (no GPU sync)
    if fallback.numel() < n_fb + FB_PAD:
        raise UserError(f"fallback has {fallback.numel()} bytes, the device layout has {FB_PAD} more than the "
                        "fallback count: pass kernels.device_layout(bitmaps, hi, fallback) of the codec streams")
    if hi.numel() != rp * cp:
        raise UserError(f"hi has {hi.numel()} bytes, the device layout has one per weight ({rp * cp}): pass "
                        "kernels.device_layout(bitmaps, hi, fallback) of the codec streams")
    if rp * cp >= 2 ** 31:
        raise UserError(f"TCA-TBE matrix has {rp * cp} weights (>= 2**31): the kernels index them in 32 bits; "
                        "split the matrix (e.g. by rows) into several ZipLinear")
    devs = {t.device for t in (bitmaps, hi, fallback, block_offsets, sub_offsets)}
    if len(devs) != 1:
        raise UserError(f"TCA-TBE streams are on several devices {sorted(map(str, devs))}: move them together "
                        "(.to(device))")


_TABLES: dict = {}


def decode_tables_np(e0: int) -> np.ndarray:
    """The kernels' decode tables for window start e0, (5124,) int32 (numpy; pure, the CPU tests check them):
      [0, 3072)    exponent fields, (3, 256, 4): [b, q, p] = bit 2p of q << (7 + b) | bit 2p + 1 of q << (23 + b),
                   plus ((e0 - 1) & 0xFF) << 7 | ((e0 - 1) & 0xFF) << 23 for plane b = 0; the sum over the three
                   planes of a group's bytes is the exponent fields of its four pairs (a carry out of a field,
                   e0 = 0 and code >= 1, lands in a sign bit, which the kernel takes from the hi byte);
      [3072, 5120) per indicator byte m (256, 8): 4 PRMT selectors of the pairs' fallback exponents (slot of
                   column 2p among the group's fallbacks in bytes 0, 1, of 2p + 1 in bytes 2, 3; 0 when in
                   window), 4 masks of the exponent fields to replace (0x7F80 / 0x7F800000 per fallback column);
      [5120]       0x807F807F (sign+mantissa bits of a pair, read from memory so LOP3 takes it as an operand)."""
    q = np.arange(256, dtype=np.int64)
    p = np.arange(4, dtype=np.int64)
    bit = lambda v, j: (v[:, None] >> j) & 1                                    # (256, 4)
    ex = np.stack([bit(q, 2 * p) << (7 + b) | bit(q, 2 * p + 1) << (23 + b) for b in range(3)])  # (3, 256, 4)
    e = (e0 - 1) & 0xFF
    ex[0] += e << 7 | e << 23
    inw = (q[:, None] >> np.arange(8)) & 1                                        # (256, 8)
    slot = np.where(inw == 1, 0, np.cumsum(1 - inw, axis=1) - (1 - inw))          # index among the fallbacks
    fsel = slot[:, 0::2] * 0x0011 | slot[:, 1::2] * 0x1100                        # -> bytes 0, 1 | 2, 3
    fm = np.where(inw[:, 0::2] == 0, 0x7F80, 0) | np.where(inw[:, 1::2] == 0, 0x7F800000, 0)
    per = np.concatenate([fsel, fm], axis=1)                                      # (256, 8)
    return np.concatenate([ex.reshape(-1), per.reshape(-1), [0x807F807F, 0, 0, 0]]).astype(np.uint32).view(np.int32)


def decode_tables(e0: int, device: torch.device) -> Tensor:
    """decode_tables_np(e0) on `device`, cached per (device, e0) (20 KiB each)."""
    key = (str(device), int(e0))
    if key not in _TABLES:
        _TABLES[key] = torch.from_numpy(decode_tables_np(int(e0))).to(device)
    return _TABLES[key]


def _aligned(hi: Tensor, fallback: Tensor) -> tuple[Tensor, Tensor]:
    """Streams as the kernels read them: hi 16-byte aligned (16-byte loads), the fallback exponents 4-byte
    aligned (32-bit loads; device_layout's FB_PAD bytes keep every read in range); a misaligned view is copied."""
    _hi = hi if hi.data_ptr() % 16 == 0 else hi.clone()
    _fb = fallback if fallback.data_ptr() % 4 == 0 else fallback.clone()
    return _hi, _fb


def decompress_triton(bitmaps: Tensor, hi: Tensor, fallback: Tensor, block_offsets: Tensor, sub_offsets: Tensor,
                      e0: int, shape: tuple[int, int], padded: tuple[int, int],
                      dtype: torch.dtype = torch.bfloat16) -> Tensor:
    """Block-parallel decompression: one program per 64x64 block, output (rows, cols) of `dtype`; hi and
    fallback in the device layout (device_layout)."""
    _need_triton()
    check_streams(bitmaps, hi, fallback, block_offsets, sub_offsets, padded)
    if dtype not in (torch.bfloat16, torch.float16):
        raise UserError(f"decompress dtype must be bfloat16 or float16 (the encoded dtype), got {dtype}")
    rows, cols = shape
    rp, cp = padded
    out = torch.empty(rows, cols, dtype=torch.int16, device=bitmaps.device)
    _hi, _fb = _aligned(hi, fallback)
    decompress_kernel[(rp * cp // 4096,)](bitmaps, decode_tables(e0, bitmaps.device), _hi, _fb, block_offsets,
                                          sub_offsets, out,
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
    registers; hi and fallback in the device layout (device_layout). weight_dtype: the encoded dtype
    (TcaTbe.dtype; the streams do not carry it), only bf16.
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
    _hi, _fb = _aligned(hi, fallback)
    handle = fused_kernel[(n_stripes, splits)](
        bitmaps, decode_tables(e0, x.device), _hi, _fb, block_offsets, sub_offsets, x, out,
        bias if bias is not None else y,
        n_cb, M, K, N, per, x.stride(0), SPLIT=splits > 1, HAS_BIAS=bias is not None, INTERP=_interp(),
        BLOCK_N=16, num_warps=NUM_WARPS, num_stages=NUM_STAGES)
    if x.is_cuda:
        _ctas_per_sm(handle, x.device)
    if splits > 1:
        splitk_reduce_kernel[(triton.cdiv(M, 256), N)](out, y, bias if bias is not None else y, M, N, SPLITS=splits,
                                                       HAS_BIAS=bias is not None, BLOCK=256, num_warps=4)
    return y
