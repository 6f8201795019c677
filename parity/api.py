"""The library's front door: capture, diff and gate as functions returning result objects.

The CLI is a thin shell over these; a user's own test suite can call them directly.
Input problems (unknown backend, bad dump, incomparable runs, an output that cannot be
written) raise `InputError`; an interrupted capture raises `CaptureInterrupted`."""

from __future__ import annotations

import datetime as _dt
from dataclasses import replace
from pathlib import Path
from typing import Any, Callable, Iterable, Mapping

from parity.capture.background import DEFAULT_MAX_INFLIGHT_MB, BackgroundWriter, InflightBudget
from parity.comparison.dumps import check_comparable, diff_dumps, incomplete_error, open_checked, select_taps  # noqa: F401
from parity.comparison.dumps import select_taps as _select
from parity.comparison.loop import diff
from parity.comparison.rules import Thresholds
from parity.comparison.stats import diff_stats
from parity.dump.format import DumpError
from parity.dump.reader import read_dump
from parity.dump.writer import DumpWriter

# the offline diff lives in its own module, light to import; these are part of this API too
from parity.errors import InputError
from parity.report.results import FramesResult, Report, StatsReport, WeightsReport
from parity.taps.backends import Backend, BackendError, BackendOptions
from parity.taps.probe import tap_filter
from parity.taps.records import Capture
from parity.taps.stats import StatsCapture


class CaptureInterrupted(KeyboardInterrupt):
    """Ctrl-C (or SIGTERM, in the CLI) stopped a capture to a dump.

    A KeyboardInterrupt, so code that catches those still does; it says what was kept:
    `written` is True when `path` now holds the `taps` written before the stop, marked
    incomplete."""

    def __init__(self, path: str, taps: int, written: bool) -> None:
        self.path, self.taps, self.written = path, taps, written
        kept = f"{path} holds the {taps} taps written before the stop, marked incomplete" if written \
            else "nothing was written"
        super().__init__(f"capture interrupted: {kept}")


def _now() -> str:
    return _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds")


def _meta(backend: Backend, taps: str | None) -> dict:
    """A run's metadata: the backend's own, when and what was captured, and which module
    each tap observes (so reports can point back at the code, e.g. in Model Explorer)."""
    meta = {**backend.meta, "created": _now(), "taps": taps or "*"}
    if "modules" not in meta and hasattr(backend.model, "named_modules"):
        meta["modules"] = backend.probe.modules(backend.model)
    return meta


ProgressFn = Callable[[str, int, "int | None"], None]  # (what, done, total or None)


def _build(spec: str | Backend, options: BackendOptions) -> Backend:
    if isinstance(spec, Backend):
        return spec
    from parity.taps.backends import resolve  # the factories import torch; keep it off the offline path

    try:
        return resolve(spec, options)
    except BackendError as exc:
        raise InputError(str(exc)) from None


def capture_live(spec: str | Backend, options: BackendOptions, taps: str | None = None,
                 progress: ProgressFn | None = None) -> Capture:
    """Run a backend (a spec, or a ready Backend) once and keep every selected tap in memory."""
    from parity.capture.recorder import capture

    select = _select(taps)
    backend = _build(spec, options)
    sink = Capture(meta=_meta(backend, taps))
    return capture(backend, _Counting(sink, progress, f"capture {backend.meta.get('backend', backend.name)}"),
                   select).sink


