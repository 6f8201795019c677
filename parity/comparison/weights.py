"""`parity weights`: compare what two backends compute with, parameter by parameter.

The seed's weight-loading check as a library function.  Each backend exposes its
effective parameters (`Backend.parameters`: canonical name -> `ParamView`); this module
pairs them by name, decodes both sides exactly to float64 (block by block) and judges
each pair:

- `transposed`: the candidate is the reference transposed (a JAX kernel loaded without
  its `.T`), whether or not the shapes give it away (square matrices do not);
- `norm_offset`: a 1-D weight equal to the reference minus or plus exactly 1 (a norm
  that scales by `w` where the reference scales by `1 + w`, or the reverse);
- `dtype`: held in another dtype and the cast lost information (values changed), unless
  the backend declared the parameter quantised: then only its cosine threshold counts
  (`quantized_min_cos`, 0.999 by default, unless a `--threshold` pattern matches);
- `fail` (cosine below threshold, or a norm ratio off by more than the size bound that
  follows from it, as for taps: a weight loaded at 2x its value has cos 1), `shape`,
  `nonfinite`, `missing`, `extra`.

A backend without `parameters` is compared through its model's own parameters, its
quantised weights (torchao, torch.ao packed, optimum-quanto) dequantised through their
library and declared quantised with their scheme (parity.comparison.quantized).

Like `parity diff`, a report is truthy when every parameter passed.
"""

from __future__ import annotations

from typing import Any

import numpy as np

from parity.comparison.metrics import MetricAccumulator, Metrics
from parity.comparison.rules import COSINE, Limit, Thresholds
from parity.report.results import ParamResult, WeightsReport
from parity.taps.backends import ParamView
from parity.taps.codec import to_float64

DEFAULT_MIN_COS = 0.99999  # the same weights held two ways should agree to rounding


# A declared-quantised weight is lossy by design: per-tensor e4m3 of Gaussian-like weights
# measures cos 0.99962-0.99968 (tiny pi0.5, seeds 0-2, README); a wrong scale or saturation falls far below.
DEFAULT_QUANTIZED_MIN_COS = 0.999


CHUNK_ELEMENTS = 1 << 22  # decoded to float64 at a time: 32 MiB per side


def model_parameters(model: Any) -> dict[str, ParamView]:
    """The fallback for a backend without `parameters`: its model's named_parameters(), with
    quantised weights (torchao, torch.ao packed, optimum-quanto) dequantised through their
    library and marked with their scheme (parity.comparison.quantized)."""
    from parity.comparison.quantized import model_parameters as found

    return found(model)


class Values:
    """A parameter's values in storage form (bf16/fp8 as raw bits), decoded to float64 a
    block of rows at a time: a full-size text embedding alone is 4 GiB in float64."""

    def __init__(self, value: Any):
        self.scheme = None  # a quantised tensor's scheme, when the value is one
        if isinstance(value, np.ndarray):
            self.array, self.dtype = value, None
        else:
            from parity.capture.staging import to_storage  # torch tensors: the live path has torch anyway
            from parity.comparison.quantized import dense, scheme

            self.scheme = scheme(value)
            value = dense(value)  # a quantised tensor: dequantised through its own library
            try:
                self.array, self.dtype = to_storage(value)
            except (RuntimeError, TypeError) as exc:
                raise ValueError(f"a {type(value).__module__}.{type(value).__name__} tensor parity cannot read "
                                 f"({exc})") from None
        if self.array.ndim == 0:
            self.array = self.array.reshape(1)
        self.shape = tuple(self.array.shape)

    def rows(self, start: int, stop: int, transposed: bool = False) -> np.ndarray:
        """Exact float64 values of rows [start, stop) (of the transpose, if asked)."""
        block = np.ascontiguousarray((self.array.T if transposed else self.array)[start:stop])
        return block.astype(np.float64) if self.dtype is None else to_float64(block, self.dtype)


