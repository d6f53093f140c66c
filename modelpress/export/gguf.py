"""Export to GGUF (llama.cpp's single-file format, PyPI `gguf`) for Llama-family decoders
(llama, mistral, qwen2), readable by llama.cpp and by transformers (`from_pretrained(dir, gguf_file=...)`).

Scheme mapping (block size 32 along the input dimension, one fp16 scale d per block):
  symmetric 4-bit, group 32  -> Q4_0 exactly:  w = d (q - 8),  d = our fp16 scale, q = our code;
  symmetric 8-bit, group 32  -> Q8_0 exactly:  w = d q8,       q8 = q - 128 (int8);
  symmetric 5-bit, group 32  -> Q5_0 exactly:  w = d (q - 16);
  asymmetric 4/5-bit, group 32 -> Q4_1/Q5_1 (w = d q + m): d = s, m = fp16(-s z); the only error is the fp16
                                rounding of m, measured and reported per tensor;
  a k-quant grid (quantize.format q4_k/q5_k/q6_k, algos/kquant.py) -> Q4_K/Q5_K/Q6_K exactly (super-blocks of
                                256 weights, 6/8-bit sub-block scales, fp16 d/dmin; layout in k_blocks);
  any other scheme           -> the dequantized weight is requantized with gguf's own quantizer
                                (`gguf.quants.quantize`, `requantize=` type, default Q8_0) and the
                                extra error (SQNR of GGUF vs our weights, dB) is reported per tensor;
                                `requantize=None` refuses such a model with a UserError instead.
Per-head bit widths inside one linear (QuantLinear.bits_map, quantize `budget: capability`): a GGUF tensor has
one type, so the module is written at its widest width B (QuantLinear.widest: every b-bit code, b <= B, is exactly
a B-bit one on the same scale), then mapped as above: exact where the B-bit scheme has an exact type (w4 g32 sym
-> Q4_0), requantized (or refused with requantize=None) otherwise.
Pruned weights of a quantized layer get the code of their zero point (exactly 0 for Q4_0/Q8_0).
Unquantized tensors are written in the model's float dtype (1-D tensors always F32), so a scheme that
maps exactly gives a GGUF whose dequantized weights equal ours bit for bit.

Tensor names come from gguf.TensorNameMap; Llama/Mistral q/k rows are permuted as llama.cpp's
convert_hf_to_gguf.py does (transformers' GGUF loader un-permutes them). The tokenizer (byte-level BPE)
is written with gguf.vocab.BpeVocab/SpecialVocab; tokens that tokenizer.json marks special are CONTROL.
Only the block byte layout (d, then packed codes: Q4_0 byte j holds codes j and j+16) is written here;
it is checked against gguf.quants.dequantize at export time. GPTQ codes: arXiv 2210.17323."""
from __future__ import annotations

import json
import math
import os
import tempfile
from pathlib import Path

import numpy as np
import torch
from torch import Tensor, nn

from ..algos import kquant
from ..errors import UserError

BLOCK = 32
ARCHS = {"llama": "LLAMA", "mistral": "LLAMA", "qwen2": "QWEN2"}     # HF model_type -> gguf.MODEL_ARCH
PERMUTE_QK = {"llama", "mistral"}
REQUANTIZE_TYPES = ("q8_0", "q4_0", "q4_1", "q5_0", "q5_1")
FLOAT_TYPES = ("f32", "f16", "bf16")
EMBED_TYPES = ("auto", "q8_0", "q6_k", "float")


# ---------------------------------------------------------------- pure layout / math functions

