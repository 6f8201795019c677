"""Reading a tap pair from two dumps in slabs, in canonical token order, never whole.

Chunks are runs of canonical token positions.  Each side reads the slots its tokens for
that run live in (a window kept until the run leaves it), so a padded reference and a
packed candidate are aligned exactly as `align.gather_tokens` does.  A layout whose
canonical order jumps between rows costs re-reads, not memory beyond one window per side
(at most the tap itself).  A chunk's tokens are given as a `slice` of the pair's compared
tokens (None without a token layout), which indexes the pair's `Groups` arrays.
"""

from __future__ import annotations

import queue
import threading
from collections.abc import Iterator
from dataclasses import dataclass

import numpy as np

from parity.dump.reader import DumpReader, TapHeader


@dataclass(frozen=True)
class Source:
    """One side of a tap pair to read: its reader, header and token order."""

    reader: DumpReader
    header: TapHeader
    order: np.ndarray | None  # flat slot index of each valid token, in canonical order (align)
    features: int  # elements per token (per row, without a token layout)


class RowWindow:
    """Rows [start, stop) of one tap, re-read only when a chunk needs rows outside them."""

    def __init__(self, side: Source) -> None:
        self.side, self.start, self.stop, self.rows = side, 0, 0, None
        self.T = side.header.shape[1]

    def gather(self, slots: np.ndarray) -> np.ndarray:
        r0, r1 = int(slots.min()) // self.T, int(slots.max()) // self.T + 1
        if self.rows is None or r0 < self.start or r1 > self.stop:
            self.rows = None  # free the old window before reading the new one
            self.rows = self.side.reader.read_rows(self.side.header.key, r0, r1)
            self.start, self.stop = r0, r1
        flat = self.rows.reshape((self.stop - self.start) * self.T, *self.side.header.shape[2:])
        return flat[slots - self.start * self.T]  # [len(slots), *features]


def chunks(ref: Source, cand: Source, tokens: int | None, elements: int) -> Iterator[tuple]:
    """(ref chunk, cand chunk, token slice or None) in canonical order, storage dtype, about
    `elements` per side each; `tokens`: the pair's compared tokens (None: no layout)."""
    if tokens is None:
        shape = ref.header.shape
        if not shape:
            yield ref.reader.load(ref.header.key), cand.reader.load(cand.header.key), None
            return
        rows = max(1, elements // max(1, ref.features))
        for start in range(0, shape[0], rows):
            stop = min(shape[0], start + rows)
            yield (ref.reader.read_rows(ref.header.key, start, stop),
                   cand.reader.read_rows(cand.header.key, start, stop), None)
        return
    step = max(1, elements // max(1, ref.features))
    windows = RowWindow(ref), RowWindow(cand)
    for k in range(0, tokens, step):
        span = slice(k, min(tokens, k + step))
        yield windows[0].gather(ref.order[span]), windows[1].gather(cand.order[span]), span


class SlotWindow:
    """Token slots [lo, hi) of one side's tap as stored, flat; re-read only when a chunk
    needs slots outside them (reads go through `DumpReader.read_flat`)."""

    def __init__(self, side: Source) -> None:
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


def fused_chunks(ref: Source, cand: Source, tokens: int | None, elements: int, pseudo_token: int) -> Iterator[tuple]:
    """Chunk pairs for the kernel, read and prepared in the reader thread:
    (ref window, cand window, ref offsets, cand offsets, token lengths, token slice or
    None, ref slots or None, cand slots or None); windows in storage dtype, flat.  Without
    a token layout the kernel's "tokens" are runs of `pseudo_token` elements."""
    if tokens is None:
        size = int(np.prod(ref.header.shape, dtype=np.int64))
        for e0 in range(0, size, elements):
            e1 = min(size, e0 + elements)
            off = np.arange(0, e1 - e0, pseudo_token, dtype=np.int64)
            lens = np.minimum(pseudo_token, (e1 - e0) - off)
            yield (ref.reader.read_flat(ref.header.key, e0, e1, check=False),
                   cand.reader.read_flat(cand.header.key, e0, e1, check=False), off, off, lens, None, None, None)
        return
    step = max(1, elements // max(1, ref.features))
    windows = SlotWindow(ref), SlotWindow(cand)
    for k in range(0, tokens, step):
        span = slice(k, min(tokens, k + step))
        r_slots, c_slots = ref.order[span], cand.order[span]
        ra, a_off = windows[0].get(r_slots)
        rb, b_off = windows[1].get(c_slots)
        lens = np.full(r_slots.size, ref.features, np.int64)
        yield ra, rb, a_off, b_off, lens, span, r_slots - windows[0].lo, c_slots - windows[1].lo


def prefetched(items: Iterator[tuple], depth: int) -> Iterator[tuple]:
    """Run an iterator in a reader thread, `depth` items ahead; errors re-raised here."""
    q: queue.Queue = queue.Queue(maxsize=depth)
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
