"""Property-based fuzzing of the dump reader and the diff engine (hypothesis).

What may escape: DumpError from the reader (one line, naming the file), nothing at all
from the diff engine; metrics are always defined.  A mutated dump either fails to read
or reads back bit-identical to what was written: it is never silently different.

The suite runs a bounded number of examples (PARITY_FUZZ_EXAMPLES, default 200, per
property) and a strided byte sweep (PARITY_FUZZ_STRIDE, default 53); `tools/fuzz.py`
runs the long campaign whose figures the README records.
"""
from __future__ import annotations

import io
import json
import math
import os
from pathlib import Path

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from rich.console import Console

from parity.comparison.loop import diff
from parity.comparison.rules import Thresholds
from parity.dump.format import DumpError
from parity.dump.reader import open_dump, read_dump
from parity.dump.writer import write_dump
from parity.report.terminal.diff import render_report
from parity.taps.codec import STORAGE_DTYPES
from parity.taps.records import Capture, CaptureError, Layout, Region, Tap, TapInfo

# A warning from the library (numpy's "invalid value" on a NaN pattern, ...) fails the run too.
pytestmark = pytest.mark.filterwarnings("error::RuntimeWarning")

EXAMPLES = int(os.environ.get("PARITY_FUZZ_EXAMPLES", "200"))
STRIDE = int(os.environ.get("PARITY_FUZZ_STRIDE", "53"))
TALLY = os.environ.get("PARITY_FUZZ_TALLY")  # tools/fuzz.py: one line per input tried, with its outcome
FUZZ = settings(max_examples=EXAMPLES, deadline=None, derandomize=EXAMPLES <= 500,
                suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large,
                                       HealthCheck.function_scoped_fixture, HealthCheck.large_base_example])

UNKNOWN_DTYPES = {"complex64": np.dtype(np.complex64), "float4_e2m1fn_x2": np.dtype(np.uint8)}
DTYPES = sorted(STORAGE_DTYPES) + sorted(UNKNOWN_DTYPES)
SPECIALS = [0.0, -0.0, 1.0, -1.0, np.nan, np.inf, -np.inf, 5e-324, 1e-310, 6e-8, 65504.0, 70000.0, 3e38, 1.7e308]


# --------------------------------------------------------------------------- strategies

# Any text HDF5 can hold as UTF-8: no NUL, no lone surrogates; '/', '..', controls, emoji welcome.
text = st.text(st.characters(blacklist_categories=("Cs",), blacklist_characters="\x00"), max_size=10)
json_value = st.recursive(
    st.none() | st.booleans() | st.integers(-2**53, 2**53) | st.floats(allow_nan=False, allow_infinity=False) | text,
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(text, inner, max_size=4),
    max_leaves=12,
)


@st.composite
def arrays(draw, dtype: str, shape: tuple[int, ...]) -> np.ndarray:
    """An array in the storage dtype of `dtype`: random bit patterns (every NaN, Inf,
    subnormal of bf16/fp16/fp8 included), all zeros, or special values."""
    store = STORAGE_DTYPES.get(dtype, UNKNOWN_DTYPES.get(dtype))
    size = int(np.prod(shape, dtype=np.int64))
    kind = draw(st.sampled_from(["bits", "bits", "zeros", "specials"]))
    if kind == "zeros" or size == 0:
        return np.zeros(shape, store)
    if kind == "specials" and store.kind == "f":
        with np.errstate(over="ignore"):
            values = np.array(draw(st.lists(st.sampled_from(SPECIALS), min_size=size, max_size=size)))
            return values.astype(store).reshape(shape)
    raw = draw(st.binary(min_size=size * store.itemsize, max_size=size * store.itemsize))
    if store == np.bool_:
        return (np.frombuffer(raw, np.uint8) & 1).astype(np.bool_).reshape(shape)
    return np.frombuffer(raw, store).reshape(shape).copy()


