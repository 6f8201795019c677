"""Recording taps from a live model: hooks that exist only inside a `with` block.

Each tap is copied on its own device as it is produced (later in-place kernels cannot
change what was recorded; no host sync inside the forward, so taps can be recorded inside
a CUDA graph); on CUDA the copy goes into a slot of a device ring that travels to pinned
host memory on a side stream (`staging.py`).  A tap reaches the sink (an in-memory
`Capture`, a `DumpWriter`, or a `BackgroundWriter` in front of one) as soon as its host
copy exists, without waiting for it: on CPU at once, on CUDA once its slot's side-stream
copy has completed (checked at each later tap, and forced whenever the staged bytes
exceed `max_staged_bytes`).  So a capture killed half-way has already handed over every
tap whose copy was done; only taps recorded inside a CUDA graph capture wait for the end
of the run (their values exist only once the graph replays).  A sink that takes live
device tensors (`add_device_tap`: on-device compare, stats) gets each tap as it is, with
nothing staged.
"""

from __future__ import annotations

import collections
import functools

import torch

from parity.capture.observation import TAP_HOOK, Observation, opaque
from parity.capture.staging import (  # noqa: F401 - to_storage: part of this module's interface
    Staged,
    Stager,
    to_storage,
)
from parity.taps.probe import ON_INPUT, ON_OUTPUT, Probe, ProbeHit, TapFilter, step_layout, tap_filter
from parity.taps.records import Capture, CaptureError, Tap, TapInfo


def _pre_hook(rec: Recorder, spec: _ModuleTaps, module, args):
    if torch.compiler.is_compiling():
        return _pre_opaque(rec, spec, module, args)
    return rec.pre(spec, module, args)


def _post_hook(rec: Recorder, spec: _ModuleTaps, module, args, output):
    if torch.compiler.is_compiling():
        return _post_opaque(rec, spec, module, args, output)
    return rec.post(spec, module, output)


# Hooks observe; they are never traced.  Under torch.compile the hooks above see
# is_compiling() and call these instead, which torch.compile does not trace: a graph
# break per tap, so the compiled pieces are the code between taps (and the bookkeeping
# stays plain Python).  Eagerly the hooks skip the wrapper, which costs more than the
# bookkeeping itself; one wrapper for all modules, not one per hook installed.
_pre_opaque = opaque(lambda rec, spec, module, args: rec.pre(spec, module, args), TAP_HOOK)


_post_opaque = opaque(lambda rec, spec, module, args, output: rec.post(spec, module, output), TAP_HOOK)


class _HitPlan:
    """One tap of a module, with what does not change from call to call worked out at
    install time: its TapInfo and whether it is selected (non-stepped taps), its layout."""

    __slots__ = ("hit", "info", "wanted", "layout", "per_step", "select", "cut", "token_axis")

    def __init__(self, hit: ProbeHit, select: TapFilter) -> None:
        rule = hit.rule
        self.hit, self.select = hit, rule.select
        self.info = None if rule.stepped else TapInfo(hit.name, rule.stack, hit.layer, hit.component, None)
        self.wanted = None if rule.stepped else bool(select(hit.name, hit.name))
        self.layout = rule.layout
        self.per_step = rule.step_layouts and rule.layout is not None  # a layout per step: layout@step
        self.cut = hit.chunk is not None
        self.token_axis = rule.token_axis

    def info_at(self, calls: int) -> TapInfo:
        hit = self.hit
        return self.info or TapInfo(hit.name, hit.rule.stack, hit.layer, hit.component, calls)

    def layout_at(self, step: int | None) -> str | None:
        return step_layout(self.layout, step) if self.per_step and step is not None else self.layout


