"""A writer thread between the capture and its sink, with a bound on bytes in flight.

The model should not wait for the disk: taps are queued and written by one background
thread while the forward goes on.  Memory is bounded by `InflightBudget`: a tap takes
its bytes from the budget when it is queued and gives them back once the sink has
written it; a caller that would exceed the budget waits (the fallback the budget exists
for), so the queue never holds more than the budget plus one tap.
"""

from __future__ import annotations

import queue
import threading
import time

DEFAULT_MAX_INFLIGHT_MB = 2048


_FLUSH_EVERY_S = 1.0  # a killed capture loses at most this much of its taps


class InflightBudget:
    """Bytes recorded but not yet written, capped at `max_bytes` (None = no cap).

    A single tap larger than the cap is let through when nothing else is in flight, so
    an oversized tap slows the capture down instead of deadlocking it."""

    def __init__(self, max_bytes: int | None) -> None:
        if max_bytes is not None and max_bytes <= 0:
            raise ValueError(f"the in-flight budget must be positive, got {max_bytes} bytes")
        self.max_bytes = max_bytes
        self.used = 0
        self.peak = 0
        self.waits = 0  # how often a recorder had to wait: the budget was the bottleneck
        self._cond = threading.Condition()

    def would_block(self, nbytes: int) -> bool:
        return self.max_bytes is not None and self.used > 0 and self.used + nbytes > self.max_bytes

    def acquire(self, nbytes: int, timeout: float | None = None) -> bool:
        """Take nbytes, waiting while that would exceed the cap; False on timeout."""
        with self._cond:
            if self.would_block(nbytes):
                self.waits += 1
                if not self._cond.wait_for(lambda: not self.would_block(nbytes), timeout):
                    return False
            self.used += nbytes
            self.peak = max(self.peak, self.used)
            return True

    def release(self, nbytes: int) -> None:
        with self._cond:
            self.used -= nbytes
            self._cond.notify_all()


class BackgroundWriter:
    """A sink (e.g. DumpWriter) fed through a queue by one thread, in call order.

    Use as a context manager around the capture; leaving it drains the queue and joins
    the thread.  An exception raised by the sink in the thread (disk full) is raised
    again in the caller at its next call or on exit.  HDF5 metadata is flushed whenever
    the queue runs empty and at least every second, not after every tap."""

    def __init__(self, sink, budget: InflightBudget | None = None) -> None:
        self.sink = sink
        self.budget = budget
        self._queue: queue.Queue = queue.Queue()
        self._error: BaseException | None = None
        self._thread = threading.Thread(target=self._run, name="parity-writer", daemon=True)
        self._thread.start()

    # -- sink interface (called by the capture)

    def add_layout(self, name, layout) -> None:
        self._put("add_layout", (name, layout), 0)

    def add_tap(self, tap) -> None:
        """Queue a tap; waits while the queued bytes would exceed the budget."""
        nbytes = int(getattr(tap.array, "nbytes", 0))
        self._raise_pending()
        if self.budget is not None:
            self.budget.acquire(nbytes)
        self._queue.put(("add_tap", (tap,), nbytes))

    def set_error(self, error) -> None:
        self._put("set_error", (error,), 0)

    def set_observation(self, observation) -> None:
        if callable(getattr(self.sink, "set_observation", None)):
            self._put("set_observation", (observation,), 0)

    def _put(self, method: str, args: tuple, nbytes: int) -> None:
        self._raise_pending()
        self._queue.put((method, args, nbytes))

    def _raise_pending(self) -> None:
        if self._error is not None:
            error, self._error = self._error, None
            raise error

    # -- the thread

    def _run(self) -> None:
        can_flush = callable(getattr(self.sink, "flush", None))
        last_flush = time.monotonic()
        while True:
            item = self._queue.get()
            if item is None:
                break
            method, args, nbytes = item
            try:
                if self._error is None:  # after a failure, drain without writing
                    if method == "add_tap" and can_flush:
                        now = time.monotonic()
                        flush = self._queue.empty() or now - last_flush >= _FLUSH_EVERY_S
                        self.sink.add_tap(*args, flush=flush)
                        last_flush = now if flush else last_flush
                    else:
                        getattr(self.sink, method)(*args)
            except BaseException as exc:  # noqa: BLE001 - handed to the caller's thread
                self._error = exc
            finally:
                if nbytes and self.budget is not None:
                    self.budget.release(nbytes)

    def close(self) -> None:
        """Drain the queue, stop the thread, raise what the sink raised (if anything)."""
        if self._thread.is_alive():
            self._queue.put(None)
            self._thread.join()
        self._raise_pending()

    def __enter__(self) -> BackgroundWriter:
        return self

    def __exit__(self, exc_type, exc, tb) -> bool:
        if exc_type is None:
            self.close()
        else:  # the capture already failed: drain, but do not mask its exception
            try:
                self.close()
            except Exception:  # noqa: BLE001 - the original exception propagates
                pass
        return False
