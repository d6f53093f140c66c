"""Losslessly compressed BF16/FP16 layers (ZipServ TCA-TBE, arXiv 2603.17435; Huffman baseline after
DFloat11, arXiv 2504.11651). The weight lives only as codec buffers; forward decodes it:
  CPU:  numpy decode (TCA-TBE: modelpress.kernels.decode_device_np; Huffman: modelpress.algos.lossless)
        then F.linear / F.embedding, bit-exact;
  CUDA: TCA-TBE with N <= 16 rows of input -> fused Triton decode+GEMM (modelpress.kernels);
        otherwise tile-parallel decompression (Triton, or the torch reference without triton) + cuBLAS.
        Huffman weights have no GPU decoder: every forward copies the streams to the CPU, decodes them
        there and copies the weight back (a warning says so once); use TCA-TBE for GPU inference.
TCA-TBE buffers hold hi and fallback in the kernels' device layout (modelpress.kernels.device_layout: the
same bytes, one sign+mantissa byte per weight and the fallbacks' exponent bytes, + 16 bytes of padding);
to_state / encoded() turn them back into the stored TCA-TBE streams, so exports keep ZipServ's format.
ZipEmbedding (TCA-TBE) decodes only the 64-row block rows that hold the requested ids.
A tied output projection (lm_head.weight is embed_tokens.weight) is a ZipLinear with `tied_to` set:
it stores nothing and reads the codec buffers of the module it is tied to (bound by `retie(model)`)."""
from __future__ import annotations

import warnings
import zlib

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..algos import lossless as LL
from ..errors import UserError

_TCA = ("bitmaps", "hi", "fallback", "block_offsets", "sub_offsets")
_HUF = ("lengths", "stream", "gaps", "sm")
_DT = {"bfloat16": torch.bfloat16, "float16": torch.float16}


def _crc(tensors: dict[str, Tensor], names: tuple[str, ...]) -> int:
    c = 0
    for k in names:
        c = zlib.crc32(tensors[k].detach().cpu().contiguous().view(torch.uint8).numpy().tobytes(), c)
    return c


def _enc_tensors(enc: LL.TcaTbe | LL.Huffman) -> dict[str, Tensor]:
    """Buffers of a codec object; TCA-TBE's hi and fallback in the kernels' device layout (kernels.device_layout:
    the same bytes, one hi byte per weight and the fallbacks' exponent bytes), which to_state turns back."""
    if isinstance(enc, LL.TcaTbe):
        from ..kernels import zip_gemm
        h, fexp = zip_gemm.device_layout(enc.bitmaps, enc.hi, enc.fallback)
        return {"bitmaps": torch.from_numpy(enc.bitmaps.view(np.int64).copy()), "hi": torch.from_numpy(h),
                "fallback": torch.from_numpy(fexp), "block_offsets": torch.from_numpy(enc.block_offsets.copy()),
                "sub_offsets": torch.from_numpy(enc.sub_offsets.copy())}
    return {"lengths": torch.from_numpy(enc.lengths.copy()), "stream": torch.from_numpy(enc.stream.copy()),
            "gaps": torch.from_numpy(enc.gaps.copy()), "sm": torch.from_numpy(enc.sm.copy())}


