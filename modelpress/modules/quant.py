"""Replacement layers for quantized and pruned linears that export compactly and reload exactly.

Both subclass nn.Linear and keep a dense `weight` derived deterministically from what they store, so
the forward is an ordinary F.linear and a reloaded module gives bit-identical outputs.
  SparseLinear: surviving values (original dtype) + a packed keep bitmask (1 bit per weight).
  QuantLinear:  b-bit codes packed (only survivors when a keep mask exists), fp16 scales, b-bit packed
                zero points (asymmetric only), optional packed keep bitmask; or, for a llama.cpp k-quant grid
                (`fmt` q4_k/q5_k/q6_k, algos.kquant), the codes with fp16 super-block scales and the integer
                sub-block scales/mins (w = d sc q - dmin m, bit-equal to the GGUF's weights).
                Mixed widths (per-head bits, "Capability-Guided Compression", arXiv 2603.16440): `bits_map`
                (R, G) uint8 gives the width of R equal row blocks x G equal column blocks (q/k/v: one row block
                per head / KV group; o_proj: one column block per head, its input columns); each weight's code,
                and each (row, group)'s zero point, is stored at its block's width: the codes of each width
                are packed as one stream, the streams concatenated in increasing width (exact bytes:
                sum_b ceil(n_b b / 8)). `bits` is the widest width. A scale group never straddles two
                column blocks (o_proj: the group size divides the head dim; the quantize stage gives o_proj
                its heads' mean width otherwise). `widest()` gives the same weights as codes on the
                widest width's grid, which is how the compressed-tensors and GGUF exports write the module.
In memory the codes and masks are held packed too (`q` and `keep` unpack on access), and a module built
with in_place=True writes its dense weight into the replaced linear's own storage: compressing a model
costs about the packed codes on top of the model, not a second copy of every weight."""
from __future__ import annotations

import numpy as np
import torch
from torch import Tensor, nn

from ..algos import kquant, quant
from ..errors import UserError


def pack_mask(keep: Tensor) -> Tensor:
    return torch.from_numpy(np.packbits(keep.reshape(-1).cpu().numpy().astype(np.uint8), bitorder="little"))


def unpack_mask(packed: Tensor, shape: tuple[int, ...]) -> Tensor:
    n = int(np.prod(shape))
    bits = np.unpackbits(packed.cpu().numpy(), bitorder="little")[:n]
    return torch.from_numpy(bits.astype(bool)).reshape(shape)


