"""Which arithmetic a streamed diff uses: the fused numba kernel or plain numpy.

The kernel (`fused`) is ~50x faster per element, but importing numba costs ~0.4 s
and a first compilation several seconds (then cached on disk), so it is used only when
the data to compare is large enough (`FUSED_MIN_BYTES`) and numba is installed; small
dumps, and machines without numba, take the numpy path (`MetricAccumulator.update`).
Both paths give the same metrics up to the order of float64 sums (tests/test_fused.py).
"""

from __future__ import annotations

import math
from typing import Any

import numpy as np

from parity.taps.codec import fp8_table

# Data (both dumps, as stored) from which loading numba pays for itself.
FUSED_MIN_BYTES = 64 << 20


ENGINES = ("auto", "fused", "numpy")


# dtypes the kernel decodes; anything else (integers, bool) takes the numpy path.
_KERNEL_DTYPES = frozenset({"float64", "float32", "float16", "bfloat16", "float8_e4m3fn", "float8_e5m2"})


_NO_TABLE = np.zeros(1, np.float64)


# Raw sums are exact when no square overflowed or fell below the normal range where
# it mattered: maxima within 2**+-450 keep squares and their sums (n < 2**60) normal.
_SAFE_EXP = 450


def load_kernel(engine: str, data_bytes: int) -> Any:
    """The fused kernel module for `engine` ("auto": if `data_bytes` is large enough and
    numba imports), or None for the numpy path.  ValueError for an unknown engine,
    ImportError when "fused" is asked for without numba."""
    if engine not in ENGINES:
        raise ValueError(f"engine must be one of {ENGINES}, got {engine!r}")
    if engine == "numpy" or (engine == "auto" and data_bytes < FUSED_MIN_BYTES):
        return None
    try:
        from parity.comparison import fused
    except Exception:  # no numba, or one that does not load here: the numpy path
        if engine == "fused":
            raise
        return None
    return fused


def decodable(dtype: str) -> bool:
    """Whether the kernel decodes this original dtype."""
    return dtype in _KERNEL_DTYPES


def kernel_input(array: np.ndarray, dtype: str) -> tuple[np.ndarray, np.ndarray]:
    """(elements the kernel reads, float8 decode table) for a storage array.

    float16 becomes float32 (exact; numba has no float16); bf16 stays uint16 bits."""
    if dtype == "float16":
        return array.astype(np.float32), _NO_TABLE
    if dtype in ("float8_e4m3fn", "float8_e5m2"):
        return array, fp8_table(dtype)
    return array, _NO_TABLE


def sums_are_exact(fsum: np.ndarray, fused: Any) -> bool:
    """True when every slot's raw sums are what the scaled numpy path would accumulate:
    all finite, and no non-zero maximum outside 2**+-_SAFE_EXP (only float64 data can)."""
    if not np.isfinite(fsum).all():
        return False
    for col in (fused.MAX_R, fused.MAX_C, fused.MAX_D):
        m = fsum[:, col]
        m = m[m > 0]
        if m.size and (m.max() >= math.ldexp(1.0, _SAFE_EXP) or m.min() < math.ldexp(1.0, -_SAFE_EXP)):
            return False
    return True


def feed(acc, fsum: np.ndarray, isum: np.ndarray, s: int, fused: Any) -> None:
    """Add slot s of a kernel call's sums to a MetricAccumulator."""
    f, i = fsum[s], isum[s]
    acc.add_sums(int(i[fused.N]), int(i[fused.N_VALID]),
                 (int(i[fused.NAN_R]), int(i[fused.INF_R]), int(i[fused.NAN_C]), int(i[fused.INF_C])),
                 int(i[fused.FIRST_NONFINITE]), float(f[fused.MAX_D]), int(i[fused.MAX_INDEX]),
                 float(f[fused.MAX_R]), float(f[fused.MAX_C]), float(f[fused.DOT]), float(f[fused.RR]),
                 float(f[fused.CC]), float(f[fused.DD]), float(f[fused.SAD]))
