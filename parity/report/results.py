"""Result objects of every comparison: they carry the verdict (`bool(result)`), write
themselves as JSON and read themselves back, and render nowhere (report/ renders them).

Every JSON result says what it is (`format`) and in which version (`format_version`);
`load_result` reads any of them back into its object, so a result written once can be
rendered, gated on or mined for taps later without the run that made it."""

from __future__ import annotations

import math
import re
import shlex
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from parity.comparison.limit import Budget, Limit, bound_text
from parity.comparison.metrics import Metrics
from parity.report.schema import check_report
from parity.taps.records import CaptureError, TapInfo
from parity.taps.stats import FIELDS, TapStats

# The JSON formats, each (name, version).  Names are written by every result's `to_dict`
# and read back by `load_result`; bump a version when a reader of the old one would
# misread the new one (adding keys does not).
REPORT_FORMAT, REPORT_VERSION = "parity-report", 1
STATS_REPORT_FORMAT, STATS_REPORT_VERSION = "parity-stats-report", 1
WEIGHTS_FORMAT, WEIGHTS_VERSION = "parity-weights", 1
FRAMES_FORMAT, FRAMES_VERSION = "parity-frames", 1
COMPONENT_FORMAT, COMPONENT_VERSION = "parity-component", 1

# What each format is, and the command that writes one (for the messages of readers).
KINDS = {
    REPORT_FORMAT: ("tensor diff", "`parity diff --json`"),
    STATS_REPORT_FORMAT: ("stats diff", "`parity diff A_stats.h5 B_stats.h5 --json`"),
    WEIGHTS_FORMAT: ("weights comparison", "`parity weights --json`"),
    FRAMES_FORMAT: ("frames comparison", "`parity frames --json`"),
    COMPONENT_FORMAT: ("component re-run", "`parity component --json`"),
}

VERSIONS = {REPORT_FORMAT: REPORT_VERSION, STATS_REPORT_FORMAT: STATS_REPORT_VERSION, WEIGHTS_FORMAT: WEIGHTS_VERSION,
            FRAMES_FORMAT: FRAMES_VERSION, COMPONENT_FORMAT: COMPONENT_VERSION}


def _tag(fmt: str) -> dict[str, Any]:
    return {"format": fmt, "format_version": VERSIONS[fmt]}


def _expect(found: Any, expected: str) -> None:
    """ValueError unless `found` (a JSON's format tag; None = untagged) is `expected`."""
    if found in (None, expected):
        return
    noun, how = KINDS[expected]
    known = isinstance(found, str) and found in KINDS
    other = f"a {KINDS[found][0]} result ({found})" if known else f"a {str(found)[:40]} result"
    raise ValueError(f"{other}, not a {noun} result ({expected}): write one with {how}")


PASS = "pass"


OFFLINE_NOTE = "isolation needs live backends (re-run with --ref/--cand)"


def json_number(x):
    """JSON-safe number: NaN/Inf become None."""
    if x is None:
        return None
    x = float(x)
    return x if math.isfinite(x) else None


def _float(x) -> float:
    """The inverse of json_number, as far as it goes: None -> nan."""
    return math.nan if x is None else float(x)


def _shape(x) -> tuple | None:
    return tuple(x) if x else None


def _metrics_dict(m: Metrics) -> dict[str, Any]:
    return {"n": m.n, "cos": json_number(m.cos), "max_abs": json_number(m.max_abs),
            "mean_abs": json_number(m.mean_abs), "rel_l2": json_number(m.rel_l2),
            "norm_ratio": json_number(m.norm_ratio)}


def _metrics_from(d: dict[str, Any]) -> Metrics:
    """Metrics from their JSON form (None -> nan; counts default to 0)."""
    return Metrics(n=int(d.get("n") or 0), cos=_float(d.get("cos")), max_abs=_float(d.get("max_abs")),
                   mean_abs=_float(d.get("mean_abs")), rel_l2=_float(d.get("rel_l2")),
                   nan_ref=int(d.get("nan_ref") or 0), inf_ref=int(d.get("inf_ref") or 0),
                   nan_cand=int(d.get("nan_cand") or 0), inf_cand=int(d.get("inf_cand") or 0),
                   first_nonfinite=None, max_abs_index=None, norm_ratio=_float(d.get("norm_ratio")))


def _measured(d: dict[str, Any]) -> bool:
    return d.get("cos") is not None or d.get("max_abs") is not None or d.get("nan_ref") is not None


