"""SimCert certificates (arXiv 2603.14818): "with confidence 1 - delta, the compressed model's violation
rate (or bounded mean discrepancy) against the original is at most `bound`", as JSON stored in an export.

What is sampled (the i.i.d. unit), `unit=`:
- "position" (the default of the CLI and the recipe block; `sample_positions`): n token positions drawn
  independently and uniformly at random, with replacement, from the whole tokenized held-out corpus; each
  sample is the prediction of that token from its `context` preceding tokens, so the n samples are i.i.d.
  draws and the bound holds for theta = the rate (or mean) over a uniformly random position of *that
  corpus* with that much left context. Cost: one forward pass of `context` tokens per sample.
- "window": n contiguous windows of the text (eval_windows); every token of a window is used, but the
  windows are cut from one text in order, so treating them as independent draws is an assumption, not a
  fact: use it for monitoring, not for a guarantee.
What a certificate does *not* guarantee: anything about text unlike the held-out corpus (other domains,
prompts, chat), positions with longer or shorter context, free-running generation (errors compound over
a generated sequence), or any worst-case input; and with probability delta the bound itself is wrong.

Properties (per predicted token t; with unit="window" the i.i.d. unit is the *window*, never the token,
because tokens inside a window share context and are not independent):
- agreement: violation v_t = [argmax g_t != argmax f_t]; theta = P(v) at a uniformly random position of
  a random window; claim theta <= threshold (default threshold = eps).
- kl, stat="mean" (default): x_t = min(KL(f_t || g_t), clip) in [0, clip] (clip stated, default 1 nat);
  theta = E[x]; claim theta <= threshold (default eps).
- kl, stat="rate": v_t = [KL_t > eps]; linf: v_t = [max_j |f_tj - g_tj| > eps] (eps is the per-token
  tolerance); theta = P(v); claim theta <= threshold, which must be given.
Estimators on the n windows (assumed i.i.d. draws from the evaluation text distribution; their order
is shuffled with `seed` so a sequential run does not just read the head of the text):
- "clopper-pearson": one token drawn uniformly per window (seeded), its 0/1 violation -> exact binomial.
- "hoeffding" / "bernstein": the window mean of v_t (or x_t) in [a, b] -> bounded-mean bound; its
  expectation is theta since every window has the same number of positions.
- "auto": the minimum of Clopper-Pearson, Hoeffding and Bernstein, each at delta / 3 (union bound);
  Hoeffding and Bernstein at delta / 2 for the kl mean. Bernstein's range term 7 (b - a) ln(2/delta) /
  (3 (n - 1)) only beats Hoeffding's (b - a) sqrt(ln(1/delta) / 2n) beyond ~50-100 samples.
`sequential=True` evaluates windows in batches on the geometric schedule of `bounds.sequential_bound`
and stops once the bound is decided against the threshold.

For small MLPs (`certify_mlp`) the dual interval propagation supplies a guaranteed range [0, R] of
d(x) = max_i |f_i(x) - g_i(x)| over the input box, so E[d] is bounded without any clipping, and R <= eps
certifies the rate property deterministically.

`save` writes certificate.json (atomically) with the sha256 of every other file in the export and a
self-hash; `verify` recomputes them and raises UserError on any mismatch (tampering).
"""
from __future__ import annotations

import dataclasses
import datetime
import hashlib
import json
import math
import os
import platform
import sys
from dataclasses import dataclass, field
from importlib import metadata
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from modelpress.errors import UserError
from modelpress.io import atomic_write_text, sha256_file, sha256_tensor

from . import bounds as B
from .interval import dual_bounds, dual_bounds_split

FILENAME = "certificate.json"
FORMAT = "modelpress-certificate/1"
PROPERTIES = ("agreement", "kl", "linf")
METHODS = ("auto", "clopper-pearson", "hoeffding", "bernstein")
DEFAULT_KL_CLIP = 1.0  # nats; the stated range of the kl mean is [0, clip]


