"""TCA-TBE tile decode on the GPU (ZipServ, arXiv 2603.17435): a tile-parallel decompression kernel and
a fused decode+GEMM for small batch (N <= 16 tokens, the decode phase), in Triton, plus a pure-torch
reference of exactly the same per-tile arithmetic (what the CPU tests check).

Decoding one 16x64 tensor-core tile g (16 8x8 tiles t, 64 bits j each; layout in
modelpress/algos/lossless.py):
  code[t, j]  = bit j of bitmaps[16 g + t, 0] | bit j of [.., 1] << 1 | bit j of [.., 2] << 2
  inw         = code != 0
  rank[t, j]  = number of in-window elements before (t, j) inside the tile
              = exclusive cumsum of inw along j + exclusive cumsum over t of the row sums
  off(g)      = block_offsets[g // 4] + (sub_offsets[g // 4, g % 4 - 1] if g % 4 else 0)
  word        = sign/mantissa byte h = hi[off(g) + rank]  -> h>>7 << 15 | (code+e0-1) << 7 | h & 0x7F
                or fallback[1024 g - off(g) + (64 t + j - rank)] when code == 0
  position    = g -> (block row rb, block col cb, r16), t -> (k16, k8, r8), j -> (i, jj):
                row = 64 rb + 16 r16 + 8 r8 + i, col = 64 cb + 16 k16 + 8 k8 + jj
No state is carried between tiles, so every tile decodes independently (one program per tile).

Triton is optional: the kernels are defined only when it imports, so this module imports without triton
or CUDA. The fused kernel computes Y^T = W X^T with W decoded into registers 16 rows x 64 columns at a
time, tl.dot on (16, 64) x (64, 16), fp32 accumulation, split-K with fp32 atomics."""
from __future__ import annotations

import os

import torch
from torch import Tensor

TILE_ROWS, TILE_COLS = 16, 64
FUSED_MAX_N = 16


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


# --------------------------------------------------------------------------- Triton kernels

try:  # optional dependency: without triton (or CUDA) only the torch reference runs
    import triton
    import triton.language as tl
except ImportError:  # pragma: no cover - depends on the environment
    triton = None


def triton_available() -> bool:
    return triton is not None


def _kernels():
    if triton is None:
        raise RuntimeError("triton is not installed: pip install 'modelpress[gpu]' (or use decompress_torch)")
    return triton, decompress_kernel, fused_kernel


