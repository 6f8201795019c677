"""Re-running one component on the reference's inputs: is an error introduced there, or
inherited from upstream?

A diff says where two runs first disagree; it cannot say whether the component there is
wrong or merely fed wrong inputs.  Here each backend's layer calls are recorded once
(their inputs and context: masks, RoPE tables, cached K/V as each backend really had
them), the reference's intermediate values are moved into the candidate's token layout
through the two runs' `Layout`s, and one part of the candidate's layer runs on them.  Its
output is compared with the reference's like any tap.  The architecture knowledge (which
modules are layers, how to run one part of a layer, what a plausible bug would compute)
is the probe's `ComponentAdapter`; this module knows no model.

Code outside layers (an embedding assembly, a time embedding, a sampler's update, a cache
handoff) is re-run the same way when the probe declares it as a `StageAdapter`: the
method that runs it is recorded per call, and the candidate's recorded callable runs on
the reference's values.  Every re-run also compares what the candidate's unit really
read (its `reads`: inputs, the K/V cache) with what the reference's read, which tells
the walk of `parity.comparison.localise` where an inherited error comes from.
"""

from __future__ import annotations

import re
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, Protocol

import numpy as np
import torch

from parity.capture.staging import to_storage
from parity.comparison.errors import IsolationError, crash_line
from parity.comparison.host import compare_taps
from parity.comparison.rules import Thresholds
from parity.report.results import PartResult, TapResult, Unit
from parity.taps.probe import step_layout
from parity.taps.records import Layout, Tap, TapInfo

CallKey = tuple[str, int, "int | None"]  # (stack, layer, step)


HINT_MIN_COS = 0.99  # a hint's alternative must be at least this close to the candidate ...


HINT_RATIO = 5.0  # ... and this many times closer (in 1 - cos) than the reference is


class ComponentAdapter(Protocol):
    """What a probe declares so that parity can run one part of one layer on its own.

    layer_pattern: regex over qualified module names with groups `stack` and `layer`:
        the modules whose calls are recorded (a transformer layer each).
    stepped: stacks whose layers run once per step (the call index is the tap's step).
    walk_parts(stack): the parts of a layer in execution order (walked upstream).
    parts_for(stack): every part that can be isolated in that stack.
    part_of(component): the part that produces a tap component (q -> qkv), or None.
    inputs(part) / outputs(part): value names a part consumes / {value: tap component}
        it produces.  layout(stack, value): the token layout a value uses.
    run(module, args, kwargs, feed, part, until): the layer's named values, running only
        `part`'s steps (on `feed`), or every step before `until`'s, or the whole layer.
    alternatives(part, stack): [(hint text, fn(module, args, kwargs, values) -> outputs)],
        what a known bug would compute on the reference side (the hints' evidence).
    subparts(part): smaller parts inside a part, isolated to narrow an introduced error.

    Optional (absent: none):
    stages: `StageAdapter`s for code outside layers, re-run like parts.
    kept(part): inputs a re-run of `part` takes from the candidate's own call instead of
        the reference's (the K/V cache an attention reads): it is judged as it really
        reads them, and re-run on the reference's to tell whether only they differ.
    origin(stack, layer, step, value): where a value a part reads comes from when it is
        not earlier in the part's own stream (an `Origin`; None: earlier in the stream).
    """

    layer_pattern: str
    stepped: frozenset

    def walk_parts(self, stack: str) -> tuple[str, ...]: ...
    def parts_for(self, stack: str) -> tuple[str, ...]: ...
    def part_of(self, component: str) -> str | None: ...
    def inputs(self, part: str) -> tuple[str, ...]: ...
    def outputs(self, part: str) -> dict[str, str]: ...
    def layout(self, stack: str, value: str) -> str: ...
    def run(self, module, args, kwargs, feed=None, part=None, until=None) -> dict[str, Any]: ...
    def alternatives(self, part: str, stack: str) -> list[tuple[str, Callable]]: ...
    def subparts(self, part: str) -> tuple[str, ...]: ...


@dataclass
class LayerCall:
    module: Any
    args: tuple
    kwargs: dict
    index: int  # execution order among recorded calls


StageKey = tuple[str, str, "int | None"]  # (stack, part, step)