def _info(d: dict[str, Any]) -> TapInfo:
    return TapInfo(d["name"], d["stack"], d["layer"], d["component"], d.get("step"))


@dataclass
class TapResult:
    info: TapInfo
    order: int | None
    status: str  # pass | fail | nonfinite | empty | dtype | shape | layout | missing | extra | raised | not_reached
    reason: str
    threshold: float
    metrics: Metrics | None = None
    ref_shape: tuple | None = None
    cand_shape: tuple | None = None
    ref_dtype: str | None = None
    cand_dtype: str | None = None
    regions: dict[str, Metrics] = field(default_factory=dict)  # per named token region, if the layout has any
    chunks: dict[str, Metrics] = field(default_factory=dict)  # per chunk of canonical positions, if asked
    heads: list[Metrics] = field(default_factory=list)  # per attention head, for [tokens, heads, dim] taps
    max_norm_err: float | None = None  # the size bound; None: the one that follows from `threshold`
    budget: Budget | None = None  # a calibrated verdict, when an oracle judged it
    region_budgets: dict[str, Budget] = field(default_factory=dict)

    @property
    def passed(self) -> bool:
        return self.status == PASS

    @property
    def limit(self) -> Limit:
        """Both bounds this row was judged by, to judge its regions, chunks and heads alike."""
        return Limit(self.threshold, self.max_norm_err) if self.max_norm_err is not None else \
            Limit.of(self.threshold)

    def within(self, m: Metrics) -> bool:
        """Whether a part of this tap (a region, a chunk, a head) meets the tap's bounds."""
        return self.limit.met(m)

    @property
    def failed_bounds(self) -> tuple[str, ...]:
        """The bounds a compared, failing row missed: some of ("cos", "norm")."""
        if self.status != "fail" or self.metrics is None:
            return ()
        if self.budget is not None:
            return ("budget",)
        return self.limit.failed(self.metrics)

    @property
    def key(self) -> str:
        return self.info.key

    @property
    def cos(self) -> float | None:
        return self.metrics.cos if self.metrics else None

    def to_dict(self) -> dict[str, Any]:
        m = self.metrics
        return {
            "tap": self.info.key,
            "order": self.order,
            "name": self.info.name,
            "stack": self.info.stack,
            "layer": self.info.layer,
            "component": self.info.component,
            "step": self.info.step,
            "cos": json_number(m.cos) if m else None,
            "max_abs": json_number(m.max_abs) if m else None,
            "mean_abs": json_number(m.mean_abs) if m else None,
            "rel_l2": json_number(m.rel_l2) if m else None,
            "norm_ratio": json_number(m.norm_ratio) if m else None,
            "nan_ref": m.nan_ref if m else None,
            "nan_cand": m.nan_cand if m else None,
            "inf_ref": m.inf_ref if m else None,
            "inf_cand": m.inf_cand if m else None,
            "threshold": self.threshold,
            "max_norm_err": json_number(self.limit.max_norm_err) if math.isfinite(self.threshold) else None,
            "failed_bounds": list(self.failed_bounds),
            **({"budget": self.budget.to_dict(),
                "region_budgets": {k: b.to_dict() for k, b in self.region_budgets.items()}} if self.budget else {}),
            "status": self.status,
            "reason": self.reason,
            "ref_shape": None if self.ref_shape is None else list(self.ref_shape),
            "cand_shape": None if self.cand_shape is None else list(self.cand_shape),
            "ref_dtype": self.ref_dtype,
            "cand_dtype": self.cand_dtype,
            "n": m.n if m else None,
            "regions": {name: _metrics_dict(rm) for name, rm in self.regions.items()},
            **({"chunks": {name: _metrics_dict(cm) for name, cm in self.chunks.items()}} if self.chunks else {}),
            **({"heads": [_metrics_dict(hm) for hm in self.heads]} if self.heads else {}),
        }

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> TapResult:
        """Inverse of to_dict, for reports re-rendered from JSON (`parity report`)."""
        return cls(info=_info(d), order=d.get("order"), status=d["status"], reason=d.get("reason") or "",
                   threshold=float(d["threshold"]), metrics=_metrics_from(d) if _measured(d) else None,
                   ref_shape=_shape(d.get("ref_shape")), cand_shape=_shape(d.get("cand_shape")),
                   ref_dtype=d.get("ref_dtype"), cand_dtype=d.get("cand_dtype"),
                   regions={k: _metrics_from(v) for k, v in (d.get("regions") or {}).items()},
                   chunks={k: _metrics_from(v) for k, v in (d.get("chunks") or {}).items()},
                   heads=[_metrics_from(v) for v in (d.get("heads") or [])],
                   max_norm_err=None if d.get("max_norm_err") is None else float(d["max_norm_err"]),
                   budget=Budget.from_dict(d["budget"]) if isinstance(d.get("budget"), dict) else None,
                   region_budgets={k: Budget.from_dict(v) for k, v in (d.get("region_budgets") or {}).items()})


