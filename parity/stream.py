"""The offline diff of two dumps, streamed: taps are read in slabs, never whole.

Peak memory does not grow with the dump: a tap is compared chunk by chunk through the
float64 `MetricAccumulator`, in canonical token order, so the numbers are the ones the
in-memory diff computes (up to the order of float64 sums).  A reader thread fetches the
next chunks from both files while the main thread decodes and accumulates the current
ones (h5py reads and numpy arithmetic both release the GIL for their heavy parts).

Token layouts: chunks are runs of canonical positions.  Each side reads the rows its
slots for that run live in (a window of rows kept until the run leaves it), so a padded
reference and a packed candidate are aligned exactly as `diff.gather_tokens` does.  A
layout whose canonical order jumps between rows costs re-reads, not memory beyond one
row window per side (at most the tap itself).
"""
from __future__ import annotations

import queue
import threading
from dataclasses import dataclass
from typing import Iterator

import numpy as np

from .codec import STORAGE_DTYPES, to_float64
from .diff import AlignmentError, Thresholds, _both, _layout_of, _locate, diff, judge, token_mismatch
from .dump import DumpReader, TapHeader
from .metrics import MetricAccumulator
from .records import Capture, Layout
from .report import Report, TapResult

CHUNK_ELEMENTS = 1 << 20  # elements per side per chunk: ~8 MB as float64, ~15 such temporaries
_PREFETCH = 3  # chunk pairs read ahead


@dataclass(frozen=True)
class _Side:
    """How to read one side of a tap pair: its reader, header and token order."""

    reader: DumpReader
    header: TapHeader
    layout: Layout | None
    order: np.ndarray | None  # flat slot index of each valid token, in canonical order

    @property
    def features(self) -> int:
        return int(np.prod(self.header.shape[2:] if self.layout else self.header.shape[1:], dtype=np.int64))


def _token_order(header: TapHeader, layout: Layout | None) -> tuple[np.ndarray | None, np.ndarray | None]:
    """(flat slot of each valid token in canonical order, canonical indices), as gather_tokens."""
    if layout is None:
        return None, None
    R, T = layout.slots.shape
    if len(header.shape) < 2 or header.shape[:2] != (R, T):
        raise AlignmentError(f"tensor {header.shape} does not fit its token layout [{R}, {T}]")
    idx = layout.slots.reshape(-1)
    keep = np.flatnonzero(idx >= 0)
    order = keep[np.argsort(idx[keep], kind="stable")]
    return order, idx[order]


class _RowWindow:
    """Rows [start, stop) of one tap, re-read only when a chunk needs rows outside them."""

    def __init__(self, side: _Side) -> None:
        self.side, self.start, self.stop, self.rows = side, 0, 0, None
        self.T = side.header.shape[1]

    def gather(self, slots: np.ndarray) -> np.ndarray:
        r0, r1 = int(slots.min()) // self.T, int(slots.max()) // self.T + 1
        if self.rows is None or r0 < self.start or r1 > self.stop:
            self.rows = None  # free the old window before reading the new one
            self.rows = self.side.reader.read_rows(self.side.header.key, r0, r1)
            self.start, self.stop = r0, r1
        flat = self.rows.reshape((self.stop - self.start) * self.T, *self.side.header.shape[2:])
        return flat[slots - self.start * self.T]


