"""The host comparer: one tap pair in numpy, float64."""

from __future__ import annotations

from parity.comparison.align import Refusal, align, cannot_decode, gathered
from parity.comparison.breakdown import Groups, breakdown
from parity.comparison.metrics import compare
from parity.comparison.rules import judged, refused
from parity.report.results import TapResult
from parity.taps.codec import to_float64
from parity.taps.records import Tap


def compare_taps(ref: Tap, cand: Tap, ref_layouts: dict, cand_layouts: dict, threshold: float,
                 exact_dtypes: bool = True, chunk: int | None = None) -> TapResult:
    """One tap pair.  Never raises: whatever cannot be compared fails this tap only,
    with both shapes in the reason."""
    a = align(ref, cand, ref_layouts, cand_layouts)
    if isinstance(a, Refusal):
        return refused(ref, cand, threshold, a)
    try:
        r64 = to_float64(gathered(ref.array, a.ref_order), ref.dtype)  # [N, *features], or the tensor
        c64 = to_float64(gathered(cand.array, a.cand_order), cand.dtype)
    except ValueError as exc:
        return refused(ref, cand, threshold, cannot_decode(ref, cand, exc))
    regions, chunks, heads = breakdown(r64, c64, Groups.of(a, chunk))
    return judged(ref, cand, a, threshold, exact_dtypes, compare(r64, c64), regions, chunks, heads)