def where_dict(row: TapResult) -> dict[str, Any]:
    """A tap's identity and verdict: how the JSON names a first divergence."""
    return {"tap": row.key, "stack": row.info.stack, "layer": row.info.layer, "component": row.info.component,
            "step": row.info.step, "status": row.status, "reason": row.reason}


def _row_from_where(d: dict[str, Any]) -> TapResult:
    """A row from `where_dict`'s form (its threshold and metrics were not kept)."""
    key, step = d["tap"], d.get("step")
    name = key.rsplit("@", 1)[0] if step is not None else key
    return TapResult(TapInfo(name, d["stack"], d.get("layer"), d["component"], step), None, d["status"],
                     d.get("reason") or "", math.nan)


class Verdict:
    """What every result with `rows` (each with a `status`) and `passed` shares: it is its
    own verdict, and it counts its rows by status."""

    def __bool__(self) -> bool:
        return self.passed

    def counts(self) -> dict[str, int]:
        out: dict[str, int] = {}
        for row in self.rows:
            out[row.status] = out.get(row.status, 0) + 1
        return out


def _candidate_error(err: CaptureError | None) -> dict | None:
    return None if err is None else {"tap": err.key, "type": err.exc_type, "message": err.message}


def _report_fields(d: Any, row_from) -> dict[str, Any]:
    """The fields every diff's JSON has (rows read by `row_from`), as Report keywords;
    ValueError names what is wrong."""
    if not isinstance(d, dict) or "taps" not in d or not isinstance(d["taps"], list):
        raise ValueError("not a parity result: no 'taps' list (write one with `parity diff --json`)")
    try:
        rows = [row_from(t) for t in d["taps"]]
    except (KeyError, TypeError, ValueError, AttributeError) as exc:
        raise ValueError(f"malformed tap entry in the parity result: {exc!r}") from None
    err = d.get("candidate_error")
    cand_error = None
    if err:
        info = next((r.info for r in rows if r.key == err.get("tap")), None)
        cand_error = CaptureError(err.get("tap"), info, err.get("type", "?"), err.get("message", ""))
    return dict(rows=rows, ref_meta=dict(d.get("ref") or {}), cand_meta=dict(d.get("cand") or {}),
                cand_error=cand_error, problems=list(d.get("problems") or []))


@dataclass
class Report(Verdict):
    rows: list[TapResult]
    ref_meta: dict = field(default_factory=dict)
    cand_meta: dict = field(default_factory=dict)
    thresholds: dict = field(default_factory=dict)
    cand_error: CaptureError | None = None
    problems: list[str] = field(default_factory=list)  # run-level failures (nothing compared, ...)
    localisation: Localisation | None = None  # which component introduces the first divergence
    warnings: list[str] = field(default_factory=list)  # doubts that do not fail the run

    @property
    def first_divergence(self) -> TapResult | None:
        for row in self.rows:
            if not row.passed:
                return row
        return None

    @property
    def passed(self) -> bool:
        return bool(self.rows) and not self.problems and self.first_divergence is None

    def to_dict(self) -> dict[str, Any]:
        first = self.first_divergence
        return {
            **_tag(REPORT_FORMAT),
            "passed": self.passed,
            "first_divergence": None if first is None else where_dict(first),
            "problems": list(self.problems),
            "warnings": list(self.warnings),
            "counts": self.counts(),
            "thresholds": self.thresholds,
            "ref": self.ref_meta,
            "cand": self.cand_meta,
            "candidate_error": _candidate_error(self.cand_error),
            "isolation": None if self.localisation is None else self.localisation.to_dict(),
            "taps": [r.to_dict() for r in self.rows],
        }

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> Report:
        """A Report from what `parity diff --json` wrote; ValueError names what is wrong."""
        if isinstance(d, dict):
            _expect(d.get("format"), REPORT_FORMAT)
            if isinstance(d.get("taps"), list):
                check_report(d)
        warnings = d.get("warnings") if isinstance(d, dict) else None
        return cls(**_report_fields(d, TapResult.from_dict), thresholds=dict(d.get("thresholds") or {}),
                   localisation=Localisation.from_dict(d.get("isolation")),
                   warnings=[str(w) for w in warnings] if isinstance(warnings, list) else [])


