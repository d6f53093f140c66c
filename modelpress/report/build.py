"""The visual report: one self-contained HTML page (no scripts, no external files; plots are PNGs embedded
as base64) for one or more modelpress export folders.

Per run: the recipe, the stages, the size breakdown (stored tensor bytes by part of the network), per-layer
bits / sparsity / error, perplexity / agreement / KL, the certificate (certificate.json) and a deployment
table for chosen devices (roofline estimates of modelpress.deploy, arXiv 2603.16952). With several runs, a
quality-vs-size sweep plot comes first. Every part is optional: a missing file gives a note, not an error.

Export folder files read: recipe.yaml, report.json, certificate.json, config.json, *.safetensors (headers
only), modelpress.json (tied aliases)."""
from __future__ import annotations

import base64
import datetime
import io
import json
import math
import os
import re
from pathlib import Path

import yaml

from ..errors import UserError, read_text

DEFAULT_DEVICES = ("jetson-orin-nano", "jetson-agx-orin", "rtx-4090", "h100")
PARTS = (("embedding", re.compile(r"(^|\.)(embed_tokens|wte|wpe|word_embeddings|embed_in|embed_positions)\.")),
         ("LM head", re.compile(r"(^|\.)(lm_head|embed_out)\.")),
         ("attention", re.compile(r"(self_attn|attn|attention)\.")),
         ("MLP", re.compile(r"(mlp|ffn|feed_forward|fc1|fc2)\.")),
         ("norms", re.compile(r"norm|(^|\.)ln_")))
KIND_COLORS = ("#1f77b4", "#d62728", "#2ca02c", "#ff7f0e", "#9467bd", "#8c564b", "#e377c2", "#7f7f7f")


# ----------------------------------------------------------------------------------------------- reading
def _read_json(path: Path) -> dict | None:
    if not path.is_file():
        return None
    try:
        data = json.loads(read_text(path, "export file"))
    except json.JSONDecodeError as e:
        raise UserError(f"{path}: not valid JSON ({e.msg} at line {e.lineno}): re-export or fix the file") from None
    if not isinstance(data, dict):
        raise UserError(f"{path}: expected a JSON object at the top level")
    return data


def load_run(folder: str | os.PathLike) -> dict:
    """Everything the report shows about one export folder; absent parts are None."""
    from ..deploy.estimate import tensor_bytes
    folder = Path(folder)
    if not folder.is_dir():
        raise UserError(f"{folder} is not a folder: pass modelpress export folders (written by `modelpress compress`)")
    rep = _read_json(folder / "report.json")
    recipe_text = (folder / "recipe.yaml").read_text() if (folder / "recipe.yaml").is_file() else None
    if recipe_text is None and rep and rep.get("recipe"):
        recipe_text = yaml.safe_dump(rep["recipe"], sort_keys=False)
    tensors = tensor_bytes(folder, float_bits=None) if any(folder.glob("*.safetensors")) else None
    if rep is None and recipe_text is None and tensors is None:
        raise UserError(f"{folder} has no report.json, recipe.yaml or weights: pass a modelpress export folder")
    weights = folder / "model.safetensors"
    return {"dir": folder, "name": folder.name, "report": rep or {}, "recipe_text": recipe_text,
            "file_bytes": weights.stat().st_size if weights.is_file() else None,
            "certificate": _read_json(folder / "certificate.json"), "config": _read_json(folder / "config.json"),
            "tensors": tensors}


def size_breakdown(tensors: dict[str, int]) -> dict[str, int]:
    """Stored bytes by part of the network (embedding, LM head, attention, MLP, norms, other)."""
    out = {name: 0 for name, _ in PARTS} | {"other": 0}
    for k, v in tensors.items():
        part = next((name for name, rx in PARTS if rx.search(k)), "other")
        out[part] += v
    return {k: v for k, v in out.items() if v}


def _num(x) -> float | None:
    return float(x) if isinstance(x, (int, float)) and not isinstance(x, bool) and math.isfinite(x) else None


