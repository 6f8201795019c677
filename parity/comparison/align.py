"""Laying two taps over each other: token layouts, shapes, dtypes (the one pair check).

Every comparer (host, streamed, on the device, stats) checks a pair here, so a pair that
cannot be compared fails the same way, with the same reason, whichever compares it.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from parity.taps.codec import storage_dtype
from parity.taps.records import Layout, Tap


class AlignmentError(Exception):
    """Two taps cannot be laid over each other (shape or token layout differs)."""


def fits(shape: tuple[int, ...], layout: Layout) -> bool:
    """Whether a tensor of `shape` is laid out by `layout`: [rows, slots, *features]."""
    return len(shape) >= 2 and tuple(shape[:2]) == layout.slots.shape


def gather_tokens(array: np.ndarray, layout: Layout | None) -> tuple[np.ndarray, np.ndarray | None]:
    """Valid token slots in canonical order: ([N, features...], canonical indices [N])."""
    if layout is None:
        return array, None
    order, canonical = token_order(array.shape, layout)
    return gathered(array, order), canonical


def token_order(shape: tuple[int, ...], layout: Layout) -> tuple[np.ndarray, np.ndarray]:
    """(flat slot of each valid token in canonical order [N], their canonical indices [N])
    for a tensor of `shape` laid out by `layout`: what gathering needs, without the data
    (the streamed diff reads by it, the on-device compare gathers with it there)."""
    if not fits(shape, layout):
        R, T = layout.slots.shape
        raise AlignmentError(f"tensor {tuple(shape)} does not fit its token layout [{R}, {T}]")
    idx = layout.slots.reshape(-1)
    keep = np.flatnonzero(idx >= 0)
    order = keep[np.argsort(idx[keep], kind="stable")]
    return order, idx[order]


def gathered(array: np.ndarray, order: np.ndarray | None) -> np.ndarray:
    """The valid tokens of a laid-out tensor in canonical order (`order` from align), or the
    tensor itself."""
    if order is None:
        return array
    return array.reshape(array.shape[0] * array.shape[1], *array.shape[2:])[order]  # [R*T, *features][order]


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


@dataclass(frozen=True)
class Side:
    """One side of a pair as its comparer sees it: which valid tokens, in what shape.  A
    tap's comes from its layout (`side_of`); a stats summary's was fixed when it was taken."""

    shape: tuple[int, ...]  # of the compared array: [valid tokens, *features], or the tensor's
    positions: object = None  # which canonical positions: their indices [N] (a summary: a digest); None: all
    order: np.ndarray | None = None  # flat slot of each valid token in canonical order, to gather them
    layout: Layout | None = None


def side_of(tap, layouts: dict, side: str) -> Side:
    """The Side of a tap or header under its capture's layouts; AlignmentError if its
    layout is undefined or does not fit it."""
    layout = layout_of(tap, layouts, side)
    if layout is None:
        return Side(tuple(tap.shape))
    order, canonical = token_order(tap.shape, layout)
    return Side((order.size, *tap.shape[2:]), canonical, order, layout)


@dataclass(frozen=True)
class Refusal:
    """Why a pair cannot be compared: the status and reason of its failed row."""

    status: str  # layout | shape | dtype
    reason: str


def cannot_decode(ref, cand, exc: Exception) -> Refusal:
    return Refusal("dtype", f"cannot decode: {exc} ({both_shapes(ref, cand)})")


def refusal(ref, cand, r: Side, c: Side, decodes: bool = True) -> Refusal | None:
    """Why two sides cannot be laid over each other (None if they can): their valid token
    positions, then their compared shapes, then (for a comparer that `decodes` the data)
    both dtypes.  Both shapes are in every reason."""
    same = (r.positions is None) == (c.positions is None) and (
        r.positions is None or np.array_equal(r.positions, c.positions))  # indices, or digests (str)
    if not same:
        nr = "all" if r.positions is None else r.shape[0]
        nc = "all" if c.positions is None else c.shape[0]
        return Refusal("layout", f"valid token positions differ (ref {nr}, cand {nc}; {both_shapes(ref, cand)})")
    if r.shape != c.shape:
        return Refusal("shape", f"shape {ref.shape} vs {cand.shape} ({both_shapes(ref, cand)})")
    for dtype in (ref.dtype, cand.dtype) if decodes else ():
        try:
            storage_dtype(dtype)
        except ValueError as exc:
            return cannot_decode(ref, cand, exc)
    return None


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


def align(ref, cand, ref_layouts: dict, cand_layouts: dict) -> Alignment | Refusal:
    """The pair's Alignment, or the Refusal of a pair that cannot be compared (layout,
    shape, or a dtype that cannot be decoded).  Works on taps and on headers."""
    try:
        r = side_of(ref, ref_layouts, "reference")
        c = side_of(cand, cand_layouts, "candidate")
    except AlignmentError as exc:
        return Refusal("layout", f"{exc} ({both_shapes(ref, cand)})")
    return refusal(ref, cand, r, c) or Alignment(r.order, c.order, r.positions, r.layout, r.shape)
