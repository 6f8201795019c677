"""Result objects of a diff: they carry the verdict (`bool(report)`) and render nowhere."""

from __future__ import annotations

import math
import re
import shlex
from dataclasses import dataclass, field
from typing import Any

from parity.comparison.metrics import Metrics
from parity.taps.records import CaptureError, TapInfo
from parity.taps.stats import TapStats


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
            "passed": self.passed,
            "frames": [{"frame": f, "passed": r.passed,
                        "first_divergence": r.to_dict()["first_divergence"]} for f, r in enumerate(self.frames)],
            "drift": [{"frame": f + 1, "taps": [t.to_dict() for t in r.rows]} for f, r in enumerate(self.drift)],
        }


OFFLINE_NOTE = "isolation needs live backends (re-run with --ref/--cand)"


@dataclass
class Localisation:
    """The verdict of the upstream walk.

    start: the component isolated first (the one producing the first divergence).
    introduced: the component that introduces the error, or None when none failed on its
        own (then the error comes from outside every isolatable component: embeddings,
        inputs, or small errors that only add up).
    steps: each isolated component, latest first, as `PartResult.to_dict()`s.
    note: why no isolation was done (offline dumps, no adapter, ...)."""

    start: str | None = None
    introduced: str | None = None
    hint: str | None = None
    narrowed: str | None = None
    steps: list[dict[str, Any]] = field(default_factory=list)
    note: str | None = None

    @property
    def inherited(self) -> bool:
        return self.start is not None and self.introduced != self.start

    def to_dict(self) -> dict[str, Any]:
        return {"start": self.start, "introduced": self.introduced, "inherited": self.inherited if self.start else None,
                "hint": self.hint, "narrowed": self.narrowed, "note": self.note, "steps": self.steps}

    @classmethod
    def from_dict(cls, d: dict[str, Any] | None) -> "Localisation | None":
        if not d:
            return None
        return cls(start=d.get("start"), introduced=d.get("introduced"), hint=d.get("hint"),
                   narrowed=d.get("narrowed"), steps=list(d.get("steps") or []), note=d.get("note"))

    def line(self) -> str:
        """The banner's words."""
        if self.note:
            return self.note
        if self.start is None:
            return "no component to isolate"
        first = self.steps[0] if self.steps else {}
        if self.introduced == self.start:
            return f"introduced at {self.start}: fails on the reference's own inputs ({_why(first)})"
        walked = len(self.steps) - 1
        if self.introduced is None:
            return (f"inherited: {self.start} passes on the reference's inputs; no component up to the first "
                    f"layer fails on its own ({walked} checked): the error enters before them")
        last = self.steps[-1]
        return (f"inherited: {self.start} passes on the reference's inputs; walked {walked} component(s) upstream: "
                f"introduced at {self.introduced} ({_why(last)})")


def _why(step: dict) -> str:
    if step.get("error"):
        return f"raised {step['error']}"
    bad = [o for o in step.get("outputs", []) if o.get("status") != "pass"]
    o = bad[0] if bad else (step.get("outputs") or [{}])[0]
    cos = o.get("cos")
    return f"{o.get('component')} cos {cos:.6f} < {o.get('threshold')}" if cos is not None else str(o.get("reason"))


PASS = "pass"


REPORT_FORMAT, REPORT_VERSION = "parity-report", 1


def json_number(x):
    """JSON-safe number: NaN/Inf become None."""
    if x is None:
        return None
    x = float(x)
    return x if math.isfinite(x) else None


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

    @property
    def passed(self) -> bool:
        return self.status == PASS

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
            "nan_ref": m.nan_ref if m else None,
            "nan_cand": m.nan_cand if m else None,
            "inf_ref": m.inf_ref if m else None,
            "inf_cand": m.inf_cand if m else None,
            "threshold": self.threshold,
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
    def from_dict(cls, d: dict[str, Any]) -> "TapResult":
        """Inverse of to_dict, for reports re-rendered from JSON (`parity report`)."""
        info = TapInfo(d["name"], d["stack"], d["layer"], d["component"], d.get("step"))
        metrics = None
        if d.get("cos") is not None or d.get("max_abs") is not None or d.get("nan_ref") is not None:
            metrics = _metrics_from(d)
        return cls(info=info, order=d.get("order"), status=d["status"], reason=d.get("reason") or "",
                   threshold=float(d["threshold"]), metrics=metrics,
                   ref_shape=tuple(d["ref_shape"]) if d.get("ref_shape") else None,
                   cand_shape=tuple(d["cand_shape"]) if d.get("cand_shape") else None,
                   ref_dtype=d.get("ref_dtype"), cand_dtype=d.get("cand_dtype"),
                   regions={k: _metrics_from(v) for k, v in (d.get("regions") or {}).items()},
                   chunks={k: _metrics_from(v) for k, v in (d.get("chunks") or {}).items()},
                   heads=[_metrics_from(v) for v in (d.get("heads") or [])])


def _metrics_dict(m: Metrics) -> dict[str, Any]:
    return {"n": m.n, "cos": json_number(m.cos), "max_abs": json_number(m.max_abs),
            "mean_abs": json_number(m.mean_abs), "rel_l2": json_number(m.rel_l2)}


