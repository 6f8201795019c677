"""How an architecture declares its taps: module-name patterns -> canonical tap names.

A probe is data, not code in the core: the core never knows which model it observes.
"""

from __future__ import annotations

import fnmatch
import re
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field

ON_OUTPUT, ON_INPUT = "output", "input"


@dataclass(frozen=True)
class TapRule:
    """Modules whose qualified name fully matches `pattern` are taps of `stack`.

    Named groups `layer` and `component` in the pattern fill those fields; otherwise
    `component` is taken from this rule.  `stepped` rules are called once per step
    (e.g. per denoise step): the call index becomes the tap's step.  `select` picks an
    element when the module returns a tuple (a plain tensor is taken as it is).
    `layout` names the token layout the tensor uses ([rows, slots, ...]), None to
    compare the tensor as a whole.

    `on="input"` records the module's first positional input instead of its output:
    the way to observe a value that no module returns (e.g. the attention core's
    output is the input of the o-projection).  `split` cuts the last dimension into
    consecutive named chunks, one tap each (a fused QKV projection -> q, k, v); the
    chunk names replace `component`.  `split_groups` > 1 repeats the split that many times
    along the last dimension (GPT-NeoX's query_key_value is [heads, q|k|v per head]): each
    chunk gathers its slice from every group.  `token_axis` is the axis holding the token slots
    when it is not 1 (a head-major [rows, heads, slots, dim] value, as Gemma-3's q/k norms
    return): the tap is stored with that axis moved to 1, so the token layout fits."""

    pattern: str
    stack: str
    component: str | None = None
    layout: str | None = None
    stepped: bool = False
    select: int | None = None
    on: str = ON_OUTPUT
    split: tuple[tuple[str, int], ...] = ()
    token_axis: int = 1
    step_layouts: bool = False
    split_groups: int = 1

    def __post_init__(self) -> None:
        regex = re.compile(self.pattern)
        if self.component is None and not self.split and "component" not in regex.groupindex:
            raise ValueError(f"tap rule {self.pattern!r} names no component")
        if self.on not in (ON_OUTPUT, ON_INPUT):
            raise ValueError(f"tap rule {self.pattern!r}: on must be {ON_OUTPUT!r} or {ON_INPUT!r}, not {self.on!r}")
        if any(size <= 0 for _, size in self.split):
            raise ValueError(f"tap rule {self.pattern!r}: split sizes must be positive")

    def match(self, module_name: str) -> tuple[int | None, str] | None:
        m = re.fullmatch(self.pattern, module_name)
        if m is None:
            return None
        groups = m.groupdict()
        layer = int(groups["layer"]) if groups.get("layer") is not None else None
        return layer, groups.get("component") or self.component


@dataclass(frozen=True)
class ProbeHit:
    """One tap a module yields: which rule, the canonical parts, and for split rules
    which slice [start, stop) of the last dimension."""

    rule: TapRule
    layer: int | None
    component: str
    name: str
    chunk: tuple[int, int] | None = None

    def cut(self, value):
        """This hit's chunk of a split rule's value (a tensor): its slice of the last
        dimension, taken from every group when the split repeats (`split_groups`).
        ValueError when the last dimension does not match the split."""
        if self.chunk is None:
            return value
        total = sum(size for _, size in self.rule.split) * self.rule.split_groups
        if value.shape[-1] != total:
            raise ValueError(f"last dimension {value.shape[-1]} does not match its split ({total})")
        return cut(value, self.chunk, self.rule.split_groups)


def cut(value, chunk: tuple[int, int], groups: int = 1):
    """Slice [start, stop) of the last dimension, from each of `groups` equal groups."""
    if groups == 1:
        return value[..., chunk[0]:chunk[1]]
    return value.unflatten(-1, (groups, -1))[..., chunk[0]:chunk[1]].flatten(-2)


def _name(stack: str, layer: int | None, component: str) -> str:
    return ".".join([stack] + ([str(layer)] if layer is not None else []) + [component])


