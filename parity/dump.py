"""The on-disk capture: one HDF5 file per backend run (h5py + numpy, no torch).

Format (format_version 1)::

    /                     attrs: format="parity-dump", format_version=1, complete (bool, written LAST),
                                 meta (JSON string of Capture.meta), tap_count (int, at close)
    /layouts/<i>          group per layout, i = 0,1,..; attrs: name (str), length (int), regions (JSON list of [name,start,stop]);
                          dataset "slots" int64 [R,T], attr crc32 as for taps
    /taps/<i:06d>         dataset per tap in execution order (i = order); stored in storage dtype (codec);
                          attrs: key, name, stack, layer (int, -1 = none), component, step (int, -1 = none),
                                 order, dtype (original dtype name), layout (layout name or ""),
                                 crc32 (int: zlib CRC-32 of the array's C-order bytes)
    /error                optional group, attrs: key ("" = none), name/stack/layer/component/step as for taps (or absent), exc_type, message

Notes on the format:
- Tap names and keys are attributes, never HDF5 paths, so any name ("/", "..", unicode)
  is safe.  <i> in /taps is the position in execution order (0, 1, ... without gaps);
  the `order` attribute holds Tap.order as the capture assigned it.
- bfloat16 / float8 tensors are stored as their raw bits (uint16 / uint8), see codec.py,
  so a dump is bit-exact.
- HDF5 checksums its metadata but not raw data, so every array carries a CRC-32 of its
  bytes (in its checksummed object header).  The reader verifies it on every load: a
  flipped bit in tensor data is a DumpError, never a silently different number.  (A
  dataset without crc32, from an early writer, is read unverified.)
- String attributes are fixed-length UTF-8 (kept in the checksummed object headers;
  variable-length strings would sit in HDF5's unchecksummed global heap, where a flipped
  byte can hang the HDF5 reader); readers also accept variable-length strings.  Strings
  may not contain NUL.  meta is JSON, so tuples come back as lists and non-string dict
  keys as strings.
- Tap keys are unique.  A tap's `layout` names a /layouts entry; an unknown layout name,
  or a tensor whose shape does not fit its layout, is stored as is (the diff reports it
  per tap).  Likewise a dtype name the codec does not know is stored with the array's
  own numpy dtype (bool/int/uint/float/complex); known dtype names must be in their
  codec storage dtype.
- `complete` is written False when the file is created and True only as the very last
  write of a successful capture; tap_count is written at close.  A writer flushes after
  every tap (the background writer of `parity capture`: whenever it catches up, at least
  every second), so a killed capture leaves a readable file with the taps flushed so far.
  A run that raised is never complete: the writer writes False once set_error was
  called, and the reader reads any dump holding /error as incomplete.
- Only a dump without tap_count (its writer never closed it) or whose tap_count is one
  short of its members (an interrupted add_tap) may end in a half-written tap, which the
  reader skips with a note; anywhere else a broken tap is corruption (DumpError).
- The file is written as `<path>.partial` (created exclusively, so two captures cannot
  write the same dump) and renamed to `<path>` at close.  A `.partial` file is always
  read as incomplete.
- HDF5 file format of HDF5 1.8 (libver v108): object headers are checksummed, large
  attributes are allowed, and a file whose writer was killed can still be opened (the
  1.10 format marks such files "already open for write" and refuses them).
"""
from __future__ import annotations

import collections
import io
import json
import os
import traceback
from dataclasses import dataclass
from typing import Any, Iterator

import h5py
import numpy as np

from parity import rawread as _raw
from parity.checksum import crc32
from parity.codec import STORAGE_DTYPES, check_storage
from parity.records import Capture, CaptureError, Layout, Region, Tap, TapInfo

FORMAT_NAME = "parity-dump"
FORMAT_VERSION = 1
PARTIAL_SUFFIX = ".partial"
_LIBVER = ("v108", "v108")
_COMPRESSIONS = (None, "gzip", "lzf")
# h5py reports some failed writes (a failed flush) as RuntimeError rather than OSError.
_IO_ERRORS = (OSError, RuntimeError)
# numpy kinds a tap of a dtype unknown to the codec may be stored as (bool/int/uint/float/complex).
_RAW_KINDS = "biufc"
# Target bytes per HDF5 chunk.  h5py's automatic chunking picks chunks of tens of KB;
# through the Python file object below (and HDF5's chunk index) every chunk is one
# write call and one B-tree entry, which made writing ~6x slower than a raw write.
# A few MiB per chunk is one large write per chunk, and still a readable slab for the
# streaming diff.  Compressed chunks are smaller, so gzip/lzf work on cache-sized pieces.
CHUNK_BYTES = 4 << 20
COMPRESSED_CHUNK_BYTES = 1 << 20