@dataclass
class Localisation:
    """The verdict of the upstream walk.

    start: the component isolated first (the one producing the first divergence), None
        when no recorded component produces it.
    introduced: the component that introduces the error, or None when none failed on its
        own (then `enters` says where the error enters, if the walk found it).
    about: what the introducing component is, in words, when it is code outside layers.
    steps: each isolated component, in the order re-run, as `PartResult.to_dict()`s.
    bracket: the first divergence and the last tap before it that passed ({"after",
        "before", "after_exact"}); between: the components recorded between the two taps
        ([{"unit", "about"}]); skipped: components not re-run because every output of
        theirs passed bit-exactly in the diff.
    enters: where the error enters when no component introduces it, in words.
    note: why no isolation was done (offline dumps, no adapter, ...)."""

    start: str | None = None
    introduced: str | None = None
    hint: str | None = None
    narrowed: str | None = None
    steps: list[dict[str, Any]] = field(default_factory=list)
    note: str | None = None
    about: str | None = None
    bracket: dict[str, Any] | None = None
    between: list[dict[str, Any]] = field(default_factory=list)
    skipped: list[str] = field(default_factory=list)
    enters: str | None = None

    @property
    def inherited(self) -> bool:
        return self.start is not None and self.introduced != self.start

    def to_dict(self) -> dict[str, Any]:
        return {"start": self.start, "introduced": self.introduced, "inherited": self.inherited if self.start else None,
                "hint": self.hint, "narrowed": self.narrowed, "note": self.note, "about": self.about,
                "bracket": self.bracket, "between": self.between, "enters": self.enters, "skipped": self.skipped,
                "steps": self.steps}

    @classmethod
    def from_dict(cls, d: dict[str, Any] | None) -> Localisation | None:
        if not d:
            return None
        return cls(start=d.get("start"), introduced=d.get("introduced"), hint=d.get("hint"),
                   narrowed=d.get("narrowed"), steps=list(d.get("steps") or []), note=d.get("note"),
                   about=d.get("about"), bracket=d.get("bracket"), between=list(d.get("between") or []),
                   skipped=list(d.get("skipped") or []), enters=d.get("enters"))

    def line(self) -> str:
        """The banner's words."""
        if self.note:
            return self.note
        first = self.steps[0] if self.steps else {}
        named = None if self.introduced is None else self.introduced + (f" ({self.about})" if self.about else "")
        if self.introduced is not None and self.introduced == self.start:
            return f"introduced at {named}: fails on the reference's own inputs ({_why(first)})"
        via = first.get("inherited_via") or []
        start = (f"{self.start} matches once it reads the reference's {' and '.join(via)} ({_why(first)} on its own)"
                 if via else f"{self.start} passes on the reference's inputs")
        if self.introduced is not None:
            return (f"inherited: {start}; walked {len(self.steps) - 1} component(s) upstream: introduced at {named} "
                    f"({_why(self.steps[-1])})")
        done = f"{len(self.steps)} re-run" + (f", {len(self.skipped)} bit-exact not re-run" if self.skipped else "")
        if self.enters:
            return f"inherited: {start}; {self.enters} ({done})" if self.start else f"{self.enters} ({done})"
        b = self.bracket or {}
        if b.get("after") is None:
            return (f"no component before {b.get('before')} (the first tap) fails on its own ({done}): the error "
                    "enters in what the run starts from or in code parity cannot re-run")
        if not self.between:
            return (f"no recorded component runs between {b['after']} and {b['before']}: the error enters in code "
                    "between the two taps that parity cannot re-run")
        return (f"no component fails on its own between {b['after']} and {b['before']} or upstream of them in their "
                f"stream ({done}): the error enters in code between the two taps that parity cannot re-run, or "
                f"small errors within the thresholds add up{_largest(self.steps)}")

    def bracket_line(self) -> str | None:
        """Where the error enters in terms of the taps: the last passing one, the first
        failing one and what runs between them (None without a bracket)."""
        b = self.bracket
        if not b or b.get("after") is None:
            return None
        after = b["after"] + (" (bit-exact)" if b.get("after_exact") else "")
        between = [u["unit"] + (f" ({u['about']})" if u.get("about") else "") for u in self.between]
        if len(between) > 4:
            between = between[:2] + [f"... {len(between) - 3} more", between[-1]]
        what = ", ".join(between) if between else "no recorded component"
        return f"enters between {after} and {b['before']}: {what}"


