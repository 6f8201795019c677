"""Result objects of a diff: they carry the verdict (`bool(report)`) and render nowhere."""
from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any

from .metrics import Metrics
from .records import CaptureError, TapInfo

PASS = "pass"


def _num(x):
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
            "name": self.info.name,
            "stack": self.info.stack,
            "layer": self.info.layer,
            "component": self.info.component,
            "step": self.info.step,
            "cos": _num(m.cos) if m else None,
            "max_abs": _num(m.max_abs) if m else None,
            "mean_abs": _num(m.mean_abs) if m else None,
            "rel_l2": _num(m.rel_l2) if m else None,
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
        }


@dataclass
class Report:
    rows: list[TapResult]
    ref_meta: dict = field(default_factory=dict)
    cand_meta: dict = field(default_factory=dict)
    thresholds: dict = field(default_factory=dict)
    cand_error: CaptureError | None = None
    problems: list[str] = field(default_factory=list)  # run-level failures (nothing compared, ...)

    @property
    def first_divergence(self) -> TapResult | None:
        for row in self.rows:
            if not row.passed:
                return row
        return None

    @property
    def passed(self) -> bool:
        return bool(self.rows) and not self.problems and self.first_divergence is None

    def __bool__(self) -> bool:
        return self.passed

    def counts(self) -> dict[str, int]:
        out: dict[str, int] = {}
        for row in self.rows:
            out[row.status] = out.get(row.status, 0) + 1
        return out

    def to_dict(self) -> dict[str, Any]:
        first = self.first_divergence
        return {
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
            "taps": [r.to_dict() for r in self.rows],
        }