def measure(ref: Values, cand: Values, transposed: bool = False, shift: float = 0.0) -> tuple[Metrics, int]:
    """Metrics of (cand, transposed if asked, plus `shift`) against ref, and how many values
    differ, streamed block by block through one accumulator."""
    acc, changed = MetricAccumulator(), 0
    per_row = int(np.prod(ref.shape[1:], dtype=np.int64)) or 1
    step = max(1, CHUNK_ELEMENTS // per_row)
    for start in range(0, ref.shape[0], step):
        r = ref.rows(start, start + step)
        c = cand.rows(start, start + step, transposed) + shift
        acc.update(r, c)
        changed += int(np.count_nonzero(r != c))
    return acc.result(), changed


def threshold_for(name: str, quantized: bool, thresholds: Thresholds, quantized_min_cos: float) -> float:
    """A matching --threshold pattern (the last wins), else the quantised default for a
    declared-quantised parameter, else --min-cos."""
    matched = thresholds.pattern_for(name, name)
    if matched is not None:
        return matched
    return quantized_min_cos if quantized else thresholds.default


def compare_params(ref: dict[str, ParamView], cand: dict[str, ParamView], thresholds: Thresholds | None = None,
                   quantized_min_cos: float = DEFAULT_QUANTIZED_MIN_COS) -> list[ParamResult]:
    """One result per parameter, in the reference's order, then the candidate's extras."""
    thresholds = thresholds or Thresholds(DEFAULT_MIN_COS)
    rows = []
    for name, r in ref.items():
        c = cand.get(name)
        quantized = bool(r.quantized or (c is not None and c.quantized))
        threshold = threshold_for(name, quantized, thresholds, quantized_min_cos)
        if c is None:
            rows.append(ParamResult(name, "missing", "missing in candidate", threshold,
                                    ref_shape=r.shape, ref_dtype=r.dtype))
            continue
        rows.append(judge_pair(name, r, c, threshold,
                               quantized_threshold=threshold_for(name, True, thresholds, quantized_min_cos)))
    for name, c in cand.items():
        if name not in ref:
            rows.append(ParamResult(name, "extra", "only in candidate",
                                    threshold_for(name, bool(c.quantized), thresholds, quantized_min_cos),
                                    cand_shape=c.shape, cand_dtype=c.dtype))
    return rows


def judge_pair(name: str, ref: ParamView, cand: ParamView, threshold: float,
               quantized_threshold: float | None = None) -> ParamResult:
    """`quantized_threshold`: the threshold if a side turns out to hold a quantised tensor
    its view did not declare (a backend's own `parameters` handing out torchao weights)."""
    r, c = Values(ref.load()), Values(cand.load())
    quantized = cand.quantized or ref.quantized
    if not quantized and (c.scheme or r.scheme):
        quantized = c.scheme or r.scheme
        threshold = threshold if quantized_threshold is None else quantized_threshold
    base = dict(name=name, threshold=threshold, ref_shape=r.shape, cand_shape=c.shape, ref_dtype=ref.dtype,
                cand_dtype=cand.dtype, quantized=quantized)
    transposable = len(r.shape) == 2 and c.shape == r.shape[::-1] and r.shape != (1, 1)
    if r.shape != c.shape:
        if transposable:
            mt, _ = measure(r, c, transposed=True)
            if mt.finite and Limit.of(threshold).met(mt):
                return ParamResult(status="transposed", reason=f"transposed: shape {list(c.shape)} vs "
                                   f"{list(r.shape)}, cos {mt.cos:.6f} once transposed back", metrics=mt, **base)
        return ParamResult(status="shape", reason=f"shape {list(c.shape)} vs {list(r.shape)}", **base)
    m, changed = measure(r, c)
    limit = Limit.of(threshold)
    if not m.finite:
        return ParamResult(status="nonfinite", reason=f"NaN/Inf: ref {m.nan_ref + m.inf_ref}, cand "
                           f"{m.nan_cand + m.inf_cand} value(s)", metrics=m, **base)
    if limit.met(m):
        if ref.dtype != cand.dtype and changed and not quantized:
            return ParamResult(status="dtype", reason=f"lossy cast {ref.dtype} -> {cand.dtype}: {changed} of "
                               f"{m.n} values changed, rel err {m.rel_l2:.3g}", metrics=m, **base)
        return ParamResult(status="pass", reason=_pass_note(ref, cand, quantized, changed), metrics=m, **base)
    if transposable:
        mt, _ = measure(r, c, transposed=True)
        if limit.met(mt):
            return ParamResult(status="transposed", reason=f"transposed: cos {m.cos:.6f} as is, {mt.cos:.6f} once "
                               "transposed back", metrics=m, **base)
    if len(r.shape) == 1:  # a norm weight that forgot (or doubled) its 1 +
        for shift, label in ((1.0, "- 1"), (-1.0, "+ 1")):
            if limit.met(measure(r, c, shift=shift)[0]):
                return ParamResult(status="norm_offset", reason=f"norm offset (w vs 1+w): candidate = reference "
                                   f"{label}", metrics=m, **base)
    if quantized:
        cast = f"; quantised ({quantized})"
    else:
        cast = f"; held as {cand.dtype}, reference {ref.dtype}" if ref.dtype != cand.dtype else ""
    return ParamResult(status="fail", reason=f"{limit.reason(m)}{cast}", metrics=m, **base)


def _pass_note(ref: ParamView, cand: ParamView, quantized: str | None, changed: int) -> str:
    if quantized:
        return f"quantised: {quantized}"
    if ref.dtype != cand.dtype:
        return f"held as {cand.dtype}, reference {ref.dtype}: no value changed"
    return "" if changed == 0 else f"{changed} value(s) differ"


def compare_weights(ref: dict[str, ParamView], cand: dict[str, ParamView], thresholds: Thresholds | None = None,
                    quantized_min_cos: float = DEFAULT_QUANTIZED_MIN_COS, ref_meta: dict | None = None,
                    cand_meta: dict | None = None) -> WeightsReport:
    thresholds = thresholds or Thresholds(DEFAULT_MIN_COS)
    COSINE.check(quantized_min_cos)
    rows = compare_params(ref, cand, thresholds, quantized_min_cos)
    problems = [] if ref else ["the reference exposes no parameters: nothing was compared"]
    return WeightsReport(rows=rows, ref_meta=dict(ref_meta or {}), cand_meta=dict(cand_meta or {}),
                         thresholds={**thresholds.to_dict(), "quantized_min_cos": quantized_min_cos},
                         problems=problems)
