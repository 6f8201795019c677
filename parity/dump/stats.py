"""The stats dump: one HDF5 file of per-tap summaries (h5py + numpy, no torch).

Format (format "parity-stats", format_version 1)::

    /                  attrs: format="parity-stats", format_version=1, complete (bool, written LAST),
                              meta (JSON, as a tensor dump's), tap_count (int, at close)
    /stats/values      float64 [taps, fields]: one row per tap in execution order; attrs fields (JSON list
                       of the column names, parity.taps.stats.FIELDS), crc32
    /stats/checksums   int64 [taps]: each tap's bit checksum (parity.capture.stats.checksum); attr crc32
    /stats/index       uint8 [bytes]: UTF-8 JSON list, per tap {key, name, stack, layer, component, step,
                       order, dtype, layout, shape, summarised_shape, tokens, positions}; attr crc32
    /error             optional, as in a tensor dump: where the backend raised
    /layouts, /taps    present and empty (made by the shared writer)

It is written by the tensor dump's own writer (`DumpWriter`: exclusive `<path>.partial`,
discarded on an I/O error, `complete` written last, renamed at close) and read through
the tensor dump's reader (`DumpReader`: the same checks of the file, its attributes and
checksums).  A stats dump says so in its `format` attribute, so every reader of tensors
refuses it with one line naming what to do instead, and this reader refuses a tensor dump.
The summaries are written when the run ends (they are small): a killed stats capture
leaves a `.partial` file without them.
"""

from __future__ import annotations

import json
import os
from typing import Any

import h5py
import numpy as np

from parity.dump.format import (
    IO_ERRORS,
    PARTIAL_SUFFIX,
    STATS_FORMAT_NAME,
    BadAttribute,
    DumpError,
    array_crc32,
    bool_attr,
    check_declared_size,
    check_format,
    check_stored_inside,
    info_attrs,
    json_attr,
    member,
    set_attrs,
    unchecked_note,
    verify_crc,
)
from parity.dump.reader import DumpReader
from parity.dump.writer import DumpWriter
from parity.taps.records import TapInfo
from parity.taps.stats import FIELDS, TOKENS_ALL, TOKENS_VALID, StatsCapture, TapStats

STATS_FORMAT_VERSION = 1


class StatsWriter(DumpWriter):
    """Writes one StatsCapture as a stats dump (the DumpWriter's safe write, another format)."""

    format_name, format_version = STATS_FORMAT_NAME, STATS_FORMAT_VERSION

    def add_tap(self, tap, flush: bool = True) -> None:
        raise TypeError("a stats dump holds summaries, not tensors: use write_stats")

    def write(self, stats: StatsCapture) -> None:
        """The summaries, the error if any, then close (complete only if the run was)."""
        tables = _tables(stats)
        f = self._live()
        try:
            group = f.create_group("stats")
            for name, data in tables.items():
                ds = group.create_dataset(name, data=data)
                extra = {"fields": json.dumps(list(FIELDS))} if name == "values" else {}
                set_attrs(ds, {**extra, "crc32": array_crc32(data)})
            f.flush()
        except IO_ERRORS as e:
            self._fail(e)
        self._tap_count = len(stats.taps)
        if stats.error is not None:
            self.set_error(stats.error)
        self.close(complete=stats.complete)


def _tables(stats: StatsCapture) -> dict[str, np.ndarray]:
    """The three /stats datasets of a run; ValueError for what a dump cannot hold."""
    index = [_entry_dict(t) for t in stats.taps]
    if len({e["key"] for e in index}) != len(index):
        raise ValueError("duplicate tap keys: give repeated taps distinct steps")
    values = np.ascontiguousarray(np.stack([t.values for t in stats.taps]) if stats.taps
                                  else np.zeros((0, len(FIELDS))), dtype=np.float64)
    if values.shape[1] != len(FIELDS):
        raise ValueError(f"summaries have {values.shape[1]} fields, expected {len(FIELDS)}")
    checksums = np.array([t.checksum for t in stats.taps], dtype=np.int64)
    raw = np.frombuffer(json.dumps(index, allow_nan=False).encode("utf-8"), dtype=np.uint8)
    return {"values": values, "checksums": checksums, "index": raw}


