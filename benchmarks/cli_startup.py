"""How fast the `modelpress` command starts: `modelpress --help` and every subcommand's `--help`, median
wall time of fresh interpreters, against the baseline of importing the public API eagerly (what every
command cost before the CLI imported torch, transformers and the feature modules lazily).

    python benchmarks/cli_startup.py [--runs 7] [--no-write]
"""
from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

SUBCOMMANDS = ("compress", "eval", "inspect", "plan", "zip", "unzip", "certify", "tabular", "deploy", "report",
               "distill", "mft", "sweep")


def wall(argv: list[str], runs: int) -> float:
    times = []
    for _ in range(runs):
        t0 = time.perf_counter()
        subprocess.run(argv, check=True, capture_output=True)
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--runs", type=int, default=7)
    ap.add_argument("--no-write", action="store_true")
    a = ap.parse_args()
    py = sys.executable
    load = os.getloadavg()[0]
    base = wall([py, "-c", "import modelpress; modelpress.load; modelpress.Recipe; modelpress.certify"], a.runs)
    rows = [["`modelpress --help`", wall([py, "-m", "modelpress.cli", "--help"], a.runs)]]
    rows += [[f"`modelpress {s} --help`", wall([py, "-m", "modelpress.cli", s, "--help"], a.runs)] for s in SUBCOMMANDS]
    from benchmarks._md import table, write_section
    body = table(["command", "median s", "vs eager import"], [[c, t, f"{t / base:.2f}x"] for c, t in rows])
    body = (f"1-minute load average when the run started: {load:.1f} on {os.cpu_count()} cores. "
            f"Baseline measured in the same run: importing the public API eagerly (`import modelpress; "
            f"modelpress.load; modelpress.Recipe; modelpress.certify`, i.e. torch + transformers + every stage), "
            f"median {base:.2f} s: what `--help` cost before the lazy imports. Target: `modelpress --help` under 1 s "
            f"on a quiet machine.\n\n" + body)
    print(body)
    if not a.no_write:
        write_section("CLI start-up", f"python benchmarks/cli_startup.py --runs {a.runs}", body)


if __name__ == "__main__":
    main()
