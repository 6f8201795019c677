"""The dump format: one HDF5 file per backend run (h5py + numpy, no torch).

Format (format_version 1)::

    /                     attrs: format="parity-dump", format_version=1, complete (bool, written LAST),
                                 meta (JSON string of Capture.meta), tap_count (int, at close)
    /layouts/<i>          group per layout, i = 0,1,..; attrs: name (str), length (int),
                          regions (JSON list of [name,start,stop]);
                          dataset "slots" int64 [R,T], attr crc32 as for taps
    /taps/<i:06d>         dataset per tap in execution order (i = order); stored in storage dtype (codec);
                          attrs: key, name, stack, layer (int, -1 = none), component, step (int, -1 = none),
                                 order, dtype (original dtype name), layout (layout name or ""),
                                 crc32 (int: zlib CRC-32 of the array's C-order bytes)
    /error                optional group, attrs: key ("" = none), name/stack/layer/component/step as for taps
                          (or absent), exc_type, message

Notes on the format:
- Tap names and keys are attributes, never HDF5 paths, so any name ("/", "..", unicode)
  is safe.  <i> in /taps is the position in execution order (0, 1, ... without gaps);
  the `order` attribute holds Tap.order as the capture assigned it.
- bfloat16 / float8 tensors are stored as their raw bits (uint16 / uint8), see codec.py,
  so a dump is bit-exact.
- HDF5 checksums its metadata but not raw data, so every array carries a CRC-32 of its
  bytes (in its checksummed object header).  The reader verifies it on every load: a
  flipped bit in tensor data is a DumpError, never a silently different number.  (A
  dataset without crc32, from an early writer, is read unverified, and the reader's notes
  say which.)
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
  read as incomplete.  An incomplete capture never replaces a file already at `<path>`:
  it is renamed to `<path>.incomplete` instead.  A reader of `<path>` that finds
  `<path>.partial` beside it says so in its notes (a capture to that path is running, or
  was killed, and `<path>` is what it would have replaced).
- A dump is self-contained: every member the reader opens is an object stored in the
  file (a hard link), and its data lies in the file.  Soft and external links, virtual
  datasets, external raw storage and filters other than gzip/lzf/shuffle/fletcher32 (a
  plugin HDF5 would load) are refused before anything is followed, so a tap naming
  /etc/passwd or a FIFO is never opened.
- HDF5 file format of HDF5 1.8 (libver v108): object headers are checksummed, large
  attributes are allowed, and a file whose writer was killed can still be opened (the
  1.10 format marks such files "already open for write" and refuses them).
"""

from __future__ import annotations

import json
import os
from typing import Any

import h5py
import numpy as np

from parity.dump.checksum import crc32
from parity.taps.records import TapInfo

FORMAT_NAME = "parity-dump"


FORMAT_VERSION = 1


PARTIAL_SUFFIX = ".partial"


# Where an incomplete capture goes when `path` already holds a file: a dump is replaced
# only by a complete one.
INCOMPLETE_SUFFIX = ".incomplete"


LIBVER = ("v108", "v108")


COMPRESSIONS = (None, "gzip", "lzf")


# h5py reports some failed writes (a failed flush) as RuntimeError rather than OSError.
IO_ERRORS = (OSError, RuntimeError)


# numpy kinds a tap of a dtype unknown to the codec may be stored as (bool/int/uint/float/complex).
RAW_KINDS = "biufc"


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


def stale_partial_note(path: str) -> str | None:
    """What a `<path>.partial` beside the dump at `path` means, or None if there is none."""
    if path.endswith(PARTIAL_SUFFIX) or not os.path.lexists(path + PARTIAL_SUFFIX):
        return None
    return (f"{path + PARTIAL_SUFFIX} exists beside {path}: a capture to {path} is still running or was killed; "
            f"this is the dump from before it")


