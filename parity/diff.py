"""The comparison loop: pair taps, align tokens, compute metrics, judge, find the first
divergence.  Works on in-memory captures and on dumps alike; never imports torch."""
from __future__ import annotations

import fnmatch
from dataclasses import dataclass

import numpy as np

from .codec import storage_dtype, to_float64
from .metrics import Metrics, compare
from .records import Capture, Layout, Tap
from .report import Report, TapResult


@dataclass(frozen=True)
class Thresholds:
    """Minimum cosine per tap: `min_cos` unless a pattern matches (the last match wins)."""

    min_cos: float = 0.999
    patterns: tuple[tuple[str, float], ...] = ()

    def __post_init__(self) -> None:
        for _, value in ((None, self.min_cos), *self.patterns):
            if not -1.0 <= value <= 1.0:
                raise ValueError(f"cosine threshold {value} is outside [-1, 1]")

    @classmethod
    def parse(cls, min_cos: float, specs: list[str] | tuple[str, ...] = ()) -> "Thresholds":
        patterns = []
        for spec in specs:
            glob, sep, value = spec.rpartition("=")
            try:
                patterns.append((glob.strip(), float(value)))
            except ValueError:
                sep = ""
            if not sep or not glob.strip():
                raise ValueError(f"bad threshold {spec!r}: expected GLOB=MIN_COS, e.g. 'expert.*.mlp=0.995'")
        return cls(min_cos, tuple(patterns))

    def for_tap(self, name: str, key: str) -> float:
        value = self.min_cos
        for glob, v in self.patterns:
            if fnmatch.fnmatchcase(name, glob) or fnmatch.fnmatchcase(key, glob):
                value = v
        return value

    def to_dict(self) -> dict:
        return {"min_cos": self.min_cos, "patterns": {g: v for g, v in self.patterns}}


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


def _layout_of(tap: Tap, layouts: dict, side: str) -> Layout | None:
    if not tap.layout:
        return None
    if tap.layout not in layouts:
        raise AlignmentError(f"{side} tap uses layout {tap.layout!r}, which its capture does not define")
    return layouts[tap.layout]


def _both(ref: Tap, cand: Tap) -> str:
    """Both sides' shapes and dtypes, for the reason of a tap that cannot be compared."""
    return f"ref {list(ref.shape)} {ref.dtype}, cand {list(cand.shape)} {cand.dtype}"


def _locate(flat: int, shape: tuple[int, ...], canonical: np.ndarray | None) -> str:
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
    return f"valid token positions differ (ref {nr}, cand {nc}; {_both(ref, cand)})"


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
        r_layout = _layout_of(ref, ref_layouts, "reference")
        c_layout = _layout_of(cand, cand_layouts, "candidate")
        r_order, r_idx = token_order(ref.shape, r_layout) if r_layout else (None, None)
        c_order, c_idx = token_order(cand.shape, c_layout) if c_layout else (None, None)
    except AlignmentError as exc:
        return failed("layout", f"{exc} ({_both(ref, cand)})")
    mismatch = token_mismatch(r_idx, c_idx, ref, cand)
    if mismatch:
        return failed("layout", mismatch)
    r_shape = (r_order.size, *ref.shape[2:]) if r_layout else tuple(ref.shape)
    c_shape = (c_order.size, *cand.shape[2:]) if c_layout else tuple(cand.shape)
    if r_shape != c_shape:
        return failed("shape", f"shape {ref.shape} vs {cand.shape} ({_both(ref, cand)})")
    for dtype in (ref.dtype, cand.dtype):
        try:
            storage_dtype(dtype)
        except ValueError as exc:
            return failed("dtype", f"cannot decode: {exc} ({_both(ref, cand)})")
    return Alignment(r_order, c_order, r_idx, r_layout, r_shape)


def gathered(array: np.ndarray, order: np.ndarray | None) -> np.ndarray:
    """The valid tokens of a laid-out tensor in canonical order (`order` from align), or the
    tensor itself."""
    return array if order is None else array.reshape(-1, *array.shape[2:])[order]


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
                         reason=f"cannot decode: {exc} ({_both(ref, cand)})")
    metrics = compare(r64, c64)
    regions = region_metrics(r64, c64, a.canonical, a.layout)
    chunks = chunk_metrics(r64, c64, a.canonical, a.layout, chunk) if chunk else {}
    return judged(ref, cand, threshold, exact_dtypes, metrics, regions, chunks,
                  head_metrics(r64, c64, a.canonical), a.shape, a.canonical)


