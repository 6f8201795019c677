"""The offline diff of two dumps: open, check, stream, judge; no torch, no backends.

Its own module so that `parity diff a.h5 b.h5` imports only what it runs (numpy, h5py,
the diff, the dump reader, the renderer), not the backend registry, the capture writer
or the weights comparison that `parity.api` also holds (CLI start-up time).  `parity.api`
re-exports every name here.
"""

from __future__ import annotations

from collections.abc import Callable

from parity.comparison.rules import Thresholds
from parity.dump.format import DumpError
from parity.errors import InputError
from parity.report.results import Report
from parity.taps.probe import tap_filter
from parity.taps.records import Capture

ProgressFn = Callable[[str, int, "int | None"], None]


def select_taps(taps: str | None):
    try:
        return tap_filter(taps)
    except ValueError as exc:
        raise InputError(f"--taps {taps!r}: {exc}") from None


def incomplete_error(path, error, n_taps: int) -> InputError:
    """The refusal of an incomplete dump, saying why it is incomplete."""
    if error is not None:
        why = f"the backend raised at {error.key or 'an untapped place'}: {error.exc_type}: {error.message}"
    else:
        why = f"interrupted after {n_taps} taps"
    return InputError(f"{path}: capture is incomplete ({why}); pass --allow-incomplete to diff it anyway")


def check_comparable(ref: Capture, cand: Capture) -> None:
    a, b = ref.meta.get("input_fingerprint"), cand.meta.get("input_fingerprint")
    if a is not None and b is not None and a != b:
        raise InputError(f"the two runs saw different inputs (fingerprint {a} vs {b}): "
                         "capture both with the same config, seed and batch")


def open_checked(path, allow_incomplete: bool = False):
    """An open DumpReader (headers only), or InputError for a bad or incomplete dump."""
    from parity.dump.reader import open_dump

    try:
        reader = open_dump(path)
    except DumpError as exc:
        raise InputError(str(exc)) from None
    if not reader.complete and not allow_incomplete:
        reader.close()
        raise incomplete_error(path, reader.error, len(reader.headers))
    return reader


def diff_dumps(ref_path, cand_path, thresholds: Thresholds | None = None, taps: str | None = None,
               allow_incomplete: bool = False, progress: ProgressFn | None = None, chunk: int | None = None) -> Report:
    """Offline diff of two dumps (no torch), streamed: memory does not grow with the dumps.
    With allow_incomplete an interrupted dump is compared as far as it goes, but the
    report never passes.  Dumps hold taps, not the models that made them, so the first
    divergence cannot be re-run in isolation: the report says so.  (A sharded candidate,
    one dump per rank, is `parity.comparison.sharded.diff_sharded`.)"""
    from parity.comparison.stream import diff_readers
    from parity.report.results import OFFLINE_NOTE, Localisation

    keep = select_taps(taps) if taps else None
    with open_checked(ref_path, allow_incomplete) as ref, open_checked(cand_path, allow_incomplete) as cand:
        check_comparable(ref, cand)
        tick = None if progress is None else (lambda done, total: progress("diff", done, total))
        try:
            report = diff_readers(ref, cand, thresholds, keep, tick, chunk,
                                  labels=(f"reference {ref_path}", f"candidate {cand_path}"))
        except DumpError as exc:
            raise InputError(str(exc)) from None
    if report.first_divergence is not None:
        report.localisation = Localisation(note=OFFLINE_NOTE)
    return report
