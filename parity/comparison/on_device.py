"""Live compare on the device: the candidate's taps are judged as it produces them.

`parity diff --ref R --cand C` used to copy every tap of both runs to host memory and
diff there; at full size that is ~1 GB per forward through the PCIe bus and numpy.
Here the reference run stashes its taps on the device (clones; past a device budget,
in pinned host memory, on their way there without a host sync), and the candidate run
hands each tap to a comparer that reduces it against the reference tap on the device
(`device_sums`), keeping the few float64 sums per tap on the device until the end.
Both sinks use the capture's device-tensor protocol (`add_device_tap`), so no tap is
ever staged for the host.

The report is built by the same `loop.diff` loop as every other diff, over the two runs'
tap headers, with metrics finished by the host accumulator's code and verdicts by
`rules.judged`: the same report as the host path, up to float64 summation order.

`stop_at_first`: the comparer judges each tap as soon as its sums reach the host (the
transfer starts right after the tap; the forward is not stalled for it) and ends the
candidate run at the first failing tap it sees, a few taps after the divergence at most
on a GPU, at it on the CPU.
"""

from __future__ import annotations

import time
from dataclasses import dataclass

import numpy as np
import torch

from parity.capture.recorder import StopRun, capture
from parity.capture.staging import graph_capturing
from parity.comparison import device_sums
from parity.comparison.align import Refusal, align
from parity.comparison.device_sums import Reducer, group_metrics
from parity.comparison.host import compare_taps
from parity.comparison.loop import diff
from parity.comparison.rules import Thresholds, judged, refused
from parity.report.results import Report, TapResult
from parity.taps.codec import storage_dtype
from parity.taps.records import Capture, Tap, TapInfo


@dataclass(frozen=True)
class Header:
    """What the diff loop needs of a tap whose data stays on the device."""

    info: TapInfo
    order: int
    shape: tuple[int, ...]
    dtype: str
    layout: str | None

    @property
    def key(self) -> str:
        return self.info.key


def _header(info: TapInfo, order: int, value: torch.Tensor, layout: str | None) -> Header:
    return Header(info, order, tuple(value.shape), str(value.dtype).removeprefix("torch."), layout)


class _Sink:
    """What both sides share: layouts, the run's error, progress, and refusing host taps."""

    def __init__(self, meta: dict, progress=None, what: str = "", total: int | None = None) -> None:
        self.meta, self.layouts, self.error = meta, {}, None
        self.headers: list[Header] = []
        self.progress, self.what, self.total = progress, what, total

    def add_layout(self, name, layout) -> None:
        self.layouts[name] = layout

    def set_error(self, error) -> None:
        self.error = error

    def set_observation(self, observation: dict) -> None:
        """How observing changed the run (parity.capture.observation), kept in its meta as
        a host capture keeps it."""
        self.meta["observation"] = observation

    def add_tap(self, tap) -> None:
        raise TypeError("a live-compare sink takes taps as device tensors only")

    def tap_recorded(self, info) -> None:
        if self.progress is not None:
            self.progress(self.what, len(self.headers), self.total)

    def capture(self) -> Capture:
        """The run as a Capture of headers (the diff loop's input; no data in it)."""
        return Capture(taps=list(self.headers), layouts=dict(self.layouts), meta=self.meta, error=self.error)