def judged(ref, cand, threshold: float, exact_dtypes: bool, metrics: Metrics, regions: dict, chunks: dict,
           heads: list, shape: tuple[int, ...], canonical: np.ndarray | None) -> TapResult:
    """The TapResult of a compared pair, from its metrics: the verdict and where its reason
    points (`shape`: of the compared, gathered array).  Shared by every comparer (host
    numpy, on-device torch), so a tap is judged the same whichever computed its numbers."""
    base = dict(info=ref.info, order=ref.order, threshold=threshold, ref_shape=ref.shape, cand_shape=cand.shape,
                ref_dtype=ref.dtype, cand_dtype=cand.dtype)
    verdict = judge(metrics, ref.dtype, cand.dtype, threshold, exact_dtypes)
    if verdict["status"] == "nonfinite":
        verdict["reason"] += _locate(metrics.first_nonfinite, shape, canonical)
    elif verdict["status"] == "dtype":
        verdict["reason"] += f" ({_both(ref, cand)})"
    return TapResult(metrics=metrics, regions=regions, chunks=chunks, heads=heads, **verdict, **base)


def chunk_metrics(r64: np.ndarray, c64: np.ndarray, idx: np.ndarray | None, layout: Layout | None,
                  size: int) -> dict:
    """Metrics per chunk of `size` canonical positions ("0-15", "16-31", ...), the seed's
    per-chunk table: where along the sequence an error lives, region names or not."""
    if layout is None or idx is None:
        return {}
    pos = idx % layout.length
    which = pos // size
    return {f"{k * size}-{min((k + 1) * size, layout.length) - 1}": compare(r64[which == k], c64[which == k])
            for k in np.unique(which)}


def head_metrics(r64: np.ndarray, c64: np.ndarray, idx: np.ndarray | None) -> list:
    """Per attention head, for token tensors whose features are [heads, head_dim] (q, k, v
    as the attention core sees them): which heads carry the error."""
    if idx is None or r64.ndim != 3 or r64.shape[1] < 2:
        return []
    return [compare(r64[:, h], c64[:, h]) for h in range(r64.shape[1])]


def region_metrics(r64: np.ndarray, c64: np.ndarray, idx: np.ndarray | None, layout: Layout | None) -> dict:
    """Metrics per named region of the layout (image vs text tokens, each camera, ...):
    where in the sequence a divergence lives.  Empty when the layout declares none."""
    if layout is None or idx is None or not layout.regions:
        return {}
    which = layout.region_of(idx)
    return {reg.name: compare(r64[which == i], c64[which == i]) for i, reg in enumerate(layout.regions)
            if (which == i).any()}


def judge(m: Metrics, ref_dtype: str, cand_dtype: str, threshold: float, exact_dtypes: bool = True) -> dict:
    """The verdict on one tap.  A dtype change fails unless the runs were asked for
    different dtypes (`exact_dtypes=False`): then only the values are judged."""
    if not m.finite:
        return dict(status="nonfinite", reason=(
            f"NaN/Inf: ref nan={m.nan_ref} inf={m.inf_ref}, cand nan={m.nan_cand} inf={m.inf_cand}, "
            f"first at flat index {m.first_nonfinite}"))
    if m.n == 0:
        return dict(status="empty", reason="no valid elements to compare")
    if exact_dtypes and ref_dtype != cand_dtype:
        return dict(status="dtype", reason=f"dtype {ref_dtype} vs {cand_dtype}")
    if not m.cos >= threshold:
        return dict(status="fail", reason=f"cos {m.cos:.6f} < {threshold}")
    return dict(status="pass", reason="")


def _listed(rows: list[TapResult], limit: int = 5) -> str:
    keys = [r.key for r in rows]
    return ", ".join(keys[:limit]) + (f", ... ({len(keys) - limit} more)" if len(keys) > limit else "")


