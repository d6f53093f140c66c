"""Shared helpers for stage configs: validation (each raises UserError naming `<stage>.<field>`) and tied-weight detection."""
from __future__ import annotations

from ..errors import UserError, excerpt


def choice(stage: str, field: str, value, allowed) -> None:
    if value not in allowed:
        raise UserError(f"{stage}.{field} must be one of {list(allowed)}, got {excerpt(value)}")


def flag(stage: str, field: str, value) -> None:
    if not isinstance(value, bool):
        raise UserError(f"{stage}.{field} must be true or false, got {excerpt(value)}")


def int_range(stage: str, field: str, value, lo: int, hi: int) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or not lo <= value <= hi:
        raise UserError(f"{stage}.{field} must be an integer in [{lo}, {hi}], got {excerpt(value)}")


def float_range(stage: str, field: str, value, lo: float, hi: float, hi_open: bool = False) -> None:
    ok = isinstance(value, (int, float)) and not isinstance(value, bool) and lo <= value and (value < hi if hi_open else value <= hi)
    if not ok:
        raise UserError(f"{stage}.{field} must be a number in [{lo}, {hi}{')' if hi_open else ']'}, got {excerpt(value)}")


def group_size(stage: str, value) -> None:
    if value is not None and (isinstance(value, bool) or not isinstance(value, int) or value <= 0):
        raise UserError(f"{stage}.group_size must be a positive integer (e.g. 32, 64, 128) or null for "
                        f"per-channel, got {excerpt(value)}")


def patterns(stage: str, field: str, value) -> None:
    if not isinstance(value, tuple) or not all(isinstance(p, str) for p in value):
        raise UserError(f"{stage}.{field} must be a list of regular expressions, got {excerpt(value)}")


def sparsity_pattern(stage: str, sparsity, pattern) -> tuple[int, int] | None:
    """Validate sparsity in [0, 1) and an 'unstructured' / 'N:M' pattern consistent with it."""
    from ..algos.prune import parse_pattern
    float_range(stage, "sparsity", sparsity, 0.0, 1.0, hi_open=True)
    try:
        nm = parse_pattern(pattern)
    except ValueError as e:
        raise UserError(f"{stage}.pattern: {e}") from None
    if nm and abs(sparsity - (1 - nm[0] / nm[1])) > 1e-9:
        raise UserError(f"{stage}.sparsity {sparsity} conflicts with pattern {pattern} "
                        f"(implies {1 - nm[0] / nm[1]:g}): set sparsity: {1 - nm[0] / nm[1]:g}")
    return nm


def plain_or(stage: str, name: str, module, allowed: tuple[type, ...]) -> None:
    """Refuse a linear that another stage already compressed into a form this stage would destroy."""
    import torch
    if type(module) is not torch.nn.Linear and not isinstance(module, allowed):
        raise UserError(f"{name} is already a {type(module).__name__} from an earlier stage, which {stage} would "
                        f"replace: exclude it from {stage} (exclude: [...]) or reorder the stages")


BUDGETS = ("uniform", "capability", "sensitivity", "owl")


def budget(stage: str, value, spread, max_spread: float) -> None:
    """budget in BUDGETS; budget_spread null or in [0, max_spread]."""
    choice(stage, "budget", value, BUDGETS)
    if spread is not None:
        float_range(stage, "budget_spread", spread, 0.0, max_spread)


def shared_storages(model) -> set[int]:
    """data_ptr of every parameter that more than one module holds (tied embeddings/lm_head): a stage
    must not write a compressed weight into such a tensor in place."""
    seen: dict[int, int] = {}
    for _, p in model.named_parameters(remove_duplicate=False):
        seen[p.data_ptr()] = seen.get(p.data_ptr(), 0) + 1
    return {ptr for ptr, n in seen.items() if n > 1}
