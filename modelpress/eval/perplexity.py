"""Perplexity and agreement with a frozen, documented protocol."""
from __future__ import annotations

import hashlib
import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..calib import protocol as _protocol
from ..errors import UserError
from ..progress import bar

PROTOCOL = ("modelpress-eval/1: texts joined by blank lines, tokenized once without special tokens, cut "
            "into non-overlapping windows of `seqlen` tokens (remainder dropped), first `windows` windows; "
            "each window scored independently (no carried context); NLL over positions 2..seqlen; "
            "perplexity = exp(total NLL / predicted tokens). Agreement = fraction of predicted positions "
            "where argmax logits match the reference model; KL = mean KL(reference || model) per position.")
PROTOCOLS = {_protocol.V1: PROTOCOL,
             _protocol.V2: ("modelpress-eval/2 (default): as modelpress-eval/1, except where the tokenizer adds a "
                            "BOS token by default (tokenizer('a') with special tokens starts with one token more; "
                            "modelpress.calib.protocol): then every window is that BOS followed by `seqlen` - 1 text "
                            "tokens, and the BOS is never a prediction target. Calibration windows likewise.")}


def default_seqlen() -> int:
    """The protocol's default window: 512 tokens on CPU, 2048 on GPU."""
    return 2048 if torch.cuda.is_available() else 512


def eval_windows(tokenizer, texts: list[str], seqlen: int | None = None, windows: int | None = 32,
                 protocol: str = _protocol.DEFAULT) -> Tensor:
    """Non-overlapping token windows (n, seqlen) of the joined texts (seqlen None: default_seqlen()). Under
    modelpress-eval/2 (the default) each window is the tokenizer's default BOS (if it adds one) followed by
    seqlen - 1 text tokens; the BOS is never a prediction target (next-token scoring starts at position 2)."""
    seqlen = seqlen or default_seqlen()
    if seqlen < 2:
        raise UserError(f"evaluate.seqlen must be >= 2, got {seqlen}")
    _protocol.check(protocol, "evaluate.protocol")
    bos = _protocol.window_bos(tokenizer, protocol)
    full, seqlen = seqlen, _protocol.body_len(seqlen, bos)
    ids: list[int] = []
    limit = None if windows is None else windows * seqlen
    for t in texts:
        ids.extend(tokenizer(t + "\n\n", add_special_tokens=False)["input_ids"])
        if limit is not None and len(ids) >= limit:
            break
    n = len(ids) // seqlen if windows is None else min(windows, len(ids) // seqlen)
    if n == 0:
        raise UserError(f"evaluation text has {len(ids)} tokens, fewer than one window of {full}: "
                        "give more text or lower --seqlen")
    return _protocol.prepend(torch.tensor(ids[: n * seqlen], dtype=torch.long).reshape(n, seqlen), bos)


def _device(model: nn.Module) -> torch.device:
    return next(model.parameters()).device


# ------------------------------------------------------------------------------------- streaming scoring
#
# The scores are computed row by row: a row is one predicting position, with the full vocabulary. A batch of
# windows runs through the model up to the output layer (its input, the final hidden states (b, T, hidden), is
# captured and the forward stops there); the output layer is then applied to `rows` positions at a time, so at
# most (rows, vocab) logits per model exist at once, whatever the number of windows or the vocabulary size.
# Every per-row figure (log-softmax, target NLL, argmax, KL, max |diff|) is computed by the very same operations
# on the very same full-vocabulary row as the whole-tensor computation, so the figures are identical to it (up to
# the output layer's matmul: rows are taken in multiples of 16, for which CPU GEMMs give each row bitwise the
# whole-batch result). Chunking over the vocabulary instead (online log-sum-exp) would change the order of
# the KL sum and lose that identity (KL is a small difference of large terms: fp32 reordering alone moves it
# by ~1e-5 relative).

CHUNK_ELEMENTS = 1 << 20        # logits per chunk (rows x vocab): 4 MB of float32 per model


class _Stop(Exception):
    pass


