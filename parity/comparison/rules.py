"""The verdict rule: what a tap pair must meet to pass, and the result row it gets.

Light at load (no numpy, no result types until a pair is judged): the CLI reads
DEFAULT_MIN_COS at start-up, before it knows whether it will compare anything.
"""

from __future__ import annotations

import fnmatch
from dataclasses import dataclass
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from parity.comparison.align import Alignment, Refusal
    from parity.comparison.metrics import Metrics
    from parity.report.results import TapResult

DEFAULT_MIN_COS = 0.999  # per tap, unless a pattern or the settings say otherwise


@dataclass(frozen=True)
class Bound:
    """What a threshold's values are: a minimum a measure must reach (`kind` "min": a
    cosine), or a maximum its size may not exceed (`kind` "max": a relative change, either
    sign), the range they may take, and their name in errors."""

    name: str  # in errors: "cosine threshold is outside ..."
    placeholder: str  # the value in a GLOB=VALUE spec
    kind: str  # "min" | "max"
    low: float
    high: float
    low_open: bool = False  # (low, high] rather than [low, high]

    def check(self, value: float) -> None:
        """ValueError unless `value` is in range (NaN never is)."""
        above = self.low < value if self.low_open else self.low <= value
        if not (above and value <= self.high):
            raise ValueError(f"{self.name} {value} is outside {'(' if self.low_open else '['}{self.low:g}, "
                             f"{self.high:g}]")

    def met(self, value: float, threshold: float) -> bool:
        """Whether a measured `value` meets `threshold` (NaN never does)."""
        return value >= threshold if self.kind == "min" else abs(value) <= threshold


COSINE = Bound("cosine threshold", "MIN_COS", "min", -1.0, 1.0)


@dataclass(frozen=True)
class Thresholds:
    """The bound per tap: `default` unless a pattern matches (the last match wins); by
    default minimum cosines."""

    default: float = DEFAULT_MIN_COS
    patterns: tuple[tuple[str, float], ...] = ()
    bound: Bound = COSINE

    def __post_init__(self) -> None:
        for value in (self.default, *(v for _, v in self.patterns)):
            self.bound.check(value)

    @property
    def min_cos(self) -> float:
        """The default (named for the cosine, its first bound, as in the reports' JSON)."""
        return self.default

    @classmethod
    def parse(cls, default: float, specs: list[str] | tuple[str, ...] = (), bound: Bound = COSINE) -> Thresholds:
        patterns = []
        for spec in specs:
            glob, sep, value = spec.rpartition("=")
            try:
                patterns.append((glob.strip(), float(value)))
            except ValueError:
                sep = ""
            if not sep or not glob.strip():
                raise ValueError(f"bad threshold {spec!r}: expected GLOB={bound.placeholder}, "
                                 "e.g. 'expert.*.mlp=0.995'")
        return cls(default, tuple(patterns), bound)

    def pattern_for(self, name: str, key: str) -> float | None:
        """The last pattern matching the tap's name or key, None if none does."""
        value = None
        for glob, v in self.patterns:
            if fnmatch.fnmatchcase(name, glob) or fnmatch.fnmatchcase(key, glob):
                value = v
        return value

    def for_tap(self, name: str, key: str) -> float:
        value = self.pattern_for(name, key)
        return self.default if value is None else value

    def to_dict(self) -> dict:
        return {"min_cos": self.default, "patterns": dict(self.patterns)}


def judge(m: Metrics, ref_dtype: str, cand_dtype: str, threshold: float, exact_dtypes: bool = True) -> dict:
    """The verdict on one tap.  A dtype change fails unless the runs were asked for
    different dtypes (`exact_dtypes=False`): then only the values are judged."""
    if not m.finite:
        return dict(status="nonfinite", reason=(
            f"NaN/Inf: ref nan={m.nan_ref} inf={m.inf_ref}, cand nan={m.nan_cand} inf={m.inf_cand}, "
            f"first at flat index {m.first_nonfinite}"))
    if m.n == 0:
        return dict(status="empty", reason="no valid elements to compare")
    if exact_dtypes and ref_dtype != cand_dtype:
        return dict(status="dtype", reason=f"dtype {ref_dtype} vs {cand_dtype}")
    if not COSINE.met(m.cos, threshold):
        return dict(status="fail", reason=f"cos {m.cos:.6f} < {threshold}")
    return dict(status="pass", reason="")


def row(ref, cand, threshold: float, status: str, reason: str, kind: type | None = None, **fields) -> TapResult:
    """The result row of a pair both sides have (`kind`: TapResult or a subclass)."""
    if kind is None:
        from parity.report.results import TapResult

        kind = TapResult
    return kind(info=ref.info, order=ref.order, threshold=threshold, ref_shape=ref.shape, cand_shape=cand.shape,
                ref_dtype=ref.dtype, cand_dtype=cand.dtype, status=status, reason=reason, **fields)


def refused(ref, cand, threshold: float, why: Refusal) -> TapResult:
    """The failed row of a pair `align` refused."""
    return row(ref, cand, threshold, why.status, why.reason)


def judged(ref, cand, a: Alignment, threshold: float, exact_dtypes: bool, metrics: Metrics, regions: dict,
           chunks: dict, heads: list) -> TapResult:
    """The TapResult of a compared pair, from its metrics: the verdict and where its reason
    points (in the compared array `a` describes).  Shared by every comparer (host numpy,
    streamed, on-device torch), so a tap is judged the same whichever computed its numbers."""
    from parity.comparison.align import both_shapes, locate

    verdict = judge(metrics, ref.dtype, cand.dtype, threshold, exact_dtypes)
    if verdict["status"] == "nonfinite":
        verdict["reason"] += locate(metrics.first_nonfinite, a.shape, a.canonical)
    elif verdict["status"] == "dtype":
        verdict["reason"] += f" ({both_shapes(ref, cand)})"
    return row(ref, cand, threshold, **verdict, metrics=metrics, regions=regions, chunks=chunks, heads=heads)