def element_bits(bits_map: Tensor, rows: int, cols: int) -> Tensor:
    """(R, G) widths of equal row x column blocks -> (rows, cols) uint8 width of every weight."""
    R, G = bits_map.shape
    return bits_map.to(torch.uint8).repeat_interleave(rows // R, 0).repeat_interleave(cols // G, 1)


def group_bits(bits_map: Tensor, rows: int, cols: int, group_size: int | None) -> Tensor:
    """(rows, n_groups) width of each (row, scale group): the width at the group's first column."""
    return element_bits(bits_map, rows, cols)[:, ::group_size or cols]


def check_bits_map(bits_map: Tensor, rows: int, cols: int, group_size: int | None, where: str) -> None:
    """Raise UserError unless bits_map (R, G) tiles (rows, cols) with widths 1..8 and no scale group straddles
    two column blocks."""
    R, G = bits_map.shape if bits_map.dim() == 2 else (0, 0)
    if not R or not G or rows % R or cols % G:
        raise UserError(f"{where}: bit-width map of shape {tuple(bits_map.shape)} does not tile a ({rows}, {cols}) "
                        "weight into equal blocks: the export is corrupted or the plan does not fit; re-run quantize")
    if int(bits_map.min()) < 1 or int(bits_map.max()) > 8:
        raise UserError(f"{where}: bit widths must be 1..8, got {sorted(set(bits_map.reshape(-1).tolist()))}: "
                        "re-run quantize")
    if G > 1 and len(set(bits_map.reshape(-1).tolist())) > 1 and (group_size is None or (cols // G) % group_size):
        raise UserError(f"{where}: per-column-block bit widths need scale groups inside each block of {cols // G} "
                        f"columns, got group_size {group_size}: use a group_size dividing {cols // G}")


def pack_mixed(codes: Tensor, widths: Tensor) -> Tensor:
    """Codes (n,) with their widths (n,) -> one uint8 stream: the codes of each width packed at that width
    (quant.pack, in order), the streams concatenated in increasing width."""
    codes, widths = codes.reshape(-1).cpu(), widths.reshape(-1).cpu()
    parts = [quant.pack(codes[widths == b], int(b)) for b in torch.unique(widths).tolist()]
    return torch.cat(parts) if parts else torch.zeros(0, dtype=torch.uint8)


def unpack_mixed(packed: Tensor, widths: Tensor) -> Tensor:
    """Inverse of pack_mixed: (n,) uint8 codes for the widths (n,)."""
    widths = widths.reshape(-1).cpu()
    out = torch.zeros(widths.numel(), dtype=torch.uint8)
    off = 0
    for b in torch.unique(widths).tolist():
        sel = widths == b
        n = int(sel.sum())
        nbytes = -(-n * int(b) // 8)
        out[sel] = quant.unpack(packed[off:off + nbytes], int(b), n)
        off += nbytes
    return out


def mixed_bytes(widths: Tensor) -> int:
    """Bytes pack_mixed writes for codes of these widths."""
    return sum(-(-int((widths == b).sum()) * int(b) // 8) for b in torch.unique(widths.reshape(-1)).tolist())


def _shell(cls, in_f: int, out_f: int, bias: Tensor | None, dtype: torch.dtype):
    m = cls.__new__(cls)
    nn.Linear.__init__(m, in_f, out_f, bias=bias is not None, device="meta", dtype=dtype)
    if bias is not None:
        m.bias = nn.Parameter(bias.detach().clone(), requires_grad=False)
    return m


def _dense(lin: nn.Linear, w: Tensor, in_place: bool) -> nn.Parameter:
    """The new module's weight: w written into lin's own storage (in_place; lin is being replaced and its
    weight is shared with nothing else) or a fresh parameter."""
    if in_place and lin.weight.device != torch.device("meta") and lin.weight.shape == w.shape:
        with torch.no_grad():
            lin.weight.data.copy_(w)
        lin.weight.requires_grad_(False)
        return lin.weight
    return nn.Parameter(w.to(lin.weight.dtype).to(lin.weight.device).contiguous(), requires_grad=False)


class _Packed:
    """`keep` (bool (rows, cols) or None) stored as a packed bitmask buffer `keep_bits`."""

    @property
    def keep(self) -> Tensor | None:
        bits = self.keep_bits
        return None if bits is None else unpack_mask(bits, (self.out_features, self.in_features)).to(bits.device)

    def _set_keep_bits(self, keep: Tensor | None, dev) -> None:
        self.register_buffer("keep_bits", None if keep is None else pack_mask(keep.bool()).to(dev), persistent=False)


class SparseLinear(_Packed, nn.Linear):
    kind = "SparseLinear"
    storage_keys = ("values", "bias")      # stored in the export's storage dtype (16-bit by default)

    @classmethod
    def from_linear(cls, lin: nn.Linear, keep: Tensor, in_place: bool = False,
                    weight: Tensor | None = None) -> "SparseLinear":
        """weight: updated dense weights (SparseGPT) instead of lin's; pruned entries are zeroed here."""
        m = _shell(cls, lin.in_features, lin.out_features, lin.bias, lin.weight.dtype)
        keep = keep.bool().to(lin.weight.device)
        m.weight = _dense(lin, (lin.weight.detach() if weight is None else weight) * keep, in_place)
        m._set_keep_bits(keep, lin.weight.device)
        return m

    def to_state(self) -> tuple[dict[str, Tensor], dict]:
        keep = self.keep
        t = {"values": self.weight.detach()[keep].contiguous(), "keep": pack_mask(keep)}
        if self.bias is not None:
            t["bias"] = self.bias.detach()
        return t, {"in": self.in_features, "out": self.out_features, "dtype": str(self.weight.dtype)}

    @classmethod
    def from_state(cls, t: dict[str, Tensor], cfg: dict) -> "SparseLinear":
        shape = (cfg["out"], cfg["in"])
        keep = unpack_mask(t["keep"], shape)
        w = torch.zeros(shape, dtype=t["values"].dtype)
        w[keep] = t["values"]
        lin = nn.Linear(cfg["in"], cfg["out"], bias="bias" in t, dtype=w.dtype)
        lin.weight.data = w
        if "bias" in t:
            lin.bias.data = t["bias"]
        return cls.from_linear(lin, keep, in_place=True)


class QuantLinear(_Packed, nn.Linear):
    kind = "QuantLinear"
    storage_keys = ("bias",)
    fmt: str | None = None                # None: w = s (q - z); q4_k | q5_k | q6_k: a k-quant grid (kparams)

    @classmethod
    def build(cls, lin: nn.Linear, q: Tensor, scale: Tensor, zero: Tensor, bits: int,
              group_size: int | None, sym: bool, keep: Tensor | None = None,
              weight: Tensor | None = None, in_place: bool = False,
              kparams: kquant.KParams | None = None, bits_map: Tensor | None = None) -> "QuantLinear":
        """weight: the dequantized codes if the caller has them already (float32 (rows, cols));
        in_place: write it into lin.weight's storage (lin is replaced and shares its weight with nothing);
        kparams: the k-quant grid the codes sit on (then scale/zero are its s = d sc and fractional z = dmin m / s,
        float32, and the weight is kquant.dequantize's); bits_map: (R, G) widths of equal row x column blocks
        (mixed widths; `bits` is then ignored: the widest; a map of one width is that uniform width)."""
        m = _shell(cls, lin.in_features, lin.out_features, lin.bias, lin.weight.dtype)
        if bits_map is not None:
            bits_map = bits_map.detach().cpu().to(torch.uint8)
            if len(torch.unique(bits_map)) == 1:
                bits, bits_map = int(bits_map.reshape(-1)[0]), None
            else:
                if kparams is not None:
                    raise UserError("quantize.format k-quant grids hold one width per linear: use format int with "
                                    "per-head bit widths (budget capability)")
                check_bits_map(bits_map, lin.out_features, lin.in_features, group_size, "QuantLinear")
                bits = int(bits_map.max())
        m.bits, m.group_size, m.sym = bits, group_size, sym
        dev = lin.weight.device if lin.weight.device != torch.device("meta") else q.device
        m.register_buffer("bits_map", None if bits_map is None else bits_map.to(dev), persistent=False)
        eb = m.widths
        # float32/64 weights hold the codes exactly (w = s (q - z), s fp16-exact: q = round(w / s) + z), so the
        # codes are derived from the weight on demand; lower-precision weights (and k-quant grids) keep them packed
        derived = lin.weight.dtype in (torch.float32, torch.float64) and kparams is None
        packed = None if derived else quant.pack(q, bits) if eb is None else pack_mixed(q, eb)
        m.register_buffer("qpacked", None if derived else packed.to(dev), persistent=False)
        if kparams is not None:
            if keep is not None:
                raise UserError("quantize.format k-quant grids cannot hold pruned weights at exactly 0: "
                                "use format int (the default) after pruning")
            m.fmt = kparams.fmt
            for k in ("d", "sc", "dmin", "m"):
                m.register_buffer(f"k{k}", getattr(kparams, k).to(dev), persistent=False)
            scale, zero = kparams.scale_zero()
            weight = kquant.dequantize(q.to(dev), m.kparams) if weight is None else weight
        m.register_buffer("scale", (scale.half() if kparams is None else scale.float()).to(dev), persistent=False)
        m.register_buffer("zero", (zero.to(torch.uint8) if kparams is None else zero.float()).to(dev), persistent=False)
        m._set_keep_bits(keep, dev)
        if weight is None:
            weight = quant.dequantize_groups(q.to(dev), m.scale.float(), m.zero.float(), group_size,
                                             None if keep is None else keep.bool().to(dev))
        m.weight = _dense(lin, weight, in_place)
        return m

    @property
    def widths(self) -> Tensor | None:
        """(rows, cols) uint8 width of every weight's code for mixed widths, None for one width (`bits`)."""
        bm = getattr(self, "bits_map", None)
        return None if bm is None else element_bits(bm.cpu(), self.out_features, self.in_features)

    @property
    def mean_bits(self) -> float:
        """Mean code width over the weights (blocks are equal-sized: the mean of bits_map)."""
        bm = getattr(self, "bits_map", None)
        return float(self.bits) if bm is None else float(bm.float().mean())

    @property
    def q(self) -> Tensor:
        """Codes (rows, cols) uint8 (pruned positions: the zero point's code when derived)."""
        rows, cols = self.out_features, self.in_features
        eb = self.widths
        if self.qpacked is not None:
            q = (quant.unpack(self.qpacked, self.bits, rows * cols) if eb is None else unpack_mixed(self.qpacked, eb))
            return q.reshape(rows, cols).to(self.qpacked.device)
        s = quant.expand(self.scale.float(), self.group_size, cols)
        z = quant.expand(self.zero.float(), self.group_size, cols)
        b = self.bits if eb is None else eb.to(self.weight.device)
        return quant.quantize(self.weight.detach().float(), s, z, b).to(torch.uint8)

    def widest(self) -> tuple[Tensor, Tensor]:
        """(codes (rows, cols), zero points (rows, n_groups)) uint8 giving the same weights on the grid of the
        widest width `bits` (how compressed-tensors and GGUF, one scheme per tensor, see a mixed module):
        symmetric: q - z + 2^(B-1) with zero 2^(B-1) (|q - z| <= 2^(b-1) <= 2^(B-1)); asymmetric: unchanged
        (b-bit codes and zero points are valid B-bit ones). One width: (q, zero)."""
        q, z = self.q, self.zero
        if getattr(self, "bits_map", None) is None or not self.sym:
            return q, z
        half = 1 << (self.bits - 1)
        zq = quant.expand(z.float(), self.group_size, self.in_features)
        return (q.float() - zq + half).to(torch.uint8), torch.full_like(z, half)

    @property
    def kparams(self) -> kquant.KParams | None:
        if self.fmt is None:
            return None
        return kquant.KParams(self.fmt, self.kd, self.ksc, self.kdmin, self.km)

    def dequantized(self) -> Tensor:
        if self.fmt is not None:
            return kquant.dequantize(self.q, self.kparams)
        return quant.dequantize_groups(self.q, self.scale.float(), self.zero.float(), self.group_size, self.keep)

    def set_keep(self, keep: Tensor) -> None:
        """Prune after quantization: pruned weights become exactly zero, the others keep their codes."""
        if self.fmt is not None:
            raise UserError(f"a {self.fmt} grid cannot hold pruned weights at exactly 0: prune before quantizing "
                            "with quantize.format int")
        old = self.keep
        dev = self.scale.device
        new = keep.bool().to(dev) if old is None else (old & keep.bool().to(dev))
        self._set_keep_bits(new, dev)
        with torch.no_grad():
            self.weight.data.mul_(new)

    def to_state(self) -> tuple[dict[str, Tensor], dict]:
        keep, q = self.keep, self.q
        if self.qpacked is None and not torch.equal(       # derived codes must reproduce the weight exactly
                quant.dequantize_groups(q, self.scale.float(), self.zero.float(), self.group_size, keep)
                .to(self.weight.dtype), self.weight.detach()):
            raise RuntimeError("QuantLinear weight was changed after quantization (it no longer equals "
                               "scale * (code - zero)): re-run the quantize stage after modifying weights")
        eb = self.widths
        if eb is None:
            t = {"qweight": quant.pack(q if keep is None else q[keep], self.bits), "scales": self.scale.contiguous()}
        else:                   # mixed widths: one stream per width; the map (R, G) says which weight has which
            t = {"qweight": pack_mixed(q if keep is None else q[keep.cpu()], eb if keep is None else eb[keep.cpu()]),
                 "scales": self.scale.contiguous(), "bits_map": self.bits_map.cpu().contiguous()}
        if self.fmt is not None:           # the k-quant grid: fp16 d/dmin per 256 weights, 8-bit sc/m per sub-block
            kp = self.kparams
            sc_t = torch.int8 if kquant.FORMATS[self.fmt].sym else torch.uint8
            t = {"qweight": t["qweight"], "kd": kp.d.contiguous(), "ksc": kp.sc.to(sc_t)}
            if not self.sym:
                t.update(kdmin=kp.dmin.contiguous(), km=kp.m.to(torch.uint8))
        elif not self.sym:
            t["zeros"] = (quant.pack(self.zero, self.bits) if eb is None else pack_mixed(
                self.zero, group_bits(self.bits_map.cpu(), self.out_features, self.in_features, self.group_size)))
        if keep is not None:
            t["keep"] = pack_mask(keep)
        if self.bias is not None:
            t["bias"] = self.bias.detach()
        cfg = {"in": self.in_features, "out": self.out_features, "bits": self.bits, "group_size": self.group_size,
               "sym": self.sym, "dtype": str(self.weight.dtype)}
        if self.fmt is not None:
            cfg["format"] = self.fmt
        return t, cfg

    @classmethod
    def from_state(cls, t: dict[str, Tensor], cfg: dict) -> "QuantLinear":
        rows, cols, bits, gs = cfg["out"], cfg["in"], cfg["bits"], cfg["group_size"]
        keep = unpack_mask(t["keep"], (rows, cols)) if "keep" in t else None
        n_groups = quant.n_groups(cols, gs)
        if cfg.get("format"):
            q = quant.unpack(t["qweight"], bits, rows * cols).reshape(rows, cols)
            zeros = torch.zeros_like(t["ksc"], dtype=torch.int16)
            kp = kquant.KParams(cfg["format"], t["kd"].half(), t["ksc"].to(torch.int16),
                                t["kdmin"].half() if "kdmin" in t else torch.zeros_like(t["kd"]).half(),
                                t["km"].to(torch.int16) if "km" in t else zeros)
            dtype = getattr(torch, cfg["dtype"].replace("torch.", ""))
            lin = nn.Linear(cols, rows, bias="bias" in t, device="meta", dtype=dtype)
            lin.bias = nn.Parameter(t["bias"]) if "bias" in t else None
            lin.weight = nn.Parameter(torch.empty(0, dtype=dtype))
            s, z = kp.scale_zero()
            return cls.build(lin, q, s, z, bits, gs, cfg["sym"], None, kparams=kp)
        bm = t.get("bits_map")
        if bm is not None:                  # mixed widths: codes and zero points at their blocks' widths
            check_bits_map(bm, rows, cols, gs, "QuantLinear state")
            eb, gb = element_bits(bm, rows, cols), group_bits(bm, rows, cols, gs)     # (rows, cols), (rows, ng)
            q = torch.zeros(rows, cols, dtype=torch.uint8)
            sel = torch.ones(rows, cols, dtype=torch.bool) if keep is None else keep
            q[sel] = unpack_mixed(t["qweight"], eb[sel])
            zero = ((1 << (gb.long() - 1)).to(torch.uint8) if cfg["sym"]
                    else unpack_mixed(t["zeros"], gb).reshape(rows, n_groups))
        else:
            if keep is None:
                q = quant.unpack(t["qweight"], bits, rows * cols).reshape(rows, cols)
            else:
                q = torch.zeros(rows, cols, dtype=torch.uint8)
                q[keep] = quant.unpack(t["qweight"], bits, int(keep.sum()))
            if cfg["sym"]:
                zero = torch.full((rows, n_groups), 1 << (bits - 1), dtype=torch.uint8)
            else:
                zero = quant.unpack(t["zeros"], bits, rows * n_groups).reshape(rows, n_groups)
        dtype = getattr(torch, cfg["dtype"].replace("torch.", ""))
        lin = nn.Linear(cols, rows, bias="bias" in t, device="meta", dtype=dtype)
        lin.bias = nn.Parameter(t["bias"]) if "bias" in t else None
        lin.weight = nn.Parameter(torch.empty(0, dtype=dtype))
        return cls.build(lin, q, t["scales"].float(), zero, bits, gs, cfg["sym"], keep, bits_map=bm)

    def extra_repr(self) -> str:
        w = f"w{self.bits}" if getattr(self, "bits_map", None) is None else \
            f"w{'/'.join(map(str, sorted(set(self.bits_map.reshape(-1).tolist()))))} (mean {self.mean_bits:.2f})"
        return f"{super().extra_repr()}, {w} {'g' + str(self.group_size) if self.group_size else 'per-row'}"


class QuantEmbedding(nn.Embedding):
    """nn.Embedding whose table (num_embeddings, dim) is stored as b-bit codes with fp16 scales, one scale per
    row (group_size None: llama.cpp's Q8_0-style token embeddings at 8 bits) or per group of columns (4/6-bit
    grouped, as llama.cpp's Q4_K/Q6_K token embeddings), b-bit zero points when asymmetric. The dense
    `weight` is s (q - z), so forward is an ordinary F.embedding and a tied output projection (lm_head.weight
    is this weight) computes with exactly the same values, before and after reload."""
    kind = "QuantEmbedding"
    storage_keys = ()

    @classmethod
    def build(cls, emb: nn.Embedding, q: Tensor, scale: Tensor, zero: Tensor, bits: int,
              group_size: int | None, sym: bool) -> "QuantEmbedding":
        """q (num, dim) codes, scale/zero (num, n_groups). The dequantized table is written into emb.weight's
        own storage, so everything that shares that parameter (a tied lm_head) reads it."""
        num, dim = emb.weight.shape
        m = cls.__new__(cls)
        nn.Embedding.__init__(m, num, dim, padding_idx=emb.padding_idx, device="meta", dtype=emb.weight.dtype)
        m.bits, m.group_size, m.sym = bits, group_size, sym
        dev = emb.weight.device if emb.weight.device != torch.device("meta") else q.device
        m.register_buffer("qpacked", quant.pack(q, bits).to(dev), persistent=False)
        m.register_buffer("scale", scale.half().to(dev), persistent=False)
        m.register_buffer("zero", zero.to(torch.uint8).to(dev), persistent=False)
        w = quant.dequantize_groups(q.to(dev), m.scale.float(), m.zero.float(), group_size)     # (num, dim) fp32
        m.weight = _dense(emb, w, in_place=True)
        return m

    @property
    def q(self) -> Tensor:
        n, d = self.weight.shape
        return quant.unpack(self.qpacked, self.bits, n * d).reshape(n, d).to(self.qpacked.device)

    def to_state(self) -> tuple[dict[str, Tensor], dict]:
        t = {"qweight": self.qpacked.contiguous(), "scales": self.scale.contiguous()}
        if not self.sym:
            t["zeros"] = quant.pack(self.zero, self.bits)
        n, d = self.weight.shape
        cfg = {"in": d, "out": n, "bits": self.bits, "group_size": self.group_size, "sym": self.sym,
               "padding_idx": self.padding_idx, "dtype": str(self.weight.dtype)}
        return t, cfg

    @classmethod
    def from_state(cls, t: dict[str, Tensor], cfg: dict) -> "QuantEmbedding":
        n, d, bits, gs = cfg["out"], cfg["in"], cfg["bits"], cfg["group_size"]
        q = quant.unpack(t["qweight"], bits, n * d).reshape(n, d)
        ng = quant.n_groups(d, gs)
        zero = (torch.full((n, ng), 1 << (bits - 1), dtype=torch.uint8) if cfg["sym"]
                else quant.unpack(t["zeros"], bits, n * ng).reshape(n, ng))
        dtype = getattr(torch, cfg["dtype"].replace("torch.", ""))
        emb = nn.Embedding(n, d, padding_idx=cfg.get("padding_idx"), device="meta", dtype=dtype)
        emb.weight = nn.Parameter(torch.empty(n, d, dtype=dtype), requires_grad=False)
        return cls.build(emb, q, t["scales"].float(), zero, bits, gs, cfg["sym"])

    def extra_repr(self) -> str:
        g = f"g{self.group_size}" if self.group_size else "per-row"
        return f"{self.num_embeddings}, {self.embedding_dim}, w{self.bits} {g} {'sym' if self.sym else 'asym'}"
