"""How an architecture declares its taps: module-name patterns -> canonical tap names.

A probe is data, not code in the core: the core never knows which model it observes.
"""
from __future__ import annotations

import fnmatch
import re
from dataclasses import dataclass
from typing import Callable, Iterable


@dataclass(frozen=True)
class TapRule:
    """Modules whose qualified name fully matches `pattern` are taps of `stack`.

    Named groups `layer` and `component` in the pattern fill those fields; otherwise
    `component` is taken from this rule.  `stepped` rules are called once per step
    (e.g. per denoise step): the call index becomes the tap's step.  `select` picks an
    element when the module returns a tuple.  `layout` names the token layout the
    tensor uses ([rows, slots, ...]), None to compare the tensor as a whole."""

    pattern: str
    stack: str
    component: str | None = None
    layout: str | None = None
    stepped: bool = False
    select: int | None = None

    def __post_init__(self) -> None:
        regex = re.compile(self.pattern)
        if self.component is None and "component" not in regex.groupindex:
            raise ValueError(f"tap rule {self.pattern!r} names no component")

    def match(self, module_name: str) -> tuple[int | None, str] | None:
        m = re.fullmatch(self.pattern, module_name)
        if m is None:
            return None
        groups = m.groupdict()
        layer = int(groups["layer"]) if groups.get("layer") is not None else None
        return layer, groups.get("component") or self.component


@dataclass(frozen=True)
class Probe:
    arch: str
    rules: tuple[TapRule, ...]

    def tap_for(self, module_name: str):
        """(rule, layer, component, canonical name) for a module, or None."""
        for rule in self.rules:
            hit = rule.match(module_name)
            if hit is not None:
                layer, component = hit
                parts = [rule.stack] + ([str(layer)] if layer is not None else []) + [component]
                return rule, layer, component, ".".join(parts)
        return None


TapFilter = Callable[[str, str], bool]  # (name, key) -> keep?


def tap_filter(patterns: str | Iterable[str] | Callable[[str], bool] | None) -> TapFilter:
    """One filter from a glob, a comma-separated list of globs, a list, or a predicate.

    A glob matches a tap's canonical name (`prefix.3.k`) or its key (`expert.3.k@2`)."""
    if patterns is None:
        return lambda name, key: True
    if callable(patterns):
        return lambda name, key: bool(patterns(name)) or bool(patterns(key))
    if isinstance(patterns, str):
        patterns = [p for p in patterns.split(",") if p.strip()]
    globs = [p.strip() for p in patterns]
    if not globs:
        raise ValueError("empty tap selection")
    return lambda name, key: any(fnmatch.fnmatchcase(name, g) or fnmatch.fnmatchcase(key, g) for g in globs)
