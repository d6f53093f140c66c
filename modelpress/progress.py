"""Progress for long work, on a terminal and in logs.

`bar(label, total)` counts steps (decoder layers): a rich progress bar when stderr is a terminal; otherwise
(a log file, CI, nohup, a notebook) plain `logging` lines on the "modelpress" logger, "label: i/N,
elapsed, ETA", at the first and last step and at least every `interval()` seconds in between.
`step(label)` wraps work without a count (load, calibration, evaluation, packing, export, certificate):
a start line, a "still running" line at least every `interval()` seconds from a watcher thread, and a
done line with the elapsed time, on a terminal too. `timed(label, fn, ...)` is `step` around one call.
The interval is 30 s; the environment variable MODELPRESS_PROGRESS_INTERVAL sets another (seconds).
"""
from __future__ import annotations

import contextlib
import logging
import os
import sys
import threading
import time

log = logging.getLogger("modelpress")


def show(verbose: bool = False) -> None:
    """Print the progress lines on stderr, as the CLI and the benchmarks do: the "modelpress" logger at INFO,
    through a root handler that writes bare messages (other libraries' INFO lines too when `verbose`)."""
    logging.basicConfig(level=logging.INFO if verbose else logging.WARNING, format="%(message)s")
    log.setLevel(logging.INFO)


def interval() -> float:
    try:
        return max(0.0, float(os.environ.get("MODELPRESS_PROGRESS_INTERVAL", "30")))
    except ValueError:
        return 30.0


def _dur(s: float) -> str:
    s = int(round(s))
    if s < 60:
        return f"{s} s"
    if s < 3600:
        return f"{s // 60} min {s % 60:02d} s"
    return f"{s // 3600} h {s % 3600 // 60:02d} min"


@contextlib.contextmanager
def bar(label: str | None, total: int):
    if not label:
        yield lambda n=1: None
        return
    if not sys.stderr.isatty():
        yield _LogBar(label, total).advance
        return
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TimeElapsedColumn, TimeRemainingColumn
    with Progress("[progress.description]{task.description}", BarColumn(), MofNCompleteColumn(),
                  TimeElapsedColumn(), TimeRemainingColumn(), transient=True) as p:
        task = p.add_task(label, total=total)
        yield lambda n=1: p.advance(task, n)


class _LogBar:
    """The non-terminal bar: one log line per `interval()` seconds, plus the first and the last step."""

    def __init__(self, label: str, total: int):
        self.label, self.total, self.done = label, max(int(total), 1), 0
        self.t0 = self.last = time.perf_counter()
        self.start_done: int | None = None
        log.info(f"{label}: 0/{self.total}")

    def advance(self, n: int = 1) -> None:
        if self.start_done is None:                    # the first call may skip steps restored from a checkpoint
            self.start_done = self.done
        self.done += n
        now = time.perf_counter()
        if n and (now - self.last >= interval() or self.done >= self.total):
            self.last = now
            el = now - self.t0
            ran = self.done - self.start_done
            eta = f", ETA {_dur(el / ran * (self.total - self.done))}" if 0 < ran and self.done < self.total else ""
            log.info(f"{self.label}: {self.done}/{self.total}, elapsed {_dur(el)}{eta}")


@contextlib.contextmanager
def step(label: str):
    """Log `label ...`, then `label: still running (elapsed)` at least every interval(), then `label: done`."""
    t0 = time.perf_counter()
    log.info(f"{label} ...")
    stop = threading.Event()

    def watch():
        while not stop.wait(max(interval(), 0.05)):
            log.info(f"{label}: still running, elapsed {_dur(time.perf_counter() - t0)}")

    watcher = threading.Thread(target=watch, name=f"progress: {label}", daemon=True)
    watcher.start()
    try:
        yield
    finally:
        stop.set()
        watcher.join()
    log.info(f"{label}: done in {_dur(time.perf_counter() - t0)}")


def timed(label: str, fn, *args, **kwargs):
    """fn(*args, **kwargs) inside step(label)."""
    with step(label):
        return fn(*args, **kwargs)