class _ModuleTaps:
    """What one tapped module yields, worked out once per capture, not per call; and how
    many times it has run (the call index of stepped taps)."""

    __slots__ = ("name", "inputs", "outputs", "blamed", "once", "calls")

    def __init__(self, name: str, hits: list[ProbeHit], select: TapFilter) -> None:
        self.name = name
        self.inputs = [_HitPlan(h, select) for h in hits if h.rule.on == ON_INPUT]
        self.outputs = [_HitPlan(h, select) for h in hits if h.rule.on == ON_OUTPUT]
        # The tap an exception inside this module is blamed on: its output, else its input.
        self.blamed = (self.outputs or self.inputs)[0]
        self.once = next((h for h in hits if not h.rule.stepped), None)
        self.calls = 0

    def wanted(self) -> bool:
        """Whether any tap of this module may be recorded (stepped ones: per call)."""
        return any(p.wanted is not False for p in self.inputs + self.outputs)


class ProbeError(Exception):
    """The probe does not fit the model (e.g. a non-stepped tap that runs twice)."""


class SinkFailed(BaseException):
    """Internal: raised through the model when the sink could not store a tap.

    A BaseException, so a model's `except Exception` fallback does not swallow it (and a
    model that catches it anyway gets it again at its next tap); the recorder remembers the real failure
    and `capture` re-raises it after the run, so a failed write is never mistaken for
    the model raising."""


class StopRun(BaseException):
    """Raised by a sink's `add_device_tap` to end the run early, not as a failure (e.g. a
    live compare told to stop at the first divergence).  A BaseException for the same
    reason as SinkFailed; `capture` returns normally after it."""


