"""Laying two taps over each other: token layouts, shapes, dtypes (the one pair check)."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from parity.report.results import TapResult
from parity.taps.codec import storage_dtype
from parity.taps.records import Layout, Tap


class AlignmentError(Exception):
    """Two taps cannot be laid over each other (shape or token layout differs)."""


def gather_tokens(array: np.ndarray, layout: Layout | None) -> tuple[np.ndarray, np.ndarray | None]:
    """Valid token slots in canonical order: ([N, features...], canonical indices [N])."""
    if layout is None:
        return array, None
    order, canonical = token_order(array.shape, layout)
    R, T = layout.slots.shape
    return array.reshape(R * T, *array.shape[2:])[order], canonical


def token_order(shape: tuple[int, ...], layout: Layout) -> tuple[np.ndarray, np.ndarray]:
    """(flat slot of each valid token in canonical order [N], their canonical indices [N])
    for a tensor of `shape` laid out by `layout`: what gathering needs, without the data
    (the on-device compare gathers with it on the device)."""
    R, T = layout.slots.shape
    if len(shape) < 2 or tuple(shape[:2]) != (R, T):
        raise AlignmentError(f"tensor {tuple(shape)} does not fit its token layout [{R}, {T}]")
    idx = layout.slots.reshape(-1)
    keep = np.flatnonzero(idx >= 0)
    order = keep[np.argsort(idx[keep], kind="stable")]
    return order, idx[order]


def layout_of(tap: Tap, layouts: dict, side: str) -> Layout | None:
    if not tap.layout:
        return None
    if tap.layout not in layouts:
        raise AlignmentError(f"{side} tap uses layout {tap.layout!r}, which its capture does not define")
    return layouts[tap.layout]


def both_shapes(ref: Tap, cand: Tap) -> str:
    """Both sides' shapes and dtypes, for the reason of a tap that cannot be compared."""
    return f"ref {list(ref.shape)} {ref.dtype}, cand {list(cand.shape)} {cand.dtype}"


def locate(flat: int, shape: tuple[int, ...], canonical: np.ndarray | None) -> str:
    """Where flat index `flat` of the compared array lies: its index in the tensor, or for
    a token layout (where the compared array is the valid tokens, gathered) its token."""
    if canonical is None:
        return f" {[int(i) for i in np.unravel_index(flat, shape)]}" if shape else ""
    per_token = int(np.prod(shape[1:], dtype=np.int64))
    return f" of the valid tokens (canonical token position {int(canonical[flat // per_token])})"


def token_mismatch(r_idx: np.ndarray | None, c_idx: np.ndarray | None, ref: Tap, cand: Tap) -> str:
    """Why two taps' valid token positions cannot be laid over each other ("" if they can)."""
    if (r_idx is None) == (c_idx is None) and (r_idx is None or np.array_equal(r_idx, c_idx)):
        return ""
    nr = "all" if r_idx is None else r_idx.size
    nc = "all" if c_idx is None else c_idx.size
    return f"valid token positions differ (ref {nr}, cand {nc}; {both_shapes(ref, cand)})"


@dataclass(frozen=True)
class Alignment:
    """How two taps lie over each other, known from their headers and layouts alone: the
    slots each side gathers (canonical order; None = the whole tensor) and the shape
    compared."""

    ref_order: np.ndarray | None
    cand_order: np.ndarray | None
    canonical: np.ndarray | None  # canonical token index of each compared token, None without a layout
    layout: Layout | None  # the reference's
    shape: tuple[int, ...]  # of the gathered array, the same on both sides


def align(ref, cand, ref_layouts: dict, cand_layouts: dict, threshold: float) -> "Alignment | TapResult":
    """The pair's Alignment, or the failed TapResult of a pair that cannot be compared
    (layout, shape, or a dtype that cannot be decoded), with both shapes in the reason.
    Works on taps and on headers: every comparer checks a pair this one way."""
    def failed(status: str, reason: str) -> TapResult:
        return TapResult(info=ref.info, order=ref.order, threshold=threshold, ref_shape=ref.shape,
                         cand_shape=cand.shape, ref_dtype=ref.dtype, cand_dtype=cand.dtype, status=status,
                         reason=reason)

    try:
        r_layout = layout_of(ref, ref_layouts, "reference")
        c_layout = layout_of(cand, cand_layouts, "candidate")
        r_order, r_idx = token_order(ref.shape, r_layout) if r_layout else (None, None)
        c_order, c_idx = token_order(cand.shape, c_layout) if c_layout else (None, None)
    except AlignmentError as exc:
        return failed("layout", f"{exc} ({both_shapes(ref, cand)})")
    mismatch = token_mismatch(r_idx, c_idx, ref, cand)
    if mismatch:
        return failed("layout", mismatch)
    r_shape = (r_order.size, *ref.shape[2:]) if r_layout else tuple(ref.shape)
    c_shape = (c_order.size, *cand.shape[2:]) if c_layout else tuple(cand.shape)
    if r_shape != c_shape:
        return failed("shape", f"shape {ref.shape} vs {cand.shape} ({both_shapes(ref, cand)})")
    for dtype in (ref.dtype, cand.dtype):
        try:
            storage_dtype(dtype)
        except ValueError as exc:
            return failed("dtype", f"cannot decode: {exc} ({both_shapes(ref, cand)})")
    return Alignment(r_order, c_order, r_idx, r_layout, r_shape)


def gathered(array: np.ndarray, order: np.ndarray | None) -> np.ndarray:
    """The valid tokens of a laid-out tensor in canonical order (`order` from align), or the
    tensor itself."""
    return array if order is None else array.reshape(-1, *array.shape[2:])[order]
