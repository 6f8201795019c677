"""Reading a dump: headers first, data on demand, every byte checked (h5py + numpy, no torch)."""
from __future__ import annotations

import collections
import os
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import h5py
import numpy as np

from parity.dump import rawread as _raw
from parity.dump.format import (
    FORMAT_NAME,
    FORMAT_VERSION,
    PARTIAL_SUFFIX,
    RAW_KINDS,
    BadAttribute,
    DumpError,
    NotSelfContained,
    array_crc32,
    bool_attr,
    check_declared_size,
    check_format,
    check_stored_inside,
    describe_error,
    int_attr,
    json_attr,
    member,
    read_info,
    stale_partial_note,
    stored_crc,
    str_attr,
    unchecked_note,
    verify_crc,
)
from parity.taps.codec import STORAGE_DTYPES
from parity.taps.records import Capture, CaptureError, Layout, Region, Tap, TapInfo


@dataclass(frozen=True)
class TapHeader:
    """What a dump says about one tap, without its data."""

    info: TapInfo
    order: int
    dtype: str
    layout: str | None
    shape: tuple[int, ...]
    checked: bool = True  # its data carries a crc32 checksum (early writers wrote none)

    @property
    def key(self) -> str:
        return self.info.key


def _numbered(group: Any, what: str) -> list[str]:
    """Member names of a group numbered 0..n-1, in numeric order; BadAttribute on a gap or stray."""
    names = list(group.keys())
    numbers = {}
    for name in names:
        if not name.isdigit() or not name.isascii():
            raise BadAttribute(f"unexpected member {name!r} in {group.name}")
        numbers[int(name)] = name
    if sorted(numbers) != list(range(len(names))):
        raise BadAttribute(f"{what} in {group.name} are not numbered 0..{len(names) - 1}")
    return [numbers[i] for i in range(len(names))]


def _read_layout(group: Any, file_size: int) -> tuple[str, Layout, bool]:
    """A layout's name, the Layout, and whether its slots carry a checksum."""
    if not isinstance(group, h5py.Group):
        raise BadAttribute(f"{group.name} is not a group")
    name = str_attr(group, "name")
    if not name:
        raise BadAttribute(f"{group.name} has an empty layout name")
    length = int_attr(group, "length", minimum=1)
    raw = json_attr(group, "regions")
    regions = []
    if not isinstance(raw, list):
        raise BadAttribute(f"regions of layout {name!r} must be a JSON list")
    for item in raw:
        ok = (
            isinstance(item, list)
            and len(item) == 3
            and isinstance(item[0], str)
            and all(isinstance(v, int) and not isinstance(v, bool) for v in item[1:])
            and 0 <= item[1] <= item[2] <= length
        )
        if not ok:
            raise BadAttribute(f"layout {name!r} has a bad region {item!r} "
                               f"(want [name, start, stop] within length {length})")
        regions.append(Region(item[0], item[1], item[2]))
    slots_ds = member(group, "slots")
    if not isinstance(slots_ds, h5py.Dataset):
        raise BadAttribute(f"layout {name!r} has no 'slots' dataset")
    check_stored_inside(slots_ds)
    if slots_ds.dtype != np.dtype(np.int64) or slots_ds.shape is None or len(slots_ds.shape) != 2:
        raise BadAttribute(f"slots of layout {name!r} must be 2-D int64, got {slots_ds.dtype} {slots_ds.shape}")
    check_declared_size(slots_ds, file_size, f"slots of layout {name!r}")
    slots = np.asarray(slots_ds[()])
    verify_crc(slots_ds, slots, f"slots of layout {name!r}")
    if slots.size and slots.min() < -1:
        raise BadAttribute(f"slots of layout {name!r} hold {slots.min()} (below -1, out of range)")
    try:
        layout = Layout(slots=slots, length=length, regions=tuple(regions))
    except ValueError as e:
        raise BadAttribute(f"layout {name!r}: {e}") from None
    return name, layout, stored_crc(slots_ds) is not None