def diff(ref: Capture, cand: Capture, thresholds: Thresholds | None = None, exact_dtypes: bool | None = None,
         progress=None, compare=compare_taps, chunk: int | None = None,
         labels: tuple[str, str] = ("reference", "candidate"), stopped: str | None = None) -> Report:
    """Compare every tap of `cand` against `ref`, in the reference's execution order.

    Fails closed: the report passes only if at least one tap was compared, every tap of
    either side was compared and passed, and both runs completed.  `labels` name the two
    sides in run-level problems (e.g. "reference a.h5").

    `exact_dtypes` (default: whether both runs declare the same model dtype in their
    metadata) makes a tap whose dtype changed fail; a float32-vs-bfloat16 comparison
    judges values only.  `progress(done, total)` is called after each tap.  `compare`
    judges one pair (same signature as `compare_taps`): the streaming diff of two dumps
    passes its own, over taps that are headers whose data stays on disk.  `chunk`: also
    break each tap down by chunks of that many canonical token positions.  `stopped`: why
    the candidate run was ended early on purpose (a stop at the first divergence): the
    reference taps it never produced are `not_reached`, and the report says so."""
    if exact_dtypes is None:
        exact_dtypes = ref.meta.get("dtype") == cand.meta.get("dtype")
    thresholds = thresholds or Thresholds()
    cand_taps = cand.by_key()
    rows: list[TapResult] = []
    raised_at = cand.error.key if cand.error else None
    reached = True
    for tap in sorted(ref.taps, key=lambda t: t.order):
        threshold = thresholds.for_tap(tap.info.name, tap.key)
        other = cand_taps.pop(tap.key, None)
        if other is not None:
            rows.append(compare(tap, other, ref.layouts, cand.layouts, threshold, exact_dtypes, chunk))
            if progress is not None:
                progress(len(rows), len(ref.taps))
            continue
        common = dict(info=tap.info, order=tap.order, threshold=threshold, ref_shape=tap.shape, ref_dtype=tap.dtype)
        if cand.error and tap.key == raised_at:
            rows.append(TapResult(status="raised", reason=f"{cand.error.exc_type}: {cand.error.message}", **common))
            reached = False
        elif stopped and not cand.error:
            rows.append(TapResult(status="not_reached", reason=f"not reached: the candidate stopped {stopped}",
                                  **common))
        elif cand.error and (not reached or raised_at is None):
            rows.append(TapResult(status="not_reached", reason=f"not reached: candidate raised earlier "
                                  f"({cand.error.exc_type}: {cand.error.message})", **common))
        else:
            rows.append(TapResult(status="missing", reason="tap missing in candidate", **common))
    for tap in sorted(cand_taps.values(), key=lambda t: t.order):
        rows.append(TapResult(info=tap.info, order=None, status="extra", reason="tap only in candidate",
                              threshold=thresholds.for_tap(tap.info.name, tap.key), cand_shape=tap.shape,
                              cand_dtype=tap.dtype))
    problems = []
    ref_label, cand_label = labels
    if not ref.taps:
        problems.append(f"{ref_label} has no taps: nothing was compared")
    if not cand.taps:
        problems.append(f"{cand_label} has no taps: nothing was compared")
    compared = [r for r in rows if r.ref_shape is not None and r.cand_shape is not None]
    if ref.taps and cand.taps and not compared:
        problems.append(f"no tap in common between {ref_label} and {cand_label}: nothing was compared")
    for status, where in (("missing", ref_label), ("extra", cand_label)):
        only = [r for r in rows if r.status == status]
        if only:
            problems.append(f"{len(only)} tap{'s' if len(only) > 1 else ''} only in the {where}: {_listed(only)}")
    if stopped:
        skipped = sum(r.status == "not_reached" for r in rows)
        problems.append(f"{cand_label} stopped early {stopped}: {skipped} reference "
                        f"tap{'s' if skipped != 1 else ''} never compared")
    for label, c in ((ref_label, ref), (cand_label, cand)):
        if not c.complete and c.error is None:
            problems.append(f"{label} capture is incomplete (interrupted): taps after the stop were never compared")
    if ref.error:
        problems.append(f"{ref_label} raised at {ref.error.key or 'an untapped place'}: "
                        f"{ref.error.exc_type}: {ref.error.message}")
    if cand.error and not any(r.status == "raised" for r in rows):
        # Raised where no reference tap shows it (outside every tap, after the last one, or
        # at a tap it had already recorded): still a failure, whatever the taps say.
        problems.append(f"{cand_label} raised at {raised_at or 'an untapped place'}: "
                        f"{cand.error.exc_type}: {cand.error.message}")
    return Report(rows=rows, ref_meta=dict(ref.meta), cand_meta=dict(cand.meta),
                  thresholds={**thresholds.to_dict(), "exact_dtypes": exact_dtypes},
                  cand_error=cand.error, problems=problems)