@dataclass
class Certificate:
    property: str
    statement: str                 # the claim in words, with every number in it
    eps: float
    delta: float
    confidence: float              # 1 - delta
    threshold: float               # pass iff bound <= threshold
    n_samples: int                 # i.i.d. units (windows / rows) used
    iid_unit: str
    method: str                    # estimator that produced `bound`
    bound: float                   # upper bound on theta, holds w.p. >= confidence
    lower: float                   # lower bound on theta, holds w.p. >= confidence
    observed: float                # sample estimate of theta
    range: list[float]             # [a, b] the samples are known to lie in
    passed: bool
    stat: str = "rate"             # rate | mean
    n_tokens: int | None = None
    sequential: dict | None = None
    deterministic: dict | None = None
    hashes: dict = field(default_factory=dict)
    versions: dict = field(default_factory=dict)
    seed: int = 0
    created: str = ""
    format: str = FORMAT
    artifacts: dict = field(default_factory=dict)
    certificate_sha256: str = ""

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), indent=1, sort_keys=True)

    @classmethod
    def from_dict(cls, d: dict) -> "Certificate":
        names = {f.name for f in dataclasses.fields(cls)}
        unknown = set(d) - names
        if unknown:
            raise UserError(f"certificate has unknown fields {sorted(unknown)}: it was not written by this modelpress")
        return cls(**d)


# ------------------------------------------------------------------------------------------------ hashes

def model_sha256(model: nn.Module) -> str:
    """Hash of the module types (architecture) and every tensor in the state dict (names, dtypes, shapes,
    bytes), in name order: equal hashes mean the two models compute the same function."""
    h = hashlib.sha256()
    for name, m in model.named_modules():
        h.update(f"{name}:{type(m).__module__}.{type(m).__qualname__};".encode())
    for k, v in sorted(model.state_dict().items()):
        h.update(k.encode())
        h.update(sha256_tensor(v).encode())
    return h.hexdigest()


def _recipe_sha256(recipe) -> str | None:
    if recipe is None:
        return None
    if hasattr(recipe, "to_yaml"):
        return hashlib.sha256(recipe.to_yaml().encode()).hexdigest()
    if isinstance(recipe, dict):
        return hashlib.sha256(json.dumps(recipe, sort_keys=True, default=str).encode()).hexdigest()
    p = Path(recipe)
    if p.is_file():
        return sha256_file(p)
    raise UserError(f"recipe {recipe!r} is neither a Recipe, a dict nor a file: pass the recipe used")


def _calibration_sha256(calibration) -> str | None:
    if calibration is None:
        return None
    if hasattr(calibration, "sha256"):
        return calibration.sha256()
    if isinstance(calibration, dict):
        return calibration.get("sha256") or hashlib.sha256(json.dumps(calibration, sort_keys=True).encode()).hexdigest()
    if isinstance(calibration, str):
        return calibration
    raise UserError("calibration must be a CalibrationSet, its provenance dict or a sha256 string")


def _windows_sha256(windows: torch.Tensor) -> str:
    return hashlib.sha256(windows.to(torch.int64).contiguous().numpy().tobytes()).hexdigest()


def library_versions() -> dict[str, str]:
    out = {"python": platform.python_version()}
    for name in ("modelpress", "torch", "transformers", "numpy", "scipy"):
        mod = sys.modules.get(name)
        v = getattr(mod, "__version__", None)
        if v is None:
            try:
                v = metadata.version(name)
            except metadata.PackageNotFoundError:
                v = "not installed"
        out[name] = str(v)
    return out


# ------------------------------------------------------------------------------------- property -> samples

def _check_common(prop: str, eps: float, delta: float, method: str) -> None:
    if prop not in PROPERTIES:
        raise UserError(f"property={prop!r} is unknown: use one of {', '.join(PROPERTIES)}")
    if method not in METHODS:
        raise UserError(f"method={method!r} is unknown: use one of {', '.join(METHODS)}")
    if not (math.isfinite(eps) and eps >= 0):
        raise UserError(f"eps={eps} is out of range: use a finite value >= 0")
    if not (0 < delta < 1):
        raise UserError(f"delta={delta} is out of range: use a failure probability in (0, 1), e.g. 0.05")