@dataclass(frozen=True)
class Probe:
    """An architecture's taps (`rules`) and, optionally, its component adapter: how to
    re-run one part of a layer on its own (`parity.comparison.isolate.ComponentAdapter`).

    What the commands take from the reference's probe when the user does not say:
    `default_stack`, the stack `parity component` isolates in without `--stack`;
    `drift_taps`, the taps whose frame-to-frame drift `parity frames` shows without
    `--drift-taps` (None: every tap); `parts`, the parts `--part` takes, each with a few
    words (listed by `parity backends`)."""

    arch: str
    rules: tuple[TapRule, ...]
    components: object | None = None
    default_stack: str | None = None
    drift_taps: str | None = None
    parts: tuple[tuple[str, str], ...] = ()  # (part, what it covers or "")
    # module name -> its hits: a capture walks every module of the model, every time
    _hits: dict = field(default_factory=dict, init=False, repr=False, compare=False, hash=False)

    def tap_for(self, module_name: str):
        """(rule, layer, component, canonical name) of a module's first output rule, or None."""
        for hit in self.taps_for(module_name):
            if hit.rule.on == ON_OUTPUT:
                return hit.rule, hit.layer, hit.component, hit.name
        return None

    def taps_for(self, module_name: str) -> list[ProbeHit]:
        """Every tap a module yields: the first matching rule per side (input, output),
        expanded into one hit per chunk for split rules."""
        hits = self._hits.get(module_name)
        if hits is None:
            hits = self._hits[module_name] = self._match(module_name)
        return list(hits)

    def _match(self, module_name: str) -> list[ProbeHit]:
        hits: list[ProbeHit] = []
        seen: set[str] = set()
        for rule in self.rules:
            if rule.on in seen:
                continue
            found = rule.match(module_name)
            if found is None:
                continue
            seen.add(rule.on)
            layer, component = found
            if not rule.split:
                hits.append(ProbeHit(rule, layer, component, _name(rule.stack, layer, component)))
                continue
            start = 0
            for part, size in rule.split:
                hits.append(ProbeHit(rule, layer, part, _name(rule.stack, layer, part), (start, start + size)))
                start += size
        return hits

    def modules(self, model) -> dict[str, str]:
        """Canonical tap name -> qualified module name, for every tap this probe finds in
        `model` (anything with `named_modules()`): lets a report point back at the code."""
        out: dict[str, str] = {}
        for module_name, _ in model.named_modules():
            for hit in self.taps_for(module_name):
                out[hit.name] = module_name + (":input" if hit.rule.on == ON_INPUT else "")
        return out


def step_layout(layout: str, step: int) -> str:
    """The name of `layout`'s variant at call `step`, for rules with `step_layouts`."""
    return f"{layout}@{step}"


TapFilter = Callable[[str, str], bool]  # (name, key) -> keep?


def tap_filter(patterns: str | Iterable[str] | Callable[[str], bool] | None) -> TapFilter:
    """One filter from a glob, a comma-separated list of globs, a list, or a predicate.

    A glob matches a tap's canonical name (`prefix.3.k`) or its key (`expert.3.k@2`); a
    glob written `!GLOB` excludes what it matches (`decoder.*,!decoder.*.q_norm`; with
    exclusions only, every other tap is kept)."""
    if patterns is None:
        return lambda name, key: True
    if callable(patterns):
        return lambda name, key: bool(patterns(name)) or bool(patterns(key))
    if isinstance(patterns, str):
        patterns = [p for p in patterns.split(",") if p.strip()]
    globs = [p.strip() for p in patterns]
    if not globs:
        raise ValueError("empty tap selection")
    keep = [g for g in globs if not g.startswith("!")]
    drop = [g[1:].strip() for g in globs if g.startswith("!")]
    if any(not g for g in drop):
        raise ValueError("'!' must be followed by a glob of taps to leave out")

    def matches(name: str, key: str, among: list[str]) -> bool:
        return any(fnmatch.fnmatchcase(name, g) or fnmatch.fnmatchcase(key, g) for g in among)

    return lambda name, key: (not keep or matches(name, key, keep)) and not matches(name, key, drop)
