"""Calibrated budgets: judge each candidate tap by its error against a higher-precision
run of the reference, relative to the reference's own error against that run.

One fixed cosine for every pair is wrong both ways: fp32-vs-fp32 runs err by about 1e-7,
so a real bug a thousand times larger still passes 0.999, while a correct deep bf16
model accumulates rounding until a fixed bound fails it.  The reference itself says how
large honest rounding is at each tap: run it once more in float64 on the CPU (float32 on
a GPU) with the same weights (its own, upcast exactly), inputs and noise: the *oracle*.
Then a candidate tap passes when

    err(cand, oracle) <= FACTOR * (err(ref, oracle) + FLOOR(dtype))

with err the relative L2 error.  FACTOR is 2, as FlashAttention's own tests accept twice
the reference implementation's error against a higher-precision run; FLOOR is the unit
roundoff of the coarser of the two runs' dtypes, one rounding of the result: for taps
the reference computes exactly (an embedding lookup, or a part the model pins to a
precision the oracle cannot widen) any reordering of a sum would otherwise exceed 2 x 0.
Region rows are judged by the same rule.

It is the default of a live diff whose user sets no bounds, wherever it is cheap
(`unavailable`): a reference on the CPU whose float64 copy is small.  A candidate that
declares parts lossy on purpose (`Lossy`, an FP8 MLP) is judged by its declared fixed
bounds from the first of them on: its error there is a choice, not rounding.
"""

from __future__ import annotations

import glob
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import replace

from parity.comparison.limit import Budget  # noqa: F401 - a calibrated verdict, re-exported
from parity.comparison.rules import Thresholds
from parity.report.results import Report

FACTOR = 2.0
AUTO_MAX_MB = 1024  # default on while the oracle's copy of the reference weights stays under this
UNIT_ROUNDOFF = {"float64": 2.0 ** -53, "float32": 2.0 ** -24, "bfloat16": 2.0 ** -8, "float16": 2.0 ** -11,
                 "float8_e4m3fn": 2.0 ** -4, "float8_e5m2": 2.0 ** -3}


def floor_for(*dtypes: str | None) -> float:
    """The unit roundoff of the coarsest of `dtypes` (float32's for an unknown one)."""
    return max(UNIT_ROUNDOFF.get(str(d).removeprefix("torch."), 2.0 ** -24) for d in dtypes)


def allowance(lossy, base: Thresholds | None = None) -> Thresholds:
    """`base` (the defaults) with a candidate's declared lossy bounds over it (`Lossy.bounds`:
    {glob: min_cos or (min_cos, max_norm_err)}); `base` itself without a declaration."""
    from parity.settings import specs  # the one reading of {glob: bound} forms

    base = base or Thresholds()
    if lossy is None:
        return base
    declared = Thresholds.parse(base.default, specs(dict(lossy.bounds)))
    return replace(base, patterns=base.patterns + declared.patterns,
                   norm_patterns=base.norm_patterns + declared.norm_patterns)


def first_lossy(report: Report, lossy) -> int | None:
    """The execution order of the first tap a declared lossy part produces (None: none)."""
    if lossy is None:
        return None
    from parity.taps.probe import tap_filter

    lossy_tap = tap_filter(lossy.parts)
    orders = [row.order for row in report.rows if row.order is not None and lossy_tap(row.info.name, row.key)]
    return min(orders, default=None)


def finer_run(ref_dtype: str | None, cand_dtype: str | None) -> str | None:
    """Why budgets do not apply by default when the candidate was asked to compute in a
    coarser dtype than the reference (fp32 against bf16): twice the reference's own
    rounding is no measure of a bf16 run's.  None when it computes as finely."""
    if ref_dtype is None or cand_dtype is None:
        return None
    if floor_for(cand_dtype) > floor_for(ref_dtype):
        return (f"the candidate computes in {cand_dtype}, the reference in {ref_dtype}: the reference's own "
                "rounding is no budget for it (--oracle judges by it anyway)")
    return None


