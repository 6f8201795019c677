"""The comparison loop: pair taps, align tokens, compute metrics, judge, find the first
divergence.  Works on in-memory captures and on dumps alike; never imports torch."""

from __future__ import annotations

from parity.comparison.host import compare_taps
from parity.comparison.rules import Thresholds, bound_fields
from parity.report.results import Report, TapResult
from parity.taps.records import Capture


def _listed(rows: list[TapResult], limit: int = 5) -> str:
    keys = [r.key for r in rows]
    return ", ".join(keys[:limit]) + (f", ... ({len(keys) - limit} more)" if len(keys) > limit else "")


def diff(ref: Capture, cand: Capture, thresholds: Thresholds | None = None, exact_dtypes: bool | None = None,
         progress=None, compare=compare_taps, chunk: int | None = None,
         labels: tuple[str, str] = ("reference", "candidate"), stopped: str | None = None) -> Report:
    """Compare every tap of `cand` against `ref`, in the reference's execution order.

    Fails closed: the report passes only if at least one tap was compared, every tap of
    either side was compared and passed, and both runs completed.  `labels` name the two
    sides in run-level problems (e.g. "reference a.h5").

    `exact_dtypes` (default: whether both runs declare the same model dtype in their
    metadata) makes a tap whose dtype changed fail; a float32-vs-bfloat16 comparison
    judges values only.  `progress(done, total)` is called after each tap.  `compare`
    judges one pair (same signature as `compare_taps`): the streaming diff of two dumps
    passes its own, over taps that are headers whose data stays on disk.  `chunk`: also
    break each tap down by chunks of that many canonical token positions.  `stopped`: why
    the candidate run was ended early on purpose (a stop at the first divergence): the
    reference taps it never produced are `not_reached`, and the report says so."""
    if exact_dtypes is None:
        exact_dtypes = ref.meta.get("dtype") == cand.meta.get("dtype")
    thresholds = thresholds or Thresholds()
    cand_taps = cand.by_key()
    rows: list[TapResult] = []
    raised_at = cand.error.key if cand.error else None
    reached = True
    for tap in sorted(ref.taps, key=lambda t: t.order):
        threshold = thresholds.for_pair(tap.info.name, tap.key)
        other = cand_taps.pop(tap.key, None)
        if other is not None:
            rows.append(compare(tap, other, ref.layouts, cand.layouts, threshold, exact_dtypes, chunk))
            if progress is not None:
                progress(len(rows), len(ref.taps))
            continue
        common = dict(info=tap.info, order=tap.order, **bound_fields(threshold), ref_shape=tap.shape,
                      ref_dtype=tap.dtype)
        if cand.error and tap.key == raised_at:
            rows.append(TapResult(status="raised", reason=f"{cand.error.exc_type}: {cand.error.message}", **common))
            reached = False
        elif stopped and not cand.error:
            rows.append(TapResult(status="not_reached", reason=f"not reached: the candidate stopped {stopped}",
                                  **common))
        elif cand.error and (not reached or raised_at is None):
            rows.append(TapResult(status="not_reached", reason=f"not reached: candidate raised earlier "
                                  f"({cand.error.exc_type}: {cand.error.message})", **common))
        else:
            rows.append(TapResult(status="missing", reason="tap missing in candidate", **common))
    for tap in sorted(cand_taps.values(), key=lambda t: t.order):
        rows.append(TapResult(info=tap.info, order=None, status="extra", reason="tap only in candidate",
                              **bound_fields(thresholds.for_pair(tap.info.name, tap.key)), cand_shape=tap.shape,
                              cand_dtype=tap.dtype))
    problems = []
    ref_label, cand_label = labels
    if not ref.taps:
        problems.append(f"{ref_label} has no taps: nothing was compared")
    if not cand.taps:
        problems.append(f"{cand_label} has no taps: nothing was compared")
    compared = [r for r in rows if r.ref_shape is not None and r.cand_shape is not None]
    if ref.taps and cand.taps and not compared:
        problems.append(f"no tap in common between {ref_label} and {cand_label}: nothing was compared")
    for status, where in (("missing", ref_label), ("extra", cand_label)):
        only = [r for r in rows if r.status == status]
        if only:
            problems.append(f"{len(only)} tap{'s' if len(only) > 1 else ''} only in the {where}: {_listed(only)}")
    if stopped:
        skipped = sum(r.status == "not_reached" for r in rows)
        problems.append(f"{cand_label} stopped early {stopped}: {skipped} reference "
                        f"tap{'s' if skipped != 1 else ''} never compared")
    for label, c in ((ref_label, ref), (cand_label, cand)):
        if not c.complete and c.error is None:
            problems.append(f"{label} capture is incomplete (interrupted): taps after the stop were never compared")
    if ref.error:
        problems.append(f"{ref_label} raised at {ref.error.key or 'an untapped place'}: "
                        f"{ref.error.exc_type}: {ref.error.message}")
    if cand.error and not any(r.status == "raised" for r in rows):
        # Raised where no reference tap shows it (outside every tap, after the last one, or
        # at a tap it had already recorded): still a failure, whatever the taps say.
        problems.append(f"{cand_label} raised at {raised_at or 'an untapped place'}: "
                        f"{cand.error.exc_type}: {cand.error.message}")
    return Report(rows=rows, ref_meta=dict(ref.meta), cand_meta=dict(cand.meta),
                  thresholds={**thresholds.to_dict(), "exact_dtypes": exact_dtypes},
                  cand_error=cand.error, problems=problems, warnings=identical_warning(rows))


def identical_warning(rows: list[TapResult]) -> list[str]:
    """A doubt worth a line: every tap of the candidate equals the reference's exactly.
    A real fast backend rarely reproduces every bit, so the likelier story is that the
    candidate is not what the user thinks it is (the same code under another name, or a
    patch that reached the reference too)."""
    measured = [r for r in rows if r.metrics is not None]
    if not measured or len(measured) != len(rows):
        return []
    if all(r.metrics.finite and r.metrics.max_abs == 0 for r in measured):
        return [f"identical to the reference on every tap ({len(rows)} taps equal bit for bit): "
                "is the candidate really different?"]
    return []