class ReferenceStash(_Sink):
    """The reference run's sink: keeps a private copy of each tap for the candidate's
    compare.  Copies stay on the device up to `device_budget` bytes (None: no limit);
    past it they go to pinned host memory (asynchronously: no host sync in the forward)
    and come back to the device when compared."""

    def __init__(self, meta: dict, device_budget: int | None = None, progress=None, what: str = "") -> None:
        super().__init__(meta, progress, what)
        self.device_budget = device_budget
        self.tensors: dict[str, torch.Tensor] = {}
        self.spilled: set[str] = set()  # keys whose copy waits in pinned host memory
        self.by_key: dict[str, Header] = {}
        self.device_bytes = self.spilled_bytes = 0

    def add_device_tap(self, info: TapInfo, order: int, value: torch.Tensor, layout: str | None) -> None:
        header = _header(info, order, value, layout)
        self.headers.append(header)
        self.by_key[header.key] = header
        nbytes = value.numel() * value.element_size()
        if graph_capturing():  # recorded into the graph: the copy is made at each replay, on the device
            self.tensors[header.key] = value.clone()
            self.device_bytes += nbytes
            return
        if self.device_budget is None and value.device.type == "cuda":
            self.device_budget = torch.cuda.mem_get_info(value.device)[0] // 2
        over = self.device_budget is not None and self.device_bytes + nbytes > self.device_budget
        if value.device.type == "cuda" and over:
            kept = torch.empty(value.shape, dtype=value.dtype, pin_memory=True)
            kept.copy_(value, non_blocking=True)
            self.spilled_bytes += nbytes
            self.spilled.add(header.key)
        else:
            kept = value.clone()
            self.device_bytes += nbytes
        self.tensors[header.key] = kept

    def take(self, key: str) -> torch.Tensor | None:
        """The stashed tensor of `key`, forgotten here (each is compared once)."""
        tensor = self.tensors.pop(key, None)
        if tensor is not None and key not in self.spilled:
            self.device_bytes -= tensor.numel() * tensor.element_size()
        return tensor


class LiveComparer(_Sink):
    """The candidate run's sink: compares each tap with the stashed reference tap as it
    arrives.  Results are finished when the sums come back (`finish`), or as they come
    with `stop_at_first`, which ends the run (StopRun) at the first failing tap."""

    def __init__(self, stash: ReferenceStash, meta: dict, thresholds: Thresholds, exact_dtypes: bool,
                 chunk: int | None = None, stop_at_first: bool = False, progress=None, what: str = "",
                 max_taps: int | None = None, max_elements: int | None = None) -> None:
        super().__init__(meta, progress, what, total=len(stash.headers))
        self.stash, self.thresholds, self.exact_dtypes, self.chunk = stash, thresholds, exact_dtypes, chunk
        self.stop_at_first = stop_at_first
        self.reducer = Reducer(chunk, eager=stop_at_first, max_taps=max_taps or device_sums.DEFAULT_MAX_TAPS,
                               max_elements=max_elements)
        self.results: dict[str, TapResult] = {}
        self.aligned: dict[tuple, object] = {}
        self.deferred: list = []  # taps recorded inside a CUDA graph capture, compared after the run
        self.stopped_at: str | None = None

    def add_device_tap(self, info: TapInfo, order: int, value: torch.Tensor, layout: str | None) -> None:
        cand = _header(info, order, value, layout)
        self.headers.append(cand)
        if graph_capturing():
            # Inside a CUDA graph capture the tap holds values only once the graph replays
            # (after this run's capture): a copy is recorded into the graph and compared
            # when the run is over.  No early stop for such taps.
            self.deferred.append((cand, value.clone()))
            return
        self._compare(cand, value)

    def _compare(self, cand: Header, value: torch.Tensor) -> None:
        ref = self.stash.by_key.get(cand.key)
        ref_value = self.stash.take(cand.key)
        if ref is None or ref_value is None:
            return  # only in the candidate (or a repeated key): the diff loop says so
        threshold = self.thresholds.for_pair(ref.info.name, ref.key)
        signature = (ref.shape, cand.shape, ref.layout, cand.layout, ref.dtype, cand.dtype)
        a = self.aligned.get(signature)  # layers repeat their taps' signatures: align each once
        if a is None:
            a = align(ref, cand, self.stash.layouts, self.layouts)
            if not isinstance(a, Refusal):  # a refusal may name a layout the run has yet to define
                self.aligned[signature] = a
        if isinstance(a, Refusal):
            self._done(refused(ref, cand, threshold, a))
        elif value.numel() == 0:
            self._done(self._empty(ref, cand, threshold))
        else:
            plan = self.reducer.plan(a, ref, cand, value.device)
            self.reducer.add((ref, cand, threshold, a), plan, ref_value, value)
        if self.stop_at_first:
            for token, plan, rows in self.reducer.ready():
                self._done(self._judge(token, plan, rows))

    def _done(self, result: TapResult) -> None:
        self.results[result.key] = result
        if self.stop_at_first and not result.passed and self.stopped_at is None:
            self.stopped_at = result.key
            raise StopRun()

    def _judge(self, token, plan, rows: np.ndarray) -> TapResult:
        ref, cand, threshold, a = token
        total, regions, chunks, heads = group_metrics(rows, plan)
        return judged(ref, cand, a, threshold, self.exact_dtypes, total, regions, chunks, heads)

    def _empty(self, ref: Header, cand: Header, threshold: float) -> TapResult:
        """A tap pair with no elements: judged by the host code on empty arrays (no data)."""
        def empty(h: Header) -> Tap:
            return Tap(h.info, h.order, np.zeros(h.shape, storage_dtype(h.dtype)), h.dtype, h.layout)

        return compare_taps(empty(ref), empty(cand), self.stash.layouts, self.layouts, threshold,
                            self.exact_dtypes, self.chunk)

    def finish(self) -> None:
        """Reduce what is still queued and judge every compared tap (one transfer)."""
        deferred, self.deferred = self.deferred, []
        for cand, value in deferred:
            try:
                self._compare(cand, value)
            except StopRun:
                pass  # the run is over anyway
        for token, plan, rows in self.reducer.collect():
            result = self._judge(token, plan, rows)
            self.results.setdefault(result.key, result)
        self.stash.tensors.clear()  # taps the candidate never produced

    def compare(self, ref, cand, ref_layouts, cand_layouts, threshold, exact_dtypes=True, chunk=None) -> TapResult:
        """The diff loop's comparer: each pair's result, already computed."""
        return self.results[ref.key]