def _largest(steps: list[dict]) -> str:
    """The largest error a re-run component made on the reference's own inputs, in words."""
    errors = [(o.get("rel_l2") or 0.0, step["component"], o.get("tap")) for step in steps
              for o in step.get("outputs", []) if isinstance(o.get("rel_l2"), (int, float))]
    err, component, tap = max(errors, default=(0.0, None, None))
    return f"; the largest error on the reference's own inputs: {component} ({tap} rel L2 {err:.3g})" if err else ""


def _why(step: dict) -> str:
    if step.get("error"):
        return f"raised {step['error']}"
    bad = [o for o in step.get("outputs", []) if o.get("status") != "pass"]
    o = bad[0] if bad else (step.get("outputs") or [{}])[0]
    cos, reason = o.get("cos"), o.get("reason")
    if reason:  # the verdict's own words: which bound it missed
        return f"{o.get('component')} {reason}"
    return f"{o.get('component')} cos {cos:.6f} < {bound_text(o.get('threshold'))}" if cos is not None else \
        str(reason)


MEASURES = ("rel_norm", "rel_std", "mean_shift", "rel_max_abs")


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
            "ref": stats_side(self.ref_stats), "cand": stats_side(self.cand_stats),
        }

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> StatsResult:
        """Inverse of to_dict.  A measure that was not finite reads back as nan (JSON kept
        None), and a summary's token positions (not written) as ""."""
        info, order = _info(d), d.get("order")
        ref_shape, cand_shape = _shape(d.get("ref_shape")), _shape(d.get("cand_shape"))
        computed = any(d.get(m) is not None for m in MEASURES)
        return cls(info=info, order=order, status=d["status"], reason=d.get("reason") or "",
                   threshold=_float(d.get("tolerance")), ref_shape=ref_shape, cand_shape=cand_shape,
                   ref_dtype=d.get("ref_dtype"), cand_dtype=d.get("cand_dtype"),
                   ref_stats=_stats_from(d.get("ref"), info, order, d.get("ref_dtype"), ref_shape),
                   cand_stats=_stats_from(d.get("cand"), info, order, d.get("cand_dtype"), cand_shape),
                   measures={m: _float(d.get(m)) for m in MEASURES} if computed else {},
                   identical=bool(d.get("identical")))


def stats_side(t: TapStats | None) -> dict | None:
    if t is None:
        return None
    return {"checksum": t.checksum, "layout": t.layout, "tokens": t.tokens,
            "summarised_shape": list(t.summarised_shape),
            **{k: json_number(v) for k, v in t.summary().items()}}


def _stats_from(side: dict | None, info: TapInfo, order, dtype, shape) -> TapStats | None:
    if side is None:
        return None
    return TapStats(info=info, order=order, dtype=dtype, layout=side.get("layout"), shape=shape or (),
                    summarised_shape=tuple(side.get("summarised_shape") or ()), tokens=side.get("tokens"),
                    positions="", values=np.array([_float(side.get(k)) for k in FIELDS], dtype=np.float64),
                    checksum=int(side.get("checksum") or 0))


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
        out = [layer_glob(first)]
        rows = [r for r in self.rows if r.order is not None]
        at = next((i for i, r in enumerate(rows) if r is first), None)
        for row in reversed(rows[:at] if at is not None else []):
            if layer_glob(row) not in out:
                out.append(layer_glob(row))
                break
        return out

    def to_dict(self) -> dict[str, Any]:
        first, bits = self.first_divergence, self.first_bit_difference
        taps = self.suggested_taps()
        return {
            **_tag(STATS_REPORT_FORMAT), "passed": self.passed,
            "first_divergence": None if first is None else where_dict(first),
            "first_bit_difference": None if bits is None else where_dict(bits),
            "identical": self.identical_count(),
            "problems": list(self.problems), "counts": self.counts(),
            "tolerances": {"default": self.thresholds.get("min_cos"), "patterns": self.thresholds.get("patterns", {}),
                           "exact_dtypes": self.thresholds.get("exact_dtypes"), "measures": list(MEASURES)},
            "suggested": {"taps": ",".join(taps), "commands": suggested_commands(self, taps)} if taps else None,
            "ref": self.ref_meta, "cand": self.cand_meta,
            "candidate_error": _candidate_error(self.cand_error),
            "taps": [r.to_dict() for r in self.rows],
        }

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> StatsReport:
        """A StatsReport from what a stats diff's `--json` wrote; ValueError names what is wrong."""
        if isinstance(d, dict):
            _expect(d.get("format"), STATS_REPORT_FORMAT)
        fields = _report_fields(d, StatsResult.from_dict)
        tol = d.get("tolerances") or {}
        return cls(**fields, thresholds={"min_cos": tol.get("default"), "patterns": dict(tol.get("patterns") or {}),
                                       "exact_dtypes": tol.get("exact_dtypes")})


