"""Write one benchmark's section into BENCHMARKS.md (atomically), keeping the others."""
from __future__ import annotations

import datetime
import platform
import re
from pathlib import Path

import torch

from modelpress.io import atomic_write_text

ROOT = Path(__file__).resolve().parent.parent
MD = ROOT / "BENCHMARKS.md"
HEADER = ("# Benchmarks\n\nEach section is written by the script named in its command; numbers come "
          "from that run, ratios against the baseline measured in the same run.\n")


def machine() -> str:
    import os
    dev = torch.cuda.get_device_name(0) if torch.cuda.is_available() else "CPU only"
    return f"{platform.processor() or platform.machine()}, {os.cpu_count()} cores, {dev}, torch {torch.__version__}"


def write_section(name: str, command: str, body_md: str) -> None:
    """Replace (or append) the section `## name` in BENCHMARKS.md."""
    text = MD.read_text() if MD.exists() else HEADER
    stamp = datetime.date.today().isoformat()
    section = (f"## {name}\n\nCommand: `{command}`  \nMachine: {machine()}; run {stamp}.\n\n"
               f"{body_md.strip()}\n\n")
    pattern = re.compile(rf"^## {re.escape(name)}\n.*?(?=^## |\Z)", re.S | re.M)
    text = pattern.sub(lambda _: section, text) if pattern.search(text) else text.rstrip() + "\n\n" + section
    atomic_write_text(MD, text)


def model_label(model: str) -> str:
    """The display name of a reference model ("SmolLM2-135M-Instruct" for "smollm2", from
    modelpress.model.REFERENCES without the family), else the folder's name."""
    from modelpress.model import REFERENCES
    ref = REFERENCES.get(model)
    return ref.title.split(" (")[0] if ref else Path(model).name


def ms(xs: list[float], fmt: str = ".3f") -> str:
    """mean +- sd over seeds in `fmt` (a sign flag such as "+.1f" is kept on the mean only); one value alone."""
    import statistics
    return (format(xs[0], fmt) if len(xs) == 1 else
            f"{statistics.fmean(xs):{fmt}} +- {statistics.stdev(xs):{fmt.lstrip('+')}}")


def table(header: list[str], rows: list[list]) -> str:
    def fmt(x):
        return f"{x:.4g}" if isinstance(x, float) else str(x)
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(fmt(x) for x in r) + " |" for r in rows]
    return "\n".join(lines)


def run_cache(root: str, args, exclude: tuple[str, ...] = ("threads", "cache", "no_write")) -> Path:
    """The resume folder of one benchmark run: `root`/<sha256 of every argument but `exclude`>[:16], created.
    Finished seeds (or rows) written there are reused by a later run with the same settings."""
    import hashlib
    import json
    key = json.dumps({k: v for k, v in vars(args).items() if k not in exclude}, sort_keys=True)
    folder = Path(root) / hashlib.sha256(key.encode()).hexdigest()[:16]
    folder.mkdir(parents=True, exist_ok=True)
    return folder


def per_seed(cache: Path, seeds: list[int], run) -> dict[int, dict]:
    """{seed: result} with each result read from `cache`/seed<N>.json, or computed by run(seed) (a JSON-able
    dict), given its wall time under "seconds" and written there atomically as soon as it finishes."""
    import json
    import time
    from modelpress.io import atomic_write_text
    done: dict[int, dict] = {}
    for seed in seeds:
        f = cache / f"seed{seed}.json"
        if f.is_file():
            done[seed] = json.loads(f.read_text())
            print(f"seed {seed}: cached ({f})", flush=True)
            continue
        t = time.perf_counter()
        done[seed] = run(seed)
        done[seed]["seconds"] = time.perf_counter() - t
        atomic_write_text(f, json.dumps(done[seed]))
        print(f"seed {seed}: done in {done[seed]['seconds']:.0f} s", flush=True)
    return done