class _ZipWeight(nn.Module):
    """Shared machinery: codec buffers (non-persistent; exported through to_state) and decoding."""

    def _init_codec(self, enc: LL.TcaTbe | LL.Huffman | None, meta: dict) -> None:
        self.meta = dict(meta)                       # codec, shape, dtype (+ padded, e0 | n_bits), tied_to
        self._source: list[_ZipWeight] = []          # the module a tied ZipLinear reads (not a submodule)
        if enc is not None:
            for k, v in _enc_tensors(enc).items():
                self.register_buffer(k, v, persistent=False)

    @property
    def codec(self) -> str:
        return self.meta["codec"]

    @property
    def weight_dtype(self) -> torch.dtype:
        return _DT[self.meta["dtype"]]

    def _holder(self) -> "_ZipWeight":
        if self.meta.get("tied_to") is None:
            return self
        if not self._source:
            raise UserError(f"tied {type(self).__name__} (tied to {self.meta['tied_to']}) is not bound: call "
                            "modelpress.modules.zip.retie(model) after loading")
        return self._source[0]

    def codec_tensors(self) -> dict[str, Tensor]:
        h = self._holder()
        return {k: getattr(h, k) for k in (_TCA if self.codec == "tca-tbe" else _HUF)}

    def encoded(self) -> LL.TcaTbe | LL.Huffman:
        """The numpy codec object (copies the buffers to CPU)."""
        t = {k: v.detach().cpu().numpy() for k, v in self.codec_tensors().items()}
        m, shape = self.meta, tuple(self.meta["shape"])
        if self.codec == "tca-tbe":
            from ..kernels import zip_gemm
            hi, fallback = zip_gemm.stream_layout(t["bitmaps"].view(np.uint64), t["hi"], t["fallback"])
            return LL.TcaTbe(shape, tuple(m["padded"]), m["e0"], m["dtype"], t["bitmaps"].view(np.uint64),
                             hi, fallback, t["block_offsets"], t["sub_offsets"])
        return LL.Huffman(shape, m["dtype"], t["lengths"], t["stream"], t["gaps"], m["n_bits"], t["sm"])

    def decoded_weight(self) -> Tensor:
        """The exact original (rows, cols) weight, on the buffers' device."""
        t = self.codec_tensors()
        dev = next(iter(t.values())).device
        if dev.type == "cuda" and self.codec == "tca-tbe":
            from .. import kernels
            m = self.meta
            args = (t["bitmaps"], t["hi"], t["fallback"], t["block_offsets"], t["sub_offsets"], m["e0"], tuple(m["shape"]),
                    tuple(m["padded"]), self.weight_dtype)
            return kernels.decompress_triton(*args) if kernels.triton_available() else kernels.decompress_torch(*args)
        if self.codec == "tca-tbe":                  # CPU: numpy, straight from the device layout
            return self._decode_np(t).to(dev)
        if dev.type == "cuda":
            _warn_cpu_decode(self)
        return LL.decode(self.encoded()).to(dev)

    def _decode_np(self, t: dict[str, Tensor], rows: Tensor | None = None) -> Tensor:
        """TCA-TBE weight (or its rows `rows`) decoded on the CPU from the device-layout buffers."""
        from ..kernels import zip_gemm
        n = {k: v.detach().cpu().numpy() for k, v in t.items()}
        m = self.meta
        u = zip_gemm.decode_device_np(n["bitmaps"].view(np.uint64), n["hi"], n["fallback"], n["block_offsets"],
                                      n["sub_offsets"], m["e0"], tuple(m["shape"]), tuple(m["padded"]),
                                      None if rows is None else rows.cpu().numpy())
        return torch.from_numpy(u.view(np.int16)).view(self.weight_dtype)

    def decoded_rows(self, ids: Tensor) -> Tensor:
        """Rows `ids` (any shape) of the weight, bit-exact, shape (*ids.shape, cols): TCA-TBE decodes only
        the 64-row block rows holding them (on CUDA with the torch tile reference, on CPU with numpy);
        Huffman decodes the whole matrix (its lanes are not row-addressable)."""
        t = self.codec_tensors()
        dev = next(iter(t.values())).device
        flat = ids.reshape(-1)
        if self.codec != "tca-tbe":
            return self.decoded_weight()[flat.to(dev)].reshape(*ids.shape, -1)
        m = self.meta
        rows, cols = m["shape"]
        if flat.numel() and (int(flat.min()) < 0 or int(flat.max()) >= rows):
            raise UserError(f"{type(self).__name__}: ids must lie in [0, {rows}), got "
                            f"{int(flat.min())}..{int(flat.max())}")
        if dev.type == "cuda":
            from .. import kernels
            out = kernels.decompress_rows_torch(t["bitmaps"], t["hi"], t["fallback"], t["block_offsets"],
                                                t["sub_offsets"], m["e0"], tuple(m["padded"]), flat.to(dev))[:, :cols]
            return out.view(self.weight_dtype).reshape(*ids.shape, cols)
        return self._decode_np(t, flat).reshape(*ids.shape, cols)

    def nbytes(self) -> int:
        """Bytes this module stores (0 for a tied alias)."""
        if self.meta.get("tied_to") is not None:
            return 0
        return sum(v.numel() * v.element_size() for v in self.codec_tensors().values())

    def _state(self, extra: dict) -> tuple[dict[str, Tensor], dict]:
        cfg = {**self.meta, **extra}
        if self.meta.get("tied_to") is not None:
            return {}, cfg
        if self.codec == "tca-tbe":                  # exported in the codec's stream layout (unchanged format)
            enc = self.encoded()
            t = {"bitmaps": torch.from_numpy(enc.bitmaps.view(np.int64)), "hi": torch.from_numpy(enc.hi),
                 "fallback": torch.from_numpy(enc.fallback.view(np.int16)),
                 "block_offsets": torch.from_numpy(enc.block_offsets), "sub_offsets": torch.from_numpy(enc.sub_offsets)}
        else:
            t = {k: v.detach() for k, v in self.codec_tensors().items()}
        cfg["crc32"] = _crc(t, tuple(t))
        return t, cfg

    @staticmethod
    def _check_state(cls_name: str, t: dict[str, Tensor], cfg: dict) -> None:
        if cfg.get("tied_to") is not None:
            return
        names = _TCA if cfg.get("codec") == "tca-tbe" else _HUF
        missing = [k for k in names if k not in t]
        if missing:
            raise UserError(f"{cls_name} state lacks tensors {missing}: the export is incomplete; re-export it")
        if _crc(t, names) != cfg.get("crc32"):
            raise UserError(f"{cls_name} {cfg.get('codec')} data fails its CRC32 check: the weights are corrupted; "
                            "re-export the model")