def unavailable(model, ref_dtype: str | None) -> str | None:
    """Why calibrated budgets are not the default for this reference (None: they are):
    they need a reference on the CPU, not already in float64, whose float64 copy stays
    under AUTO_MAX_MB (the oracle run holds it beside the reference, and all three runs'
    taps in host memory)."""
    params = [p for p in model.parameters() if p.is_floating_point()] if hasattr(model, "parameters") else []
    if not params:
        return "the reference has no floating parameters to upcast"
    if any(p.device.type != "cpu" for p in params):
        return "the reference runs on an accelerator (--oracle runs a float32 oracle there)"
    if str(ref_dtype).removeprefix("torch.") == "float64":
        return "the reference already runs in float64"
    mb = sum(p.numel() for p in params) * 8 / (1 << 20)
    if mb > AUTO_MAX_MB:
        return f"its float64 copy would take {mb:.0f} MB (over {AUTO_MAX_MB} MB; --oracle runs it anyway)"
    return None


def calibrate(report: Report, ref_vs_oracle: Report, cand_vs_oracle: Report, oracle_dtype: str,
              factor: float = FACTOR, lossy=None) -> Report:
    """`report` (ref vs cand) re-judged by calibrated budgets: every compared tap whose
    values were judged (pass or fail) passes or fails by its budget instead; other
    statuses (shape, NaN, dtype, missing ...) stand.  Taps the oracle lacks keep their
    fixed-bound verdict, and the report says how many.  With a `lossy` declaration, taps
    from the first lossy part on keep theirs (`report` judged them by `allowance`)."""
    # only pairs measured in full: an oracle with NaN/Inf where the run has none (float64
    # through a library's float32 softmax of a fully masked row) calibrates nothing there
    ref_errs = {r.key: r for r in ref_vs_oracle.rows if r.metrics is not None and r.status in ("pass", "fail")}
    cand_errs = {r.key: r for r in cand_vs_oracle.rows if r.metrics is not None and r.status in ("pass", "fail")}
    broken = {r.key for r in ref_vs_oracle.rows if r.status == "nonfinite"}
    lossy_from = first_lossy(report, lossy)
    rows, unjudged, unfit = [], 0, []
    for row in report.rows:
        r, c = ref_errs.get(row.key), cand_errs.get(row.key)
        if row.status not in ("pass", "fail") or row.metrics is None:
            rows.append(row)
            continue
        if lossy_from is not None and row.order is not None and row.order >= lossy_from:
            rows.append(row)
            continue
        if r is None or c is None:
            if row.key in broken:
                unfit.append(row.key)
            else:
                unjudged += 1
            rows.append(row)
            continue
        floor = floor_for(row.ref_dtype, row.cand_dtype)
        budget = Budget(c.metrics.rel_l2, r.metrics.rel_l2, factor, floor)
        regions = {name: Budget(c.regions[name].rel_l2, r.regions[name].rel_l2, factor, floor)
                   for name in row.regions if name in r.regions and name in c.regions}
        failing = [name for name, b in regions.items() if not b.met]
        status = "pass" if budget.met and not failing else "fail"
        reason = "" if status == "pass" else budget.reason() if not budget.met else \
            f"within its budget as a whole, but not in {', '.join(failing)}: {regions[failing[0]].reason()}"
        rows.append(replace(row, status=status, reason=reason, budget=budget, region_budgets=regions))
    calibration = {"mode": "oracle", "oracle_dtype": oracle_dtype, "factor": factor,
                   "rule": "rel_l2(cand, oracle) <= factor * (rel_l2(ref, oracle) + unit roundoff)"}
    if lossy_from is not None:
        start = next(row.key for row in report.rows if row.order == lossy_from)
        calibration["lossy"] = {"parts": list(lossy.parts), "why": lossy.why, "from": start,
                                "rule": "from this tap on, the candidate's declared fixed bounds"}
    warnings = list(report.warnings)
    if unjudged:
        warnings.append(f"{unjudged} taps missing in the oracle run were judged by the fixed bounds")
    if unfit:
        warnings.append(f"{len(unfit)} taps (the first {unfit[0]}) were judged by the fixed bounds: the {oracle_dtype} "
                        "oracle run has NaN/Inf there where the reference has none")
    return Report(rows=rows, ref_meta=report.ref_meta, cand_meta=report.cand_meta,
                  thresholds={**report.thresholds, "calibration": calibration}, cand_error=report.cand_error,
                  problems=list(report.problems), localisation=report.localisation, warnings=warnings)


