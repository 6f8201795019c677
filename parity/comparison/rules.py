"""The verdict rule: what a tap pair must meet to pass."""

from __future__ import annotations

import fnmatch
from dataclasses import dataclass

import numpy as np

from parity.comparison.align import both_shapes, locate
from parity.comparison.metrics import Metrics
from parity.report.results import TapResult


@dataclass(frozen=True)
class Thresholds:
    """Minimum cosine per tap: `min_cos` unless a pattern matches (the last match wins)."""

    min_cos: float = 0.999
    patterns: tuple[tuple[str, float], ...] = ()

    def __post_init__(self) -> None:
        for _, value in ((None, self.min_cos), *self.patterns):
            if not -1.0 <= value <= 1.0:
                raise ValueError(f"cosine threshold {value} is outside [-1, 1]")

    @classmethod
    def parse(cls, min_cos: float, specs: list[str] | tuple[str, ...] = ()) -> "Thresholds":
        patterns = []
        for spec in specs:
            glob, sep, value = spec.rpartition("=")
            try:
                patterns.append((glob.strip(), float(value)))
            except ValueError:
                sep = ""
            if not sep or not glob.strip():
                raise ValueError(f"bad threshold {spec!r}: expected GLOB=MIN_COS, e.g. 'expert.*.mlp=0.995'")
        return cls(min_cos, tuple(patterns))

    def for_tap(self, name: str, key: str) -> float:
        value = self.min_cos
        for glob, v in self.patterns:
            if fnmatch.fnmatchcase(name, glob) or fnmatch.fnmatchcase(key, glob):
                value = v
        return value

    def to_dict(self) -> dict:
        return {"min_cos": self.min_cos, "patterns": {g: v for g, v in self.patterns}}


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
    if not m.cos >= threshold:
        return dict(status="fail", reason=f"cos {m.cos:.6f} < {threshold}")
    return dict(status="pass", reason="")


def judged(ref, cand, threshold: float, exact_dtypes: bool, metrics: Metrics, regions: dict, chunks: dict,
           heads: list, shape: tuple[int, ...], canonical: np.ndarray | None) -> TapResult:
    """The TapResult of a compared pair, from its metrics: the verdict and where its reason
    points (`shape`: of the compared, gathered array).  Shared by every comparer (host
    numpy, on-device torch), so a tap is judged the same whichever computed its numbers."""
    base = dict(info=ref.info, order=ref.order, threshold=threshold, ref_shape=ref.shape, cand_shape=cand.shape,
                ref_dtype=ref.dtype, cand_dtype=cand.dtype)
    verdict = judge(metrics, ref.dtype, cand.dtype, threshold, exact_dtypes)
    if verdict["status"] == "nonfinite":
        verdict["reason"] += locate(metrics.first_nonfinite, shape, canonical)
    elif verdict["status"] == "dtype":
        verdict["reason"] += f" ({both_shapes(ref, cand)})"
    return TapResult(metrics=metrics, regions=regions, chunks=chunks, heads=heads, **verdict, **base)
