"""Recording taps from a live model: hooks that exist only inside a `with` block.

Each tap is cloned on its own device as it is produced (later in-place kernels cannot
change what was recorded; no host sync inside the forward, so taps can be recorded inside
a CUDA graph); on CUDA the clone then travels to pinned host memory on a side stream
(`staging.py`).  Taps reach the sink (an in-memory `Capture`, a `DumpWriter`, or a
`BackgroundWriter` in front of one) after the run, or during it, oldest first, whenever
the staged bytes exceed `max_staged_bytes`.
"""
from __future__ import annotations

import collections

import numpy as np
import torch

from .probe import ON_INPUT, ON_OUTPUT, Probe, ProbeHit, TapFilter, tap_filter
from .records import Capture, CaptureError, Tap, TapInfo
from .staging import Staged, Stager, graph_capturing

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


def _eager(hook):
    """Hooks observe; they are never traced.  Under torch.compile each hook is a graph
    break, so the compiled pieces are the code between taps (and the bookkeeping here
    stays plain Python)."""
    return torch.compiler.disable(hook, recursive=True)


class _SinkFailed(BaseException):
    """Stops the model when the sink failed mid-run (disk full): not the model's fault,
    so not an `Exception` a model or `capture` would record as the candidate's error."""


class ProbeError(Exception):
    """The probe does not fit the model (e.g. a non-stepped tap that runs twice)."""


