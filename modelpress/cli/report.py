"""`modelpress report DIR [DIR ...] --out report.html`: one self-contained HTML page (see report.py)."""
from __future__ import annotations


def add_parser(subparsers) -> tuple[str, ...]:
    p = subparsers.add_parser("report", help="self-contained HTML report of one or more export folders "
                                             "(a quality-vs-size sweep when several are given)")
    p.add_argument("dirs", nargs="+", metavar="DIR", help="modelpress export folder(s)")
    p.add_argument("--out", default="report.html", help="output HTML file (default report.html)")
    p.add_argument("--device", action="append", metavar="NAME|YAML",
                   help="device profile(s) for the deployment table (repeatable, comma-separated; default "
                        "jetson-orin-nano, jetson-agx-orin, rtx-4090, h100)")
    p.add_argument("--context", type=int, default=2048, help="KV-cache length for the deployment table")
    p.add_argument("--control-hz", type=float, help="control-loop rate for the deadline column")
    p.add_argument("--title", help="page title")
    return ("report",)


def run(args) -> int:
    from pathlib import Path

    from ..errors import UserError
    from ..report.build import build
    if Path(args.out).is_dir():
        raise UserError(f"--out {args.out} is a folder: pass the HTML file to write, e.g. {Path(args.out) / 'report.html'}")
    devices = [d.strip() for a in (args.device or []) for d in a.split(",") if d.strip()] or None
    out = build(args.dirs, args.out, devices=devices, context=args.context, control_hz=args.control_hz,
                title=args.title)
    print(f"wrote {out} ({out.stat().st_size / 1e3:.0f} kB)")
    return 0