if triton is not None:
    @triton.jit
    def _decode_tile(bm_ptr, hi_ptr, fb_ptr, blk_ptr, sub_ptr, g, e0):
        """(16, 64) int32 words of 16x64 tile g in (t, j) layout."""
        t = tl.arange(0, 16)[:, None]
        j = tl.arange(0, 64)[None, :].to(tl.int64)
        base = (g * 16 + t) * 3
        b0 = tl.load(bm_ptr + base)
        b1 = tl.load(bm_ptr + base + 1)
        b2 = tl.load(bm_ptr + base + 2)
        code = (((b0 >> j) & 1) | (((b1 >> j) & 1) << 1) | (((b2 >> j) & 1) << 2)).to(tl.int32)
        inw = (code != 0).to(tl.int32)
        row_cnt = tl.sum(inw, axis=1)                                     # (16,)
        rank = tl.cumsum(inw, axis=1) - inw + (tl.cumsum(row_cnt, axis=0) - row_cnt)[:, None]
        blk = g // 4
        r16 = g % 4
        hoff = tl.load(blk_ptr + blk).to(tl.int64) + tl.load(sub_ptr + blk * 3 + r16 - 1, mask=r16 > 0,
                                                             other=0).to(tl.int64)
        s = (t * 64 + j).to(tl.int64)
        h = tl.load(hi_ptr + hoff + rank, mask=inw != 0, other=0).to(tl.int32)
        f = tl.load(fb_ptr + (g.to(tl.int64) * 1024 - hoff) + (s - rank), mask=inw == 0, other=0).to(tl.int32)
        word = ((h & 0x80) << 8) | ((code + e0 - 1) << 7) | (h & 0x7F)
        return tl.where(inw != 0, word, f & 0xFFFF)

    @triton.jit
    def decompress_kernel(bm_ptr, hi_ptr, fb_ptr, blk_ptr, sub_ptr, out_ptr, e0, n_cb, rows, cols):
        g = tl.program_id(0)                                             # one 16x64 tile per program
        word = _decode_tile(bm_ptr, hi_ptr, fb_ptr, blk_ptr, sub_ptr, g, e0)
        t = tl.arange(0, 16)[:, None]
        j = tl.arange(0, 64)[None, :]
        blk = g // 4
        row = (blk // n_cb) * 64 + (g % 4) * 16 + (t % 2) * 8 + j // 8
        col = (blk % n_cb) * 64 + (t // 4) * 16 + ((t // 2) % 2) * 8 + j % 8
        ptr = out_ptr + row.to(tl.int64) * cols + col
        tl.store(ptr, word.to(tl.int16), mask=(row < rows) & (col < cols))

    @triton.jit
    def fused_kernel(bm_ptr, hi_ptr, fb_ptr, blk_ptr, sub_ptr, x_ptr, y_ptr, bias_ptr, e0, n_cb, M, K, N, cb_per_split,
                     stride_xn, ATOMIC: tl.constexpr, HAS_BIAS: tl.constexpr, F32_DOT: tl.constexpr):
        """y[n, m] (+)= sum_k W[m, k] x[n, k] for the 16 rows of one tile row and a range of K tiles.
        ATOMIC (split-K): fp32 atomics into a zeroed fp32 y, bias added by the caller; otherwise one
        program owns its outputs and stores them (+ bias) straight in y's dtype (bf16): no epilogue kernel."""
        pid_m = tl.program_id(0)                                         # 16-row stripe
        pid_k = tl.program_id(1)                                         # split-K slice
        rb = pid_m // 4
        r16 = pid_m % 4
        kk = tl.arange(0, 64)
        nn = tl.arange(0, 16)
        acc = tl.zeros((16, 16), dtype=tl.float32)
        cb0 = pid_k * cb_per_split
        for cb in range(cb0, tl.minimum(cb0 + cb_per_split, n_cb)):
            g = (rb * n_cb + cb) * 4 + r16
            word = _decode_tile(bm_ptr, hi_ptr, fb_ptr, blk_ptr, sub_ptr, g, e0)  # (16, 64) in (t, j) layout
            w = word.to(tl.int16).to(tl.bfloat16, bitcast=True)
            # (t, j) = (k16, k8, r8, i, jj) -> rows (r8, i), cols (k16, k8, jj)
            w = tl.reshape(tl.permute(tl.reshape(w, (4, 2, 2, 8, 8)), (2, 3, 0, 1, 4)), (16, 64))
            k = cb * 64 + kk
            xt = tl.load(x_ptr + nn[None, :] * stride_xn + k[:, None],
                         mask=(k[:, None] < K) & (nn[None, :] < N), other=0.0)       # (64, 16) = X^T chunk
            if F32_DOT:  # Triton's CPU interpreter mis-computes bf16 tl.dot; the GPU path keeps bf16
                acc += tl.dot(w.to(tl.float32), xt.to(tl.float32))
            else:
                acc += tl.dot(w, xt)
        m = pid_m * 16 + tl.arange(0, 16)
        ptr = y_ptr + nn[None, :] * M + m[:, None]
        mask = (m[:, None] < M) & (nn[None, :] < N)
        if ATOMIC:
            tl.atomic_add(ptr, acc, mask=mask)
        else:
            if HAS_BIAS:
                acc += tl.load(bias_ptr + m, mask=m < M, other=0.0).to(tl.float32)[:, None]
            tl.store(ptr, acc.to(y_ptr.dtype.element_ty), mask=mask)



def decompress_triton(bitmaps: Tensor, hi: Tensor, fallback: Tensor, block_offsets: Tensor, sub_offsets: Tensor,
                      e0: int,
                      shape: tuple[int, int], padded: tuple[int, int], dtype: torch.dtype = torch.bfloat16) -> Tensor:
    """Tile-parallel decompression: one program per 16x64 tile, output (rows, cols) of `dtype`."""
    _, dec, _ = _kernels()
    rows, cols = shape
    rp, cp = padded
    out = torch.empty(rows, cols, dtype=torch.int16, device=bitmaps.device)
    G = rp * cp // 1024
    _hi = hi if hi.numel() else torch.zeros(1, dtype=torch.uint8, device=hi.device)
    _fb = fallback if fallback.numel() else torch.zeros(1, dtype=torch.int16, device=hi.device)
    dec[(G,)](bitmaps, _hi, _fb, block_offsets, sub_offsets, out, e0, cp // 64, rows, cols, num_warps=4)
    return out.view(dtype)


def split_k(n_stripes: int, n_cb: int, n_sm: int, per_sm: int = 8) -> int:
    """K slices so that about `per_sm` programs per SM run: a program decodes one tile at a time, so
    many programs must be in flight to keep enough loads outstanding (never more slices than K tiles)."""
    return max(1, min(n_cb, -(-per_sm * n_sm // max(n_stripes, 1))))


def fused_linear_triton(x: Tensor, bitmaps: Tensor, hi: Tensor, fallback: Tensor, block_offsets: Tensor,
                        sub_offsets: Tensor, e0: int, shape: tuple[int, int], padded: tuple[int, int], bias: Tensor | None = None,
                        splits: int | None = None) -> Tensor:
    """y = x W^T (+ bias) for x (N, K) bf16 with N <= 16, W decoded tile by tile in registers."""
    _, _, fused = _kernels()
    M, K = shape
    rp, cp = padded
    N = x.shape[0]
    if N > FUSED_MAX_N or x.dtype != torch.bfloat16:
        raise ValueError(f"fused kernel takes bf16 x with N <= {FUSED_MAX_N}, got {tuple(x.shape)} {x.dtype}")
    x = x.contiguous()
    n_stripes, n_cb = rp // 16, cp // 64
    if splits is None:
        n_sm = torch.cuda.get_device_properties(x.device).multi_processor_count if x.is_cuda else 1
        splits = split_k(n_stripes, n_cb, n_sm)
    per = -(-n_cb // splits)
    splits = -(-n_cb // per)
    atomic = splits > 1
    y = (torch.zeros(N, M, dtype=torch.float32, device=x.device) if atomic
         else torch.empty(N, M, dtype=torch.bfloat16, device=x.device))
    _hi = hi if hi.numel() else torch.zeros(1, dtype=torch.uint8, device=hi.device)
    _fb = fallback if fallback.numel() else torch.zeros(1, dtype=torch.int16, device=hi.device)
    fused[(n_stripes, splits)](bitmaps, _hi, _fb, block_offsets, sub_offsets, x, y, bias if bias is not None else y, e0, n_cb,
                               M, K, N, per, x.stride(0), ATOMIC=atomic, HAS_BIAS=bias is not None,
                               F32_DOT=os.environ.get("TRITON_INTERPRET") == "1", num_warps=4)
    if not atomic:
        return y
    if bias is not None:
        y += bias.float()
    return y.to(torch.bfloat16)