def _post(model: nn.Module):
    """What the model does to the output layer's result before returning logits (final soft-capping in
    Gemma-2/3 style configs); identity elsewhere."""
    cfg = getattr(model, "config", None)
    cfg = cfg.get_text_config() if cfg is not None and hasattr(cfg, "get_text_config") else cfg
    cap = getattr(cfg, "final_logit_softcapping", None)
    if cap:
        return lambda z: torch.tanh(z / cap) * cap
    return lambda z: z


def _head_hidden(model: nn.Module, ids: Tensor) -> Tensor:
    """The input of the model's output layer (get_output_embeddings()) for `ids` (b, T): (b, T, hidden);
    the forward stops there (the full logits are never computed)."""
    head = model.get_output_embeddings()
    got: list[Tensor] = []

    def hook(_m, args):
        got.append(args[0])
        raise _Stop

    h = head.register_forward_pre_hook(hook)
    try:
        model(input_ids=ids, use_cache=False)
    except _Stop:
        pass
    finally:
        h.remove()
    if not got:
        raise RuntimeError(f"{type(model).__name__} never called its output layer")
    return got[0]


def _streamable(model: nn.Module, ids: Tensor) -> bool:
    """Whether logits = post(head(final hidden)) for this model, checked on a short prefix of `ids` against
    the model's own logits (a model that does more after its output layer falls back to full logits)."""
    if getattr(model, "get_output_embeddings", None) is None or model.get_output_embeddings() is None:
        return False
    p = ids[:1, : min(8, ids.shape[1])].to(_device(model))
    try:
        h = _head_hidden(model, p)
    except RuntimeError:
        return False
    want = model(input_ids=p, use_cache=False).logits.float()
    got = _post(model)(model.get_output_embeddings()(h)).float()
    return got.shape == want.shape and torch.allclose(got, want, rtol=1e-4, atol=1e-4 * float(want.abs().max()))


def head_sha256(head: nn.Module) -> str:
    """Hash of an output layer (its type and every tensor's bytes, without copying them)."""
    h = hashlib.sha256(f"{type(head).__module__}.{type(head).__qualname__}".encode())
    for k, v in sorted(head.state_dict().items()):
        t = v.detach().contiguous().cpu()
        h.update(f"{k}{t.dtype}{tuple(t.shape)}".encode())
        if t.numel():
            h.update(memoryview(t.view(torch.uint8).numpy()))
    return h.hexdigest()


class _Rows:
    """Full-vocabulary logit rows (float32, CPU) for the predicting positions of one batch (b, T - 1)."""

    def __init__(self, hidden: Tensor | None = None, head: nn.Module | None = None, post=None,
                 logits: Tensor | None = None):
        self.hidden = None if hidden is None else hidden.reshape(-1, hidden.shape[-1])   # (b*(T-1), hidden)
        self.head, self.post = head, post
        self.logits = None if logits is None else logits.reshape(-1, logits.shape[-1])   # (b*(T-1), vocab)

    def vocab(self) -> int:
        if self.logits is not None:
            return self.logits.shape[-1]
        return int(self.post(self.head(self.hidden[:1].to(_device(self.head)))).shape[-1])

    def __call__(self, a: int, b: int) -> Tensor:
        """Rows a..b of the logits, in memory of their own (evaluate changes them in place)."""
        if self.logits is not None:
            out = self.logits[a:b].float().cpu()
            return out.clone() if out.untyped_storage().data_ptr() == self.logits.untyped_storage().data_ptr() else out
        return self.post(self.head(self.hidden[a:b].to(_device(self.head)))).float().cpu()


def _model_rows(model: nn.Module, ids: Tensor, streaming: bool) -> _Rows:
    dev_ids = ids.to(_device(model))
    if streaming:
        return _Rows(_head_hidden(model, dev_ids)[:, :-1], model.get_output_embeddings(), _post(model))
    return _Rows(logits=model(input_ids=dev_ids, use_cache=False).logits[:, :-1])


