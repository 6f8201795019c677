"""The offline diff of two dumps, streamed: taps are read in slabs, never whole.

Peak memory does not grow with the dump: a tap is compared chunk by chunk in canonical
token order (`slabs`), so the numbers are the ones the in-memory diff computes (up to the
order of float64 sums).  Two arithmetic paths (`engine`): for large dumps the fused kernel
(`fused`: one pass per chunk pair, every accumulator at once, GIL released) fed by one
reader thread that runs ahead across taps (`pipeline`, `DumpReader.read_flat`: preadv at
HDF5's offsets); otherwise `MetricAccumulator.update` in numpy, with a reader thread per
tap.  Both take the pairs `align` lays over each other, break them down by the same
`Groups` and judge them with `rules.judged`, as the in-memory diff does.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass

import numpy as np

from parity.comparison.align import Alignment, Refusal, align
from parity.comparison.breakdown import Groups
from parity.comparison.engine import decodable, feed, kernel_input, load_kernel, sums_are_exact
from parity.comparison.loop import diff
from parity.comparison.metrics import MetricAccumulator
from parity.comparison.pipeline import Pipeline
from parity.comparison.rules import Thresholds, judged, refused
from parity.comparison.slabs import Source, chunks, fused_chunks, prefetched
from parity.dump.reader import DumpReader, TapHeader
from parity.report.results import Report, TapResult
from parity.taps.codec import STORAGE_DTYPES, to_float64
from parity.taps.records import Capture

CHUNK_ELEMENTS = 1 << 20  # numpy path: elements per side per chunk: ~8 MB as float64, ~15 such temporaries


FUSED_CHUNK_ELEMENTS = 1 << 22  # fused path: no temporaries; 8 MB of bf16 per side per chunk


PSEUDO_TOKEN = 1 << 14  # fused path, taps without a token layout: elements per kernel "token"


PREFETCH = 3  # chunk pairs read ahead


class Grouped:
    """One metric accumulator per group index (region, token chunk), fed chunk by chunk."""

    def __init__(self) -> None:
        self.accs: dict[int, MetricAccumulator] = {}

    def update(self, labels: np.ndarray, r64: np.ndarray, c64: np.ndarray) -> None:
        for label in np.unique(labels):
            mask = labels == label
            self.accs.setdefault(int(label), MetricAccumulator()).update(r64[mask], c64[mask])

    def results(self):
        return [(k, a.result()) for k, a in self.accs.items()]


class TapSums:
    """Every accumulator of one tap pair: the total, per region, per `--by-token` chunk,
    per attention head (its `Groups`); fed chunk by chunk through numpy or through the
    fused kernel, whose per-slot sums it folds in."""

    def __init__(self, groups: Groups) -> None:
        self.groups = groups
        self.total = MetricAccumulator()
        self.regions = Grouped() if groups.region_of is not None else None
        self.chunks = Grouped() if groups.chunk_of is not None else None
        self.heads = [MetricAccumulator() for _ in range(groups.heads)]
        # kernel slots: 0 total, then regions, then token chunks, then heads
        self.n_regions = len(groups.regions) if self.regions is not None else 0
        self.n_chunks = len(groups.chunks) if self.chunks is not None else 0
        self.head0 = 1 + self.n_regions + self.n_chunks if self.heads else -1
        self.slots = 1 + self.n_regions + self.n_chunks + len(self.heads)

    def update(self, r64: np.ndarray, c64: np.ndarray, span: slice | None) -> None:
        """The numpy path: one chunk of decoded tokens [n, *features] (or rows), the
        compared tokens `span` (None without a token layout)."""
        self.total.update(r64, c64)
        if self.regions is not None:
            self.regions.update(self.groups.region_of[span], r64, c64)
        if self.chunks is not None:
            self.chunks.update(self.groups.chunk_of[span], r64, c64)
        for h, head_acc in enumerate(self.heads):
            head_acc.update(r64[:, h], c64[:, h])  # [n, dim]

    def token_slots(self, span: slice | None, n: int) -> np.ndarray:
        """[n, 3] kernel slots each token feeds as a whole: total, region, chunk (-1 none)."""
        out = np.full((n, 3), -1, np.int64)
        out[:, 0] = 0
        if self.regions is not None:
            reg = self.groups.region_of[span]
            out[:, 1] = np.where(reg >= 0, 1 + reg, -1)
        if self.chunks is not None:
            out[:, 2] = 1 + self.n_regions + self.groups.chunk_of[span]
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
            feed(acc, fsum, isum, s, fused)

    def tables(self) -> tuple[dict, dict, list]:
        """(regions, chunks, heads) Metrics, named as every comparer names them."""
        regions, chunks = self.groups.tables(self.regions.results() if self.regions is not None else (),
                                             self.chunks.results() if self.chunks is not None else ())
        return regions, chunks, [h.result() for h in self.heads]


@dataclass(frozen=True)
class Plan:
    """How one aligned tap pair is read and compared."""

    ref: Source
    cand: Source
    alignment: Alignment

    @classmethod
    def of(cls, ref: DumpReader, cand: DumpReader, ref_header: TapHeader, cand_header: TapHeader,
           a: Alignment) -> Plan:
        features = int(np.prod(a.shape[1:], dtype=np.int64))  # per token (per row without a layout)
        return cls(Source(ref, ref_header, a.ref_order, features), Source(cand, cand_header, a.cand_order, features), a)

    @property
    def tokens(self) -> int | None:
        """Compared tokens, None without a token layout."""
        return None if self.alignment.canonical is None else self.alignment.canonical.size

    def fused(self, kernel) -> bool:
        """Whether the kernel computes this pair (float dtypes, not a scalar, not empty)."""
        ref, cand = self.ref.header, self.cand.header
        return kernel is not None and decodable(ref.dtype) and decodable(cand.dtype) \
            and bool(ref.shape) and 0 not in ref.shape


class StreamingComparer:
    """`host.compare_taps` for taps left on disk: headers in, TapResult out.

    `kernel`: the fused kernel module (`engine.load_kernel`), or None for numpy only.
    `pairs`: the (ref, cand) header pairs the diff will compare, in its order: their
    chunks are then read by one reader thread running ahead across taps (`close()` it)."""

    def __init__(self, ref: DumpReader, cand: DumpReader, kernel=None, pairs=()) -> None:
        self.ref, self.cand, self.kernel = ref, cand, kernel
        self._seq = {r.key: i for i, (r, _) in enumerate(pairs)}
        self._pipeline = Pipeline(self._jobs(list(pairs))) if kernel is not None and pairs else None

    def close(self) -> None:
        if self._pipeline is not None:
            self._pipeline.close()

    def __call__(self, ref: TapHeader, cand: TapHeader, ref_layouts: dict, cand_layouts: dict, threshold: float,
                 exact_dtypes: bool = True, chunk: int | None = None) -> TapResult:
        a = align(ref, cand, ref_layouts, cand_layouts)
        if isinstance(a, Refusal):
            return refused(ref, cand, threshold, a)
        plan = Plan.of(self.ref, self.cand, ref, cand, a)
        sums = TapSums(Groups.of(a, chunk))
        if plan.fused(self.kernel):
            self._fused(sums, plan)
        else:
            for r, c, span in prefetched(chunks(plan.ref, plan.cand, plan.tokens, CHUNK_ELEMENTS), PREFETCH):
                sums.update(to_float64(r, ref.dtype), to_float64(c, cand.dtype), span)
        # A tap's checksum covers its whole array, so it is checked once all of it was
        # read (for free when it was read in order; else by one more pass): a corrupt
        # tap raises DumpError, as reading it whole does.
        self.ref.verify(ref.key)
        self.cand.verify(cand.key)
        return judged(ref, cand, a, threshold, exact_dtypes, sums.total.result(), *sums.tables())

    @staticmethod
    def _prepared(plan: Plan, verify: bool) -> Iterator[tuple]:
        """A fused pair's chunks, read and made kernel-ready (in a reader thread); with
        `verify`, the rest of both taps is read there too, for their checksums."""
        ref, cand = plan.ref, plan.cand
        for ra, rb, a_off, b_off, lens, span, r_slots, c_slots in fused_chunks(
                ref, cand, plan.tokens, FUSED_CHUNK_ELEMENTS, PSEUDO_TOKEN):
            ka, ta = kernel_input(ra, ref.header.dtype)
            kb, tb = kernel_input(rb, cand.header.dtype)
            yield ra, rb, ka, ta, kb, tb, a_off, b_off, lens, span, r_slots, c_slots
        if verify:  # the rest of both taps, for their checksums (`settle`d by the consumer)
            ref.reader.read_rest(ref.header.key, check=False)
            cand.reader.read_rest(cand.header.key, check=False)

    def _jobs(self, pairs: list) -> Iterator[tuple[int, Iterator]]:
        """The pipeline's jobs: every pair the kernel will compare, in the diff's order."""
        for seq, (ref, cand) in enumerate(pairs):
            a = align(ref, cand, self.ref.layouts, self.cand.layouts)
            if isinstance(a, Alignment):
                plan = Plan.of(self.ref, self.cand, ref, cand, a)
                if plan.fused(self.kernel):
                    yield seq, self._prepared(plan, verify=True)

    def _fused(self, sums: TapSums, plan: Plan) -> None:
        """The fused path over one tap pair; a chunk whose raw sums are not exact (float64
        data beyond 2**+-450) is recomputed through numpy."""
        fused = self.kernel
        ref, cand = plan.ref.header, plan.cand.header
        seq = self._seq.get(ref.key, -1)
        if self._pipeline is not None and self._pipeline.has(seq):
            items = self._pipeline.items(seq)
        else:  # not planned ahead (a pair the diff was not expected to compare)
            items = prefetched(self._prepared(plan, verify=False), PREFETCH)
        heads = len(sums.heads) or 1
        features = plan.alignment.shape[1:]
        for ra, rb, ka, ta, kb, tb, a_off, b_off, lens, span, r_slots, c_slots in items:
            fsum, isum = fused.new_sums(sums.slots)
            fused.fused_sums(ka, ta, a_off, kb, tb, b_off, lens, heads, sums.token_slots(span, a_off.size),
                             sums.head0, fsum, isum)
            # the checksums of what the reader thread read, here: that thread does the I/O
            self.ref.settle()
            self.cand.settle()
            if sums_are_exact(fsum, fused):
                sums.add_sums(fsum, isum, fused)
                continue
            if span is None:
                r, c = ra, rb
            else:  # the chunk's tokens out of the flat windows: [n, *features]
                r = ra.reshape(-1, *features)[r_slots]
                c = rb.reshape(-1, *features)[c_slots]
            sums.update(to_float64(r, ref.dtype), to_float64(c, cand.dtype), span)


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
    kernel = load_kernel(engine, data)
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