def _entry_dict(t: TapStats) -> dict[str, Any]:
    attrs = info_attrs(t.info)  # validates names and indices as a tensor dump does
    return {"key": t.key, **attrs, "order": int(t.order), "dtype": t.dtype, "layout": t.layout or "",
            "shape": list(t.shape), "summarised_shape": list(t.summarised_shape), "tokens": t.tokens,
            "positions": t.positions}


def write_stats(path: str | os.PathLike, stats: StatsCapture) -> str:
    """Write a stats dump (via `<path>.partial`); the path written (`<path>.incomplete` for
    an incomplete run when `path` exists).  DumpError on an I/O error, ValueError on bad input."""
    _tables(stats)  # refuse bad input before a file exists
    writer = StatsWriter(path, stats.meta)
    try:
        writer.write(stats)
    except BaseException:
        writer.close(complete=False)
        raise
    return writer.final_path


class StatsReader(DumpReader):
    """An open, validated stats dump: `meta`, `complete`, `error`, `notes`, `stats` (StatsCapture).

    The tensor reader's file checks and lifetime; it holds no tensors to load."""

    def _parse(self) -> None:
        f = self._file
        check_format(f, STATS_FORMAT_NAME, STATS_FORMAT_VERSION)
        self.meta = json_attr(f, "meta")
        if not isinstance(self.meta, dict):
            raise BadAttribute("meta attribute must be a JSON object")
        self.complete = bool_attr(f, "complete") and not self.path.endswith(PARTIAL_SUFFIX)
        self.headers, self._datasets, self._index = [], [], {}
        error = member(f, "error")
        self.error = None if error is None else self._read_error(error)
        if self.error is not None:
            self.complete = False
        group = member(f, "stats")
        if group is None:
            if bool_attr(f, "complete"):
                raise BadAttribute("marked complete but holds no /stats")
            self.notes.append("the capture stopped before its summaries were written")
            self.stats = StatsCapture(meta=self.meta, error=self.error, complete=False)
            return
        if not isinstance(group, h5py.Group):
            raise BadAttribute("/stats is not a group")
        file_size = os.path.getsize(self.path)
        values = _table(group, "values", np.float64, 2, file_size)
        fields = json_attr(member(group, "values"), "fields")
        if fields != list(FIELDS):
            raise BadAttribute(f"summary fields {fields!r} are not the ones this parity reads ({list(FIELDS)})")
        if values.shape[1] != len(FIELDS):
            raise BadAttribute(f"/stats/values has {values.shape[1]} columns, expected {len(FIELDS)}")
        checksums = _table(group, "checksums", np.int64, 1, file_size)
        raw = _table(group, "index", np.uint8, 1, file_size)
        unchecked = [f"/stats/{n}" for n in ("values", "checksums", "index") if "crc32" not in group[n].attrs]
        note = unchecked_note(self.path, "summary tables", unchecked, 3)
        if note:
            self.notes.append(note)
        try:
            index = json.loads(raw.tobytes().decode("utf-8"), parse_constant=_no_constant)
        except (ValueError, UnicodeDecodeError, RecursionError) as e:
            raise BadAttribute(f"/stats/index is not valid JSON ({e})") from None
        if not isinstance(index, list):
            raise BadAttribute("/stats/index must be a JSON list")
        if not len(index) == values.shape[0] == checksums.shape[0]:
            raise BadAttribute(f"/stats tables disagree: {len(index)} index entries, {values.shape[0]} summary rows, "
                       f"{checksums.shape[0]} checksums")
        if "tap_count" in f.attrs:
            count = f.attrs["tap_count"]
            if isinstance(count, (bool, np.bool_)) or not isinstance(count, (int, np.integer)) \
                    or int(count) != len(index):
                raise BadAttribute(f"holds {len(index)} taps but tap_count says {count!r} (truncated?)")
        elif bool_attr(f, "complete"):
            raise BadAttribute("marked complete but lacks attribute 'tap_count'")
        taps = [_entry(e, i, values[i], int(checksums[i])) for i, e in enumerate(index)]
        keys = [t.key for t in taps]
        if len(set(keys)) != len(keys):
            raise BadAttribute("a tap key appears twice")
        self.stats = StatsCapture(taps=taps, meta=self.meta, error=self.error, complete=self.complete)

    def _no_tensors(self, *args, **kwargs):
        raise DumpError(self.path, "a stats dump holds summaries, not tensors")

    load = read_rows = read_chunks = verify = _no_tensors