class DumpError(Exception):
    """A dump cannot be written or read.  str() is one line: "<path>: <what is wrong>"."""

    def __init__(self, path: str | os.PathLike, reason: str) -> None:
        self.path = os.fspath(path)
        self.reason = " ".join(str(reason).splitlines())
        super().__init__(f"{self.path}: {self.reason}")


# ----------------------------------------------------------------------------- writing


def _check_text(value: Any, what: str, allow_empty: bool = True) -> str:
    """ValueError unless value is a str HDF5 can store as UTF-8 (no NUL, no surrogates)."""
    if not isinstance(value, str):
        raise ValueError(f"{what} must be a str, got {type(value).__name__}")
    if not allow_empty and not value:
        raise ValueError(f"{what} must not be empty")
    if "\x00" in value:
        raise ValueError(f"{what} {value!r} contains a NUL character")
    try:
        value.encode("utf-8")
    except UnicodeEncodeError:
        raise ValueError(f"{what} {value!r} is not encodable as UTF-8") from None
    return value


def _check_index(value: Any, what: str, none_ok: bool) -> int | None:
    """ValueError unless value is a non-negative int (or None when none_ok)."""
    if value is None and none_ok:
        return None
    if isinstance(value, (bool, np.bool_)) or not isinstance(value, (int, np.integer)):
        raise ValueError(f"{what} must be an int{' or None' if none_ok else ''}, got {value!r}")
    if value < 0:
        # -1 encodes None in the file, so negative values would not round-trip.
        raise ValueError(f"{what} must be >= 0, got {value}")
    return int(value)


def _info_attrs(info: TapInfo) -> dict[str, Any]:
    if not isinstance(info, TapInfo):
        raise ValueError(f"expected a TapInfo, got {type(info).__name__}")
    layer = _check_index(info.layer, "layer", none_ok=True)
    step = _check_index(info.step, "step", none_ok=True)
    return {
        "name": _check_text(info.name, "tap name", allow_empty=False),
        "stack": _check_text(info.stack, "stack"),
        "layer": -1 if layer is None else layer,
        "component": _check_text(info.component, "component"),
        "step": -1 if step is None else step,
    }


def _set_attrs(obj: Any, attrs: dict[str, Any]) -> None:
    """Write attributes; strings as fixed-length UTF-8.

    Fixed-length strings live inside the (checksummed) object header.  h5py's default,
    variable-length strings, live in HDF5's global heap, which has no checksum: a
    corrupted heap can send HDF5 into an endless loop when the file is read.

    Written through h5py's low-level API (the same types h5py's `attrs.create` picks:
    null-padded UTF-8 strings, little-endian int64, HDF5 enum bool): a dump holds ~10
    attributes per tap, and the high-level path cost ~0.4 ms each, more than writing a
    small tap's data.
    """
    space = h5py.h5s.create(h5py.h5s.SCALAR)
    for name, value in attrs.items():
        key = name.encode("utf-8")
        if h5py.h5a.exists(obj.id, key):
            h5py.h5a.delete(obj.id, key)
        if isinstance(value, str):
            raw = value.encode("utf-8")
            tid = h5py.h5t.C_S1.copy()
            tid.set_size(max(1, len(raw)))
            tid.set_cset(h5py.h5t.CSET_UTF8)
            tid.set_strpad(h5py.h5t.STR_NULLPAD)
            h5py.h5a.create(obj.id, key, tid, space).write(np.array(raw, dtype=f"S{max(1, len(raw))}"), mtype=tid)
        elif isinstance(value, (int, np.integer)) and not isinstance(value, (bool, np.bool_)):
            h5py.h5a.create(obj.id, key, h5py.h5t.STD_I64LE, space).write(np.array(value, dtype=np.int64))
        else:
            obj.attrs[name] = value