def unchecked_note(path: str, what: str, names: list[str], total: int) -> str | None:
    """The note on data a dump stores without a crc32 checksum (early writers did), or None:
    `names` of the `total` items (`what`: taps, layouts, tables) that lack one."""
    if not names:
        return None
    shown = ", ".join(names[:5]) + (f", ... ({len(names) - 5} more)" if len(names) > 5 else "")
    return (f"{path}: {len(names)} of {total} {what} carry no crc32 checksum ({shown}): their data is read "
            "unverified, so a flipped bit there would go unnoticed")


def check_text(value: Any, what: str, allow_empty: bool = True) -> str:
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


def check_index(value: Any, what: str, none_ok: bool) -> int | None:
    """ValueError unless value is a non-negative int (or None when none_ok)."""
    if value is None and none_ok:
        return None
    if isinstance(value, (bool, np.bool_)) or not isinstance(value, (int, np.integer)):
        raise ValueError(f"{what} must be an int{' or None' if none_ok else ''}, got {value!r}")
    if value < 0:
        # -1 encodes None in the file, so negative values would not round-trip.
        raise ValueError(f"{what} must be >= 0, got {value}")
    return int(value)


def info_attrs(info: TapInfo) -> dict[str, Any]:
    if not isinstance(info, TapInfo):
        raise ValueError(f"expected a TapInfo, got {type(info).__name__}")
    layer = check_index(info.layer, "layer", none_ok=True)
    step = check_index(info.step, "step", none_ok=True)
    return {
        "name": check_text(info.name, "tap name", allow_empty=False),
        "stack": check_text(info.stack, "stack"),
        "layer": -1 if layer is None else layer,
        "component": check_text(info.component, "component"),
        "step": -1 if step is None else step,
    }


def set_attrs(obj: Any, attrs: dict[str, Any]) -> None:
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


def array_crc32(array: np.ndarray, crc: int = 0) -> int:
    """CRC-32 of an array's bytes in C order (continuing `crc`, for chunked reads)."""
    return crc32(np.ascontiguousarray(array).view(np.uint8) if array.ndim else array.tobytes(), crc)


class BadAttribute(Exception):
    """Internal: a validation failure, turned into DumpError with the file path."""


def read_attr(obj: Any, name: str) -> Any:
    if name not in obj.attrs:
        raise BadAttribute(f"{obj.name} lacks attribute {name!r}")
    return obj.attrs[name]


def str_attr(obj: Any, name: str) -> str:
    value = read_attr(obj, name)
    if isinstance(value, bytes):  # fixed-length strings read back as bytes
        try:
            value = value.decode("utf-8")
        except UnicodeDecodeError:
            raise BadAttribute(f"attribute {name!r} of {obj.name} is not valid UTF-8") from None
    if not isinstance(value, str):
        raise BadAttribute(f"attribute {name!r} of {obj.name} must be a string, got {type(value).__name__}")
    return value


def int_attr(obj: Any, name: str, minimum: int | None = None) -> int:
    value = read_attr(obj, name)
    if isinstance(value, (bool, np.bool_)) or not isinstance(value, (int, np.integer)):
        raise BadAttribute(f"attribute {name!r} of {obj.name} must be an integer, got {value!r}")
    if minimum is not None and value < minimum:
        raise BadAttribute(f"attribute {name!r} of {obj.name} must be >= {minimum}, got {value}")
    return int(value)


def bool_attr(obj: Any, name: str) -> bool:
    value = read_attr(obj, name)
    if not isinstance(value, (bool, np.bool_)):
        raise BadAttribute(f"attribute {name!r} of {obj.name} must be a boolean, got {value!r}")
    return bool(value)


def reject_constant(token: str) -> Any:
    raise ValueError(f"{token} is not JSON")


def json_attr(obj: Any, name: str) -> Any:
    text = str_attr(obj, name)
    try:
        return json.loads(text, parse_constant=reject_constant)
    except (ValueError, RecursionError) as e:
        raise BadAttribute(f"attribute {name!r} of {obj.name} is not valid JSON ({e})") from None