def _float(x) -> float:
    return math.nan if x is None else float(x)


def _metrics_from(d: dict[str, Any]) -> Metrics:
    """Metrics from their JSON form (None -> nan; counts default to 0)."""
    return Metrics(n=int(d.get("n") or 0), cos=_float(d.get("cos")), max_abs=_float(d.get("max_abs")),
                   mean_abs=_float(d.get("mean_abs")), rel_l2=_float(d.get("rel_l2")),
                   nan_ref=int(d.get("nan_ref") or 0), inf_ref=int(d.get("inf_ref") or 0),
                   nan_cand=int(d.get("nan_cand") or 0), inf_cand=int(d.get("inf_cand") or 0),
                   first_nonfinite=None, max_abs_index=None)


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


@dataclass
class Report(Verdict):
    rows: list[TapResult]
    ref_meta: dict = field(default_factory=dict)
    cand_meta: dict = field(default_factory=dict)
    thresholds: dict = field(default_factory=dict)
    cand_error: CaptureError | None = None
    problems: list[str] = field(default_factory=list)  # run-level failures (nothing compared, ...)
    localisation: Any = None  # parity.localise.Localisation: which component introduces the first divergence

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
            "format": REPORT_FORMAT,
            "format_version": REPORT_VERSION,
            "passed": self.passed,
            "first_divergence": None if first is None else {
                "tap": first.key, "stack": first.info.stack, "layer": first.info.layer,
                "component": first.info.component, "step": first.info.step, "status": first.status,
                "reason": first.reason,
            },
            "problems": list(self.problems),
            "counts": self.counts(),
            "thresholds": self.thresholds,
            "ref": self.ref_meta,
            "cand": self.cand_meta,
            "candidate_error": None if self.cand_error is None else {
                "tap": self.cand_error.key, "type": self.cand_error.exc_type, "message": self.cand_error.message,
            },
            "isolation": None if self.localisation is None else self.localisation.to_dict(),
            "taps": [r.to_dict() for r in self.rows],
        }

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "Report":
        """A Report from what `parity diff --json` wrote; ValueError names what is wrong."""
        if isinstance(d, dict) and d.get("format") not in (None, REPORT_FORMAT):
            raise ValueError(f"a {str(d.get('format'))[:40]} result, not a tensor diff's ({REPORT_FORMAT}): "
                             "`parity report` renders `parity diff --json` results of tensor diffs")
        if not isinstance(d, dict) or "taps" not in d or not isinstance(d["taps"], list):
            raise ValueError("not a parity result: no 'taps' list (write one with `parity diff --json`)")
        try:
            rows = [TapResult.from_dict(t) for t in d["taps"]]
        except (KeyError, TypeError, ValueError) as exc:
            raise ValueError(f"malformed tap entry in the parity result: {exc!r}") from None
        err = d.get("candidate_error")
        cand_error = None
        if err:
            info = next((r.info for r in rows if r.key == err.get("tap")), None)
            cand_error = CaptureError(err.get("tap"), info, err.get("type", "?"), err.get("message", ""))
        from parity.report.results import Localisation

        return cls(rows=rows, ref_meta=dict(d.get("ref") or {}), cand_meta=dict(d.get("cand") or {}),
                   thresholds=dict(d.get("thresholds") or {}), cand_error=cand_error,
                   problems=list(d.get("problems") or []), localisation=Localisation.from_dict(d.get("isolation")))


STATS_REPORT_FORMAT, STATS_REPORT_VERSION = "parity-stats-report", 1


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


def stats_side(t: TapStats | None) -> dict | None:
    if t is None:
        return None
    return {"checksum": t.checksum, "layout": t.layout, "tokens": t.tokens, "summarised_shape": list(t.summarised_shape),
            **{k: json_number(v) for k, v in t.summary().items()}}


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
            "format": STATS_REPORT_FORMAT, "format_version": STATS_REPORT_VERSION, "passed": self.passed,
            "first_divergence": None if first is None else where_dict(first),
            "first_bit_difference": None if bits is None else where_dict(bits),
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


def layer_glob(row: TapResult) -> str:
    """A tap's layer as a glob (`prefix.3.*`), or a stack-level tap's own name."""
    info = row.info
    return f"{info.stack}.{info.layer}.*" if info.layer is not None else info.name


def where_dict(row: TapResult) -> dict[str, Any]:
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


PASS = "pass"


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
            "ref_shape": list(self.ref_shape) if self.ref_shape else None,
            "cand_shape": list(self.cand_shape) if self.cand_shape else None,
            "ref_dtype": self.ref_dtype, "cand_dtype": self.cand_dtype, "quantized": self.quantized,
        }


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
            "passed": self.passed,
            "counts": self.counts(),
            "problems": list(self.problems),
            "thresholds": self.thresholds,
            "ref": self.ref_meta,
            "cand": self.cand_meta,
            "findings": [r.name for r in self.findings],
            "parameters": [r.to_dict() for r in self.rows],
        }
