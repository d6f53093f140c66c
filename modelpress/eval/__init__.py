"""Evaluation with one frozen protocol (PROTOCOL): perplexity on non-overlapping windows, and top-1
agreement / KL divergence / max logit difference against the uncompressed model on the same windows."""
from .perplexity import PROTOCOL, PROTOCOLS, compare, default_seqlen, eval_windows, evaluate, perplexity
from .size import size_report

__all__ = ["PROTOCOL", "PROTOCOLS", "compare", "default_seqlen", "eval_windows", "evaluate", "perplexity", "size_report"]