def layer_glob(row: TapResult) -> str:
    """A tap's layer as a glob (`prefix.3.*`), or a stack-level tap's own name."""
    info = row.info
    return f"{info.stack}.{info.layer}.*" if info.layer is not None else info.name


def suggested_commands(report: Report, taps: list[str]) -> list[str]:
    """Ready-to-run full captures of the suggested taps (and the live diff), from what the
    runs' metadata says about how they were made; [] when it does not say enough."""
    ref, cand = report.ref_meta, report.cand_meta
    if not ref.get("backend") or not cand.get("backend"):
        return []
    quote = shlex.quote
    common = []
    for key, flag in (("config", "--config"), ("seed", "--seed"), ("batch", "--batch"), ("dtype", "--dtype")):
        if ref.get(key) is not None and ref.get(key) == cand.get(key) and (key, ref.get(key)) not in (
                ("seed", 0), ("batch", 1)):
            common.append(f"{flag} {quote(str(ref[key]))}")
    if ref.get("weights") and isinstance(ref["weights"], dict) and ref["weights"].get("path"):
        common.append(f"--weights {quote(str(ref['weights']['path']))}")
    inject = f" --inject {quote(','.join(cand['faults']))}" if cand.get("faults") else ""
    tail = (" " + " ".join(common)) if common else ""
    sel = quote(",".join(taps))
    return [
        f"parity diff --ref {quote(ref['backend'])} --cand {quote(cand['backend'])}{inject}{tail} --taps {sel}",
        f"parity capture --backend {quote(ref['backend'])}{tail} --taps {sel} -o reports/ref_focus.h5",
        f"parity capture --backend {quote(cand['backend'])}{inject}{tail} --taps {sel} -o reports/cand_focus.h5",
    ]


@dataclass
class ParamResult:
    name: str
    status: str  # pass | fail | transposed | norm_offset | dtype | shape | nonfinite | missing | extra
    reason: str
    threshold: float
    metrics: Metrics | None = None
    ref_shape: tuple | None = None
    cand_shape: tuple | None = None
    ref_dtype: str | None = None
    cand_dtype: str | None = None
    quantized: str | None = None

    @property
    def passed(self) -> bool:
        return self.status == PASS

    @property
    def group(self) -> str:
        """The name with every layer index replaced by `*`: one row per kind of parameter."""
        return re.sub(r"(?<=\.)\d+(?=\.)", "*", self.name)

    def to_dict(self) -> dict[str, Any]:
        m = self.metrics
        return {
            "name": self.name, "status": self.status, "reason": self.reason, "threshold": self.threshold,
            "cos": json_number(m.cos) if m else None, "max_abs": json_number(m.max_abs) if m else None,
            "mean_abs": json_number(m.mean_abs) if m else None, "rel_l2": json_number(m.rel_l2) if m else None,
            "n": m.n if m else None,
            "ref_shape": list(self.ref_shape) if self.ref_shape else None,
            "cand_shape": list(self.cand_shape) if self.cand_shape else None,
            "ref_dtype": self.ref_dtype, "cand_dtype": self.cand_dtype, "quantized": self.quantized,
        }

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> ParamResult:
        """Inverse of to_dict.  JSON written before `n` was kept counts the reference's elements."""
        ref_shape, cand_shape = _shape(d.get("ref_shape")), _shape(d.get("cand_shape"))
        metrics = None
        if _measured(d):
            n = d["n"] if d.get("n") is not None else math.prod(ref_shape or cand_shape or ())
            metrics = _metrics_from({**d, "n": n})
        return cls(name=d["name"], status=d["status"], reason=d.get("reason") or "", threshold=float(d["threshold"]),
                   metrics=metrics, ref_shape=ref_shape, cand_shape=cand_shape, ref_dtype=d.get("ref_dtype"),
                   cand_dtype=d.get("cand_dtype"), quantized=d.get("quantized"))