@st.composite
def layouts(draw) -> Layout:
    rows, slots_per_row, length = draw(st.integers(1, 3)), draw(st.integers(1, 4)), draw(st.integers(1, 6))
    n = rows * slots_per_row
    canonical = draw(st.permutations(range(max(n, rows * length))))[:n]
    keep = draw(st.lists(st.booleans(), min_size=n, max_size=n))
    slots = np.array([c if k else -1 for c, k in zip(canonical, keep)], np.int64).reshape(rows, slots_per_row)
    start = draw(st.integers(0, length))
    regions = (Region(draw(text), start, draw(st.integers(start, length))),) if draw(st.booleans()) else ()
    return Layout(slots, length, regions)


@st.composite
def taps(draw, order: int, layout_names: list[str], key_info: TapInfo | None = None) -> Tap:
    info = key_info or TapInfo(draw(text.filter(bool)), draw(text), draw(st.none() | st.integers(0, 40)), draw(text),
                               draw(st.none() | st.integers(0, 9)))
    dtype = draw(st.sampled_from(DTYPES))
    layout = draw(st.none() | st.sampled_from(layout_names + ["no-such-layout"])) if layout_names else None
    shape = tuple(draw(st.lists(st.integers(0, 4), max_size=3)))
    if layout is not None and draw(st.booleans()):
        shape = tuple(draw(st.lists(st.integers(1, 4), min_size=2, max_size=4)))  # may or may not fit
    return Tap(info, order, draw(arrays(dtype, shape)), dtype, layout)


@st.composite
def captures(draw) -> Capture:
    lays = draw(st.dictionaries(text.filter(bool), layouts(), max_size=2))
    count = draw(st.integers(0, 6))
    out, keys = [], set()
    for _ in range(count):
        t = draw(taps(len(out), list(lays)))
        if t.key not in keys:
            keys.add(t.key)
            out.append(t)
    error = None
    if draw(st.integers(0, 4)) == 0:
        info = out[-1].info if out and draw(st.booleans()) else None
        error = CaptureError(info.key if info else None, info, draw(text), draw(text))
    return Capture(out, lays, draw(st.dictionaries(text, json_value, max_size=4)), error, draw(st.booleans()))


@st.composite
def candidate_of(draw, ref: Capture) -> Capture:
    """A candidate built from `ref`: taps kept, dropped, altered (values, dtype, shape,
    layout) or added, so that pairs share keys as real runs do."""
    lays = dict(ref.layouts)
    if draw(st.booleans()):
        lays.update(draw(st.dictionaries(text.filter(bool), layouts(), max_size=1)))
    out = []
    for t in ref.taps:
        action = draw(st.sampled_from(["same", "same", "values", "retype", "drop", "relayout"]))
        if action == "drop":
            continue
        if action == "same":
            out.append(Tap(t.info, len(out), t.array.copy(), t.dtype, t.layout))
        elif action == "values":
            out.append(Tap(t.info, len(out), draw(arrays(t.dtype, t.array.shape)), t.dtype, t.layout))
        elif action == "retype":
            out.append(draw(taps(len(out), list(lays), key_info=t.info)))
        else:
            layout = draw(st.none() | st.sampled_from(list(lays) + ["no-such-layout"])) if lays else None
            out.append(Tap(t.info, len(out), t.array.copy(), t.dtype, layout))
    keys = {t.key for t in out}
    for extra in draw(st.lists(taps(0, list(lays)), max_size=2)):
        if extra.key not in keys:
            keys.add(extra.key)
            out.append(Tap(extra.info, len(out), extra.array, extra.dtype, extra.layout))
    error = None
    if draw(st.integers(0, 5)) == 0:
        key = draw(st.sampled_from([t.key for t in ref.taps])) if ref.taps else None
        error = CaptureError(key, None, "RuntimeError", draw(text))
    return Capture(out, lays, dict(ref.meta), error, draw(st.booleans()))


