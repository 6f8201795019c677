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
            parts.append(f"cos {m.cos:.6f} < {self.min_cos}")
        if "norm" in failed:
            parts.append(f"norm ratio {m.norm_ratio:.4f} (size off by {abs(m.norm_ratio - 1.0):.3g} > "
                         f"{self.max_norm_err:.3g})")
        return "; ".join(parts)
