"""The host comparer: one tap pair in numpy, float64."""

from __future__ import annotations

from parity.comparison.align import align, both_shapes, gathered
from parity.comparison.breakdown import chunk_metrics, head_metrics, region_metrics
from parity.comparison.metrics import compare
from parity.comparison.rules import judged
from parity.report.results import TapResult
from parity.taps.codec import to_float64
from parity.taps.records import Tap


def compare_taps(ref: Tap, cand: Tap, ref_layouts: dict, cand_layouts: dict, threshold: float,
                 exact_dtypes: bool = True, chunk: int | None = None) -> TapResult:
    """One tap pair.  Never raises: whatever cannot be compared fails this tap only,
    with both shapes in the reason."""
    a = align(ref, cand, ref_layouts, cand_layouts, threshold)
    if isinstance(a, TapResult):
        return a
    try:
        r64 = to_float64(gathered(ref.array, a.ref_order), ref.dtype)
        c64 = to_float64(gathered(cand.array, a.cand_order), cand.dtype)
    except ValueError as exc:
        return TapResult(info=ref.info, order=ref.order, threshold=threshold, ref_shape=ref.shape,
                         cand_shape=cand.shape, ref_dtype=ref.dtype, cand_dtype=cand.dtype, status="dtype",
                         reason=f"cannot decode: {exc} ({both_shapes(ref, cand)})")
    metrics = compare(r64, c64)
    regions = region_metrics(r64, c64, a.canonical, a.layout)
    chunks = chunk_metrics(r64, c64, a.canonical, a.layout, chunk) if chunk else {}
    return judged(ref, cand, threshold, exact_dtypes, metrics, regions, chunks,
                  head_metrics(r64, c64, a.canonical), a.shape, a.canonical)
