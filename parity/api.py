"""The library's front door: capture, diff and gate as functions returning result objects.

The CLI is a thin shell over these; a user's own test suite can call them directly, and
is refused exactly what the CLI refuses.  Every rule of a request lives here: which of
the five diffs runs (`run_diff`), which flags go together, the ranges of the numbers,
the files a request reads and writes.  Input problems (unknown backend, bad dump,
incomparable runs, flags that do not go together, an output that cannot be written)
raise `InputError` with a one-line message naming the flag as the CLI spells it; an
interrupted capture raises `CaptureInterrupted`."""

from __future__ import annotations

import contextlib
import datetime as _dt
import json
import os
import stat
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

from parity.capture.background import DEFAULT_MAX_INFLIGHT_MB, BackgroundWriter, InflightBudget

# the offline diff lives in its own module, light to import; these are part of this API too
from parity.comparison.dumps import check_comparable, incomplete_error, open_checked, select_taps  # noqa: F401
from parity.comparison.dumps import diff_dumps as _diff_dumps
from parity.comparison.dumps import select_taps as _select
from parity.comparison.loop import diff
from parity.comparison.rules import Thresholds
from parity.comparison.stats import DEFAULT_TOLERANCE, diff_stats, tolerances
from parity.dump.format import DumpError
from parity.dump.reader import read_dump
from parity.dump.writer import DumpWriter
from parity.errors import InputError
from parity.report.results import (
    REPORT_FORMAT,
    STATS_REPORT_FORMAT,
    FramesResult,
    Report,
    StatsReport,
    WeightsReport,
    load_result,
)
from parity.settings import DEFAULT_OUTPUT_DIR, Settings, ThresholdsArg, merge
from parity.taps.backends import Backend, BackendError, BackendOptions
from parity.taps.probe import Probe, tap_filter
from parity.taps.records import Capture, CaptureError
from parity.taps.stats import StatsCapture


class CaptureInterrupted(KeyboardInterrupt):
    """Ctrl-C (or SIGTERM, in the CLI) stopped a capture to a dump.

    A KeyboardInterrupt, so code that catches those still does; it says what was kept:
    `written` is True when `path` now holds the `taps` written before the stop, marked
    incomplete; `kept` names the file that was at the output path already, left as it was
    (`path` is then beside it: an incomplete capture never replaces a file)."""

    def __init__(self, path: str, taps: int, written: bool, kept: str | None = None) -> None:
        self.path, self.taps, self.written, self.kept = path, taps, written, kept
        what = f"{path} holds the {taps} taps written before the stop, marked incomplete" if written \
            else "nothing was written"
        if kept is not None:
            what += f"; {kept} was left as it was"
        super().__init__(f"capture interrupted: {what}")


def _now() -> str:
    return _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds")


def _meta(backend: Backend, taps: str | None) -> dict:
    """A run's metadata: the backend's own, when and what was captured, and which module
    each tap observes (so reports can point back at the code, e.g. in Model Explorer)."""
    meta = {**backend.meta, "created": _now(), "taps": taps or "*"}
    if "modules" not in meta and hasattr(backend.model, "named_modules"):
        meta["modules"] = backend.probe.modules(backend.model)
    if getattr(backend, "sharding", None):
        meta["sharding"] = {glob: dict(spec) for glob, spec in dict(backend.sharding).items()}
    meta.update(distributed())
    return meta


def distributed() -> dict:
    """This process's place in a torch.distributed job ({} outside one): rank, world size
    and the process group's backend, for a dump written per rank.  Read from the default
    group's state only; nothing is communicated (no synchronisation added to any run)."""
    import sys

    dist = sys.modules.get("torch.distributed")  # a job that uses it has imported it
    if dist is None or not dist.is_available() or not dist.is_initialized():
        return {}
    return {"rank": int(dist.get_rank()), "world_size": int(dist.get_world_size()),
            "dist_backend": str(dist.get_backend())}


def rank_path(path: str | Path, place: dict) -> Path:
    """Where this rank's dump goes: `{rank}` in the path replaced by the rank, else, in a
    job of more than one rank, `-rank<N>` before the suffix (`cand.h5` -> `cand-rank3.h5`),
    so ranks never write one file."""
    path = Path(path)
    if "rank" not in place:
        return path
    if "{rank}" in str(path):
        return Path(str(path).replace("{rank}", str(place["rank"])))
    if place.get("world_size", 1) > 1:
        return path.with_name(f"{path.stem}-rank{place['rank']}{path.suffix}")
    return path


ProgressFn = Callable[[str, int, "int | None"], None]  # (what, done, total or None)


def _check_specs(ref, cand, faults: tuple[str, ...]) -> None:
    """Both specs and the candidate's faults checked before anything runs: a typo in
    --cand or --inject fails at once, not after the reference's run."""
    from parity.taps.backends import check

    for spec, planted in ((ref, ()), (cand, faults)):
        if isinstance(spec, str):
            try:
                check(spec, planted)
            except BackendError as exc:
                raise InputError(str(exc)) from None


def _build(spec: str | Backend, options: BackendOptions) -> Backend:
    if isinstance(spec, Backend):
        return spec
    from parity.taps.backends import resolve  # the factories import torch; keep it off the offline path

    try:
        return resolve(spec, options)
    except BackendError as exc:
        raise InputError(str(exc)) from None


def backend_options(**given: Any) -> BackendOptions:
    """BackendOptions from what a user gave (None = the default; a path is kept as its
    string; faults may be "a,b" strings); InputError if one is out of range."""
    if "faults" in given:
        given["faults"] = fault_names(given["faults"])
    check_device(given.get("device"))
    try:
        return BackendOptions.given(**given)
    except ValueError as exc:
        raise InputError(str(exc)) from None


def check_device(device: Any) -> None:
    """--device: None or auto, else a device torch knows, present on this machine, that
    holds values (not meta, which has shapes only); InputError saying which it is not."""
    if device is None or device == "auto":
        return
    usage = "give cpu, cuda, cuda:N or auto"
    if not isinstance(device, str):
        raise InputError(f"--device {device!r}: {usage}")
    import torch  # a live run's option: torch is needed anyway

    try:
        parsed = torch.device(device)
    except (RuntimeError, TypeError, ValueError):
        raise InputError(f"--device {device!r} is not a device: {usage}") from None
    if parsed.type == "meta":
        raise InputError(f"--device meta holds shapes, no values: nothing could be compared; {usage}")
    if parsed.type == "cpu":
        return
    module = getattr(torch, parsed.type, None)
    if not callable(getattr(module, "is_available", None)):
        raise InputError(f"--device {device}: this torch cannot run models on {parsed.type}; {usage}")
    if not module.is_available():
        raise InputError(f"--device {device}: no {parsed.type} device is available here")
    count = getattr(module, "device_count", None)
    if parsed.index is not None and callable(count) and parsed.index >= count():
        raise InputError(f"--device {device}: this machine has {count()} {parsed.type} device(s)")


def fault_names(faults: Iterable[str] | str | None) -> tuple[str, ...]:
    """Fault names from NAME[,NAME] items (`--inject a,b --inject c`)."""
    if isinstance(faults, str):
        faults = [faults]
    return tuple(n.strip() for item in faults or () for n in str(item).split(",") if n.strip())


def _check_chunk(chunk: int | None) -> None:
    if chunk is not None and (isinstance(chunk, bool) or not isinstance(chunk, int) or chunk < 1):
        raise InputError(f"--by-token must be 1 or more, got {chunk}")


