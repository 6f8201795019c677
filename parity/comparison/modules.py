"""Isolation for any model, from its taps alone: re-run the candidate's tapped module on
the reference's inputs.

A probe that declares no component adapter (every `hf:` model, a user's own backend)
still says which module produces each tap, and that is enough: both runs keep the
arguments each of those modules received (`parity.capture.inputs`), and a part is one
tap, re-run as its module on the reference's input moved into the candidate's token
layout (through the two runs' Layouts, as for any adapter).  Its output is compared with
the reference's module re-run on its own input, like any tap.  This is the
`ComponentAdapter` that `parity.comparison.isolate.adapter_of` gives such a probe.

Which module a part re-runs:
  an output tap (`decoder.1.mlp`)   the tapped module (its output, `select` and `split`
                                    as the tap rule says);
  an input tap (`decoder.1.attn`,   the tapped module's parent, while the tapped module's
  the o-projection's input)         first positional input is caught: the attention
                                    module re-run on the normed hidden states gives the
                                    attention core's output.

The module's data input (its forward's first argument) is the reference's; every other
argument (masks, position embeddings, position ids, caches) is the candidate's own, as
its module received it, so a wrong mask or RoPE table is caught by the module using it.

The walk runs through a layer's parts in module-tree pre-order: a module before the
modules inside it (the layer's `out` before its norms, the attention module's `attn`
before q/k/v), siblings in the order of the probe's rules, then of the model's modules.
Walking upstream, the modules inside a layer are judged before the layer as a whole, so
the layer fails on its own only when its own code between them (a residual) is wrong; a
failing module that holds other parts is narrowed to the one inside it that fails.

Only taps inside layers are parts (an embedding, a final norm or the logits are not), so
only the inputs of their modules are kept, up to `DEFAULT_MAX_MB` per run; a part whose
inputs were not kept cannot be isolated, and says so.  No hints: which bug a wrong output
matches is architecture knowledge, which only a probe's own adapter has.
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field
from typing import Any

from parity.capture.inputs import MB, CannotRerun, InputBudget, KeptCall, NotKept, data_input, install_input_hooks
from parity.capture.inputs import rerun as rerun_call
from parity.comparison.errors import IsolationError, crash_line
from parity.taps.probe import ON_INPUT, Probe, cut

DEFAULT_MAX_MB = 2048  # per run: the bytes of the module inputs kept for isolation (parity.capture.inputs)

INPUT = ":input"  # a part's data input is the value "<part>:input"; its output is the value "<part>"


@dataclass(frozen=True)
class PartSpec:
    """How one tap of one layer is re-run: `producer` (a module name) is called, and the
    value is its output (`select`, `chunk` as the tap rule says), or with `catch` the
    first positional input its sub-module at that path receives."""

    part: str
    producer: str
    catch: str | None
    select: int | None
    chunk: tuple[int, int] | None
    layout: str | None
    token_axis: int = 1
    groups: int = 1  # the split repeats per group (TapRule.split_groups)


@dataclass
class LayerModules:
    """The kept module calls of one layer call (stack, layer, step).  It stands where the
    isolator keeps a layer call (`module`, `args`, `kwargs`, `index`): `module` is this
    object, with no arguments of its own; `parts` are the layer's, from this run's model."""

    key: tuple[str, int, int | None]
    parts: dict[str, PartSpec]
    budget: InputBudget
    index: int
    kept: dict[str, KeptCall | NotKept] = field(default_factory=dict)
    args: tuple = ()
    kwargs: dict = field(default_factory=dict)

    @property
    def module(self) -> LayerModules:
        return self

    def where(self, spec: PartSpec) -> str:
        stack, layer, step = self.key
        return f"{spec.producer} ({stack}.{layer}.{spec.part}" + (f"@{step})" if step is not None else ")")


def kept_bytes(calls: Mapping) -> int:
    """Bytes the module inputs of one recording hold (its layer calls share one budget)."""
    budgets = {id(c.module.budget): c.module.budget for c in calls.values() if isinstance(c.module, LayerModules)}
    return sum(b.used for b in budgets.values())


def _ancestry(name: str) -> list[str]:
    """"a.b.c" -> ["a", "a.b", "a.b.c"]."""
    parts = name.split(".")
    return [".".join(parts[: i + 1]) for i in range(len(parts))]


class ModuleAdapter:
    """The `ComponentAdapter` of a probe that declares none, for one backend's model:
    each tap inside a layer is a part, re-run as the module that produces it."""

    layer_pattern = r"(?!)"  # no layer module is matched: `install` records the calls itself

    def __init__(self, probe: Probe, model, max_mb: float | None = DEFAULT_MAX_MB):
        if max_mb is not None and max_mb < 0:
            raise ValueError("max_mb must be >= 0")
        self.max_bytes = None if max_mb is None else int(max_mb * MB)
        names = [n for n, _ in model.named_modules()]
        registered = {n: i for i, n in enumerate(names)}
        rank: dict = {}
        for i, rule in enumerate(probe.rules):
            rank.setdefault(rule, i)
        self.layers: dict[tuple[str, int], dict[str, PartSpec]] = {}
        self.producers: dict[str, list[tuple[str, int]]] = {}
        first_rule: dict[str, int] = {}  # module -> the first rule tapping it or a module inside it
        keys: dict[tuple[str, int, str], tuple] = {}
        stepped: set[str] = set()
        for name in names:
            for hit in probe.taps_for(name):
                for m in _ancestry(name):
                    first_rule[m] = min(first_rule.get(m, len(rank)), rank[hit.rule])
                if hit.layer is None:
                    continue  # a stack-level tap: not a part
                producer, catch = name, None
                if hit.rule.on == ON_INPUT:
                    producer, _, catch = name.rpartition(".")
                    if not producer:
                        continue  # the model itself would have to be re-run
                spec = PartSpec(hit.component, producer, catch, hit.rule.select, hit.chunk, hit.rule.layout,
                                hit.rule.token_axis, hit.rule.split_groups)
                parts = self.layers.setdefault((hit.rule.stack, hit.layer), {})
                if spec.part in parts:
                    continue
                parts[spec.part] = spec
                if (hit.rule.stack, hit.layer) not in self.producers.setdefault(producer, []):
                    self.producers[producer].append((hit.rule.stack, hit.layer))
                keys[(hit.rule.stack, hit.layer, spec.part)] = (rank[hit.rule], hit.chunk[0] if hit.chunk else 0)
                if hit.rule.stepped:
                    stepped.add(hit.rule.stack)
        self.stepped = frozenset(stepped)

        def order(stack: str, layer: int, spec: PartSpec) -> tuple:
            """Pre-order: a module's own parts first, then the modules inside it."""
            tree = tuple((first_rule.get(m, len(rank)), registered[m], 0) for m in _ancestry(spec.producer))
            return (*tree, (-1, *keys[(stack, layer, spec.part)]))

        self._walk: dict[str, tuple[str, ...]] = {}
        self._layouts: dict[tuple[str, str], str | None] = {}
        self._subparts: dict[str, tuple[str, ...]] = {}
        for stack in dict.fromkeys(s for s, _ in self.layers):
            layers = sorted(layer for s, layer in self.layers if s == stack)
            ranked = sorted(layers, key=lambda n: (-len(self.layers[(stack, n)]), n))  # the fullest layer first
            walk: list[str] = []
            for n in ranked:
                specs = sorted(self.layers[(stack, n)].values(), key=lambda s, n=n: order(stack, n, s))
                walk += [s.part for s in specs if s.part not in walk]
                for s in specs:
                    self._layouts.setdefault((stack, s.part), s.layout)
            self._walk[stack] = tuple(walk)
            rep = self.layers[(stack, ranked[0])]
            for part in walk:
                spec = rep.get(part)
                if spec is None:
                    continue
                tapped = f"{spec.producer}.{spec.catch}" if spec.catch else None
                inside = [p for p in walk if p in rep and rep[p].producer.startswith(spec.producer + ".")
                          and not (tapped and (rep[p].producer == tapped or rep[p].producer.startswith(tapped + ".")))]
                if inside:
                    self._subparts.setdefault(part, tuple(inside))
        self._parts = {p for walk in self._walk.values() for p in walk}

    # --- the ComponentAdapter protocol (parity.comparison.isolate)

    def walk_parts(self, stack: str) -> tuple[str, ...]:
        return self._walk.get(stack, ())

    def parts_for(self, stack: str) -> tuple[str, ...]:
        return self._walk.get(stack, ())

    def part_of(self, component: str) -> str | None:
        return component if component in self._parts else None

    def inputs(self, part: str) -> tuple[str, ...]:
        return (part + INPUT,)

    def outputs(self, part: str) -> dict[str, str]:
        return {part: part}

    def layout(self, stack: str, value: str) -> str | None:
        return self._layouts.get((stack, value.removesuffix(INPUT)))

    def alternatives(self, part: str, stack: str) -> list:
        return []

    def subparts(self, part: str) -> tuple[str, ...]:
        return self._subparts.get(part, ())

    def install(self, model, calls: dict) -> list:
        """Hooks keeping every producing module's calls in `calls`, one LayerModules per
        (stack, layer, step), all under one InputBudget; returns their handles."""
        budget = InputBudget(self.max_bytes)
        counts: dict[str, int] = {}

        def on_call(name: str, module, args: tuple, kwargs: dict) -> None:
            n = counts.get(name, 0)
            counts[name] = n + 1
            kept = None
            for stack, layer in self.producers[name]:
                step = n if stack in self.stepped else None
                if step is None and n:
                    continue  # outside a stepped stack, the first call is the one tapped
                key = (stack, layer, step)
                entry = calls.get(key)
                if entry is None:
                    entry = calls[key] = LayerModules(key, self.layers[(stack, layer)], budget, len(calls))
                if kept is None:
                    kept = budget.keep(module, args, kwargs, name)
                entry.kept.setdefault(name, kept)

        return install_input_hooks(model, set(self.producers), on_call)

    def run(self, module, args, kwargs, feed=None, part=None, until=None) -> Mapping[str, Any]:
        """`part` on `feed` (its data input, the reference's): {part: output}; `until`:
        this run's own data input of that part; neither: every value of the layer call,
        each computed when first read (what the reference's side needs)."""
        layer: LayerModules = module
        if part is not None:
            spec = _spec(layer, part)
            data = (feed or {}).get(part + INPUT)
            if data is None:
                raise IsolationError(f"{layer.where(spec)}: its input is not a tensor the reference's can replace")
            return {part: _value(layer, spec, data, own=True)}
        if until is not None:
            spec = _spec(layer, until)
            return {until + INPUT: _data(layer, spec, own=True)}
        return LayerValues(layer)


