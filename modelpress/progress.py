"""Progress bars (rich) for long work; silent when not a terminal or when no label is given."""
from __future__ import annotations

import contextlib
import sys


@contextlib.contextmanager
def bar(label: str | None, total: int):
    if not label or not sys.stderr.isatty():
        yield lambda n=1: None
        return
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TimeElapsedColumn, TimeRemainingColumn
    with Progress("[progress.description]{task.description}", BarColumn(), MofNCompleteColumn(),
                  TimeElapsedColumn(), TimeRemainingColumn(), transient=True) as p:
        task = p.add_task(label, total=total)
        yield lambda n=1: p.advance(task, n)