@dataclass
class WeightsReport(Verdict):
    rows: list[ParamResult]
    ref_meta: dict = field(default_factory=dict)
    cand_meta: dict = field(default_factory=dict)
    thresholds: dict = field(default_factory=dict)
    problems: list[str] = field(default_factory=list)

    @property
    def findings(self) -> list[ParamResult]:
        return [r for r in self.rows if not r.passed]

    @property
    def passed(self) -> bool:
        return bool(self.rows) and not self.problems and not self.findings

    def to_dict(self) -> dict[str, Any]:
        return {
            **_tag(WEIGHTS_FORMAT),
            "passed": self.passed,
            "counts": self.counts(),
            "problems": list(self.problems),
            "thresholds": self.thresholds,
            "ref": self.ref_meta,
            "cand": self.cand_meta,
            "findings": [r.name for r in self.findings],
            "parameters": [r.to_dict() for r in self.rows],
        }

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> WeightsReport:
        _expect(d.get("format"), WEIGHTS_FORMAT)
        return cls(rows=[ParamResult.from_dict(p) for p in d["parameters"]], ref_meta=dict(d.get("ref") or {}),
                   cand_meta=dict(d.get("cand") or {}), thresholds=dict(d.get("thresholds") or {}),
                   problems=list(d.get("problems") or []))


@dataclass
class FramesResult:
    frames: list[Report]  # candidate vs reference at frame 0, 1, ...
    drift: list[Report]  # the reference at frame f vs itself at frame f-1, for f >= 1 (not a verdict)

    @property
    def passed(self) -> bool:
        return bool(self.frames) and all(self.frames)

    def __bool__(self) -> bool:
        return self.passed

    def to_dict(self) -> dict:
        return {
            **_tag(FRAMES_FORMAT),
            "passed": self.passed,
            "frames": [{"frame": f, **_untagged(r.to_dict())} for f, r in enumerate(self.frames)],
            "drift": [{"frame": f + 1, "taps": [t.to_dict() for t in r.rows]} for f, r in enumerate(self.drift)],
        }

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> FramesResult:
        """Inverse of to_dict; a frame written before frames kept their taps reads back as
        a FrameVerdict."""
        _expect(d.get("format"), FRAMES_FORMAT)
        frames = [Report.from_dict(e) if "taps" in e else FrameVerdict.from_dict(e) for e in d["frames"]]
        return cls(frames, [Report.from_dict({"taps": e["taps"]}) for e in d.get("drift") or []])


def _untagged(d: dict[str, Any]) -> dict[str, Any]:
    return {k: v for k, v in d.items() if k not in ("format", "format_version")}


@dataclass
class FrameVerdict(Report):
    """One frame as frames results kept it before they kept its taps: the verdict and the
    first divergence (the only row; its threshold and metrics are lost)."""

    verdict: bool = False

    @property
    def passed(self) -> bool:
        return self.verdict

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> FrameVerdict:
        first = d.get("first_divergence")
        return cls(rows=[_row_from_where(first)] if first else [], verdict=bool(d.get("passed")))


@dataclass(frozen=True)
class Unit:
    """One isolatable component: a part of one layer call, or (`layer` None) one call of
    a probe's stage, code outside layers."""

    stack: str
    layer: int | None
    step: int | None
    part: str

    @property
    def name(self) -> str:
        layer = "" if self.layer is None else f".{self.layer}"
        return f"{self.stack}{layer}.{self.part}" + (f"@{self.step}" if self.step is not None else "")

    @property
    def call(self) -> tuple[str, int, int | None]:
        return (self.stack, self.layer, self.step)

    @property
    def call_key(self) -> tuple[str, str, int | None]:
        """A stage call's key: (stack, part, step)."""
        return (self.stack, self.part, self.step)