class Recorder:
    """Installs a post-forward hook on each probed module with a selected tap (and a
    pre-forward hook where it has input taps); removes all of them on exit, whatever
    happened.  Input taps (`TapRule.on="input"`) are recorded by the pre-hook, output
    taps by the post-hook, so execution order is kept either way.  Which tap component
    was running when the model raised is read from the exception's traceback (the
    innermost probed module's frame), so no hook is needed to follow it."""

    def __init__(self, model: torch.nn.Module, probe: Probe, sink, select: TapFilter | None = None,
                 max_staged_bytes: int | None = None):
        self.model, self.probe, self.sink = model, probe, sink
        self.select = select or tap_filter(None)
        self.handles: list = []
        self.specs: dict[int, tuple[torch.nn.Module, _ModuleTaps]] = {}  # id(module) -> its taps, every probed module
        # (info, order, staged copy, layout): handed to the sink as host storage by flush()
        self.pending: collections.deque[tuple[TapInfo, int, Staged, str | None]] = collections.deque()
        self.stager = Stager()
        self.max_staged_bytes = max_staged_bytes
        self.staged_bytes = 0
        self.sink_error: BaseException | None = None  # the sink failed: record nothing more
        # optional sink method, called as each tap is taken (progress displays): the sink
        # itself gets the taps only at flush()
        self.on_record = getattr(sink, "tap_recorded", None)
        # optional sink method taking each tap as the live device tensor (on-device
        # compare, stats): then nothing is staged for the host at all
        self.on_device = getattr(sink, "add_device_tap", None)
        self.stopped = False  # the sink raised StopRun: the run ends here
        self.installed: set[str] = set()  # module names with hooks (those that ran: `calls`)
        self.model_note = None  # what the model says instrumenting changed
        self.order = 0
        self.defer = False  # a tap was recorded inside a CUDA graph capture: flush at the end

    @property
    def calls(self) -> dict[str, int]:
        """Module name -> how many times it ran, for the probed modules that ran."""
        return {spec.name: spec.calls for _, spec in self.specs.values() if spec.calls}

    def __enter__(self) -> Recorder:
        try:
            for module_name, module in self.model.named_modules():
                hits = self.probe.taps_for(module_name)
                if not hits:
                    continue
                spec = _ModuleTaps(module_name, hits, self.select)
                self.specs[id(module)] = (module, spec)
                if not spec.wanted():
                    continue  # nothing of it is recorded: no hook (a crash inside is still located)
                if spec.inputs:
                    self.handles.append(module.register_forward_pre_hook(functools.partial(_pre_hook, self, spec)))
                self.handles.append(module.register_forward_hook(functools.partial(_post_hook, self, spec)))
                self.installed.add(module_name)
            self.model_note = self._notify(True)
        except BaseException:
            self.remove()
            raise
        return self

    def __exit__(self, *exc) -> None:
        self.remove()

    def remove(self) -> None:
        for h in self.handles:
            h.remove()
        self.handles.clear()
        self.pending.clear()
        self.staged_bytes = 0
        self._notify(False)

    def _notify(self, active: bool):
        """Models that cache captured execution (CUDA graphs, compiled code) may define
        `parity_instrumented(active)` to re-capture with the taps in place; what it returns
        (a note on how the instrumented run differs) goes into the observation record."""
        hook = getattr(self.model, "parity_instrumented", None)
        return hook(active) if callable(hook) else None

    def flush(self, keep_bytes: int = 0, ready_only: bool = False) -> None:
        """Hand recorded taps to the sink as host storage, oldest first, until at most
        `keep_bytes` stay staged (0: all of them); `ready_only`: only those whose host
        copy is already there (never waits).

        A tap leaves `pending` only once the sink has it, so a flush interrupted half-way
        (Ctrl-C) is completed by the next one.  A sink failure (disk full, a name the
        dump refuses) is kept in `sink_error`; nothing is recorded after it."""
        while self.pending and self.sink_error is None:
            info, order, staged, layout = self.pending[0]
            if keep_bytes and self.staged_bytes <= keep_bytes:
                break
            if ready_only and not staged.done():
                break
            array, dtype = staged.storage()
            try:
                self.sink.add_tap(Tap(info=info, order=order, array=array, dtype=dtype, layout=layout))
            except Exception as exc:  # noqa: BLE001 - re-raised by `capture` after the run
                self.sink_error = exc
                self.pending.clear()
                self.staged_bytes = 0
                raise SinkFailed(str(exc)) from exc
            self.pending.popleft()
            self.staged_bytes -= staged.nbytes

    def _again(self, spec: _ModuleTaps) -> None:
        if spec.calls and spec.once is not None:
            raise ProbeError(f"tap {spec.once.name} ran {spec.calls + 1} times in one run: "
                             "its probe rule must be stepped")

    def pre(self, spec: _ModuleTaps, module, args) -> None:
        """A module with input taps counts its calls here, as it starts: a call that raises
        inside the model (and is caught there) still takes its step."""
        self._again(spec)
        calls = spec.calls
        spec.calls = calls + 1
        for plan in spec.inputs:
            self._record(plan, calls, args[0] if args else None, "input")

    def post(self, spec: _ModuleTaps, module, output) -> None:
        if self.sink_error is not None:
            raise SinkFailed(str(self.sink_error))
        if self.stopped:
            raise StopRun()
        if spec.inputs:
            calls = spec.calls - 1  # counted by the pre-hook
        else:
            self._again(spec)
            calls = spec.calls
        for plan in spec.outputs:
            value = output
            if plan.select is not None and isinstance(output, (tuple, list)):
                value = output[plan.select]
            self._record(plan, calls, value, "output")
        spec.calls = calls + 1  # only once recorded: a failure above is located at this call

    def _record(self, plan: _HitPlan, calls: int, value, side: str) -> None:
        wanted = plan.wanted
        info = plan.info
        if info is None:
            info = plan.info_at(calls)
            wanted = self.select(info.name, info.key)
        if not wanted:
            return
        if not isinstance(value, torch.Tensor):
            raise TypeError(f"tap {info.key}: module {side} is {type(value).__name__}, not a tensor")
        if plan.cut:
            try:
                value = plan.hit.cut(value)
            except ValueError as exc:
                raise ProbeError(f"tap {info.key}: {exc}") from None
        if plan.token_axis != 1:
            if value.ndim <= plan.token_axis:
                raise ProbeError(f"tap {info.key}: a {value.ndim}-d value has no token axis {plan.token_axis}")
            value = value.movedim(plan.token_axis, 1)
        layout = plan.layout_at(info.step)
        if self.on_device is not None:
            self._hand_over(info, value.detach(), layout)
            return
        # A device-side copy now (later in-place kernels cannot touch it; inside a CUDA
        # graph capture the copy is recorded into the graph), on its way to the host.
        stager = self.stager
        staged = stager.stage(value)
        self.pending.append((info, self.order, staged, layout))
        self.staged_bytes += staged.nbytes
        self.order += 1
        if stager.capturing:
            self.defer = True  # the copy holds real values only after the graph replays
        if self.max_staged_bytes is not None and self.staged_bytes > self.max_staged_bytes and not self.defer:
            # Over budget: wait for the oldest copies and hand them over (half the budget
            # at a time, so the wait is not paid on every later tap).
            self.flush(keep_bytes=self.max_staged_bytes // 2)
        if self.on_record is not None:
            self.on_record(info)
        if not self.defer and self.pending and self.pending[0][2].done():
            # Stream: every tap whose host copy is already there goes to the sink now (on
            # CPU, this one), so a killed capture has handed over all it could.
            self.flush(ready_only=True)

    def _hand_over(self, info: TapInfo, value: torch.Tensor, layout: str | None) -> None:
        """The device-tensor path: the sink sees the tap as it is now (it copies what it keeps)."""
        try:
            self.on_device(info, self.order, value, layout)
        except StopRun:
            self.stopped = True
            raise
        except Exception as exc:  # noqa: BLE001 - re-raised by `capture` after the run
            self.sink_error = exc
            raise SinkFailed(str(exc)) from exc
        finally:
            self.order += 1
        if self.on_record is not None:
            self.on_record(info)

    def error_from(self, exc: BaseException) -> CaptureError:
        """Where `exc` was raised: the blamed tap of the innermost probed module in its
        traceback (whose frames hold the module as `self`), at the call that raised."""
        spec, tb = None, exc.__traceback__
        while tb is not None:
            owner = tb.tb_frame.f_locals.get("self")
            found = self.specs.get(id(owner))
            if found is not None and found[0] is owner:
                spec = found[1]
            tb = tb.tb_next
        info = None
        if spec is not None:  # the call that raised: counted as it started where the module has input taps
            info = spec.blamed.info_at(spec.calls - 1 if spec.inputs and spec.calls else spec.calls)
        message = str(exc).strip().splitlines()[0] if str(exc).strip() else ""
        return CaptureError(key=info.key if info else None, info=info, exc_type=type(exc).__name__, message=message)


def capture(backend, sink=None, select: TapFilter | None = None, max_staged_bytes: int | None = None):
    """Run the backend once with taps installed; returns the sink (a new Capture by default).

    `max_staged_bytes` bounds the tap copies held between the model and the sink (None:
    no bound; taps still reach the sink as soon as their host copies exist).  An
    exception inside the model is a finding, not a crash: it is recorded in the sink
    with the tap component that was running (and the sink then reads as incomplete).
    KeyboardInterrupt and friends propagate, after every tap recorded so far reached the
    sink.  If the sink itself fails (a DumpError: disk full), that error propagates,
    whatever the model did with it on the way.  A sink with `add_device_tap` gets each tap
    as the live device tensor instead (nothing is copied to the host), and may end the run
    early by raising StopRun."""
    sink = sink if sink is not None else Capture(meta=dict(backend.meta))
    for name, layout in backend.layouts().items():
        sink.add_layout(name, layout)
    with Recorder(backend.model, backend.probe, sink, select, max_staged_bytes) as rec:
        observation = Observation()
        try:
            backend.run()
        except (SinkFailed, StopRun):
            pass
        except Exception as exc:  # noqa: BLE001 - the candidate's crash is what we report
            if rec.sink_error is None:
                sink.set_error(rec.error_from(exc))
        finally:
            if rec.sink_error is None:
                try:
                    rec.flush()  # every tap recorded before a stop reaches the sink
                except SinkFailed:
                    pass  # raised below
        if rec.sink_error is not None:
            raise rec.sink_error
        observed = observation.finish(rec.model_note, rec.installed, set(rec.calls))
        if observed and not rec.stopped and callable(getattr(sink, "set_observation", None)):
            sink.set_observation(observed)
    return sink