@dataclass(frozen=True)
class Origin:
    """Where a value a unit reads comes from, for the upstream walk: a recorded unit
    (`stack`, `layer`, `step`, `part`; `part` None: the latest unit of that stack and step
    before the reader, and its stream upstream), or `words` naming code parity cannot
    re-run ("the sampler's noise")."""

    stack: str | None = None
    layer: int | None = None
    step: int | None = None
    part: str | None = None
    words: str | None = None


class StageAdapter(Protocol):
    """Code outside layers that a probe lets parity re-run on its own like a layer part:
    one method of one module, recorded as it is called.  Whatever the instance has under
    that name is recorded and re-run (a subclass's override, a method patched on the
    instance), so the candidate's own code runs on the reference's values.

    stack, part: the unit is `stack.part`, `@step` for a stepped stage (its calls count
        the steps); about: what it is, in words ("the prefix embedding assembly").
    owner, method: the module (qualified name; "" = the model) and its method.
    stepped: called once per step.
    taps: {output value: tap name} for outputs that are taps, on every call (optional
        `last_taps`: the same for taps only a stepped stage's last call produces, such as
        a sampler's final actions); they place it among the taps.
    layout(value): the token layout of a value; None: compared as a whole tensor.
    run(owner, fn, args, kwargs, feed=None) -> (reads, outputs): call `fn` (the recorded
        callable) with the values in `feed` in place of those it reads; the values it read
        and those it produced, by name.
    origin(value, step): where a value it reads comes from (an `Origin`), or None:
        earlier in the stage's own stream (its stack and step).
    """

    stack: str
    part: str
    about: str
    owner: str
    method: str
    stepped: bool
    taps: dict[str, str]

    def layout(self, value: str) -> str | None: ...
    def run(self, owner, fn, args, kwargs, feed=None) -> tuple[dict[str, Any], dict[str, Any]]: ...
    def origin(self, value: str, step: int | None) -> Origin | None: ...


@dataclass
class StageCall:
    owner: Any  # the module whose method it is
    fn: Any  # what the instance had under the method's name (called as is)
    args: tuple
    kwargs: dict
    index: int  # execution order among recorded calls, as the call returns


def stages_of(adapter) -> tuple[StageAdapter, ...]:
    return tuple(getattr(adapter, "stages", ()) or ())


def _kept(adapter, part: str) -> tuple[str, ...]:
    kept = getattr(adapter, "kept", None)
    return tuple(kept(part)) if kept is not None else ()


def origin_of(adapter, unit: Unit, value: str) -> Origin | None:
    """Where a value `unit` reads comes from (layer part or stage), as its adapter says."""
    if unit.layer is None:
        stage = stage_for(adapter, unit)
        return None if stage is None else stage.origin(value, unit.step)
    origin = getattr(adapter, "origin", None)
    return None if origin is None else origin(unit.stack, unit.layer, unit.step, value)


def stage_for(adapter, unit: Unit) -> StageAdapter | None:
    return next((s for s in stages_of(adapter) if s.stack == unit.stack and s.part == unit.part), None)


@dataclass
class CallLog:
    """One backend's recorded layer calls, stage calls and token layouts (and whether it
    raised)."""

    calls: dict[CallKey, LayerCall]
    layouts: dict[str, Layout]
    meta: dict
    error: str | None = None
    stages: dict[StageKey, StageCall] = field(default_factory=dict)

    def ordered(self) -> list[CallKey]:
        return sorted(self.calls, key=lambda k: self.calls[k].index)


def adapter_of(backend) -> ComponentAdapter:
    """The probe's component adapter; without one, each tapped module is re-run on its own
    (parity.comparison.modules)."""
    adapter = getattr(backend.probe, "components", None)
    if adapter is None:
        from parity.comparison.modules import ModuleAdapter

        adapter = ModuleAdapter(backend.probe, backend.model)
    return adapter


