"""`parity weights`: compare what two backends compute with, parameter by parameter.

The seed's weight-loading check as a library function.  Each backend exposes its
effective parameters (`Backend.parameters`: canonical name -> `ParamView`); this module
pairs them by name, decodes both sides exactly to float64 and judges each pair:

- `transposed`: the candidate is the reference transposed (a JAX kernel loaded without
  its `.T`), whether or not the shapes give it away (square matrices do not);
- `norm_offset`: a 1-D weight equal to the reference minus or plus exactly 1 (a norm
  that scales by `w` where the reference scales by `1 + w`, or the reverse);
- `dtype`: held in another dtype and the cast lost information (values changed), unless
  the backend declared the parameter quantised: then only its cosine threshold counts
  (`quantized_min_cos`, 0.999 by default, unless a `--threshold` pattern matches);
- `fail` (cosine below threshold), `shape`, `nonfinite`, `missing`, `extra`.

Like `parity diff`, a report is truthy when every parameter passed.
"""
from __future__ import annotations

import fnmatch
from typing import Any

import numpy as np

from .backends import ParamView
from .codec import to_float64
from .diff import Thresholds
from .metrics import Metrics, compare
from .weights_report import ParamResult, WeightsReport

DEFAULT_MIN_COS = 0.99999  # the same weights held two ways should agree to rounding
# A declared-quantised weight is lossy by design: per-tensor e4m3 of Gaussian-like weights
# measures cos 0.99964 (tiny pi0.5, README); a wrong scale or saturation falls far below.
DEFAULT_QUANTIZED_MIN_COS = 0.999


def model_parameters(model: Any) -> dict[str, ParamView]:
    """The fallback for a backend without `parameters`: its model's raw named_parameters()."""
    named = getattr(model, "named_parameters", None)
    if named is None:
        raise ValueError("the backend exposes no parameters (no Backend.parameters, no model.named_parameters)")
    return {name: ParamView(dtype=str(p.dtype).removeprefix("torch."), shape=tuple(p.shape),
                            load=lambda p=p: p.detach()) for name, p in named()}


def to_float64_array(value: Any) -> np.ndarray:
    """Exact float64 values of a torch tensor (any float dtype) or a numpy array."""
    if isinstance(value, np.ndarray):
        return value.astype(np.float64)
    from .capture import to_storage  # torch tensors: the live path has torch anyway

    array, dtype = to_storage(value)
    return to_float64(array, dtype)


def threshold_for(name: str, quantized: bool, thresholds: Thresholds, quantized_min_cos: float) -> float:
    """A matching --threshold pattern (the last wins), else the quantised default for a
    declared-quantised parameter, else --min-cos."""
    matched = [v for glob, v in thresholds.patterns if fnmatch.fnmatchcase(name, glob)]
    if matched:
        return matched[-1]
    return quantized_min_cos if quantized else thresholds.min_cos


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
        rows.append(judge_pair(name, r, c, threshold))
    for name, c in cand.items():
        if name not in ref:
            rows.append(ParamResult(name, "extra", "only in candidate",
                                    threshold_for(name, bool(c.quantized), thresholds, quantized_min_cos),
                                    cand_shape=c.shape, cand_dtype=c.dtype))
    return rows


def judge_pair(name: str, ref: ParamView, cand: ParamView, threshold: float) -> ParamResult:
    r, c = to_float64_array(ref.load()), to_float64_array(cand.load())
    quantized = cand.quantized or ref.quantized
    base = dict(name=name, threshold=threshold, ref_shape=tuple(r.shape), cand_shape=tuple(c.shape),
                ref_dtype=ref.dtype, cand_dtype=cand.dtype, quantized=quantized)
    if not (np.isfinite(r).all() and np.isfinite(c).all()):
        m = compare(r, c) if r.shape == c.shape else None
        return ParamResult(status="nonfinite", reason=f"NaN/Inf: ref {int((~np.isfinite(r)).sum())}, "
                           f"cand {int((~np.isfinite(c)).sum())} value(s)", metrics=m, **base)
    transposed = _transposed(r, c, threshold)
    if r.shape != c.shape:
        if transposed is not None:
            return ParamResult(status="transposed", reason=f"transposed: shape {list(c.shape)} vs {list(r.shape)}, "
                               f"cos {transposed.cos:.6f} once transposed back",
                               metrics=transposed, **base)
        return ParamResult(status="shape", reason=f"shape {list(c.shape)} vs {list(r.shape)}", **base)
    m = compare(r, c)
    if m.cos >= threshold:
        changed = int(np.count_nonzero(r != c))
        if ref.dtype != cand.dtype and changed and not quantized:
            return ParamResult(status="dtype", reason=f"lossy cast {ref.dtype} -> {cand.dtype}: {changed} of {r.size} "
                               f"values changed, rel err {m.rel_l2:.3g}", metrics=m, **base)
        return ParamResult(status="pass", reason=_pass_note(ref, cand, quantized, changed), metrics=m, **base)
    if transposed is not None and transposed.cos > m.cos:
        return ParamResult(status="transposed", reason=f"transposed: cos {m.cos:.6f} as is, {transposed.cos:.6f} once "
                           "transposed back", metrics=m, **base)
    offset = _norm_offset(r, c, threshold)
    if offset is not None:
        return ParamResult(status="norm_offset", reason=f"norm offset (w vs 1+w): candidate = reference {offset}",
                           metrics=m, **base)
    if quantized:
        cast = f"; quantised ({quantized})"
    else:
        cast = f"; held as {cand.dtype}, reference {ref.dtype}" if ref.dtype != cand.dtype else ""
    return ParamResult(status="fail", reason=f"cos {m.cos:.6f} < {threshold}{cast}", metrics=m, **base)


def _transposed(r: np.ndarray, c: np.ndarray, threshold: float) -> Metrics | None:
    """The metrics of c.T against r when that matches, else None."""
    if r.ndim != 2 or c.shape != r.shape[::-1] or r.shape[0] == r.shape[1] == 1:
        return None
    m = compare(r, c.T)
    return m if m.cos >= threshold else None


def _norm_offset(r: np.ndarray, c: np.ndarray, threshold: float) -> str | None:
    """"- 1" or "+ 1" when a 1-D candidate is the reference shifted by exactly one."""
    if r.ndim != 1:
        return None
    for shift, label in ((1.0, "- 1"), (-1.0, "+ 1")):
        if compare(r, c + shift).cos >= threshold:
            return label
    return None


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
    if not -1.0 <= quantized_min_cos <= 1.0:
        raise ValueError(f"cosine threshold {quantized_min_cos} is outside [-1, 1]")
    rows = compare_params(ref, cand, thresholds, quantized_min_cos)
    problems = [] if ref else ["the reference exposes no parameters: nothing was compared"]
    return WeightsReport(rows=rows, ref_meta=dict(ref_meta or {}), cand_meta=dict(cand_meta or {}),
                         thresholds={**thresholds.to_dict(), "quantized_min_cos": quantized_min_cos},
                         problems=problems)
