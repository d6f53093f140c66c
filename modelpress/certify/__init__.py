"""Certificates of behavioural similarity (SimCert, arXiv 2603.14818): probabilistic bounds on how often
a compressed model deviates from its original, a sound interval part for small MLPs, and the JSON
certificate stored in an export.

>>> from modelpress.certify import certify, save, verify
>>> cert = certify(original, compressed, windows, "agreement", eps=0.1, delta=0.05)
>>> save(cert, "out/smollm2-w4"); verify("out/smollm2-w4")
"""
from .certificate import (Certificate, certificate_from_tokens, certify, certify_mlp, certify_recipe_block, load,
                          model_sha256, save, summary, verify)
from .interval import DualBounds, dual_bounds, dual_bounds_split, guaranteed_range

__all__ = ["Certificate", "certify", "certify_recipe_block", "certify_mlp", "certificate_from_tokens", "save",
           "load", "verify", "summary", "model_sha256", "DualBounds", "dual_bounds", "dual_bounds_split",
           "guaranteed_range"]
