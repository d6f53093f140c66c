"""The `modelpress` command. User mistakes print one line (`modelpress: error: ...`, exit 2), never a
traceback. One rule: every command group is one module of this package (pipeline: compress/eval/inspect;
zip, certify, plan, distill, deploy, tabular, report, sweep), each with add_parser(subparsers) and run(args)."""
from __future__ import annotations

import argparse
import importlib
import sys

from .. import progress
from ..errors import UserError

# command-group modules (each: add_parser(subparsers), run(args) -> int)
PLUGINS: tuple[str, ...] = ("modelpress.cli.pipeline", "modelpress.cli.plan", "modelpress.cli.zip", "modelpress.cli.certify", "modelpress.cli.tabular",
                             "modelpress.cli.deploy", "modelpress.cli.report", "modelpress.cli.distill",
                             "modelpress.cli.sweep")


def parser() -> tuple[argparse.ArgumentParser, dict]:
    p = argparse.ArgumentParser(prog="modelpress", description="Compress neural networks and certify what survived.")
    p.add_argument("-v", "--verbose", action="store_true")
    sub = p.add_subparsers(dest="cmd", required=True)
    handlers = {}
    for modname in PLUGINS:
        mod = importlib.import_module(modname)
        before = set(sub.choices)
        mod.add_parser(sub)
        for name in set(sub.choices) - before:
            handlers[name] = mod.run
    return p, handlers


def main(argv: list[str] | None = None) -> int:
    p, handlers = parser()
    a = p.parse_args(argv)
    progress.show(a.verbose)
    try:
        return handlers[a.cmd](a) or 0
    except UserError as err:
        print(f"modelpress: error: {_one_line(err)}", file=sys.stderr)
        return 2
    except OSError as err:                  # read-only folder, disk full, ...: the OS's reason, one line
        where = f" {err.filename}" if getattr(err, "filename", None) else ""
        print(f"modelpress: error: cannot access{where}: {err.strerror or _one_line(err)}"
              f"{' (disk full: free space or choose another --out)' if err.errno == 28 else ''}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("modelpress: interrupted", file=sys.stderr)
        return 130


def _one_line(err: BaseException, limit: int = 1000) -> str:
    text = " ".join(str(err).split())
    return text if len(text) <= limit else text[:limit] + " ..."


if __name__ == "__main__":
    sys.exit(main())