def _summary(run: dict) -> dict:
    """The headline numbers of one run (None where unknown)."""
    rep = run["report"]
    size, ev = rep.get("size") or {}, rep.get("eval") or {}
    comp, orig = ev.get("compressed") or {}, ev.get("original") or {}
    nbytes = _num(size.get("file_bytes", size.get("compressed_bytes")))
    if run.get("file_bytes") is not None and size:
        nbytes = float(run["file_bytes"])                       # the weights file as it is now
    if nbytes is None and run["tensors"]:
        nbytes = float(sum(run["tensors"].values()))
    return {"bytes": nbytes, "original_bytes": _num(size.get("original_bytes")), "bits": _num(size.get("bits_per_weight")),
            "params": _num(size.get("params")), "ppl": _num(comp.get("perplexity")), "ppl0": _num(orig.get("perplexity")),
            "agreement": _num(comp.get("agreement")), "kl": _num(comp.get("kl"))}


# ----------------------------------------------------------------------------------------------- plots
def _png(fig) -> str:
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    FigureCanvasAgg(fig)
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=100, bbox_inches="tight")
    return base64.b64encode(buf.getvalue()).decode("ascii")


def _figure(w: float, h: float, rows: int = 1, cols: int = 1, **kw):
    from matplotlib.figure import Figure
    fig = Figure(figsize=(w, h))
    axes = fig.subplots(rows, cols, squeeze=False, **kw)
    return fig, axes


def plot_layers(layers: dict[str, dict]) -> str | None:
    """Bits, sparsity and error per compressed layer (x = layer order), colored by module kind."""
    keys = [k for k in ("bits", "sparsity", "error") if any(_num(v.get(k)) is not None for v in layers.values())]
    if not keys:
        return None
    names = list(layers)
    kinds = sorted({str(v.get("kind", "?")) for v in layers.values()})
    fig, axes = _figure(10, 2.2 * len(keys), len(keys), 1, sharex=True)
    for ax, key in zip(axes[:, 0], keys):
        for ci, kind in enumerate(kinds):
            idx = [i for i, n in enumerate(names) if str(layers[n].get("kind", "?")) == kind and _num(layers[n].get(key)) is not None]
            ax.scatter(idx, [layers[names[i]][key] for i in idx], s=12, color=KIND_COLORS[ci % len(KIND_COLORS)], label=kind)
        ax.set_ylabel(key)
        ax.grid(alpha=0.3)
        if key == "error" and all((_num(v.get("error")) or 0) > 0 for v in layers.values()):
            ax.set_yscale("log")
    axes[0, 0].legend(loc="upper right", fontsize=8)
    axes[-1, 0].set_xlabel("compressed layer (model order)")
    axes[0, 0].set_title("per-layer compression")
    return _png(fig)


def plot_size(breakdown: dict[str, int], original: float | None) -> str | None:
    if not breakdown:
        return None
    fig, axes = _figure(8, 1.6 if original is None else 2.2)
    ax = axes[0, 0]
    rows = [("stored", breakdown)] + ([("original (16-bit)", {"all weights": original})] if original else [])
    for y, (label, parts) in enumerate(rows):
        left = 0.0
        for ci, (part, b) in enumerate(parts.items()):
            ax.barh(y, b / 1e6, left=left, color=KIND_COLORS[ci % len(KIND_COLORS)] if label == "stored" else "#bbbbbb",
                    label=part if label == "stored" else None, edgecolor="white")
            left += b / 1e6
    ax.set_yticks(range(len(rows)), [r[0] for r in rows])
    ax.set_xlabel("MB")
    ax.legend(loc="lower right", fontsize=8, ncol=3)
    ax.set_title("size breakdown")
    return _png(fig)


def plot_eval(s: dict) -> str | None:
    if s["ppl"] is None and s["ppl0"] is None:
        return None
    fig, axes = _figure(4.5, 2.6)
    ax = axes[0, 0]
    labels, vals = zip(*[(k, v) for k, v in (("original", s["ppl0"]), ("compressed", s["ppl"])) if v is not None])
    bars = ax.bar(labels, vals, color=["#7f7f7f", "#1f77b4"][:len(vals)])
    ax.bar_label(bars, fmt="%.3g")
    ax.set_ylabel("perplexity")
    ax.set_title("perplexity (lower is better)")
    return _png(fig)


