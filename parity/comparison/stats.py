"""Comparing two stats runs: which taps are bit-identical, which drifted, where it starts.

The pairing, run-level problems and the verdict are the tensor diff's own (`loop.diff`
with a per-tap comparator, a `Report` subclass); only judging one tap pair differs:

- bit-identical (equal checksums, dtypes, shapes and valid token positions): pass;
- a NaN/Inf on either side, a dtype change: fail, as in the tensor diff; a shape or
  token-position mismatch: refused by the tensor diff's own pair check (`align.refusal`);
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

from parity.comparison.align import Side, refusal
from parity.comparison.loop import diff
from parity.comparison.rules import Bound, Thresholds, row
from parity.report.results import MEASURES, PASS, StatsReport, StatsResult
from parity.taps.stats import TOKENS_VALID, StatsCapture, TapStats

DEFAULT_TOLERANCE = 0.05


TOLERANCE = Bound("stats tolerance", "TOL", "max", 0.0, 1.0, low_open=True)  # on each measure's size


def tolerances(default: float = DEFAULT_TOLERANCE, specs: list[str] | tuple[str, ...] = ()) -> Thresholds:
    """Per-tap relative tolerances: `default` unless a GLOB=VALUE spec matches (last wins);
    ValueError outside (0, 1]."""
    return Thresholds.parse(default, list(specs), TOLERANCE)


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


def summarised(t: TapStats) -> Side:
    """What a summary covers, as the pair check sees a side: its valid tokens (identified
    by the digest of their positions) or the whole tensor."""
    return Side(tuple(t.summarised_shape), t.positions if t.tokens == TOKENS_VALID else None)


def compare_stats(ref: TapStats, cand: TapStats, _ref_layouts, _cand_layouts, tol: float,
                  exact_dtypes: bool = True, _chunk=None) -> StatsResult:
    """One tap pair (the signature of `host.compare_taps`).  Never raises."""
    def result(status: str, reason: str, **fields) -> StatsResult:
        return row(ref, cand, tol, status, reason, StatsResult, ref_stats=ref, cand_stats=cand, **fields)

    why = refusal(ref, cand, summarised(ref), summarised(cand), decodes=False)  # summaries: any dtype
    if why is not None:
        return result(why.status, why.reason)
    identical = ref.checksum == cand.checksum and ref.dtype == cand.dtype
    if ref["finite"] != ref["count"] or cand["finite"] != cand["count"]:
        return result("nonfinite", f"NaN/Inf: ref {_nonfinite(ref)}, cand {_nonfinite(cand)}", identical=identical)
    if ref["count"] == 0:
        return result("empty", "no valid elements to compare", identical=identical)
    if exact_dtypes and ref.dtype != cand.dtype:
        return result("dtype", f"dtype {ref.dtype} vs {cand.dtype}")
    m = dict.fromkeys(MEASURES, 0.0) if identical else measures(ref, cand)
    over = [f"{k} {v:+.3g}" for k, v in m.items() if not TOLERANCE.met(v, tol)]
    if over:
        return result("fail", f"{', '.join(over)} beyond {tol:g}", measures=m)
    return result(PASS, "bit-identical" if identical else "", measures=m, identical=identical)


def check_meta(meta: dict, label: str) -> None:
    """ValueError unless the metadata a stats diff reads to suggest commands has its types:
    `backend` a string, `faults` a list of strings (either may be absent)."""
    backend, faults = meta.get("backend"), meta.get("faults")
    if backend is not None and not isinstance(backend, str):
        raise ValueError(f"{label}: its meta backend is {type(backend).__name__} {repr(backend)[:60]}, not a string")
    if faults is not None and not (isinstance(faults, list) and all(isinstance(f, str) for f in faults)):
        raise ValueError(f"{label}: its meta faults is {type(faults).__name__} {repr(faults)[:60]}, not a list of "
                         "names")


def diff_stats(ref: StatsCapture, cand: StatsCapture, tol: Thresholds | None = None,
               labels: tuple[str, str] = ("reference", "candidate")) -> StatsReport:
    """Compare two stats runs tap by tap in the reference's execution order (fails closed,
    as the tensor diff: missing/extra taps, a raised or interrupted run never pass).
    ValueError if a run's metadata is of the wrong type (`check_meta`)."""
    for run, label in zip((ref, cand), labels, strict=True):
        check_meta(run.meta, label)
    report = diff(ref, cand, tol or tolerances(), compare=compare_stats, labels=labels)
    ref_by, cand_by = ref.by_key(), cand.by_key()
    rows = [r if isinstance(r, StatsResult)  # missing, extra, raised, not reached: the diff's own rows
            else StatsResult(**vars(r), ref_stats=ref_by.get(r.key), cand_stats=cand_by.get(r.key))
            for r in report.rows]
    return StatsReport(rows=rows, ref_meta=report.ref_meta, cand_meta=report.cand_meta,
                       thresholds=report.thresholds, cand_error=report.cand_error, problems=report.problems)