def _register_state(m: _ZipWeight, t: dict[str, Tensor], cfg: dict) -> None:
    """Buffers of an exported (checked) state: TCA-TBE's hi and fallback turned into the device layout."""
    names = _TCA if cfg["codec"] == "tca-tbe" else _HUF
    bufs = {k: t[k].contiguous() for k in names}
    if cfg["codec"] == "tca-tbe":
        from ..kernels import zip_gemm
        dev = bufs["hi"].device
        bm = bufs["bitmaps"].cpu().numpy().view(np.uint64)
        h, fexp = zip_gemm.device_layout(bm, bufs["hi"].cpu().numpy(), bufs["fallback"].cpu().numpy().view(np.uint16))
        bufs["hi"], bufs["fallback"] = torch.from_numpy(h).to(dev), torch.from_numpy(fexp).to(dev)
    for k, v in bufs.items():
        m.register_buffer(k, v, persistent=False)


_WARNED: set = set()


def _warn_cpu_decode(m: _ZipWeight) -> None:
    if m.codec not in _WARNED:
        _WARNED.add(m.codec)
        warnings.warn(f"{type(m).__name__} with codec {m.codec} on CUDA decodes its weight on the CPU at every "
                      "forward (no GPU decoder for this codec): re-export with codec tca-tbe for GPU inference",
                      stacklevel=3)


def _meta(enc: LL.TcaTbe | LL.Huffman) -> dict:
    m = {"codec": "tca-tbe" if isinstance(enc, LL.TcaTbe) else "huffman", "shape": list(enc.shape),
         "dtype": enc.dtype, "tied_to": None}
    if isinstance(enc, LL.TcaTbe):
        m.update(padded=list(enc.padded), e0=enc.e0)
    else:
        m.update(n_bits=enc.n_bits)
    return m


class ZipLinear(_ZipWeight):
    """nn.Linear whose weight (out_features, in_features) is stored losslessly compressed."""
    kind = "ZipLinear"

    def __init__(self, enc: LL.TcaTbe | LL.Huffman | None, bias: Tensor | None, meta: dict | None = None):
        super().__init__()
        meta = meta if meta is not None else _meta(enc)
        self._init_codec(enc, meta)
        self.out_features, self.in_features = meta["shape"]
        self.bias = None if bias is None else nn.Parameter(bias.detach().clone(), requires_grad=False)

    @classmethod
    def from_linear(cls, lin: nn.Linear, codec: str = "tca-tbe", weight: Tensor | None = None) -> "ZipLinear":
        w = lin.weight.detach() if weight is None else weight
        return cls(LL.encode(w, codec), lin.bias)

    @classmethod
    def tied(cls, source: _ZipWeight, source_name: str, bias: Tensor | None = None) -> "ZipLinear":
        m = cls(None, bias, {**source.meta, "tied_to": source_name})
        m.bind(source)
        return m

    def bind(self, source: _ZipWeight) -> None:
        if list(source.meta["shape"]) != list(self.meta["shape"]):
            raise UserError(f"cannot tie ZipLinear {self.meta['shape']} to {self.meta['tied_to']} of shape "
                            f"{source.meta['shape']}: the export is inconsistent; re-export it")
        self._source[:] = [source]

    def forward(self, x: Tensor) -> Tensor:
        t = self.codec_tensors()
        if x.is_cuda and self.codec == "tca-tbe" and x.dtype == torch.bfloat16 and self.weight_dtype == torch.bfloat16:
            from .. import kernels
            n = x.numel() // self.in_features
            if n <= kernels.FUSED_MAX_N and kernels.triton_available():
                m = self.meta
                y = kernels.fused_linear_triton(x.reshape(n, self.in_features), t["bitmaps"], t["hi"], t["fallback"],
                                                t["block_offsets"], t["sub_offsets"], m["e0"], tuple(m["shape"]),
                                                tuple(m["padded"]), bias=self.bias,
                                                weight_dtype=self.weight_dtype)
                return y.reshape(*x.shape[:-1], self.out_features)
        w = self.decoded_weight()
        return F.linear(x, w if w.dtype == x.dtype else w.to(x.dtype), self.bias)

    def to_state(self) -> tuple[dict[str, Tensor], dict]:
        t, cfg = self._state({"in": self.in_features, "out": self.out_features})
        if self.bias is not None:
            t["bias"] = self.bias.detach()
        return t, cfg

    @classmethod
    def from_state(cls, t: dict[str, Tensor], cfg: dict) -> "ZipLinear":
        cls._check_state(cls.kind, t, cfg)
        m = cls(None, t.get("bias"), {k: v for k, v in cfg.items() if k not in ("crc32", "in", "out")})
        if cfg.get("tied_to") is None:
            _register_state(m, t, cfg)
        return m

    def extra_repr(self) -> str:
        tied = f", tied_to={self.meta['tied_to']}" if self.meta.get("tied_to") else ""
        return f"in_features={self.in_features}, out_features={self.out_features}, codec={self.codec}{tied}"


