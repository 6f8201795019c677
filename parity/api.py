"""The library's front door: capture, diff and gate as functions returning result objects.

The CLI is a thin shell over these; a user's own test suite can call them directly.
Input problems (unknown backend, bad dump, incomparable runs, an output that cannot be
written) raise `InputError`; an interrupted capture raises `CaptureInterrupted`."""
from __future__ import annotations

import datetime as _dt
from pathlib import Path

from .backends import BackendError, BackendOptions
from .diff import Thresholds, diff
from .dump import DumpError, DumpWriter, read_dump
from .probe import tap_filter
from .records import Capture
from .report import Report


class InputError(Exception):
    """The request cannot be carried out as given (exit code 2)."""


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


def _select(taps: str | None):
    try:
        return tap_filter(taps)
    except ValueError as exc:
        raise InputError(f"--taps {taps!r}: {exc}") from None


def _now() -> str:
    return _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds")


def _build(spec: str, options: BackendOptions):
    from .backends import resolve  # the factories import torch; keep it off the offline path

    try:
        return resolve(spec, options)
    except BackendError as exc:
        raise InputError(str(exc)) from None


def capture_live(spec: str, options: BackendOptions, taps: str | None = None) -> Capture:
    """Run a backend once and keep every selected tap in memory."""
    from .capture import capture

    select = _select(taps)
    backend = _build(spec, options)
    sink = Capture(meta={**backend.meta, "created": _now(), "taps": taps or "*"})
    return capture(backend, sink, select)


def capture_to_dump(spec: str, options: BackendOptions, path: str | Path, taps: str | None = None,
                    compression: str | None = None) -> dict:
    """Run a backend once, streaming taps into an HDF5 dump; returns a short summary.

    The dump is written as `<path>.partial` and renamed when closed: a disk that fills
    up raises InputError and leaves no file; Ctrl-C raises CaptureInterrupted and leaves
    `path` readable, marked incomplete; a killed process leaves `<path>.partial`."""
    from .capture import capture

    select = _select(taps)
    writer = None
    try:
        backend = _build(spec, options)
        meta = {**backend.meta, "created": _now(), "taps": taps or "*"}
        try:
            Path(path).parent.mkdir(parents=True, exist_ok=True)
        except OSError as exc:
            raise InputError(f"{path}: cannot create its directory: {exc.strerror or exc}") from None
        with DumpWriter(path, meta, compression=compression) as writer:
            counter = _Counting(writer)
            capture(backend, counter, select)
    except KeyboardInterrupt:
        taps_written = writer.tap_count if writer is not None else 0
        raise CaptureInterrupted(str(path), taps_written, writer is not None and writer.written) from None
    except DumpError as exc:
        raise InputError(str(exc)) from None
    except ValueError as exc:  # the dump refused what the backend produced (e.g. a tap name with NUL)
        raise InputError(f"{path}: {exc}") from None
    return {"path": str(path), "taps": counter.count, "error": counter.error}


class _Counting:
    """Passes taps to a sink and remembers how many went through and whether it raised."""

    def __init__(self, sink):
        self.sink, self.count, self.error = sink, 0, None

    def add_layout(self, name, layout):
        self.sink.add_layout(name, layout)

    def add_tap(self, tap):
        self.count += 1
        self.sink.add_tap(tap)

    def set_error(self, error):
        self.error = error
        self.sink.set_error(error)


def load_dump(path: str | Path, allow_incomplete: bool = False) -> Capture:
    """Read a whole dump; InputError if it is unreadable, or incomplete and not allowed."""
    try:
        cap = read_dump(path)
    except DumpError as exc:
        raise InputError(str(exc)) from None
    if not cap.complete and not allow_incomplete:
        if cap.error is not None:
            why = (f"the backend raised at {cap.error.key or 'an untapped place'}: "
                   f"{cap.error.exc_type}: {cap.error.message}")
        else:
            why = f"interrupted after {len(cap.taps)} taps"
        raise InputError(f"{path}: capture is incomplete ({why}); pass --allow-incomplete to diff it anyway")
    return cap


def check_comparable(ref: Capture, cand: Capture) -> None:
    a, b = ref.meta.get("input_fingerprint"), cand.meta.get("input_fingerprint")
    if a is not None and b is not None and a != b:
        raise InputError(f"the two runs saw different inputs (fingerprint {a} vs {b}): "
                         "capture both with the same config, seed and batch")


def compare_captures(ref: Capture, cand: Capture, thresholds: Thresholds | None = None,
                     taps: str | None = None, labels: tuple[str, str] = ("reference", "candidate")) -> Report:
    check_comparable(ref, cand)
    if taps:
        keep = _select(taps)
        ref = Capture([t for t in ref.taps if keep(t.info.name, t.key)], ref.layouts, ref.meta, ref.error,
                      ref.complete)
        cand = Capture([t for t in cand.taps if keep(t.info.name, t.key)], cand.layouts, cand.meta, cand.error,
                       cand.complete)
    return diff(ref, cand, thresholds, labels)


def diff_dumps(ref_path, cand_path, thresholds: Thresholds | None = None, taps: str | None = None,
               allow_incomplete: bool = False) -> Report:
    """Offline diff of two dumps (no torch).  With allow_incomplete an interrupted dump is
    compared as far as it goes, but the report never passes."""
    return compare_captures(load_dump(ref_path, allow_incomplete), load_dump(cand_path, allow_incomplete),
                            thresholds, taps, labels=(f"reference {ref_path}", f"candidate {cand_path}"))


def diff_live(ref: str, cand: str, options: BackendOptions, faults: tuple[str, ...] = (),
              thresholds: Thresholds | None = None, taps: str | None = None) -> Report:
    """Build both backends from the same options (same weights, inputs and noise), inject
    `faults` into the candidate only, run both and compare."""
    from dataclasses import replace

    ref_cap = capture_live(ref, replace(options, faults=()), taps)
    cand_cap = capture_live(cand, replace(options, faults=tuple(faults)), taps)
    return compare_captures(ref_cap, cand_cap, thresholds)