def mutate(data: bytes, draw) -> bytes:
    """One random damage to a file: flipped bytes, a cut, a zeroed or random span, a
    duplicated span, bytes inserted or appended."""
    buf = bytearray(data)
    n = len(buf)
    kind = draw(st.sampled_from(["flip", "flip", "flip-head", "cut", "zero", "random", "dup", "insert", "append"]))
    pos = draw(st.integers(0, n - 1))
    if kind in ("flip", "flip-head"):
        hi = min(n, 4096) if kind == "flip-head" else n
        for p in draw(st.lists(st.integers(0, hi - 1), min_size=1, max_size=8)):
            buf[p] ^= draw(st.integers(1, 255))
    elif kind == "cut":
        del buf[pos:]
    elif kind in ("zero", "random"):
        span = draw(st.integers(1, 64))
        filler = bytes(span) if kind == "zero" else draw(st.binary(min_size=span, max_size=span))
        buf[pos : pos + span] = filler[: len(buf[pos : pos + span])]
    elif kind == "dup":
        span = draw(st.integers(1, 256))
        buf[pos:pos] = buf[max(0, pos - span) : pos]
    elif kind == "insert":
        buf[pos:pos] = draw(st.binary(min_size=1, max_size=16))
    else:
        buf += draw(st.binary(min_size=1, max_size=64))
    return bytes(buf)


# --------------------------------------------------------------------------- checks

def tally(prop: str, outcome: str) -> None:
    """Count an input for the long campaign's figures (no-op in the normal suite)."""
    if TALLY:
        with open(TALLY, "a", encoding="utf-8") as f:
            f.write(f"{prop} {outcome}\n")


def assert_same_capture(got: Capture, want: Capture) -> None:
    assert (got.meta, got.complete, got.error) == (want.meta, want.complete, want.error)
    assert got.layouts.keys() == want.layouts.keys()
    for name, layout in want.layouts.items():
        assert (got.layouts[name].length, got.layouts[name].regions) == (layout.length, layout.regions)
        assert np.array_equal(got.layouts[name].slots, layout.slots)
    assert [(t.info, t.order, t.dtype, t.layout) for t in got.taps] == [(t.info, t.order, t.dtype, t.layout)
                                                                         for t in want.taps]
    for a, b in zip(got.taps, want.taps):
        assert (a.array.dtype, a.array.shape, a.array.tobytes()) == (b.array.dtype, b.array.shape, b.array.tobytes())


def read_all(path: Path) -> Capture:
    """Read a dump every way the tools do: whole, and tap by tap in chunks."""
    cap = read_dump(path)
    with open_dump(path) as reader:
        for h in reader.headers:
            for _ in reader.read_chunks(h.key, 2):
                pass
    return cap


def check_report(report, ref: Capture, cand: Capture) -> None:
    """The invariants of every report: every tap accounted for once, a pass is a real
    pass, metrics defined, JSON and rendering never fail."""
    ref_keys, cand_keys = {t.key for t in ref.taps}, {t.key for t in cand.taps}
    assert sorted(r.key for r in report.rows) == sorted(ref_keys | cand_keys)
    for row in report.rows:
        m = row.metrics
        if m is not None:
            assert math.isnan(m.cos) or -1.0 <= m.cos <= 1.0
            if m.n and m.finite:  # something finite on both sides was compared
                assert not any(math.isnan(v) for v in (m.cos, m.max_abs, m.mean_abs, m.rel_l2))
        if row.passed:
            assert m is not None and m.n > 0 and m.finite and m.cos >= row.threshold
            assert row.ref_dtype == row.cand_dtype
    if report.passed:
        assert report.rows and ref_keys == cand_keys and ref.complete and cand.complete
        assert ref.error is None and cand.error is None
    json.dumps(report.to_dict(), allow_nan=False)
    out = io.StringIO()
    Console(file=out, width=100, color_system=None).print(render_report(report, show_all=True))
    assert "\x1b" not in out.getvalue()


# --------------------------------------------------------------------------- properties

@FUZZ
@given(cap=captures(), compression=st.sampled_from([None, "gzip", "lzf"]))
def test_random_dumps_round_trip_bit_exact(tmp_path_factory, cap, compression):
    path = tmp_path_factory.mktemp("rt") / "x.h5"
    write_dump(path, cap, compression=compression)
    assert_same_capture(read_all(path), cap)
    tally("round-trip", "identical")


