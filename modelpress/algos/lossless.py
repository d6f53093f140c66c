"""Lossless codecs for 16-bit float weight matrices: TCA-TBE for BF16, the Huffman baseline for BF16 and FP16.

TCA-TBE, the Tensor-Core-Aware Triple-Bitmap Encoding of ZipServ (arXiv 2603.17435):
  * each 16-bit word u is split into the 8-bit field e = (u >> 7) & 0xFF (the BF16 exponent) and the
    byte h = sign << 7 | (u & 0x7F) (sign and 7 mantissa bits);
  * one window of 7 contiguous exponents [e0, e0 + 6] per matrix, chosen to cover the most elements
    (only e0 is stored); code c = e - e0 + 1 in 1..7 inside the window, c = 0 = fallback;
  * the matrix is padded to multiples of 64 (filler: exponent e0, h = 0, i.e. code 1; the shape is
    recorded and decode crops) and cut into 8x8 tiles,
    grouped into 16x64 "tensor-core" tiles and 64x64 blocks. Storage order: 64x64 blocks row-major,
    the four 16x64 tiles of a block top to bottom, inside a 16x64 tile the 16 8x8 tiles in
    mma.m16n8k16 A-fragment order (for each 16-wide k chunk: rows 0-7/cols 0-7, rows 8-15/cols 0-7,
    rows 0-7/cols 8-15, rows 8-15/cols 8-15), inside an 8x8 tile row-major (bit j = row j // 8,
    col j % 8, so lane l of a warp owns bits 2l and 2l + 1);
  * three 64-bit bitmaps per 8x8 tile hold the bit planes of the 3-bit code;
  * one byte h per in-window element (stream `hi`), the full 16-bit word per fallback (stream
    `fallback`), both in storage order;
  * per-tile offsets, so any 16x64 tile g decodes on its own: the number of in-window elements before
    it is tile_offsets[g] = block_offsets[g // 4] + (sub_offsets[g // 4, g % 4 - 1] if g % 4 else 0)
    (prefix sums: 32 bits per 64x64 block + 16 bits per further 16x64 tile, 0.02 bits per weight),
    and its fallbacks start at 1024 g - tile_offsets[g].

Huffman baseline in the style of DFloat11 (arXiv 2504.11651): canonical, length-limited Huffman code
of the exponent byte e, raw byte h. The bit stream is cut into lanes of LANE_BYTES bytes; per lane a
4-bit "gap" (bit offset of the first code that starts in it) lets all lanes decode in parallel
(vectorised over lanes with a lookup table on LUT_BITS-bit windows).

entropy_bits: empirical (order-0) entropy per weight, of the whole 16-bit symbol ("symbol16", the
limit of any per-element code) or of the exponent field plus 8 raw bits ("exp+8", the limit of codecs
that, like both above, keep sign and mantissa raw).

Everything is vectorised numpy (no per-element Python loops), run over cache-sized chunks of block rows
(TCA-TBE) or symbols/lanes (Huffman); to_bytes/from_bytes add a CRC32."""
from __future__ import annotations

import heapq
import json
import struct
import zlib
from dataclasses import dataclass

import numpy as np
import torch
from torch import Tensor

from ..errors import UserError

WINDOW = 7                      # exponents per window (codes 1..7)
BLOCK = 64                      # 64x64 block tiles
TC_ROWS = 16                    # 16x64 tensor-core tiles
TC_TILE = TC_ROWS * BLOCK       # 1024 elements
TILES_PER_TC = TC_TILE // 64    # 16 8x8 tiles per 16x64 tile
LUT_BITS = 12                   # Huffman: max code length = lookup window
LANE_BYTES = 16                 # Huffman: bytes of bit stream per decode lane
CHUNK_ELEMS = 1 << 18           # elements per chunk of block rows (cache-sized temporaries)
MAGIC = b"MPZ1"

_DTYPES = {"bfloat16": torch.bfloat16, "float16": torch.float16}
_L8 = np.uint64(0x0101010101010101)
_GATHER = np.uint64(0x0102040810204080)   # (x & _L8) * _GATHER >> 56 packs the 8 byte-LSBs into a byte


_SPREAD_MUL = np.uint64(0x8040201008040201)  # carry-free: bit i of a byte -> bit 7 of byte 7 - i
_SPREAD_MASK = np.uint64(0x8080808080808080)


def _spread(x: np.ndarray) -> np.ndarray:
    """uint8 bytes -> uint64 whose byte i (little-endian) is bit i of the byte (as 0/1)."""
    y = x.astype(np.uint64)
    y *= _SPREAD_MUL
    y &= _SPREAD_MASK
    y >>= np.uint64(7)
    return y.byteswap()


