"""`modelpress certify ORIGINAL COMPRESSED`: a SimCert certificate (arXiv 2603.14818) of how closely the
compressed model behaves like the original on evaluation text; exit 0 on pass, 1 on fail."""
from __future__ import annotations

import argparse
import json
from pathlib import Path

from modelpress.errors import UserError


def add_parser(subparsers) -> list[str]:
    p = subparsers.add_parser(
        "certify", help="probabilistic certificate that COMPRESSED behaves like ORIGINAL (exit 1 on fail)",
        description="Bound, with confidence 1 - delta, how often COMPRESSED deviates from ORIGINAL at token "
                    "positions drawn i.i.d. at random from held-out text (--unit window: contiguous windows, "
                    "independence assumed). agreement: P(top-1 mismatch) <= eps; kl: E[min(KL, clip)] <= eps; "
                    "linf: P(max |logit diff| > eps) <= threshold.")
    p.add_argument("original", help='"smollm2", an HF folder, a modelpress export, a .gguf file or a hub id')
    p.add_argument("compressed", help="the compressed model (a modelpress export folder gets certificate.json)")
    p.add_argument("--text", default="wiki-eval", help="evaluation text: wiki-eval or a .txt/.jsonl file")
    p.add_argument("--property", required=True, choices=["agreement", "kl", "linf"])
    p.add_argument("--eps", type=float, required=True,
                   help="agreement/kl: the allowed mismatch rate / mean KL; linf (and kl --stat rate): per-token tolerance")
    p.add_argument("--delta", type=float, required=True, help="failure probability; confidence is 1 - delta")
    p.add_argument("--threshold", type=float, help="pass iff bound <= threshold (default eps; required for linf)")
    p.add_argument("--method", default="auto", choices=["auto", "clopper-pearson", "hoeffding", "bernstein"])
    p.add_argument("--stat", choices=["rate", "mean"], help="kl only: mean of clipped KL (default) or rate of KL > eps")
    p.add_argument("--clip", type=float, help="kl mean: per-token KL clip in nats (the stated range), default 1")
    p.add_argument("--sequential", action="store_true", help="stop sampling once the bound is decided")
    p.add_argument("--unit", choices=["position", "window"], default="position",
                   help="position: i.i.d. uniformly random token positions of the text (a guarantee for that text); "
                        "window: contiguous windows (independence assumed)")
    p.add_argument("--seqlen", type=int, default=512, help="position: left context per sample; window: window length")
    p.add_argument("--windows", type=int, default=64, help="number of samples (positions or windows)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--no-save", action="store_true", help="do not write certificate.json into the export")
    p.add_argument("--json", action="store_true", help="print the whole certificate as JSON")
    return ["certify"]


def run(args: argparse.Namespace) -> int:
    from modelpress import api
    from modelpress.calib import sources
    from modelpress.eval import eval_windows

    from ..certify.certificate import certify, sample_positions, save, summary

    if args.text not in ("wiki-eval", "wiki") and not Path(args.text).is_file():
        raise UserError(f"--text {args.text} does not exist: pass a .txt/.jsonl file or wiki-eval")
    if args.windows < 2:
        raise UserError(f"--windows must be >= 2 (the i.i.d. samples), got {args.windows}")
    orig, tok = api.load(args.original)
    comp, _ = api.load(args.compressed)
    texts = sources.texts(args.text, "eval")
    windows = (sample_positions(tok, texts, args.windows, args.seqlen, args.seed) if args.unit == "position"
               else eval_windows(tok, texts, args.seqlen, args.windows))
    export = Path(args.compressed)
    is_export = export.is_dir() and (export / "modelpress.json").exists()
    recipe = export / "recipe.yaml" if is_export and (export / "recipe.yaml").exists() else None
    calibration = (json.loads((export / "calibration.json").read_text())
                   if is_export and (export / "calibration.json").exists() else None)
    cert = certify(orig, comp, windows, args.property, args.eps, args.delta, args.method, args.sequential,
                   threshold=args.threshold, stat=args.stat, clip=args.clip, seed=args.seed, recipe=recipe,
                   calibration=calibration, eval_source=f"{args.text} sha256 {sources.source_sha256(args.text, 'eval')}",
                   unit=args.unit)
    print(cert.to_json() if args.json else f"{cert.statement}\n{summary(cert)}")
    if is_export and not args.no_save:
        print(f"wrote {save(cert, export)}")
    return 0 if cert.passed else 1
