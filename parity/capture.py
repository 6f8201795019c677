"""Recording taps from a live model: hooks that exist only inside a `with` block.

Each tap is cloned as it is produced (later in-place kernels cannot change what was
recorded) and handed to a sink: an in-memory `Capture` or a streaming `DumpWriter`.
A tap reaches the sink as soon as it is produced, so a capture killed half-way has
already written every tap before the kill; only taps recorded inside a CUDA graph
capture wait for the end of the run (their values exist only once the graph replays).
"""
from __future__ import annotations

import numpy as np
import torch

from .probe import Probe, TapFilter, tap_filter
from .records import Capture, CaptureError, Tap, TapInfo

_BIT_VIEWS = {  # dtypes numpy cannot hold: stored as their raw bits
    torch.bfloat16: (torch.int16, np.uint16),
    torch.float8_e4m3fn: (torch.int8, np.uint8),
    torch.float8_e5m2: (torch.int8, np.uint8),
}


def to_storage(t: torch.Tensor, private: bool = False) -> tuple[np.ndarray, str]:
    """A detached host copy of `t` in the dump's storage representation, and its dtype name.

    `private`: `t` is already a copy nobody else holds, so a host tensor need not be copied again."""
    t = t.detach()
    name = str(t.dtype).removeprefix("torch.")
    src_is_host = t.device.type == "cpu" and not private
    if t.dtype in _BIT_VIEWS:
        view, np_dtype = _BIT_VIEWS[t.dtype]
        arr = t.contiguous().view(view).cpu().numpy().view(np_dtype)
    else:
        arr = t.cpu().numpy()
    return (arr.copy() if src_is_host else arr), name


class ProbeError(Exception):
    """The probe does not fit the model (e.g. a non-stepped tap that runs twice)."""


class SinkFailed(Exception):
    """Internal: raised through the model when the sink could not store a tap.

    The model may catch it (a fallback path); the recorder remembers the real failure
    and `capture` re-raises it after the run, so a failed write is never mistaken for
    the model raising."""


class Recorder:
    """Installs one pre- and one post-forward hook per probed module; removes all of them
    on exit, whatever happened.  Also knows which tap component was running when the
    model raised."""

    def __init__(self, model: torch.nn.Module, probe: Probe, sink, select: TapFilter | None = None):
        self.model, self.probe, self.sink = model, probe, sink
        self.select = select or tap_filter(None)
        self.handles: list = []
        self.calls: dict[str, int] = {}
        self.running: list[tuple[torch.nn.Module, TapInfo]] = []
        self.pending: list[tuple[TapInfo, int, torch.Tensor, str | None]] = []
        self.order = 0
        self.defer = False  # a tap was recorded inside a CUDA graph capture: flush at the end
        self.sink_error: BaseException | None = None  # the sink failed: record nothing more

    def __enter__(self) -> "Recorder":
        try:
            for module_name, module in self.model.named_modules():
                hit = self.probe.tap_for(module_name)
                if hit is None:
                    continue
                self.handles.append(module.register_forward_pre_hook(self._enter_hook(module_name, hit)))
                self.handles.append(module.register_forward_hook(self._exit_hook(hit)))
            self._notify(True)
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
        self._notify(False)

    def _notify(self, active: bool) -> None:
        """Models that cache captured execution (CUDA graphs, compiled code) may define
        `parity_instrumented(active)` to re-capture with the taps in place."""
        hook = getattr(self.model, "parity_instrumented", None)
        if callable(hook):
            hook(active)

    def flush(self) -> None:
        """Hand every recorded tap to the sink as host storage, in execution order.

        A tap leaves `pending` only once the sink has it, so a flush interrupted half-way
        (Ctrl-C) is completed by the next one.  A sink failure (disk full, a name the
        dump refuses) is kept in `sink_error`; nothing is recorded after it."""
        while self.pending and self.sink_error is None:
            info, order, value, layout = self.pending[0]
            array, dtype = to_storage(value, private=True)
            try:
                self.sink.add_tap(Tap(info=info, order=order, array=array, dtype=dtype, layout=layout))
            except Exception as exc:  # noqa: BLE001 - re-raised by `capture` after the run
                self.sink_error = exc
                self.pending.clear()
                raise SinkFailed(str(exc)) from exc
            self.pending.pop(0)

    def _enter_hook(self, module_name: str, hit):
        rule, layer, component, name = hit

        def pre(module, args):
            calls = self.calls.get(module_name, 0)
            self.calls[module_name] = calls + 1
            info = TapInfo(name, rule.stack, layer, component, calls if rule.stepped else None)
            self.running.append((module, info))
            if calls and not rule.stepped:
                raise ProbeError(f"tap {name} ran {calls + 1} times in one run: its probe rule must be stepped")

        return pre

    def _exit_hook(self, hit):
        rule = hit[0]

        def post(module, args, output):
            # Entries above ours belong to tapped modules that raised and were caught
            # inside the model: they never finished, so they are dropped here.
            while self.running and self.running[-1][0] is not module:
                self.running.pop()
            info = self.running[-1][1]
            if self.sink_error is not None:
                raise SinkFailed(str(self.sink_error))
            if self.select(info.name, info.key):
                value = output[rule.select] if rule.select is not None else output
                if not isinstance(value, torch.Tensor):
                    raise TypeError(f"tap {info.key}: module returned {type(value).__name__}, not a tensor")
                # A device-side copy now (later in-place kernels cannot touch it; inside a
                # CUDA graph capture the copy is recorded into the graph), host copy at flush.
                self.pending.append((info, self.order, value.detach().clone(), rule.layout))
                self.order += 1
                if value.is_cuda and torch.cuda.is_current_stream_capturing():
                    self.defer = True  # the copy holds real values only after the graph replays
                if not self.defer:
                    self.flush()
            self.running.pop()  # only once recorded: a failure above is located at this tap

        return post

    def error_from(self, exc: BaseException) -> CaptureError:
        info = self.running[-1][1] if self.running else None
        message = str(exc).strip().splitlines()[0] if str(exc).strip() else ""
        return CaptureError(key=info.key if info else None, info=info, exc_type=type(exc).__name__, message=message)


def capture(backend, sink=None, select: TapFilter | None = None):
    """Run the backend once with taps installed; returns the sink (a new Capture by default).

    An exception inside the model is a finding, not a crash: it is recorded in the sink
    with the tap component that was running (and the sink then reads as incomplete).
    KeyboardInterrupt and friends propagate, after every tap recorded so far reached the
    sink.  If the sink itself fails (a DumpError: disk full), that error propagates,
    whatever the model did with it on the way."""
    sink = sink if sink is not None else Capture(meta=dict(backend.meta))
    for name, layout in backend.layouts().items():
        sink.add_layout(name, layout)
    with Recorder(backend.model, backend.probe, sink, select) as rec:
        try:
            backend.run()
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
    return sink