# ----------------------------------------------------------------------------------------- helpers

def _words(w: Tensor) -> tuple[np.ndarray, str]:
    """(rows, cols) bf16/fp16 tensor -> its raw 16-bit words as uint16 numpy, and the dtype name."""
    if not isinstance(w, Tensor) or w.dtype not in (torch.bfloat16, torch.float16):
        raise UserError(f"lossless codecs take bfloat16/float16 tensors, got {getattr(w, 'dtype', type(w))}: "
                        "cast the weights first (lossless.cast: bf16)")
    if w.dim() != 2:
        raise UserError(f"lossless codecs take 2-D weight matrices, got shape {tuple(w.shape)}")
    name = "bfloat16" if w.dtype == torch.bfloat16 else "float16"
    return w.detach().cpu().contiguous().view(torch.int16).numpy().view(np.uint16), name


def _tensor(u: np.ndarray, dtype: str) -> Tensor:
    return torch.from_numpy(np.ascontiguousarray(u).view(np.int16)).view(_DTYPES[dtype])


def _tile_perm_shape(rp: int, cp: int) -> tuple[tuple[int, ...], tuple[int, ...]]:
    # padded (rp, cp) viewed as (rb, r16, r8, i, cb, k16, k8, [j]); storage order (rb, cb, r16, k16, k8, r8, i, [j]).
    # The 8 contiguous columns j of a tile row move together as one 16-byte void item (fast copy).
    return (rp // 64, 4, 2, 8, cp // 64, 4, 2), (0, 4, 1, 5, 6, 2, 3)


def to_tile_order(m: np.ndarray) -> np.ndarray:
    """(rp, cp) uint16 with rp, cp multiples of 64 -> flat (rp*cp,) in TCA-TBE storage order."""
    shape, perm = _tile_perm_shape(*m.shape)
    v = np.ascontiguousarray(m).view("V16").reshape(shape)
    return v.transpose(perm).copy().view(np.uint16).reshape(-1)


def from_tile_order(flat: np.ndarray, rp: int, cp: int) -> np.ndarray:
    """Inverse of to_tile_order: flat storage order -> (rp, cp)."""
    shape, perm = _tile_perm_shape(rp, cp)
    stored = tuple(shape[p] for p in perm)
    v = np.ascontiguousarray(flat).view("V16").reshape(stored)
    return v.transpose(np.argsort(perm)).copy().view(np.uint16).reshape(rp, cp)


def best_window(hist: np.ndarray) -> int:
    """Start e0 of the 7 contiguous exponents covering the most elements, from the (256,) exponent
    histogram (lowest e0 on ties)."""
    cover = np.convolve(hist.astype(np.int64), np.ones(WINDOW, dtype=np.int64), mode="valid")  # (250,)
    return int(np.argmax(cover))


def exponent_hist(e8: np.ndarray) -> np.ndarray:
    """(256,) counts of an uint8 array (torch.bincount: several times faster than np.bincount on uint8)."""
    return torch.bincount(torch.from_numpy(e8.reshape(-1)), minlength=256).numpy()


# ----------------------------------------------------------------------------------------- TCA-TBE

@dataclass
class TcaTbe:
    """One TCA-TBE-encoded matrix. Arrays are in storage order (see module docstring)."""
    shape: tuple[int, int]          # original (rows, cols)
    padded: tuple[int, int]         # (rp, cp), multiples of 64
    e0: int                         # window start exponent
    dtype: str                      # "bfloat16" | "float16"
    bitmaps: np.ndarray             # (T, 3) uint64, T = rp*cp/64; bitmaps[t, b] = bit plane b of 8x8 tile t
    hi: np.ndarray                  # (n_in,) uint8 sign+mantissa of in-window elements
    fallback: np.ndarray            # (n_fb,) uint16 full words of out-of-window elements
    block_offsets: np.ndarray       # (B + 1,) int32 (int64 if >= 2**31) in-window prefix per 64x64 block
    sub_offsets: np.ndarray         # (B, 3) int16 in-window prefix of 16x64 tiles 1..3 inside their block

    @property
    def nbytes(self) -> int:
        """Stored bytes: the arrays plus 8 bytes of header (e0, shape)."""
        return int(self.bitmaps.nbytes + self.hi.nbytes + self.fallback.nbytes + self.block_offsets.nbytes
                   + self.sub_offsets.nbytes + 8)

    @property
    def tile_offsets(self) -> np.ndarray:
        """(G + 1,) int64 in-window elements before each 16x64 tile (and in total), G = rp*cp/1024."""
        return tile_offsets(self.block_offsets, self.sub_offsets)

    @property
    def numel(self) -> int:
        return self.shape[0] * self.shape[1]


def _chunk_rows(cp: int) -> int:
    """Rows per chunk (a multiple of 64): about CHUNK_ELEMS elements, so temporaries stay in cache and
    come from the allocator's free lists instead of fresh, page-faulting memory."""
    return BLOCK * max(1, CHUNK_ELEMS // (BLOCK * cp))


def _encode_rows(u: np.ndarray, e0: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Block rows (64 k, cp) uint16 -> (bitmaps (T, 3) uint64, hi uint8, fallback uint16). The storage
    order is block-row-major, so a matrix's streams are the concatenation of its block rows' streams."""
    t = to_tile_order(u)                                         # (n,) storage order
    n = t.size
    e8 = np.empty(n, dtype=np.uint8)
    np.right_shift(t, 7, out=e8, casting="unsafe")               # exponent field (sign bit cast away)
    codes = e8
    codes -= np.uint8((e0 - 1) & 0xFF)                           # code = e - e0 + 1 (mod 256) ...
    np.multiply(codes, codes <= 7, out=codes)                    # ... kept if in 1..7, else 0 (fallback)
    inw = codes != 0
    x = t[inw]                                                   # in-window words
    np.bitwise_and(x, 0x807F, out=x)                             # keep sign and 7 mantissa bits
    hi = np.empty(x.size, dtype=np.uint8)
    np.right_shift(x, 8, out=hi, casting="unsafe")               # sign -> bit 7
    np.bitwise_or(hi, x, out=hi, casting="unsafe")               # | mantissa
    np.logical_not(inw, out=inw)
    fallback = t[inw]
    # bit planes: 8 codes per uint64 (one per byte); plane b of those 8 codes packed into one byte
    c64 = codes.view(np.uint64)                                  # (T*8,) one tile row each
    T = n // 64
    planes = np.empty((T, 3, 8), dtype=np.uint8)
    tmp = np.empty_like(c64)
    for b in range(3):
        np.right_shift(c64, np.uint64(b), out=tmp)
        tmp &= _L8
        tmp *= _GATHER
        tmp >>= np.uint64(56)
        planes[:, b, :] = tmp.reshape(T, 8)
    return planes.view(np.uint64).reshape(T, 3), hi, fallback


FP16_REFUSED = ("lossless.codec: tca-tbe codes the bf16 exponent field; fp16 weights would come out at ~104% of "
                "their raw size (~70% fallbacks): use codec huffman for fp16 weights (zip --codec huffman)")


def tca_tbe_encode(w: Tensor) -> TcaTbe:
    """(rows, cols) bf16 -> TcaTbe. Padding elements get exponent e0 (code 1) and h = 0. fp16 is refused:
    its 5-bit exponent straddles the 8-bit field, so the 7-exponent window covers ~30% of the weights.
    (fp16 blobs written before this check still decode bit-exactly.)"""
    if isinstance(w, Tensor) and w.dtype == torch.float16:
        raise UserError(FP16_REFUSED)
    return _tca_tbe_encode(w)


def _tca_tbe_encode(w: Tensor) -> TcaTbe:
    u, dtype = _words(w)
    rows, cols = u.shape
    rp, cp = max(-(-rows // BLOCK), 1) * BLOCK, max(-(-cols // BLOCK), 1) * BLOCK
    step = _chunk_rows(cp)
    hist = np.zeros(256, dtype=np.int64)
    e8 = np.empty((min(step, rows), cols), dtype=np.uint8)
    for r in range(0, rows, step):                               # pass 1: exponent histogram -> window
        part = e8[: min(step, rows - r)]
        np.right_shift(u[r: r + step], 7, out=part, casting="unsafe")
        hist += exponent_hist(part)
    e0 = best_window(hist) if u.size else 127
    out_b, out_h, out_f = [], [], []
    for r in range(0, rp, step):                                 # pass 2: encode block rows
        chunk = u[r: r + step]
        if chunk.shape != (min(step, rp - r), cp):               # last rows / columns: pad in-window
            pad = np.full((min(step, rp - r), cp), np.uint16(e0 << 7), dtype=np.uint16)
            pad[: chunk.shape[0], :cols] = chunk
            chunk = pad
        bm, hi, fb = _encode_rows(chunk, e0)
        out_b.append(bm)
        out_h.append(hi)
        out_f.append(fb)
    bitmaps = np.concatenate(out_b)
    return TcaTbe((rows, cols), (rp, cp), e0, dtype, bitmaps, np.concatenate(out_h), np.concatenate(out_f),
                  *_offsets(bitmaps))


def _offsets(bitmaps: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """From the bitmap popcounts: (block_offsets (B + 1,) exclusive prefix of in-window counts per 64x64
    block, int32 when it fits else int64; sub_offsets (B, 3) int16 prefix of 16x64 tiles 1..3 in the block)."""
    nz = bitmaps[:, 0] | bitmaps[:, 1] | bitmaps[:, 2]           # (T,) in-window mask per 8x8 tile
    counts = np.bitwise_count(nz).reshape(-1, 4, TILES_PER_TC).sum(axis=2, dtype=np.int64)  # (B, 4)
    blk = np.zeros(counts.shape[0] + 1, dtype=np.int64)
    np.cumsum(counts.sum(axis=1), out=blk[1:])
    sub = np.cumsum(counts[:, :3], axis=1).astype(np.int16)     # <= 3072
    return (blk.astype(np.int32) if blk[-1] < 2 ** 31 else blk), sub


def tile_offsets(block_offsets: np.ndarray, sub_offsets: np.ndarray) -> np.ndarray:
    """(G + 1,) int64 in-window elements before each 16x64 tile, from the stored block/sub offsets."""
    B = sub_offsets.shape[0]
    out = np.empty(4 * B + 1, dtype=np.int64)
    base = block_offsets[:B].astype(np.int64)
    out[0:-1:4] = base
    out[1::4] = base + sub_offsets[:, 0]
    out[2::4] = base + sub_offsets[:, 1]
    out[3::4] = base + sub_offsets[:, 2]
    out[-1] = block_offsets[B]
    return out


def _decode_rows(bitmaps: np.ndarray, hi: np.ndarray, fallback: np.ndarray, e0: int, cp: int) -> np.ndarray:
    """Streams of whole block rows -> (64 k, cp) uint16."""
    B = np.ascontiguousarray(bitmaps).view(np.uint8).reshape(-1, 3, 8)  # byte r of plane b = tile row r
    c64 = _spread(B[:, 0])
    c64 |= _spread(B[:, 1]) << np.uint64(1)
    c64 |= _spread(B[:, 2]) << np.uint64(2)
    codes = c64.view(np.uint8).reshape(-1)                       # (n,) uint8
    inw = codes != 0
    hfull = np.zeros(codes.size, dtype=np.uint8)
    hfull[inw] = hi
    # word = sign << 15 | (code + e0 - 1) << 7 | mantissa (uint16 arithmetic; wrong only where code = 0,
    # which the fallbacks overwrite). h * 257 puts the sign at bit 15 and keeps the mantissa in bits 0-6.
    vals = hfull.astype(np.uint16)
    vals *= np.uint16(257)
    vals &= np.uint16(0x807F)
    ex = codes.astype(np.uint16)
    ex <<= np.uint16(7)
    ex += np.uint16(((e0 - 1) << 7) & 0xFFFF)
    vals |= ex
    if fallback.size:
        np.logical_not(inw, out=inw)
        vals[inw] = fallback
    return from_tile_order(vals, vals.size // cp, cp)


def tca_tbe_decode(enc: TcaTbe) -> Tensor:
    """TcaTbe -> the original (rows, cols) tensor, bit-exact (decoded block row chunk by chunk, each
    from its own slice of the streams, found through the tile offsets)."""
    rp, cp = enc.padded
    rows, cols = enc.shape
    T, G = rp * cp // 64, rp * cp // TC_TILE
    if enc.bitmaps.shape != (T, 3) or enc.sub_offsets.shape != (G // 4, 3) or enc.block_offsets.size != G // 4 + 1:
        raise UserError("TCA-TBE data is inconsistent (array shapes do not match the matrix): the blob is corrupted")
    offs = enc.tile_offsets
    nz = enc.bitmaps[:, 0] | enc.bitmaps[:, 1] | enc.bitmaps[:, 2]
    n_in = int(np.bitwise_count(nz).sum(dtype=np.int64))
    if n_in != enc.hi.size or offs[-1] != n_in or rp * cp - n_in != enc.fallback.size:
        raise UserError("TCA-TBE data is inconsistent (bitmap popcount != stream lengths): the blob is corrupted")
    out = np.empty((rows, cols), dtype=np.uint16)
    step = _chunk_rows(cp)
    tiles_per_row = cp // 64 * 64                                # 8x8 tiles per 64-row block row
    for r in range(0, rp, step):
        k = min(step, rp - r)
        t0, t1 = r // 64 * tiles_per_row, (r + k) // 64 * tiles_per_row
        g0, g1 = t0 // TILES_PER_TC, t1 // TILES_PER_TC
        h0, h1 = offs[g0], offs[g1]
        part = _decode_rows(enc.bitmaps[t0:t1], enc.hi[h0:h1], enc.fallback[g0 * TC_TILE - h0: g1 * TC_TILE - h1],
                            enc.e0, cp)
        if r < rows:
            out[r: r + k] = part[: rows - r, :cols]
    return _tensor(out, enc.dtype)


def tca_tbe_decode_rows(enc: TcaTbe, rows: np.ndarray) -> Tensor:
    """Rows `rows` (r,) int of the matrix, bit-exact, decoding only the 64-row block rows that hold them
    (an embedding lookup touches a few block rows, not the table). Returns (r, cols)."""
    rows = np.asarray(rows, dtype=np.int64).reshape(-1)
    n_rows, cols = enc.shape
    if rows.size and (rows.min() < 0 or rows.max() >= n_rows):
        raise UserError(f"row index out of range for a matrix of {n_rows} rows: got "
                        f"{int(rows.min())}..{int(rows.max())}")
    cp = enc.padded[1]
    offs = enc.tile_offsets
    tiles_per_row = cp // 64 * 64                                # 8x8 tiles per 64-row block row
    out = np.empty((rows.size, cols), dtype=np.uint16)
    for rb in np.unique(rows // 64):                             # loop over the distinct block rows only
        t0, t1 = rb * tiles_per_row, (rb + 1) * tiles_per_row
        g0, g1 = t0 // TILES_PER_TC, t1 // TILES_PER_TC
        h0, h1 = offs[g0], offs[g1]
        part = _decode_rows(enc.bitmaps[t0:t1], enc.hi[h0:h1], enc.fallback[g0 * TC_TILE - h0: g1 * TC_TILE - h1],
                            enc.e0, cp)                          # (64, cp)
        sel = rows // 64 == rb
        out[sel] = part[rows[sel] - rb * 64, :cols]
    return _tensor(out, enc.dtype)


# ----------------------------------------------------------------------------------------- Huffman

@dataclass
class Huffman:
    """DFloat11-style encoding: canonical Huffman of the exponent field, raw sign+mantissa byte."""
    shape: tuple[int, int]
    dtype: str
    lengths: np.ndarray             # (256,) uint8 code length per exponent value (0 = absent)
    stream: np.ndarray              # (nbytes,) uint8 MSB-first bit stream, LANE_BYTES-aligned
    gaps: np.ndarray                # (ceil(lanes/2),) uint8, two 4-bit gaps per byte
    n_bits: int                     # valid bits in stream
    sm: np.ndarray                  # (n,) uint8 raw sign+mantissa bytes

    @property
    def nbytes(self) -> int:
        return int(self.stream.nbytes + self.gaps.nbytes + self.sm.nbytes + 256 // 2 + 16)

    @property
    def numel(self) -> int:
        return self.shape[0] * self.shape[1]


def huffman_lengths(freq: np.ndarray, max_len: int = LUT_BITS) -> np.ndarray:
    """Huffman code lengths for (256,) symbol counts, limited to max_len bits by halving counts."""
    freq = freq.astype(np.int64).copy()
    present = np.flatnonzero(freq)
    lengths = np.zeros(freq.size, dtype=np.uint8)
    if present.size == 0:
        return lengths
    if present.size == 1:
        lengths[present] = 1
        return lengths
    while True:
        heap = [(int(freq[s]), int(s), (int(s),)) for s in present]  # loop over <= 256 symbols
        heapq.heapify(heap)
        depth = dict.fromkeys((int(s) for s in present), 0)
        while len(heap) > 1:
            f1, k1, a = heapq.heappop(heap)
            f2, k2, b = heapq.heappop(heap)
            for s in a + b:
                depth[s] += 1
            heapq.heappush(heap, (f1 + f2, min(k1, k2), a + b))
        if max(depth.values()) <= max_len:
            for s, d in depth.items():
                lengths[s] = d
            return lengths
        freq[present] = (freq[present] + 1) // 2


def canonical_codes(lengths: np.ndarray) -> np.ndarray:
    """Canonical code values (256,) uint32 for given lengths (sorted by (length, symbol))."""
    codes = np.zeros(lengths.size, dtype=np.uint32)
    code, prev = 0, 0
    for s in sorted(np.flatnonzero(lengths), key=lambda s: (lengths[s], s)):
        code <<= int(lengths[s]) - prev
        prev = int(lengths[s])
        codes[s] = code
        code += 1
    return codes


def _decode_lut(lengths: np.ndarray) -> np.ndarray:
    """(2**LUT_BITS,) uint16 table: window of LUT_BITS bits -> length << 8 | symbol."""
    codes = canonical_codes(lengths)
    lut = np.zeros(1 << LUT_BITS, dtype=np.uint16)
    for s in np.flatnonzero(lengths):
        ln = int(lengths[s])
        lo = int(codes[s]) << (LUT_BITS - ln)
        lut[lo: lo + (1 << (LUT_BITS - ln))] = (ln << 8) | s
    return lut


def _pack_items(c: np.ndarray, ln: np.ndarray, start_bit: int) -> tuple[np.ndarray, np.ndarray, int]:
    """Concatenate items (code c < 2**ln, ln <= 56 bits) MSB-first, the first at bit `start_bit` of the
    whole stream. Returns (64-bit words from word start_bit // 64 on, start bit of each item, end bit)."""
    ln64 = ln.astype(np.int64)
    pos = np.cumsum(ln64)
    end_bit = start_bit + (int(pos[-1]) if pos.size else 0)
    pos -= ln64
    pos += start_bit
    word = pos >> 6
    word -= start_bit >> 6
    sh = 64 - (pos & 63) - ln64                                  # < 0: the item spills into word + 1
    c = c.astype(np.uint64)
    main = (c << np.maximum(sh, 0).astype(np.uint64)) >> np.maximum(-sh, 0).astype(np.uint64)
    words = np.zeros((end_bit >> 6) - (start_bit >> 6) + 2, dtype=np.uint64)
    if c.size:
        starts = np.flatnonzero(np.r_[True, word[1:] != word[:-1]])
        words[word[starts]] = np.add.reduceat(main, starts)     # bits of one word never overlap: sum == or
        sp = np.flatnonzero(sh < 0)
        words[word[sp] + 1] |= c[sp] << (64 + sh[sp]).astype(np.uint64)
    return words, pos, end_bit


def _lane_gaps(lane_start: np.ndarray, ipos: np.ndarray, n_sym: np.ndarray, first_sym: np.ndarray,
               e: np.ndarray, lengths: np.ndarray, end_bit: int) -> np.ndarray:
    """Bit offset from each lane start to the first symbol starting at or after it. ipos: start bits of
    the items (n_sym symbols each, the first being e[first_sym]) of a chunk that contains the lane
    starts; end_bit: where the chunk ends (the next symbol starts there)."""
    q = np.maximum(np.searchsorted(ipos, lane_start, side="right") - 1, 0)  # item holding the lane start
    cand = np.full(lane_start.size, end_bit, dtype=np.int64)
    p = ipos[q]
    for k in range(4):                                           # <= 4 symbol starts inside the item
        ok = (k < n_sym[q]) & (p >= lane_start) & (p < cand)
        cand = np.where(ok, p, cand)
        p = p + lengths[e[np.minimum(first_sym[q] + k, e.size - 1)]].astype(np.int64)
    p_next = np.where(q + 1 < ipos.size, ipos[np.minimum(q + 1, ipos.size - 1)], end_bit)
    cand = np.minimum(cand, np.where(p_next >= lane_start, p_next, end_bit))
    return cand - lane_start


def huffman_encode(w: Tensor) -> Huffman:
    """Codes are concatenated four symbols at a time (pair tables on the uint16 view of the exponent
    bytes), so the 64-bit packing touches n/4 items; symbols are processed in cache-sized chunks."""
    u, dtype = _words(w)
    u = u.reshape(-1)
    n = u.size
    e = np.empty(n, dtype=np.uint8)
    np.right_shift(u, 7, out=e, casting="unsafe")
    x = u & np.uint16(0x807F)
    sm = np.empty(n, dtype=np.uint8)
    np.right_shift(x, 8, out=sm, casting="unsafe")
    np.bitwise_or(sm, x, out=sm, casting="unsafe")
    del x
    lengths = huffman_lengths(exponent_hist(e))
    codes = canonical_codes(lengths).astype(np.uint32)
    lens = lengths.astype(np.uint32)
    a, b = np.meshgrid(np.arange(256), np.arange(256), indexing="xy")   # index b << 8 | a
    pair_c = ((codes[a] << lens[b]) | codes[b]).reshape(-1)
    pair_l = (lens[a] + lens[b]).astype(np.uint8).reshape(-1)
    lane_bits = 8 * LANE_BYTES
    parts, gaps_l = [], []
    bit = 0
    chunk = max(4, CHUNK_ELEMS // 4 * 4)                         # whole quads per chunk
    for s0 in range(0, max(n, 1), chunk):
        es = e[s0: s0 + chunk]
        m4 = es.size // 4 * 4
        pidx = es[:m4].view(np.uint16)                           # first symbol in the low byte
        pc, pl = pair_c[pidx], pair_l[pidx]
        c4 = (pc[0::2].astype(np.uint64) << pl[1::2].astype(np.uint64)) | pc[1::2]
        l4 = pl[0::2] + pl[1::2]
        tail = es[m4:]
        c_it = np.concatenate([c4, codes[tail].astype(np.uint64)]) if tail.size else c4
        l_it = np.concatenate([l4, lengths[tail]]) if tail.size else l4
        words, ipos, end_bit = _pack_items(c_it, l_it, bit)
        parts.append((bit >> 6, words))
        lanes = np.arange(-(-bit // lane_bits), -(-end_bit // lane_bits), dtype=np.int64) * lane_bits
        if lanes.size:
            n_sym = np.r_[np.full(m4 // 4, 4), np.ones(tail.size, dtype=np.int64)]
            first = np.r_[np.arange(0, m4, 4), np.arange(m4, es.size)]
            gaps_l.append(_lane_gaps(lanes, ipos, n_sym, first, es, lengths, end_bit))
        bit = end_bit
    n_bits = bit
    total = np.zeros(n_bits // 64 + 2, dtype=np.uint64)
    for w0, words in parts:                                      # chunks share at most their boundary word
        k = min(words.size, total.size - w0)
        total[w0: w0 + k] |= words[:k]
    n_bytes = -(-n_bits // lane_bits) * LANE_BYTES
    stream = total.byteswap().view(np.uint8)[:n_bytes].copy()
    gap = (np.concatenate(gaps_l) if gaps_l else np.zeros(0, dtype=np.int64)).astype(np.uint8)  # < 16
    if gap.size % 2:
        gap = np.r_[gap, np.uint8(0)]
    gaps = (gap[0::2] | (gap[1::2] << 4)).astype(np.uint8)
    return Huffman((int(w.shape[0]), int(w.shape[1])), dtype, lengths, stream, gaps, n_bits, sm)


def _decode_lanes(stream: np.ndarray, lane0: int, gap: np.ndarray, n_bits: int, lut: np.ndarray,
                  steps: int) -> np.ndarray:
    """Decode the symbols starting in lanes lane0 .. lane0 + gap.size - 1, lanes in parallel."""
    lane_bits = 8 * LANE_BYTES
    lanes = gap.size
    b0 = lane0 * LANE_BYTES
    s = np.zeros(lanes * LANE_BYTES + 8, dtype=np.uint32)
    seg = stream[b0: b0 + lanes * LANE_BYTES + 4]
    s[: seg.size] = seg
    W = s[:-3] << 24                                             # W[i]: 32-bit big-endian window at byte i
    W |= s[1:-2] << 16
    W |= s[2:-1] << 8
    W |= s[3:]
    base = lane0 * lane_bits
    lane_end = np.minimum((np.arange(lanes, dtype=np.int64) + 1) * lane_bits, n_bits - base)
    pos = np.arange(lanes, dtype=np.int64) * lane_bits + gap    # bit position relative to the chunk
    out = np.empty((steps, lanes), dtype=np.uint8)
    valid = np.empty((steps, lanes), dtype=bool)
    shift = np.uint32(32 - LUT_BITS)
    last = 0
    top = W.size - 1
    for k in range(steps):                                       # loop over steps, vectorised over lanes
        np.less(pos, lane_end, out=valid[k])
        if not valid[k].any():
            break
        win = W[np.minimum(pos >> 3, top)]
        win <<= (pos & 7).astype(np.uint32)
        win >>= shift
        ent = lut[win]
        out[k] = ent
        pos += ent >> 8
        last = k + 1
    return out[:last].T[valid[:last].T]                          # lane-major, step order inside a lane


def huffman_exponents(enc: Huffman) -> np.ndarray:
    """Decode the exponent field of every element, (n,) uint8, all lanes of a chunk in parallel."""
    n = enc.numel
    lanes = enc.stream.size // LANE_BYTES
    if n == 0:
        return np.zeros(0, dtype=np.uint8)
    present = enc.lengths[enc.lengths > 0]
    if present.size == 0 or enc.gaps.size * 2 < lanes:
        raise UserError("Huffman data is inconsistent (no code lengths or too few lane gaps): the blob is corrupted")
    lut = _decode_lut(enc.lengths)
    gap = np.empty(enc.gaps.size * 2, dtype=np.int64)
    gap[0::2] = enc.gaps & 0xF
    gap[1::2] = enc.gaps >> 4
    steps = -(-(8 * LANE_BYTES) // int(present.min())) + 1
    per = max(1, CHUNK_ELEMS // 32)                              # lanes per chunk (~ CHUNK_ELEMS symbols)
    parts = [_decode_lanes(enc.stream, l0, gap[l0: min(l0 + per, lanes)], enc.n_bits, lut, steps)
             for l0 in range(0, lanes, per)]
    e = np.concatenate(parts) if parts else np.zeros(0, dtype=np.uint8)
    if e.size != n:
        raise UserError(f"Huffman stream decodes to {e.size} symbols, expected {n}: the blob is corrupted")
    return e


def huffman_decode(enc: Huffman) -> Tensor:
    e = huffman_exponents(enc)
    u = e.astype(np.uint16)
    u <<= np.uint16(7)
    v = enc.sm.astype(np.uint16)
    v *= np.uint16(257)                                          # sign -> bit 15, mantissa stays in 0-6
    v &= np.uint16(0x807F)
    u |= v
    return _tensor(u.reshape(enc.shape), enc.dtype)


# ----------------------------------------------------------------------------------------- entropy

def entropy_bits(w: Tensor, kind: str = "symbol16") -> float:
    """Empirical order-0 entropy in bits per weight. kind="symbol16": of the whole 16-bit word (the limit
    of any per-element code); kind="exp+8": H(exponent field) + 8 raw bits (the limit of codecs that
    keep sign and mantissa raw, i.e. TCA-TBE and the Huffman baseline)."""
    u, _ = _words(w)
    u = u.reshape(-1)
    if kind == "symbol16":
        counts = np.bincount(u, minlength=65536)
        extra = 0.0
    elif kind == "exp+8":
        counts = np.bincount((u >> 7) & 0xFF, minlength=256)
        extra = 8.0
    else:
        raise UserError(f"entropy kind must be 'symbol16' or 'exp+8', got {kind!r}")
    p = counts[counts > 0] / max(u.size, 1)
    return float(-(p * np.log2(p)).sum()) + extra


# ----------------------------------------------------------------------------------------- storage

_FIELDS = {"tca-tbe": ("bitmaps", "hi", "fallback", "block_offsets", "sub_offsets"),
           "huffman": ("lengths", "stream", "gaps", "sm")}


def to_bytes(enc: TcaTbe | Huffman) -> bytes:
    """Serialise: MAGIC | u32 header length | JSON header | arrays | u32 CRC32 of everything before."""
    codec = "tca-tbe" if isinstance(enc, TcaTbe) else "huffman"
    arrays = [np.ascontiguousarray(getattr(enc, f)) for f in _FIELDS[codec]]
    head = {"codec": codec, "shape": list(enc.shape), "dtype": enc.dtype,
            "arrays": [[f, a.dtype.str, list(a.shape)] for f, a in zip(_FIELDS[codec], arrays)]}
    if codec == "tca-tbe":
        head.update(padded=list(enc.padded), e0=enc.e0)
    else:
        head.update(n_bits=enc.n_bits)
    hb = json.dumps(head).encode()
    body = b"".join([MAGIC, struct.pack("<I", len(hb)), hb] + [a.tobytes() for a in arrays])
    return body + struct.pack("<I", zlib.crc32(body))


def from_bytes(blob: bytes) -> TcaTbe | Huffman:
    """Inverse of to_bytes; raises UserError when the blob is truncated or its checksum fails."""
    if len(blob) < 12 or blob[:4] != MAGIC:
        raise UserError("not a modelpress lossless blob (bad magic): the file is corrupted or of another format")
    (crc,) = struct.unpack("<I", blob[-4:])
    if zlib.crc32(blob[:-4]) != crc:
        raise UserError("lossless blob checksum (CRC32) mismatch: the data is corrupted; re-export it")
    (hl,) = struct.unpack("<I", blob[4:8])
    head = json.loads(blob[8: 8 + hl])
    at, arrays = 8 + hl, {}
    for name, dt, shape in head["arrays"]:
        dt = np.dtype(dt)
        nb = int(np.prod(shape, dtype=np.int64)) * dt.itemsize
        arrays[name] = np.frombuffer(blob, dtype=dt, count=nb // dt.itemsize, offset=at).reshape(shape).copy()
        at += nb
    shape = tuple(head["shape"])
    if head["codec"] == "tca-tbe":
        return TcaTbe(shape, tuple(head["padded"]), head["e0"], head["dtype"], **arrays)
    return Huffman(shape, head["dtype"], n_bits=head["n_bits"], **arrays)


def decode(enc: TcaTbe | Huffman) -> Tensor:
    return tca_tbe_decode(enc) if isinstance(enc, TcaTbe) else huffman_decode(enc)


def encode(w: Tensor, codec: str = "tca-tbe") -> TcaTbe | Huffman:
    if codec == "tca-tbe":
        return tca_tbe_encode(w)
    if codec == "huffman":
        return huffman_encode(w)
    raise UserError(f"codec must be 'tca-tbe' or 'huffman', got {codec!r}")
