"""The verdict rule: what a tap pair must meet to pass, and the result row it gets.

A pair is judged on direction and on size.  Direction is the cosine, blind to scale: a
tap exactly 2x its reference has cos 1.  Size is the norm ratio ||cand|| / ||ref||, which
noise barely moves (orthogonal noise of relative size e changes it by about e^2 / 2) and
a wrong scale moves one for one, so the two bounds say different things and neither
hides the other.  Unless it is set, a tap's size bound follows from its cosine bound:
sqrt(2 (1 - min_cos)), the relative error of noise exactly at the cosine bound (0.0447 at
0.999): a scale error may be as large as the error the cosine already allows.

Light at load (no numpy, no result types until a pair is judged): the CLI reads
DEFAULT_MIN_COS at start-up, before it knows whether it will compare anything.
"""

from __future__ import annotations

import fnmatch
import math
from dataclasses import dataclass
from typing import TYPE_CHECKING

from parity.comparison.limit import Limit, norm_err_for  # noqa: F401 - the verdict's bounds, re-exported

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


COSINE = Bound("cosine threshold", "MIN_COS", "min", 0.0, 1.0)  # below 0 passes opposite signs too
NORM_ERR = Bound("norm error bound", "MAX_NORM_ERR", "max", 0.0, math.inf)  # on |norm_ratio - 1|


@dataclass(frozen=True)
class Thresholds:
    """The bound per tap: `default` unless a pattern matches (the last match wins); by
    default minimum cosines.  With cosines, each tap also gets a size bound (`limit`):
    the last matching pattern that sets one, else `norm_err`, else the one that follows
    from the tap's cosine bound (`norm_err_for`)."""

    default: float = DEFAULT_MIN_COS
    patterns: tuple[tuple[str, float], ...] = ()
    bound: Bound = COSINE
    norm_err: float | None = None  # the size bound of every tap no norm pattern matches
    norm_patterns: tuple[tuple[str, float], ...] = ()

    def __post_init__(self) -> None:
        for value in (self.default, *(v for _, v in self.patterns)):
            self.bound.check(value)
        if (self.norm_err is not None or self.norm_patterns) and self.bound is not COSINE:
            raise ValueError(f"a norm error bound goes with cosine thresholds, not a {self.bound.name}")
        for value in ([] if self.norm_err is None else [self.norm_err]) + [v for _, v in self.norm_patterns]:
            NORM_ERR.check(value)

    @property
    def min_cos(self) -> float:
        """The default (named for the cosine, its first bound, as in the reports' JSON)."""
        return self.default

    @classmethod
    def parse(cls, default: float, specs: list[str] | tuple[str, ...] = (), bound: Bound = COSINE,
              norm_err: float | None = None) -> Thresholds:
        """From `GLOB=VALUE` specs; with cosines also `GLOB=MIN_COS,MAX_NORM_ERR` (both bounds)."""
        patterns, norms = [], []
        sized = bound is COSINE
        for spec in specs:
            glob, sep, value = spec.rpartition("=")
            first, comma, second = value.partition(",") if sized else (value, "", "")
            try:
                patterns.append((glob.strip(), float(first)))
                if comma:
                    norms.append((glob.strip(), float(second)))
            except ValueError:
                sep = ""
            if not sep or not glob.strip():
                extra = f" or GLOB={bound.placeholder},{NORM_ERR.placeholder}" if sized else ""
                raise ValueError(f"bad threshold {spec!r}: expected GLOB={bound.placeholder}{extra}, "
                                 "e.g. 'expert.*.mlp=0.995'")
        return cls(default, tuple(patterns), bound, norm_err, tuple(norms))

    @staticmethod
    def _last(patterns, name: str, key: str) -> float | None:
        value = None
        for glob, v in patterns:
            if fnmatch.fnmatchcase(name, glob) or fnmatch.fnmatchcase(key, glob):
                value = v
        return value

    def pattern_for(self, name: str, key: str) -> float | None:
        """The last pattern matching the tap's name or key, None if none does."""
        return self._last(self.patterns, name, key)

    def for_tap(self, name: str, key: str) -> float:
        value = self.pattern_for(name, key)
        return self.default if value is None else value

    def limit(self, name: str, key: str) -> Limit:
        """Both bounds of one tap (cosine thresholds only)."""
        cos = self.for_tap(name, key)
        norm = self._last(self.norm_patterns, name, key)
        if norm is None:
            norm = self.norm_err if self.norm_err is not None else norm_err_for(cos)
        return Limit(cos, norm)

    def for_pair(self, name: str, key: str) -> Limit | float:
        """What a pair of this tap is judged by: both bounds with cosines, else the value."""
        return self.limit(name, key) if self.bound is COSINE else self.for_tap(name, key)

    def to_dict(self) -> dict:
        out = {"min_cos": self.default, "patterns": dict(self.patterns)}
        if self.bound is COSINE:
            out.update(max_norm_err=self.norm_err, norm_patterns=dict(self.norm_patterns),
                       norm_rule="|norm_ratio - 1| <= max_norm_err; unset: sqrt(2 (1 - min_cos)) of the tap")
        return out


def judge(m: Metrics, ref_dtype: str, cand_dtype: str, threshold: Limit | float, exact_dtypes: bool = True) -> dict:
    """The verdict on one tap: both bounds of `threshold` (a bare cosine bound brings the
    size bound that follows from it).  A dtype change fails unless the runs were asked for
    different dtypes (`exact_dtypes=False`): then only the values are judged."""
    if not m.finite:
        return dict(status="nonfinite", reason=(
            f"NaN/Inf: ref nan={m.nan_ref} inf={m.inf_ref}, cand nan={m.nan_cand} inf={m.inf_cand}, "
            f"first at flat index {m.first_nonfinite}"))
    if m.n == 0:
        return dict(status="empty", reason="no valid elements to compare")
    if exact_dtypes and ref_dtype != cand_dtype:
        return dict(status="dtype", reason=f"dtype {ref_dtype} vs {cand_dtype}")
    limit = Limit.of(threshold)
    if not limit.met(m):
        return dict(status="fail", reason=limit.reason(m))
    return dict(status="pass", reason="")


def bound_fields(threshold: Limit | float) -> dict:
    """A result row's bound fields: `threshold` (the cosine bound, or a stats tolerance)
    and, with a Limit, `max_norm_err`."""
    if isinstance(threshold, Limit):
        return dict(threshold=threshold.min_cos, max_norm_err=threshold.max_norm_err)
    return dict(threshold=threshold)


def row(ref, cand, threshold: Limit | float, status: str, reason: str, kind: type | None = None,
        **fields) -> TapResult:
    """The result row of a pair both sides have (`kind`: TapResult or a subclass)."""
    if kind is None:
        from parity.report.results import TapResult

        kind = TapResult
    return kind(info=ref.info, order=ref.order, **bound_fields(threshold), ref_shape=ref.shape,
                cand_shape=cand.shape, ref_dtype=ref.dtype, cand_dtype=cand.dtype, status=status, reason=reason,
                **fields)


def refused(ref, cand, threshold: Limit | float, why: Refusal) -> TapResult:
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