class DumpReader:
    """An open, validated dump.  Headers are read (and checked) at open; data on demand.

    Attributes: path, meta (dict), complete (bool), layouts (name -> Layout),
    headers (list of TapHeader in execution order), error (CaptureError | None),
    notes (what a user should know that does not make the dump unreadable: a
    `<path>.partial` beside it, a half-written last tap of an incomplete dump that was
    skipped).
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
            raise DumpError(self.path, f"cannot read file: {describe_error(e)}") from None
        if not is_hdf5:
            raise DumpError(self.path, "not an HDF5 file, so not a parity dump")
        try:
            self._file = h5py.File(self.path, "r", locking=False)
        except Exception as e:
            raise DumpError(self.path, f"unreadable HDF5 file (truncated or corrupt?): {describe_error(e)}") from None
        self.notes: list[str] = [note for note in (stale_partial_note(self.path),) if note]
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
        except BadAttribute as e:
            self.close()
            raise DumpError(self.path, str(e)) from None
        except Exception as e:
            self.close()
            raise DumpError(self.path, f"corrupt dump: {describe_error(e)}") from None

    def _parse(self) -> None:
        f = self._file
        check_format(f, FORMAT_NAME, FORMAT_VERSION)
        self.meta = json_attr(f, "meta")
        if not isinstance(self.meta, dict):
            raise BadAttribute("meta attribute must be a JSON object")
        self.complete = bool_attr(f, "complete") and not self.path.endswith(PARTIAL_SUFFIX)

        layouts_group, taps_group = member(f, "layouts"), member(f, "taps")
        if not isinstance(layouts_group, h5py.Group) or not isinstance(taps_group, h5py.Group):
            raise BadAttribute("missing /layouts or /taps group")
        self.layouts: dict[str, Layout] = {}
        unchecked_layouts = []
        file_size = os.path.getsize(self.path)
        for number in _numbered(layouts_group, "layouts"):
            name, layout, checked = _read_layout(member(layouts_group, number), file_size)
            if name in self.layouts:
                raise BadAttribute(f"layout name {name!r} appears twice")
            self.layouts[name] = layout
            if not checked:
                unchecked_layouts.append(name)

        self.headers: list[TapHeader] = []
        self._datasets: list[str] = []
        members = _numbered(taps_group, "taps")
        count = int_attr(f, "tap_count", minimum=0) if "tap_count" in f.attrs else None
        if count is None and bool_attr(f, "complete"):
            raise BadAttribute("marked complete but lacks attribute 'tap_count'")
        for i, number in enumerate(members):
            try:
                header = self._read_header(member(taps_group, number), file_size)
            except Exception as e:
                # A capture killed inside add_tap (no tap_count: it never closed), or one
                # whose interrupted add_tap could not remove its member (tap_count one
                # short), can leave its last tap half-written: skip it, and say so.
                # Anywhere else a broken tap is corruption, and a tap stored outside the
                # file is refused wherever it is.
                leftover = count is None or count == len(members) - 1
                if self.complete or i != len(members) - 1 or not leftover or isinstance(e, NotSelfContained):
                    raise
                self.notes.append(f"skipped half-written last tap {number}: {describe_error(e)}")
                break
            self.headers.append(header)
            self._datasets.append(number)
        self._index: dict[str, int] = {}
        for i, h in enumerate(self.headers):
            if h.key in self._index:
                raise BadAttribute(f"tap key {h.key!r} appears twice")
            self._index[h.key] = i
        if count is not None and count != len(self.headers):
            raise BadAttribute(f"holds {len(members)} taps but tap_count says {count} (truncated?)")
        for note in (unchecked_note(self.path, "taps", [h.key for h in self.headers if not h.checked],
                                    len(self.headers)),
                     unchecked_note(self.path, "layouts", unchecked_layouts, len(self.layouts))):
            if note:
                self.notes.append(note)

        error = member(f, "error")
        self.error = None if error is None else self._read_error(error)
        if self.error is not None:
            self.complete = False  # a run that raised never completed, whatever the flag says

    def _read_header(self, ds: Any, file_size: int) -> TapHeader:
        if not isinstance(ds, h5py.Dataset):
            raise BadAttribute(f"{ds.name} is not a dataset")
        check_stored_inside(ds)
        info = read_info(ds)
        key = str_attr(ds, "key")
        if key != info.key:
            raise BadAttribute(f"{ds.name}: key attribute {key!r} does not match name/step ({info.key!r})")
        order = int_attr(ds, "order", minimum=0)
        dtype = str_attr(ds, "dtype")
        if not dtype:
            raise BadAttribute(f"tap {key!r} has an empty dtype")
        if dtype in STORAGE_DTYPES:
            if ds.dtype != STORAGE_DTYPES[dtype]:
                raise BadAttribute(f"tap {key!r} is declared {dtype} (stored as {STORAGE_DTYPES[dtype]}) "
                                   f"but holds {ds.dtype}")
        elif ds.dtype.kind not in RAW_KINDS or not ds.dtype.isnative:
            raise BadAttribute(f"tap {key!r} of unknown dtype {dtype!r} holds unsupported numpy {ds.dtype}")
        if ds.shape is None:
            raise BadAttribute(f"tap {key!r} has no shape (null dataspace)")
        shape = tuple(int(s) for s in ds.shape)
        check_declared_size(ds, file_size, f"tap {key!r}")
        checked = stored_crc(ds) is not None  # present and well-formed, or absent
        # Like the writer, an unknown layout or a misfit shape is left to the diff.
        layout = str_attr(ds, "layout") or None
        return TapHeader(info=info, order=order, dtype=dtype, layout=layout, shape=shape, checked=checked)

    @staticmethod
    def _read_error(group: Any) -> CaptureError:
        if not isinstance(group, h5py.Group):
            raise BadAttribute("/error is not a group")
        info_names = ("name", "stack", "layer", "component", "step")
        present = [n in group.attrs for n in info_names]
        if any(present) and not all(present):
            raise BadAttribute("/error has some but not all of name/stack/layer/component/step")
        key = str_attr(group, "key")
        return CaptureError(
            key=key or None,
            info=read_info(group) if all(present) else None,
            exc_type=str_attr(group, "exc_type"),
            message=str_attr(group, "message"),
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
            raise BadAttribute("its data was never fully written (truncated)")
        return ds

    def load(self, key_or_index: str | int) -> np.ndarray:
        """One tap's array in its storage representation (bf16/fp8 as raw bits)."""
        i = self._resolve(key_or_index)
        header = self.headers[i]
        try:
            ds = self._dataset(i)
            array = np.asarray(ds[()])
            if array.dtype != ds.dtype or array.shape != header.shape:
                raise BadAttribute(f"read back as {array.dtype} {array.shape}, expected {ds.dtype} {header.shape}")
            verify_crc(ds, array, "its data")
        except Exception as e:
            raise DumpError(self.path, f"cannot read tap {header.key!r}: {describe_error(e)}") from None
        return array

    def read_rows(self, key_or_index: str | int, start: int, stop: int) -> np.ndarray:
        """Rows [start, stop) along axis 0 of a tap (of at least one dimension)."""
        i = self._resolve(key_or_index)
        header = self.headers[i]
        try:
            if not header.shape:
                raise BadAttribute("a 0-d tap has no rows")
            ds = self._dataset(i)
            chunk = np.asarray(ds[start:stop])
        except Exception as e:
            raise DumpError(self.path, f"cannot read tap {header.key!r}: {describe_error(e)}") from None
        # The checksum covers the whole array: rows read in order from the first are
        # checked once the last one is read; any other pattern is checked by `verify`.
        at, crc = self._row_crc.get(i, (0, 0))
        if start == at and i not in self._verified:
            at, crc = start + chunk.shape[0], array_crc32(chunk, crc)
            self._row_crc[i] = (at, crc)
            if at >= header.shape[0]:
                del self._row_crc[i]
                want = stored_crc(ds)
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
                raise BadAttribute("a 0-d tap has no flat range")
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
            want = stored_crc(self._dataset(i)) if tracking and stop >= size else None
        except Exception as e:
            raise DumpError(self.path, f"cannot read tap {header.key!r}: {describe_error(e)}") from None
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
            crc = array_crc32(data, self._flat_crc.get(i, 0))
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
            raise DumpError(self.path, f"cannot read tap {header.key!r}: {describe_error(e)}") from None
        crc = 0
        for start in range(0, header.shape[0], rows):
            try:
                chunk = np.asarray(ds[start : start + rows])
            except Exception as e:
                raise DumpError(self.path, f"cannot read tap {header.key!r}: {describe_error(e)}") from None
            crc = array_crc32(chunk, crc)
            yield chunk
        want = stored_crc(ds)
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


