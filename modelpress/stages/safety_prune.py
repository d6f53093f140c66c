"""Stage `safety_prune`: safety-potential pruning ("Safety-Potential Pruning for Enhancing Safety Prompts
Against VLM Jailbreaking Without Retraining", arXiv 2603.14219).

Two calibration streams run through the model layer by layer: the same requests with and without a
safety prompt (as the system message when the tokenizer has a chat template). For every targeted
linear layer, delta_j = mean_t x_with,tj^2 - mean_t x_without,tj^2 per input channel j, and
score_ij = |W_ij| * sqrt(max(delta_j, 0)) (modelpress.algos.mask). The lowest scores of each row are
pruned (unstructured: `sparsity` of each row; N:M: all but N of every M inputs), ties - e.g. channels
the safety prompt does not excite, or identical streams, where every score is 0 - broken by |W_ij|, so
the stage degrades to per-row magnitude pruning rather than to an arbitrary mask. Layer-sequential:
both streams' inputs to layer l+1 are recomputed with the pruned layer l (modelpress.engine.layerwise).
The pruned model is meant to be deployed *with* the safety prompt; the stats carry it under "deploy".
Text LLMs and the language tower of VLMs (the decoder stack modelpress.model.decoder_layers finds).

The bundled streams come from modelpress/data/harmful_requests.jsonl (mild, generic harmful requests
written for the project, each paired with a benign counterpart) and modelpress/data/safety_prompt.txt.
This stage builds its own streams, so it ignores the recipe's calibration set.
"""
from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from ..engine import layerwise
from ..algos import mask as MK
from ..algos import prune as P
from ..algos import quant
from ..calib import CalibrationSet
from ..errors import UserError
from ..io import sha256_bytes
from ..model import compute_device, set_module
from ..modules import QuantLinear, SparseLinear
from ..targets import Target
from . import _check

DATA = Path(__file__).resolve().parent.parent / "data"


def bundled_requests(kinds: tuple[str, ...] = ("harmful", "benign")) -> list[dict]:
    """The bundled request records ({"id", "kind", "pair", "text"}) of the given kinds."""
    recs = [json.loads(line) for line in (DATA / "harmful_requests.jsonl").read_text(encoding="utf-8").splitlines()
            if line.strip()]
    return [r for r in recs if r["kind"] in kinds]


def bundled_safety_prompt() -> str:
    return (DATA / "safety_prompt.txt").read_text(encoding="utf-8").strip()


def read_requests(path: str | None, kinds: tuple[str, ...]) -> list[str]:
    if path is None:
        return [r["text"] for r in bundled_requests(kinds)]
    p = Path(path)
    if not p.is_file():
        raise UserError(f"safety_prune.requests: {p} does not exist: pass a JSONL file with a `text` field per line")
    out = []
    for i, line in enumerate(p.read_text(encoding="utf-8").splitlines(), 1):
        if not line.strip():
            continue
        try:
            rec = json.loads(line)
        except json.JSONDecodeError:
            raise UserError(f"safety_prune.requests: {p}:{i} is not valid JSON: fix that line") from None
        if not isinstance(rec, dict) or "text" not in rec:
            raise UserError(f"safety_prune.requests: {p}:{i} has no `text` field: add one")
        if rec.get("kind", kinds[0]) in kinds:
            out.append(str(rec["text"]))
    if not out:
        raise UserError(f"safety_prune.requests: {p} has no requests of kinds {list(kinds)}")
    return out


def format_prompt(tokenizer, request: str, safety_prompt: str | None) -> str:
    """The request as the deployed model sees it: chat template (safety prompt as the system message)
    when the tokenizer has one, else plain text with the safety prompt in front."""
    if getattr(tokenizer, "chat_template", None):
        msgs = ([{"role": "system", "content": safety_prompt}] if safety_prompt else []) + \
               [{"role": "user", "content": request}]
        return tokenizer.apply_chat_template(msgs, tokenize=False, add_generation_prompt=True)
    return f"{safety_prompt}\n\n{request}\n" if safety_prompt else f"{request}\n"