def plot_sweep(runs: list[dict]) -> str | None:
    """Quality vs size over several runs: perplexity and top-1 agreement against bits/weight (or MB)."""
    pts = [(r["name"], _summary(r)) for r in runs]
    use_bits = all(s["bits"] is not None for _, s in pts)
    xs = [(n, s["bits"] if use_bits else (s["bytes"] or 0) / 1e6, s) for n, s in pts
          if (s["bits"] if use_bits else s["bytes"]) is not None]
    if len(xs) < 2 or not any(s["ppl"] is not None or s["agreement"] is not None for _, _, s in xs):
        return None
    fig, axes = _figure(10, 3.4, 1, 2)
    for ax, key, label in ((axes[0, 0], "ppl", "perplexity"), (axes[0, 1], "agreement", "top-1 agreement")):
        pp = sorted((x, s[key], n) for n, x, s in xs if s[key] is not None)
        if pp:
            ax.plot([p[0] for p in pp], [p[1] for p in pp], "o-", color="#1f77b4")
            for x, y, n in pp:
                ax.annotate(n, (x, y), fontsize=7, xytext=(3, 3), textcoords="offset points")
        base = [s["ppl0"] for _, _, s in xs if s["ppl0"] is not None] if key == "ppl" else [1.0]
        if base:
            ax.axhline(base[0], color="#7f7f7f", ls="--", label="original")
            ax.legend(fontsize=8)
        ax.set_xlabel("bits / weight" if use_bits else "compressed size (MB)")
        ax.set_ylabel(label)
        ax.grid(alpha=0.3)
    fig.suptitle("quality vs size")
    return _png(fig)


# ----------------------------------------------------------------------------------------------- html
CSS = """body{font-family:system-ui,-apple-system,Segoe UI,Roboto,sans-serif;margin:2em auto;max-width:1100px;
color:#222;padding:0 1em}h1{font-size:1.6em}h2{border-bottom:2px solid #ddd;padding-bottom:.2em;margin-top:2em}
h3{margin-top:1.4em}table{border-collapse:collapse;margin:.6em 0;font-size:.9em}td,th{border:1px solid #ccc;
padding:.25em .6em;text-align:right}th{background:#f3f3f3}td:first-child,th:first-child{text-align:left}
pre{background:#f7f7f7;padding:.8em;overflow-x:auto;font-size:.85em}.note{color:#777;font-style:italic}
.pass{color:#1a7f37;font-weight:bold}.fail{color:#c62828;font-weight:bold}img{max-width:100%;display:block;margin:.5em 0}
.cards{display:flex;gap:1em;flex-wrap:wrap}.card{border:1px solid #ddd;border-radius:6px;padding:.6em 1em;min-width:9em}
.card b{display:block;font-size:1.3em}"""


def _fmt(x, digits: int = 4) -> str:
    if x is None:
        return "–"
    if isinstance(x, bool):
        return "yes" if x else "no"
    if isinstance(x, float):
        return "–" if not math.isfinite(x) else f"{x:.{digits}g}"
    return str(x)


def _mb(b: float | None) -> str:
    return "–" if b is None else (f"{b / 1e9:.3g} GB" if b >= 1e9 else f"{b / 1e6:.3g} MB")


def _table(header: list[str], rows: list[list]) -> dict:
    """A table for the template: cells are text, or {"text", "cls"} (a pass/fail span), or {"text", "href"}."""
    return {"header": header, "rows": rows}


def _flag(ok: bool, yes: str = "yes", no: str = "no") -> dict:
    return {"text": yes if ok else no, "cls": "pass" if ok else "fail"}


def _flatten(d, prefix: str = "") -> list[tuple[str, object]]:
    out = []
    for k, v in d.items():
        key = f"{prefix}{k}"
        if isinstance(v, dict):
            out += _flatten(v, key + ".")
        else:
            out.append((key, v))
    return out


