"""Reading a tap's stored bytes straight from the file with os.preadv.

Why: h5py holds the GIL while HDF5 copies a slab, so a reader thread going through h5py
stalls the thread doing the diff's arithmetic.  An uncompressed tap is a few runs of its
C-order bytes at known file offsets (one run for a contiguous dataset; one per chunk for
the writer's row-aligned chunks, see `dump.chunk_shape`), and `os.preadv` of those runs
into a numpy buffer releases the GIL.  HDF5 is asked once per tap where the runs lie;
the bytes read are checked against the tap's CRC-32 by the caller (`DumpReader.read_flat`),
so a wrong offset could only ever be a checksum error, never a silently wrong number.

Anything else (compressed or filtered data, chunks that are not runs of the C order,
missing chunks) is read through h5py: `TapBytes.of` returns None.
"""

from __future__ import annotations

import os
import sys
import threading
from dataclasses import dataclass

import numpy as np


@dataclass(frozen=True)
class TapBytes:
    """Runs of one tap's C-order elements in the file: (first element, count, byte offset)."""

    dtype: np.dtype  # as stored
    size: int  # elements in the tap
    runs: tuple[tuple[int, int, int], ...]  # sorted by first element, covering [0, size) without gaps

    @classmethod
    def of(cls, ds) -> TapBytes | None:
        """The runs of an h5py dataset, or None if it must be read through HDF5."""
        shape = tuple(int(s) for s in ds.shape or ())
        size = int(np.prod(shape, dtype=np.int64))
        itemsize = ds.dtype.itemsize
        dtype = ds.dtype
        if not shape or size == 0 or ds.id.get_create_plist().get_nfilters():
            return None
        if ds.chunks is None:
            offset = ds.id.get_offset()
            return None if offset is None else cls(dtype, size, ((0, size, int(offset)),))
        chunk = tuple(int(c) for c in ds.chunks)
        # A chunk is a run of the C order iff it is 1 along the leading axes, any length
        # along one axis q, and whole along every axis after q.
        q = next((ax for ax in range(len(shape)) if chunk[ax] != 1), len(shape) - 1)
        if any(chunk[ax] != shape[ax] for ax in range(q + 1, len(shape))):
            return None
        inner = int(np.prod(shape[q + 1:], dtype=np.int64))
        runs = []
        for i in range(ds.id.get_num_chunks()):
            info = ds.id.get_chunk_info(i)
            if info.byte_offset is None or info.filter_mask:
                return None
            start = int(np.ravel_multi_index(info.chunk_offset, shape))
            count = min(chunk[q], shape[q] - info.chunk_offset[q]) * inner
            if count * itemsize > info.size:
                return None
            runs.append((start, count, int(info.byte_offset)))
        runs.sort()
        at = 0
        for start, count, _ in runs:
            if start != at:
                return None  # a chunk never written: let HDF5 (fill value) and the CRC judge
            at += count
        return cls(dtype, size, tuple(runs)) if at == size else None

    @property
    def itemsize(self) -> int:
        return self.dtype.itemsize

    def read(self, fd: int, start: int, stop: int, buffers: Buffers | None = None) -> np.ndarray:
        """Elements [start, stop) as raw bytes (uint8); OSError if the file is short."""
        nbytes = (stop - start) * self.itemsize
        out = np.empty(nbytes, np.uint8) if buffers is None else buffers.take(nbytes)
        view = memoryview(out)
        for first, count, offset in self.runs:
            lo, hi = max(start, first), min(stop, first + count)
            if lo >= hi:
                continue
            dst = view[(lo - start) * self.itemsize:(hi - start) * self.itemsize]
            pos = offset + (lo - first) * self.itemsize
            while len(dst):
                got = os.preadv(fd, [dst], pos)
                if got <= 0:
                    raise OSError("file ends inside tap data (truncated)")
                dst, pos = dst[got:], pos + got
        return out


class Buffers:
    """Read buffers used again once nothing refers to them any more.

    Why: memory fresh from the OS costs a page fault per page on first touch; preadv
    into new 8 MB arrays ran at 1.5 GB/s here, into reused ones at 8 GB/s.  A buffer is
    free when only this pool refers to it (CPython reference counts: every numpy view of
    it holds a reference to it), so buffers handed to other threads come back by
    themselves, and the pool never hands out memory still in use."""

    def __init__(self, keep: int = 8) -> None:
        self.keep = keep
        self.pool: list[np.ndarray] = []
        self._lock = threading.Lock()

    def _free(self, i: int) -> bool:
        return sys.getrefcount(self.pool[i]) <= 2  # the pool's list and getrefcount's argument

    def take(self, nbytes: int) -> np.ndarray:
        """A uint8 array of nbytes (a view of a free pooled buffer, or of a new one)."""
        with self._lock:
            return self._take(nbytes)

    def _take(self, nbytes: int) -> np.ndarray:
        fits = [i for i in range(len(self.pool)) if self.pool[i].nbytes >= nbytes and self._free(i)]
        if fits:
            return self.pool[min(fits, key=lambda i: self.pool[i].nbytes)][:nbytes]
        buf = np.empty(max(nbytes, 1 << 20), np.uint8)
        if len(self.pool) >= self.keep:
            free = [i for i in range(len(self.pool)) if self._free(i)]
            if free:
                del self.pool[min(free, key=lambda i: self.pool[i].nbytes)]
        if len(self.pool) < self.keep:
            self.pool.append(buf)
        return buf[:nbytes]