def pack(tokenizer, texts: list[str], seqlen: int, **provenance) -> CalibrationSet:
    """Tokenize and concatenate texts, cut into windows of `seqlen` (the last one wrapped around to the
    start, so no token is padding); one shorter window when everything fits in less than `seqlen`."""
    ids: list[int] = []
    for t in texts:
        ids.extend(tokenizer(t, add_special_tokens=False)["input_ids"])
    if not ids:
        raise UserError("safety_prune: the calibration requests tokenized to nothing: give non-empty requests")
    L = min(seqlen, len(ids))
    n = -(-len(ids) // L)
    ids = (ids * (n * L // len(ids) + 1))[: n * L]
    return CalibrationSet.from_ids(torch.tensor(ids).reshape(n, L), **provenance)


def safety_streams(tokenizer, requests: list[str], safety_prompt: str, seqlen: int = 256
                   ) -> tuple[CalibrationSet, CalibrationSet]:
    """(with safety prompt, without) calibration streams over the same requests."""
    sha = sha256_bytes(safety_prompt.encode())
    with_s = pack(tokenizer, [format_prompt(tokenizer, r, safety_prompt) for r in requests], seqlen,
                  source="safety-stream", safety_prompt_sha256=sha, requests=len(requests))
    without = pack(tokenizer, [format_prompt(tokenizer, r, None) for r in requests], seqlen,
                   source="plain-stream", requests=len(requests))
    return with_s, without


@dataclass(frozen=True)
class SafetyPrune:
    sparsity: float = 0.5                    # fraction of zeros per row; implied by an N:M pattern
    pattern: str = "unstructured"            # unstructured | N:M, e.g. 2:4
    requests: str | None = None              # JSONL with `text` (+ optional `kind`); null = bundled set
    kinds: tuple[str, ...] = ("harmful", "benign")
    safety_prompt: str | None = None         # text file with the safety prompt; null = bundled prompt
    tokenizer: str | None = None             # tokenizer folder / hub id; null = the model's own
    seqlen: int = 256                        # packed window length of both streams
    batch_size: int = 8
    include: tuple[str, ...] = ()
    exclude: tuple[str, ...] = ("lm_head",)

    needs_calibration = False                # builds its own two streams

    def __post_init__(self):
        _check.sparsity_pattern("safety_prune", self.sparsity, self.pattern)
        if not isinstance(self.kinds, tuple) or not self.kinds or not all(k in ("harmful", "benign") for k in self.kinds):
            raise UserError(f"safety_prune.kinds must be a non-empty list of harmful / benign, got {self.kinds!r}")
        if self.safety_prompt is not None and not Path(self.safety_prompt).is_file():
            raise UserError(f"safety_prune.safety_prompt: {self.safety_prompt} does not exist: pass a text file")
        _check.int_range("safety_prune", "seqlen", self.seqlen, 8, 1 << 20)
        _check.int_range("safety_prune", "batch_size", self.batch_size, 1, 1 << 16)
        _check.patterns("safety_prune", "include", self.include)
        _check.patterns("safety_prune", "exclude", self.exclude)

    @property
    def target(self) -> Target:
        return Target(self.include, self.exclude)

    def prompt_text(self) -> str:
        if self.safety_prompt is None:
            return bundled_safety_prompt()
        text = Path(self.safety_prompt).read_text(encoding="utf-8").strip()
        if not text:
            raise UserError(f"safety_prune.safety_prompt: {self.safety_prompt} is empty: write the safety prompt in it")
        return text

    def describe(self) -> str:
        return f"safety-potential {self.pattern if self.pattern != 'unstructured' else f'{self.sparsity:.0%}'}"

    def apply(self, model: nn.Module, calib: CalibrationSet | None = None, tokenizer=None) -> dict:
        """Build both streams with the model's tokenizer (or `tokenizer`) and prune. `calib` is unused."""
        if tokenizer is None:
            from transformers import AutoTokenizer
            src = self.tokenizer or getattr(model, "name_or_path", None) or getattr(model.config, "_name_or_path", "")
            try:
                tokenizer = AutoTokenizer.from_pretrained(src)
            except (OSError, ValueError) as e:
                raise UserError(f"safety_prune cannot load a tokenizer from {src!r} ({type(e).__name__}): "
                                "set safety_prune.tokenizer to the model's folder or hub id") from None
        w, wo = safety_streams(tokenizer, read_requests(self.requests, self.kinds), self.prompt_text(), self.seqlen)
        return self.apply_streams(model, w, wo)

    @torch.no_grad()
    def apply_streams(self, model: nn.Module, with_safety: CalibrationSet, without: CalibrationSet) -> dict:
        """Prune `model` in place from the two streams; returns per-layer stats and a summary."""
        names = {id(m): n for n, m in model.named_modules()}
        device = compute_device()
        plain_in, plain_kw = layerwise.capture_inputs(model, without, self.batch_size, device)
        n_with, n_without = with_safety.input_ids.numel(), without.input_ids.numel()
        layers: dict[str, dict] = {}
        for step in layerwise.steps(model, with_safety, self.batch_size, device):
            plain = layerwise.Step(step.index, step.prefix, step.layer, plain_in, plain_kw[step.index], step.device)
            linears = step.linears(self.target)
            if linears:
                s_with = step.collect(linears, "input_sq_norm")
                s_without = plain.collect(linears, "input_sq_norm")
                for name, lin in linears.items():
                    delta = MK.sq_norm_delta(s_with[name], n_with, s_without[name], n_without)    # (cols,)
                    new, info = self.prune_one(lin, delta)
                    if new is not lin:
                        set_module(model, names[id(lin)], new)
                    layers[name] = info
            plain_in = plain.outputs()
            plain.inputs = []
        if not layers:
            raise UserError("safety_prune matched no linear layers: check safety_prune.include / exclude")
        nm = P.parse_pattern(self.pattern)
        valid = "" if not nm else (", N:M valid" if all(P.is_nm(model.get_submodule(n).weight, *nm) for n in layers)
                                   else ", N:M VIOLATED")
        total = sum(v["sparsity"] for v in layers.values()) / len(layers)
        pos = sum(v["responsive_channels"] for v in layers.values()) / len(layers)
        prompt = with_safety.provenance.get("safety_prompt_sha256", "")
        text = self.prompt_text()
        return {"summary": f"safety_prune {self.describe()}: sparsity {total:.3f} (target {self.sparsity:.3f}){valid}; "
                           f"{pos:.0%} of input channels respond to the safety prompt; deploy with the safety prompt "
                           f"(sha256 {prompt[:12]})",
                "layers": layers,
                "deploy": {"system_prompt": text if sha256_bytes(text.encode()) == prompt else None,
                           "system_prompt_sha256": prompt},
                "streams": {"with": with_safety.provenance, "without": without.provenance}}

    def prune_one(self, lin: nn.Linear, delta: torch.Tensor) -> tuple[nn.Module, dict]:
        W = lin.weight.detach().float()                                        # (rows, cols)
        score = MK.safety_potential_score(W, delta.to(W.device))
        keep = MK.ranked_keep(score, W.abs(), self.sparsity, self.pattern)
        if isinstance(lin, QuantLinear):
            lin.set_keep(keep)
            new = lin
        else:
            new = SparseLinear.from_linear(lin, keep)
        info = {"kind": type(new).__name__, "sparsity": P.sparsity(new.weight),
                "sqnr": quant.sqnr(W, new.weight.float()),
                "responsive_channels": float((delta > 0).float().mean()),
                "max_delta": float(delta.max())}
        return new, info