def read_info(obj: Any) -> TapInfo:
    layer = int_attr(obj, "layer", minimum=-1)
    step = int_attr(obj, "step", minimum=-1)
    name = str_attr(obj, "name")
    if not name:
        raise BadAttribute(f"{obj.name} has an empty tap name")
    return TapInfo(
        name=name,
        stack=str_attr(obj, "stack"),
        layer=None if layer == -1 else layer,
        component=str_attr(obj, "component"),
        step=None if step == -1 else step,
    )


class NotSelfContained(BadAttribute):
    """A member of the dump is a link, or keeps its data somewhere else (another file, a
    filter plugin): refused, never followed, wherever it sits in the file."""


SELF_CONTAINED = "a dump must be self-contained: parity reads nothing stored outside it"


# Filters parity's writer uses (gzip, lzf) and the harmless ones h5py adds on request;
# any other filter is a plugin HDF5 would load from outside the file.
FILTERS = {h5py.h5z.FILTER_DEFLATE: "gzip", h5py.h5z.FILTER_LZF: "lzf", h5py.h5z.FILTER_SHUFFLE: "shuffle",
           h5py.h5z.FILTER_FLETCHER32: "fletcher32"}


COMPRESSORS = (h5py.h5z.FILTER_DEFLATE, h5py.h5z.FILTER_LZF)


# Deflate shrinks data at most ~1032:1 (lzf far less): a compressed dataset declaring more
# than this many times its stored bytes is not what a compressor wrote (a decompression
# bomb, or chunks never written, which HDF5 would hand out as zeros).
MAX_EXPANSION = 2048


# A compressed chunk is decompressed whole, however little of it is read: larger ones are
# refused (parity writes 1 MiB chunks, h5py's own chunking at most 1 MiB).
MAX_COMPRESSED_CHUNK_BYTES = 64 << 20


def _text(raw: Any) -> str:
    return raw.decode("utf-8", "replace") if isinstance(raw, bytes) else str(raw)


def member(group: Any, name: str) -> Any | None:
    """Member `name` of an HDF5 group, None if absent, without following any link: a
    soft, external or user-defined link is NotSelfContained (HDF5 would open the file an
    external link names, and a FIFO there blocks forever)."""
    key = name.encode("utf-8")
    links = group.id.links
    if not links.exists(key):
        return None
    kind = links.get_info(key).type
    where = f"{group.name.rstrip('/')}/{name}"
    if kind == h5py.h5l.TYPE_EXTERNAL:
        target, path = links.get_val(key)
        raise NotSelfContained(f"{where} is an external link to {_text(path)!r} in {_text(target)!r}: "
                               f"{SELF_CONTAINED}")
    if kind == h5py.h5l.TYPE_SOFT:
        raise NotSelfContained(f"{where} is a soft link to {_text(links.get_val(key))!r}, not an object stored "
                               "in the dump")
    if kind != h5py.h5l.TYPE_HARD:
        raise NotSelfContained(f"{where} is a user-defined link (type {kind}): {SELF_CONTAINED}")
    return group[name]


def check_stored_inside(ds: Any) -> None:
    """NotSelfContained unless a dataset's data lies in this file, in a form HDF5 reads
    without a plugin: no virtual dataset, no external raw storage, only the filters
    parity writes."""
    plist = ds.id.get_create_plist()
    if plist.get_layout() == h5py.h5d.VIRTUAL:
        raise NotSelfContained(f"{ds.name} is a virtual dataset (its data lives in other datasets or files): "
                               f"{SELF_CONTAINED}")
    if plist.get_external_count():
        files = ", ".join(repr(_text(plist.get_external(i)[0])) for i in range(plist.get_external_count()))
        raise NotSelfContained(f"{ds.name} keeps its data in external file(s) {files}: {SELF_CONTAINED}")
    codes = [plist.get_filter(i)[0] for i in range(plist.get_nfilters())]
    for code in codes:
        if code not in FILTERS:
            raise NotSelfContained(f"{ds.name} uses HDF5 filter {code}, which parity does not write (HDF5 would "
                                   "load it as a plugin from outside the file)")


