"""modelpress: compress trained neural networks and certify how much behaviour survived.

    model, tok = modelpress.load("smollm2")
    calib = modelpress.calibration_set(tok, "wiki", samples=128, seqlen=512)
    modelpress.compress(model, modelpress.Recipe.from_yaml("w4a16-gptq-g128"), calib)
    modelpress.evaluate(model, tok, reference=original)
    modelpress.export(model, tok, "out/smollm2-w4")
"""
from .api import calibration_set, compress, evaluate, load, run_recipe
from .certify import certify
from .errors import UserError
from .export import save as export
from .recipe import STAGES, Recipe
from .stages.prune import Prune
from .stages.quantize import Quantize

__version__ = "0.1.0"
__all__ = ["load", "calibration_set", "compress", "evaluate", "certify", "export", "run_recipe", "Recipe", "STAGES",
           "Prune", "Quantize", "UserError"]