class Recorder:
    """Installs one pre- and one post-forward hook per probed module; removes all of them
    on exit, whatever happened.  Also knows which tap component was running when the
    model raised.  Input taps (`TapRule.on="input"`) are recorded by the pre-hook,
    output taps by the post-hook, so execution order is kept either way."""

    def __init__(self, model: torch.nn.Module, probe: Probe, sink, select: TapFilter | None = None,
                 max_staged_bytes: int | None = None):
        self.model, self.probe, self.sink = model, probe, sink
        self.select = select or tap_filter(None)
        self.handles: list = []
        self.calls: dict[str, int] = {}
        self.running: list[tuple[torch.nn.Module, TapInfo, int]] = []  # (module, blamed tap, call index)
        # (info, order, staged copy, layout): handed to the sink as host storage by flush()
        self.pending: collections.deque[tuple[TapInfo, int, Staged, str | None]] = collections.deque()
        self.stager = Stager()
        self.max_staged_bytes = max_staged_bytes
        self.staged_bytes = 0
        self.sink_error: BaseException | None = None
        # optional sink method, called as each tap is taken (progress displays): the sink
        # itself gets the taps only at flush()
        self.on_record = getattr(sink, "tap_recorded", None)
        self.order = 0

    def __enter__(self) -> "Recorder":
        try:
            for module_name, module in self.model.named_modules():
                hits = self.probe.taps_for(module_name)
                if not hits:
                    continue
                self.handles.append(module.register_forward_pre_hook(_eager(self._enter_hook(module_name, hits))))
                self.handles.append(module.register_forward_hook(_eager(self._exit_hook(hits))))
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
        self.staged_bytes = 0
        self._notify(False)

    def _notify(self, active: bool) -> None:
        """Models that cache captured execution (CUDA graphs, compiled code) may define
        `parity_instrumented(active)` to re-capture with the taps in place."""
        hook = getattr(self.model, "parity_instrumented", None)
        if callable(hook):
            hook(active)

    def flush(self, keep_bytes: int = 0) -> None:
        """Hand recorded taps to the sink as host storage, oldest first, until at most
        `keep_bytes` stay staged (0: all of them)."""
        while self.pending and self.staged_bytes > keep_bytes:
            info, order, staged, layout = self.pending.popleft()
            self.staged_bytes -= staged.nbytes
            array, dtype = to_storage(staged.ready(), private=True)
            self.sink.add_tap(Tap(info=info, order=order, array=array, dtype=dtype, layout=layout))
        if keep_bytes == 0:
            while self.pending:  # zero-sized taps
                info, order, staged, layout = self.pending.popleft()
                array, dtype = to_storage(staged.ready(), private=True)
                self.sink.add_tap(Tap(info=info, order=order, array=array, dtype=dtype, layout=layout))

    @staticmethod
    def _info(hit: ProbeHit, calls: int) -> TapInfo:
        return TapInfo(hit.name, hit.rule.stack, hit.layer, hit.component, calls if hit.rule.stepped else None)

    def _enter_hook(self, module_name: str, hits: list[ProbeHit]):
        inputs = [h for h in hits if h.rule.on == ON_INPUT]
        # The tap an exception inside this module is blamed on: its output, else its input.
        blamed = next((h for h in hits if h.rule.on == ON_OUTPUT), hits[0])

        def pre(module, args):
            calls = self.calls.get(module_name, 0)
            self.calls[module_name] = calls + 1
            self.running.append((module, self._info(blamed, calls), calls))
            once = next((h for h in hits if not h.rule.stepped), None)
            if calls and once is not None:
                raise ProbeError(f"tap {once.name} ran {calls + 1} times in one run: its probe rule must be stepped")
            for hit in inputs:
                self._record(hit, self._info(hit, calls), args[0] if args else None, "input")

        return pre

    def _exit_hook(self, hits: list[ProbeHit]):
        outputs = [h for h in hits if h.rule.on == ON_OUTPUT]

        def post(module, args, output):
            # Entries above ours belong to tapped modules that raised and were caught
            # inside the model: they never finished, so they are dropped here.
            while self.running and self.running[-1][0] is not module:
                self.running.pop()
            calls = self.running[-1][2]
            for hit in outputs:
                value = output
                if hit.rule.select is not None and isinstance(output, (tuple, list)):
                    value = output[hit.rule.select]
                self._record(hit, self._info(hit, calls), value, "output")
            self.running.pop()  # only once recorded: a failure above is located at this tap

        return post

    def _record(self, hit: ProbeHit, info: TapInfo, value, side: str) -> None:
        if not self.select(info.name, info.key):
            return
        if not isinstance(value, torch.Tensor):
            raise TypeError(f"tap {info.key}: module {side} is {type(value).__name__}, not a tensor")
        if hit.chunk is not None:
            total = sum(size for _, size in hit.rule.split)
            if value.shape[-1] != total:
                raise ProbeError(f"tap {info.key}: last dimension {value.shape[-1]} does not match its split "
                                 f"({total})")
            value = value[..., hit.chunk[0]:hit.chunk[1]]
        # A device-side copy now (later in-place kernels cannot touch it; inside a CUDA
        # graph capture the copy is recorded into the graph), on its way to the host.
        staged = self.stager.stage(value)
        self.pending.append((info, self.order, staged, hit.rule.layout))
        self.staged_bytes += staged.nbytes
        self.order += 1
        if self.max_staged_bytes is not None and self.staged_bytes > self.max_staged_bytes \
                and not graph_capturing():
            # Over budget: wait for the oldest copies and hand them over (half the budget
            # at a time, so the wait is not paid on every later tap).
            try:
                self.flush(keep_bytes=self.max_staged_bytes // 2)
            except Exception as exc:  # noqa: BLE001 - raised again by capture(), outside the model
                self.sink_error = exc
                raise _SinkFailed() from None
        if self.on_record is not None:
            self.on_record(info)

    def error_from(self, exc: BaseException) -> CaptureError:
        info = self.running[-1][1] if self.running else None
        message = str(exc).strip().splitlines()[0] if str(exc).strip() else ""
        return CaptureError(key=info.key if info else None, info=info, exc_type=type(exc).__name__, message=message)


def capture(backend, sink=None, select: TapFilter | None = None, max_staged_bytes: int | None = None):
    """Run the backend once with taps installed; returns the sink (a new Capture by default).

    `max_staged_bytes` bounds the tap copies held between the model and the sink (None:
    all of them until the run ends).  An exception inside the model is a finding, not a
    crash: it is recorded in the sink with the tap component that was running.
    KeyboardInterrupt and friends propagate."""
    sink = sink if sink is not None else Capture(meta=dict(backend.meta))
    for name, layout in backend.layouts().items():
        sink.add_layout(name, layout)
    with Recorder(backend.model, backend.probe, sink, select, max_staged_bytes) as rec:
        try:
            backend.run()
        except _SinkFailed:
            pass
        except Exception as exc:  # noqa: BLE001 - the candidate's crash is what we report
            sink.set_error(rec.error_from(exc))
        finally:
            if rec.sink_error is None:
                rec.flush()  # every tap recorded before a stop reaches the sink
        if rec.sink_error is not None:
            raise rec.sink_error
    return sink