def check_declared_size(ds: Any, file_size: int, what: str) -> None:
    """BadAttribute unless the data a dataset declares could be in the file: uncompressed,
    at most the file's size; compressed, at most MAX_EXPANSION times its stored bytes (plus
    one chunk), in chunks of at most MAX_COMPRESSED_CHUNK_BYTES.  Reads metadata only, so
    a reader can refuse a bomb before inflating it."""
    declared = int(np.prod(ds.shape or (), dtype=object)) * ds.dtype.itemsize
    plist = ds.id.get_create_plist()
    codes = [plist.get_filter(i)[0] for i in range(plist.get_nfilters())]
    if not any(code in COMPRESSORS for code in codes):
        if declared > file_size:
            raise BadAttribute(f"{what} declares shape {tuple(ds.shape)}, more data than the file holds")
        return
    if sum(code in COMPRESSORS for code in codes) > 1:
        raise BadAttribute(f"{what} is compressed twice ({', '.join(FILTERS[c] for c in codes)}), which parity "
                           "never writes")
    chunk_bytes = int(np.prod(ds.chunks or (), dtype=object)) * ds.dtype.itemsize
    if chunk_bytes > MAX_COMPRESSED_CHUNK_BYTES:
        raise BadAttribute(f"{what} is compressed in chunks of {chunk_bytes} bytes; parity reads compressed chunks "
                           f"of at most {MAX_COMPRESSED_CHUNK_BYTES} bytes")
    stored = ds.id.get_storage_size()
    if declared > MAX_EXPANSION * stored + chunk_bytes:
        raise BadAttribute(f"{what} declares {declared} bytes in {stored} compressed bytes, more than a compressor "
                           "writes (chunks missing, or a decompression bomb)")


def stored_crc(ds: Any) -> int | None:
    """The crc32 attribute of a dataset, None if absent (early writers)."""
    if "crc32" not in ds.attrs:
        return None
    return int_attr(ds, "crc32", minimum=0)


def verify_crc(ds: Any, array: np.ndarray, what: str) -> None:
    want = stored_crc(ds)
    if want is not None and array_crc32(array) != want:
        raise BadAttribute(f"{what} does not match its checksum (corrupt)")


# Other formats parity writes as HDF5, and what to do with one handed to the wrong reader.
STATS_FORMAT_NAME = "parity-stats"


MISPLACED = {
    STATS_FORMAT_NAME: "stats dump (per-tap summaries, no tensors): diff it against another stats dump "
                       "(parity diff REF_stats.h5 CAND_stats.h5) or capture tensors without --stats",
    FORMAT_NAME: "tensor dump, not a stats dump: diff it against another tensor dump, or capture with --stats",
}


def check_format(f: Any, name: str, version: int) -> None:
    """BadAttribute unless the root says format `name`, format_version `version`; a file of another
    parity format is named as such, with what to do instead."""
    fmt = f.attrs.get("format")
    if isinstance(fmt, bytes):
        fmt = fmt.decode("utf-8", "replace")
    if isinstance(fmt, str) and fmt != name and fmt in MISPLACED:
        raise BadAttribute(MISPLACED[fmt])
    if not isinstance(fmt, str) or fmt != name:
        raise BadAttribute(f"not a {name} file (format attribute is {fmt!r}, expected {name!r})"
                   if name != FORMAT_NAME else f"not a parity dump (format attribute is {fmt!r}, expected {name!r})")
    found = f.attrs.get("format_version")
    if isinstance(found, np.generic):
        found = found.item()
    if isinstance(found, bool) or not isinstance(found, int) or found != version:
        shown = "missing" if found is None else repr(found)
        raise BadAttribute(
            f"dump format_version {shown} is not supported; this version of parity reads "
            f"format_version {version} only"
            + (" (written by a newer parity?)" if isinstance(found, int) and found > version else "")
        )


def describe_error(exc: BaseException) -> str:
    text = str(exc) or type(exc).__name__
    return text if isinstance(exc, (OSError, BadAttribute)) else f"{type(exc).__name__}: {text}"