class _Parked:
    """Per-batch hidden states in a safetensors file (ReferenceScores.park), read one batch per access."""

    def __init__(self, path, n: int):
        self.path, self.n = path, n

    def __len__(self) -> int:
        return self.n

    def __getitem__(self, i: int) -> Tensor:
        from ..io import read_tensor
        if not 0 <= i < self.n:
            raise IndexError(i)
        return read_tensor(self.path, f"b{i}")


@dataclass
class ReferenceScores:
    """The reference model's side of `evaluate` on fixed windows, computed once (`reference_scores`), so the
    reference model itself need not stay in memory: its final hidden states per batch (the output layer's input
    at the predicting positions, (b, seqlen - 1, hidden) each: small), its per-token NLL (n, seqlen - 1), and
    its output layer (`head`), or only that layer's hash once released: the compared model's own output layer
    is then used, which evaluate() allows only when its hash is the same (unchanged by compression)."""
    windows: Tensor
    batch_size: int
    hidden: "list[Tensor] | _Parked | None"     # None: no separable output layer (logits kept instead)
    logits: list[Tensor] | None
    nll: Tensor | None              # None: scores of a compared model (scores_from_hidden with_nll=False)
    head: nn.Module | None
    head_sha256: str | None
    post: object = None

    def release_head(self) -> None:
        self.head = None

    def park(self, path) -> None:
        """Move the hidden states to a safetensors file at `path`: from then on each batch's states are read
        back from it when used (evaluate holds one batch at a time), or all at once by unpark()."""
        from ..io import atomic_save_file
        if self.hidden and not isinstance(self.hidden, _Parked):
            atomic_save_file({f"b{i}": h for i, h in enumerate(self.hidden)}, path)
            self.hidden = _Parked(path, len(self.hidden))

    def unpark(self) -> None:
        """Make the hidden states park() wrote resident again (a no-op when none are parked)."""
        if isinstance(self.hidden, _Parked):
            self.hidden = [self.hidden[i] for i in range(len(self.hidden))]

    def head_for(self, model: "nn.Module | ReferenceScores") -> nn.Module:
        """The output layer to apply to the stored hidden states when scoring against `model` (a model, or its
        scores): the kept one, or `model`'s own, whichever still hashes as the reference's did (compression may
        have changed the kept one in place); UserError when neither does."""
        own = model.head if isinstance(model, ReferenceScores) else model.get_output_embeddings()
        for cand in (self.head, own):
            if cand is not None and head_sha256(cand) == self.head_sha256:
                return cand
        raise UserError("the reference's output layer changed or was released and the compared model's output "
                        "layer differs from it: set ReferenceScores.head to the original output layer")

    def evaluation(self) -> dict:
        """The reference model's own evaluate() result (perplexity, tokens, windows, seqlen)."""
        if self.nll is None:
            raise UserError("these scores were computed without their NLL (with_nll=False): score the model with "
                            "reference_scores to use it as a reference")
        return _summary(self.nll, self.windows)


def _summary(nll: Tensor, windows: Tensor) -> dict:
    return {"perplexity": math.exp(float(nll.double().mean())), "tokens": nll.numel(),
            "windows": windows.shape[0], "seqlen": windows.shape[1]}


