"""The library's front door for stats-only runs: capture summaries, diff them.

Kept beside `api.py` (whose helpers it uses) so the tensor path stays as it is; the same
conventions hold: bad requests raise `InputError`, an interrupted capture raises
`CaptureInterrupted` after writing what it had, marked incomplete."""
from __future__ import annotations

from dataclasses import replace
from pathlib import Path

from .api import CaptureInterrupted, InputError, ProgressFn, _build, _incomplete, _meta, _select, check_comparable
from .backends import Backend, BackendOptions
from .diff import Thresholds
from .dump import DumpError
from .stats import StatsCapture
from .stats_diff import StatsReport, diff_stats


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
    from .capture import capture
    from .stats_device import StatsSink

    select = _select(taps)
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
    from .stats_dump import write_stats

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
    from .stats_dump import read_stats

    try:
        stats = read_stats(path)
    except DumpError as exc:
        raise InputError(str(exc)) from None
    if not stats.complete and not allow_incomplete:
        raise _incomplete(path, stats.error, len(stats.taps))
    return stats


def compare_stats_runs(ref: StatsCapture, cand: StatsCapture, tol: Thresholds | None = None,
                       taps: str | None = None, labels: tuple[str, str] = ("reference", "candidate")) -> StatsReport:
    check_comparable(ref, cand)
    if taps:
        keep = _select(taps)
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