def _crc32(array: np.ndarray, crc: int = 0) -> int:
    """CRC-32 of an array's bytes in C order (continuing `crc`, for chunked reads)."""
    return crc32(np.ascontiguousarray(array).view(np.uint8) if array.ndim else array.tobytes(), crc)


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
    _check_text(dtype, "dtype", allow_empty=False)
    if dtype in STORAGE_DTYPES:
        check_storage(array, dtype)
    elif not isinstance(array, np.ndarray) or array.dtype.kind not in _RAW_KINDS or not array.dtype.isnative:
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
    the exception propagates.  Bad arguments raise ValueError and leave the writer
    usable; an OSError (disk full, unwritable directory) raises DumpError, removes the
    partial file and makes every later call a no-op.
    """

    # What the root says; a subclass writing another format (stats_dump.StatsWriter)
    # reuses the safe write (exclusive .partial, discard on I/O error, complete last, rename).
    format_name, format_version = FORMAT_NAME, FORMAT_VERSION

    def __init__(self, path: str | os.PathLike, meta: dict, *, compression: str | None = None) -> None:
        if compression not in _COMPRESSIONS:
            raise ValueError(f"compression must be one of {_COMPRESSIONS}, got {compression!r}")
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
        self._written = False  # closed and renamed to self.path

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
            self._file = h5py.File(self._raw, "w", libver=_LIBVER)
            _set_attrs(
                self._file,
                {"format": self.format_name, "format_version": self.format_version, "complete": False,
                 "meta": meta_json},
            )
            self._file.create_group("layouts")
            self._file.create_group("taps")
            self._file.flush()
        except _IO_ERRORS as e:
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
        """True once the dump was closed and renamed to its final path."""
        return self._written

    def _live(self) -> h5py.File:
        if self._done or self._file is None:
            raise ValueError(f"{self.path}: the dump writer is closed")
        return self._file

    # -- API

    def add_layout(self, name: str, layout: Layout) -> None:
        """Record a layout; taps that use it must be added after it."""
        f = self._live()
        _check_text(name, "layout name", allow_empty=False)
        if name in self._layouts:
            raise ValueError(f"layout {name!r} was already added")
        if not isinstance(layout, Layout):
            raise ValueError(f"expected a Layout, got {type(layout).__name__}")
        if layout.slots.dtype.kind not in "iu":
            raise ValueError(f"layout {name!r} slots must be integers, got {layout.slots.dtype}")
        if layout.slots.size and layout.slots.min() < -1:
            raise ValueError(f"layout {name!r} has slot {layout.slots.min()}; slots are >= 0 or -1 (don't care)")
        regions = [[_check_text(r.name, "region name"), int(r.start), int(r.stop)] for r in layout.regions]
        if any(stop > layout.length for _, _, stop in regions):
            raise ValueError(f"layout {name!r} has a region beyond its length {layout.length}")
        try:
            group = f["layouts"].create_group(str(len(self._layouts)))
            _set_attrs(group, {"name": name, "length": int(layout.length), "regions": json.dumps(regions)})
            slots = np.ascontiguousarray(layout.slots, dtype=np.int64)
            group.create_dataset("slots", data=slots)
            _set_attrs(group["slots"], {"crc32": _crc32(slots)})
            f.flush()
        except _IO_ERRORS as e:
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
        attrs = _info_attrs(tap.info)
        key = tap.key
        if key in self._keys:
            raise ValueError(f"duplicate tap key {key!r}: give repeated taps distinct steps")
        order = _check_index(tap.order, "order", none_ok=False)
        _check_array(tap.array, tap.dtype)
        if tap.layout is not None:
            # An unknown layout or a tensor that does not fit its layout is recorded as
            # is: it is a finding about the candidate, reported per tap by the diff.
            _check_text(tap.layout, "tap layout", allow_empty=False)
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
            _set_attrs(ds, {"key": key, **attrs, "order": order, "dtype": tap.dtype, "layout": tap.layout or "",
                            "crc32": _crc32(array)})
            if flush:
                f.flush()
        except _IO_ERRORS as e:
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
        except _IO_ERRORS as e:
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
            _set_attrs(f, {"meta": meta_json})
        except _IO_ERRORS as e:
            self._fail(e)
        self._meta = meta

    def set_error(self, err: CaptureError) -> None:
        """Record where and how the candidate raised (replaces an earlier record).

        A run that raised did not complete: the dump is then closed as incomplete."""
        f = self._live()
        if not isinstance(err, CaptureError):
            raise ValueError(f"expected a CaptureError, got {type(err).__name__}")
        attrs: dict[str, Any] = {
            "key": "" if err.key is None else _check_text(err.key, "error key", allow_empty=False),
            "exc_type": _check_text(err.exc_type, "exc_type"),
            "message": _check_text(err.message, "error message"),
        }
        if err.info is not None:
            attrs.update(_info_attrs(err.info))
        try:
            if "error" in f:
                del f["error"]
            group = f.create_group("error")
            _set_attrs(group, attrs)
            f.flush()
        except _IO_ERRORS as e:
            self._fail(e)
        self._raised = True

    def close(self, complete: bool = True) -> None:
        """Write tap_count, then `complete` last, and rename to the final path.

        `complete` is written False, whatever is asked, once set_error was called.
        A no-op if already closed (or failed).
        """
        if self._done or self._file is None:
            return
        try:
            _set_attrs(self._file, {"tap_count": self._tap_count})
            self._file.flush()
            _set_attrs(self._file, {"complete": bool(complete) and not self._raised})
            self._file.flush()
            self._file.close()
            self._file = None
            self._raw.close()
            os.replace(self.partial_path, self.path)
        except _IO_ERRORS as e:
            self._fail(e)
        self._done = True
        self._written = True

    def __enter__(self) -> DumpWriter:
        return self

    def __exit__(self, exc_type, exc, tb) -> bool:
        self.close(complete=exc_type is None)
        return False


def write_dump(path: str | os.PathLike, capture: Capture, *, compression: str | None = None) -> None:
    """Write a whole Capture (layouts first, then taps in order, then the error)."""
    with DumpWriter(path, capture.meta, compression=compression) as writer:
        for name, layout in capture.layouts.items():
            writer.add_layout(name, layout)
        for tap in capture.taps:
            writer.add_tap(tap)
        if capture.error is not None:
            writer.set_error(capture.error)
        writer.close(complete=capture.complete)


# ----------------------------------------------------------------------------- reading


@dataclass(frozen=True)
class TapHeader:
    """What a dump says about one tap, without its data."""

    info: TapInfo
    order: int
    dtype: str
    layout: str | None
    shape: tuple[int, ...]

    @property
    def key(self) -> str:
        return self.info.key


class _Bad(Exception):
    """Internal: a validation failure, turned into DumpError with the file path."""


def _attr(obj: Any, name: str) -> Any:
    if name not in obj.attrs:
        raise _Bad(f"{obj.name} lacks attribute {name!r}")
    return obj.attrs[name]


def _str_attr(obj: Any, name: str) -> str:
    value = _attr(obj, name)
    if isinstance(value, bytes):  # fixed-length strings read back as bytes
        try:
            value = value.decode("utf-8")
        except UnicodeDecodeError:
            raise _Bad(f"attribute {name!r} of {obj.name} is not valid UTF-8") from None
    if not isinstance(value, str):
        raise _Bad(f"attribute {name!r} of {obj.name} must be a string, got {type(value).__name__}")
    return value


def _int_attr(obj: Any, name: str, minimum: int | None = None) -> int:
    value = _attr(obj, name)
    if isinstance(value, (bool, np.bool_)) or not isinstance(value, (int, np.integer)):
        raise _Bad(f"attribute {name!r} of {obj.name} must be an integer, got {value!r}")
    if minimum is not None and value < minimum:
        raise _Bad(f"attribute {name!r} of {obj.name} must be >= {minimum}, got {value}")
    return int(value)


def _bool_attr(obj: Any, name: str) -> bool:
    value = _attr(obj, name)
    if not isinstance(value, (bool, np.bool_)):
        raise _Bad(f"attribute {name!r} of {obj.name} must be a boolean, got {value!r}")
    return bool(value)


def _reject_constant(token: str) -> Any:
    raise ValueError(f"{token} is not JSON")


def _json_attr(obj: Any, name: str) -> Any:
    text = _str_attr(obj, name)
    try:
        return json.loads(text, parse_constant=_reject_constant)
    except (ValueError, RecursionError) as e:
        raise _Bad(f"attribute {name!r} of {obj.name} is not valid JSON ({e})") from None


def _read_info(obj: Any) -> TapInfo:
    layer = _int_attr(obj, "layer", minimum=-1)
    step = _int_attr(obj, "step", minimum=-1)
    name = _str_attr(obj, "name")
    if not name:
        raise _Bad(f"{obj.name} has an empty tap name")
    return TapInfo(
        name=name,
        stack=_str_attr(obj, "stack"),
        layer=None if layer == -1 else layer,
        component=_str_attr(obj, "component"),
        step=None if step == -1 else step,
    )


def _numbered(group: Any, what: str) -> list[str]:
    """Member names of a group numbered 0..n-1, in numeric order; _Bad on a gap or stray."""
    names = list(group.keys())
    numbers = {}
    for name in names:
        if not name.isdigit() or not name.isascii():
            raise _Bad(f"unexpected member {name!r} in {group.name}")
        numbers[int(name)] = name
    if sorted(numbers) != list(range(len(names))):
        raise _Bad(f"{what} in {group.name} are not numbered 0..{len(names) - 1}")
    return [numbers[i] for i in range(len(names))]


def _read_layout(group: Any, file_size: int) -> tuple[str, Layout]:
    if not isinstance(group, h5py.Group):
        raise _Bad(f"{group.name} is not a group")
    name = _str_attr(group, "name")
    if not name:
        raise _Bad(f"{group.name} has an empty layout name")
    length = _int_attr(group, "length", minimum=1)
    raw = _json_attr(group, "regions")
    regions = []
    if not isinstance(raw, list):
        raise _Bad(f"regions of layout {name!r} must be a JSON list")
    for item in raw:
        ok = (
            isinstance(item, list)
            and len(item) == 3
            and isinstance(item[0], str)
            and all(isinstance(v, int) and not isinstance(v, bool) for v in item[1:])
            and 0 <= item[1] <= item[2] <= length
        )
        if not ok:
            raise _Bad(f"layout {name!r} has a bad region {item!r} (want [name, start, stop] within length {length})")
        regions.append(Region(item[0], item[1], item[2]))
    slots_ds = group.get("slots")
    if not isinstance(slots_ds, h5py.Dataset):
        raise _Bad(f"layout {name!r} has no 'slots' dataset")
    if slots_ds.dtype != np.dtype(np.int64) or slots_ds.shape is None or len(slots_ds.shape) != 2:
        raise _Bad(f"slots of layout {name!r} must be 2-D int64, got {slots_ds.dtype} {slots_ds.shape}")
    if slots_ds.size * 8 > file_size:
        raise _Bad(f"slots of layout {name!r} declare shape {slots_ds.shape}, more data than the file holds")
    slots = np.asarray(slots_ds[()])
    _verify_crc(slots_ds, slots, f"slots of layout {name!r}")
    if slots.size and slots.min() < -1:
        raise _Bad(f"slots of layout {name!r} hold {slots.min()} (below -1, out of range)")
    try:
        layout = Layout(slots=slots, length=length, regions=tuple(regions))
    except ValueError as e:
        raise _Bad(f"layout {name!r}: {e}") from None
    return name, layout


def _stored_crc(ds: Any) -> int | None:
    """The crc32 attribute of a dataset, None if absent (early writers)."""
    if "crc32" not in ds.attrs:
        return None
    return _int_attr(ds, "crc32", minimum=0)


def _verify_crc(ds: Any, array: np.ndarray, what: str) -> None:
    want = _stored_crc(ds)
    if want is not None and _crc32(array) != want:
        raise _Bad(f"{what}: data does not match its checksum (corrupt)")


# Other formats parity writes as HDF5, and what to do with one handed to the wrong reader.
STATS_FORMAT_NAME = "parity-stats"
_MISPLACED = {
    STATS_FORMAT_NAME: "stats dump (per-tap summaries, no tensors): diff it against another stats dump "
                       "(parity diff REF_stats.h5 CAND_stats.h5) or capture tensors without --stats",
    FORMAT_NAME: "tensor dump, not a stats dump: diff it against another tensor dump, or capture with --stats",
}


def check_format(f: Any, name: str, version: int) -> None:
    """_Bad unless the root says format `name`, format_version `version`; a file of another
    parity format is named as such, with what to do instead."""
    fmt = f.attrs.get("format")
    if isinstance(fmt, bytes):
        fmt = fmt.decode("utf-8", "replace")
    if isinstance(fmt, str) and fmt != name and fmt in _MISPLACED:
        raise _Bad(_MISPLACED[fmt])
    if not isinstance(fmt, str) or fmt != name:
        raise _Bad(f"not a {name} file (format attribute is {fmt!r}, expected {name!r})"
                   if name != FORMAT_NAME else f"not a parity dump (format attribute is {fmt!r}, expected {name!r})")
    found = f.attrs.get("format_version")
    if isinstance(found, np.generic):
        found = found.item()
    if isinstance(found, bool) or not isinstance(found, int) or found != version:
        shown = "missing" if found is None else repr(found)
        raise _Bad(
            f"dump format_version {shown} is not supported; this version of parity reads "
            f"format_version {version} only"
            + (" (written by a newer parity?)" if isinstance(found, int) and found > version else "")
        )


class DumpReader:
    """An open, validated dump.  Headers are read (and checked) at open; data on demand.

    Attributes: path, meta (dict), complete (bool), layouts (name -> Layout),
    headers (list of TapHeader in execution order), error (CaptureError | None),
    notes (things tolerated while reading, e.g. a half-written last tap of an
    incomplete dump that was skipped).
    """

    def __init__(self, path: str | os.PathLike) -> None:
        self.path = os.fspath(path)
        if not os.path.exists(self.path):
            hint = ""
            if os.path.exists(self.path + PARTIAL_SUFFIX):
                hint = f" (an incomplete capture left {self.path + PARTIAL_SUFFIX}; open that to inspect it)"
            raise DumpError(self.path, f"no such file{hint}")
        if not os.path.isfile(self.path):
            raise DumpError(self.path, "not a regular file")
        try:
            is_hdf5 = h5py.is_hdf5(self.path)
        except Exception as e:
            raise DumpError(self.path, f"cannot read file: {_describe(e)}") from None
        if not is_hdf5:
            raise DumpError(self.path, "not an HDF5 file, so not a parity dump")
        try:
            self._file = h5py.File(self.path, "r", locking=False)
        except Exception as e:
            raise DumpError(self.path, f"unreadable HDF5 file (truncated or corrupt?): {_describe(e)}") from None
        self.notes: list[str] = []
        # per tap index: (next row, crc so far) of read_rows calls that went through it in
        # order; a tap whose rows were all read that way is checked without a second read
        self._row_crc: dict[int, tuple[int, int]] = {}
        self._verified: set[int] = set()
        # the same for read_flat, per tap: the next element its forward reads reached, and
        # the crc of what `settle` checked so far (the reading and the checksum may run
        # in different threads: read pieces wait in _unchecked, in order); the taps' byte
        # runs; the file descriptor they are read through (opened on first use)
        self._flat_at: dict[int, int] = {}
        self._flat_crc: dict[int, int] = {}
        self._unchecked: collections.deque = collections.deque()
        self._bytes: dict[int, _raw.TapBytes | None] = {}
        self._fd: int | None = None
        self._buffers = _raw.Buffers()
        try:
            self._parse()
        except _Bad as e:
            self.close()
            raise DumpError(self.path, str(e)) from None
        except Exception as e:
            self.close()
            raise DumpError(self.path, f"corrupt dump: {_describe(e)}") from None

    def _parse(self) -> None:
        f = self._file
        check_format(f, FORMAT_NAME, FORMAT_VERSION)
        self.meta = _json_attr(f, "meta")
        if not isinstance(self.meta, dict):
            raise _Bad("meta attribute must be a JSON object")
        self.complete = _bool_attr(f, "complete") and not self.path.endswith(PARTIAL_SUFFIX)

        layouts_group, taps_group = f.get("layouts"), f.get("taps")
        if not isinstance(layouts_group, h5py.Group) or not isinstance(taps_group, h5py.Group):
            raise _Bad("missing /layouts or /taps group")
        self.layouts: dict[str, Layout] = {}
        file_size = os.path.getsize(self.path)
        for member in _numbered(layouts_group, "layouts"):
            name, layout = _read_layout(layouts_group[member], file_size)
            if name in self.layouts:
                raise _Bad(f"layout name {name!r} appears twice")
            self.layouts[name] = layout

        self.headers: list[TapHeader] = []
        self._datasets: list[str] = []
        members = _numbered(taps_group, "taps")
        count = _int_attr(f, "tap_count", minimum=0) if "tap_count" in f.attrs else None
        if count is None and _bool_attr(f, "complete"):
            raise _Bad("marked complete but lacks attribute 'tap_count'")
        for i, member in enumerate(members):
            try:
                header = self._read_header(taps_group[member], file_size)
            except Exception as e:
                # A capture killed inside add_tap (no tap_count: it never closed), or one
                # whose interrupted add_tap could not remove its member (tap_count one
                # short), can leave its last tap half-written: skip it, and say so.
                # Anywhere else a broken tap is corruption.
                leftover = count is None or count == len(members) - 1
                if self.complete or i != len(members) - 1 or not leftover:
                    raise
                self.notes.append(f"skipped half-written last tap {member}: {_describe(e)}")
                break
            self.headers.append(header)
            self._datasets.append(member)
        self._index: dict[str, int] = {}
        for i, h in enumerate(self.headers):
            if h.key in self._index:
                raise _Bad(f"tap key {h.key!r} appears twice")
            self._index[h.key] = i
        if count is not None and count != len(self.headers):
            raise _Bad(f"holds {len(members)} taps but tap_count says {count} (truncated?)")

        self.error = self._read_error(f.get("error")) if "error" in f else None
        if self.error is not None:
            self.complete = False  # a run that raised never completed, whatever the flag says

    def _read_header(self, ds: Any, file_size: int) -> TapHeader:
        if not isinstance(ds, h5py.Dataset):
            raise _Bad(f"{ds.name} is not a dataset")
        info = _read_info(ds)
        key = _str_attr(ds, "key")
        if key != info.key:
            raise _Bad(f"{ds.name}: key attribute {key!r} does not match name/step ({info.key!r})")
        order = _int_attr(ds, "order", minimum=0)
        dtype = _str_attr(ds, "dtype")
        if not dtype:
            raise _Bad(f"tap {key!r} has an empty dtype")
        if dtype in STORAGE_DTYPES:
            if ds.dtype != STORAGE_DTYPES[dtype]:
                raise _Bad(f"tap {key!r} is declared {dtype} (stored as {STORAGE_DTYPES[dtype]}) but holds {ds.dtype}")
        elif ds.dtype.kind not in _RAW_KINDS or not ds.dtype.isnative:
            raise _Bad(f"tap {key!r} of unknown dtype {dtype!r} holds unsupported numpy {ds.dtype}")
        if ds.shape is None:
            raise _Bad(f"tap {key!r} has no shape (null dataspace)")
        shape = tuple(int(s) for s in ds.shape)
        if ds.compression is None and int(np.prod(shape, dtype=object)) * ds.dtype.itemsize > file_size:
            raise _Bad(f"tap {key!r} declares shape {shape}, more data than the file holds")
        _stored_crc(ds)  # present and well-formed, or absent
        # Like the writer, an unknown layout or a misfit shape is left to the diff.
        layout = _str_attr(ds, "layout") or None
        return TapHeader(info=info, order=order, dtype=dtype, layout=layout, shape=shape)

    @staticmethod
    def _read_error(group: Any) -> CaptureError:
        if not isinstance(group, h5py.Group):
            raise _Bad("/error is not a group")
        info_names = ("name", "stack", "layer", "component", "step")
        present = [n in group.attrs for n in info_names]
        if any(present) and not all(present):
            raise _Bad("/error has some but not all of name/stack/layer/component/step")
        key = _str_attr(group, "key")
        return CaptureError(
            key=key or None,
            info=_read_info(group) if all(present) else None,
            exc_type=_str_attr(group, "exc_type"),
            message=_str_attr(group, "message"),
        )

    # -- data

    def _resolve(self, key_or_index: str | int) -> int:
        if isinstance(key_or_index, str):
            if key_or_index not in self._index:
                raise DumpError(self.path, f"no tap with key {key_or_index!r}")
            return self._index[key_or_index]
        if isinstance(key_or_index, (bool, np.bool_)) or not isinstance(key_or_index, (int, np.integer)):
            raise ValueError(f"tap must be given by key (str) or index (int), got {key_or_index!r}")
        if not 0 <= key_or_index < len(self.headers):
            raise DumpError(self.path, f"no tap at index {key_or_index} (dump has {len(self.headers)})")
        return int(key_or_index)

    def _dataset(self, i: int) -> Any:
        ds = self._file["taps"][self._datasets[i]]
        if ds.compression is None and ds.size and ds.id.get_storage_size() < ds.nbytes:
            raise _Bad("its data was never fully written (truncated)")
        return ds

    def load(self, key_or_index: str | int) -> np.ndarray:
        """One tap's array in its storage representation (bf16/fp8 as raw bits)."""
        i = self._resolve(key_or_index)
        header = self.headers[i]
        try:
            ds = self._dataset(i)
            array = np.asarray(ds[()])
            if array.dtype != ds.dtype or array.shape != header.shape:
                raise _Bad(f"read back as {array.dtype} {array.shape}, expected {ds.dtype} {header.shape}")
            _verify_crc(ds, array, "its data")
        except Exception as e:
            raise DumpError(self.path, f"cannot read tap {header.key!r}: {_describe(e)}") from None
        return array

    def read_rows(self, key_or_index: str | int, start: int, stop: int) -> np.ndarray:
        """Rows [start, stop) along axis 0 of a tap (of at least one dimension)."""
        i = self._resolve(key_or_index)
        header = self.headers[i]
        try:
            if not header.shape:
                raise _Bad("a 0-d tap has no rows")
            ds = self._dataset(i)
            chunk = np.asarray(ds[start:stop])
        except Exception as e:
            raise DumpError(self.path, f"cannot read tap {header.key!r}: {_describe(e)}") from None
        # The checksum covers the whole array: rows read in order from the first are
        # checked once the last one is read; any other pattern is checked by `verify`.
        at, crc = self._row_crc.get(i, (0, 0))
        if start == at and i not in self._verified:
            at, crc = start + chunk.shape[0], _crc32(chunk, crc)
            self._row_crc[i] = (at, crc)
            if at >= header.shape[0]:
                del self._row_crc[i]
                want = _stored_crc(ds)
                if want is not None and crc != want:
                    raise DumpError(self.path, f"cannot read tap {header.key!r}: its data does not match its "
                                               "checksum (corrupt)")
                self._verified.add(i)
        return chunk

    def read_flat(self, key_or_index: str | int, start: int, stop: int, check: bool = True) -> np.ndarray:
        """Elements [start, stop) of a tap's C-order flat array, in its storage dtype.

        Uncompressed taps are read with os.preadv at the offsets HDF5 gives (GIL released,
        see `rawread`), others through h5py.  The checksum is continued over reads that
        go forward: a read starting past the read prefix also reads the gap (the caller
        gets only what it asked for), so reading a tap's tokens in order checks it without a
        second pass, padding included; a read going back is checked later by `verify`.
        `check=False` leaves the checksum of what was read to the next `settle()` (so a
        reader thread can leave it to the thread that computes); DumpError there."""
        i = self._resolve(key_or_index)
        header = self.headers[i]
        size = int(np.prod(header.shape, dtype=np.int64))
        at = self._flat_at.get(i, 0)
        tracking = i not in self._verified and at <= start
        lo = at if tracking else start
        try:
            if not header.shape:
                raise _Bad("a 0-d tap has no flat range")
            if i not in self._bytes:
                self._bytes[i] = _raw.TapBytes.of(self._dataset(i))
            raw = self._bytes[i]
            if raw is not None:  # h5py is not asked again: a dataset lookup costs ~0.5 ms
                if self._fd is None:
                    self._fd = os.open(self.path, os.O_RDONLY)
                data = raw.read(self._fd, lo, stop, self._buffers).view(raw.dtype)
            else:
                ds = self._dataset(i)
                per_row = int(np.prod(header.shape[1:], dtype=np.int64))
                r0, r1 = lo // per_row, -(-stop // per_row)
                data = np.asarray(ds[r0:r1]).reshape(-1)[lo - r0 * per_row:stop - r0 * per_row]
            want = _stored_crc(self._dataset(i)) if tracking and stop >= size else None
        except Exception as e:
            raise DumpError(self.path, f"cannot read tap {header.key!r}: {_describe(e)}") from None
        if tracking:
            self._flat_at[i] = stop
            self._unchecked.append((i, data, stop >= size, want))
        if check:
            self.settle()
        return data[start - lo:]

    def read_rest(self, key_or_index: str | int, check: bool = True) -> None:
        """Read what forward `read_flat` calls left of a tap (a padded tail, typically),
        so its checksum is complete once settled."""
        i = self._resolve(key_or_index)
        at = self._flat_at.get(i, 0)
        size = int(np.prod(self.headers[i].shape, dtype=np.int64))
        if at > 0 and i not in self._verified:
            for start in range(at, size, 1 << 22):
                self.read_flat(i, start, min(size, start + (1 << 22)), check=check)

    def settle(self) -> None:
        """Checksum the pieces `read_flat` read so far, in order; DumpError for a tap whose
        last piece shows its data does not match its checksum."""
        while self._unchecked:
            i, data, last, want = self._unchecked.popleft()
            crc = _crc32(data, self._flat_crc.get(i, 0))
            if not last:
                self._flat_crc[i] = crc
                continue
            self._flat_crc.pop(i, None)
            if want is not None and crc != want:
                self._unchecked.clear()
                raise DumpError(self.path, f"cannot read tap {self.headers[i].key!r}: its data does not match its "
                                           "checksum (corrupt)")
            self._verified.add(i)

    def verify(self, key_or_index: str | int) -> None:
        """Check a tap's checksum (DumpError if its data is corrupt), reading it again in
        slices unless `read_rows` or `load` already read and checked all of it in order."""
        i = self._resolve(key_or_index)
        self.settle()
        if i in self._verified:
            return
        header = self.headers[i]
        if self._flat_at.get(i, 0) > 0:  # read_flat read a prefix: check the rest
            self.read_rest(i)
            return
        per_row = int(np.prod(header.shape[1:], dtype=np.int64)) if header.shape else 1
        for _ in self._chunks(i, max(1, (1 << 20) // max(1, per_row))):
            pass
        self._row_crc.pop(i, None)
        self._verified.add(i)

    def read_chunks(self, key_or_index: str | int, rows: int) -> Iterator[np.ndarray]:
        """Yield a tap's array in slices of `rows` along axis 0 (a 0-d tap: once, whole).

        The checksum covers the whole array, so a corrupt tap raises DumpError after its
        last chunk: consume them all before trusting any."""
        if isinstance(rows, (bool, np.bool_)) or not isinstance(rows, (int, np.integer)) or rows <= 0:
            raise ValueError(f"rows must be a positive int, got {rows!r}")
        i = self._resolve(key_or_index)
        return self._chunks(i, int(rows))

    def _chunks(self, i: int, rows: int) -> Iterator[np.ndarray]:
        header = self.headers[i]
        if not header.shape:
            yield self.load(i)
            return
        try:
            ds = self._dataset(i)
        except Exception as e:
            raise DumpError(self.path, f"cannot read tap {header.key!r}: {_describe(e)}") from None
        crc = 0
        for start in range(0, header.shape[0], rows):
            try:
                chunk = np.asarray(ds[start : start + rows])
            except Exception as e:
                raise DumpError(self.path, f"cannot read tap {header.key!r}: {_describe(e)}") from None
            crc = _crc32(chunk, crc)
            yield chunk
        want = _stored_crc(ds)
        if want is not None and crc != want:
            raise DumpError(self.path,
                            f"cannot read tap {header.key!r}: its data does not match its checksum (corrupt)")

    # -- lifetime

    def close(self) -> None:
        if getattr(self, "_fd", None) is not None:
            os.close(self._fd)
            self._fd = None
        try:
            self._file.close()
        except Exception:  # closing a corrupt file can fail; nothing is left to release
            pass

    def __enter__(self) -> DumpReader:
        return self

    def __exit__(self, exc_type, exc, tb) -> bool:
        self.close()
        return False


def _describe(exc: BaseException) -> str:
    text = str(exc) or type(exc).__name__
    return text if isinstance(exc, (OSError, _Bad)) else f"{type(exc).__name__}: {text}"


def open_dump(path: str | os.PathLike) -> DumpReader:
    """Open and validate a dump (usable as a context manager); DumpError if it is bad."""
    return DumpReader(path)


def read_dump(path: str | os.PathLike) -> Capture:
    """Load a whole dump into memory as a Capture."""
    with open_dump(path) as reader:
        taps = [
            Tap(info=h.info, order=h.order, array=reader.load(i), dtype=h.dtype, layout=h.layout)
            for i, h in enumerate(reader.headers)
        ]
        return Capture(
            taps=taps,
            layouts=dict(reader.layouts),
            meta=reader.meta,
            error=reader.error,
            complete=reader.complete,
        )