class CallRecorder:
    """Pre-hooks on every layer module keeping each call's arguments, and the probe's
    stage methods wrapped on the instance doing the same, only inside a `with` block
    (removed and restored in `finally`).  Nothing is copied: under inference mode no
    layer input is changed in place afterwards.  Can wrap a tap capture, so the same run
    serves the diff and the isolation, except for a model whose `parity_static_buffers`
    is true (it replays captured execution, e.g. CUDA graphs: the arguments seen while
    capturing are buffers overwritten later): it is recorded in a run of its own."""

    def __init__(self, backend):
        self.backend = backend
        self.adapter = adapter_of(backend)
        self.calls: dict[CallKey, LayerCall] = {}
        self.stages: dict[StageKey, StageCall] = {}
        self.handles: list = []
        self.patched: list = []  # (owner, method, what the instance had there or None)
        self.count = 0  # recorded calls so far: their execution order

    @staticmethod
    def reusable(backend) -> bool:
        return not getattr(backend.model, "parity_static_buffers", False)

    def __enter__(self) -> CallRecorder:
        pattern = re.compile(self.adapter.layer_pattern)
        counts: dict[str, int] = {}

        def hook_for(qualified: str, stack: str, layer: int):
            def pre(module, args, kwargs):
                n = counts.get(qualified, 0)
                counts[qualified] = n + 1
                step = n if stack in self.adapter.stepped else None
                self.calls[(stack, layer, step)] = LayerCall(module, args, dict(kwargs), self.count)
                self.count += 1
            return pre

        try:
            install = getattr(self.adapter, "install", None)
            if install is not None:  # an adapter that records its calls itself (parity.comparison.modules)
                self.handles.extend(install(self.backend.model, self.calls))
                return self
            for qualified, module in self.backend.model.named_modules():
                m = pattern.fullmatch(qualified)
                if m is not None:
                    self.handles.append(module.register_forward_pre_hook(
                        hook_for(qualified, m.group("stack"), int(m.group("layer"))), with_kwargs=True))
            for stage in stages_of(self.adapter):
                self._wrap(stage)
        except BaseException:
            self.remove()
            raise
        return self

    def _wrap(self, stage: StageAdapter) -> None:
        """Record every call of the stage's method on this instance, placed in execution
        order as it returns (after any layer it calls)."""
        try:
            owner = self.backend.model.get_submodule(stage.owner) if stage.owner else self.backend.model
            fn = getattr(owner, stage.method)
        except AttributeError:
            return  # this model does not have it: nothing to record
        calls = [0]

        def recorded(*args, **kwargs):
            out = fn(*args, **kwargs)
            step = calls[0] if stage.stepped else None
            calls[0] += 1
            self.stages[(stage.stack, stage.part, step)] = StageCall(owner, fn, args, dict(kwargs), self.count)
            self.count += 1
            return out

        self.patched.append((owner, stage.method, vars(owner).get(stage.method)))
        object.__setattr__(owner, stage.method, recorded)

    def __exit__(self, *exc) -> None:
        self.remove()

    def remove(self) -> None:
        for h in self.handles:
            h.remove()
        self.handles.clear()
        for owner, method, had in reversed(self.patched):
            if had is None:
                object.__delattr__(owner, method)
            else:
                object.__setattr__(owner, method, had)
        self.patched.clear()

    def log(self, error: str | None = None) -> CallLog:
        return CallLog(dict(self.calls), dict(self.backend.layouts()), dict(self.backend.meta), error,
                       dict(self.stages))


def record_calls(backend) -> CallLog:
    """Run the backend once, keeping every layer call's arguments.  A candidate that
    raises keeps the calls made before."""
    error = None
    with CallRecorder(backend) as rec:
        try:
            backend.run()
        except Exception as exc:  # noqa: BLE001 - a candidate that raises is a finding
            error = crash_line(exc)
    return rec.log(error)


