"""The offline diff of two dumps, streamed: taps are read in slabs, never whole.

Peak memory does not grow with the dump: a tap is compared chunk by chunk in canonical
token order, so the numbers are the ones the in-memory diff computes (up to the order of
float64 sums).  Two arithmetic paths (`engine`): for large dumps the fused kernel
(`fused`: one pass per chunk pair, every accumulator at once, GIL released) fed by one
reader thread that runs ahead across taps (`pipeline`, `DumpReader.read_flat`: preadv at
HDF5's offsets); otherwise `MetricAccumulator.update` in numpy, with a reader thread per
tap.  Both judge the same pairs the same way (`StreamingComparer._plan`).

Token layouts: chunks are runs of canonical positions.  Each side reads the slots its
tokens for that run live in (a window kept until the run leaves it), so a padded
reference and a packed candidate are aligned exactly as `diff.gather_tokens` does.  A
layout whose canonical order jumps between rows costs re-reads, not memory beyond one
window per side (at most the tap itself).
"""

from __future__ import annotations

import queue
import threading
from dataclasses import dataclass
from typing import Iterator

import numpy as np

from parity.comparison import engine as _engine
from parity.comparison.align import AlignmentError, both_shapes, layout_of, locate, token_mismatch
from parity.comparison.loop import diff
from parity.comparison.metrics import MetricAccumulator
from parity.comparison.pipeline import Pipeline
from parity.comparison.rules import Thresholds, judge
from parity.dump.reader import DumpReader, TapHeader
from parity.report.results import Report, TapResult
from parity.taps.codec import STORAGE_DTYPES, to_float64
from parity.taps.records import Capture, Layout

CHUNK_ELEMENTS = 1 << 20  # numpy path: elements per side per chunk: ~8 MB as float64, ~15 such temporaries


FUSED_CHUNK_ELEMENTS = 1 << 22  # fused path: no temporaries; 8 MB of bf16 per side per chunk


_PSEUDO_TOKEN = 1 << 14  # fused path, taps without a token layout: elements per kernel "token"


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