def q4_0_blocks(q: Tensor, d: Tensor) -> np.ndarray:
    """Codes q (rows, cols) in [0, 15] (w = d (q - 8)), fp16 scales d (rows, cols / 32) ->
    Q4_0 bytes (rows, cols / 32 * 18): per block d (fp16), then 16 bytes, byte j = q_j | q_{j+16} << 4."""
    rows, cols = q.shape
    qb = q.to(torch.uint8).reshape(rows, cols // BLOCK, 2, BLOCK // 2).numpy()
    packed = qb[:, :, 0, :] | (qb[:, :, 1, :] << np.uint8(4))                   # (rows, nb, 16)
    dd = d.to(torch.float16).numpy().reshape(rows, -1, 1).view(np.uint8)         # (rows, nb, 2)
    return np.concatenate([dd, packed], axis=-1).reshape(rows, -1)


def q4_1_blocks(q: Tensor, d: Tensor, m: Tensor) -> np.ndarray:
    """Codes q (rows, cols) in [0, 15] (w = d q + m), fp16 d, m (rows, cols / 32) -> Q4_1 bytes
    (rows, cols / 32 * 20): per block d, m (fp16), then the 16 code bytes as in Q4_0."""
    rows, cols = q.shape
    qb = q.to(torch.uint8).reshape(rows, cols // BLOCK, 2, BLOCK // 2).numpy()
    packed = qb[:, :, 0, :] | (qb[:, :, 1, :] << np.uint8(4))
    dd = d.to(torch.float16).numpy().reshape(rows, -1, 1).view(np.uint8)
    mm = m.to(torch.float16).numpy().reshape(rows, -1, 1).view(np.uint8)
    return np.concatenate([dd, mm, packed], axis=-1).reshape(rows, -1)


def q5_blocks(q: Tensor, d: Tensor, m: Tensor | None = None) -> np.ndarray:
    """5-bit codes q (rows, cols) in [0, 31] -> Q5_0 bytes (m None: w = d (q - 16); d, 4 high-bit bytes, 16 code
    bytes) or Q5_1 bytes (w = d q + m; d, m, 4 high-bit bytes, 16 code bytes): the low nibbles packed as in Q4_0,
    the high bits as one little-endian uint32 per block (bit j: code j)."""
    rows, cols = q.shape
    qb = q.to(torch.uint8).reshape(rows, cols // BLOCK, BLOCK).numpy()
    lo = (qb & 0x0F).reshape(rows, -1, 2, BLOCK // 2)
    packed = lo[:, :, 0, :] | (lo[:, :, 1, :] << np.uint8(4))                    # (rows, nb, 16)
    qh = ((qb >> 4).astype(np.uint32) << np.arange(BLOCK, dtype=np.uint32)).sum(-1, dtype=np.uint32)
    qh = qh.astype("<u4").reshape(rows, -1, 1).view(np.uint8)                     # (rows, nb, 4)
    parts = [d.to(torch.float16).numpy().reshape(rows, -1, 1).view(np.uint8)]
    if m is not None:
        parts.append(m.to(torch.float16).numpy().reshape(rows, -1, 1).view(np.uint8))
    return np.concatenate(parts + [qh, packed], axis=-1).reshape(rows, -1)


def q8_0_blocks(q8: Tensor, d: Tensor) -> np.ndarray:
    """Signed codes q8 (rows, cols) in [-128, 127] (w = d q8), fp16 d (rows, cols / 32) ->
    Q8_0 bytes (rows, cols / 32 * 34): per block d (fp16), then 32 int8 codes."""
    rows, cols = q8.shape
    qb = q8.to(torch.int8).reshape(rows, cols // BLOCK, BLOCK).numpy().view(np.uint8)
    dd = d.to(torch.float16).numpy().reshape(rows, -1, 1).view(np.uint8)
    return np.concatenate([dd, qb], axis=-1).reshape(rows, -1)


def _kscales(sc: np.ndarray, m: np.ndarray) -> np.ndarray:
    """6-bit sub-block scales and mins (rows, nsup, 8) each -> Q4_K/Q5_K's 12 scale bytes (rows, nsup, 12):
    bytes 0-3: sc_0..3 | (sc_4..7 >> 4) << 6; bytes 4-7: m_0..3 | (m_4..7 >> 4) << 6; bytes 8-11: low nibbles of
    sc_4..7 | low nibbles of m_4..7 << 4."""
    sc, m = sc.astype(np.uint8), m.astype(np.uint8)
    lo_sc = sc[..., :4] | ((sc[..., 4:] >> 4) << 6)
    lo_m = m[..., :4] | ((m[..., 4:] >> 4) << 6)
    hi = (sc[..., 4:] & 0x0F) | ((m[..., 4:] & 0x0F) << 4)
    return np.concatenate([lo_sc, lo_m, hi], axis=-1)


def k_blocks(q: Tensor, p) -> np.ndarray:
    """Codes q (rows, cols) and their k-quant parameters (algos.kquant.KParams) -> the GGUF block bytes
    (rows, cols / 256 * block bytes) of p.fmt, inverting gguf.quants' dequantizer's layout:
      Q4_K: d, dmin (fp16), 12 scale bytes, 128 code bytes (chunk c of 32 bytes: sub-block 2c low nibbles,
            2c+1 high nibbles);
      Q5_K: as Q4_K with 32 high-bit bytes before the codes (bit j of byte i: sub-block j, weight i);
      Q6_K: 128 low-nibble bytes, 64 high-2-bit bytes, 16 int8 scales, d (fp16)."""
    rows, cols = q.shape
    nsup = cols // kquant.SUPER
    qb = q.to(torch.uint8).numpy().reshape(rows, nsup, kquant.SUPER)
    d = p.d.to(torch.float16).numpy().reshape(rows, nsup, 1).view(np.uint8)
    if p.fmt in ("q4_k", "q5_k"):
        dmin = p.dmin.to(torch.float16).numpy().reshape(rows, nsup, 1).view(np.uint8)
        scales = _kscales(p.sc.numpy().reshape(rows, nsup, 8), p.m.numpy().reshape(rows, nsup, 8))
        lo = (qb & 0x0F).reshape(rows, nsup, 4, 2, 32)
        qs = (lo[..., 0, :] | (lo[..., 1, :] << 4)).reshape(rows, nsup, 128)
        parts = [d, dmin, scales]
        if p.fmt == "q5_k":
            hb = (qb >> 4).reshape(rows, nsup, 8, 32)
            parts.append(np.bitwise_or.reduce(hb << np.arange(8, dtype=np.uint8)[:, None], axis=2))
        return np.concatenate(parts + [qs], axis=-1).reshape(rows, -1)
    if p.fmt == "q6_k":
        x = qb.reshape(rows, nsup, 2, 128)                         # two halves of 128 weights
        lo = (x & 0x0F).reshape(rows, nsup, 2, 2, 64)
        ql = (lo[..., 0, :] | (lo[..., 1, :] << 4)).reshape(rows, nsup, 128)
        hi = (x >> 4).reshape(rows, nsup, 2, 4, 32)
        qh = (hi[..., 0, :] | (hi[..., 1, :] << 2) | (hi[..., 2, :] << 4) | (hi[..., 3, :] << 6)).reshape(rows, nsup, 64)
        scales = p.sc.numpy().astype(np.int8).reshape(rows, nsup, 16).view(np.uint8)
        return np.concatenate([ql, qh, scales, d], axis=-1).reshape(rows, -1)
    raise ValueError(f"no k-quant layout for {p.fmt}")


def permute_qk(w: Tensor, n_head: int, n_head_kv: int | None = None) -> Tensor:
    """llama.cpp's q/k row permutation (HF rotate-half layout -> interleaved pairs); works on any
    tensor whose first dim is the head-major output dim: weights (rows, cols), scales, biases (rows,)."""
    if n_head_kv is not None and n_head != n_head_kv:
        n_head = n_head_kv
    return w.reshape(n_head, 2, w.shape[0] // n_head // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def sqnr_db(ref: np.ndarray, approx: np.ndarray) -> float:
    ref, approx = ref.astype(np.float64), approx.astype(np.float64)
    noise = float(((ref - approx) ** 2).sum())
    return math.inf if noise == 0 else 10 * math.log10(float((ref ** 2).sum()) / noise)


# ---------------------------------------------------------------- module -> GGUF tensor

def _quant_tensor(m, requantize: str | None, name: str, perm) -> tuple[np.ndarray, object, np.ndarray]:
    """(bytes or float array, GGMLQuantizationType, our dequantized weight) for one QuantLinear."""
    import gguf
    Q = gguf.GGMLQuantizationType
    cols = m.in_features
    q, z = (t.cpu() for t in m.widest())      # mixed widths: the codes on the widest width's grid (exact)
    s = m.scale.cpu()
    if m.fmt is not None:                      # codes on a k-quant grid: the k-quant type, exactly
        kp = m.kparams
        kp = type(kp)(kp.fmt, perm(kp.d.cpu()), perm(kp.sc.cpu()), perm(kp.dmin.cpu()), perm(kp.m.cpu()))
        return k_blocks(perm(q), kp), Q[m.fmt.upper()], perm(m.dequantized().float().cpu()).numpy()
    if m.keep is not None:                     # pruned weights: the zero point's code
        q = torch.where(m.keep.cpu(), q, z.repeat_interleave(m.group_size or cols, 1)[:, :cols])
    ours = perm(m.dequantized().float().cpu())
    q, s, z = perm(q), perm(s), perm(z)
    if m.group_size == BLOCK and cols % BLOCK == 0:
        if m.bits == 4 and m.sym:
            return q4_0_blocks(q, s), Q.Q4_0, ours.numpy()
        if m.bits == 8 and m.sym:
            return q8_0_blocks(q.to(torch.int16) - 128, s), Q.Q8_0, ours.numpy()
        if m.bits == 4 and not m.sym:
            return q4_1_blocks(q, s, -(s.float() * z.float())), Q.Q4_1, ours.numpy()
        if m.bits == 5:
            if m.sym:
                return q5_blocks(q, s), Q.Q5_0, ours.numpy()
            return q5_blocks(q, s, -(s.float() * z.float())), Q.Q5_1, ours.numpy()
    if requantize is None:
        raise UserError(f"{name}: {m.bits}-bit group {m.group_size} {'sym' if m.sym else 'asym'} has no exact GGUF "
                        "type (exact: 4/8-bit symmetric or 4-bit asymmetric, group_size 32): quantize with group_size 32, "
                        f"or pass requantize= one of {', '.join(REQUANTIZE_TYPES)}")
    if cols % BLOCK:
        return ours.numpy(), Q.F32, ours.numpy()
    qt = Q[requantize.upper()]
    return gguf.quants.quantize(ours.numpy(), qt), qt, ours.numpy()


def _float(t: Tensor, float_type: str) -> np.ndarray:
    t = t.detach().cpu()
    if t.dim() == 1 or float_type == "f32":
        return t.float().numpy()
    if float_type == "f16":
        return t.to(torch.float16).numpy()
    return t.to(torch.bfloat16).view(torch.uint16).numpy()     # written with raw_dtype BF16


# ---------------------------------------------------------------- tokenizer

def _add_tokenizer(w, tokenizer, vocab_size: int, pre: str) -> str:
    """Write the byte-level BPE vocabulary, merges, special ids and chat template; returns a note."""
    import gguf
    from gguf.vocab import BpeVocab, SpecialVocab
    with tempfile.TemporaryDirectory() as tmp:
        tokenizer.save_pretrained(tmp)
        try:
            vocab = BpeVocab(Path(tmp))
        except (FileNotFoundError, ValueError) as e:
            return f"tokenizer not written ({e}): llama.cpp/transformers need the tokenizer from the HF folder"
        tj = json.loads((Path(tmp) / "tokenizer.json").read_text(encoding="utf-8"))
        special = {a["content"] for a in tj.get("added_tokens", []) if a.get("special")}
        tokens, types, scores = [], [], []
        for text, score, typ in vocab.all_tokens():
            t = text.decode("utf-8") if isinstance(text, bytes) else text
            tokens.append(t)
            scores.append(score)
            types.append(gguf.TokenType.CONTROL if t in special else typ)
        if len(tokens) > vocab_size:
            raise UserError(f"tokenizer has {len(tokens)} tokens but the model's vocab_size is {vocab_size}: "
                            "export the tokenizer the model was trained with")
        for i in range(len(tokens), vocab_size):    # llama.cpp's padding convention
            tokens.append(f"[PAD{i}]")
            scores.append(-1000.0)
            types.append(gguf.TokenType.UNUSED)
        w.add_tokenizer_model("gpt2")
        w.add_tokenizer_pre(pre)
        w.add_token_list(tokens)
        w.add_token_types(types)
        w.add_token_scores(scores)          # transformers derives merges from them when there are none
        sv = SpecialVocab(Path(tmp), load_merges=True, n_vocab=vocab_size)
        sv.add_to_gguf(w, quiet=True)
        if sv.chat_template is None and getattr(tokenizer, "chat_template", None):
            w.add_chat_template(tokenizer.chat_template)
    return f"tokenizer: byte-level BPE, {len(tokens)} tokens"


# ---------------------------------------------------------------- export

# ---------------------------------------------------------------- embeddings, source metadata

def _embedding(w: Tensor, etype: str):
    """(data, GGMLQuantizationType or None, GGUF type name) of an embedding/output matrix (rows, cols) in etype:
    q8_0 (gguf's quantizer) or q6_k (round-to-nearest on the Q6_K grid with the clipping search, algos.kquant)."""
    import gguf
    w = w.detach().float().cpu()
    if etype == "q6_k":
        q, p = kquant.rtn(w, "q6_k", "mse")
        return k_blocks(q, p), gguf.GGMLQuantizationType.Q6_K, "Q6_K"
    return gguf.quants.quantize(w.numpy(), gguf.GGMLQuantizationType.Q8_0), gguf.GGMLQuantizationType.Q8_0, "Q8_0"


def source_gguf(model: nn.Module, tokenizer, exclude: Path | None = None) -> Path | None:
    """The GGUF file the model was converted from, if known: the one .gguf file (other than `exclude`) in the
    folder the tokenizer or model was loaded from (from_pretrained(folder, gguf_file=...)), or the file named by
    the folder's SOURCE.json {"package", "file"} (modelpress.model's cached conversions of the reference models)."""
    import importlib.util
    for base in (getattr(tokenizer, "name_or_path", None), getattr(getattr(model, "config", None), "_name_or_path", None)):
        if not base or not Path(base).is_dir():
            continue
        b = Path(base)
        ggufs = [f for f in b.glob("*.gguf") if exclude is None or f.resolve() != exclude.resolve()]
        if len(ggufs) == 1:
            return ggufs[0]
        try:
            info = json.loads((b / "SOURCE.json").read_text(encoding="utf-8"))
            spec = importlib.util.find_spec(info["package"].split("==")[0].replace("-", "_"))
        except (OSError, ValueError, KeyError, TypeError, ImportError, AttributeError):
            continue
        f = Path(spec.origin).parent / info["file"] if spec is not None and spec.origin else None
        if f is not None and f.suffix == ".gguf" and f.is_file():
            return f
    return None


SKIP_KEYS = ("general.architecture", "general.file_type", "general.quantization_version", "general.alignment")


def source_metadata(path: str | os.PathLike) -> list[tuple[str, object, object, object]]:
    """The general.* and tokenizer.* key/values of a GGUF (what llama.cpp's converter wrote) as
    (key, value, GGUFValueType, array sub-type or None), to write unchanged into the export."""
    import gguf
    out = []
    for k, f in gguf.GGUFReader(path).fields.items():
        if not k.startswith(("general.", "tokenizer.")) or k in SKIP_KEYS:
            continue
        sub = f.types[-1] if f.types[0] == gguf.GGUFValueType.ARRAY else None
        out.append((k, f.contents(), f.types[0], sub))
    return out


def _add_flags(w, tokenizer) -> None:
    """add_bos_token / add_eos_token as the tokenizer behaves (encode a probe), when SpecialVocab found no flag."""
    ids = tokenizer("a").input_ids
    for key, tid in (("tokenizer.ggml.add_bos_token", tokenizer.bos_token_id),
                     ("tokenizer.ggml.add_eos_token", tokenizer.eos_token_id)):
        if not any(key in kv for kv in w.kv_data):
            end = ids[:1] if "bos" in key else ids[-1:]
            w.add_bool(key, tid is not None and end == [tid] and len(ids) > 1)


# ---------------------------------------------------------------- export

def save_gguf(model: nn.Module, tokenizer, path: str | os.PathLike, requantize: str | None = "q8_0",
              float_type: str | None = None, tokenizer_pre: str | None = None, embed_type: str = "auto",
              source: str | os.PathLike | None = "auto") -> dict:
    """Write `model` (compressed in place by modelpress, or plain) as one GGUF file, atomically.

    requantize: GGUF type for quantized layers whose scheme has no exact GGUF type (see the module
    docstring), or None to refuse them; float_type: f32 | f16 | bf16 for unquantized matrices
    (default: the model's dtype); embed_type: the token embedding and output matrices' type: auto (for a
    quantized model Q6_K where the rows are a multiple of 256, else Q8_0, as llama-quantize; float for a plain one)
    | q8_0 | q6_k | float; source: the GGUF the model came from (auto: found by source_gguf), whose general.* and
    tokenizer.* metadata (the official converter's: pre-tokenizer, add_bos_token, chat template, ...) are copied
    when its vocabulary fits; tokenizer_pre: the pre-tokenizer name without a source (default "default").
    Returns {"path", "summary", "tensors": {hf name: {gguf, type, exact,
    extra_sqnr_db}}}.

    >>> rep = save_gguf(model, tok, "out/model.gguf")      # w4 g32 sym GPTQ -> Q4_0, exact
    >>> AutoModelForCausalLM.from_pretrained("out", gguf_file="model.gguf")
    """
    import gguf
    from ..modules import QuantLinear
    from .native import compressed_modules

    cfg = model.config
    mt = cfg.model_type
    if mt not in ARCHS:
        raise UserError(f"GGUF export supports {', '.join(sorted(ARCHS))} models, not {mt!r}: "
                        "export in the native or compressed-tensors format")
    from ..model import sliding_window
    if sliding_window(cfg):
        raise UserError(f"GGUF export does not write sliding-window attention ({mt} attends over {sliding_window(cfg)} "
                        "positions in some layers; llama.cpp would attend over all): export in the native or "
                        "compressed-tensors format")
    if requantize is not None and requantize not in REQUANTIZE_TYPES:
        raise UserError(f"gguf requantize must be one of {', '.join(REQUANTIZE_TYPES)} or None, got {requantize!r}")
    dtype = next(model.parameters()).dtype
    float_type = float_type or {torch.float16: "f16", torch.bfloat16: "bf16"}.get(dtype, "f32")
    if embed_type not in EMBED_TYPES:
        raise UserError(f"gguf embed_type must be one of {', '.join(EMBED_TYPES)}, got {embed_type!r}")
    if float_type not in FLOAT_TYPES:
        raise UserError(f"gguf float_type must be one of {', '.join(FLOAT_TYPES)}, got {float_type!r}")
    rope = getattr(cfg, "rope_parameters", None) or getattr(cfg, "rope_scaling", None) or {}
    if rope.get("rope_type", rope.get("type", "default")) not in ("default", None):
        raise UserError(f"GGUF export does not write rope scaling ({rope.get('rope_type')}): "
                        "export in the native or compressed-tensors format")
    arch = getattr(gguf.MODEL_ARCH, ARCHS[mt])
    n_layers = cfg.num_hidden_layers
    names = gguf.get_tensor_name_map(arch, n_layers)
    n_head, n_kv = cfg.num_attention_heads, getattr(cfg, "num_key_value_heads", None) or cfg.num_attention_heads
    head_dim = getattr(cfg, "head_dim", None) or cfg.hidden_size // n_head

    def perm_for(hf: str):
        if mt in PERMUTE_QK and ".q_proj." in hf + ".":
            return lambda t: permute_qk(t, n_head, n_head)
        if mt in PERMUTE_QK and ".k_proj." in hf + ".":
            return lambda t: permute_qk(t, n_head, n_kv)
        return lambda t: t

    def gname(hf: str) -> str:
        g = names.get_name(hf, try_suffixes=(".weight", ".bias"))
        if g is None:
            raise UserError(f"tensor {hf} has no GGUF name for architecture {mt}: export in the native format")
        return g

    Q = gguf.GGMLQuantizationType
    raw_float = {"f32": None, "f16": None, "bf16": Q.BF16}
    entries: list[tuple[str, np.ndarray, object]] = []
    report: dict[str, dict] = {}
    comp = compressed_modules(model)
    for mname, m in comp.items():
        hfw = f"{mname}.weight"
        perm = perm_for(hfw)
        if isinstance(m, QuantLinear):
            data, qt, ours = _quant_tensor(m, requantize, mname, perm)
            back = gguf.quants.dequantize(data, qt).reshape(ours.shape)
            extra = sqnr_db(ours, back)
            entries.append((gname(hfw), data, qt if data.dtype == np.uint8 else None))
            report[hfw] = {"gguf": gname(hfw), "type": qt.name, "exact": bool(np.array_equal(back, ours)),
                           "extra_sqnr_db": extra, "scheme": f"w{m.bits}{' (widest of mixed)' if getattr(m, 'bits_map', None) is not None else ''} "
                                     f"g{m.group_size} {'sym' if m.sym else 'asym'}"}
        else:
            wt = getattr(m, "weight", None)
            if not isinstance(wt, Tensor) or wt.is_meta or wt.dim() != 2 or not isinstance(m, nn.Linear):
                raise UserError(f"{mname} is a {type(m).__name__} without a dense weight, which GGUF cannot store: "
                                "export it in the native format")
            arr = _float(perm(wt.detach()), float_type)
            entries.append((gname(hfw), arr, raw_float[float_type] if arr.ndim > 1 else None))
            report[hfw] = {"gguf": gname(hfw), "type": float_type.upper(), "exact": float_type == "f32" or dtype != torch.float32,
                           "extra_sqnr_db": math.inf}
        if getattr(m, "bias", None) is not None:
            entries.append((gname(f"{mname}.bias"), _float(perm(m.bias.detach()), "f32"), None))
    skip = tuple(n + "." for n in comp)
    seen: set[int] = set()
    out_emb, in_emb = model.get_output_embeddings(), model.get_input_embeddings()
    tied = out_emb is not None and in_emb is not None and out_emb.weight is in_emb.weight
    for k, v in model.state_dict(keep_vars=True).items():
        if k.startswith(skip) or id(v) in seen or (tied and gname(k) == "output.weight"):
            continue       # tied: llama.cpp and transformers reuse token_embd when output.weight is absent
        seen.add(id(v))
        gk = gname(k)
        if gk in ("token_embd.weight", "output.weight") and v.dim() == 2 and v.shape[1] % BLOCK == 0:
            et = embed_type
            if et == "auto":
                et = "q6_k" if any(isinstance(x, QuantLinear) for x in comp.values()) else "float"
            if et in kquant.FORMATS and not kquant.fits(v.shape[1]):
                et = kquant.LLAMA_FALLBACK[et][0]    # llama-quantize's type for rows that are not whole super-blocks
            if et != "float":
                data, qt, tname = _embedding(v, et)
                ref = v.detach().float().cpu().numpy()
                back = gguf.quants.dequantize(data, qt).reshape(ref.shape)
                entries.append((gk, data, qt))        # exact when the values already sit on that grid (from a GGUF)
                report[k] = {"gguf": gk, "type": tname, "exact": bool(np.array_equal(back, ref)),
                             "extra_sqnr_db": sqnr_db(ref, back), "scheme": "embedding"}
                continue
        arr = _float(perm_for(k)(v.detach()), float_type)
        entries.append((gname(k), arr, raw_float[float_type] if arr.ndim > 1 else None))
        report[k] = {"gguf": gname(k), "type": "F32" if arr.ndim == 1 else float_type.upper(),
                     "exact": arr.ndim == 1 or float_type == "f32" or v.dtype != torch.float32, "extra_sqnr_db": math.inf}

    qtypes = [r["type"] for r in report.values() if r["type"].startswith("Q")]
    main = max(set(qtypes), key=qtypes.count) if qtypes else float_type.upper()
    ftype = {"Q4_0": gguf.LlamaFileType.MOSTLY_Q4_0, "Q4_1": gguf.LlamaFileType.MOSTLY_Q4_1,
             "Q8_0": gguf.LlamaFileType.MOSTLY_Q8_0, "Q5_0": gguf.LlamaFileType.MOSTLY_Q5_0,
             "Q5_1": gguf.LlamaFileType.MOSTLY_Q5_1, "F16": gguf.LlamaFileType.MOSTLY_F16,
             "BF16": gguf.LlamaFileType.MOSTLY_BF16, "Q4_K": gguf.LlamaFileType.MOSTLY_Q4_K_M,
             "Q5_K": gguf.LlamaFileType.MOSTLY_Q5_K_M, "Q6_K": gguf.LlamaFileType.MOSTLY_Q6_K}.get(main, gguf.LlamaFileType.ALL_F32)

    path = Path(path)
    src = source_gguf(model, tokenizer, path) if source == "auto" else source
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    os.close(fd)
    try:
        w = gguf.GGUFWriter(tmp, gguf.MODEL_ARCH_NAMES[arch])
        meta = [] if src is None else source_metadata(src)
        keys = {k for k, *_ in meta}
        tokens = next((v for k, v, *_ in meta if k == "tokenizer.ggml.tokens"), None)
        if tokens is not None and len(tokens) != cfg.vocab_size:      # not this vocabulary: keep general.* only
            meta = [x for x in meta if not x[0].startswith("tokenizer.")]
            keys = {k for k, *_ in meta}
        for k, v, vt, sub in meta:
            w.add_key_value(k, v, vt, sub_type=sub)
        if "general.name" not in keys:
            w.add_name(str(getattr(cfg, "_name_or_path", "") or mt) + " (modelpress)")
        w.add_context_length(cfg.max_position_embeddings)
        w.add_embedding_length(cfg.hidden_size)
        w.add_block_count(n_layers)
        w.add_feed_forward_length(cfg.intermediate_size)
        w.add_head_count(n_head)
        w.add_head_count_kv(n_kv)
        w.add_rope_dimension_count(head_dim)
        theta = rope.get("rope_theta", getattr(cfg, "rope_theta", None))
        if theta is not None:
            w.add_rope_freq_base(float(theta))
        w.add_layer_norm_rms_eps(float(cfg.rms_norm_eps))
        w.add_vocab_size(cfg.vocab_size)
        w.add_file_type(ftype)
        w.add_quantization_version(gguf.GGML_QUANT_VERSION)
        if "tokenizer.ggml.tokens" in keys:
            note = f"tokenizer and general metadata from {Path(src).name}"
        elif tokenizer is not None:
            note = _add_tokenizer(w, tokenizer, cfg.vocab_size, tokenizer_pre or "default")
            _add_flags(w, tokenizer)
        else:
            note = "no tokenizer"
        for gn, arr, raw in entries:
            w.add_tensor(gn, arr, raw_dtype=raw)
        w.write_header_to_file()
        w.write_kv_data_to_file()
        w.write_tensors_to_file()
        w.close()
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    inexact = [r for r in report.values() if not r["exact"]]
    worst = min((r["extra_sqnr_db"] for r in inexact), default=math.inf)
    counts: dict[str, int] = {}
    for r in report.values():
        counts[r["type"]] = counts.get(r["type"], 0) + 1
    summary = (f"gguf {path.name}: " + ", ".join(f"{k} x{v}" for k, v in sorted(counts.items()))
               + (f"; {len(inexact)} tensors not exact (worst extra SQNR {worst:.1f} dB)" if inexact else "; all exact")
               + f"; {note}")
    return {"path": str(path), "summary": summary, "tensors": report}