def diff_on_device(ref_backend, cand_backend, ref_meta: dict, cand_meta: dict, thresholds=None,
                   select=None, chunk: int | None = None, stop_at_first: bool = False, progress=None,
                   device_budget: int | None = None, around=None, phases: dict | None = None) -> Report:
    """Run the reference, stashing its taps on the device, then the candidate, comparing
    each tap as it comes; the Report of the pair.  `cand_backend` may be a function that
    builds the candidate (and `cand_meta` one that gives its meta): it is called only
    once the reference has run, so nothing the candidate patches while it is built (a
    library function replaced for speed) can change the reference's run.  `thresholds`
    may be a function of the built candidate too (a candidate declares its lossy parts).
    `around(backend, run)` wraps each run
    (the caller records layer calls for isolation with it).  `phases`, if given, gets the
    seconds each phase took (device synced between phases: for benchmarks only)."""
    around = around or (lambda backend, run: run())
    clock = _Phases(phases)

    def name(backend, meta):
        return meta.get("backend", backend.name)

    stash = ReferenceStash(ref_meta, device_budget, progress, f"reference {name(ref_backend, ref_meta)}")
    around(ref_backend, lambda: capture(ref_backend, stash, select))
    clock("reference_run")
    if callable(cand_backend):
        cand_backend = cand_backend()
    if callable(cand_meta):
        cand_meta = cand_meta(cand_backend)
    if callable(thresholds):
        thresholds = thresholds(cand_backend)
    thresholds = thresholds or Thresholds()
    exact = ref_meta.get("dtype") == cand_meta.get("dtype")
    comparer = LiveComparer(stash, cand_meta, thresholds, exact, chunk, stop_at_first, progress,
                            f"compare {name(cand_backend, cand_meta)}")
    around(cand_backend, lambda: capture(cand_backend, comparer, select))
    clock("candidate_run")
    comparer.finish()
    clock("finish")
    stopped = None
    if comparer.stopped_at is not None:
        stopped = f"at the first divergence, {comparer.stopped_at} (--stop-at-first)"
    report = diff(stash.capture(), comparer.capture(), thresholds, exact_dtypes=exact, compare=comparer.compare,
                  chunk=chunk, stopped=stopped)
    clock("report")
    return report


class _Phases:
    """Adds each phase's seconds to a dict, syncing the device first (or does nothing)."""

    def __init__(self, into: dict | None) -> None:
        self.into = into
        self.t0 = time.perf_counter() if into is not None else 0.0

    def __call__(self, phase: str) -> None:
        if self.into is None:
            return
        if torch.cuda.is_available():
            torch.cuda.synchronize()
        now = time.perf_counter()
        self.into[phase] = self.into.get(phase, 0.0) + now - self.t0
        self.t0 = now
