"""`modelpress tabular distill`: data-free distillation of a tabular classifier (TabKD, arXiv 2603.15481).

    modelpress tabular distill TEACHER.onnx --spec SPEC.yaml --budget N --out DIR

writes DIR/student.safetensors, DIR/student.onnx (unless --no-onnx), DIR/spec.yaml (the spec
used, inferred from tree thresholds when --spec is omitted) and DIR/report.json (queries,
bins, pairwise interaction coverage, student size and latency, and agreement with the teacher
on --eval rows when given: real held-out rows, never used for training).
"""
from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import TYPE_CHECKING

from modelpress.errors import UserError, read_text

if TYPE_CHECKING:
    import numpy as np


def add_parser(subparsers) -> argparse.ArgumentParser:
    p = subparsers.add_parser("tabular", help="data-free distillation of tabular models (TabKD)")
    sub = p.add_subparsers(dest="tabular_cmd", required=True)
    d = sub.add_parser("distill", help="distil a classifier into a small MLP/tree without its data")
    d.add_argument("teacher", help="fitted classifier in a format that cannot run code: .onnx (skl2onnx, onnxmltools, "
                                   "torch.onnx.export), XGBoost .json/.ubj, LightGBM .txt, a modelpress student "
                                   ".safetensors; pickles (.pkl/.joblib/.pt module) need --trust-pickle")
    d.add_argument("--trust-pickle", action="store_true",
                   help="allow a pickle/joblib teacher or a pickled torch module. DANGER: unpickling runs any code "
                        "the file's author put in it, with your permissions; use only files you made or fully trust")
    d.add_argument("--spec", help="feature spec YAML/JSON (ranges, levels); inferred from split "
                                  "thresholds for tree teachers when omitted")
    d.add_argument("--budget", type=int, required=True, help="number of teacher queries")
    d.add_argument("--out", required=True, help="output folder")
    d.add_argument("--method", default="tabkd", help="tabkd | tabkd-blackbox | uniform | gaussian | dfkd")
    d.add_argument("--student", default="mlp", help="mlp | tree")
    d.add_argument("--hidden", default="64,64", help="MLP hidden widths, comma separated")
    d.add_argument("--steps", type=int, default=400, help="MLP training steps")
    d.add_argument("--tree-depth", type=int, default=6)
    d.add_argument("--max-bins", type=int, default=8)
    d.add_argument("--seed", type=int, default=0)
    d.add_argument("--eval", help="CSV of real held-out rows (feature columns in spec order, optional "
                                  "header) to measure student-teacher agreement")
    d.add_argument("--no-onnx", action="store_true", help="skip the ONNX export")
    d.set_defaults(func=run)
    return p


def _read_eval(path: str, d: int) -> np.ndarray:
    import numpy as np
    p = Path(path)
    if not p.is_file():
        raise UserError(f"--eval file {p} not found; pass a CSV of held-out feature rows")
    first = (read_text(p, "--eval file").splitlines() or [""])[0]
    try:
        [float(c) for c in first.split(",")]
        has_header = False
    except ValueError:
        has_header = True
    try:
        X = np.loadtxt(p, delimiter=",", skiprows=1 if has_header else 0, ndmin=2)
    except ValueError as e:
        raise UserError(f"--eval file {p}: not a numeric CSV ({str(e)[:120]}); encode categories as numbers") from None
    if X.shape[1] != d:
        raise UserError(f"--eval file {p} has {X.shape[1]} columns but the spec has {d} features")
    return X


def run(args) -> int:
    from modelpress.io import atomic_write_text
    from modelpress.tabular.distill import DistillConfig, agreement, distill
    from modelpress.tabular.spec import load_spec, spec_from_thresholds
    from modelpress.tabular.student import (export_onnx, latency_ms, predict_proba, save_student,
                                            size_bytes)
    from modelpress.tabular.teacher import Teacher, load_teacher, split_thresholds

    try:
        hidden = tuple(int(h) for h in str(args.hidden).split(",") if h.strip())
    except ValueError:
        raise UserError(f"--hidden '{args.hidden}': give comma-separated integers, e.g. 64,64") from None
    cfg = DistillConfig(budget=args.budget, method=args.method, student=args.student, hidden=hidden,
                        steps=args.steps, tree_depth=args.tree_depth, max_bins=args.max_bins, seed=args.seed)
    model = load_teacher(args.teacher, trust_pickle=args.trust_pickle)
    teacher = Teacher(model)
    if args.spec:
        spec = load_spec(args.spec)
    else:
        n_in = getattr(model, "n_features_in_", None)
        thr = split_thresholds(model, int(n_in)) if n_in is not None else None
        if thr is None:
            raise UserError(f"teacher {args.teacher} is not a tree model, so its feature ranges cannot be "
                            "inferred; pass --spec SPEC.yaml")
        spec = spec_from_thresholds(thr)
    X_eval = _read_eval(args.eval, len(spec)) if args.eval else None
    res = distill(teacher, spec, cfg)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    save_student(res.student, out / "student.safetensors", {"spec": spec.to_dict()})
    onnx_note = "skipped (--no-onnx)"
    if not args.no_onnx:
        export_onnx(res.student, len(spec), out / "student.onnx")
        onnx_note = str(out / "student.onnx")
    import yaml
    atomic_write_text(out / "spec.yaml", yaml.safe_dump(spec.to_dict(), sort_keys=False))
    x1 = res.X[:1]
    xb = res.X[:1024]
    report = {
        "paper": "arXiv 2603.15481 (TabKD)", "config": {k: (list(v) if isinstance(v, tuple) else v)
                                                        for k, v in cfg.__dict__.items()},
        "teacher": type(model).__name__, "queries": res.info.get("n_queries"),
        "bins": res.bins.to_dict() if res.bins else None, "pairwise_coverage": res.coverage,
        "info": res.info,
        "student": {"kind": cfg.student, "bytes": size_bytes(res.student),
                    "params": sum(p.numel() for p in res.student.parameters()),
                    "latency_ms_1row": latency_ms(lambda a: predict_proba(res.student, a), x1),
                    "latency_ms_1024rows": latency_ms(lambda a: predict_proba(res.student, a), xb)},
        "teacher_latency_ms_1row": latency_ms(teacher.proba, x1, 5),
        "teacher_latency_ms_1024rows": latency_ms(teacher.proba, xb, 5),
        "onnx": onnx_note,
    }
    if X_eval is not None:
        report["agreement_eval"] = agreement(teacher, res.student, X_eval)
        report["n_eval"] = int(len(X_eval))
    atomic_write_text(out / "report.json", json.dumps(report, indent=2))
    msg = f"student ({cfg.student}, {report['student']['bytes']} B) -> {out}; coverage {res.coverage:.3f}"
    if X_eval is not None:
        msg += f"; agreement on {len(X_eval)} eval rows {report['agreement_eval']:.4f}"
    print(msg)
    return 0
