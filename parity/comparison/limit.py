"""One tap pair's two bounds: direction (a minimum cosine) and size (the norm ratio).

Apart from the rules so that result types can judge their regions, chunks and heads by
the same bounds without importing the rules (which make result rows).  Why two bounds,
and why the size bound that follows from a cosine bound: parity.comparison.rules.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from parity.comparison.metrics import Metrics


def norm_err_for(min_cos: float) -> float:
    """The size bound that goes with a cosine bound: the relative error of noise at it."""
    return math.sqrt(max(0.0, 2.0 * (1.0 - min_cos)))


@dataclass(frozen=True)
class Limit:
    """What one pair must meet: cos >= min_cos (direction) and |norm_ratio - 1| <=
    max_norm_err (size)."""

    min_cos: float
    max_norm_err: float

    @classmethod
    def of(cls, limit: Limit | float) -> Limit:
        """A Limit as is; a bare cosine bound with the size bound that follows from it."""
        return limit if isinstance(limit, Limit) else cls(float(limit), norm_err_for(float(limit)))

    def failed(self, m: Metrics) -> tuple[str, ...]:
        """The bounds `m` misses: () or some of ("cos", "norm") (NaN never meets one)."""
        out = []
        if not m.cos >= self.min_cos:
            out.append("cos")
        # NaN: not measured (results from before the ratio was recorded); the cosine decides.
        if not math.isnan(m.norm_ratio) and not abs(m.norm_ratio - 1.0) <= self.max_norm_err:
            out.append("norm")
        return tuple(out)

    def met(self, m: Metrics) -> bool:
        return not self.failed(m)

    def reason(self, m: Metrics) -> str:
        """Why `m` fails, bound by bound: "cos 0.91 < 0.999; norm ratio 2.0000 (size off by 1 > 0.0447)"."""
        parts = []
        failed = self.failed(m)
        if "cos" in failed:
            parts.append(f"cos {m.cos:.6f} < {bound_text(self.min_cos)}")
        if "norm" in failed:
            parts.append(f"norm ratio {m.norm_ratio:.4f} (size off by {abs(m.norm_ratio - 1.0):.3g} > "
                         f"{self.max_norm_err:.3g})")
        return "; ".join(parts)


def bound_text(value: float) -> str:
    """A bound as short as it can be written without moving it noticeably: 0.999 as
    0.999, a calibrated 0.99983830231 as 0.9998383, 0.9999999999998 as 1 - 2e-13 (never 1
    for a bound below 1)."""
    if value < 1.0 and 1.0 - value < 1e-4:  # a calibrated bound close to 1: its distance says more
        return f"1 - {1.0 - value:.2g}"
    for digits in range(3, 18):
        text = f"{value:.{digits}g}"
        if float(text) == value or abs(float(text) - value) <= 1e-3 * abs(1.0 - value):
            return text
    return repr(value)


@dataclass(frozen=True)
class Budget:
    """One tap's calibrated verdict: the candidate's and the reference's error against the
    oracle, the budget that follows, and whether the candidate keeps to it."""

    cand_err: float
    ref_err: float
    factor: float
    floor: float

    @property
    def limit(self) -> float:
        return self.factor * (self.ref_err + self.floor)

    @property
    def met(self) -> bool:
        return self.cand_err <= self.limit  # NaN never does

    @property
    def ratio(self) -> float:
        return self.cand_err / self.ref_err if self.ref_err > 0 else float("inf") if self.cand_err > 0 else 1.0

    def reason(self) -> str:
        return (f"error {self.cand_err:.3g} against the oracle is {self.ratio:.3g}x the reference's own "
                f"{self.ref_err:.3g} (budget {self.factor:g} x (its own + {self.floor:.2g}))")

    def to_dict(self) -> dict:
        return {"cand_err": _number(self.cand_err), "ref_err": _number(self.ref_err), "factor": self.factor,
                "floor": self.floor, "ratio": _number(self.ratio), "met": self.met}


    @classmethod
    def from_dict(cls, d: dict) -> Budget:
        def num(v):
            return float("nan") if v is None else float(v)

        return cls(num(d.get("cand_err")), num(d.get("ref_err")), float(d["factor"]), float(d["floor"]))


def _number(x: float) -> float | None:
    """JSON has no NaN or infinity: None for those."""
    return x if math.isfinite(x) else None
