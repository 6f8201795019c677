"""Calibrated budgets: judge each candidate tap by its error against a higher-precision
run of the reference, relative to the reference's own error against that run.

One fixed cosine for every pair is wrong both ways: fp32-vs-fp32 runs err by about 1e-7,
so a real bug a thousand times larger still passes 0.999, while a correct deep bf16
model accumulates rounding until a fixed bound fails it.  The reference itself says how
large honest rounding is at each tap: run it once more in float64 on the CPU (float32 on
a GPU) with the same weights (its own, upcast exactly), inputs and noise: the *oracle*.
Then a candidate tap passes when

    err(cand, oracle) <= FACTOR * err(ref, oracle) + FLOOR(dtype)

with err the relative L2 error.  FACTOR is 2, as FlashAttention's own tests accept twice
the reference implementation's error against a higher-precision run; FLOOR is the unit
roundoff of the coarser of the two runs' dtypes, for taps the reference computes
exactly (an embedding lookup) where any reordering of a sum would otherwise exceed
2 x 0.  Region rows are judged by the same rule.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, replace

from parity.report.results import Report, json_number

FACTOR = 2.0
UNIT_ROUNDOFF = {"float64": 2.0 ** -53, "float32": 2.0 ** -24, "bfloat16": 2.0 ** -8, "float16": 2.0 ** -11,
                 "float8_e4m3fn": 2.0 ** -4, "float8_e5m2": 2.0 ** -3}


def floor_for(*dtypes: str | None) -> float:
    """The unit roundoff of the coarsest of `dtypes` (float32's for an unknown one)."""
    return max(UNIT_ROUNDOFF.get(str(d).removeprefix("torch."), 2.0 ** -24) for d in dtypes)


@dataclass(frozen=True)
class Budget:
    """One tap's calibrated verdict: the candidate's and the reference's error against the
    oracle, the budget that follows, and whether the candidate keeps to it."""

    cand_err: float
    ref_err: float
    factor: float
    floor: float

    @property
    def limit(self) -> float:
        return self.factor * self.ref_err + self.floor

    @property
    def met(self) -> bool:
        return self.cand_err <= self.limit  # NaN never does

    @property
    def ratio(self) -> float:
        return self.cand_err / self.ref_err if self.ref_err > 0 else float("inf") if self.cand_err > 0 else 1.0

    def reason(self) -> str:
        return (f"error {self.cand_err:.3g} against the oracle is {self.ratio:.3g}x the reference's own "
                f"{self.ref_err:.3g} (budget {self.factor:g}x + {self.floor:.2g})")

    def to_dict(self) -> dict:
        return {"cand_err": json_number(self.cand_err), "ref_err": json_number(self.ref_err), "factor": self.factor,
                "floor": self.floor, "ratio": json_number(self.ratio), "met": self.met}


def calibrate(report: Report, ref_vs_oracle: Report, cand_vs_oracle: Report, oracle_dtype: str,
              factor: float = FACTOR) -> Report:
    """`report` (ref vs cand) re-judged by calibrated budgets: every compared tap whose
    values were judged (pass or fail) passes or fails by its budget instead; other
    statuses (shape, NaN, dtype, missing ...) stand.  Taps the oracle lacks keep their
    fixed-bound verdict, and the report says how many."""
    ref_errs = {r.key: r for r in ref_vs_oracle.rows if r.metrics is not None}
    cand_errs = {r.key: r for r in cand_vs_oracle.rows if r.metrics is not None}
    rows, unjudged = [], 0
    for row in report.rows:
        r, c = ref_errs.get(row.key), cand_errs.get(row.key)
        if row.status not in ("pass", "fail") or row.metrics is None:
            rows.append(row)
            continue
        if r is None or c is None:
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
                   "rule": "rel_l2(cand, oracle) <= factor * rel_l2(ref, oracle) + unit roundoff"}
    warnings = list(report.warnings)
    if unjudged:
        warnings.append(f"{unjudged} taps missing in the oracle run were judged by the fixed bounds")
    return Report(rows=rows, ref_meta=report.ref_meta, cand_meta=report.cand_meta,
                  thresholds={**report.thresholds, "calibration": calibration}, cand_error=report.cand_error,
                  problems=list(report.problems), localisation=report.localisation, warnings=warnings)


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