def capture_to_dump(spec: str | Backend, options: BackendOptions, path: str | Path, taps: str | None = None,
                    compression: str | None = None, progress: ProgressFn | None = None,
                    max_inflight_mb: float = DEFAULT_MAX_INFLIGHT_MB) -> dict:
    """Run a backend once, streaming taps into an HDF5 dump; returns a short summary.

    A writer thread writes while the model runs.  `max_inflight_mb` bounds the tap
    copies between the model and the disk: half for copies staged on their way to the
    host, half for host copies queued for the writer; past it the capture waits.

    The dump is written as `<path>.partial` and renamed when closed: a disk that fills
    up raises InputError and leaves no file; Ctrl-C raises CaptureInterrupted and leaves
    `path` readable, marked incomplete; a killed process leaves `<path>.partial`."""
    from parity.capture.recorder import capture

    if not max_inflight_mb > 0:
        raise InputError(f"--max-inflight-mb must be positive, got {max_inflight_mb}")
    select = _select(taps)
    half = max(1, int(max_inflight_mb * (1 << 20)) // 2)
    budget = InflightBudget(half)
    writer = None
    try:
        backend = _build(spec, options)
        meta = _meta(backend, taps)
        try:
            Path(path).parent.mkdir(parents=True, exist_ok=True)
        except OSError as exc:
            raise InputError(f"{path}: cannot create its directory: {exc.strerror or exc}") from None
        with DumpWriter(path, meta, compression=compression) as writer:
            with BackgroundWriter(writer, budget) as queued:
                counter = _Counting(queued, progress, f"capture {backend.meta.get('backend', backend.name)}")
                capture(backend, counter, select, max_staged_bytes=half)
    except KeyboardInterrupt:
        taps_written = writer.tap_count if writer is not None else 0
        raise CaptureInterrupted(str(path), taps_written, writer is not None and writer.written) from None
    except DumpError as exc:
        raise InputError(str(exc)) from None
    except ValueError as exc:  # the dump refused what the backend produced (e.g. a tap name with NUL)
        raise InputError(f"{path}: {exc}") from None
    return {"path": str(path), "taps": counter.count, "error": counter.error,
            "peak_queued_bytes": budget.peak, "budget_waits": budget.waits}


class _Counting:
    """Passes taps to a sink and remembers how many went through and whether it raised;
    reports progress, if asked: each tap as the model produces it (`tap_recorded`, called
    by the Recorder during the run), then each as it is stored (`add_tap`, after the run)."""

    def __init__(self, sink, progress: ProgressFn | None = None, what: str = "capture"):
        self.sink, self.count, self.recorded, self.error = sink, 0, 0, None
        self.progress, self.what = progress, what

    def add_layout(self, name, layout):
        self.sink.add_layout(name, layout)

    def tap_recorded(self, info):
        self.recorded += 1
        if self.progress is not None:
            self.progress(self.what, self.recorded, None)

    def add_tap(self, tap):
        self.count += 1
        self.sink.add_tap(tap)
        if self.progress is not None:
            self.progress(f"{self.what} (store)", self.count, self.recorded or None)

    def set_error(self, error):
        self.error = error
        self.sink.set_error(error)

    def set_observation(self, observation):
        if callable(getattr(self.sink, "set_observation", None)):
            self.sink.set_observation(observation)


def load_dump(path: str | Path, allow_incomplete: bool = False) -> Capture:
    """Read a whole dump; InputError if it is unreadable, or incomplete and not allowed."""
    try:
        cap = read_dump(path)
    except DumpError as exc:
        raise InputError(str(exc)) from None
    if not cap.complete and not allow_incomplete:
        raise incomplete_error(path, cap.error, len(cap.taps))
    return cap


def compare_captures(ref: Capture, cand: Capture, thresholds: Thresholds | None = None,
                     taps: str | None = None, progress: ProgressFn | None = None, chunk: int | None = None,
                     labels: tuple[str, str] = ("reference", "candidate")) -> Report:
    check_comparable(ref, cand)
    if taps:
        keep = _select(taps)
        ref, cand = ref.only(keep), cand.only(keep)
    tick = None if progress is None else (lambda done, total: progress("diff", done, total))
    return diff(ref, cand, thresholds, progress=tick, chunk=chunk, labels=labels)


def diff_live(ref: str | Backend, cand: str | Backend, options: BackendOptions, faults: tuple[str, ...] = (),
              thresholds: Thresholds | None = None, taps: str | None = None,
              progress: ProgressFn | None = None, isolate: bool = True, chunk: int | None = None,
              on_device: bool = True, stop_at_first: bool = False, ref_device_mb: float | None = None) -> Report:
    """Build both backends from the same options (same weights, inputs and noise), inject
    `faults` into the candidate only, run both and compare.  With `isolate`, a failing
    diff re-runs the first failing component on the reference's inputs and walks
    upstream to the component that introduces the error (`report.localisation`).

    `on_device` (default): compare on the device as the candidate produces each tap
    (parity.live; no tap is copied to the host), the reference's taps kept on the device
    up to `ref_device_mb` (None: half the free device memory) and in pinned host memory
    past it.  Otherwise
    both runs are captured to host memory and diffed there.  `stop_at_first` (on-device
    only) ends the candidate run at the first failing tap."""
    from dataclasses import replace

    if stop_at_first and not on_device:
        raise InputError("--stop-at-first needs the on-device compare (drop --host-compare)")
    if ref_device_mb is not None and not ref_device_mb >= 0:
        raise InputError(f"--ref-device-mb must be 0 or more, got {ref_device_mb}")
    ref_backend = _build(ref, replace(options, faults=()))
    cand_backend = _build(cand, replace(options, faults=tuple(faults)))
    logs: list = []  # the layer calls of each run (reference, candidate), for isolation
    if on_device:
        from parity.comparison.on_device import diff_on_device

        ref_meta, cand_meta = _meta(ref_backend, taps), _meta(cand_backend, taps)
        check_comparable(Capture(meta=ref_meta), Capture(meta=cand_meta))
        select = _select(taps)

        def around(backend, run):
            sink, log = _recording(backend, isolate, run)
            logs.append(log)
            return sink

        budget = None if ref_device_mb is None else int(ref_device_mb * (1 << 20))
        report = diff_on_device(ref_backend, cand_backend, ref_meta, cand_meta, thresholds, select, chunk,
                                stop_at_first, progress, budget, around)
    else:
        ref_cap, ref_log = _capture_recording(ref_backend, options, taps, progress, isolate)
        cand_cap, cand_log = _capture_recording(cand_backend, options, taps, progress, isolate)
        logs = [ref_log, cand_log]
        report = compare_captures(ref_cap, cand_cap, thresholds, progress=progress, chunk=chunk)
    if isolate and report.first_divergence is not None:
        report.localisation = localise_live(report, ref_backend, cand_backend, thresholds,
                                            tuple(logs))
    return report


def _capture_recording(backend: Backend, options: BackendOptions, taps, progress, record: bool):
    """A capture, and (when asked and the model allows) the layer calls of the same run,
    so isolating needs no second run."""
    return _recording(backend, record, lambda: capture_live(backend, options, taps, progress))


def _recording(backend: Backend, record: bool, run: Callable[[], Any]):
    """(run(), the layer calls it made or None): `run` is one tapped run of `backend`
    returning its sink; the calls are recorded when asked and the model allows."""
    if not record or getattr(backend.probe, "components", None) is None:
        return run(), None
    from parity.comparison.isolate import CallRecorder

    if not CallRecorder.reusable(backend):
        return run(), None
    with CallRecorder(backend) as rec:
        sink = run()
    error = None if sink.error is None else f"{sink.error.exc_type}: {sink.error.message}"
    return sink, rec.log(error)


def localise_live(report: Report, ref_backend: Backend, cand_backend: Backend,
                  thresholds: Thresholds | None = None, logs=(None, None)):
    """Which component introduces the report's first divergence (a Localisation)."""
    from parity.comparison.isolate import IsolationError, Isolator
    from parity.comparison.localise import localise
    from parity.report.results import Localisation

    try:
        return localise(report, Isolator(ref_backend, cand_backend, thresholds,
                                         report.thresholds.get("exact_dtypes"), logs))
    except IsolationError as exc:
        return Localisation(note=str(exc))


def isolate_component(ref: str | Backend, cand: str | Backend, options: BackendOptions, stack: str, layer: int,
                      part: str, step: int | None = None, faults: tuple[str, ...] = (),
                      thresholds: Thresholds | None = None):
    """Run one component (`part` of `stack` layer `layer`, at denoise `step`) of the
    reference and of the candidate on the reference's own inputs and compare the outputs
    (a PartResult, truthy via `.passed`).  Bad requests raise InputError."""
    from dataclasses import replace

    from parity.comparison.isolate import IsolationError, Isolator, Unit

    ref_backend = _build(ref, replace(options, faults=()))
    cand_backend = _build(cand, replace(options, faults=tuple(faults)))
    try:
        isolator = Isolator(ref_backend, cand_backend, thresholds)
        if step is None and stack in isolator.ref_adapter.stepped:
            step = 0
        if step is not None and stack not in isolator.ref_adapter.stepped:
            raise IsolationError(f"stack {stack} runs once per inference: --step applies to "
                                 f"{', '.join(sorted(isolator.ref_adapter.stepped))}")
        result = isolator.isolate(Unit(stack, layer, step, part))
    except IsolationError as exc:
        raise InputError(str(exc)) from None
    result.ref_meta, result.cand_meta = isolator.ref.meta, isolator.cand.meta
    return result


def make_thresholds(min_cos: float = 0.999,
                    thresholds: Thresholds | Mapping[str, float] | Iterable[str] | None = None) -> Thresholds:
    """Thresholds from the forms a caller naturally has: a Thresholds, {glob: min_cos},
    or ["glob=min_cos", ...] (later patterns win)."""
    if isinstance(thresholds, Thresholds):
        return thresholds
    try:
        if thresholds is None:
            return Thresholds(min_cos)
        if isinstance(thresholds, Mapping):
            return Thresholds(min_cos, tuple((str(g), float(v)) for g, v in thresholds.items()))
        if isinstance(thresholds, str):
            thresholds = [thresholds]
        return Thresholds.parse(min_cos, list(thresholds))
    except (TypeError, ValueError) as exc:
        raise InputError(str(exc)) from None


def compare(ref: str | Backend, cand: str | Backend, inputs: Any = None, *, seed: int = 0, batch: int = 1,
            device: str = "auto", dtype: str | None = None, padding: str | None = None, seq_len: int | None = None,
            min_cos: float = 0.999, thresholds: Thresholds | Mapping[str, float] | Iterable[str] | None = None,
            taps: str | None = None, faults: Iterable[str] = (), config: str | None = None,
            weights: str | None = None, progress: ProgressFn | None = None, stop_at_first: bool = False,
            on_device: bool = True) -> Report:
    """Run a reference and a candidate on the same inputs and compare them tap by tap.

    `ref` and `cand` are backend specs (`"hf:./m@attn=eager"`, `"pytorch"`,
    `"pkg.mod:factory"`) or ready `Backend` objects.  `inputs` is a token-id file
    (.json/.npy), token rows, or a dict with input_ids/attention_mask; None draws them
    from `seed`.  `config` and `weights` (a checkpoint path) are for backends that build
    their own model, like the bundled pi0.5 ones; None = the backend's default.  The
    returned Report is truthy when every tap passed; its `first_divergence` names the
    earliest failing tap.  The two runs are compared on the device as the candidate runs
    (`on_device=False`: both captured to host memory and diffed there); `stop_at_first`
    ends the candidate run at the first failing tap.  Bad requests raise InputError.

        report = parity.compare("hf:./m@attn=eager", "hf:./m@attn=sdpa", batch=3, padding="left")
        assert report, report.first_divergence
    """
    try:
        options = BackendOptions(config=config, seed=seed, device=device, dtype=dtype, batch=batch,
                                 weights=weights, inputs=inputs, padding=padding, seq_len=seq_len)
    except ValueError as exc:
        raise InputError(str(exc)) from None
    return diff_live(ref, cand, options, tuple(faults), make_thresholds(min_cos, thresholds), taps, progress,
                     on_device=on_device, stop_at_first=stop_at_first)


def weights_live(ref: str | Backend, cand: str | Backend, options: BackendOptions, faults: tuple[str, ...] = (),
                 thresholds: Thresholds | None = None, quantized_min_cos: float | None = None) -> WeightsReport:
    """Build both backends from the same options (the same `--weights` file or seed),
    inject `faults` into the candidate only, and compare the parameters each computes with."""
    from dataclasses import replace

    from parity.comparison.weights import DEFAULT_QUANTIZED_MIN_COS, compare_weights, model_parameters

    sides = []
    for spec, side_faults in ((ref, ()), (cand, tuple(faults))):
        backend = _build(spec, replace(options, faults=side_faults))
        try:
            params = backend.parameters() if backend.parameters is not None else model_parameters(backend.model)
        except ValueError as exc:
            raise InputError(f"backend {spec!r}: {exc}") from None
        sides.append((params, backend.meta))
    (ref_params, ref_meta), (cand_params, cand_meta) = sides
    q = DEFAULT_QUANTIZED_MIN_COS if quantized_min_cos is None else quantized_min_cos
    try:
        return compare_weights(ref_params, cand_params, thresholds, q, ref_meta, cand_meta)
    except ValueError as exc:
        raise InputError(str(exc)) from None


def compare_frames(ref: str, cand: str, options: BackendOptions, n_frames: int, faults: tuple[str, ...] = (),
                   thresholds: Thresholds | None = None, taps: str | None = None,
                   drift_taps: str | None = "prefix.*.k") -> FramesResult:
    """Frame f of both backends sees observation f (same prompt, new images and state);
    faults go to the candidate only.  Drift compares the reference's consecutive frames."""
    if n_frames < 1:
        raise ValueError("need at least one frame")
    reports, drift, previous = [], [], None
    for frame in range(n_frames):
        opts = replace(options, frame=frame)
        ref_cap = capture_live(ref, replace(opts, faults=()), taps)
        cand_cap = capture_live(cand, replace(opts, faults=tuple(faults)), taps)
        reports.append(compare_captures(ref_cap, cand_cap, thresholds))
        current = ref_cap.only(tap_filter(drift_taps)) if drift_taps else ref_cap
        if previous is not None:  # different inputs by design: no fingerprint check here
            drift.append(diff(previous, current, Thresholds(1.0)))
        previous = current
    return FramesResult(reports, drift)


def stats_live(spec: str | Backend, options: BackendOptions, taps: str | None = None,
               progress: ProgressFn | None = None) -> StatsCapture:
    """Run a backend once and summarise every selected tap on its device (nothing but
    the summaries reaches the host)."""
    stats, interrupted = _run(spec, options, taps, progress)
    if interrupted:
        raise KeyboardInterrupt
    return stats


def _run(spec, options, taps, progress) -> tuple[StatsCapture, bool]:
    """(summaries, interrupted): Ctrl-C ends the run early, keeping what was summarised."""
    from parity.capture.recorder import capture
    from parity.capture.stats import StatsSink

    select = select_taps(taps)
    backend = _build(spec, options)
    what = f"stats {backend.meta.get('backend', backend.name)}"
    tick = None if progress is None else (lambda done: progress(what, done, None))
    sink = StatsSink(meta={**_meta(backend, taps), "stats": True}, progress=tick)
    try:
        capture(backend, sink, select)
    except KeyboardInterrupt:
        return sink.finish(complete=False), True
    return sink.finish(), False


def capture_stats(spec: str | Backend, options: BackendOptions, path: str | Path, taps: str | None = None,
                  progress: ProgressFn | None = None) -> dict:
    """Run a backend once, summarising each tap on the device, and write a stats dump
    (via `<path>.partial`, renamed when written); returns a short summary."""
    from parity.dump.stats import write_stats

    try:
        Path(path).parent.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise InputError(f"{path}: cannot create its directory: {exc.strerror or exc}") from None
    stats, interrupted = _run(spec, options, taps, progress)
    try:
        write_stats(path, stats)
    except DumpError as exc:
        raise InputError(str(exc)) from None
    except ValueError as exc:
        raise InputError(f"{path}: {exc}") from None
    if interrupted:
        raise CaptureInterrupted(str(path), len(stats.taps), True)
    return {"path": str(path), "taps": len(stats.taps), "error": stats.error}


def load_stats(path: str | Path, allow_incomplete: bool = False) -> StatsCapture:
    """A stats dump's summaries; InputError if unreadable, or incomplete and not allowed."""
    from parity.dump.stats import read_stats

    try:
        stats = read_stats(path)
    except DumpError as exc:
        raise InputError(str(exc)) from None
    if not stats.complete and not allow_incomplete:
        raise incomplete_error(path, stats.error, len(stats.taps))
    return stats


def compare_stats_runs(ref: StatsCapture, cand: StatsCapture, tol: Thresholds | None = None,
                       taps: str | None = None, labels: tuple[str, str] = ("reference", "candidate")) -> StatsReport:
    check_comparable(ref, cand)
    if taps:
        keep = select_taps(taps)
        ref, cand = ref.only(keep), cand.only(keep)
    return diff_stats(ref, cand, tol, labels)


def diff_stats_dumps(ref_path, cand_path, tol: Thresholds | None = None, taps: str | None = None,
                     allow_incomplete: bool = False) -> StatsReport:
    """Offline diff of two stats dumps (no torch)."""
    ref, cand = load_stats(ref_path, allow_incomplete), load_stats(cand_path, allow_incomplete)
    return compare_stats_runs(ref, cand, tol, taps, (f"reference {ref_path}", f"candidate {cand_path}"))


def diff_stats_live(ref: str | Backend, cand: str | Backend, options: BackendOptions, faults: tuple[str, ...] = (),
                    tol: Thresholds | None = None, taps: str | None = None,
                    progress: ProgressFn | None = None) -> StatsReport:
    """Both backends from the same options (faults in the candidate only), each run once
    and summarised on its device, then compared."""
    ref_stats = stats_live(_build(ref, replace(options, faults=())), options, taps, progress)
    cand_stats = stats_live(_build(cand, replace(options, faults=tuple(faults))), options, taps, progress)
    return compare_stats_runs(ref_stats, cand_stats, tol)
