"""Comparing two stats runs: which taps are bit-identical, which drifted, where it starts.

The pairing, run-level problems and the verdict are the tensor diff's own (`diff.diff`
with a per-tap comparator, a `Report` subclass); only judging one tap pair differs:

- bit-identical (equal checksums, dtypes, shapes and valid token positions): pass;
- a NaN/Inf on either side, a shape, dtype or token-position mismatch: fail, as in the
  tensor diff;
- otherwise the relative change of the L2 norm, of the standard deviation and of max |x|,
  and the mean's shift in units of the reference's standard deviation; any beyond the
  tap's tolerance fails it.

Relationship to the tensor diff of the same runs: every tap before the first checksum
difference is bit-identical, so the tensor diff passes it too; the first divergence of a
tensor diff is therefore never earlier than `first_bit_difference`.  Summaries can miss an
error that keeps them (a permutation, a sign flip of a symmetric tensor), so the stats
diff's first divergence is where summaries show it, at or after the tensor diff's; it
names the taps worth capturing in full (`suggested_taps`).
"""

from __future__ import annotations

import math

from parity.comparison.loop import diff
from parity.comparison.rules import Thresholds
from parity.report.results import MEASURES, PASS, StatsReport, StatsResult
from parity.taps.stats import StatsCapture, TapStats

DEFAULT_TOLERANCE = 0.05


def tolerances(default: float = DEFAULT_TOLERANCE, specs: list[str] | tuple[str, ...] = ()) -> Thresholds:
    """Per-tap relative tolerances: `default` unless a GLOB=VALUE spec matches (last wins).

    A tensor diff's Thresholds, read as tolerances; ValueError outside (0, 1]."""
    if not 0 < default <= 1:
        raise ValueError(f"stats tolerance {default} is outside (0, 1]")
    try:
        tol = Thresholds.parse(default, list(specs))
    except ValueError as exc:
        raise ValueError(str(exc).replace("cosine threshold", "stats tolerance").replace("MIN_COS", "TOL")
                         .replace("[-1, 1]", "(0, 1]")) from None
    for glob, value in tol.patterns:
        if not 0 < value <= 1:
            raise ValueError(f"stats tolerance {value} ({glob}) is outside (0, 1]")
    return tol


def _relative(cand: float, ref: float) -> float:
    """(cand - ref) / |ref|, defined at 0: 0 when both are 0, inf when only ref is."""
    if cand == ref:
        return 0.0
    return (cand - ref) / abs(ref) if ref != 0 else math.copysign(math.inf, cand - ref)


def _shift(delta: float, scale: float) -> float:
    """delta in units of scale, defined at 0 like _relative."""
    if delta == 0:
        return 0.0
    return delta / scale if scale != 0 else math.copysign(math.inf, delta)


def measures(ref: TapStats, cand: TapStats) -> dict[str, float]:
    return {
        "rel_norm": _relative(cand["l2"], ref["l2"]),
        "rel_std": _relative(cand["std"], ref["std"]),
        "mean_shift": _shift(cand["mean"] - ref["mean"], ref["std"]),
        "rel_max_abs": _relative(cand["max_abs"], ref["max_abs"]),
    }


def _nonfinite(t: TapStats) -> str:
    parts = [f"{label} {int(t[k])}" for k, label in (("nan", "NaN"), ("posinf", "+Inf"), ("neginf", "-Inf")) if t[k]]
    return ", ".join(parts) or "none"


def compare_stats(ref: TapStats, cand: TapStats, _ref_layouts, _cand_layouts, tol: float,
                  exact_dtypes: bool = True, _chunk=None) -> StatsResult:
    """One tap pair (the signature of `diff.compare_taps`).  Never raises."""
    base = dict(info=ref.info, order=ref.order, threshold=tol, ref_shape=ref.shape, cand_shape=cand.shape,
                ref_dtype=ref.dtype, cand_dtype=cand.dtype, ref_stats=ref, cand_stats=cand)
    both = f"ref {list(ref.shape)} {ref.dtype}, cand {list(cand.shape)} {cand.dtype}"
    if (ref.tokens, ref.positions) != (cand.tokens, cand.positions):
        def which(t):
            return f"{t.summarised_shape[0] if t.summarised_shape else 1} valid" if t.tokens == "valid" else "all"
        return StatsResult(status="layout", reason=f"valid token positions differ (ref {which(ref)}, cand "
                                                   f"{which(cand)}; {both})", **base)
    if ref.summarised_shape != cand.summarised_shape:
        return StatsResult(status="shape", reason=f"shape {list(ref.shape)} vs {list(cand.shape)} ({both})", **base)
    identical = ref.checksum == cand.checksum and ref.dtype == cand.dtype
    if ref["finite"] != ref["count"] or cand["finite"] != cand["count"]:
        return StatsResult(status="nonfinite", reason=f"NaN/Inf: ref {_nonfinite(ref)}, cand {_nonfinite(cand)}",
                           identical=identical, **base)
    if ref["count"] == 0:
        return StatsResult(status="empty", reason="no valid elements to compare", identical=identical, **base)
    if exact_dtypes and ref.dtype != cand.dtype:
        return StatsResult(status="dtype", reason=f"dtype {ref.dtype} vs {cand.dtype}", **base)
    m = {k: 0.0 for k in MEASURES} if identical else measures(ref, cand)
    over = [f"{k} {v:+.3g}" for k, v in m.items() if not abs(v) <= tol]
    if over:
        return StatsResult(status="fail", reason=f"{', '.join(over)} beyond {tol:g}", measures=m, **base)
    return StatsResult(status=PASS, reason="bit-identical" if identical else "", measures=m, identical=identical,
                       **base)


def diff_stats(ref: StatsCapture, cand: StatsCapture, tol: Thresholds | None = None,
               labels: tuple[str, str] = ("reference", "candidate")) -> StatsReport:
    """Compare two stats runs tap by tap in the reference's execution order (fails closed,
    as the tensor diff: missing/extra taps, a raised or interrupted run never pass)."""
    report = diff(ref, cand, tol or tolerances(), compare=compare_stats, labels=labels)
    ref_by, cand_by = ref.by_key(), cand.by_key()
    rows = [r if isinstance(r, StatsResult)  # missing, extra, raised, not reached: the diff's own rows
            else StatsResult(**vars(r), ref_stats=ref_by.get(r.key), cand_stats=cand_by.get(r.key))
            for r in report.rows]
    return StatsReport(rows=rows, ref_meta=report.ref_meta, cand_meta=report.cand_meta,
                       thresholds=report.thresholds, cand_error=report.cand_error, problems=report.problems)
