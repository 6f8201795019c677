"""Numerical comparison of a candidate tensor against a reference tensor.

All metrics come from one streaming accumulator so that a tensor too large to hold
twice in float64 can be compared chunk by chunk (peak memory: one chunk), and so that
chunked and whole-tensor comparisons give the same numbers.

Statistics (cos, max_abs, mean_abs, rel_l2) are computed over the elements that are
finite on *both* sides; NaN and Inf are counted per side and the first position where
either side is non-finite is reported, because the first non-finite value is usually
the most useful pointer to a bug.

Sums of squares are kept with a running power-of-two scale per quantity (as LAPACK's
dnrm2 does), so values up to float64's maximum never overflow the accumulation and
tiny (subnormal) values are not flushed to zero by squaring.  Power-of-two scaling is
exact, so it costs no precision.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass

import numpy as np

# Below the exponent of the smallest subnormal: "nothing non-zero seen yet".
_NO_EXP = -1100


@dataclass(frozen=True)
class Metrics:
    """The comparison of one candidate tensor with its reference.

    n: elements compared (all of them, finite or not).
    cos: cosine similarity in [-1, 1] over elements finite on both sides.  Both sides
        all zero -> 1.0 (identical); exactly one side all zero -> 0.0; no element finite
        on both sides (including n == 0) -> nan, which callers must treat as a failure.
    max_abs, mean_abs: max and mean of |cand - ref|; nan when no element is finite on
        both sides.  max_abs is inf only if the difference itself exceeds float64 range.
    rel_l2: ||cand - ref|| / ||ref||; 0.0 if both sides are zero, inf if ref is zero and
        cand is not; nan when no element is finite on both sides.
    norm_ratio: ||cand|| / ||ref||, the size the cosine cannot see (a tap exactly 2x its
        reference has cos 1 and norm_ratio 2); 1.0 if both sides are zero, inf if only ref
        is, 0.0 if only cand is; nan when no element is finite on both sides (and in
        results read from JSON written before it was recorded).
    nan_ref, inf_ref, nan_cand, inf_cand: counts of NaN / +-Inf on each side.
    first_nonfinite: flat (C-order) index of the first element that is NaN/Inf on
        either side, None if all finite.
    max_abs_index: flat index of the (first) largest |cand - ref|, None if no element
        is finite on both sides.
    """

    n: int
    cos: float
    max_abs: float
    mean_abs: float
    rel_l2: float
    nan_ref: int
    inf_ref: int
    nan_cand: int
    inf_cand: int
    first_nonfinite: int | None
    max_abs_index: int | None
    norm_ratio: float = math.nan

    @property
    def finite(self) -> bool:
        """True when neither side has any NaN or Inf."""
        return self.nan_ref == self.inf_ref == self.nan_cand == self.inf_cand == 0

    def to_dict(self) -> dict:
        """Plain dict of the fields (floats may be nan/inf), plus `finite`."""
        d = asdict(self)
        d["finite"] = self.finite
        return d


def _exponent(max_abs: float) -> int:
    """Exponent e with max_abs / 2**e in [0.5, 1); _NO_EXP for zero."""
    if max_abs == 0.0:
        return _NO_EXP
    return math.frexp(max_abs)[1]


class MetricAccumulator:
    """Accumulates metrics over same-shaped chunks of a reference and a candidate.

    Feed chunks in flat (C) order -- e.g. successive slices along axis 0 of C-contiguous
    tensors -- and flat indices in the result continue across chunks.  Accumulation is
    in float64 whatever the input dtype.
    """

    def __init__(self) -> None:
        self._n = 0
        self._n_valid = 0  # finite on both sides
        self._counts = [0, 0, 0, 0]  # nan_ref, inf_ref, nan_cand, inf_cand
        self._first_nonfinite: int | None = None
        self._max_abs = -1.0
        self._max_abs_index: int | None = None
        # Scaled sums: true value = stored * 2**(scale exponents), see module docstring.
        self._er = self._ec = self._ed = _NO_EXP
        self._dot = 0.0  # * 2**(er + ec)
        self._rr = 0.0  # * 2**(2 er)
        self._cc = 0.0  # * 2**(2 ec)
        self._dd = 0.0  # * 2**(2 ed)
        self._sad = 0.0  # sum |c - r|, * 2**ed

    @staticmethod
    def _as_float64(x: np.ndarray, side: str) -> np.ndarray:
        x = np.asarray(x)
        if x.dtype.kind not in "fiub":
            raise ValueError(f"{side} must be a real numeric array, got dtype {x.dtype}")
        return x.astype(np.float64, copy=False).reshape(-1)

    def update(self, ref: np.ndarray, cand: np.ndarray) -> None:
        """Add one chunk.  ref and cand must have the same shape (ValueError if not)."""
        if np.shape(ref) != np.shape(cand):
            raise ValueError(f"shape mismatch: ref {np.shape(ref)} vs cand {np.shape(cand)}")
        r = self._as_float64(ref, "ref")
        c = self._as_float64(cand, "cand")
        base = self._n
        self._n += r.size
        if r.size == 0:
            return

        fin_r, fin_c = np.isfinite(r), np.isfinite(c)
        valid = fin_r & fin_c
        if not valid.all():
            nan_r, nan_c = np.isnan(r), np.isnan(c)
            self._counts[0] += int(nan_r.sum())
            self._counts[1] += int((~fin_r & ~nan_r).sum())
            self._counts[2] += int(nan_c.sum())
            self._counts[3] += int((~fin_c & ~nan_c).sum())
            if self._first_nonfinite is None:
                self._first_nonfinite = base + int(np.argmin(valid))
            idx = np.flatnonzero(valid)
            r, c = r[idx], c[idx]
        else:
            idx = None
        if r.size == 0:
            return
        self._n_valid += r.size

        with np.errstate(over="ignore"):
            d = c - r  # inf only if the true difference exceeds float64 range
        absd = np.abs(d)
        k = int(np.argmax(absd))
        if absd[k] > self._max_abs:
            self._max_abs = float(absd[k])
            self._max_abs_index = base + (k if idx is None else int(idx[k]))

        er = _exponent(float(np.max(np.abs(r))))
        ec = _exponent(float(np.max(np.abs(c))))
        max_d = float(absd[k])
        # If c - r overflowed, scale the inputs first and subtract afterwards.
        ed = max(er, ec) + 1 if math.isinf(max_d) else _exponent(max_d)
        self._rescale(er, ec, ed)

        rs = _scaled(r, -self._er)
        cs = _scaled(c, -self._ec)
        if math.isinf(max_d):
            ds = _scaled(c, -self._ed) - _scaled(r, -self._ed)
        else:
            ds = _scaled(d, -self._ed)
        self._dot += float(np.dot(rs, cs))
        self._rr += float(np.dot(rs, rs))
        self._cc += float(np.dot(cs, cs))
        self._dd += float(np.dot(ds, ds))
        self._sad += float(np.sum(np.abs(ds)))

    def add_sums(self, n: int, n_valid: int, counts: tuple[int, int, int, int], first_nonfinite: int,
                 max_abs: float, max_abs_index: int, max_ref: float, max_cand: float,
                 dot: float, rr: float, cc: float, dd: float, sad: float) -> None:
        """Add one chunk given as its raw (unscaled) float64 sums, as `fused` makes them.

        Indices are relative to the chunk (-1: none); sums are over the pairs finite on both
        sides, maxima of |ref|, |cand|, |cand - ref| over them.  The caller guarantees the
        raw sums are exact (`engine.sums_are_exact`): then scaling them by powers of two
        here gives what `update` accumulates, up to the order of the float64 sums."""
        base = self._n
        self._n += n
        for k in range(4):
            self._counts[k] += counts[k]
        if self._first_nonfinite is None and first_nonfinite >= 0:
            self._first_nonfinite = base + first_nonfinite
        if n_valid == 0:
            return
        self._n_valid += n_valid
        if max_abs > self._max_abs:
            self._max_abs = max_abs
            self._max_abs_index = base + max_abs_index
        self._rescale(_exponent(max_ref), _exponent(max_cand), _exponent(max_abs))
        self._dot += _ldexp_inf(dot, -self._er - self._ec)
        self._rr += _ldexp_inf(rr, -2 * self._er)
        self._cc += _ldexp_inf(cc, -2 * self._ec)
        self._dd += _ldexp_inf(dd, -2 * self._ed)
        self._sad += _ldexp_inf(sad, -self._ed)

    @classmethod
    def from_sums(cls, n: int, n_valid: int, counts: tuple[int, int, int, int], first_nonfinite: int | None,
                  max_abs: float, max_abs_index: int | None, dot: float, rr: float, cc: float, dd: float,
                  sad: float, exponents: tuple[int, int, int] = (0, 0, 0)) -> MetricAccumulator:
        """An accumulator holding sums computed elsewhere (the on-device compare reduces a
        tensor to exactly these quantities), so `result()` finishes them into Metrics the
        same way for every path.  `exponents` (er, ec, ed): the sums are scaled as in the
        module docstring (dot by 2**-(er+ec), rr by 2**-2er, cc by 2**-2ec, dd by 2**-2ed,
        sad by 2**-ed); (0, 0, 0) for unscaled sums."""
        acc = cls()
        acc._n, acc._n_valid, acc._counts = n, n_valid, list(counts)
        acc._first_nonfinite = first_nonfinite
        if n_valid:
            acc._max_abs, acc._max_abs_index = max_abs, max_abs_index
        acc._er, acc._ec, acc._ed = exponents
        acc._dot, acc._rr, acc._cc, acc._dd, acc._sad = dot, rr, cc, dd, sad
        return acc

    def _rescale(self, er: int, ec: int, ed: int) -> None:
        """Raise the running scale exponents to cover a new chunk, rescaling the sums."""
        if er > self._er:
            s = er - self._er
            self._rr = math.ldexp(self._rr, -2 * s)
            self._dot = math.ldexp(self._dot, -s)
            self._er = er
        if ec > self._ec:
            s = ec - self._ec
            self._cc = math.ldexp(self._cc, -2 * s)
            self._dot = math.ldexp(self._dot, -s)
            self._ec = ec
        if ed > self._ed:
            s = ed - self._ed
            self._dd = math.ldexp(self._dd, -2 * s)
            self._sad = math.ldexp(self._sad, -s)
            self._ed = ed

    def result(self) -> Metrics:
        """The metrics of everything fed so far (see Metrics for the edge cases)."""
        nan = float("nan")
        if self._n_valid == 0:
            cos = max_abs = mean_abs = rel_l2 = norm_ratio = nan
        else:
            ref_zero, cand_zero = self._rr == 0.0, self._cc == 0.0
            if ref_zero and cand_zero:
                cos = norm_ratio = 1.0
            elif ref_zero or cand_zero:
                cos = 0.0
                norm_ratio = math.inf if ref_zero else 0.0
            else:
                # The scales of dot and of the norms cancel exactly.  sqrt(rr * cc) rather
                # than sqrt(rr) * sqrt(cc): identical inputs then give exactly 1.0
                # (rr == cc == dot and sqrt(x * x) == x); rr, cc lie in [0.25, n].
                cos = self._dot / math.sqrt(self._rr * self._cc)
                cos = min(1.0, max(-1.0, cos))
                # Equal sides give exactly 1.0 (same sums, same exponents).
                norm_ratio = _ldexp_inf(math.sqrt(self._cc) / math.sqrt(self._rr), self._ec - self._er)
            if self._dd == 0.0:
                rel_l2 = 0.0
            elif ref_zero:
                rel_l2 = math.inf
            else:
                rel_l2 = _ldexp_inf(math.sqrt(self._dd) / math.sqrt(self._rr), self._ed - self._er)
            max_abs = self._max_abs
            mean_abs = _ldexp_inf(self._sad / self._n_valid, self._ed)
        return Metrics(
            n=self._n,
            cos=cos,
            max_abs=max_abs,
            mean_abs=mean_abs,
            rel_l2=rel_l2,
            nan_ref=self._counts[0],
            inf_ref=self._counts[1],
            nan_cand=self._counts[2],
            inf_cand=self._counts[3],
            first_nonfinite=self._first_nonfinite,
            max_abs_index=self._max_abs_index,
            norm_ratio=norm_ratio,
        )


def _scaled(x: np.ndarray, e: int) -> np.ndarray:
    """x * 2**e.  A product with a power of two is exact and rounds exactly as ldexp
    does, and is several times faster than the ldexp ufunc; ldexp only where 2**e
    itself is not a normal float64."""
    if -1021 <= e <= 1023:
        return x * math.ldexp(1.0, e)
    return np.ldexp(x, e)


def _ldexp_inf(x: float, e: int) -> float:
    """x * 2**e, inf instead of OverflowError when the true value exceeds float64."""
    try:
        return math.ldexp(x, e)
    except OverflowError:
        return math.inf


def compare(ref: np.ndarray, cand: np.ndarray) -> Metrics:
    """Metrics of cand against ref in one pass (one accumulator, one update)."""
    acc = MetricAccumulator()
    acc.update(ref, cand)
    return acc.result()