def _spec(prop: str, eps: float, threshold: float | None, stat: str | None, clip: float | None
          ) -> tuple[str, float, float, str]:
    """(stat, threshold, clip, statement template) for a property."""
    stat = stat or ("mean" if prop == "kl" else "rate")
    if stat not in ("rate", "mean") or (prop != "kl" and stat == "mean"):
        raise UserError(f"stat={stat!r} is not available for property {prop}: use 'rate'"
                        + (" or 'mean'" if prop == "kl" else ""))
    if prop == "agreement":
        if not (0 <= eps < 1):
            raise UserError(f"eps={eps} is out of range for agreement: the allowed top-1 mismatch rate in [0, 1)")
        return stat, eps if threshold is None else threshold, 1.0, "P(top-1 of compressed != top-1 of original)"
    if prop == "kl" and stat == "mean":
        clip = DEFAULT_KL_CLIP if clip is None else clip
        if not (clip > 0 and math.isfinite(clip)):
            raise UserError(f"clip={clip} is out of range: use a finite clip > 0 (nats)")
        return stat, eps if threshold is None else threshold, clip, f"E[min(KL(original || compressed), {clip:g})] per token"
    if threshold is None:
        raise UserError(f"--threshold is required for {prop} (stat=rate): the allowed rate of tokens with "
                        f"{'KL' if prop == 'kl' else 'max |logit diff|'} > eps, e.g. --threshold 0.05")
    what = "KL(original || compressed)" if prop == "kl" else "max_j |logit_j(original) - logit_j(compressed)|"
    return stat, threshold, 1.0, f"P({what} > {eps:g}) per token"


def _token_values(per_token: dict, prop: str, stat: str, eps: float, clip: float) -> torch.Tensor:
    """(n, T) per-token violation indicators or clipped values from compare()'s per_token arrays."""
    if prop == "agreement":
        return (~per_token["agree"].bool()).double()
    if prop == "kl":
        kl = per_token["kl"].double()
        return kl.clamp(max=clip) if stat == "mean" else (kl > eps).double()
    return (per_token["linf"].double() > eps).double()


def _estimators(method: str, stat: str, a: float, b: float) -> list[tuple[str, B.Estimator]]:
    """[(column, estimator)]: column 'token' = one sampled token per unit, 'mean' = the unit's mean."""
    if method == "auto":
        out = [("mean", B.Estimator("hoeffding", a, b)), ("mean", B.Estimator("bernstein", a, b))]
        return ([("token", B.Estimator("clopper-pearson"))] + out) if stat == "rate" else out
    if method == "clopper-pearson":
        if stat == "mean":
            raise UserError("method clopper-pearson bounds violation rates only: use bernstein or hoeffding for a mean")
        return [("token", B.Estimator("clopper-pearson"))]
    return [("mean", B.Estimator(method, a, b))]


def unit_samples(values: torch.Tensor, columns: list[str], rng: np.random.Generator) -> np.ndarray:
    """(n, T) per-token values -> (n, m) i.i.d. per-unit samples: 'token' = one uniformly drawn position,
    'mean' = the mean over the unit's positions."""
    v = values.double().numpy()
    n, T = v.shape
    pick = rng.integers(0, T, size=n)
    cols = {"token": v[np.arange(n), pick], "mean": v.mean(1)}
    return np.stack([cols[c] for c in columns], axis=1)


def _statement(what: str, thr: float, delta: float) -> str:
    return f"with confidence {1 - delta:g}: {what} <= bound; pass iff bound <= {thr:g}"


