"""Which modules a stage touches: include/exclude regexes over full module names, and module types.
Precedence: an explicit name match beats a type rule, which beats the default (every nn.Linear in the
decoder layers, lm_head excluded)."""
from __future__ import annotations

import re
from dataclasses import dataclass

from torch import nn

from .errors import UserError


@dataclass(frozen=True)
class Target:
    include: tuple[str, ...] = ()            # regexes (re.search) over full names; empty = all
    exclude: tuple[str, ...] = ("lm_head",)  # regexes; a module matching any is skipped
    types: tuple[type, ...] = (nn.Linear,)

    def __post_init__(self):
        for pat in self.include + self.exclude:
            try:
                re.compile(pat)
            except re.error as e:
                raise UserError(f"pattern {pat!r} is not a valid regular expression ({e}): fix include/exclude") from None

    def matches(self, name: str, module: nn.Module) -> bool:
        if not isinstance(module, self.types):
            return False
        if any(re.search(p, name) for p in self.exclude):
            return False
        return not self.include or any(re.search(p, name) for p in self.include)

    def select(self, model: nn.Module, prefix: str = "") -> dict[str, nn.Module]:
        out = {}
        for n, m in model.named_modules():
            full = f"{prefix}.{n}" if prefix and n else (prefix or n)
            if self.matches(full, m):
                out[full] = m
        return out

    def filter(self, modules: dict[str, nn.Module]) -> dict[str, nn.Module]:
        return {n: m for n, m in modules.items() if self.matches(n, m)}