def _spec(layer: LayerModules, part: str) -> PartSpec:
    spec = layer.parts.get(part)
    if spec is None:
        stack, n, _ = layer.key
        raise IsolationError(f"{stack} layer {n} has no module for {part}")
    return spec


def _kept(layer: LayerModules, spec: PartSpec, own: bool) -> KeptCall:
    """The producer's kept call.  A module this run never ran: the candidate's (`own`)
    finding, raised as such; the reference's, a part that cannot be isolated."""
    kept = layer.kept.get(spec.producer)
    if kept is None:
        if own:
            raise RuntimeError(f"{spec.producer} never ran")
        raise IsolationError(f"the reference never ran {layer.where(spec)}")
    if isinstance(kept, NotKept):
        raise IsolationError(f"{layer.where(spec)} was not kept: {kept.reason}")
    return kept


def _data(layer: LayerModules, spec: PartSpec, own: bool) -> Any:
    try:
        return data_input(_kept(layer, spec, own))
    except CannotRerun as exc:
        raise IsolationError(f"{layer.where(spec)}: {exc}") from None


def _value(layer: LayerModules, spec: PartSpec, data: Any, own: bool) -> Any:
    """The part's value: its producer re-run (on `data`, if given, else on its own input)."""
    try:
        out = rerun_call(_kept(layer, spec, own), data, spec.catch)
    except CannotRerun as exc:
        raise IsolationError(f"{layer.where(spec)}: {exc}") from None
    if spec.catch is None:
        if spec.select is not None and isinstance(out, (tuple, list)):
            out = out[spec.select]
        if spec.chunk is not None:
            out = cut(out, spec.chunk, spec.groups)
        if spec.token_axis != 1 and hasattr(out, "movedim"):
            out = out.movedim(spec.token_axis, 1)
    return out


class LayerValues(Mapping):
    """One layer call's values, each computed when first read: a part's data input (as
    kept) and its output (its module re-run on that input).  What the isolator asks of
    the reference; anything that stops the reference's own re-run is an IsolationError."""

    def __init__(self, layer: LayerModules):
        self.layer = layer
        self._values: dict[str, Any] = {}

    def __getitem__(self, name: str) -> Any:
        if name not in self._values:
            part = name.removesuffix(INPUT)
            spec = self.layer.parts.get(part)
            if spec is None:
                raise KeyError(name)
            try:
                if name.endswith(INPUT):
                    self._values[name] = _data(self.layer, spec, own=False)
                else:
                    self._values[name] = _value(self.layer, spec, None, own=False)
            except IsolationError:
                raise
            except Exception as exc:  # noqa: BLE001 - the reference must re-run as it ran
                raise IsolationError(f"the reference's {self.layer.where(spec)} fails when re-run: "
                                     f"{crash_line(exc)}") from None
        return self._values[name]

    def __iter__(self) -> Iterator[str]:
        for part in self.layer.parts:
            yield part + INPUT
            yield part

    def __len__(self) -> int:
        return 2 * len(self.layer.parts)