def dump_notes(path: str | os.PathLike) -> list[str]:
    """What a user should know about the (tensor or stats) dump at `path` that does not
    make it unreadable, as its reader's `notes` say it, without validating it again: a
    `<path>.partial` beside it, data stored without a checksum.  A light pass over the
    members' attributes (links never followed); never raises: a dump it cannot read gets
    no checksum note (its reader says what is wrong)."""
    path = os.fspath(path)
    notes = [stale_partial_note(path)]
    try:
        notes += _unchecked_notes(path)
    except Exception:  # noqa: BLE001 - the reader proper reports a bad dump
        pass
    return [note for note in notes if note]


def _unchecked_notes(path: str) -> list[str | None]:
    if not os.path.isfile(path):
        return []
    with h5py.File(path, "r", locking=False) as f:
        stats = member(f, "stats")
        if isinstance(stats, h5py.Group):
            names = [n for n in ("values", "checksums", "index") if not _has_crc(member(stats, n))]
            return [unchecked_note(path, "summary tables", [f"/stats/{n}" for n in names], 3)]
        taps, layouts = member(f, "taps"), member(f, "layouts")
        out = []
        if isinstance(taps, h5py.Group):
            # per tap, one attribute lookup by name (no Python object: ~0.06 ms a tap), links never followed
            names = list(taps.id)
            links = taps.id.links
            bare = [n for n in names if links.get_info(n).type == h5py.h5l.TYPE_HARD
                    and not h5py.h5a.exists(taps.id, b"crc32", obj_name=n)]
            out.append(unchecked_note(path, "taps", [_key(taps[n.decode()]) for n in bare], len(names)))
        if isinstance(layouts, h5py.Group):
            groups = [g for g in (member(layouts, n) for n in layouts) if isinstance(g, h5py.Group)]
            missing = [_key(g, "name") for g in groups if not _has_crc(member(g, "slots"))]
            out.append(unchecked_note(path, "layouts", missing, len(groups)))
        return out


def _has_crc(obj: Any) -> bool:
    return obj is None or "crc32" in obj.attrs


def _key(obj: Any, attr: str = "key") -> str:
    value = obj.attrs.get(attr, obj.name)
    return value.decode("utf-8", "replace") if isinstance(value, bytes) else str(value)


def read_meta(path: str | os.PathLike) -> dict | None:
    """A (tensor or stats) dump's `meta`, from its root attribute alone; None if it cannot
    be read (the reader proper then says why).  For checks a request makes before reading
    the dump (the model dtypes both runs declare)."""
    try:
        if not os.path.isfile(path):
            return None
        with h5py.File(os.fspath(path), "r", locking=False) as f:
            meta = json_attr(f, "meta")
    except Exception:  # noqa: BLE001 - unreadable: the reader says why
        return None
    return meta if isinstance(meta, dict) else None