def relayout(src: torch.Tensor, src_layout: Layout, dst_layout: Layout, fill: torch.Tensor) -> torch.Tensor:
    """`src` [R1, T1, ...] in `src_layout`, written into a copy of `fill` [R2, >=T2, ...]
    at every valid slot of `dst_layout` (same canonical position).  Don't-care slots (and
    any slots past the layout, e.g. keys appended to a cache) keep `fill`'s values: what
    the candidate itself had there."""
    R1, T1 = src_layout.slots.shape
    R2, T2 = dst_layout.slots.shape
    if tuple(src.shape[:2]) != (R1, T1) or fill.shape[0] != R2 or fill.shape[1] < T2:
        raise IsolationError(f"value {tuple(src.shape)} / {tuple(fill.shape)} does not fit its layouts "
                             f"[{R1}, {T1}] / [{R2}, {T2}]")
    if tuple(src.shape[2:]) != tuple(fill.shape[2:]):
        raise IsolationError(f"feature shapes differ: reference {tuple(src.shape)}, candidate {tuple(fill.shape)}")
    s = src_layout.slots.reshape(-1)
    d = dst_layout.slots.reshape(-1)
    size = int(max(s.max(initial=-1), d.max(initial=-1))) + 1
    lookup = np.full(size, -1, dtype=np.int64)
    lookup[s[s >= 0]] = np.flatnonzero(s >= 0)
    dst_flat = np.flatnonzero(d >= 0)
    src_flat = lookup[d[dst_flat]]
    if (src_flat < 0).any():
        raise IsolationError("the candidate computes token positions the reference does not")
    out = fill.clone()
    dr, dc = np.divmod(dst_flat, T2)
    sr, sc = np.divmod(src_flat, T1)
    def idx(a, device):
        return torch.as_tensor(a, device=device)

    out[idx(dr, out.device), idx(dc, out.device)] = src[idx(sr, src.device), idx(sc, src.device)].to(out.device,
                                                                                                    out.dtype)
    return out


