"""`modelpress sweep RECIPES... --model M --out DIR`: many recipes x calibration seeds over one model
(modelpress.sweep), locally or on Ray."""
from __future__ import annotations

from pathlib import Path

from ..errors import UserError
from ..sweep import EXECUTORS, sweep

def add_parser(subparsers) -> None:
    p = subparsers.add_parser("sweep", help="run many recipes x seeds over one model (locally or on Ray)")
    p.add_argument("recipes", nargs="+", help="recipe YAML files or shipped recipe names")
    p.add_argument("--model", help='"smollm2", an HF folder, a .gguf file or a hub id (default: each recipe\'s model)')
    p.add_argument("--out", required=True, help="sweep folder: one export per job + sweep.json")
    p.add_argument("--seeds", default="0", help="calibration seeds, comma-separated (default 0)")
    p.add_argument("--executor", default="local", choices=EXECUTORS)
    p.add_argument("--ray-address", help="Ray cluster address (default: RAY_ADDRESS or a local instance)")
    p.add_argument("--no-eval", action="store_true", help="skip the before/after evaluation of each job")


def run(a) -> int:
    try:
        seeds = [int(s) for s in a.seeds.split(",") if s.strip()]
    except ValueError:
        raise UserError(f"--seeds must be comma-separated integers, got {a.seeds!r}") from None
    rows = sweep(a.recipes, a.model, a.out, seeds, a.executor, not a.no_eval, a.ray_address)
    for r in rows:
        if r["status"] != "ok":
            print(f"  {Path(r['recipe']).stem} seed {r['seed']}: FAILED: {r['error']}")
            continue
        ev = (f", ppl {r['perplexity']:.3f}, agreement {r['agreement']:.3f}" if r.get("perplexity") is not None
              and r.get("agreement") is not None else "")
        print(f"  {Path(r['recipe']).stem} seed {r['seed']}: {r['bits_per_weight']:.2f} bits/weight{ev} "
              f"({r['seconds']:.1f} s) -> {r['out']}")
    print(f"wrote {Path(a.out) / 'sweep.json'}")
    return 0 if all(r["status"] == "ok" for r in rows) else 1