class ZipEmbedding(_ZipWeight):
    """nn.Embedding whose weight (num_embeddings, embedding_dim) is stored losslessly compressed."""
    kind = "ZipEmbedding"

    def __init__(self, enc: LL.TcaTbe | LL.Huffman | None, padding_idx: int | None = None, meta: dict | None = None):
        super().__init__()
        meta = meta if meta is not None else _meta(enc)
        self._init_codec(enc, meta)
        self.num_embeddings, self.embedding_dim = meta["shape"]
        self.padding_idx = padding_idx

    @classmethod
    def from_embedding(cls, emb: nn.Embedding, codec: str = "tca-tbe", weight: Tensor | None = None) -> "ZipEmbedding":
        if emb.max_norm is not None or emb.sparse or emb.scale_grad_by_freq:
            raise UserError("ZipEmbedding supports plain nn.Embedding (no max_norm/sparse/scale_grad_by_freq): "
                            "exclude this embedding from lossless")
        w = emb.weight.detach() if weight is None else weight
        return cls(LL.encode(w, codec), emb.padding_idx)

    def forward(self, ids: Tensor) -> Tensor:
        """Same values as F.embedding(ids, weight, padding_idx) (padding_idx only affects gradients)."""
        return self.decoded_rows(ids)

    def to_state(self) -> tuple[dict[str, Tensor], dict]:
        return self._state({"padding_idx": self.padding_idx})

    @classmethod
    def from_state(cls, t: dict[str, Tensor], cfg: dict) -> "ZipEmbedding":
        cls._check_state(cls.kind, t, cfg)
        meta = {k: v for k, v in cfg.items() if k not in ("crc32", "padding_idx")}
        m = cls(None, cfg.get("padding_idx"), meta)
        _register_state(m, t, cfg)
        return m

    def extra_repr(self) -> str:
        return f"{self.num_embeddings}, {self.embedding_dim}, codec={self.codec}"


def retie(model: nn.Module) -> int:
    """Bind every tied ZipLinear of a (re)loaded model to the module named in its `tied_to`.
    Returns how many were bound."""
    n = 0
    for name, m in model.named_modules():
        if isinstance(m, ZipLinear) and m.meta.get("tied_to") is not None:
            try:
                src = model.get_submodule(m.meta["tied_to"])
            except AttributeError:
                raise UserError(f"{name} is tied to {m.meta['tied_to']}, which the model does not have: "
                                "the export is inconsistent; re-export it") from None
            if not isinstance(src, _ZipWeight) or src.meta.get("tied_to") is not None:
                raise UserError(f"{name} is tied to {m.meta['tied_to']}, which is not a compressed weight: "
                                "re-export the model")
            m.bind(src)
            n += 1
    return n


def unzip_module(m: _ZipWeight) -> nn.Module:
    """The equivalent plain nn.Linear / nn.Embedding with the decoded (bit-identical) weight."""
    w = m.decoded_weight()
    if isinstance(m, ZipLinear):
        lin = nn.Linear(m.in_features, m.out_features, bias=m.bias is not None, device="meta")
        lin.weight = nn.Parameter(w, requires_grad=False)
        if m.bias is not None:
            lin.bias = nn.Parameter(m.bias.detach().clone(), requires_grad=False)
        return lin
    emb = nn.Embedding(m.num_embeddings, m.embedding_dim, padding_idx=m.padding_idx, device="meta")
    emb.weight = nn.Parameter(w, requires_grad=False)
    return emb
