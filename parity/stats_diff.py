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
import shlex
from dataclasses import dataclass, field
from typing import Any

from .diff import Thresholds, diff
from .report import PASS, Report, TapResult, json_number
from .stats import StatsCapture, TapStats

DEFAULT_TOLERANCE = 0.05
STATS_REPORT_FORMAT, STATS_REPORT_VERSION = "parity-stats-report", 1
MEASURES = ("rel_norm", "rel_std", "mean_shift", "rel_max_abs")


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


@dataclass
class StatsResult(TapResult):
    """One tap pair of a stats diff: the tensor diff's row plus both summaries and measures."""

    ref_stats: TapStats | None = None
    cand_stats: TapStats | None = None
    measures: dict[str, float] = field(default_factory=dict)
    identical: bool = False

    @property
    def worst(self) -> float | None:
        """The largest |measure| (None when none was computed)."""
        values = [abs(v) for v in self.measures.values()]
        return max(values) if values else None

    def to_dict(self) -> dict[str, Any]:
        return {
            "tap": self.info.key, "order": self.order, "name": self.info.name, "stack": self.info.stack,
            "layer": self.info.layer, "component": self.info.component, "step": self.info.step,
            "status": self.status, "reason": self.reason, "identical": self.identical, "tolerance": self.threshold,
            **{m: json_number(self.measures.get(m)) for m in MEASURES},
            "ref_shape": None if self.ref_shape is None else list(self.ref_shape),
            "cand_shape": None if self.cand_shape is None else list(self.cand_shape),
            "ref_dtype": self.ref_dtype, "cand_dtype": self.cand_dtype,
            "ref": _side(self.ref_stats), "cand": _side(self.cand_stats),
        }


def _side(t: TapStats | None) -> dict | None:
    if t is None:
        return None
    return {"checksum": t.checksum, "layout": t.layout, "tokens": t.tokens, "summarised_shape": list(t.summarised_shape),
            **{k: json_number(v) for k, v in t.summary().items()}}


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


@dataclass
class StatsReport(Report):
    """A stats diff: truthy when every tap passed; also knows where bits first differ and
    which taps to capture in full."""

    @property
    def first_bit_difference(self) -> StatsResult | None:
        for row in self.rows:
            if not getattr(row, "identical", False):
                return row
        return None

    def identical_count(self) -> int:
        return sum(1 for r in self.rows if getattr(r, "identical", False))

    def suggested_taps(self) -> list[str]:
        """Globs for a full capture: the first divergence's layer and its upstream
        neighbour (the nearest earlier layer, or stack-level tap, in execution order),
        which gives the tensor diff the divergence and a matching input to it.  Empty when
        nothing diverged."""
        first = self.first_divergence
        if first is None:
            return []
        out = [_group(first)]
        rows = [r for r in self.rows if r.order is not None]
        at = next((i for i, r in enumerate(rows) if r is first), None)
        for row in reversed(rows[:at] if at is not None else []):
            if _group(row) not in out:
                out.append(_group(row))
                break
        return out

    def to_dict(self) -> dict[str, Any]:
        first, bits = self.first_divergence, self.first_bit_difference
        taps = self.suggested_taps()
        return {
            "format": STATS_REPORT_FORMAT, "format_version": STATS_REPORT_VERSION, "passed": self.passed,
            "first_divergence": None if first is None else _where(first),
            "first_bit_difference": None if bits is None else _where(bits),
            "identical": self.identical_count(),
            "problems": list(self.problems), "counts": self.counts(),
            "tolerances": {"default": self.thresholds.get("min_cos"), "patterns": self.thresholds.get("patterns", {}),
                           "exact_dtypes": self.thresholds.get("exact_dtypes"), "measures": list(MEASURES)},
            "suggested": {"taps": ",".join(taps), "commands": suggested_commands(self, taps)} if taps else None,
            "ref": self.ref_meta, "cand": self.cand_meta,
            "candidate_error": None if self.cand_error is None else {
                "tap": self.cand_error.key, "type": self.cand_error.exc_type, "message": self.cand_error.message},
            "taps": [r.to_dict() for r in self.rows],
        }


def _group(row: TapResult) -> str:
    """A tap's layer as a glob (`prefix.3.*`), or a stack-level tap's own name."""
    info = row.info
    return f"{info.stack}.{info.layer}.*" if info.layer is not None else info.name


def _where(row: TapResult) -> dict[str, Any]:
    return {"tap": row.key, "stack": row.info.stack, "layer": row.info.layer, "component": row.info.component,
            "step": row.info.step, "status": row.status, "reason": row.reason}


def _quote(text: str) -> str:
    return shlex.quote(text)


def suggested_commands(report: Report, taps: list[str]) -> list[str]:
    """Ready-to-run full captures of the suggested taps (and the live diff), from what the
    runs' metadata says about how they were made; [] when it does not say enough."""
    ref, cand = report.ref_meta, report.cand_meta
    if not ref.get("backend") or not cand.get("backend"):
        return []
    common = []
    for key, flag in (("config", "--config"), ("seed", "--seed"), ("batch", "--batch"), ("dtype", "--dtype")):
        if ref.get(key) is not None and ref.get(key) == cand.get(key) and (key, ref.get(key)) not in (
                ("seed", 0), ("batch", 1)):
            common.append(f"{flag} {_quote(str(ref[key]))}")
    if ref.get("weights") and isinstance(ref["weights"], dict) and ref["weights"].get("path"):
        common.append(f"--weights {_quote(str(ref['weights']['path']))}")
    inject = f" --inject {_quote(','.join(cand['faults']))}" if cand.get("faults") else ""
    tail = (" " + " ".join(common)) if common else ""
    sel = _quote(",".join(taps))
    return [
        f"parity diff --ref {_quote(ref['backend'])} --cand {_quote(cand['backend'])}{inject}{tail} --taps {sel}",
        f"parity capture --backend {_quote(ref['backend'])}{tail} --taps {sel} -o reports/ref_focus.h5",
        f"parity capture --backend {_quote(cand['backend'])}{inject}{tail} --taps {sel} -o reports/cand_focus.h5",
    ]


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