@FUZZ
@given(cap=captures(), compression=st.sampled_from([None, "gzip"]), data=st.data())
def test_mutated_dumps_fail_cleanly_or_read_identical(tmp_path_factory, cap, compression, data):
    folder = tmp_path_factory.mktemp("mut")
    write_dump(folder / "x.h5", cap, compression=compression)
    bad = folder / "bad.h5"
    bad.write_bytes(mutate((folder / "x.h5").read_bytes(), data.draw))
    try:
        got = read_all(bad)
    except DumpError as exc:
        assert str(exc).startswith(f"{bad}: ") and "\n" not in str(exc)
        tally("mutated-dump", "dump-error")
        return
    assert_same_capture(got, cap)
    tally("mutated-dump", "identical")


@FUZZ
@given(data=st.data(), thresholds=st.builds(Thresholds, st.floats(0, 1),
                                            st.lists(st.tuples(st.sampled_from(["*", "*.x", "?*"]),
                                                               st.floats(0, 1)), max_size=2).map(tuple)))
def test_diff_engine_never_raises_and_metrics_are_defined(data, thresholds):
    ref = data.draw(captures())
    cand = data.draw(candidate_of(ref))
    check_report(diff(ref, cand, thresholds), ref, cand)
    check_report(diff(cand, ref, thresholds), cand, ref)
    tally("diff-engine", "ok")
    tally("diff-engine", "ok")


@FUZZ
@given(data=st.data())
def test_diff_of_dumps_equals_diff_in_memory(tmp_path_factory, data):
    from parity.api import compare_captures

    ref = data.draw(captures())
    cand = data.draw(candidate_of(ref))
    folder = tmp_path_factory.mktemp("dd")
    write_dump(folder / "ref.h5", ref)
    write_dump(folder / "cand.h5", cand)
    on_disk = compare_captures(read_dump(folder / "ref.h5"), read_dump(folder / "cand.h5"))
    in_memory = compare_captures(ref, cand)
    assert [(r.key, r.status, r.reason) for r in on_disk.rows] == [(r.key, r.status, r.reason) for r in in_memory.rows]
    assert on_disk.passed == in_memory.passed
    tally("diff-of-dumps", "ok")


# --------------------------------------------------------------------------- deterministic sweep

@pytest.fixture(scope="module")
def sweep_dump(tmp_path_factory) -> tuple[Path, Capture]:
    rng = np.random.default_rng(3)
    cap = Capture(
        taps=[
            Tap(TapInfo("blk.0.k", "blk", 0, "k"), 0, rng.standard_normal((2, 4, 8)).astype(np.float32), "float32",
                "pad"),
            Tap(TapInfo("blk.0.v", "blk", 0, "v", 1), 1, rng.integers(0, 1 << 16, (16, 9)).astype(np.uint16),
                "bfloat16"),
            Tap(TapInfo("a/../ü", "..", None, "/"), 2, np.arange(256, dtype=np.uint8).reshape(16, 16),
                "float8_e5m2"),
            Tap(TapInfo("s", "s", None, "s"), 3, np.array(2.5), "float64"),
        ],
        layouts={"pad": Layout(np.array([[0, 1, 2, -1], [4, 5, -1, -1]]), 4, (Region("text", 0, 2),))},
        meta={"backend": "sweep", "nested": {"x": [1, 2.5, None]}},
        error=CaptureError("blk.0.v@1", TapInfo("blk.0.v", "blk", 0, "v", 1), "RuntimeError", "boom"),
    )
    path = tmp_path_factory.mktemp("sweep") / "x.h5"
    write_dump(path, cap)
    return path, cap


def test_byte_sweep_cuts_and_flips(sweep_dump, tmp_path):
    """Every STRIDE-th offset: the file cut there, and that byte flipped."""
    path, cap = sweep_dump
    data = path.read_bytes()
    bad = tmp_path / "bad.h5"
    tried = 0
    for off in range(0, len(data), STRIDE):
        for damaged in (data[:off], data[:off] + bytes([data[off] ^ 0xFF]) + data[off + 1:]):
            bad.write_bytes(damaged)
            tried += 1
            try:
                got = read_all(bad)
            except DumpError as exc:
                assert str(exc).startswith(f"{bad}: ") and "\n" not in str(exc)
                tally("byte-sweep", "dump-error")
                continue
            assert len(damaged) == len(data)  # a cut file never reads
            assert_same_capture(got, cap)
            tally("byte-sweep", "identical")
    assert tried >= 2 * (len(data) // STRIDE)