@dataclass
class PartResult:
    """A part re-run on the reference's inputs: one row per compared output (q, k and v
    for `qkv`); `error` when the candidate raised; `hint` when a rule's evidence holds."""

    unit: Unit
    rows: list[TapResult] = field(default_factory=list)
    error: str | None = None
    hint: str | None = None
    narrowed: str | None = None  # the failing sub-part, e.g. rope inside qkv
    ref_meta: dict = field(default_factory=dict)
    cand_meta: dict = field(default_factory=dict)
    reads: list[TapResult] = field(default_factory=list)  # what the candidate's part read vs the reference's
    inherited_via: list[str] = field(default_factory=list)  # kept inputs it fails by: it passes on the reference's

    @property
    def passed(self) -> bool:
        return self.error is None and bool(self.rows) and all(r.passed for r in self.rows)

    def __bool__(self) -> bool:
        return self.passed

    @property
    def worst(self) -> TapResult | None:
        failing = [r for r in self.rows if not r.passed]
        pool = failing or self.rows
        return min(pool, key=lambda r: r.cos if r.cos is not None and r.cos == r.cos else -2.0) if pool else None

    def summary(self) -> str:
        if self.error:
            return f"raised: {self.error}"
        w = self.worst
        if w is None:
            return "nothing compared"
        parts = ", ".join(f"{r.info.component} cos={r.cos:.6f}" if r.metrics else f"{r.info.component} {r.status}"
                          for r in self.rows)
        return ("pass: " if self.passed else "fail: ") + parts

    def to_dict(self) -> dict:
        """The re-run alone (as a localisation step keeps it); `component_json` adds the runs."""
        return {"component": self.unit.name, "stack": self.unit.stack, "layer": self.unit.layer,
                "step": self.unit.step, "part": self.unit.part, "passed": self.passed, "error": self.error,
                "hint": self.hint, "narrowed": self.narrowed, "outputs": [r.to_dict() for r in self.rows],
                "reads": [r.to_dict() for r in self.reads], "inherited_via": list(self.inherited_via)}

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> PartResult:
        """Inverse of `component_json` (or of to_dict, without the runs' metadata)."""
        _expect(d.get("format"), COMPONENT_FORMAT)
        return cls(Unit(d["stack"], d["layer"], d.get("step"), d["part"]),
                   [TapResult.from_dict(o) for o in d.get("outputs") or []], error=d.get("error"),
                   hint=d.get("hint"), narrowed=d.get("narrowed"), ref_meta=dict(d.get("ref") or {}),
                   cand_meta=dict(d.get("cand") or {}),
                   reads=[TapResult.from_dict(o) for o in d.get("reads") or []],
                   inherited_via=list(d.get("inherited_via") or []))


def component_json(result: PartResult) -> dict[str, Any]:
    """What `parity component --json` writes: the re-run and both runs' metadata."""
    return {**_tag(COMPONENT_FORMAT), **result.to_dict(), "ref": result.ref_meta, "cand": result.cand_meta}


LOADERS = {REPORT_FORMAT: Report.from_dict, STATS_REPORT_FORMAT: StatsReport.from_dict,
           WEIGHTS_FORMAT: WeightsReport.from_dict, FRAMES_FORMAT: FramesResult.from_dict,
           COMPONENT_FORMAT: PartResult.from_dict}


def _shape_of(data: dict[str, Any]) -> str | None:
    """The format of an untagged result, from its keys: diff reports were read without a
    tag before (hand-made ones too); weights and frames results had none until version 1."""
    if isinstance(data.get("taps"), list):
        return REPORT_FORMAT
    if isinstance(data.get("parameters"), list) and "findings" in data:
        return WEIGHTS_FORMAT
    if isinstance(data.get("frames"), list) and "drift" in data:
        return FRAMES_FORMAT
    return None


def load_result(data: Any, expect: str | None = None):
    """Any result parity wrote as JSON (`json.loads` of it), as its object: a Report,
    StatsReport, WeightsReport, FramesResult or PartResult, chosen by the `format` tag (by
    the shape for old untagged ones).  `expect`: the one format the caller can use.
    ValueError, with a one-line message, for anything else."""
    if not isinstance(data, dict):
        raise ValueError(f"not a parity result: a JSON {type(data).__name__}, not an object")
    fmt = data["format"] if "format" in data else _shape_of(data)
    if fmt is None:
        raise ValueError("not a parity result: no 'format' tag and not the shape of one (no 'taps' list; "
                         "write one with `parity diff --json`)")
    if not isinstance(fmt, str) or fmt not in LOADERS:
        raise ValueError(f"unknown result format {str(fmt)[:40]!r}: parity writes {', '.join(LOADERS)}")
    version = data.get("format_version", VERSIONS[fmt])
    if version != VERSIONS[fmt] or isinstance(version, bool):
        raise ValueError(f"{fmt} format_version {repr(version)[:20]} is not supported; this version of parity "
                         f"reads format_version {VERSIONS[fmt]} only")
    if expect is not None:
        _expect(fmt, expect)
    try:
        return LOADERS[fmt](data)
    except (KeyError, TypeError, AttributeError) as exc:
        raise ValueError(f"malformed {KINDS[fmt][0]} result ({fmt}): {exc!r}") from None
