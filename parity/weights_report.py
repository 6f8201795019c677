"""Result objects of `parity weights`: they carry the verdict (`bool(report)`) and render nowhere."""
from __future__ import annotations

import re
from dataclasses import dataclass, field
from typing import Any

from .metrics import Metrics
from .report import Verdict, json_number

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
