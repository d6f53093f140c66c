"""modelpress: compress trained neural networks and certify how much behaviour survived.

    model, tok = modelpress.load("smollm2")
    calib = modelpress.calibration_set(tok, "wiki", samples=128, seqlen=512)
    modelpress.compress(model, modelpress.Recipe.from_yaml("w4a16-gptq-g128"), calib)
    modelpress.evaluate(model, tok, reference=original)
    modelpress.export(model, tok, "out/smollm2-w4")

The names below are imported on first use (PEP 562), so `import modelpress` and the `modelpress` command
start without importing torch or transformers.
"""
from __future__ import annotations

import importlib
import sys
import types
from typing import TYPE_CHECKING

__version__ = "0.1.0"

# public name -> (module, attribute)
_PUBLIC = {
    "load": ("api", "load"), "calibration_set": ("api", "calibration_set"), "compress": ("api", "compress"),
    "evaluate": ("api", "evaluate"), "run_recipe": ("api", "run_recipe"), "certify": ("certify", "certify"),
    "export": ("export", "save"), "Recipe": ("recipe", "Recipe"), "STAGES": ("recipe", "STAGES"),
    "Prune": ("stages.prune", "Prune"), "Quantize": ("stages.quantize", "Quantize"), "UserError": ("errors", "UserError"),
}
__all__ = list(_PUBLIC)


def __getattr__(name: str):
    if name not in _PUBLIC:
        raise AttributeError(f"module 'modelpress' has no attribute {name!r}")
    mod, attr = _PUBLIC[name]
    value = getattr(importlib.import_module(f".{mod}", __name__), attr)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted(list(globals()) + __all__)


class _Package(types.ModuleType):
    """`modelpress.export` and `modelpress.certify` are both subpackages and public functions. Importing a
    subpackage binds it as an attribute of its parent; here that binding is skipped for public names, so
    they stay the functions (as they were when this file imported them eagerly)."""

    def __setattr__(self, name: str, value) -> None:
        if name in _PUBLIC and isinstance(value, types.ModuleType):
            return
        super().__setattr__(name, value)


sys.modules[__name__].__class__ = _Package


if TYPE_CHECKING:
    from .api import calibration_set, compress, evaluate, load, run_recipe
    from .certify import certify
    from .errors import UserError
    from .export import save as export
    from .recipe import STAGES, Recipe
    from .stages.prune import Prune
    from .stages.quantize import Quantize