def _certificate(cert: dict | None) -> dict | None:
    if cert is None:
        return None
    rows = []
    for k, v in _flatten(cert):
        if isinstance(v, list):
            v = json.dumps(v[:8]) + (f" … ({len(v)} items)" if len(v) > 8 else "")
        rows.append([k, _fmt(v)])
    return {"passed": cert.get("passed"), "table": _table(["field", "value"], rows)}


def _deployment(run: dict, devices: list[str], context: int, control_hz: float | None) -> dict:
    from ..deploy.estimate import estimate_dir
    if run["config"] is None or run["tensors"] is None:
        return {"note": "deployment estimates need config.json and the .safetensors weights in the export"}
    try:
        ests = estimate_dir(run["dir"], devices, context, control_hz=control_hz)
    except UserError as e:
        return {"note": f"deployment estimate unavailable: {e}"}
    rows = []
    for e in ests:
        row = [e.device, _mb(e.weight_bytes), _mb(e.kv_bytes), _flag(e.fits),
               f"{e.decode_s * 1e3:.3g}", f"{e.decode_s_sustained * 1e3:.3g}", e.decode_bound,
               f"{e.tokens_per_s:.4g}", f"{e.prefill_s_sustained * 1e3:.3g}",
               "–" if e.energy_j_per_token is None else f"{e.energy_j_per_token * 1e3:.3g}"]
        if control_hz:
            row += [f"{e.control_step_s * 1e3:.3g}", _flag(e.deadline_met, "met", "missed")]
        rows.append(row)
    head = ["device", "weights", f"KV @ {context}", "fits", "decode ms", "sustained ms", "bound", "tok/s",
            "TTFT ms", "mJ/token"] + ([f"step ms @ {control_hz:g} Hz", "deadline"] if control_hz else [])
    return {"table": _table(head, rows), "note": "ideal roofline from datasheet profiles (fp16 compute, 16-bit KV "
                                                 "cache, floating tensors at 16 bits); calibrate with `modelpress "
                                                 "deploy --measure`"}


def _run_view(run: dict, devices: list[str], context: int, control_hz: float | None) -> dict:
    """Everything the template shows for one export folder."""
    rep, s = run["report"], _summary(run)
    p = s["params"]
    view = {"name": run["name"], "dir": str(run["dir"]), "model": rep.get("model", "?"),
            "cards": [("size", _mb(s["bytes"])),
                      ("x 16-bit original", f"{s['bytes'] / (2 * p):.3f}x" if p and s["bytes"] else "–"),
                      ("x fp32 source", f"{s['bytes'] / (4 * p):.3f}x" if p and s["bytes"] else "–"),
                      ("bits / weight", _fmt(s["bits"])), ("perplexity", f"{_fmt(s['ppl0'])} → {_fmt(s['ppl'])}"),
                      ("top-1 agreement", _fmt(s["agreement"])), ("KL", _fmt(s["kl"]))],
            "headline": None, "exports": None, "recipe_text": run["recipe_text"], "stages": None,
            "size": None, "quality": None, "layers": None, "certificate": _certificate(run["certificate"]),
            "deployment": _deployment(run, devices, context, control_hz)}
    if p and s["bytes"]:
        from ..eval.size import headline
        view["headline"] = headline({"params": p, "file_bytes": s["bytes"]})
    exports = rep.get("exports") or {}
    if exports:                                  # only formats that were written; failures as a note
        view["exports"] = {"ok": ", ".join(f for f, e in exports.items() if "path" in e),
                           "failed": [(f, e["error"]) for f, e in exports.items() if "error" in e]}
    stages = rep.get("stages") or []
    if stages:
        view["stages"] = _table(["stage", "summary", "seconds"], [[st.get("name", "?"), st.get("summary", ""),
                                                                   _fmt(_num(st.get("seconds")), 3)] for st in stages])
    breakdown = size_breakdown(run["tensors"]) if run["tensors"] else {}
    if breakdown or s["bytes"]:
        size = rep.get("size") or {}
        facts = [[k, _fmt(_num(size.get(k)) if k != "params" else size.get(k))]
                 for k in ("params", "original_bytes", "fp32_bytes", "compressed_bytes", "file_bytes", "storage_dtype",
                           "bits_per_weight", "bits_per_param") if k in size]
        view["size"] = {"img": plot_size(breakdown, s["original_bytes"]),
                        "parts": _table(["part", "stored", "share"], [[k, _mb(v), f"{100 * v / sum(breakdown.values()):.1f}%"]
                                                                     for k, v in breakdown.items()]),
                        "facts": _table(["size", "value"], facts)}
    ev = rep.get("eval") or {}
    if ev:
        comp, orig = ev.get("compressed") or {}, ev.get("original") or {}
        rows = [["perplexity", _fmt(s["ppl0"]), _fmt(s["ppl"])], ["top-1 agreement with original", "1", _fmt(s["agreement"])],
                ["mean KL(original ‖ compressed)", "0", _fmt(s["kl"])]]
        view["quality"] = {"img": plot_eval(s), "table": _table(["metric", "original", "compressed"], rows),
                           "extra": ", ".join(f"{k} {comp[k]}" for k in ("windows", "seqlen", "tokens") if k in comp),
                           "no_ppl": orig.get("perplexity") is None and comp.get("perplexity") is None}
    layers = {k: v for k, v in (rep.get("layers") or {}).items() if isinstance(v, dict)}
    if layers:
        view["layers"] = {"img": plot_layers(layers),
                          "table": _table(["layer", "kind", "bits", "sparsity", "error"],
                                          [[n, v.get("kind", ""), _fmt(_num(v.get("bits"))), _fmt(_num(v.get("sparsity"))),
                                            _fmt(_num(v.get("error")))] for n, v in layers.items()])}
    return view


