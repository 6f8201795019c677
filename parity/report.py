"""Result objects of a diff: they carry the verdict (`bool(report)`) and render nowhere."""
from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any

from .metrics import Metrics
from .records import CaptureError, TapInfo

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
        from .localise import Localisation

        return cls(rows=rows, ref_meta=dict(d.get("ref") or {}), cand_meta=dict(d.get("cand") or {}),
                   thresholds=dict(d.get("thresholds") or {}), cand_error=cand_error,
                   problems=list(d.get("problems") or []), localisation=Localisation.from_dict(d.get("isolation")))