def _finish(prop, stat, eps, delta, thr, what, res: B.BoundResult, observed, a, b, iid_unit, seq,
            n_tokens, hashes, seed, deterministic=None) -> Certificate:
    return Certificate(
        property=prop, statement=_statement(what, thr, delta), eps=float(eps), delta=float(delta),
        confidence=1.0 - float(delta), threshold=float(thr), n_samples=int(res.n), iid_unit=iid_unit,
        method=res.method if seq is None else f"{res.method} (sequential)", bound=float(res.bound),
        lower=float(res.lower), observed=float(observed), range=[float(a), float(b)],
        passed=bool(res.bound <= thr), stat=stat, n_tokens=n_tokens, sequential=seq, deterministic=deterministic,
        hashes=hashes, versions=library_versions(), seed=int(seed),
        created=datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"))


# ------------------------------------------------------------------------------------------------ LLMs

def certificate_from_tokens(per_token: dict, property: str, eps: float, delta: float, method: str = "auto",
                            threshold: float | None = None, stat: str | None = None, clip: float | None = None,
                            seed: int = 0, hashes: dict | None = None) -> Certificate:
    """Non-sequential certificate from `modelpress.eval.compare(...)["per_token"]` arrays (n windows, T)."""
    _check_common(property, eps, delta, method)
    stat, thr, clip, what = _spec(property, eps, threshold, stat, clip)
    vals = _token_values(per_token, property, stat, eps, clip)  # (n, T)
    if vals.shape[0] < 2:
        raise UserError(f"certification needs at least 2 evaluation windows, got {vals.shape[0]}: add text or lower seqlen")
    cols_ests = _estimators(method, stat, 0.0, clip)
    rng = np.random.default_rng(seed)
    x = unit_samples(vals, [c for c, _ in cols_ests], rng)  # (n, m)
    up, lo, meth = B.combined_bounds(x, [e for _, e in cols_ests], delta)
    res = B.BoundResult(up, lo, x.shape[0], meth, up <= thr or lo > thr)
    return _finish(property, stat, eps, delta, thr, what, res, float(vals.mean()), 0.0, clip,
                   "evaluation window (tokens within a window are not independent)", None,
                   int(vals.numel()), hashes or {}, seed)


UNITS = ("position", "window")


def sample_positions(tokenizer, texts: list[str], n: int, context: int, seed: int = 0) -> torch.Tensor:
    """(n, context + 1) token windows, one per position p drawn i.i.d. uniformly (with replacement) from the
    positions of the joined `texts` that have `context` tokens before them: row = ids[p - context : p + 1],
    whose last prediction (of token p from the `context` before it) is the sample. Texts are joined as
    eval_windows joins them (each followed by a blank line)."""
    if n < 2 or context < 1:
        raise UserError(f"certification needs >= 2 sampled positions and a context >= 1, got {n} and {context}")
    ids: list[int] = []
    for t in texts:
        ids.extend(tokenizer(t + "\n\n", add_special_tokens=False)["input_ids"])
    if len(ids) <= context:
        raise UserError(f"evaluation text has {len(ids)} tokens, not more than the context of {context}: "
                        "give more text or lower --seqlen")
    stream = torch.tensor(ids, dtype=torch.long)
    pos = np.random.default_rng(seed).integers(context, len(ids), size=n)          # (n,) i.i.d. uniform
    return torch.stack([stream[p - context:p + 1] for p in pos.tolist()])


def certify(orig_model: nn.Module, comp_model: nn.Module, windows: torch.Tensor, property: str, eps: float,
            delta: float, method: str = "auto", sequential: bool = False, *, threshold: float | None = None,
            stat: str | None = None, clip: float | None = None, seed: int = 0, batch_size: int = 2,
            n_min: int = 8, recipe=None, calibration=None, eval_source: str | None = None,
            unit: str = "window") -> Certificate:
    """Certify `comp_model` against `orig_model` on token `windows` (n, seqlen) (see module docstring).
    unit="position": the rows come from `sample_positions` and only each row's last prediction counts.

    >>> cert = certify(original, compressed, sample_positions(tok, texts, 64, 512), "agreement", eps=0.1,
    ...                delta=0.05, unit="position")
    """
    from modelpress.eval import compare
    _check_common(property, eps, delta, method)
    if unit not in UNITS:
        raise UserError(f"unit={unit!r} is unknown: use one of {', '.join(UNITS)}")
    if not isinstance(windows, torch.Tensor) or windows.ndim != 2 or windows.shape[0] < 2:
        raise UserError("windows must be a LongTensor (n >= 2, seqlen) from sample_positions or eval_windows")
    stat, thr, clip, what = _spec(property, eps, threshold, stat, clip)
    rng = np.random.default_rng(seed)
    order = torch.as_tensor(rng.permutation(windows.shape[0]))
    shuffled = windows[order]
    hashes = {"original_model": model_sha256(orig_model), "compressed_model": model_sha256(comp_model),
              "recipe": _recipe_sha256(recipe), "calibration": _calibration_sha256(calibration),
              "evaluation_windows": _windows_sha256(windows), "evaluation_text": eval_source}
    cols_ests = _estimators(method, stat, 0.0, clip)
    cols = [c for c, _ in cols_ests]
    ests = [e for _, e in cols_ests]
    n_tokens = 0
    sum_vals = 0.0
    pos = 0

    def draw(k: int) -> np.ndarray:
        nonlocal pos, n_tokens, sum_vals
        chunk = shuffled[pos:pos + k]
        pos += chunk.shape[0]
        vals = _token_values(compare(orig_model, comp_model, chunk, batch_size)["per_token"], property, stat, eps, clip)
        if unit == "position":
            vals = vals[:, -1:]                        # (k, 1): the prediction of the sampled token only
        n_tokens += vals.numel()
        sum_vals += float(vals.sum())
        return unit_samples(vals, cols, rng)

    n = windows.shape[0]
    if hashes["original_model"] == hashes["compressed_model"]:
        # same architecture and bytes: g(x) = f(x) on every input, so theta = 0 exactly
        res = B.BoundResult(0.0, 0.0, 0, "identical models (deterministic)", True)
        return _finish(property, stat, eps, delta, thr, what, res, 0.0, 0.0, clip,
                       "none needed (model hashes are equal)", None, 0, hashes, seed)
    if sequential:
        n0 = min(max(2, n_min), n)
        res = B.sequential_bound(draw, ests, thr, delta, n0, n)
        seq = {"schedule": "geometric x2, union bound over checkpoints and estimators",
               "checkpoints": res.checkpoints, "decided": res.decided, "n_available": n}
    else:
        x = draw(n)
        up, lo, meth = B.combined_bounds(x, ests, delta)
        res = B.BoundResult(up, lo, n, meth, up <= thr or lo > thr)
        seq = None
    iid = (f"token position drawn uniformly at random, with replacement, from the held-out corpus "
           f"({windows.shape[1] - 1} tokens of left context; i.i.d. by construction)" if unit == "position" else
           "evaluation window (contiguous windows of one text: independence is assumed, not guaranteed; tokens "
           "within a window are not independent)")
    return _finish(property, stat, eps, delta, thr, what, res, sum_vals / max(n_tokens, 1), 0.0, clip,
                   iid, seq, n_tokens, hashes, seed)


RECIPE_KEYS = {"property": str, "eps": float, "delta": float, "threshold": float, "method": str,
               "sequential": bool, "stat": str, "clip": float, "text": str, "seqlen": int, "windows": int,
               "seed": int, "unit": str}


def certify_recipe_block(block: dict, original: nn.Module, compressed: nn.Module, tokenizer, recipe=None,
                         calibration=None) -> Certificate:
    """Run the `certify:` block of a recipe, e.g. {property: agreement, eps: 0.2, delta: 0.05}; optional
    keys threshold, method, sequential, stat, clip, text (wiki-eval | file), seqlen (512: the context), windows
    (64: the samples), seed, unit (position: i.i.d. random positions of the text | window: contiguous windows)."""
    from modelpress.calib import sources
    from modelpress.eval import eval_windows
    if not isinstance(block, dict):
        raise UserError("recipe certify must be a mapping, e.g. certify: {property: agreement, eps: 0.2, delta: 0.05}")
    for k, v in block.items():
        if k not in RECIPE_KEYS:
            raise UserError(f"certify.{k} is unknown: use {', '.join(RECIPE_KEYS)}")
        want = RECIPE_KEYS[k]
        ok = isinstance(v, bool) if want is bool else (isinstance(v, (int, float)) and not isinstance(v, bool)
                                                       if want is float else isinstance(v, want) and not isinstance(v, bool))
        if not ok:
            kind = {int: "an integer", float: "a number", str: "a string", bool: "true or false"}[want]
            raise UserError(f"certify.{k} must be {kind}, got {v!r}")
    for k in ("property", "eps", "delta"):
        if k not in block:
            raise UserError(f"certify.{k} is required, e.g. certify: {{property: agreement, eps: 0.2, delta: 0.05}}")
    text = block.get("text", "wiki-eval")
    unit = block.get("unit", "position")
    if unit not in UNITS:
        raise UserError(f"certify.unit {unit!r} is unknown: use one of {', '.join(UNITS)}")
    texts = sources.texts(text, "eval")
    if unit == "position":
        windows = sample_positions(tokenizer, texts, block.get("windows", 64), block.get("seqlen", 512),
                                   block.get("seed", 0))
    else:
        windows = eval_windows(tokenizer, texts, block.get("seqlen", 512), block.get("windows", 64))
    return certify(original, compressed, windows, block["property"], float(block["eps"]), float(block["delta"]),
                   block.get("method", "auto"), block.get("sequential", False), threshold=block.get("threshold"),
                   stat=block.get("stat"), clip=block.get("clip"), seed=block.get("seed", 0), recipe=recipe,
                   calibration=calibration, eval_source=f"{text} sha256 {sources.source_sha256(text, 'eval')}",
                   unit=unit)


# ------------------------------------------------------------------------------------------------ MLPs

def certify_mlp(f: nn.Module, g: nn.Module, X, lo, hi, eps: float, delta: float, stat: str = "rate",
                method: str = "auto", threshold: float | None = None, max_boxes: int = 1,
                seed: int = 0, input_shape: tuple[int, ...] | None = None) -> Certificate:
    """Certificate for small MLPs on i.i.d. rows X (n, d) inside the box [lo, hi], with d(x) = max_i |f_i - g_i|.
    Convolutional nets (Conv2d / AvgPool2d / Flatten / Linear / ReLU): pass `input_shape` (C, H, W); X, lo
    and hi are then flattened images (d = C * H * W).

    stat="rate": theta = P(d(x) > eps), claim theta <= threshold (required); decided deterministically
    (bound 0) when the interval range R <= eps. stat="mean": theta = E[d(x)], range [0, R] from the dual
    interval propagation; claim theta <= threshold (default eps)."""
    if method not in METHODS:
        raise UserError(f"method={method!r} is unknown: use one of {', '.join(METHODS)}")
    if not (0 < delta < 1) or not (math.isfinite(eps) and eps >= 0):
        raise UserError(f"eps={eps}, delta={delta} out of range: need eps >= 0 and delta in (0, 1)")
    X = torch.as_tensor(X, dtype=torch.float32)
    lo_t, hi_t = torch.as_tensor(lo, dtype=torch.float32), torch.as_tensor(hi, dtype=torch.float32)
    if X.ndim != 2 or X.shape[0] < 2:
        raise UserError("X must be a (n >= 2, features) array of i.i.d. evaluation rows")
    if (X < lo_t).any() or (X > hi_t).any():
        raise UserError("X has rows outside the input box [lo, hi]: clamp the inputs into the box or widen it")
    db, leaves = ((dual_bounds(f, g, lo, hi, input_shape=input_shape), 1) if max_boxes == 1
                  else dual_bounds_split(f, g, lo, hi, max_boxes, input_shape=input_shape))
    R = db.linf_range
    Xin = X if input_shape is None else X.reshape(-1, *input_shape)
    with torch.no_grad():
        d = (f(Xin).double() - g(Xin).double()).abs().amax(1)  # (n,)
    if float(d.max()) > R:
        raise RuntimeError(f"sampled |f - g| = {float(d.max()):.6g} exceeds the interval range R = {R:.6g}: "
                           "the dual propagation is unsound for these nets (please report)")
    det = {"method": "dual interval propagation (CROWN + joint difference)", "R": R, "boxes": leaves,
           "box_lo": [float(v) for v in torch.as_tensor(lo).reshape(-1)],
           "box_hi": [float(v) for v in torch.as_tensor(hi).reshape(-1)]}
    hashes = {"original_model": model_sha256(f), "compressed_model": model_sha256(g),
              "evaluation_rows": hashlib.sha256(X.numpy().tobytes()).hexdigest()}
    unit = "row of X (i.i.d. draws from the input distribution, supported in the box)"
    if stat == "rate":
        if threshold is None:
            raise UserError("threshold is required for stat=rate: the allowed rate P(max |f - g| > eps)")
        what = f"P(max_i |f_i(x) - g_i(x)| > {eps:g})"
        v = (d > eps).double()[:, None]
        if R <= eps:  # every x in the box satisfies the tolerance: theta = 0 exactly
            res = B.BoundResult(0.0, 0.0, X.shape[0], "interval (deterministic)", True)
            return _finish("linf", stat, eps, delta, threshold, what, res, float(v.mean()), 0.0, 1.0, unit,
                           None, None, hashes, seed, det)
        cols_ests = _estimators(method, "rate", 0.0, 1.0)
        vals, a, b = v, 0.0, 1.0
    elif stat == "mean":
        threshold = eps if threshold is None else threshold
        what = "E[max_i |f_i(x) - g_i(x)|]"
        cols_ests = _estimators(method, "mean", 0.0, R)
        vals, a, b = d[:, None], 0.0, R
    else:
        raise UserError(f"stat={stat!r} is unknown: use 'rate' or 'mean'")
    # one row is one unit: both columns are the row's value
    x = np.repeat(vals.numpy(), len(cols_ests), axis=1)  # (n, m)
    up, lw, meth = B.combined_bounds(x, [e for _, e in cols_ests], delta)
    res = B.BoundResult(up, lw, X.shape[0], meth, up <= threshold or lw > threshold)
    return _finish("linf", stat, eps, delta, threshold, what, res, float(vals.mean()), a, b, unit, None, None,
                   hashes, seed, det)


# ------------------------------------------------------------------------------------------ save / verify

def _artifacts(export_dir: Path) -> dict[str, str]:
    out = {}
    for p in sorted(export_dir.rglob("*")):
        rel = p.relative_to(export_dir).as_posix()
        if p.is_file() and rel != FILENAME and not any(part.startswith(".") for part in p.relative_to(export_dir).parts):
            out[rel] = sha256_file(p)
    return out


def _self_hash(d: dict) -> str:
    d = {k: v for k, v in d.items() if k != "certificate_sha256"}
    return hashlib.sha256(json.dumps(d, sort_keys=True).encode()).hexdigest()


def save(cert: Certificate, export_dir: str | os.PathLike) -> Path:
    """Write export_dir/certificate.json atomically, binding it to the sha256 of every other file in the
    export (call it after the export is written). Returns the path."""
    d = Path(export_dir)
    if not d.is_dir():
        raise UserError(f"export folder {d} does not exist: export the model first, then save the certificate")
    arts = _artifacts(d)
    if not arts:
        raise UserError(f"export folder {d} has no files to certify: export the model first")
    cert.artifacts = arts
    cert.certificate_sha256 = _self_hash(cert.to_dict())
    path = d / FILENAME
    atomic_write_text(path, cert.to_json())
    return path


def load(export_dir: str | os.PathLike) -> Certificate:
    path = Path(export_dir) / FILENAME
    if not path.is_file():
        raise UserError(f"{path} does not exist: run `modelpress certify` on the export first")
    try:
        return Certificate.from_dict(json.loads(path.read_bytes().decode("utf-8")))
    except UserError:
        raise
    except (ValueError, TypeError, AttributeError) as e:            # bad JSON, not UTF-8, wrong fields
        raise UserError(f"{path} is not a valid certificate ({type(e).__name__}): re-run `modelpress certify`") from None


def verify(export_dir: str | os.PathLike) -> None:
    """Re-hash the certificate and every artifact it names; UserError on any mismatch, missing or extra file."""
    d = Path(export_dir)
    cert = load(d)
    if _self_hash(cert.to_dict()) != cert.certificate_sha256:
        raise UserError(f"{d / FILENAME} was modified after it was written (self-hash mismatch): re-run certification")
    now = _artifacts(d)
    for name, digest in cert.artifacts.items():
        if name not in now:
            raise UserError(f"{d / name} is missing but the certificate covers it: restore it or re-certify")
        if now[name] != digest:
            raise UserError(f"{d / name} does not match its certified sha256 (tampered or re-exported): re-certify")
    extra = sorted(set(now) - set(cert.artifacts))
    if extra:
        raise UserError(f"{d / extra[0]} is not covered by the certificate: remove it or re-certify")


def summary(cert: Certificate) -> str:
    """One line for `inspect` and the CLI."""
    return (f"{cert.property} ({cert.stat}) {cert.method}: bound {cert.bound:.4g} at confidence {cert.confidence:g} "
            f"from {cert.n_samples} samples, threshold {cert.threshold:g} -> {'PASS' if cert.passed else 'FAIL'}")


__all__: list[Any] = ["Certificate", "certify", "certify_recipe_block", "certify_mlp", "certificate_from_tokens", "save", "load",
                      "verify", "summary", "model_sha256"]