def _rows_per_chunk(vocab: int, chunk_elements: int) -> int:
    """Rows per chunk: a multiple of 16 (CPU GEMM kernels block rows by 8/16: with whole blocks, each row's
    logits are bitwise those of the whole-batch matmul), at least 16."""
    return max(16, chunk_elements // max(vocab, 1) // 16 * 16)


@torch.no_grad()
def reference_scores(reference: nn.Module, windows: Tensor, batch_size: int = 2,
                     chunk_elements: int = CHUNK_ELEMENTS, progress: str | None = None) -> ReferenceScores:
    """Score `reference` on `windows` once and keep only what `evaluate` needs from it (see ReferenceScores).
    The output layer is kept (by reference, not copied); call release_head() to drop it when the compared
    model's output layer will be the same. `progress`: a label for batch i/N progress lines (modelpress.progress)."""
    streaming = windows.numel() > 0 and _streamable(reference, windows)
    hidden, logits, nll = [], [], []
    with bar(progress, -(-windows.shape[0] // batch_size)) as advance:
        for b in range(0, windows.shape[0], batch_size):
            _score_reference_batch(reference, windows[b:b + batch_size], streaming, chunk_elements, hidden, logits, nll)
            advance()
    head = reference.get_output_embeddings() if streaming else None
    return ReferenceScores(windows, batch_size, hidden if streaming else None, None if streaming else logits,
                           torch.cat(nll), head, head_sha256(head) if head is not None else None,
                           _post(reference) if streaming else None)


def _score_reference_batch(reference: nn.Module, ids: Tensor, streaming: bool, chunk_elements: int,
                           hidden: list, logits: list, nll: list) -> None:
    """One batch of reference_scores: appends its NLL and its hidden states (or logits) to the lists."""
    _append_scores(_model_rows(reference, ids, streaming), ids, streaming, chunk_elements, hidden, logits, nll)


@torch.no_grad()
def scores_from_hidden(windows: Tensor, batch_size: int, hidden: list[Tensor], head: nn.Module, post,
                       chunk_elements: int = CHUNK_ELEMENTS, progress: str | None = None,
                       with_nll: bool = True) -> ReferenceScores:
    """ReferenceScores from the output layer's inputs of each batch of `windows` ((b, seqlen, hidden) each, as
    the model's forward hands them to `head`; `post`: what the model applies to the head's result, see _post),
    computed by the same operations as reference_scores (modelpress.engine.stream computes the inputs layer by
    layer). The entries of `hidden` are released as they are scored. with_nll=False: the output layer is not
    applied (scores of a compared model, for which evaluate computes the NLL itself; nll is then None)."""
    hid: list[Tensor] = []
    nll: list[Tensor] = []
    with bar(progress, len(hidden)) as advance:
        for i in range(len(hidden)):
            h, hidden[i] = hidden[i], None          # the caller's list is consumed: one copy of the states at a time
            ids = windows[i * batch_size:(i + 1) * batch_size]
            if with_nll:
                _append_scores(_Rows(h[:, :-1], head, post), ids, True, chunk_elements, hid, [], nll)
            else:
                hid.append(h[:, :-1].contiguous())
            del h
            advance()
    return ReferenceScores(windows, batch_size, hid, None, torch.cat(nll) if with_nll else None, head,
                           head_sha256(head), post)


def _append_scores(rows: _Rows, ids: Tensor, streaming: bool, chunk_elements: int, hidden: list, logits: list,
                   nll: list) -> None:
    tgt = ids[:, 1:].reshape(-1)
    step = _rows_per_chunk(rows.vocab(), chunk_elements)
    out = torch.empty(tgt.numel())
    for a in range(0, tgt.numel(), step):
        lp = F.log_softmax(rows(a, a + step), -1)
        out[a:a + step] = -lp.gather(-1, tgt[a:a + step, None])[:, 0]
    nll.append(out.reshape(ids.shape[0], -1))
    if streaming:
        hidden.append(rows.hidden.detach().cpu().reshape(ids.shape[0], ids.shape[1] - 1, -1))
    else:
        logits.append(rows.logits.detach().float().cpu().reshape(ids.shape[0], ids.shape[1] - 1, -1))


@torch.no_grad()
def evaluate(model: nn.Module | ReferenceScores, windows: Tensor, reference: nn.Module | ReferenceScores | None = None,
             batch_size: int = 2, chunk_elements: int = CHUNK_ELEMENTS, progress: str | None = None) -> dict:
    """Perplexity of `model` (a model, or its scores on these windows with the output layer kept, as
    modelpress.engine.stream computes them layer by layer) on `windows`; with `reference` (a model, or its
    ReferenceScores on these windows), also agreement, KL and max |logit diff|, plus per-token arrays under
    "per_token" (agree, kl, linf, nll: (n, seqlen - 1)). Streams: at most `chunk_elements` logits per model
    exist at a time (see above). `progress`: a label for batch i/N progress lines (modelpress.progress)."""
    for sc in (reference, model):
        if isinstance(sc, ReferenceScores) and (not torch.equal(sc.windows, windows) or sc.batch_size != batch_size):
            raise UserError("scores were computed on other windows or another batch size: "
                            "compute them with reference_scores(model, windows, batch_size)")
    scored = isinstance(model, ReferenceScores)
    if scored and (model.hidden is None or model.head is None):
        raise UserError("the compared model's scores need its hidden states and output layer (a streamable model)")
    streaming = windows.numel() > 0 and not scored and _streamable(model, windows)
    ref_stream = (isinstance(reference, nn.Module) and windows.numel() > 0 and _streamable(reference, windows))
    ref_head = reference.head_for(model) if isinstance(reference, ReferenceScores) and reference.hidden else None
    nll, agree, kl, linf, ref_nll = [], [], [], [], []
    with bar(progress, -(-windows.shape[0] // batch_size)) as advance:
        for i, b in enumerate(range(0, windows.shape[0], batch_size)):
            ids = windows[b:b + batch_size]
            shape = (ids.shape[0], ids.shape[1] - 1)
            tgt = ids[:, 1:].reshape(-1)
            rows = _Rows(model.hidden[i], model.head, model.post) if scored else _model_rows(model, ids, streaming)
            if reference is None:
                rrows = None
            elif isinstance(reference, ReferenceScores):
                rrows = (_Rows(reference.hidden[i], ref_head, reference.post) if reference.hidden is not None
                         else _Rows(logits=reference.logits[i]))
            else:
                rrows = _model_rows(reference, ids, ref_stream)
            step = _rows_per_chunk(rows.vocab(), chunk_elements)
            n = tgt.numel()
            o_nll = torch.empty(n)
            if rrows is not None:
                o_rnll, o_agree, o_kl, o_linf = torch.empty(n), torch.empty(n, dtype=torch.bool), torch.empty(n), torch.empty(n)
            for a in range(0, n, step):
                t = tgt[a:a + step, None]
                logits = rows(a, a + step)                                        # (rows, vocab)
                lp = F.log_softmax(logits, -1)
                o_nll[a:a + step] = -lp.gather(-1, t)[:, 0]
                if rrows is not None:
                    # at most three (rows, vocab) tensors live at once: in-place steps compute the very values
                    # of the out-of-place expressions they replace (logits - rlogits, rlp.exp() * (rlp - lp))
                    rlogits = rrows(a, a + step)
                    o_agree[a:a + step] = logits.argmax(-1) == rlogits.argmax(-1)
                    o_linf[a:a + step] = logits.sub_(rlogits).abs_().amax(-1)
                    del logits
                    rlp = F.log_softmax(rlogits, -1)
                    del rlogits
                    o_rnll[a:a + step] = -rlp.gather(-1, t)[:, 0]
                    p = rlp.exp()
                    o_kl[a:a + step] = p.mul_(rlp.sub_(lp)).sum(-1).clamp(min=0)
                    del p, rlp
                else:
                    del logits
                del lp
            nll.append(o_nll.reshape(shape))
            if rrows is not None:
                ref_nll.append(o_rnll.reshape(shape))
                agree.append(o_agree.reshape(shape))
                kl.append(o_kl.reshape(shape))
                linf.append(o_linf.reshape(shape))
            advance()
    nll_t = torch.cat(nll)
    out = _summary(nll_t, windows)
    if reference is not None:
        a, k, li, rn = torch.cat(agree), torch.cat(kl), torch.cat(linf), torch.cat(ref_nll)
        out.update(reference_perplexity=math.exp(float(rn.double().mean())), agreement=float(a.double().mean()),
                   kl=float(k.double().mean()), linf=float(li.max()),
                   per_token={"agree": a, "kl": k, "linf": li, "nll": nll_t})
    return out


def perplexity(model: nn.Module, windows: Tensor, batch_size: int = 2) -> float:
    return evaluate(model, windows, batch_size=batch_size)["perplexity"]


def compare(orig: nn.Module, comp: nn.Module, windows: Tensor, batch_size: int = 2) -> dict:
    """Agreement/KL/linf of `comp` against `orig` (with per-token arrays) and both perplexities."""
    return evaluate(comp, windows, reference=orig, batch_size=batch_size)