class _TapAccumulators:
    """Every accumulator of one tap pair: the total, per region, per `--by-token` chunk,
    per attention head; fed chunk by chunk through numpy or through the fused kernel."""

    def __init__(self, layout: Layout | None, features: tuple[int, ...], chunk: int | None) -> None:
        self.layout, self.chunk = layout, chunk
        self.total = MetricAccumulator()
        self.regions = Grouped() if layout is not None and layout.regions else None
        self.chunks = Grouped() if layout is not None and chunk else None
        self.heads = [MetricAccumulator() for _ in range(features[0])] \
            if layout is not None and len(features) == 2 and features[0] > 1 else []
        # kernel slots: 0 total, then regions, then token chunks, then heads
        self.n_regions = len(layout.regions) if self.regions is not None else 0
        self.n_chunks = -(-layout.length // chunk) if self.chunks is not None else 0
        self.head0 = 1 + self.n_regions + self.n_chunks if self.heads else -1
        self.slots = 1 + self.n_regions + self.n_chunks + len(self.heads)

    def update(self, r64: np.ndarray, c64: np.ndarray, idx: np.ndarray | None) -> None:
        """The numpy path: one chunk of decoded tokens (or rows), canonical indices idx."""
        self.total.update(r64, c64)
        if self.regions is not None:
            self.regions.update(self.layout.region_of(idx), r64, c64)
        if self.chunks is not None:
            self.chunks.update((idx % self.layout.length) // self.chunk, r64, c64)
        for h, head_acc in enumerate(self.heads):
            head_acc.update(r64[:, h], c64[:, h])

    def token_slots(self, idx: np.ndarray | None, n: int) -> np.ndarray:
        """[n, 3] kernel slots each token feeds as a whole: total, region, chunk (-1 none)."""
        out = np.full((n, 3), -1, np.int64)
        out[:, 0] = 0
        if self.regions is not None:
            reg = self.layout.region_of(idx)
            out[:, 1] = np.where(reg >= 0, 1 + reg, -1)
        if self.chunks is not None:
            out[:, 2] = 1 + self.n_regions + (idx % self.layout.length) // self.chunk
        return out

    def add_sums(self, fsum: np.ndarray, isum: np.ndarray, fused) -> None:
        """The fused path: fold one kernel call's per-slot sums into the accumulators."""
        for s in np.flatnonzero(isum[:, fused.N]):
            s = int(s)
            if s == 0:
                acc = self.total
            elif s <= self.n_regions:
                acc = self.regions.accs.setdefault(s - 1, MetricAccumulator())
            elif s <= self.n_regions + self.n_chunks:
                acc = self.chunks.accs.setdefault(s - 1 - self.n_regions, MetricAccumulator())
            else:
                acc = self.heads[s - self.head0]
            _engine.feed(acc, fsum, isum, s, fused)


class _SlotWindow:
    """Token slots [lo, hi) of one side's tap as stored, flat; re-read only when a chunk
    needs slots outside them (reads go through `DumpReader.read_flat`)."""

    def __init__(self, side: _Side) -> None:
        self.side, self.lo, self.hi, self.data = side, 0, 0, None
        self.F = side.features

    def get(self, slots: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """(window, element offset of each slot's token in it)."""
        lo, hi = int(slots.min()), int(slots.max()) + 1
        if self.data is None or lo < self.lo or hi > self.hi:
            self.data = None  # free the old window before reading the new one
            self.data = self.side.reader.read_flat(self.side.header.key, lo * self.F, hi * self.F, check=False)
            self.lo, self.hi = lo, hi
        return self.data, (slots - self.lo) * self.F


def _fused_chunks(ref: _Side, cand: _Side, canon: np.ndarray | None) -> Iterator[tuple]:
    """Chunk pairs for the kernel, read and prepared in the reader thread:
    (ref window, cand window, ref offsets, cand offsets, token lengths, canonical indices
    or None, ref slots or None, cand slots or None); windows in storage dtype."""
    if ref.layout is None:
        size = int(np.prod(ref.header.shape, dtype=np.int64))
        for e0 in range(0, size, FUSED_CHUNK_ELEMENTS):
            e1 = min(size, e0 + FUSED_CHUNK_ELEMENTS)
            off = np.arange(0, e1 - e0, _PSEUDO_TOKEN, dtype=np.int64)
            lens = np.minimum(_PSEUDO_TOKEN, (e1 - e0) - off)
            yield (ref.reader.read_flat(ref.header.key, e0, e1, check=False),
                   cand.reader.read_flat(cand.header.key, e0, e1, check=False), off, off, lens, None, None, None)
        return
    tokens = max(1, FUSED_CHUNK_ELEMENTS // max(1, ref.features))
    windows = _SlotWindow(ref), _SlotWindow(cand)
    for k in range(0, canon.size, tokens):
        r_slots, c_slots = ref.order[k:k + tokens], cand.order[k:k + tokens]
        ra, a_off = windows[0].get(r_slots)
        rb, b_off = windows[1].get(c_slots)
        lens = np.full(r_slots.size, ref.features, np.int64)
        yield ra, rb, a_off, b_off, lens, canon[k:k + tokens], r_slots - windows[0].lo, c_slots - windows[1].lo


@dataclass(frozen=True)
class _Plan:
    """How one tap pair is read and compared, once it passed the layout/shape/dtype checks."""

    sides: tuple[_Side, _Side]
    canon: np.ndarray | None  # canonical index of each valid token, None without a token layout
    features: tuple[int, ...]  # per token (or per row, without a token layout)

    def fused(self, kernel) -> bool:
        """Whether the kernel computes this pair (float dtypes, not a scalar, not empty)."""
        ref, cand = self.sides[0].header, self.sides[1].header
        return kernel is not None and _engine.decodable(ref.dtype) and _engine.decodable(cand.dtype) \
            and bool(ref.shape) and 0 not in ref.shape


class StreamingComparer:
    """`diff.compare_taps` for taps left on disk: headers in, TapResult out.

    `kernel`: the fused kernel module (`_engine.load_kernel`), or None for numpy only.
    `pairs`: the (ref, cand) header pairs the diff will compare, in its order: their
    chunks are then read by one reader thread running ahead across taps (`close()` it)."""

    def __init__(self, ref: DumpReader, cand: DumpReader, kernel=None, pairs=()) -> None:
        self.ref, self.cand, self.kernel = ref, cand, kernel
        self._seq = {r.key: i for i, (r, _) in enumerate(pairs)}
        self._pipeline = Pipeline(self._jobs(list(pairs))) if kernel is not None and pairs else None

    def close(self) -> None:
        if self._pipeline is not None:
            self._pipeline.close()

    def _plan(self, ref: TapHeader, cand: TapHeader, ref_layouts: dict, cand_layouts: dict) -> _Plan | dict:
        """The plan of a pair, or the status and reason of a pair that cannot be compared."""
        try:
            r_layout = layout_of(ref, ref_layouts, "reference")
            c_layout = layout_of(cand, cand_layouts, "candidate")
            r_order, r_idx = _token_order(ref, r_layout)
            c_order, c_idx = _token_order(cand, c_layout)
        except AlignmentError as exc:
            return dict(status="layout", reason=f"{exc} ({both_shapes(ref, cand)})")
        mismatch = token_mismatch(r_idx, c_idx, ref, cand)
        if mismatch:
            return dict(status="layout", reason=mismatch)
        feat_r = ref.shape[2:] if r_layout else ref.shape
        feat_c = cand.shape[2:] if c_layout else cand.shape
        if feat_r != feat_c:
            return dict(status="shape", reason=f"shape {ref.shape} vs {cand.shape} ({both_shapes(ref, cand)})")
        for dtype in (ref.dtype, cand.dtype):
            if dtype not in STORAGE_DTYPES:
                return dict(status="dtype", reason=f"cannot decode: unknown dtype {dtype!r} ({both_shapes(ref, cand)})")
        return _Plan((_Side(self.ref, ref, r_layout, r_order), _Side(self.cand, cand, c_layout, c_order)),
                     r_idx if r_layout is not None else None, tuple(feat_r))

    def __call__(self, ref: TapHeader, cand: TapHeader, ref_layouts: dict, cand_layouts: dict, threshold: float,
                 exact_dtypes: bool = True, chunk: int | None = None) -> TapResult:
        base = dict(info=ref.info, order=ref.order, threshold=threshold, ref_shape=ref.shape, cand_shape=cand.shape,
                    ref_dtype=ref.dtype, cand_dtype=cand.dtype)
        plan = self._plan(ref, cand, ref_layouts, cand_layouts)
        if isinstance(plan, dict):
            return TapResult(**plan, **base)
        r_layout, canon, feat_r = plan.sides[0].layout, plan.canon, plan.features
        tokens = canon is not None
        accs = _TapAccumulators(r_layout if tokens else None, feat_r, chunk)
        if plan.fused(self.kernel):
            self._fused(accs, plan)
        else:
            for r, c, idx in _prefetched(_chunks(*plan.sides, canon)):
                accs.update(to_float64(r, ref.dtype), to_float64(c, cand.dtype), idx)
        # A tap's checksum covers its whole array, so it is checked once all of it was
        # read (for free when it was read in order; else by one more pass): a corrupt
        # tap raises DumpError, as reading it whole does.
        self.ref.verify(ref.key)
        self.cand.verify(cand.key)
        metrics = accs.total.result()
        region_metrics = {} if accs.regions is None else {
            r_layout.regions[i].name: m for i, m in accs.regions.results() if i >= 0}
        chunk_metrics = {} if accs.chunks is None else {
            f"{k * chunk}-{min((k + 1) * chunk, r_layout.length) - 1}": m for k, m in accs.chunks.results()}
        verdict = judge(metrics, ref.dtype, cand.dtype, threshold, exact_dtypes)
        if verdict["status"] == "nonfinite":
            shape = ((canon.size, *feat_r) if tokens else tuple(ref.shape))
            verdict["reason"] += locate(metrics.first_nonfinite, shape, canon)
        elif verdict["status"] == "dtype":
            verdict["reason"] += f" ({both_shapes(ref, cand)})"
        return TapResult(metrics=metrics, regions=region_metrics, chunks=chunk_metrics,
                         heads=[h.result() for h in accs.heads], **verdict, **base)

    @staticmethod
    def _prepared(plan: _Plan, verify: bool) -> Iterator[tuple]:
        """A fused pair's chunks, read and made kernel-ready (in a reader thread); with
        `verify`, the rest of both taps is read there too, for their checksums."""
        ref, cand = plan.sides
        for ra, rb, a_off, b_off, lens, idx, r_slots, c_slots in _fused_chunks(ref, cand, plan.canon):
            ka, ta = _engine.kernel_input(ra, ref.header.dtype)
            kb, tb = _engine.kernel_input(rb, cand.header.dtype)
            yield ra, rb, ka, ta, kb, tb, a_off, b_off, lens, idx, r_slots, c_slots
        if verify:  # the rest of both taps, for their checksums (`settle`d by the consumer)
            ref.reader.read_rest(ref.header.key, check=False)
            cand.reader.read_rest(cand.header.key, check=False)

    def _jobs(self, pairs: list) -> Iterator[tuple[int, Iterator]]:
        """The pipeline's jobs: every pair the kernel will compare, in the diff's order."""
        for seq, (ref, cand) in enumerate(pairs):
            plan = self._plan(ref, cand, self.ref.layouts, self.cand.layouts)
            if isinstance(plan, _Plan) and plan.fused(self.kernel):
                yield seq, self._prepared(plan, verify=True)

    def _fused(self, accs: _TapAccumulators, plan: _Plan) -> None:
        """The fused path over one tap pair; a chunk whose raw sums are not exact (float64
        data beyond 2**+-450) is recomputed through numpy."""
        fused = self.kernel
        ref, cand = plan.sides[0].header, plan.sides[1].header
        seq = self._seq.get(ref.key, -1)
        if self._pipeline is not None and self._pipeline.has(seq):
            chunks = self._pipeline.items(seq)
        else:  # not planned ahead (a pair the diff was not expected to compare)
            chunks = _prefetched(self._prepared(plan, verify=False))
        heads = len(accs.heads) or 1
        for ra, rb, ka, ta, kb, tb, a_off, b_off, lens, idx, r_slots, c_slots in chunks:
            fsum, isum = fused.new_sums(accs.slots)
            fused.fused_sums(ka, ta, a_off, kb, tb, b_off, lens, heads, accs.token_slots(idx, a_off.size),
                             accs.head0, fsum, isum)
            # the checksums of what the reader thread read, here: that thread does the I/O
            self.ref.settle()
            self.cand.settle()
            if _engine.sums_are_exact(fsum, fused):
                accs.add_sums(fsum, isum, fused)
                continue
            if idx is None:
                r, c = ra, rb
            else:
                r = ra.reshape(-1, *plan.features)[r_slots]
                c = rb.reshape(-1, *plan.features)[c_slots]
            accs.update(to_float64(r, ref.dtype), to_float64(c, cand.dtype), idx)


def header_capture(reader: DumpReader, keep=None) -> Capture:
    """A Capture whose taps are the dump's headers (data stays on disk), optionally filtered."""
    headers = [h for h in reader.headers if keep is None or keep(h.info.name, h.key)]
    return Capture(taps=headers, layouts=dict(reader.layouts), meta=reader.meta, error=reader.error,
                   complete=reader.complete)


def diff_readers(ref: DumpReader, cand: DumpReader, thresholds: Thresholds | None = None, keep=None,
                 progress=None, chunk: int | None = None,
                 labels: tuple[str, str] = ("reference", "candidate"), engine: str = "auto") -> Report:
    """The diff of two open dumps, streamed (see the module docstring).  `engine`: "auto"
    (the fused kernel for large dumps when numba is installed), "fused" or "numpy"."""
    ref_cap, cand_cap = header_capture(ref, keep), header_capture(cand, keep)
    data = sum(_stored_bytes(h) for h in (*ref_cap.taps, *cand_cap.taps))
    kernel = _engine.load_kernel(engine, data)
    # the pairs diff() compares, in its order (the reference's execution order)
    cand_by_key = {h.key: h for h in cand_cap.taps}
    pairs = [(h, cand_by_key[h.key]) for h in sorted(ref_cap.taps, key=lambda h: h.order) if h.key in cand_by_key]
    comparer = StreamingComparer(ref, cand, kernel, pairs)
    try:
        return diff(ref_cap, cand_cap, thresholds, progress=progress, compare=comparer, chunk=chunk, labels=labels)
    finally:
        comparer.close()


def _stored_bytes(header: TapHeader) -> int:
    itemsize = STORAGE_DTYPES[header.dtype].itemsize if header.dtype in STORAGE_DTYPES else 8
    return int(np.prod(header.shape, dtype=np.int64)) * itemsize
