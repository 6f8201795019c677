"""Writing a dump: one HDF5 file per backend run, fail-closed (h5py + numpy, no torch)."""

from __future__ import annotations

import io
import json
import os
import traceback
from typing import Any

import h5py
import numpy as np

from parity.dump.format import (
    CHUNK_BYTES,
    COMPRESSED_CHUNK_BYTES,
    COMPRESSIONS,
    FORMAT_NAME,
    FORMAT_VERSION,
    INCOMPLETE_SUFFIX,
    IO_ERRORS,
    LIBVER,
    PARTIAL_SUFFIX,
    RAW_KINDS,
    DumpError,
    array_crc32,
    check_index,
    check_text,
    info_attrs,
    set_attrs,
)
from parity.taps.codec import STORAGE_DTYPES, check_storage
from parity.taps.records import Capture, CaptureError, Layout, Tap


def chunk_shape(shape: tuple[int, ...], itemsize: int, target: int = CHUNK_BYTES) -> tuple[int, ...]:
    """Chunk shape of about `target` bytes: whole trailing dimensions, split along the
    leading ones (rows first), so a chunk is a contiguous run of the C-ordered array.

    Row-aligned chunks make a read of `rows` along axis 0 touch only its own chunks."""
    chunk = list(shape)
    budget = max(1, target // max(1, itemsize))
    inner = 1
    for axis in range(len(shape) - 1, -1, -1):
        size = max(1, shape[axis])
        if inner * size <= budget:
            inner *= size
            continue
        chunk[axis] = max(1, budget // inner)
        for outer in range(axis):
            chunk[outer] = 1
        break
    return tuple(max(1, c) for c in chunk)


def _write_chunks(ds: Any, array: np.ndarray, chunks: tuple[int, ...]) -> None:
    """Write an uncompressed dataset chunk by chunk, straight to the file.

    HDF5's H5Dwrite goes through its dataspace selection and chunk cache, ~40% more CPU
    than the write itself; a `chunk_shape` chunk is a run of the C order (1 along the
    leading axes, whole along the trailing ones), so each one is a slice of the array,
    handed over as is (an edge chunk is padded to full size, as HDF5 stores it)."""
    shape = array.shape
    q = next((ax for ax in range(len(shape)) if chunks[ax] != 1), len(shape) - 1)
    outer = shape[:q]
    for index in np.ndindex(*outer) if outer else [()]:
        for start in range(0, shape[q], chunks[q]):
            block = array[index + (slice(start, start + chunks[q]),)]
            if block.shape[0] < chunks[q]:
                full = np.zeros((chunks[q], *block.shape[1:]), array.dtype)
                full[:block.shape[0]] = block
                block = full
            ds.id.write_direct_chunk(index + (start,) + (0,) * (len(shape) - q - 1), block)


def _check_array(array: Any, dtype: str) -> None:
    """ValueError unless the array can be stored under this dtype name.

    A known dtype must be in its codec storage dtype.  An unknown dtype name (a torch
    dtype the codec cannot decode, e.g. complex64) is stored as is, if numeric: the diff
    then reports that tap as undecodable instead of the capture failing.
    """
    check_text(dtype, "dtype", allow_empty=False)
    if dtype in STORAGE_DTYPES:
        check_storage(array, dtype)
    elif not isinstance(array, np.ndarray) or array.dtype.kind not in RAW_KINDS or not array.dtype.isnative:
        raise ValueError(f"cannot store an array of numpy dtype {getattr(array, 'dtype', type(array))} "
                         f"(unknown dtype {dtype!r})")


class _DiscardableFile(io.RawIOBase):
    """The partial file as HDF5 sees it, with a switch to swallow all further I/O.

    After a failed write (disk full) HDF5 can neither flush nor close the file, and
    h5py/HDF5 then crash (segfault) when the objects are freed or at interpreter exit.
    Discarding the dump means: make every later write "succeed" into the void, let
    HDF5 close cleanly, then delete the file.
    """

    def __init__(self, raw: io.RawIOBase) -> None:
        self._raw = raw
        self.discard = False

    def readable(self) -> bool:
        return True

    def writable(self) -> bool:
        return True

    def seekable(self) -> bool:
        return True

    def readinto(self, buffer) -> int:
        if self.discard:
            view = memoryview(buffer).cast("B")
            view[:] = bytes(len(view))
            return len(view)
        return self._raw.readinto(buffer)

    def write(self, data) -> int:
        if self.discard:
            return memoryview(data).nbytes
        return self._raw.write(data)

    def seek(self, offset: int, whence: int = 0) -> int:
        return self._raw.seek(offset, whence)

    def tell(self) -> int:
        return self._raw.tell()

    def truncate(self, size: int | None = None) -> int:
        if self.discard:
            return self._raw.tell() if size is None else size
        return self._raw.truncate(size)

    def flush(self) -> None:
        if not self.discard and not self._raw.closed:
            self._raw.flush()

    def close(self) -> None:
        try:
            super().close()  # flushes first
        finally:
            self._raw.close()


class DumpWriter:
    """Streams one capture into `<path>.partial`, renamed to `path` at close.

    Use as a context manager: leaving the block normally closes with complete=True
    (unless close() was already called), leaving it by an exception closes with
    complete=False -- the file is kept and every tap written so far is readable -- and
    the exception propagates.  An incomplete dump never replaces a file already at
    `path`: it goes to `<path>.incomplete` (`final_path`), and `kept` names what was
    left in place.  Bad arguments raise ValueError and leave the writer
    usable; an OSError (disk full, unwritable directory) raises DumpError, removes the
    partial file and makes every later call a no-op.
    """

    # What the root says; a subclass writing another format (stats_dump.StatsWriter)
    # reuses the safe write (exclusive .partial, discard on I/O error, complete last, rename).
    format_name, format_version = FORMAT_NAME, FORMAT_VERSION

    def __init__(self, path: str | os.PathLike, meta: dict, *, compression: str | None = None) -> None:
        if compression not in COMPRESSIONS:
            raise ValueError(f"compression must be one of {COMPRESSIONS}, got {compression!r}")
        if not isinstance(meta, dict):
            raise ValueError(f"meta must be a dict, got {type(meta).__name__}")
        try:
            meta_json = json.dumps(meta, allow_nan=False)  # strict JSON: no NaN/Infinity tokens
        except (TypeError, ValueError, RecursionError) as e:
            raise ValueError(f"meta is not JSON-serializable: {e}") from None
        self.path = os.fspath(path)
        self.partial_path = self.path + PARTIAL_SUFFIX
        self._meta = dict(meta)
        self._compression = compression
        self._layouts: dict[str, Layout] = {}
        self._keys: set[str] = set()
        self._tap_count = 0
        self._raised = False  # set_error was called: the run did not complete
        self._file: h5py.File | None = None
        self._done = False  # closed or failed
        self._written = False  # closed and renamed to self.final_path
        self.final_path: str | None = None  # where the dump went: path, or its side path if incomplete
        self.kept: str | None = None  # the file at path, left as it was (an incomplete dump went beside it)

        if os.path.isdir(self.path):
            raise DumpError(self.path, "is a directory, not a dump file")
        try:
            # Exclusive create: the name itself is the lock between concurrent captures.
            fd = os.open(self.partial_path, os.O_CREAT | os.O_EXCL | os.O_RDWR, 0o644)
        except FileExistsError:
            raise DumpError(
                self.path,
                f"{self.partial_path} exists: this dump is being written by another capture "
                f"(if no capture is running, one was killed; delete {self.partial_path})",
            ) from None
        except OSError as e:
            raise DumpError(self.path, f"cannot create {self.partial_path}: {e.strerror or e}") from None
        self._raw = _DiscardableFile(os.fdopen(fd, "r+b", buffering=0))
        try:
            # HDF5 writes through our file object (h5py's "fileobj" driver) so that after
            # an I/O error the dump can be discarded cleanly; see _DiscardableFile.
            self._file = h5py.File(self._raw, "w", libver=LIBVER)
            set_attrs(
                self._file,
                {"format": self.format_name, "format_version": self.format_version, "complete": False,
                 "meta": meta_json},
            )
            self._file.create_group("layouts")
            self._file.create_group("taps")
            self._file.flush()
        except IO_ERRORS as e:
            self._fail(e)

    # -- helpers

    def _fail(self, exc: BaseException) -> None:
        """Abandon the dump after an I/O error: close, delete the partial file, raise."""
        self._done = True
        self._raw.discard = True
        # Free h5py objects held by the failed frames before closing the file.
        traceback.clear_frames(exc.__traceback__)
        if self._file is not None:
            try:
                self._file.close()
            except Exception:  # the file is being discarded; its close error adds nothing
                pass
            self._file = None
        self._raw.close()
        try:
            os.unlink(self.partial_path)
        except OSError:
            pass
        reason = getattr(exc, "strerror", None) or str(exc) or type(exc).__name__
        raise DumpError(self.path, f"write failed, dump discarded: {reason}") from None

    @property
    def tap_count(self) -> int:
        """Taps written so far."""
        return self._tap_count

    @property
    def written(self) -> bool:
        """True once the dump was closed and renamed to its final path (`final_path`)."""
        return self._written

    def _live(self) -> h5py.File:
        if self._done or self._file is None:
            raise ValueError(f"{self.path}: the dump writer is closed")
        return self._file

    # -- API

    def add_layout(self, name: str, layout: Layout) -> None:
        """Record a layout; taps that use it must be added after it."""
        f = self._live()
        check_text(name, "layout name", allow_empty=False)
        if name in self._layouts:
            raise ValueError(f"layout {name!r} was already added")
        if not isinstance(layout, Layout):
            raise ValueError(f"expected a Layout, got {type(layout).__name__}")
        if layout.slots.dtype.kind not in "iu":
            raise ValueError(f"layout {name!r} slots must be integers, got {layout.slots.dtype}")
        if layout.slots.size and layout.slots.min() < -1:
            raise ValueError(f"layout {name!r} has slot {layout.slots.min()}; slots are >= 0 or -1 (don't care)")
        regions = [[check_text(r.name, "region name"), int(r.start), int(r.stop)] for r in layout.regions]
        if any(stop > layout.length for _, _, stop in regions):
            raise ValueError(f"layout {name!r} has a region beyond its length {layout.length}")
        try:
            group = f["layouts"].create_group(str(len(self._layouts)))
            set_attrs(group, {"name": name, "length": int(layout.length), "regions": json.dumps(regions)})
            slots = np.ascontiguousarray(layout.slots, dtype=np.int64)
            group.create_dataset("slots", data=slots)
            set_attrs(group["slots"], {"crc32": array_crc32(slots)})
            f.flush()
        except IO_ERRORS as e:
            self._fail(e)
        self._layouts[name] = layout

    def add_tap(self, tap: Tap, flush: bool = True) -> None:
        """Append one tap (in execution order) and flush it to disk.

        `flush=False` leaves HDF5's metadata in its cache until a later flush (about 1 ms
        a tap): a killed process then loses the taps since the last flush.  The
        background writer (`parity.writer`) flushes whenever it has caught up."""
        f = self._live()
        if not isinstance(tap, Tap):
            raise ValueError(f"expected a Tap, got {type(tap).__name__}")
        attrs = info_attrs(tap.info)
        key = tap.key
        if key in self._keys:
            raise ValueError(f"duplicate tap key {key!r}: give repeated taps distinct steps")
        order = check_index(tap.order, "order", none_ok=False)
        _check_array(tap.array, tap.dtype)
        if tap.layout is not None:
            # An unknown layout or a tensor that does not fit its layout is recorded as
            # is: it is a finding about the candidate, reported per tap by the diff.
            check_text(tap.layout, "tap layout", allow_empty=False)
        array = tap.array
        # Scalars and empty arrays cannot be chunked (nor, therefore, filtered).
        chunked = array.ndim > 0 and array.size > 0
        member = f"{self._tap_count:06d}"
        try:
            target = COMPRESSED_CHUNK_BYTES if self._compression else CHUNK_BYTES
            chunks = chunk_shape(array.shape, array.dtype.itemsize, target) if chunked else None
            if chunked and not self._compression:
                ds = f["taps"].create_dataset(member, shape=array.shape, dtype=array.dtype, chunks=chunks)
                _write_chunks(ds, np.ascontiguousarray(array), chunks)
            else:
                ds = f["taps"].create_dataset(member, data=array, chunks=chunks,
                                              compression=self._compression if chunked else None)
            set_attrs(ds, {"key": key, **attrs, "order": order, "dtype": tap.dtype, "layout": tap.layout or "",
                            "crc32": array_crc32(array)})
            if flush:
                f.flush()
        except IO_ERRORS as e:
            self._fail(e)
        except BaseException:
            # Interrupted half-way (Ctrl-C): drop the half-written tap so the file stays
            # consistent for the close(complete=False) that follows.
            try:
                if member in f["taps"]:
                    del f["taps"][member]
            except Exception:  # best effort; the reader also skips a broken last tap
                pass
            raise
        self._keys.add(key)
        self._tap_count += 1

    def flush(self) -> None:
        """Write HDF5's cached metadata, so every tap added so far survives a kill."""
        f = self._live()
        try:
            f.flush()
        except IO_ERRORS as e:
            self._fail(e)

    def set_observation(self, observation: dict) -> None:
        """How observing changed the run (graph breaks, a re-captured graph), known only
        after it: kept in meta under "observation", beside the backend's own metadata."""
        f = self._live()
        meta = {**self._meta, "observation": observation}
        try:
            meta_json = json.dumps(meta, allow_nan=False)
        except (TypeError, ValueError, RecursionError) as e:
            raise ValueError(f"observation is not JSON-serializable: {e}") from None
        try:
            del f.attrs["meta"]
            set_attrs(f, {"meta": meta_json})
        except IO_ERRORS as e:
            self._fail(e)
        self._meta = meta

    def set_error(self, err: CaptureError) -> None:
        """Record where and how the candidate raised (replaces an earlier record).

        A run that raised did not complete: the dump is then closed as incomplete."""
        f = self._live()
        if not isinstance(err, CaptureError):
            raise ValueError(f"expected a CaptureError, got {type(err).__name__}")
        attrs: dict[str, Any] = {
            "key": "" if err.key is None else check_text(err.key, "error key", allow_empty=False),
            "exc_type": check_text(err.exc_type, "exc_type"),
            "message": check_text(err.message, "error message"),
        }
        if err.info is not None:
            attrs.update(info_attrs(err.info))
        try:
            if "error" in f:
                del f["error"]
            group = f.create_group("error")
            set_attrs(group, attrs)
            f.flush()
        except IO_ERRORS as e:
            self._fail(e)
        self._raised = True

    def close(self, complete: bool = True) -> None:
        """Write tap_count, then `complete` last, and rename to the final path: `path`,
        or `<path>.incomplete` for an incomplete dump when a file is at `path` already (a
        dump is replaced only by a complete one).

        `complete` is written False, whatever is asked, once set_error was called.
        A no-op if already closed (or failed).
        """
        if self._done or self._file is None:
            return
        complete = bool(complete) and not self._raised
        try:
            set_attrs(self._file, {"tap_count": self._tap_count})
            self._file.flush()
            set_attrs(self._file, {"complete": complete})
            self._file.flush()
            self._file.close()
            self._file = None
            self._raw.close()
            final = self.path
            if not complete and os.path.lexists(self.path):
                final = self.path + INCOMPLETE_SUFFIX
            os.replace(self.partial_path, final)
        except IO_ERRORS as e:
            self._fail(e)
        self.final_path, self.kept = final, (self.path if final != self.path else None)
        self._done = True
        self._written = True

    def __enter__(self) -> DumpWriter:
        return self

    def __exit__(self, exc_type, exc, tb) -> bool:
        self.close(complete=exc_type is None)
        return False


def write_dump(path: str | os.PathLike, capture: Capture, *, compression: str | None = None) -> str:
    """Write a whole Capture (layouts first, then taps in order, then the error); the
    path written (`<path>.incomplete` for an incomplete capture when `path` exists)."""
    with DumpWriter(path, capture.meta, compression=compression) as writer:
        for name, layout in capture.layouts.items():
            writer.add_layout(name, layout)
        for tap in capture.taps:
            writer.add_tap(tap)
        if capture.error is not None:
            writer.set_error(capture.error)
        writer.close(complete=capture.complete)
    return writer.final_path