def whole(src: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    """`src`, a value with no token layout, on `like`'s device and dtype (same shape)."""
    if tuple(src.shape) != tuple(like.shape):
        raise IsolationError(f"shapes differ: reference {tuple(src.shape)}, candidate {tuple(like.shape)}")
    return src.to(like.device, like.dtype)


class Isolator:
    """Both runs' recorded layer calls, and the part re-runs done on them.  The
    reference's layer values are computed once per layer call and reused."""

    def __init__(self, ref_backend, cand_backend, thresholds: Thresholds | None = None,
                 exact_dtypes: bool | None = None, logs: tuple[CallLog | None, CallLog | None] = (None, None)):
        """`logs`: calls already recorded (during the diff's own runs); None = run now."""
        self.ref_adapter, self.cand_adapter = adapter_of(ref_backend), adapter_of(cand_backend)
        self.ref = logs[0] if logs[0] is not None else record_calls(ref_backend)
        self.cand = logs[1] if logs[1] is not None else record_calls(cand_backend)
        if self.ref.error:
            raise IsolationError(f"the reference raised: {self.ref.error}")
        self.thresholds = thresholds or Thresholds()
        if exact_dtypes is None:
            exact_dtypes = self.ref.meta.get("dtype") == self.cand.meta.get("dtype")
        self.exact_dtypes = exact_dtypes
        self._ref_values: dict[CallKey, dict] = {}
        self._ref_stages: dict[StageKey, tuple[dict, dict]] = {}

    def units(self) -> list[Unit]:
        """Every isolatable unit of the reference, in execution order: the walked parts
        of each layer call, and each stage call (placed as it returned)."""
        calls = [(c.index, key, None) for key, c in self.ref.calls.items()]
        calls += [(c.index, None, key) for key, c in self.ref.stages.items()]
        out = []
        for _, layer_key, stage_key in sorted(calls, key=lambda c: c[0]):
            if layer_key is not None:
                s, layer, step = layer_key
                out += [Unit(s, layer, step, part) for part in self.ref_adapter.walk_parts(s)]
            else:
                s, part, step = stage_key
                out.append(Unit(s, None, step, part))
        return out

    def stage(self, unit: Unit) -> StageAdapter | None:
        """The reference probe's stage that `unit` is a call of (None: a layer part)."""
        return None if unit.layer is not None else stage_for(self.ref_adapter, unit)

    def stage_taps(self, unit: Unit) -> dict[str, str]:
        """{output value: tap name} of one stage call: its taps, and on its last call its
        `last_taps` (optional: the taps only a stepped stage's last call produces)."""
        stage = self.stage(unit)
        if stage is None:
            return {}
        steps = [step for (s, part, step) in self.ref.stages if (s, part) == (unit.stack, unit.part)]
        last = not stage.stepped or unit.step == max((x for x in steps if x is not None), default=None)
        return {**stage.taps, **(getattr(stage, "last_taps", {}) if last else {})}

    def ref_values(self, key: CallKey) -> dict:
        if key not in self._ref_values:
            call = self.ref.calls[key]
            self._ref_values[key] = self.ref_adapter.run(call.module, call.args, call.kwargs)
        return self._ref_values[key]

    def _tap(self, unit: Unit, component: str, value: torch.Tensor, layout: str | None,
             name: str | None = None) -> Tap:
        array, dtype = to_storage(value)
        if name is None:
            name = f"{unit.stack}.{component}" if unit.layer is None else f"{unit.stack}.{unit.layer}.{component}"
        info = TapInfo(name, unit.stack, unit.layer, component, unit.step)
        return Tap(info=info, order=0, array=array, dtype=dtype, layout=layout)

    def _stepped(self, layout: str | None, step: int | None) -> str | None:
        """A layout name as the runs recorded it: per step (`tokens@2`) where the probe lays
        each call out on its own (TapRule.step_layouts), else as it is."""
        if layout is None or layout in self.ref.layouts or step is None:
            return layout
        stepped = step_layout(layout, step)
        return stepped if stepped in self.ref.layouts else layout

    def _compare(self, unit: Unit, outputs: dict[str, str], ref_vals: dict, cand_vals: dict) -> list[TapResult]:
        rows = []
        stage = self.stage(unit)
        for value, component in outputs.items():
            layout = self._stepped(self.ref_adapter.layout(unit.stack, value), unit.step) if stage is None else \
                stage.layout(value)
            name = None if stage is None else self.stage_taps(unit).get(value)
            ref_tap = self._tap(unit, component, ref_vals[value], layout, name)
            cand_tap = self._tap(unit, component, cand_vals[value], layout, name)
            threshold = self.thresholds.for_pair(ref_tap.info.name, ref_tap.key)
            rows.append(compare_taps(ref_tap, cand_tap, self.ref.layouts, self.cand.layouts, threshold,
                                     self.exact_dtypes))
        return rows

    def _reads(self, unit: Unit, names, ref_vals: dict, own: dict) -> list[TapResult]:
        """What the candidate's unit really read, compared with what the reference's read."""
        return self._compare(unit, {n: n for n in names if isinstance(ref_vals.get(n), torch.Tensor)
                                    and isinstance(own.get(n), torch.Tensor)}, ref_vals, own)

    def _check(self, unit: Unit) -> None:
        if unit.layer is None:
            if self.stage(unit) is None or unit.call_key not in self.ref.stages:
                raise IsolationError(f"the reference ran no stage {unit.name}")
            return
        if unit.part not in self.ref_adapter.parts_for(unit.stack):
            known = ", ".join(self.ref_adapter.parts_for(unit.stack))
            raise IsolationError(f"no part {unit.part!r} in stack {unit.stack}; known: {known}")
        if unit.call not in self.ref.calls:
            have = sorted({(s, step) for s, _, step in self.ref.calls}, key=str)
            layers = sorted({layer for s, layer, _ in self.ref.calls if s == unit.stack})
            if not layers:
                raise IsolationError(f"no stack {unit.stack!r}; known: {', '.join(sorted({s for s, _ in have}))}")
            steps = sorted({st for s, _, st in self.ref.calls if s == unit.stack}, key=lambda x: -1 if x is None else x)
            raise IsolationError(f"{unit.stack} has no layer {unit.layer}"
                                 + (f" at step {unit.step}" if unit.step is not None or steps != [None] else "")
                                 + f" (layers {layers[0]}-{layers[-1]}"
                                 + (f", steps {steps[0]}-{steps[-1]})" if steps != [None] else ")"))

    def isolate(self, unit: Unit, explain: bool = True) -> PartResult:
        """Run `unit` of the candidate (and of the reference) on the reference's inputs."""
        self._check(unit)
        if unit.layer is None:
            return self._isolate_stage(unit)
        result = PartResult(unit)
        if unit.call not in self.cand.calls:
            result.error = f"the candidate never ran {unit.stack} layer {unit.layer}" + (
                f" ({self.cand.error})" if self.cand.error else "")
            return result
        ref_vals = self.ref_values(unit.call)
        call = self.cand.calls[unit.call]
        adapter = self.cand_adapter
        outputs = adapter.outputs(unit.part)
        try:
            own = adapter.run(call.module, call.args, call.kwargs, until=unit.part)
            feed = {}
            for name in adapter.inputs(unit.part):
                if not isinstance(ref_vals.get(name), torch.Tensor) or not isinstance(own.get(name), torch.Tensor):
                    continue  # e.g. no cached prefix K/V in this stack
                layout = self._stepped(adapter.layout(unit.stack, name), unit.step)
                if layout is None:  # a value compared whole: the reference's as it is
                    feed[name] = whole(ref_vals[name], own[name])
                else:
                    feed[name] = relayout(ref_vals[name], self.ref.layouts[layout], self.cand.layouts[layout],
                                          own[name])
            theirs = {name: feed.pop(name) for name in _kept(adapter, unit.part) if name in feed}
            cand_vals = adapter.run(call.module, call.args, call.kwargs, feed=feed, part=unit.part)
            result.rows = self._compare(unit, outputs, ref_vals, cand_vals)
            result.reads = self._reads(unit, adapter.inputs(unit.part), ref_vals, own)
            differ = [r.info.component for r in result.reads if r.info.component in theirs and not exact(r)]
            if differ and not result.passed:  # judged on what it reads: does it pass on the reference's?
                again = adapter.run(call.module, call.args, call.kwargs, feed={**feed, **theirs}, part=unit.part)
                if all(r.passed for r in self._compare(unit, outputs, ref_vals, again)):
                    result.inherited_via = differ
        except IsolationError:
            raise
        except Exception as exc:  # noqa: BLE001 - the candidate's own crash is the finding
            result.error = crash_line(exc)
            return result
        if explain and not result.passed and not result.inherited_via:
            result.hint = self._hint(unit, result, cand_vals)
            result.narrowed = self._narrow(unit)
        return result

    def reads_of(self, unit: Unit) -> list[TapResult]:
        """What the candidate's unit read compared with what the reference's read, without
        re-running it (empty when the candidate has no such call)."""
        self._check(unit)
        with torch.inference_mode():
            if unit.layer is None:
                call = self.cand.stages.get(unit.call_key)
                if call is None:
                    return []
                own, _ = self.stage(unit).run(call.owner, call.fn, call.args, call.kwargs)
                ref_reads = self.ref_stage(unit)[0]
                return self._reads(unit, list(ref_reads), ref_reads, own)
            call = self.cand.calls.get(unit.call)
            if call is None:
                return []
            own = self.cand_adapter.run(call.module, call.args, call.kwargs, until=unit.part)
            return self._reads(unit, self.cand_adapter.inputs(unit.part), self.ref_values(unit.call), own)

    def ref_stage(self, unit: Unit) -> tuple[dict, dict]:
        """(reads, outputs) of the reference's stage call, computed once."""
        key = unit.call_key
        if key not in self._ref_stages:
            call = self.ref.stages[key]
            with torch.inference_mode():
                self._ref_stages[key] = self.stage(unit).run(call.owner, call.fn, call.args, call.kwargs)
        return self._ref_stages[key]

    def _isolate_stage(self, unit: Unit) -> PartResult:
        """A stage of the candidate run on the reference's values: its outputs compared
        with the reference's, and what it read with what the reference's read."""
        result = PartResult(unit)
        stage = self.stage(unit)
        call = self.cand.stages.get(unit.call_key)
        if call is None or stage_for(self.cand_adapter, unit) is None:
            raise IsolationError(f"the candidate runs no {unit.name} of its own ({stage.owner or 'the model'}."
                                 f"{stage.method} was not called)")
        ref_reads, ref_outs = self.ref_stage(unit)
        try:
            with torch.inference_mode():
                own, _ = stage.run(call.owner, call.fn, call.args, call.kwargs)
                feed = {}
                for name, value in own.items():
                    if not isinstance(value, torch.Tensor) or not isinstance(ref_reads.get(name), torch.Tensor):
                        continue
                    layout = stage.layout(name)
                    if layout is None and tuple(ref_reads[name].shape) != tuple(value.shape):
                        raise IsolationError(f"the candidate's {unit.name} reads {name} {list(value.shape)} where "
                                             f"the reference's reads {list(ref_reads[name].shape)}: it computes "
                                             "it another way")
                    feed[name] = (ref_reads[name].to(value.device, value.dtype) if layout is None else
                                  relayout(ref_reads[name], self.ref.layouts[layout], self.cand.layouts[layout],
                                           value))
                _, cand_outs = stage.run(call.owner, call.fn, call.args, call.kwargs, feed)
        except IsolationError:
            raise
        except Exception as exc:  # noqa: BLE001 - the candidate's own crash is the finding
            result.error = crash_line(exc)
            return result
        result.rows = self._compare(unit, {v: v for v in ref_outs if v in cand_outs}, ref_outs, cand_outs)
        result.reads = self._reads(unit, list(ref_reads), ref_reads, own)
        return result

    def _narrow(self, unit: Unit) -> str | None:
        """The smallest sub-part that still fails on its own, if the part has any."""
        for sub in self.ref_adapter.subparts(unit.part):
            if sub in self.ref_adapter.parts_for(unit.stack):
                res = self.isolate(Unit(unit.stack, unit.layer, unit.step, sub), explain=False)
                if not res.passed:
                    return sub
        return None

    def _hint(self, unit: Unit, result: PartResult, cand_vals: dict) -> str | None:
        """A diagnosis only when earned: the candidate's isolated output is close to what
        a known bug computes on the reference's inputs (cos >= HINT_MIN_COS) and at least
        HINT_RATIO times closer to it than to the reference (a lossy candidate, e.g. FP8,
        matches neither exactly), and that bug is distinguishable from the reference."""
        call = self.ref.calls[unit.call]
        ref_vals = self.ref_values(unit.call)
        outputs = self.ref_adapter.outputs(unit.part)
        cand_err = 1.0 - min((r.cos for r in result.rows if r.cos is not None and r.cos == r.cos), default=-1.0)
        best: tuple[float, str] | None = None
        for text, fn in self.ref_adapter.alternatives(unit.part, unit.stack):
            try:
                alt = fn(call.module, call.args, call.kwargs, ref_vals)
            except Exception:  # noqa: BLE001 - an alternative that does not apply gives no hint
                continue
            compared = {k: c for k, c in outputs.items() if k in alt}
            if not compared:
                continue
            vs_alt = self._compare(unit, compared, {**ref_vals, **alt}, cand_vals)
            ref_vs_alt = [compare_taps(self._tap(unit, c, ref_vals[k], self.ref_adapter.layout(unit.stack, k)),
                                       self._tap(unit, c, alt[k], self.ref_adapter.layout(unit.stack, k)),
                                       self.ref.layouts, self.ref.layouts, row.threshold, False)
                          for (k, c), row in zip(compared.items(), vs_alt)]
            if all(r.passed for r in ref_vs_alt):
                continue  # the bug would not be visible: no evidence either way
            alt_cos = min((r.cos for r in vs_alt if r.cos is not None), default=float("nan"))
            if not alt_cos >= HINT_MIN_COS or (1.0 - alt_cos) * HINT_RATIO > cand_err:
                continue
            if best is None or alt_cos > best[0]:
                best = (alt_cos, f"{text} (cos {alt_cos:.6f} to it, {1.0 - cand_err:.6f} to the reference)")
        return None if best is None else best[1]


def exact(row: TapResult) -> bool:
    """A row whose values are bit-identical to the reference's (over the valid tokens)."""
    return row.passed and row.metrics is not None and row.metrics.n > 0 and row.metrics.max_abs == 0.0


def unit_for(first_row: TapResult, rows: list[TapResult], adapter: ComponentAdapter) -> Unit | None:
    """The unit to isolate first for a failing tap: the part that produces it, or, for a
    tap outside any layer (an embedding, the final norm, the actions), the last part of
    the nearest earlier tap that is inside a layer."""
    candidates = [first_row] + [r for r in reversed(rows) if r.order is not None and first_row.order is not None
                                and r.order < first_row.order]
    for i, row in enumerate(candidates):
        info = row.info
        if info.layer is None:
            continue
        part = adapter.part_of(info.component)
        if part is None:
            continue
        if i > 0:  # a stack-level tap: start from the last part of the preceding layer
            part = adapter.walk_parts(info.stack)[-1]
        return Unit(info.stack, info.layer, info.step, part)
    return None