def _chunks(ref: _Side, cand: _Side, canon: np.ndarray | None) -> Iterator[tuple]:
    """(ref chunk, cand chunk, canonical indices or None) in canonical order, storage dtype."""
    if ref.layout is None:
        shape = ref.header.shape
        if not shape:
            yield ref.reader.load(ref.header.key), cand.reader.load(cand.header.key), None
            return
        rows = max(1, CHUNK_ELEMENTS // max(1, ref.features))
        for start in range(0, shape[0], rows):
            stop = min(shape[0], start + rows)
            yield (ref.reader.read_rows(ref.header.key, start, stop),
                   cand.reader.read_rows(cand.header.key, start, stop), None)
        return
    tokens = max(1, CHUNK_ELEMENTS // max(1, ref.features))
    windows = _RowWindow(ref), _RowWindow(cand)
    for k in range(0, canon.size, tokens):
        yield (windows[0].gather(ref.order[k:k + tokens]), windows[1].gather(cand.order[k:k + tokens]),
               canon[k:k + tokens])


def _prefetched(items: Iterator[tuple]) -> Iterator[tuple]:
    """Run an iterator in a reader thread, `_PREFETCH` items ahead; errors re-raised here."""
    q: queue.Queue = queue.Queue(maxsize=_PREFETCH)
    stop = threading.Event()
    done = object()

    def produce() -> None:
        try:
            for item in items:
                while not stop.is_set():
                    try:
                        q.put(item, timeout=0.1)
                        break
                    except queue.Full:
                        continue
                if stop.is_set():
                    return
            q.put(done)
        except BaseException as exc:  # noqa: BLE001 - handed to the consumer
            q.put(exc)

    thread = threading.Thread(target=produce, name="parity-reader", daemon=True)
    thread.start()
    try:
        while True:
            item = q.get()
            if item is done:
                return
            if isinstance(item, BaseException):
                raise item
            yield item
    finally:
        stop.set()
        thread.join()


class StreamingComparer:
    """`diff.compare_taps` for taps left on disk: headers in, TapResult out."""

    def __init__(self, ref: DumpReader, cand: DumpReader) -> None:
        self.ref, self.cand = ref, cand

    def __call__(self, ref: TapHeader, cand: TapHeader, ref_layouts: dict, cand_layouts: dict, threshold: float,
                 exact_dtypes: bool = True, chunk: int | None = None) -> TapResult:
        base = dict(info=ref.info, order=ref.order, threshold=threshold, ref_shape=ref.shape, cand_shape=cand.shape,
                    ref_dtype=ref.dtype, cand_dtype=cand.dtype)
        try:
            r_layout = _layout_of(ref, ref_layouts, "reference")
            c_layout = _layout_of(cand, cand_layouts, "candidate")
            r_order, r_idx = _token_order(ref, r_layout)
            c_order, c_idx = _token_order(cand, c_layout)
        except AlignmentError as exc:
            return TapResult(status="layout", reason=f"{exc} ({_both(ref, cand)})", **base)
        mismatch = token_mismatch(r_idx, c_idx, ref, cand)
        if mismatch:
            return TapResult(status="layout", reason=mismatch, **base)
        feat_r = ref.shape[2:] if r_layout else ref.shape
        feat_c = cand.shape[2:] if c_layout else cand.shape
        if feat_r != feat_c:
            return TapResult(status="shape", reason=f"shape {ref.shape} vs {cand.shape} ({_both(ref, cand)})", **base)
        for dtype in (ref.dtype, cand.dtype):
            if dtype not in STORAGE_DTYPES:
                return TapResult(status="dtype", reason=f"cannot decode: unknown dtype {dtype!r} ({_both(ref, cand)})",
                                 **base)
        acc = MetricAccumulator()
        tokens = r_layout is not None and r_idx is not None
        regions = Grouped() if tokens and r_layout.regions else None
        chunks = Grouped() if tokens and chunk else None
        heads = [MetricAccumulator() for _ in range(feat_r[0])] if tokens and len(feat_r) == 2 and feat_r[0] > 1 \
            else []
        sides = (_Side(self.ref, ref, r_layout, r_order), _Side(self.cand, cand, c_layout, c_order))
        for r, c, idx in _prefetched(_chunks(*sides, r_idx)):
            r64, c64 = to_float64(r, ref.dtype), to_float64(c, cand.dtype)
            acc.update(r64, c64)
            if regions is not None:
                regions.update(r_layout.region_of(idx), r64, c64)
            if chunks is not None:
                chunks.update((idx % r_layout.length) // chunk, r64, c64)
            for h, head_acc in enumerate(heads):
                head_acc.update(r64[:, h], c64[:, h])
        # A tap's checksum covers its whole array, so it is checked once all of it was
        # read (for free when its rows were read in order; else by one more pass): a
        # corrupt tap raises DumpError, as reading it whole does.
        self.ref.verify(ref.key)
        self.cand.verify(cand.key)
        metrics = acc.result()
        region_metrics = {} if regions is None else {
            r_layout.regions[i].name: m for i, m in regions.results() if i >= 0}
        chunk_metrics = {} if chunks is None else {
            f"{k * chunk}-{min((k + 1) * chunk, r_layout.length) - 1}": m for k, m in chunks.results()}
        verdict = judge(metrics, ref.dtype, cand.dtype, threshold, exact_dtypes)
        if verdict["status"] == "nonfinite":
            shape = ((r_idx.size, *feat_r) if tokens else tuple(ref.shape))
            verdict["reason"] += _locate(metrics.first_nonfinite, shape, r_idx if tokens else None)
        elif verdict["status"] == "dtype":
            verdict["reason"] += f" ({_both(ref, cand)})"
        return TapResult(metrics=metrics, regions=region_metrics, chunks=chunk_metrics,
                         heads=[h.result() for h in heads], **verdict, **base)


class Grouped:
    """One metric accumulator per group label (region index, token chunk), fed chunk by chunk."""

    def __init__(self) -> None:
        self.accs: dict[int, MetricAccumulator] = {}

    def update(self, labels: np.ndarray, r64: np.ndarray, c64: np.ndarray) -> None:
        for label in np.unique(labels):
            mask = labels == label
            self.accs.setdefault(int(label), MetricAccumulator()).update(r64[mask], c64[mask])

    def results(self):
        return sorted((k, a.result()) for k, a in self.accs.items())


def header_capture(reader: DumpReader, keep=None) -> Capture:
    """A Capture whose taps are the dump's headers (data stays on disk), optionally filtered."""
    headers = [h for h in reader.headers if keep is None or keep(h.info.name, h.key)]
    return Capture(taps=headers, layouts=dict(reader.layouts), meta=reader.meta, error=reader.error,
                   complete=reader.complete)


def diff_readers(ref: DumpReader, cand: DumpReader, thresholds: Thresholds | None = None, keep=None,
                 progress=None, chunk: int | None = None,
                 labels: tuple[str, str] = ("reference", "candidate")) -> Report:
    """The diff of two open dumps, streamed (see the module docstring)."""
    return diff(header_capture(ref, keep), header_capture(cand, keep), thresholds, progress=progress,
                compare=StreamingComparer(ref, cand), chunk=chunk, labels=labels)