def render(runs: list[dict], devices: list[str] | None = None, context: int = 2048, control_hz: float | None = None,
           title: str | None = None) -> str:
    """The whole page as one HTML string, from the Jinja2 template page.html.j2 beside this file (autoescaped)."""
    import jinja2
    devices = list(devices or DEFAULT_DEVICES)
    title = title or ("modelpress report: " + ", ".join(r["name"] for r in runs))
    sweep = None
    if len(runs) > 1:
        rows = []
        for r in runs:
            s = _summary(r)
            cert = r["certificate"]
            rows.append([{"text": r["name"], "href": f"#{r['name']}"}, _mb(s["bytes"]), _fmt(s["bits"]),
                         _fmt(s["ppl"]), _fmt(s["agreement"]), _fmt(s["kl"]),
                         "–" if cert is None or cert.get("passed") is None else ("PASS" if cert["passed"] else "FAIL")])
        sweep = {"img": plot_sweep(runs),
                 "table": _table(["run", "size", "bits / weight", "perplexity", "agreement", "KL", "certificate"], rows)}
    env = jinja2.Environment(loader=jinja2.PackageLoader("modelpress.report", "."), autoescape=True,
                             undefined=jinja2.StrictUndefined, keep_trailing_newline=True)
    return env.get_template("page.html.j2").render(
        title=title, css=jinja2.utils.markupsafe.Markup(CSS), generated=datetime.datetime.now().isoformat(timespec="seconds"),
        sweep=sweep, runs=[_run_view(r, devices, context, control_hz) for r in runs], context=context)


def build(folders: list[str | os.PathLike], out: str | os.PathLike, devices: list[str] | None = None,
          context: int = 2048, control_hz: float | None = None, title: str | None = None) -> Path:
    """Read the export folders and write the report atomically. Returns the output path."""
    from ..io import atomic_write_text
    if not folders:
        raise UserError("report needs at least one export folder: `modelpress report DIR [DIR ...] --out report.html`")
    if devices:
        from ..deploy.estimate import load_profile
        for d in devices:
            load_profile(d)  # fail early on a bad device name or YAML
    runs = [load_run(f) for f in folders]
    names = [r["name"] for r in runs]
    for i, r in enumerate(runs):  # anchors must be unique
        if names.count(r["name"]) > 1:
            r["name"] = f"{r['name']}-{i + 1}"
    atomic_write_text(out, render(runs, devices, context, control_hz, title))
    return Path(out)