def _no_constant(token: str) -> Any:
    raise ValueError(f"{token} is not JSON")


def _table(group: Any, name: str, dtype, ndim: int, file_size: int) -> np.ndarray:
    ds = member(group, name)
    if not isinstance(ds, h5py.Dataset):
        raise BadAttribute(f"/stats/{name} is missing")
    check_stored_inside(ds)
    if ds.dtype != np.dtype(dtype) or ds.shape is None or len(ds.shape) != ndim:
        raise BadAttribute(f"/stats/{name} must be {ndim}-D {np.dtype(dtype)}, got {ds.dtype} {ds.shape}")
    check_declared_size(ds, file_size, f"/stats/{name}")
    array = np.asarray(ds[()])
    verify_crc(ds, array, f"/stats/{name}")
    return array


def _entry(e: Any, i: int, values: np.ndarray, checksum: int) -> TapStats:
    """One /stats/index entry, checked field by field (BadAttribute names what is wrong)."""
    def need(name, kinds, ok=lambda v: True):
        if not isinstance(e, dict) or name not in e:
            raise BadAttribute(f"/stats/index entry {i} lacks {name!r}")
        v = e[name]
        if not isinstance(v, kinds) or (isinstance(v, bool) and bool not in kinds) or not ok(v):
            raise BadAttribute(f"/stats/index entry {i}: bad {name} {v!r}")
        return v

    def dims(name):
        return tuple(need(name, list, lambda v: all(isinstance(d, int) and not isinstance(d, bool) and d >= 0
                                                    for d in v)))

    layer, step = need("layer", (int,), lambda v: v >= -1), need("step", (int,), lambda v: v >= -1)
    info = TapInfo(need("name", (str,), bool), need("stack", (str,)), None if layer == -1 else layer,
                   need("component", (str,)), None if step == -1 else step)
    if need("key", (str,)) != info.key:
        raise BadAttribute(f"/stats/index entry {i}: key {e['key']!r} does not match name/step ({info.key!r})")
    return TapStats(info=info, order=need("order", (int,), lambda v: v >= 0), dtype=need("dtype", (str,), bool),
                    layout=need("layout", (str,)) or None, shape=dims("shape"),
                    summarised_shape=dims("summarised_shape"),
                    tokens=need("tokens", (str,), lambda v: v in (TOKENS_VALID, TOKENS_ALL)),
                    positions=need("positions", (str,)), values=np.array(values, dtype=np.float64),
                    checksum=checksum)


def open_stats(path: str | os.PathLike) -> StatsReader:
    """Open and validate a stats dump (a context manager); DumpError if it is bad."""
    return StatsReader(path)


def read_stats(path: str | os.PathLike) -> StatsCapture:
    with open_stats(path) as reader:
        return reader.stats


def is_stats_dump(path: str | os.PathLike) -> bool:
    """Whether `path` is an HDF5 file whose root says it is a stats dump (never raises)."""
    try:
        if not os.path.isfile(path) or not h5py.is_hdf5(os.fspath(path)):  # a FIFO is never opened
            return False
        with h5py.File(os.fspath(path), "r", locking=False) as f:
            fmt = f.attrs.get("format")
    except Exception:  # noqa: BLE001 - unreadable: not a stats dump; the real reader says why
        return False
    if isinstance(fmt, bytes):
        fmt = fmt.decode("utf-8", "replace")
    return fmt == STATS_FORMAT_NAME
