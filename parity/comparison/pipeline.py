"""One reader thread for a whole streamed diff, running ahead across tap boundaries.

Why: with a reader thread per tap, the first chunk of every tap is read while nothing is
computed and the last one computed while nothing is read; most taps of a model are one
or two chunks, so that serialised half of the work.  Here one thread reads the chunks
of tap pair after tap pair, in the order the diff compares them, `depth` chunks ahead.

Jobs are (sequence number, iterator of items) in increasing sequence order; the consumer
asks for one job's items at a time, in the same order.  Items of jobs it skips are
dropped; an error is raised to the consumer when it asks for the job that raised it.
"""

from __future__ import annotations

import queue
import threading
from collections.abc import Iterator

_END = object()  # a job's items are done


_ALL = object()  # every job is done


class Pipeline:
    """Runs `jobs` in a daemon reader thread; `items(seq)` yields one job's items."""

    def __init__(self, jobs: Iterator[tuple[int, Iterator]], depth: int = 3) -> None:
        self._q: queue.Queue = queue.Queue(maxsize=depth)
        self._stop = threading.Event()
        self._pending: tuple | None = None
        self._finished = False
        self._thread = threading.Thread(target=self._produce, args=(jobs,), name="parity-reader", daemon=True)
        self._thread.start()

    def _put(self, entry: tuple) -> bool:
        while not self._stop.is_set():
            try:
                self._q.put(entry, timeout=0.1)
                return True
            except queue.Full:
                continue
        return False

    def _produce(self, jobs: Iterator[tuple[int, Iterator]]) -> None:
        seq = -1
        try:
            for seq, items in jobs:
                for item in items:
                    if not self._put((seq, item)):
                        return
                if not self._put((seq, _END)):
                    return
            self._put((seq + 1, _ALL))
        except BaseException as exc:  # noqa: BLE001 - handed to the consumer of that job
            self._put((seq, exc))
            self._put((seq + 1, _ALL))

    def _next(self) -> tuple:
        if self._pending is None:
            self._pending = self._q.get()
        return self._pending

    def has(self, seq: int) -> bool:
        """Whether job `seq` is still to come (False once the reader went past it or ended)."""
        while not self._finished:
            s, item = self._next()
            if item is _ALL:
                self._finished = True
                return False
            if s >= seq:
                return s == seq
            self._pending = None  # a job the consumer skipped
        return False

    def items(self, seq: int) -> Iterator:
        """Job `seq`'s items (call `has(seq)` first); its error, if it raised, is raised here."""
        while True:
            s, item = self._next()
            if s != seq or item is _ALL:
                return
            self._pending = None
            if item is _END:
                return
            if isinstance(item, BaseException):
                self._pending = (seq + 1, _ALL)
                raise item
            yield item

    def close(self) -> None:
        """Stop the reader thread and wait for it."""
        self._stop.set()
        while self._thread.is_alive():
            try:
                self._q.get(timeout=0.1)
            except queue.Empty:
                pass
        self._thread.join()
