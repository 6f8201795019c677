"""The library's front door: capture, diff and gate as functions returning result objects.

The CLI is a thin shell over these; a user's own test suite can call them directly.
Input problems (unknown backend, bad dump, incomparable runs) raise `InputError`."""
from __future__ import annotations

import datetime as _dt
from pathlib import Path

from .backends import BackendError, BackendOptions
from .diff import Thresholds, diff
from .dump import DumpError, DumpWriter, read_dump
from .probe import tap_filter
from .records import Capture
from .report import Report
from .weights_report import WeightsReport


class InputError(Exception):
    """The request cannot be carried out as given (exit code 2)."""


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

    backend = _build(spec, options)
    sink = Capture(meta={**backend.meta, "created": _now(), "taps": taps or "*"})
    return capture(backend, sink, tap_filter(taps))


def capture_to_dump(spec: str, options: BackendOptions, path: str | Path, taps: str | None = None,
                    compression: str | None = None) -> dict:
    """Run a backend once, streaming taps into an HDF5 dump; returns a short summary."""
    from .capture import capture

    backend = _build(spec, options)
    meta = {**backend.meta, "created": _now(), "taps": taps or "*"}
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    try:
        with DumpWriter(path, meta, compression=compression) as writer:
            counter = _Counting(writer)
            capture(backend, counter, tap_filter(taps))
    except DumpError as exc:
        raise InputError(str(exc)) from None
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
    try:
        cap = read_dump(path)
    except DumpError as exc:
        raise InputError(str(exc)) from None
    if not cap.complete and not allow_incomplete:
        raise InputError(f"{path}: capture is incomplete (interrupted); pass --allow-incomplete to diff it anyway")
    return cap


def check_comparable(ref: Capture, cand: Capture) -> None:
    a, b = ref.meta.get("input_fingerprint"), cand.meta.get("input_fingerprint")
    if a is not None and b is not None and a != b:
        raise InputError(f"the two runs saw different inputs (fingerprint {a} vs {b}): "
                         "capture both with the same config, seed and batch")


def compare_captures(ref: Capture, cand: Capture, thresholds: Thresholds | None = None,
                     taps: str | None = None) -> Report:
    check_comparable(ref, cand)
    if taps:
        keep = tap_filter(taps)
        ref = Capture([t for t in ref.taps if keep(t.info.name, t.key)], ref.layouts, ref.meta, ref.error,
                      ref.complete)
        cand = Capture([t for t in cand.taps if keep(t.info.name, t.key)], cand.layouts, cand.meta, cand.error,
                       cand.complete)
    return diff(ref, cand, thresholds)


def diff_dumps(ref_path, cand_path, thresholds: Thresholds | None = None, taps: str | None = None,
               allow_incomplete: bool = False) -> Report:
    """Offline diff of two dumps (no torch)."""
    return compare_captures(load_dump(ref_path, allow_incomplete), load_dump(cand_path, allow_incomplete),
                            thresholds, taps)


def diff_live(ref: str, cand: str, options: BackendOptions, faults: tuple[str, ...] = (),
              thresholds: Thresholds | None = None, taps: str | None = None) -> Report:
    """Build both backends from the same options (same weights, inputs and noise), inject
    `faults` into the candidate only, run both and compare."""
    from dataclasses import replace

    ref_cap = capture_live(ref, replace(options, faults=()), taps)
    cand_cap = capture_live(cand, replace(options, faults=tuple(faults)), taps)
    return compare_captures(ref_cap, cand_cap, thresholds)


def weights_live(ref: str, cand: str, options: BackendOptions, faults: tuple[str, ...] = (),
                 thresholds: Thresholds | None = None, quantized_min_cos: float | None = None) -> WeightsReport:
    """Build both backends from the same options (the same `--weights` file or seed),
    inject `faults` into the candidate only, and compare the parameters each computes with."""
    from dataclasses import replace

    from .weights import DEFAULT_QUANTIZED_MIN_COS, compare_weights, model_parameters

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