def _check_live_flags(on_device: bool, stop_at_first: bool, ref_device_mb: float | None) -> None:
    if stop_at_first and not on_device:
        raise InputError("--stop-at-first needs the on-device compare (drop --host-compare)")
    if ref_device_mb is not None and not ref_device_mb >= 0:
        raise InputError(f"--ref-device-mb must be 0 or more, got {ref_device_mb}")


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
    `path` readable, marked incomplete; a killed process leaves `<path>.partial`.  An
    incomplete dump (interrupted, or the backend raised) never replaces a file already at
    `path`: it goes to `<path>.incomplete`, and the summary's `path` and `kept` say so."""
    from parity.capture.recorder import capture

    if not max_inflight_mb > 0:
        raise InputError(f"--max-inflight-mb must be positive, got {max_inflight_mb}")
    path = rank_path(path, distributed())  # one dump per rank under torch.distributed
    check_dump_path(path)
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
        with DumpWriter(path, meta, compression=compression) as writer, BackgroundWriter(writer, budget) as queued:
            counter = _Counting(queued, progress, f"capture {backend.meta.get('backend', backend.name)}")
            capture(backend, counter, select, max_staged_bytes=half)
    except KeyboardInterrupt:
        taps_written = writer.tap_count if writer is not None else 0
        if writer is None or not writer.written:
            raise CaptureInterrupted(str(path), taps_written, False) from None
        raise CaptureInterrupted(writer.final_path, taps_written, True, writer.kept) from None
    except DumpError as exc:
        raise InputError(str(exc)) from None
    except ValueError as exc:  # the dump refused what the backend produced (e.g. a tap name with NUL)
        raise InputError(f"{path}: {exc}") from None
    return {"path": writer.final_path, "kept": writer.kept, "taps": counter.count, "error": counter.error,
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


def diff_dumps(ref_path, cand_path, thresholds: Thresholds | None = None, taps: str | None = None,
               allow_incomplete: bool = False, progress: ProgressFn | None = None, chunk: int | None = None) -> Report:
    """Offline diff of two dumps (no torch), streamed: memory does not grow with the dumps
    (parity.comparison.dumps.diff_dumps, with the request checked first).  What either
    dump's reader notes (a stale `.partial` beside it) joins the report's warnings.  A
    `cand_path` that is a glob ('cand-rank*.h5', no file by that very name) is a sharded
    candidate, one dump per rank: `parity.comparison.sharded.diff_sharded`."""
    import glob

    from parity.dump.reader import dump_notes, read_meta

    _check_chunk(chunk)
    if glob.has_magic(os.fspath(cand_path)) and not os.path.exists(cand_path):
        from parity.comparison.sharded import diff_sharded

        return diff_sharded(ref_path, cand_path, thresholds, taps, allow_incomplete, progress, chunk)
    metas = read_meta(ref_path), read_meta(cand_path)
    if None not in metas:  # an unreadable dump: the reader says why
        check_declared_dtypes(*metas, labels=(str(ref_path), str(cand_path)))
    report = _diff_dumps(ref_path, cand_path, thresholds, taps, allow_incomplete, progress, chunk)
    report.warnings.extend(dump_notes(ref_path) + dump_notes(cand_path))
    return report


def diff_distributed(ref: str | Backend, cand: str, options: BackendOptions, world: int, *,
                     thresholds: Thresholds | None = None, taps: str | None = None, dist_backend: str = "gloo",
                     folder: str | Path | None = None) -> Report:
    """A distributed candidate, live: the reference runs here to a dump, then `cand` (a
    spec, "pkg.mod:factory[:ARG]", whose factory shards itself by its rank) runs as a
    `world`-rank torch.distributed job (`dist_backend` gloo on the CPU, nccl with one GPU
    per rank), one dump per rank, and the ranks are unsharded against the reference
    (`parity.comparison.sharded`).  `folder` keeps the dumps (None: a temporary folder,
    removed afterwards).  Judged by `thresholds` (None: the fixed defaults; dumps have no
    oracle).  InputError for a bad request, or a rank that failed."""
    import tempfile

    import torch.multiprocessing as mp

    from parity.comparison.sharded import diff_sharded

    if isinstance(world, bool) or not isinstance(world, int) or world < 1:
        raise InputError(f"world size must be 1 or more, got {world!r}")
    if not isinstance(cand, str):
        raise InputError("a distributed candidate is named by a spec (pkg.mod:factory[:ARG]): each rank builds it")
    if dist_backend not in ("gloo", "nccl"):
        raise InputError(f"dist backend must be gloo or nccl, not {dist_backend!r}")
    _check_specs(ref, cand, tuple(options.faults))
    with contextlib.ExitStack() as stack:
        where = Path(folder) if folder is not None else Path(stack.enter_context(tempfile.TemporaryDirectory()))
        capture_to_dump(ref, replace(options, faults=()), where / "ref.h5", taps)
        try:  # a fresh interpreter per rank: the candidate is built there, from its spec
            mp.start_processes(_distributed_rank, args=(world, _free_port(), cand, options, str(where), taps,
                                                        dist_backend), nprocs=world, join=True, start_method="spawn")
        except Exception as exc:  # noqa: BLE001 - a rank's failure, in one line
            text = next((line.strip() for line in str(exc).splitlines() if line.strip()), type(exc).__name__)
            raise InputError(f"the distributed candidate {cand!r} failed on a rank: {text}") from None
        return diff_sharded(where / "ref.h5", str(where / "cand-rank*.h5"), thresholds, taps)


def _free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _distributed_rank(rank: int, world: int, port: int, spec: str, options: BackendOptions, folder: str,
                      taps: str | None, dist_backend: str) -> None:
    """One rank of `diff_distributed`'s job: join the group, build the candidate from its
    spec (its factory shards itself by the rank), capture it to this rank's dump."""
    import torch
    import torch.distributed as dist

    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    if dist_backend == "nccl":
        torch.cuda.set_device(rank)
        options = replace(options, device=f"cuda:{rank}")
    dist.init_process_group(dist_backend, rank=rank, world_size=world)
    try:
        # `{rank}` names every rank's dump, a job of one rank too (the diff reads cand-rank*.h5)
        capture_to_dump(spec, options, Path(folder) / "cand-rank{rank}.h5", taps)
        # every rank done before any tears the group down: a rank leaving while a peer still
        # finishes its last collective can abort the peer (gloo); not after a failure, when
        # the peers may never arrive (the job ends on the failed rank instead)
        dist.barrier()
    finally:
        dist.destroy_process_group()


def check_declared_dtypes(ref_meta: dict, cand_meta: dict,
                          labels: tuple[str, str] = ("the reference", "the candidate")) -> None:
    """InputError unless both runs declare their model dtype (meta "dtype", a name) or
    neither does.

    A diff fails a tap whose dtype changed, unless the two runs declare different model
    dtypes: then the change was asked for (float32 against bfloat16) and only values are
    judged.  A run that declares none leaves parity unable to tell an accidental cast from
    a requested one, and taking the silence for a request would switch the dtype check off
    without a word; so one-sided declarations are refused, naming the run (`labels`: how to
    name each, e.g. its dump path)."""
    values = [meta.get("dtype") if isinstance(meta, dict) else None for meta in (ref_meta, cand_meta)]
    for label, value in zip(labels, values):
        if value is not None and not (isinstance(value, str) and value):
            raise InputError(f"{label}: meta 'dtype' must be a dtype name, got {value!r}")
    if (values[0] is None) != (values[1] is None):
        bare = 0 if values[0] is None else 1
        raise InputError(f"{labels[bare]}: its meta declares no model dtype while {labels[1 - bare]} declares "
                         f"{values[1 - bare]!r}: parity cannot tell a dtype change that was asked for from an "
                         "accidental one, and would stop checking tap dtypes; declare 'dtype' in the backend's meta "
                         "and capture it again")


def compare_captures(ref: Capture, cand: Capture, thresholds: Thresholds | None = None,
                     taps: str | None = None, progress: ProgressFn | None = None, chunk: int | None = None,
                     labels: tuple[str, str] = ("reference", "candidate")) -> Report:
    _check_chunk(chunk)
    check_comparable(ref, cand)
    check_declared_dtypes(ref.meta, cand.meta, tuple(f"the {label}" for label in labels))
    if taps:
        keep = _select(taps)
        ref, cand = ref.only(keep), cand.only(keep)
    tick = None if progress is None else (lambda done, total: progress("diff", done, total))
    return diff(ref, cand, thresholds, progress=tick, chunk=chunk, labels=labels)


def diff_live(ref: str | Backend, cand: str | Backend, options: BackendOptions, faults: tuple[str, ...] = (),
              thresholds: Thresholds | None = None, taps: str | None = None,
              progress: ProgressFn | None = None, isolate: bool = True, chunk: int | None = None,
              on_device: bool = True, stop_at_first: bool = False, ref_device_mb: float | None = None,
              oracle: bool | None = None) -> Report:
    """Build both backends from the same options (same weights, inputs and noise), inject
    `faults` into the candidate only, run both and compare.  With `isolate`, a failing
    diff re-runs the first failing component on the reference's inputs and walks
    upstream to the component that introduces the error (`report.localisation`).

    How taps are judged: `thresholds`, when given, are the user's fixed bounds and judge
    every tap.  None: the defaults, which are calibrated budgets
    (parity.comparison.oracle: the reference also runs in float64 with its own weights
    upcast, and each tap may err twice as much as the reference does) wherever they are
    cheap (`oracle.unavailable`: a reference on the CPU whose float64 copy is small), the
    fixed default bounds elsewhere; either way a candidate's declared lossy parts
    (`Backend.lossy`) are judged by its declared bounds from the first of them on.
    `oracle` True asks for budgets anyway (float32 on a GPU), False for the fixed bounds.

    `on_device` (default): compare on the device as the candidate produces each tap
    (parity.comparison.on_device; no tap is copied to the host), the reference's taps kept on the device
    up to `ref_device_mb` (None: half the free device memory) and in pinned host memory
    past it.  Otherwise
    both runs are captured to host memory and diffed there.  `stop_at_first` (on-device
    only) ends the candidate run at the first failing tap.  Budgets compare on the host."""
    _check_chunk(chunk)
    if oracle and (stop_at_first or ref_device_mb is not None):
        raise InputError("--oracle compares on the host: --stop-at-first and --ref-device-mb do not apply")
    if oracle and thresholds is not None:
        raise InputError("--oracle judges by calibrated budgets: it does not take --min-cos, --threshold or "
                         "--max-norm-err (fixed bounds); give one or the other")
    _check_live_flags(on_device, stop_at_first, ref_device_mb)
    faults = fault_names(faults)
    _check_specs(ref, cand, faults)
    # The reference runs to completion before the candidate is built: a candidate that
    # patches shared code while it is built (liger-kernel replaces transformers functions)
    # cannot change what the reference computed.
    ref_backend = _build(ref, replace(options, faults=()))
    built: list[Backend] = []

    def build_cand() -> Backend:
        if not built:  # fed what the reference's run produced (teacher forcing), when it says so
            feed = ref_backend.feed() if callable(getattr(ref_backend, "feed", None)) else None
            built.append(_build(cand, replace(options, faults=tuple(faults), feed=feed)))
        return built[0]

    def gate_for(backend: Backend) -> Thresholds:
        """The fixed bounds: the user's, else the defaults with the candidate's allowance."""
        from parity.comparison.oracle import allowance

        return thresholds if thresholds is not None else allowance(getattr(backend, "lossy", None))

    why_fixed, auto = None, oracle is None
    if thresholds is None and not oracle:  # the defaults: budgets where cheap, else say why not
        from parity.comparison.oracle import unavailable

        why_fixed = "asked for (--no-oracle)" if oracle is False else \
            unavailable(ref_backend.model, ref_backend.meta.get("dtype"))
        if why_fixed is None and (stop_at_first or ref_device_mb is not None):
            why_fixed = "--stop-at-first and --ref-device-mb compare on the device"
        oracle = why_fixed is None
    logs: list = []  # the layer calls of each run (reference, candidate), for isolation
    if oracle:
        report = _diff_with_oracle(ref_backend, build_cand, gate_for, options, taps, progress, isolate, chunk,
                                   asked=not auto)
        if isinstance(report, Report):
            return report
        why_fixed = f"the reference cannot run at a higher precision ({report})"
    if on_device:
        from parity.comparison.on_device import diff_on_device

        ref_meta = _meta(ref_backend, taps)
        select = _select(taps)

        def cand_meta(backend: Backend) -> dict:
            meta = _meta(backend, taps)
            check_comparable(Capture(meta=ref_meta), Capture(meta=meta))
            check_declared_dtypes(ref_meta, meta)
            return meta

        def around(backend, run):
            sink, log = _recording(backend, isolate, run)
            logs.append(log)
            return sink

        budget = None if ref_device_mb is None else int(ref_device_mb * (1 << 20))
        report = diff_on_device(ref_backend, build_cand, ref_meta, cand_meta, gate_for, select, chunk,
                                stop_at_first, progress, budget, around)
        cand_backend = build_cand()
    else:
        ref_cap, ref_log = _capture_recording(ref_backend, options, taps, progress, isolate)
        cand_backend = build_cand()
        cand_cap, cand_log = _capture_recording(cand_backend, options, taps, progress, isolate)
        logs = [ref_log, cand_log]
        report = compare_captures(ref_cap, cand_cap, gate_for(cand_backend), progress=progress, chunk=chunk)
    if thresholds is None:
        report.thresholds["calibration"] = {"mode": "fixed", "why": why_fixed}
        _note_lossy(report, cand_backend)
    if isolate and report.first_divergence is not None:
        report.localisation = localise_live(report, ref_backend, cand_backend, gate_for(cand_backend),
                                            tuple(logs))
    return report


def _note_lossy(report: Report, backend: Backend) -> None:
    """Say in the report which bounds a candidate's declared lossy parts brought."""
    lossy = getattr(backend, "lossy", None)
    if lossy is not None:
        report.thresholds["lossy"] = {"parts": list(lossy.parts), "bounds": dict(lossy.bounds), "why": lossy.why}


def _diff_with_oracle(ref_backend: Backend, build_cand, gate_for, options: BackendOptions, taps, progress,
                      isolate: bool, chunk: int | None, asked: bool = True) -> Report | str:
    """The host diff of `diff_live`, re-judged against an oracle run of the reference.
    A reference that cannot run at a higher precision is an InputError when the oracle
    was asked for; by default (`asked` False) the one-line reason: the caller judges by
    fixed bounds."""
    import torch

    from parity.comparison.oracle import calibrate, finer_run, isolation_thresholds, oracle_dtype, upcast

    ref_cap, ref_log = _capture_recording(ref_backend, options, taps, progress, isolate)
    device = next((p.device for p in ref_backend.model.parameters()), torch.device("cpu"))
    # float64 where it runs; a 16-bit reference may fall back to float32 (a model that pins
    # parts of itself to float32 cannot run in float64), still 2^16 times finer than it.
    names = [oracle_dtype(device.type)]
    if names[0] == "float64" and str(ref_cap.meta.get("dtype")) in ("bfloat16", "float16"):
        names.append("float32")
    failures = []
    for name in names:
        try:
            widen = ref_backend.widen or (lambda dtype: upcast(ref_backend.model, dtype, ref_backend.inputs))
            with widen(getattr(torch, name)):
                oracle_cap = capture_live(ref_backend, options, taps, progress)
        except InputError:
            raise
        except Exception as exc:  # the model cannot run upcast: say so, in one line
            failures.append(f"in {name}: {type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}")
            continue
        if oracle_cap.error is None:
            break
        failures.append(f"in {name}: raised {oracle_cap.error.exc_type}: {oracle_cap.error.message}")
    else:
        if not asked:
            return failures[0]
        raise InputError(f"--oracle: the reference cannot run at a higher precision ({'; '.join(failures)})")
    oracle_cap.meta = {**oracle_cap.meta, "dtype": name, "backend": f"{oracle_cap.meta.get('backend')} ({name} oracle)"}
    cand_backend = build_cand()
    cand_cap, cand_log = _capture_recording(cand_backend, options, taps, progress, isolate)
    gate = gate_for(cand_backend)
    lossy = getattr(cand_backend, "lossy", None)
    report = compare_captures(ref_cap, cand_cap, gate, progress=progress, chunk=chunk)
    coarser = finer_run(ref_cap.meta.get("dtype"), cand_cap.meta.get("dtype"))
    if coarser is not None and not asked:  # asked for, e.g. fp32 vs bf16: the reference's rounding is no budget
        report.thresholds["calibration"] = {"mode": "fixed", "why": coarser}
        _note_lossy(report, cand_backend)
        if isolate and report.first_divergence is not None:
            report.localisation = localise_live(report, ref_backend, cand_backend, gate, (ref_log, cand_log))
        return report
    report = calibrate(report, compare_captures(oracle_cap, ref_cap), compare_captures(oracle_cap, cand_cap), name,
                       lossy=lossy)
    _note_lossy(report, cand_backend)
    if isolate and report.first_divergence is not None:
        report.localisation = localise_live(report, ref_backend, cand_backend, isolation_thresholds(report, gate),
                                            (ref_log, cand_log))
    return report


def _capture_recording(backend: Backend, options: BackendOptions, taps, progress, record: bool):
    """A capture, and (when asked and the model allows) the layer calls of the same run,
    so isolating needs no second run."""
    return _recording(backend, record, lambda: capture_live(backend, options, taps, progress))


def _recording(backend: Backend, record: bool, run: Callable[[], Any]):
    """(run(), the layer calls it made or None): `run` is one tapped run of `backend`
    returning its sink; the calls are recorded when asked and the model allows (without a
    probe adapter: the inputs of the tapped modules, parity.comparison.modules)."""
    if not record:
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


def isolate_component(ref: str | Backend, cand: str | Backend, options: BackendOptions, stack: str | None,
                      layer: int, part: str, step: int | None = None, faults: tuple[str, ...] = (),
                      thresholds: ThresholdsArg = None, min_cos: float | None = None):
    """Run one component (`part` of `stack` layer `layer`, at denoise `step`) of the
    reference and of the candidate on the reference's own inputs and compare the outputs
    (a PartResult, truthy via `.passed`).  `stack` None: the one the reference's probe
    names (`Probe.default_stack`).  `thresholds` as for `make_thresholds`, `min_cos` its
    default.  Bad requests raise InputError."""
    from parity.comparison.isolate import IsolationError, Isolator, Unit

    gate = make_thresholds(min_cos, thresholds)
    ref_backend = _build(ref, replace(options, faults=()))
    cand_backend = _build(cand, replace(options, faults=fault_names(faults)))
    if stack is None:
        stack = ref_backend.probe.default_stack
        if stack is None:
            raise InputError(f"give --stack: the {ref_backend.probe.arch} probe names no default stack")
    try:
        isolator = Isolator(ref_backend, cand_backend, gate)
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


def make_thresholds(min_cos: float | None = None, thresholds: ThresholdsArg = None,
                    settings: Settings | None = None, max_norm_err: float | None = None) -> Thresholds:
    """Thresholds from the forms a caller naturally has: a Thresholds, {glob: min_cos or
    (min_cos, max_norm_err)}, or ["glob=min_cos[,max_norm_err]", ...] (later patterns
    win); `min_cos` None: DEFAULT_MIN_COS (or the settings' min_cos, their patterns
    applied first); `max_norm_err` None: the settings', else each tap's size bound
    follows from its cosine bound.  InputError if malformed."""
    return merge(settings, min_cos=min_cos, thresholds=thresholds, max_norm_err=max_norm_err).thresholds


def compare(ref: str | Backend, cand: str | Backend, inputs: Any = None, *, seed: int | None = None,
            batch: int | None = None, device: str | None = None, dtype: str | None = None,
            padding: str | None = None, seq_len: int | None = None, decode: int | None = None,
            min_cos: float | None = None,
            thresholds: ThresholdsArg = None, max_norm_err: float | None = None, taps: str | None = None,
            faults: Iterable[str] = (),
            config: str | None = None, weights: str | None = None, progress: ProgressFn | None = None,
            stop_at_first: bool = False, on_device: bool = True, settings: Settings | None = None,
            oracle: bool | None = None) -> Report:
    """Run a reference and a candidate on the same inputs and compare them tap by tap.

    `ref` and `cand` are backend specs (`"hf:./m@attn=eager"`, `"pytorch"`,
    `"pkg.mod:factory"`) or ready `Backend` objects.  `inputs` is a token-id file
    (.json/.npy), token rows, or a dict with input_ids/attention_mask; None draws them
    from `seed`.  `config` and `weights` (a checkpoint path) are for backends that build
    their own model, like the bundled pi0.5 ones; None = the backend's default.  The
    returned Report is truthy when every tap passed; its `first_divergence` names the
    earliest failing tap.  The two runs are compared on the device as the candidate runs
    (`on_device=False`: both captured to host memory and diffed there); `stop_at_first`
    ends the candidate run at the first failing tap.  None: the default (BackendOptions'
    for the run, DEFAULT_MIN_COS for min_cos).  `settings` ([tool.parity], e.g. from
    `parity.settings.load_settings()`) fill in min_cos, thresholds and taps not given
    here, the way the CLI and the pytest plugin do (`parity.settings.merge`).  With no
    bounds set anywhere, taps are judged by calibrated budgets against a float64 run of
    the reference where that is cheap (`diff_live`); `oracle` True asks for them anyway,
    False for the fixed default bounds.  Bad requests raise InputError.

        report = parity.compare("hf:./m@attn=eager", "hf:./m@attn=sdpa", batch=3, padding="left")
        assert report, report.first_divergence
    """
    merged = merge(settings, min_cos=min_cos, thresholds=thresholds, taps=taps, max_norm_err=max_norm_err)
    options = backend_options(config=config, seed=seed, device=device, dtype=dtype, batch=batch, weights=weights,
                              inputs=inputs, padding=padding, seq_len=seq_len, decode=decode)
    return diff_live(ref, cand, options, fault_names(faults), merged.live_thresholds(oracle), merged.taps, progress,
                     on_device=on_device, stop_at_first=stop_at_first, oracle=oracle)


def weights_live(ref: str | Backend, cand: str | Backend, options: BackendOptions, faults: tuple[str, ...] = (),
                 thresholds: ThresholdsArg = None, quantized_min_cos: float | None = None, *,
                 min_cos: float | None = None) -> WeightsReport:
    """Build both backends from the same options (the same `--weights` file or seed),
    inject `faults` into the candidate only, and compare the parameters each computes with.
    `thresholds` as for `make_thresholds`; `min_cos` (the default per parameter) and
    `quantized_min_cos` None: parity.comparison.weights' defaults."""
    from parity.comparison.weights import DEFAULT_MIN_COS as PARAM_MIN_COS
    from parity.comparison.weights import DEFAULT_QUANTIZED_MIN_COS, compare_weights, model_parameters

    gate = make_thresholds(PARAM_MIN_COS if min_cos is None else min_cos, thresholds)
    sides = []
    for spec, side_faults in ((ref, ()), (cand, fault_names(faults))):
        backend = _build(spec, replace(options, faults=side_faults))
        try:
            params = backend.parameters() if backend.parameters is not None else model_parameters(backend.model)
        except ValueError as exc:
            raise InputError(f"backend {spec!r}: {exc}") from None
        sides.append((params, backend.meta))
    (ref_params, ref_meta), (cand_params, cand_meta) = sides
    q = DEFAULT_QUANTIZED_MIN_COS if quantized_min_cos is None else quantized_min_cos
    try:
        return compare_weights(ref_params, cand_params, gate, q, ref_meta, cand_meta)
    except ValueError as exc:
        raise InputError(str(exc)) from None


def compare_frames(ref: str, cand: str, options: BackendOptions, n_frames: int, faults: tuple[str, ...] = (),
                   thresholds: ThresholdsArg = None, taps: str | None = None, drift_taps: str | None = None,
                   min_cos: float | None = None) -> FramesResult:
    """Frame f of both backends sees observation f (same prompt, new images and state);
    faults go to the candidate only.  Drift compares the reference's consecutive frames,
    over `drift_taps` (None: the taps the reference's probe names, `Probe.drift_taps`,
    else every tap; "*" for every tap).  `thresholds` as for `make_thresholds`, `min_cos`
    its default.  Bad requests raise InputError."""
    if isinstance(n_frames, bool) or not isinstance(n_frames, int) or n_frames < 1:
        raise InputError("need at least one frame")
    gate = make_thresholds(min_cos, thresholds)
    faults = fault_names(faults)
    reports, drift, previous, keep = [], [], None, None
    for frame in range(n_frames):
        opts = replace(options, frame=frame)
        ref_backend = _build(ref, replace(opts, faults=()))
        if keep is None:
            chosen = drift_taps if drift_taps is not None else ref_backend.probe.drift_taps
            try:
                keep = tap_filter(chosen) if chosen else (lambda name, key: True)
            except ValueError as exc:
                raise InputError(f"--drift-taps {chosen!r}: {exc}") from None
        ref_cap = capture_live(ref_backend, opts, taps)
        cand_cap = capture_live(cand, replace(opts, faults=faults), taps)
        reports.append(compare_captures(ref_cap, cand_cap, gate))
        current = ref_cap.only(keep)
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

    path = rank_path(path, distributed())  # one dump per rank under torch.distributed
    check_dump_path(path)
    try:
        Path(path).parent.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise InputError(f"{path}: cannot create its directory: {exc.strerror or exc}") from None
    stats, interrupted = _run(spec, options, taps, progress)
    try:
        written = write_stats(path, stats)
    except DumpError as exc:
        raise InputError(str(exc)) from None
    except ValueError as exc:
        raise InputError(f"{path}: {exc}") from None
    kept = str(path) if written != str(path) else None  # an incomplete run went beside a file already there
    if interrupted:
        raise CaptureInterrupted(written, len(stats.taps), True, kept)
    return {"path": written, "kept": kept, "taps": len(stats.taps), "error": stats.error}


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
    check_declared_dtypes(ref.meta, cand.meta, tuple(f"the {label}" for label in labels))
    if taps:
        keep = select_taps(taps)
        ref, cand = ref.only(keep), cand.only(keep)
    try:
        return diff_stats(ref, cand, tol, labels)
    except ValueError as exc:  # a run's metadata of the wrong type (the engine itself never raises)
        raise InputError(str(exc)) from None


def diff_stats_dumps(ref_path, cand_path, tol: Thresholds | None = None, taps: str | None = None,
                     allow_incomplete: bool = False) -> StatsReport:
    """Offline diff of two stats dumps (no torch); their readers' notes join the report's warnings."""
    from parity.dump.reader import dump_notes

    ref, cand = load_stats(ref_path, allow_incomplete), load_stats(cand_path, allow_incomplete)
    check_declared_dtypes(ref.meta, cand.meta, (str(ref_path), str(cand_path)))
    report = compare_stats_runs(ref, cand, tol, taps, (f"reference {ref_path}", f"candidate {cand_path}"))
    report.warnings.extend(dump_notes(ref_path) + dump_notes(cand_path))
    return report


def diff_stats_live(ref: str | Backend, cand: str | Backend, options: BackendOptions, faults: tuple[str, ...] = (),
                    tol: Thresholds | None = None, taps: str | None = None,
                    progress: ProgressFn | None = None) -> StatsReport:
    """Both backends from the same options (faults in the candidate only), each run once
    and summarised on its device, then compared."""
    ref_stats = stats_live(_build(ref, replace(options, faults=())), options, taps, progress)
    cand_stats = stats_live(_build(cand, replace(options, faults=tuple(faults))), options, taps, progress)
    return compare_stats_runs(ref_stats, cand_stats, tol)


# --------------------------------------------------------------------------- requests
# What a user asked for, checked here (so the CLI and the Python API refuse the same
# things, with the same one-line messages), then run.


def suggested_taps(path: str | Path) -> str:
    """The taps a stats diff's JSON result (`parity diff A_stats.h5 B_stats.h5 --json`)
    suggests capturing in full; InputError if it is not one, or suggests none."""
    try:
        data = json.loads(Path(path).read_text())
    except OSError as exc:
        raise InputError(f"cannot read {path}: {exc.strerror or exc}") from None
    except (ValueError, UnicodeDecodeError) as exc:
        raise InputError(f"{path} is not JSON: {exc}") from None
    if not isinstance(data, dict) or data.get("format") != STATS_REPORT_FORMAT:
        raise InputError(f"{path} is not a stats diff result (write one with "
                         "`parity diff A_stats.h5 B_stats.h5 --json`)")
    suggested = data.get("suggested")
    if not isinstance(suggested, dict) or not isinstance(suggested.get("taps"), str) or not suggested["taps"]:
        raise InputError(f"{path}: the stats diff passed, so it suggests no taps to capture")
    return suggested["taps"]


def tap_selection(taps: str | None = None, taps_from: str | Path | None = None) -> str | None:
    """`taps` (globs), or the selection the stats diff result `taps_from` suggests."""
    if taps_from is None:
        return taps
    if taps:
        raise InputError("give --taps or --taps-from, not both")
    return suggested_taps(taps_from)


def stats_tolerances(specs: Iterable[str] | str | None = ()) -> Thresholds:
    """A stats diff's tolerances from VALUE / GLOB=VALUE specs (the last bare VALUE is the
    default, DEFAULT_TOLERANCE without one; the last matching pattern wins)."""
    specs = [specs] if isinstance(specs, str) else [str(s) for s in specs or ()]
    patterns = [s for s in specs if "=" in s]
    bare = [s for s in specs if "=" not in s]
    try:
        default = float(bare[-1]) if bare else DEFAULT_TOLERANCE
    except ValueError:
        raise InputError(f"--stats-tol: bad value {bare[-1]!r}: expected VALUE or GLOB=VALUE, "
                         "e.g. 0.05 or 'expert.*=0.1'") from None
    try:
        return tolerances(default, patterns)
    except ValueError as exc:
        raise InputError(f"--stats-tol: {exc}") from None


def _any_stats_dump(dumps: tuple) -> bool:
    """Whether any of the given dumps is a stats dump (then both must be)."""
    if not dumps:
        return False
    from parity.dump.stats import is_stats_dump

    kinds = [is_stats_dump(d) for d in dumps]
    if any(kinds) and not all(kinds) and len(dumps) == 2:
        stats_one, tensor_one = (dumps[0], dumps[1]) if kinds[0] else (dumps[1], dumps[0])
        open_checked(tensor_one, allow_incomplete=True).close()  # missing or unreadable: its reader says so
        raise InputError(f"{stats_one} is a stats dump and {tensor_one} a tensor dump: diff stats against stats "
                         "(capture both with --stats) or tensors against tensors")
    return any(kinds)


# the five diffs `parity diff` can run
LIVE = "live"  # two backends, compared on the device as the candidate runs
HOST = "host"  # two backends, both captured to host memory and diffed there (--host-compare)
DUMPS = "dumps"  # two tensor dumps, offline
STATS_DUMPS = "stats dumps"  # two stats dumps, offline
STATS_LIVE = "stats live"  # two backends, each summarised on its device (--stats)
DIFF_MODES = (LIVE, HOST, DUMPS, STATS_DUMPS, STATS_LIVE)


@dataclass
class DiffResult:
    """What `run_diff` did (`mode`, one of DIFF_MODES) and its report: a Report, or a
    StatsReport for the stats modes.  Truthy when parity holds."""

    mode: str
    report: Report

    @property
    def stats(self) -> bool:
        return self.mode in (STATS_DUMPS, STATS_LIVE)

    @property
    def passed(self) -> bool:
        return bool(self.report)

    def __bool__(self) -> bool:
        return self.passed

    def to_dict(self) -> dict:
        return self.report.to_dict()


@dataclass(frozen=True)
class DiffPlan:
    """A checked diff request (`diff_request`): which diff runs, on what, judged how.
    `thresholds` are minimum cosines, or a stats diff's tolerances."""

    mode: str
    thresholds: Thresholds
    dumps: tuple = ()
    ref: Any = None  # spec or Backend
    cand: Any = None
    options: BackendOptions | None = None
    faults: tuple[str, ...] = ()
    taps: str | None = None
    allow_incomplete: bool = False
    isolate: bool = True
    chunk: int | None = None
    stop_at_first: bool = False
    ref_device_mb: float | None = None
    oracle: bool | None = None  # None: calibrated budgets where cheap, unless bounds were set
    live_thresholds: Thresholds | None = None  # what a live diff is judged by (None: the defaults)

    @property
    def stats(self) -> bool:
        return self.mode in (STATS_DUMPS, STATS_LIVE)

    def run(self, progress: ProgressFn | None = None) -> DiffResult:
        if self.mode == STATS_LIVE:
            report = diff_stats_live(self.ref, self.cand, self.options, self.faults, self.thresholds, self.taps,
                                     progress)
        elif self.mode == STATS_DUMPS:
            report = diff_stats_dumps(self.dumps[0], self.dumps[1], self.thresholds, self.taps,
                                      self.allow_incomplete)
        elif self.mode == DUMPS:
            report = diff_dumps(self.dumps[0], self.dumps[1], self.thresholds, self.taps, self.allow_incomplete,
                                progress, self.chunk)
        else:
            report = diff_live(self.ref, self.cand, self.options, self.faults, self.live_thresholds, self.taps,
                               progress,
                               isolate=self.isolate, chunk=self.chunk, on_device=self.mode == LIVE,
                               stop_at_first=self.stop_at_first, ref_device_mb=self.ref_device_mb,
                               oracle=self.oracle)
        return DiffResult(self.mode, report)


def diff_request(dumps: Iterable[str | Path] | None = (), ref: str | Backend | None = None,
                 cand: str | Backend | None = None, *, faults: Iterable[str] | str | None = (),
                 config: str | None = None, seed: int | None = None, device: str | None = None,
                 dtype: str | None = None, batch: int | None = None, weights: str | Path | None = None,
                 inputs: Any = None, padding: str | None = None, seq_len: int | None = None,
                 decode: int | None = None, min_cos: float | None = None, thresholds: ThresholdsArg = None,
                 taps: str | None = None,
                 max_norm_err: float | None = None, taps_from: str | Path | None = None, stats: bool = False,
                 stats_tol: Iterable[str] | str | None = (), allow_incomplete: bool = False, isolate: bool = True,
                 chunk: int | None = None, by_region: bool = False, on_device: bool = True,
                 stop_at_first: bool = False, ref_device_mb: float | None = None,
                 settings: Settings | None = None, oracle: bool | None = None) -> DiffPlan:
    """Check what a user gave `parity diff` and choose the diff it asks for (`DiffPlan.mode`):

    two dumps, or `ref` and `cand` (live); stats dumps, `stats` or `stats_tol` make it a
    stats diff.  The backend options (config ... seq_len; None = the default) apply to
    live runs.  `min_cos`, `thresholds` and `taps` are merged over `settings` (the
    project's [tool.parity]; None = none) as `parity.settings.merge` does; `taps_from`
    is a stats diff's JSON result whose suggested taps to diff.  `chunk` (--by-token) also
    breaks each tap down by token chunks; `by_region` asks for the per-region breakdown
    (rendered from any tensor report, refused by a stats diff).  InputError says what is
    wrong, naming the CLI flag."""
    dumps = tuple(dumps or ())
    faults = fault_names(faults)
    stats_tol = (stats_tol,) if isinstance(stats_tol, str) else tuple(stats_tol or ())
    option_fields = dict(config=config, seed=seed, device=device, dtype=dtype, batch=batch, weights=weights,
                         inputs=inputs, padding=padding, seq_len=seq_len, decode=decode)
    taps = tap_selection(taps, taps_from)
    live = ref is not None or cand is not None
    if stats or stats_tol or _any_stats_dump(dumps):
        tensor_only = [flag for flag, given in (
            ("--min-cos", min_cos is not None), ("--threshold", bool(thresholds)),
            ("--max-norm-err", max_norm_err is not None), ("--by-region", by_region),
            ("--by-token", chunk is not None), ("--no-isolate", not isolate), ("--stop-at-first", stop_at_first),
            ("--host-compare", not on_device), ("--ref-device-mb", ref_device_mb is not None),
            ("--oracle", oracle is not None)) if given]
        if tensor_only:
            raise InputError(f"{', '.join(tensor_only)} appl{'y' if len(tensor_only) > 1 else 'ies'} to tensor "
                             "diffs; a stats diff takes --stats-tol")
        tol = stats_tolerances(stats_tol)
        taps = merge(settings, taps=taps).taps
        if live:
            if dumps:
                raise InputError("give either two dumps or --ref/--cand, not both")
            if ref is None or cand is None:
                raise InputError("a live diff needs both --ref and --cand")
            return DiffPlan(STATS_LIVE, tol, ref=ref, cand=cand, options=backend_options(**option_fields),
                            faults=faults, taps=taps)
        if len(dumps) != 2:
            raise InputError("give two stats dumps (REF_stats.h5 CAND_stats.h5) or --ref and --cand with --stats")
        if faults:
            raise InputError("--inject applies to a live candidate; capture it with "
                             "`parity capture --stats --inject`")
        return DiffPlan(STATS_DUMPS, tol, dumps=dumps, taps=taps, allow_incomplete=allow_incomplete)
    _check_chunk(chunk)
    merged = merge(settings, min_cos=min_cos, thresholds=thresholds, taps=taps, max_norm_err=max_norm_err)
    gate = merged.thresholds
    if live and dumps:
        raise InputError("give either two dumps or --ref/--cand, not both")
    if live:
        if ref is None or cand is None:
            raise InputError("a live diff needs both --ref and --cand")
        options = backend_options(**option_fields)
        _check_live_flags(on_device, stop_at_first, ref_device_mb)
        if oracle and (stop_at_first or ref_device_mb is not None):
            raise InputError("--oracle compares on the host: --stop-at-first and --ref-device-mb do not apply")
        if oracle and merged.bounds_from == "flags":
            raise InputError("--oracle judges by calibrated budgets: it does not take --min-cos, --threshold or "
                             "--max-norm-err (fixed bounds); give one or the other")
        return DiffPlan(LIVE if on_device and not oracle else HOST, gate, ref=ref, cand=cand, options=options,
                        faults=faults, taps=merged.taps, isolate=isolate, chunk=chunk, stop_at_first=stop_at_first,
                        ref_device_mb=ref_device_mb, oracle=oracle, live_thresholds=merged.live_thresholds(oracle))
    if oracle is not None:
        raise InputError(f"--{'' if oracle else 'no-'}oracle applies to live backends (--ref/--cand): two dumps "
                         "are judged by fixed bounds")
    if len(dumps) != 2:
        raise InputError("give two dumps (REF.h5 CAND.h5) or --ref and --cand")
    if faults:
        raise InputError("--inject applies to a live candidate; capture it with `parity capture --inject`")
    for flag, given in (("--stop-at-first", stop_at_first), ("--host-compare", not on_device),
                        ("--ref-device-mb", ref_device_mb is not None)):
        if given:
            raise InputError(f"{flag} applies to a live diff (--ref/--cand), not to two dumps")
    if weights is not None:
        raise InputError("--weights applies to live backends; capture each dump with `parity capture --weights`")
    return DiffPlan(DUMPS, gate, dumps=dumps, taps=merged.taps, allow_incomplete=allow_incomplete, chunk=chunk)


def run_diff(dumps: Iterable[str | Path] | None = (), ref: str | Backend | None = None,
             cand: str | Backend | None = None, *, progress: ProgressFn | None = None, **request: Any) -> DiffResult:
    """`parity diff` as a function: check the request (`diff_request`, same arguments),
    run the diff it asks for, return what it found (a DiffResult)."""
    return diff_request(dumps, ref, cand, **request).run(progress)


@dataclass
class CaptureResult:
    """What `run_capture` wrote: `taps` taps (their summaries, for a stats dump) to
    `path`; `error` is where the backend raised, if it did (the dump is then marked
    incomplete).  `kept`: the file already at the output path, left as it was, when the
    incomplete dump went beside it (`path` is then `<output>.incomplete`).  Truthy when
    the run completed."""

    path: str
    taps: int
    stats: bool = False
    error: CaptureError | None = None
    kept: str | None = None

    @property
    def passed(self) -> bool:
        return self.error is None

    def __bool__(self) -> bool:
        return self.passed


def capture_path(spec: str | Backend, stats: bool = False, output_dir: str | Path = DEFAULT_OUTPUT_DIR) -> Path:
    """The default dump path of a capture: <output_dir>/<backend spec as a file name>[_stats].h5."""
    name = spec.name if isinstance(spec, Backend) else str(spec)
    safe = "".join(ch if ch.isalnum() or ch in "-_." else "_" for ch in name).strip("_.") or "capture"
    return Path(output_dir) / f"{safe}{'_stats' if stats else ''}.h5"


def run_capture(spec: str | Backend, output: str | Path | None = None, *, stats: bool = False,
                compression: str | None = None, taps: str | None = None, taps_from: str | Path | None = None,
                max_inflight_mb: float | None = None, settings: Settings | None = None,
                progress: ProgressFn | None = None, faults: Iterable[str] | str | None = (),
                config: str | None = None, seed: int | None = None, device: str | None = None,
                dtype: str | None = None, batch: int | None = None, weights: str | Path | None = None,
                inputs: Any = None, padding: str | None = None, seq_len: int | None = None) -> CaptureResult:
    """`parity capture` as a function: run one backend and write its taps (or, with
    `stats`, their summaries) to `output` (default: `capture_path` under the settings'
    output_dir).  `taps`/`taps_from` as for `diff_request`, the settings' taps by default.
    InputError for a bad request; CaptureInterrupted if stopped."""
    taps = tap_selection(taps, taps_from)
    merged = merge(settings, taps=taps)
    path = Path(output) if output is not None else capture_path(spec, stats, merged.output_dir)
    options = backend_options(faults=faults, config=config, seed=seed, device=device, dtype=dtype, batch=batch,
                              weights=weights, inputs=inputs, padding=padding, seq_len=seq_len)
    if stats:
        if compression:
            raise InputError("--compression applies to tensor dumps; a stats dump is a few KB")
        summary = capture_stats(spec, options, path, merged.taps, progress)
    else:
        budget = DEFAULT_MAX_INFLIGHT_MB if max_inflight_mb is None else max_inflight_mb
        summary = capture_to_dump(spec, options, path, merged.taps, compression, progress, budget)
    return CaptureResult(summary["path"], summary["taps"], stats, summary["error"], summary["kept"])


def run_component(ref: str | Backend, cand: str | Backend, *, layer: int, part: str, stack: str | None = None,
                  step: int | None = None, faults: Iterable[str] | str | None = (), min_cos: float | None = None,
                  thresholds: ThresholdsArg = None, config: str | None = None, seed: int | None = None,
                  device: str | None = None, dtype: str | None = None, batch: int | None = None,
                  weights: str | Path | None = None):
    """`parity component` as a function: `isolate_component` from what a user gave
    (None = the default: the probe's stack, DEFAULT_MIN_COS, BackendOptions')."""
    gate = make_thresholds(min_cos, thresholds)
    options = backend_options(config=config, seed=seed, device=device, dtype=dtype, batch=batch, weights=weights)
    return isolate_component(ref, cand, options, stack, layer, part, step, fault_names(faults), gate)


def run_weights(ref: str | Backend, cand: str | Backend, *, faults: Iterable[str] | str | None = (),
                min_cos: float | None = None, quantized_min_cos: float | None = None,
                thresholds: ThresholdsArg = None, config: str | None = None, seed: int | None = None,
                device: str | None = None, dtype: str | None = None,
                weights: str | Path | None = None) -> WeightsReport:
    """`parity weights` as a function: `weights_live` from what a user gave (None = the
    default: parity.comparison.weights' thresholds, BackendOptions')."""
    from parity.comparison.weights import DEFAULT_MIN_COS as PARAM_MIN_COS

    gate = make_thresholds(PARAM_MIN_COS if min_cos is None else min_cos, thresholds)
    options = backend_options(config=config, seed=seed, device=device, dtype=dtype, weights=weights)
    return weights_live(ref, cand, options, fault_names(faults), gate, quantized_min_cos)


def run_frames(ref: str | Backend, cand: str | Backend, *, frames: int, faults: Iterable[str] | str | None = (),
               min_cos: float | None = None, thresholds: ThresholdsArg = None, taps: str | None = None,
               drift_taps: str | None = None, config: str | None = None, seed: int | None = None,
               device: str | None = None, dtype: str | None = None) -> FramesResult:
    """`parity frames` as a function: `compare_frames` from what a user gave (None = the
    default: the probe's drift taps, DEFAULT_MIN_COS, BackendOptions')."""
    gate = make_thresholds(min_cos, thresholds)
    options = backend_options(config=config, seed=seed, device=device, dtype=dtype)
    return compare_frames(ref, cand, options, frames, fault_names(faults), gate, taps, drift_taps)


# --------------------------------------------------------------------------- reports

REPORT_FORMATS = {"html": ".html", "md": ".md", "junit": ".xml", "model-explorer": ".me.json"}


@dataclass(frozen=True)
class ReportRequest:
    """`parity report`: render the diff result `result` as `fmt` (REPORT_FORMATS) to
    `output` ("-": stdout; default: <output_dir>/<result name> + the format's extension).
    `exported_program` (model-explorer only): a torch.export .pt2 of the reference model,
    whose FX node names become the node ids.  Checked when made (InputError)."""

    result: Path
    fmt: str = "html"
    output: Path | None = None
    exported_program: Path | None = None
    output_dir: Path = DEFAULT_OUTPUT_DIR

    def __post_init__(self) -> None:
        if self.fmt not in REPORT_FORMATS:
            raise InputError(f"unknown format {self.fmt!r}; known: {', '.join(REPORT_FORMATS)}")
        if self.exported_program is not None and self.fmt != "model-explorer":
            raise InputError("--exported-program applies to --format model-explorer")
        if self.output is not None and str(self.output) != "-" and _not_a_file(Path(self.output)) == "a directory":
            raise InputError(f"cannot write {self.output}: it is a directory (-o names the report's file)")

    @property
    def path(self) -> Path:
        if self.output is not None:
            return Path(self.output)
        return Path(self.output_dir) / (Path(self.result).name.removesuffix(".json") + REPORT_FORMATS[self.fmt])

    @property
    def to_stdout(self) -> bool:
        return str(self.path) == "-"

    def render(self, report: Report) -> dict[Path, str]:
        """Path -> text of every file this report is (the report itself first)."""
        output = self.path
        if self.fmt == "html":
            from parity.report.html import render_html
            return {output: render_html(report)}
        if self.fmt == "md":
            from parity.report.markdown import render_markdown
            return {output: render_markdown(report)}
        if self.fmt == "junit":
            from parity.report.junit import render_junit
            return {output: render_junit(report)}
        return self._model_explorer(report, output)

    def _model_explorer(self, report: Report, output: Path) -> dict[Path, str]:
        from parity.report import model_explorer as me

        if self.exported_program is None:
            files = {output: json.dumps(me.node_data(report), indent=2)}
            if str(output) != "-" and _not_a_file(output) is None:  # no companion next to /dev/null or a FIFO
                graph = output.with_name(output.name.removesuffix(".json").removesuffix(".me") + ".graph.json")
                files[graph] = json.dumps(me.tap_graph(report), indent=2)
            return files
        modules = report.ref_meta.get("modules")
        if not modules:
            raise InputError("the reference run recorded no module names (ref.modules): cannot map taps to graph "
                             "nodes")
        from parity.report.exported_program import read_graph  # JSON only: nothing in the archive is unpickled

        try:
            nodes = read_graph(self.exported_program)
        except OSError as exc:
            raise InputError(f"cannot read {self.exported_program}: {exc.strerror or exc}") from None
        except ValueError as exc:
            raise InputError(f"{self.exported_program}: {exc}") from None
        ids = me.node_ids_from_graph(nodes, modules)
        if not ids:
            raise InputError(f"no tap module of this report appears in {self.exported_program}")
        return {output: json.dumps(me.node_data(report, ids), indent=2)}


def load_report(path: str | Path) -> Report:
    """A tensor diff result (`parity diff --json`) read back for rendering; InputError, in
    one line, for anything else (unreadable, not JSON, a stats dump, another kind of result)."""
    import json

    path = Path(path)
    try:
        return load_result(json.loads(path.read_text()), expect=REPORT_FORMAT)
    except OSError as exc:
        raise InputError(f"cannot read {path}: {exc.strerror or exc}") from None
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        from parity.dump.stats import is_stats_dump

        if is_stats_dump(path):
            raise InputError(f"{path} is a stats dump (per-tap summaries), not a diff result: compare two with "
                             "`parity diff A_stats.h5 B_stats.h5`; `parity report` renders `parity diff --json` "
                             "results") from None
        raise InputError(f"{path} is not JSON: {exc}") from None
    except RecursionError:  # the JSON decoder recurses once per level of nesting
        raise InputError(f"{path}: JSON nested too deeply to be a parity result") from None
    except ValueError as exc:
        raise InputError(f"{path}: {exc}") from None


def write_text(path: str | Path, text: str) -> None:
    """Write `text` (UTF-8) to `path`.  A regular file, or a new one, is written under a
    temporary name renamed over it: a full disk leaves no truncated file.  A character
    device or a FIFO (`/dev/null`, `/dev/stdout`, a pipe) is written through, never
    replaced (a FIFO waits for its reader, as a shell's `>` does); a symlink is followed,
    so the link stays.  InputError saying why for anything else (a directory, a block
    device, a socket) and for any write that fails."""
    path = Path(path)
    target = Path(os.path.realpath(path)) if path.is_symlink() else path
    try:
        data = text.encode("utf-8")
    except UnicodeEncodeError as exc:
        raise InputError(f"cannot write {path}: the text is not valid Unicode ({exc.reason})") from None
    kind = _not_a_file(target)
    if kind in ("a character device", "a FIFO"):
        try:
            with open(target, "wb") as f:
                f.write(data)
        except OSError as exc:
            raise InputError(f"cannot write {path}: {exc.strerror or exc}") from None
        return
    if kind is not None:
        raise InputError(f"cannot write {path}: it is {kind}")
    partial = target.with_name(target.name + ".partial")
    try:
        if target == path:
            path.parent.mkdir(parents=True, exist_ok=True)
        partial.write_bytes(data)
        os.replace(partial, target)
    except OSError as exc:
        with contextlib.suppress(OSError):
            partial.unlink(missing_ok=True)
        raise InputError(f"cannot write {path}: {exc.strerror or exc}") from None


def _not_a_file(path: Path) -> str | None:
    """What `path` is (symlinks followed) when it exists and is not a regular file: "a
    directory", "a character device", "a FIFO", ...; None for a regular file or none."""
    try:
        mode = os.stat(path).st_mode
    except (FileNotFoundError, NotADirectoryError):
        return None
    except OSError:
        return None  # the write says why
    if stat.S_ISREG(mode):
        return None
    kinds = ((stat.S_ISDIR, "a directory"), (stat.S_ISCHR, "a character device"), (stat.S_ISFIFO, "a FIFO"),
             (stat.S_ISBLK, "a block device"), (stat.S_ISSOCK, "a socket"))
    return next((words for test, words in kinds if test(mode)), "not a regular file")


def check_dump_path(path: str | Path) -> None:
    """InputError unless `path` can take a dump: absent or a regular file (through any
    symlink).  A dump is written as `<path>.partial` and renamed over `path`, which would
    replace a device, a FIFO or a directory; HDF5 cannot be streamed into them."""
    kind = _not_a_file(Path(path))
    if kind is not None:
        raise InputError(f"{path}: it is {kind}; a dump is written to a regular file")


def write_json(path: str | Path, data: dict) -> None:
    """`data` as strict JSON (no NaN, which JSON has not) at `path`, as write_text does."""
    try:
        text = json.dumps(data, indent=2, allow_nan=False)
    except ValueError as exc:
        raise InputError(f"cannot write {path}: {exc}") from None
    write_text(path, text)


# --------------------------------------------------------------------------- listings


@dataclass
class DumpSummary:
    """`parity inspect`: what a dump (tensor or stats) holds, incomplete ones included
    (a tensor dump's taps as headers, without their data)."""

    path: str
    run: Capture | StatsCapture
    stats: bool = False
    notes: list[str] = field(default_factory=list)  # what its reader noted (DumpReader.notes)

    @property
    def complete(self) -> bool:
        return self.run.complete

    @property
    def meta(self) -> dict:
        return self.run.meta

    @property
    def error(self) -> CaptureError | None:
        return self.run.error

    @property
    def taps(self) -> list:
        return self.run.taps


def inspect_dump(path: str | Path) -> DumpSummary:
    """A dump's metadata and tap headers (a stats dump's summaries); InputError if
    unreadable.  A tensor dump's data is never read: its taps are `TapHeader`s (key,
    order, shape, dtype, layout), so listing a dump costs its metadata, not its size."""
    from parity.dump.reader import open_dump
    from parity.dump.stats import is_stats_dump, open_stats

    try:
        if is_stats_dump(path):
            with open_stats(path) as reader:
                return DumpSummary(str(path), reader.stats, stats=True, notes=list(reader.notes))
        with open_dump(path) as reader:
            run = Capture(taps=list(reader.headers), layouts=dict(reader.layouts), meta=reader.meta,
                          error=reader.error, complete=reader.complete)
            return DumpSummary(str(path), run, notes=list(reader.notes))
    except DumpError as exc:
        raise InputError(str(exc)) from None


@dataclass(frozen=True)
class BackendEntry:
    """One registered backend: its first doc line and spec usage, or why it cannot be
    loaded (`error`); the probe its factory declares, if it does (`factory.probe`)."""

    name: str
    doc: str = ""
    usage: str | None = None
    error: str | None = None
    probe: Probe | None = None


@dataclass
class BackendListing:
    """`parity backends`: the registered backends, the faults they offer (name -> what
    it plants) and the probes they declare."""

    backends: list[BackendEntry] = field(default_factory=list)
    faults: dict[str, str] = field(default_factory=dict)

    def probes(self) -> list[tuple[Probe, list[str]]]:
        """Each declared probe (by arch, first seen) with the backends that use it."""
        out: dict[str, tuple[Probe, list[str]]] = {}
        for b in self.backends:
            if b.probe is not None:
                out.setdefault(b.probe.arch, (b.probe, []))[1].append(b.name)
        return list(out.values())


def list_backends() -> BackendListing:
    """Every backend registered in the entry-point group parity.backends (a backend
    that fails to import is listed with the reason, not fatal)."""
    from parity.taps.backends import registered

    listing = BackendListing()
    for name, ep in sorted(registered().items()):
        try:
            factory = ep.load()
        except Exception as exc:  # noqa: BLE001 - a backend that fails to import is listed, not fatal
            listing.backends.append(BackendEntry(name, error=str(exc)))
            continue
        doc = (factory.__doc__ or "").strip().splitlines()[0] if (factory.__doc__ or "").strip() else ""
        from parity.taps.backends import missing_requirements

        missing = missing_requirements(factory)
        if missing:
            listing.backends.append(BackendEntry(name, doc, getattr(factory, "usage", None), error=missing))
            continue
        probe = getattr(factory, "probe", None)
        listing.backends.append(BackendEntry(name, doc, getattr(factory, "usage", None),
                                             probe=probe if isinstance(probe, Probe) else None))
        with contextlib.suppress(Exception):  # a malformed fault table is not fatal either
            listing.faults.update(getattr(factory, "faults", {}))
    return listing