def isolation_thresholds(report: Report, base: Thresholds) -> Thresholds:
    """The bounds a re-run component is judged by in a calibrated diff: each budgeted tap's
    own budget as a size and a direction bound (a relative error e: |norm ratio - 1| <= e,
    cos >= 1 - e^2 / 2); a component without a tap of its own (code between layers) by the
    budget of the first divergence, the error it must explain; `base` for taps judged by
    fixed bounds.  So a component re-run on the reference's inputs fails exactly when it
    alone errs more than the budget allows."""
    from parity.comparison.limit import norm_err_for

    first = report.first_divergence
    cos, norm = list(base.patterns), list(base.norm_patterns)
    sized = {g for g, _ in norm}
    norm += [(g, base.norm_err if base.norm_err is not None else norm_err_for(v)) for g, v in base.patterns
             if g not in sized]  # a base pattern keeps its own size bound under the new default
    default, default_norm = base.default, base.norm_err
    if first is not None and first.budget is not None:
        default, default_norm = _as_bounds(first.budget.limit)
    for row in report.rows:
        if row.budget is None:
            continue
        literal = glob.escape(row.key)  # the key, matched as it is
        c, e = _as_bounds(row.budget.limit)
        cos.append((literal, c))
        norm.append((literal, e))
    return replace(base, default=default, norm_err=default_norm, patterns=tuple(cos), norm_patterns=tuple(norm))


def _as_bounds(e: float) -> tuple[float, float]:
    """A relative error bound e as (min cos, max norm error); the cosine bound stays in the
    range a bound may take (a budget past sqrt(2) leaves only the size bound)."""
    return max(0.0, 1.0 - e * e / 2), e


def _params_and_buffers(model) -> Iterator[tuple[dict, str]]:
    """Each floating parameter and buffer once, however many modules share it (tied
    embeddings): a second visit would save the upcast copy as the original."""
    seen: set[int] = set()
    for module in model.modules():
        for store in (module._parameters, module._buffers):
            for name, value in store.items():
                if value is not None and value.is_floating_point() and id(value) not in seen:
                    seen.add(id(value))
                    yield store, name


@contextmanager
def upcast(model, dtype, inputs=None):
    """`model` (and the floating tensors of `inputs`, when it is a dict or a tuple/list of
    tensors and dicts) held in `dtype` for the duration; every original tensor is put back
    afterwards as it was (not a round trip through `dtype`), so the reference model is
    unchanged bit for bit.  A module attribute holding the floating dtype the model
    computes in (hand-written models keep `self.dtype` to cast activations) follows."""
    import torch

    saved, attrs = [], []
    try:
        for store, name in _params_and_buffers(model):
            value = store[name]
            saved.append((value, value.data))
            value.data = value.data.to(dtype)
        for module in model.modules():
            for key, value in list(vars(module).items()):
                if isinstance(value, torch.dtype) and value.is_floating_point and value != dtype:
                    attrs.append((module, key, value))
                    setattr(module, key, dtype)
        undo_inputs = _upcast_inputs(inputs, dtype, torch)
        yield
    finally:
        for value, data in saved:
            value.data = data
        for module, key, value in attrs:
            setattr(module, key, value)
        if "undo_inputs" in locals():
            undo_inputs()


def _upcast_inputs(inputs, dtype, torch):
    """Upcast floating tensors held in a dict (in place: a backend's run closes over it);
    returns the function that puts them back."""
    undo = []

    def visit(container):
        if isinstance(container, dict):
            for k, v in container.items():
                if isinstance(v, torch.Tensor) and v.is_floating_point():
                    undo.append((container, k, v))
                    container[k] = v.to(dtype)
                elif isinstance(v, (dict, list, tuple)):
                    visit(v)
        elif isinstance(container, (list, tuple)):
            for v in container:
                if isinstance(v, (dict, list, tuple)):
                    visit(v)

    visit(inputs)

    def put_back():
        for container, k, v in undo:
            container[k] = v

    return put_back


def oracle_dtype(device_type: str) -> str:
    """float64 on the CPU; float32 on an accelerator (float64 there is slow or absent)."""
    return "float64" if device_type == "cpu" else "float32"

