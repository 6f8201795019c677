"""Stats-only captures: per-tap summaries instead of tensors (no torch, no h5py).

A very large model is scanned cheaply by keeping, per tap, a few float64 numbers and a
checksum of its exact bits (computed on the device, `parity/capture/stats.py`), then capturing
full tensors only for the taps the stats diff names (`stats_diff.py`).  This module holds
what flows between those pieces: the summary fields, one tap's summary, and a whole run's.

Summaries cover the tap's *valid token positions* in canonical order when its token
layout fits (padding and masked cameras are never summarised, as the tensor diff never
compares them), else the whole tensor.  So a padded reference and a packed candidate
holding the same values have equal summaries and equal checksums.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import numpy as np

from parity.taps.records import CaptureError, TapInfo

# The float64 summary vector, in this order.  Counts are exact up to 2**53 elements.
# Moments (sum .. kurtosis) and min/max/max_abs cover the finite elements only; NaN and
# +-Inf are counted instead.  var/std are population (ddof 0); skew and kurtosis (excess)
# are NaN where std is 0.  min/max/max_abs of a tap without finite elements are NaN.
FIELDS = ("count", "finite", "nan", "posinf", "neginf", "zeros", "sum", "mean", "l2", "mean_abs",
          "var", "std", "skew", "kurtosis", "min", "max", "max_abs")


FIELD_INDEX = {name: i for i, name in enumerate(FIELDS)}


COUNT_FIELDS = ("count", "finite", "nan", "posinf", "neginf", "zeros")


TOKENS_VALID, TOKENS_ALL = "valid", "all"


@dataclass(frozen=True)
class TapStats:
    """One tap's identity and its summaries.

    `shape` is the tensor as produced; `summarised_shape` what was summarised ([valid
    tokens, *features] under a fitting layout, else `shape`); `positions` identifies which
    canonical token positions those were (a CRC-32 of their indices, "" for a whole
    tensor), so two runs whose valid positions differ are told apart.  `checksum` is a
    position-weighted int64 sum of the raw bits (see `parity.capture.stats.checksum`)."""

    info: TapInfo
    order: int
    dtype: str
    layout: str | None
    shape: tuple[int, ...]
    summarised_shape: tuple[int, ...]
    tokens: str  # TOKENS_VALID | TOKENS_ALL
    positions: str
    values: np.ndarray  # float64 [len(FIELDS)]
    checksum: int

    @property
    def key(self) -> str:
        return self.info.key

    def __getitem__(self, name: str) -> float:
        return float(self.values[FIELD_INDEX[name]])

    def summary(self) -> dict[str, float]:
        return {name: float(v) for name, v in zip(FIELDS, self.values)}


@dataclass
class StatsCapture:
    """Everything a stats run produced: summaries in execution order and run metadata.

    `complete` is False when the run stopped early (interrupted, or the backend raised)."""

    taps: list[TapStats] = field(default_factory=list)
    meta: dict[str, Any] = field(default_factory=dict)
    error: CaptureError | None = None
    complete: bool = True

    def __post_init__(self) -> None:
        if self.error is not None:
            self.complete = False

    @property
    def layouts(self) -> dict:
        """None: summaries were taken over valid token positions already (a Capture's field,
        so the diff's pairing loop takes a StatsCapture too)."""
        return {}

    def only(self, keep) -> StatsCapture:
        """The same run with only the taps `keep(name, key)` accepts."""
        return StatsCapture([t for t in self.taps if keep(t.info.name, t.key)], self.meta, self.error, self.complete)

    def by_key(self) -> dict[str, TapStats]:
        return {t.key: t for t in self.taps}
