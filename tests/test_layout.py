"""The package layout as a contract: every import (module level or inside a function) points down the
layers below, and no two modules import each other, directly or through others. Read from the source
with `ast`, so it needs no import of modelpress and sees the lazy imports too."""
from __future__ import annotations

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1] / "modelpress"

# bottom to top; a module may import its own layer or lower ones (the README's "Layout" section)
LAYERS: tuple[tuple[str, tuple[str, ...]], ...] = (
    ("helpers", ("errors", "io", "progress")),
    ("architecture", ("model", "targets")),
    ("math", ("algos", "kernels")),
    ("modules", ("modules",)),
    ("export", ("export",)),
    ("data", ("calib", "eval")),
    ("engine", ("engine",)),
    ("planning", ("plan",)),
    ("stages", ("stages",)),
    ("features", ("certify", "distill", "tabular", "deploy", "report")),
    ("pipeline", ("recipe", "api", "sweep", "")),          # "" is modelpress/__init__.py: the public surface
    ("cli", ("cli",)),
)


def module_name(path: Path) -> str:
    parts = list(path.relative_to(ROOT.parent).with_suffix("").parts)
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def layer_of(mod: str) -> int:
    first = mod.split(".")[1] if "." in mod else ""
    for i, (_, tops) in enumerate(LAYERS):
        if first in tops:
            return i
    raise AssertionError(f"{mod} is in no layer: add its folder to LAYERS in tests/test_layout.py and to the README")


def imports(path: Path) -> set[str]:
    """Every modelpress module `path` imports (`from x import y` counts y when y is a module)."""
    mod = module_name(path)
    pkg = mod if path.name == "__init__.py" else mod.rsplit(".", 1)[0]
    out: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            out |= {a.name for a in node.names if a.name.split(".")[0] == "modelpress"}
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = pkg.split(".")[: len(pkg.split(".")) - node.level + 1]
                target = ".".join(base + ([node.module] if node.module else []))
            else:
                target = node.module or ""
            if target.split(".")[0] != "modelpress":
                continue
            for a in node.names:
                sub = f"{target}.{a.name}"
                out.add(sub if sub in MODULES else target)
    return out - {mod}


FILES = sorted(ROOT.rglob("*.py"))
MODULES = {module_name(p) for p in FILES}
GRAPH = {module_name(p): imports(p) for p in FILES}


def test_every_module_has_a_layer():
    for mod in MODULES:
        layer_of(mod)


def test_imports_point_down():
    bad = [f"{m} ({LAYERS[layer_of(m)][0]}) imports {t} ({LAYERS[layer_of(t)][0]})"
           for m, ts in GRAPH.items() for t in ts if layer_of(t) > layer_of(m)]
    assert not bad, "imports that point up a layer (pass the thing in instead):\n" + "\n".join(sorted(bad))


def _packages_of(mod: str) -> set[str]:
    """The packages whose __init__ runs before `mod` (the root's public surface aside: it loads last)."""
    parts = mod.split(".")
    return {".".join(parts[:i]) for i in range(2, len(parts))}


def test_no_import_cycles():
    # importing a.b.c runs a/__init__ and a/b/__init__ first: edges to parent packages count too
    graph = {m: {t for t in ts} | {p for t in ts for p in _packages_of(t) if p in MODULES} for m, ts in GRAPH.items()}
    state: dict[str, int] = {}
    stack: list[str] = []

    def visit(m: str) -> None:
        state[m] = 1
        stack.append(m)
        for t in sorted(graph.get(m, ())):
            if t not in MODULES or t == m or t in _packages_of(m):     # its own packages are already loading
                continue
            if state.get(t) == 1:
                cycle = stack[stack.index(t):] + [t]
                pytest.fail("import cycle: " + " -> ".join(cycle))
            if state.get(t) is None:
                visit(t)
        stack.pop()
        state[m] = 2

    for m in sorted(graph):
        if state.get(m) is None:
            visit(m)


def test_top_level_is_small():
    loose = sorted(p.name for p in ROOT.glob("*.py"))
    assert loose == ["__init__.py", "api.py", "errors.py", "io.py", "model.py", "progress.py", "recipe.py", "sweep.py",
                     "targets.py"], loose
