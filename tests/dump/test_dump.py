"""The HDF5 dump: bit-exact round trip, crash safety, and DumpError for every bad file."""
from __future__ import annotations

import os
import shutil
import subprocess
import sys
import textwrap
import zlib
from pathlib import Path

import h5py
import numpy as np
import pytest

import parity.dump.writer
from parity.dump.format import DumpError
from parity.dump.reader import TapHeader, open_dump, read_dump
from parity.dump.writer import DumpWriter, write_dump
from parity.taps.records import Capture, CaptureError, Layout, Region, Tap, TapInfo

REPO_ROOT = str(Path(parity.dump.writer.__file__).resolve().parents[2])


# ----------------------------------------------------------------------------- fixtures


def make_capture(complete: bool = True, with_error: bool = True) -> Capture:
    rng = np.random.default_rng(0)
    layouts = {
        "padded": Layout(
            slots=np.array([[0, 1, 2, -1], [4, 5, -1, -1]], dtype=np.int64),
            length=4,
            regions=(Region("prefix", 0, 2), Region("suffix", 2, 4)),
        ),
        "packed": Layout(slots=np.array([[0, 1, 2, 4, 5]], dtype=np.int64), length=4),
    }
    specs = [
        # (name, stack, layer, component, step, array, dtype, layout)
        ("prefix.0.k", "prefix", 0, "k", None, rng.standard_normal((2, 4, 8)).astype(np.float32), "float32", "padded"),
        ("prefix.0.v", "prefix", 0, "v", None, rng.standard_normal((1, 5, 3)).astype(np.float16), "float16", "packed"),
        ("embed", "embed", None, "out", None,
         rng.integers(0, 1 << 16, size=(3, 7), dtype=np.uint64).astype(np.uint16), "bfloat16", None),
        ("suffix.1.attn", "suffix", 1, "attn", 0, np.arange(256, dtype=np.uint8).reshape(16, 16), "float8_e4m3fn",
         None),
        ("suffix.1.attn", "suffix", 1, "attn", 1, np.arange(256, dtype=np.uint8)[::-1].reshape(16, 16).copy(),
         "float8_e5m2", None),
        ("ids", "input", None, "ids", None, np.array([[1, -2, 3]], dtype=np.int64), "int64", None),
        ("i32", "input", None, "x", None, np.array([7, -7], dtype=np.int32), "int32", None),
        ("i16", "input", None, "x", None, np.array([300, -300], dtype=np.int16), "int16", None),
        ("i8", "input", None, "x", None, np.array([-128, 127], dtype=np.int8), "int8", None),
        ("u8", "input", None, "x", None, np.array([0, 255], dtype=np.uint8), "uint8", None),
        ("mask", "input", None, "mask", None, np.array([[True, False], [False, True]]), "bool", None),
        ("scalar", "head", None, "loss", None, np.array(np.pi), "float64", None),
        ("empty", "head", None, "none", None, np.zeros((0, 3), np.float32), "float32", None),
        ("a/b/c", "we/ird", 2, "x/y", None, np.ones(3, np.float32), "float32", None),
        ("../..", "..", 3, ".", None, np.full(2, np.nan, np.float32), "float32", None),
        ("ünïcødé.日本.🙂", "스택", 4, "компонент", 7, np.array([-0.0, np.inf], np.float32), "float32", None),
    ]
    taps = [
        Tap(TapInfo(name, stack, layer, comp, step), order=i, array=arr, dtype=dtype, layout=lay)
        for i, (name, stack, layer, comp, step, arr, dtype, lay) in enumerate(specs)
    ]
    error = None
    if with_error:
        error = CaptureError(
            key="suffix.1.attn@1",
            info=TapInfo("suffix.1.attn", "suffix", 1, "attn", 1),
            exc_type="RuntimeError",
            message="shape mismatch: [2, 3] vs [3, 2]\nsecond line",
        )
    meta = {
        "backend": "eager",
        "model": {"name": "pi05",
                  "config": {"layers": [1, 2, 3], "scale": 1.5, "none": None, "deep": {"a": {"b": "ü"}}}},
        "flags": [True, False],
    }
    return Capture(taps=taps, layouts=layouts, meta=meta, error=error, complete=complete)


def assert_same_capture(got: Capture, want: Capture) -> None:
    assert got.meta == want.meta
    assert got.complete == want.complete
    assert got.error == want.error
    assert set(got.layouts) == set(want.layouts)
    for name, layout in want.layouts.items():
        other = got.layouts[name]
        assert other.length == layout.length and other.regions == layout.regions
        assert other.slots.dtype == np.int64 and np.array_equal(other.slots, layout.slots)
    assert len(got.taps) == len(want.taps)
    for a, b in zip(got.taps, want.taps):
        assert a.info == b.info and a.key == b.key
        assert a.order == b.order and a.dtype == b.dtype and a.layout == b.layout
        assert a.array.dtype == b.array.dtype and a.array.shape == b.array.shape
        assert a.array.tobytes() == b.array.tobytes()  # bit-exact, NaN payloads included


def tamper(path: Path, fn) -> None:
    with h5py.File(path, "r+") as f:
        fn(f)


@pytest.fixture
def dump_path(tmp_path: Path) -> Path:
    """A complete dump (no error: a run that raised is never complete)."""
    path = tmp_path / "run.h5"
    write_dump(path, make_capture(with_error=False))
    return path


@pytest.fixture
def raised_dump_path(tmp_path: Path) -> Path:
    """The dump of a run that raised: it has an /error group and reads as incomplete."""
    path = tmp_path / "raised.h5"
    write_dump(path, make_capture())
    return path


# ----------------------------------------------------------------------------- round trip


@pytest.mark.parametrize("compression", [None, "gzip", "lzf"])
def test_round_trip_is_bit_exact(tmp_path, compression):
    cap = make_capture()
    path = tmp_path / "x.h5"
    write_dump(path, cap, compression=compression)
    assert not (tmp_path / "x.h5.partial").exists()
    assert_same_capture(read_dump(path), cap)


def test_a_run_that_raised_is_never_complete(tmp_path, raised_dump_path):
    assert make_capture().complete is False  # Capture: error forces complete=False
    assert read_dump(raised_dump_path).complete is False
    with DumpWriter(tmp_path / "x.h5", {}) as w:
        w.set_error(CaptureError(key=None, info=None, exc_type="RuntimeError", message="boom"))
        w.close(complete=True)  # asked complete, written incomplete
    with h5py.File(tmp_path / "x.h5", "r") as f:
        assert bool(f.attrs["complete"]) is False
    # a dump from another writer that says complete but holds an error reads incomplete too
    tamper(raised_dump_path, _set_attr("/", "complete", True))
    assert read_dump(raised_dump_path).complete is False


def test_round_trip_incomplete_without_error(tmp_path):
    cap = make_capture(complete=False, with_error=False)
    write_dump(tmp_path / "x.h5", cap)
    got = read_dump(tmp_path / "x.h5")
    assert got.complete is False and got.error is None
    assert_same_capture(got, cap)


def test_error_without_location(tmp_path):
    cap = Capture(error=CaptureError(key=None, info=None, exc_type="ValueError", message="outside"))
    write_dump(tmp_path / "x.h5", cap)
    assert read_dump(tmp_path / "x.h5").error == cap.error


def test_headers_and_random_access(dump_path):
    cap = make_capture()
    with open_dump(dump_path) as r:
        assert r.complete and r.meta == cap.meta
        assert [h.key for h in r.headers] == [t.key for t in cap.taps]
        h = r.headers[0]
        assert isinstance(h, TapHeader)
        assert (h.info, h.order, h.dtype, h.layout, h.shape) == (cap.taps[0].info, 0, "float32", "padded", (2, 4, 8))
        assert r.headers[2].info.layer is None and r.headers[4].key == "suffix.1.attn@1"
        assert np.array_equal(r.load("suffix.1.attn@0"), cap.taps[3].array)
        assert np.array_equal(r.load(4), cap.taps[4].array)
        assert r.load("scalar").shape == () and r.load("scalar") == np.pi
        with pytest.raises(DumpError, match="no tap with key"):
            r.load("nope")
        with pytest.raises(DumpError, match="no tap at index"):
            r.load(len(cap.taps))
        with pytest.raises(ValueError):
            r.load(1.5)


def test_read_chunks_streams_along_axis_0(tmp_path):
    big = np.arange(10 * 4, dtype=np.float32).reshape(10, 4)
    cap = Capture(taps=[Tap(TapInfo("t", "s", 0, "c"), 0, big, "float32"),
                        Tap(TapInfo("s", "s", 0, "c"), 1, np.array(2.0, np.float32), "float32")])
    write_dump(tmp_path / "x.h5", cap)
    with open_dump(tmp_path / "x.h5") as r:
        chunks = list(r.read_chunks("t", 3))
        assert [c.shape[0] for c in chunks] == [3, 3, 3, 1]
        assert np.array_equal(np.concatenate(chunks), big)
        assert [c.shape for c in r.read_chunks("s", 5)] == [()]
        with pytest.raises(ValueError):
            r.read_chunks("t", 0)
        with pytest.raises(DumpError):
            r.read_chunks("missing", 1)


def test_partial_name_reads_as_incomplete(dump_path, tmp_path):
    partial = tmp_path / "other.h5.partial"
    shutil.copy(dump_path, partial)
    with open_dump(partial) as r:
        assert r.complete is False and len(r.headers) == len(make_capture().taps)


# ----------------------------------------------------------------------------- writer lifecycle


def test_concurrent_writer_refused(tmp_path):
    path = tmp_path / "x.h5"
    first = DumpWriter(path, {})
    with pytest.raises(DumpError, match="being written by another capture") as info:
        DumpWriter(path, {})
    assert str(info.value).startswith(str(path)) and "\n" not in str(info.value)
    first.close()
    with DumpWriter(path, {"second": True}):
        pass
    assert read_dump(path).meta == {"second": True}


def test_exception_inside_with_keeps_taps_and_marks_incomplete(tmp_path):
    path = tmp_path / "x.h5"
    cap = make_capture()
    with pytest.raises(RuntimeError, match="boom"), DumpWriter(path, cap.meta) as w:
        for name, layout in cap.layouts.items():
            w.add_layout(name, layout)
        w.add_tap(cap.taps[0])
        w.add_tap(cap.taps[1])
        raise RuntimeError("boom")
    assert path.exists() and not Path(str(path) + ".partial").exists()
    got = read_dump(path)
    assert got.complete is False
    assert_same_capture(got, Capture(cap.taps[:2], cap.layouts, cap.meta, None, complete=False))


def test_killed_writer_leaves_readable_partial(tmp_path):
    path = tmp_path / "x.h5"
    script = textwrap.dedent(
        f"""
        import os, sys
        import numpy as np
        sys.path.insert(0, {REPO_ROOT!r})
        from parity.dump.writer import DumpWriter
        from parity.taps.records import Tap, TapInfo
        w = DumpWriter({str(path)!r}, {{"run": 1}})
        for i in range(3):
            w.add_tap(Tap(TapInfo(f"t{{i}}", "s", i, "c"), i, np.full((4, 5), i, np.float32), "float32"))
        os._exit(0)
        """
    )
    proc = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    partial = Path(str(path) + ".partial")
    assert partial.exists() and not path.exists()
    with pytest.raises(DumpError, match=r"\.partial"):
        open_dump(path)  # points the user at the partial file
    with open_dump(partial) as r:
        assert r.complete is False and r.meta == {"run": 1}
        assert [h.key for h in r.headers] == ["t0", "t1", "t2"]
        for i in range(3):
            assert np.array_equal(r.load(i), np.full((4, 5), i, np.float32))
    # the stale partial blocks a new capture until removed, with a message that says so
    with pytest.raises(DumpError, match="killed"):
        DumpWriter(path, {})


def test_close_is_idempotent_and_writer_refuses_after(tmp_path):
    w = DumpWriter(tmp_path / "x.h5", {})
    w.close(complete=True)
    w.close(complete=False)
    assert read_dump(tmp_path / "x.h5").complete is True
    with pytest.raises(ValueError, match="closed"):
        w.add_tap(Tap(TapInfo("t", "s", 0, "c"), 0, np.zeros(2, np.float32), "float32"))


def test_bad_arguments_raise_value_error_and_writer_stays_usable(tmp_path):
    with pytest.raises(ValueError, match="compression"):
        DumpWriter(tmp_path / "a.h5", {}, compression="zstd")
    with pytest.raises(ValueError, match="JSON"):
        DumpWriter(tmp_path / "b.h5", {"x": object()})
    with pytest.raises(ValueError, match="JSON"):
        DumpWriter(tmp_path / "b.h5", {"x": float("nan")})  # strict JSON: NaN is not JSON
    assert not list(tmp_path.iterdir())  # nothing created for refused arguments

    info = TapInfo("t", "s", 0, "c")
    good = Tap(info, 0, np.zeros((1, 2, 3), np.float32), "float32")
    path = tmp_path / "x.h5"
    with DumpWriter(path, {}) as w:
        w.add_layout("L", Layout(np.array([[0, 1]]), length=2))
        bad = [
            Tap(info, 0, np.zeros(2, np.float32), "bfloat16"),  # storage mismatch
            Tap(info, 0, np.array(["a"]), "strings"),  # unknown dtype and not numeric
            Tap(info, 0, np.zeros(2, ">f4"), "float99"),  # unknown dtype, non-native byte order
            Tap(info, 0, np.zeros(2, np.float32), ""),  # empty dtype name
            Tap(info, 0, np.zeros((1, 2, 3), np.float32), "float32", layout=""),  # "" means None in the file
            Tap(TapInfo("t", "s", -1, "c"), 0, np.zeros(2, np.float32), "float32"),  # -1 means None
            Tap(TapInfo("t\x00", "s", 0, "c"), 0, np.zeros(2, np.float32), "float32"),  # NUL
            Tap(TapInfo("t\udcff", "s", 0, "c"), 0, np.zeros(2, np.float32), "float32"),  # not UTF-8
            Tap(info, -3, np.zeros(2, np.float32), "float32"),  # negative order
        ]
        for tap in bad:
            with pytest.raises(ValueError):
                w.add_tap(tap)
        with pytest.raises(ValueError):
            w.add_tap("not a tap")
        with pytest.raises(ValueError, match="already added"):
            w.add_layout("L", Layout(np.array([[0]]), length=1))
        with pytest.raises(ValueError):
            w.add_layout("", Layout(np.array([[0]]), length=1))
        w.add_tap(Tap(info, 0, good.array, "float32", layout="L"))
        with pytest.raises(ValueError, match="duplicate"):
            w.add_tap(good)
        with pytest.raises(ValueError):
            w.set_error("boom")
    got = read_dump(path)
    assert got.complete and [t.key for t in got.taps] == ["t"] and got.taps[0].layout == "L"


def test_unwritable_directory(tmp_path):
    with pytest.raises(DumpError, match="cannot create") as info:
        DumpWriter(tmp_path / "missing-dir" / "x.h5", {})
    assert str(info.value).startswith(str(tmp_path / "missing-dir" / "x.h5"))
    (tmp_path / "file").write_text("")
    with pytest.raises(DumpError):
        DumpWriter(tmp_path / "file" / "x.h5", {})
    with pytest.raises(DumpError):
        DumpWriter("/proc/parity-no-such-dir/x.h5", {})


@pytest.mark.skipif(os.name != "posix" or os.geteuid() == 0, reason="root ignores directory permissions")
def test_read_only_directory(tmp_path):
    ro = tmp_path / "ro"
    ro.mkdir()
    ro.chmod(0o500)
    try:
        with pytest.raises(DumpError, match="ermission"):
            DumpWriter(ro / "x.h5", {})
    finally:
        ro.chmod(0o700)


@pytest.mark.skipif(os.name != "posix", reason="uses RLIMIT_FSIZE")
def test_disk_full_raises_dump_error_and_removes_partial(tmp_path):
    """A write that fails mid-capture (here: file size limit, like a full disk)."""
    path = tmp_path / "x.h5"
    script = textwrap.dedent(
        f"""
        import os, resource, signal, sys
        import numpy as np
        sys.path.insert(0, {REPO_ROOT!r})
        from parity.dump.format import DumpError
        from parity.dump.writer import DumpWriter
        from parity.taps.records import Tap, TapInfo
        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)  # get EFBIG instead of being killed
        resource.setrlimit(resource.RLIMIT_FSIZE, (50_000, 50_000))
        try:
            with DumpWriter({str(path)!r}, {{}}) as w:
                for i in range(100):
                    w.add_tap(Tap(TapInfo(f"t{{i}}", "s", i, "c"), i, np.zeros(2000, np.float32), "float32"))
        except DumpError as e:
            print("DUMPERROR", e)
        """
    )
    proc = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr  # no crash while discarding the broken HDF5 file
    assert "DUMPERROR " + str(path) + ": write failed" in proc.stdout, proc.stdout + proc.stderr
    assert os.listdir(tmp_path) == []


# ----------------------------------------------------------------------------- bad files


def test_missing_file_directory_and_non_hdf5(tmp_path):
    with pytest.raises(DumpError, match="no such file"):
        open_dump(tmp_path / "nope.h5")
    with pytest.raises(DumpError, match="not a regular file"):
        open_dump(tmp_path)
    (tmp_path / "t.h5").write_text("hello, not hdf5")
    with pytest.raises(DumpError, match="not an HDF5 file") as info:
        read_dump(tmp_path / "t.h5")
    assert str(info.value).startswith(str(tmp_path / "t.h5") + ": ")
    (tmp_path / "empty.h5").write_bytes(b"")
    with pytest.raises(DumpError):
        read_dump(tmp_path / "empty.h5")


def test_other_hdf5_file_is_not_a_dump(tmp_path):
    with h5py.File(tmp_path / "o.h5", "w") as f:
        f["x"] = np.zeros(3)
    with pytest.raises(DumpError, match="not a parity dump"):
        read_dump(tmp_path / "o.h5")


def test_newer_version_refused_naming_version_1(dump_path):
    tamper(dump_path, lambda f: f.attrs.__setitem__("format_version", 2))
    with pytest.raises(DumpError, match="format_version 2 is not supported.*format_version 1"):
        read_dump(dump_path)


def _set_attr(obj: str, name: str, value):
    return lambda f: f[obj].attrs.__setitem__(name, value)


def _del_attr(obj: str, name: str):
    return lambda f: f[obj].attrs.__delitem__(name)


def _replace_tap_data(f, data, name="taps/000000"):
    attrs = dict(f[name].attrs)
    del f[name]
    f[name] = data
    for k, v in attrs.items():
        f[name].attrs[k] = v


def _edit_slots(f, index, value, name="layouts/0/slots"):
    """Edit a layout's slots and re-sign them: the reader's checks beyond the checksum."""
    f[name][index] = value
    f[name].attrs["crc32"] = zlib.crc32(np.ascontiguousarray(f[name][()]).view(np.uint8))


TAMPERS = {
    "version as string": (_set_attr("/", "format_version", "1"),
                          "format_version '1' is not supported.*reads format_version 1"),
    "version missing": (_del_attr("/", "format_version"), "format_version missing is not supported"),
    "tap data flipped": (lambda f: f["taps/000000"].__setitem__((0, 0, 0), 123.0), "does not match its checksum"),
    "slots data flipped": (lambda f: f["layouts/0/slots"].__setitem__((0, 0), 2), "does not match its checksum"),
    "crc as string": (_set_attr("taps/000002", "crc32", "0"), "must be an integer"),
    "complete as int": (_set_attr("/", "complete", 1), "must be a boolean"),
    "missing meta": (_del_attr("/", "meta"), "lacks attribute 'meta'"),
    "meta not json": (_set_attr("/", "meta", "{not json"), "not valid JSON"),
    "meta json list": (_set_attr("/", "meta", "[1, 2]"), "JSON object"),
    "meta with NaN": (_set_attr("/", "meta", '{"x": NaN}'), "not valid JSON"),
    "meta nested too deep": (_set_attr("/", "meta", "[" * 100_000 + "]" * 100_000), "meta"),
    "missing tap_count": (_del_attr("/", "tap_count"), "tap_count"),
    "wrong tap_count": (_set_attr("/", "tap_count", 3), "tap_count"),
    "missing dtype attr": (_del_attr("taps/000001", "dtype"), "lacks attribute 'dtype'"),
    "layer as string": (_set_attr("taps/000001", "layer", "0"), "must be an integer"),
    "layer below -1": (_set_attr("taps/000001", "layer", -5), ">= -1"),
    "name as bytes array": (_set_attr("taps/000001", "name", np.array([1, 2])), "must be a string"),
    "key mismatch": (_set_attr("taps/000001", "key", "other"), "does not match"),
    "empty dtype": (_set_attr("taps/000001", "dtype", ""), "empty dtype"),
    "unknown dtype, string data": (lambda f: (_replace_tap_data(f, np.array([b"ab"])),
                                              _set_attr("taps/000000", "dtype", "text")(f)), "unsupported numpy"),
    "dtype not storage": (_set_attr("taps/000000", "dtype", "bfloat16"), "declared bfloat16"),
    "data replaced by float64": (lambda f: _replace_tap_data(f, np.zeros((2, 4, 8))), "holds float64"),
    "duplicate key": (lambda f: [_set_attr(f"taps/{i:06d}", k, v)(f) for i in (2,)
                                 for k, v in (("name", "prefix.0.k"), ("key", "prefix.0.k"))], "appears twice"),
    "tap gap": (lambda f: f.__delitem__("taps/000003"), "not numbered"),
    "stray tap member": (lambda f: f["taps"].create_dataset("junk", data=[1]), "unexpected member"),
    "tap is a group": (lambda f: (f.__delitem__("taps/000000"), f.create_group("taps/000000")), "not a dataset"),
    "slots out of range": (lambda f: _edit_slots(f, (0, 3), -5), "out of range"),
    "slots duplicate": (lambda f: _edit_slots(f, (0, 1), 0), "same canonical"),
    "slots float": (lambda f: (f.__delitem__("layouts/0/slots"),
                               f["layouts/0"].create_dataset("slots", data=np.zeros((2, 4)))), "int64"),
    "regions bad json": (_set_attr("layouts/0", "regions", "[[1,2"), "not valid JSON"),
    "region past length": (_set_attr("layouts/0", "regions", '[["x", 0, 9]]'), "bad region"),
    "length zero": (_set_attr("layouts/0", "length", 0), ">= 1"),
    "missing taps group": (lambda f: f.__delitem__("taps"), "missing /layouts or /taps"),
    "error partial info": (_del_attr("error", "stack"), "some but not all"),
    "error missing message": (_del_attr("error", "message"), "lacks attribute 'message'"),
    "error is dataset": (lambda f: (f.__delitem__("error"), f.create_dataset("error", data=[1])), "not a group"),
}


@pytest.mark.parametrize("case", sorted(TAMPERS))
def test_tampered_file_gives_dump_error(dump_path, raised_dump_path, case):
    fn, message = TAMPERS[case]
    path = raised_dump_path if case.startswith("error") else dump_path
    tamper(path, fn)
    with pytest.raises(DumpError, match=message) as info:
        read_dump(path)
    text = str(info.value)
    assert text.startswith(str(path) + ": ") and "\n" not in text


def _read_everything(path: Path) -> None:
    """Only DumpError may escape; a successful read is fine too."""
    try:
        read_dump(path)
        with open_dump(path) as r:
            for h in r.headers:
                for _ in r.read_chunks(h.key, 2):
                    pass
    except DumpError as e:
        assert str(e).startswith(str(path))


def test_truncation_always_gives_dump_error(dump_path, tmp_path):
    data = dump_path.read_bytes()
    n = len(data)
    offsets = sorted({0, 1, 4, 8, 64, 100, 512, 1024, 2048, n // 4, n // 3, n // 2, 2 * n // 3, n - 4096, n - 1000,
                      n - 100, n - 8, n - 1})
    for off in offsets:
        cut = tmp_path / f"cut{off}.h5"
        cut.write_bytes(data[: max(off, 0)])
        with pytest.raises(DumpError):
            read_dump(cut)


@pytest.mark.parametrize("compression", [None, "gzip"])
def test_random_byte_flips_give_dump_error_or_a_read(tmp_path, compression):
    src = tmp_path / "src.h5"
    write_dump(src, make_capture(), compression=compression)
    data = src.read_bytes()
    bad = tmp_path / "bad.h5"
    for seed in range(150):
        rng = np.random.default_rng(seed)
        buf = bytearray(data)
        # half the seeds aim at the first KiBs, where most of HDF5's metadata lives
        hi = len(buf) if seed % 2 else min(len(buf), 4096)
        for pos in rng.integers(0, hi, size=rng.integers(1, 9)):
            buf[pos] ^= int(rng.integers(1, 256))
        bad.write_bytes(bytes(buf))
        _read_everything(bad)


# ----------------------------------------------------------------------------- more writer/reader cases


def test_interrupted_add_tap_leaves_consistent_incomplete_file(tmp_path, monkeypatch):
    path = tmp_path / "x.h5"
    real = parity.dump.writer.set_attrs

    def interrupt_on_second_tap(obj, attrs):
        if attrs.get("key") == "t1":
            raise KeyboardInterrupt
        real(obj, attrs)

    monkeypatch.setattr(parity.dump.writer, "set_attrs", interrupt_on_second_tap)
    with pytest.raises(KeyboardInterrupt), DumpWriter(path, {}) as w:
        for i in range(3):
            w.add_tap(Tap(TapInfo(f"t{i}", "s", i, "c"), i, np.full(4, i, np.float32), "float32"))
    got = read_dump(path)
    assert got.complete is False and [t.key for t in got.taps] == ["t0"]


def test_half_written_last_tap_is_skipped_only_when_incomplete(tmp_path):
    path = tmp_path / "x.h5"
    write_dump(path, make_capture(complete=False))
    last = f"taps/{len(make_capture().taps) - 1:06d}"
    tamper(path, _del_attr(last, "dtype"))
    with pytest.raises(DumpError, match="lacks attribute 'dtype'"):
        read_dump(path)  # closed by its writer (tap_count says so): a broken tap is corruption
    tamper(path, _del_attr("/", "tap_count"))  # as a killed writer leaves it
    with open_dump(path) as r:
        assert len(r.headers) == len(make_capture().taps) - 1
        assert r.notes and "half-written" in r.notes[0]
    tamper(path, _set_attr("/", "tap_count", len(make_capture().taps) - 1))  # add_tap interrupted, member kept
    with open_dump(path) as r:
        assert len(r.headers) == len(make_capture().taps) - 1
    tamper(path, _set_attr("/", "complete", True))
    with pytest.raises(DumpError, match="lacks attribute 'dtype'"):
        read_dump(path)


def test_layout_arguments_checked(tmp_path):
    with DumpWriter(tmp_path / "x.h5", {}) as w:
        with pytest.raises(ValueError, match="slot"):
            w.add_layout("a", Layout(np.array([[0, -2]]), length=2))
        with pytest.raises(ValueError, match="beyond"):
            w.add_layout("b", Layout(np.array([[0, 1]]), length=2, regions=(Region("r", 0, 3),)))
        with pytest.raises(ValueError, match="integers"):
            w.add_layout("c", Layout(np.array([[0.0, 1.0]]), length=2))


def test_non_contiguous_arrays_and_large_meta(tmp_path):
    base = np.arange(60, dtype=np.float32).reshape(3, 4, 5)
    view = base.transpose(2, 0, 1)[:, ::2]
    meta = {"blob": "x" * 200_000, "nested": {"k": list(range(1000))}}
    cap = Capture(taps=[Tap(TapInfo("v", "s", 0, "c"), 0, view, "float32")], meta=meta)
    write_dump(tmp_path / "x.h5", cap)
    got = read_dump(tmp_path / "x.h5")
    assert got.meta == meta and np.array_equal(got.taps[0].array, view)


def test_findings_about_the_candidate_are_stored_not_refused(tmp_path):
    """Unknown dtype names, unknown layouts and misfit shapes are for the diff to report."""
    layouts = {"L": Layout(np.array([[0, 1]]), length=2)}
    taps = [
        Tap(TapInfo("c", "s", 0, "c"), 0, np.array([1 + 2j], np.complex64), "complex64"),
        Tap(TapInfo("u", "s", 0, "u"), 1, np.array([7], np.uint16), "uint16"),
        Tap(TapInfo("nolayout", "s", 0, "x"), 2, np.zeros((1, 2, 3), np.float32), "float32", layout="nope"),
        Tap(TapInfo("misfit", "s", 0, "x"), 3, np.zeros((3, 2), np.float32), "float32", layout="L"),
    ]
    cap = Capture(taps=taps, layouts=layouts)
    write_dump(tmp_path / "x.h5", cap)
    assert_same_capture(read_dump(tmp_path / "x.h5"), cap)


def test_tap_layout_may_be_written_before_its_layout(tmp_path):
    with DumpWriter(tmp_path / "x.h5", {}) as w:
        w.add_tap(Tap(TapInfo("t", "s", 0, "c"), 0, np.zeros((1, 2), np.float32), "float32", layout="L"))
        w.add_layout("L", Layout(np.array([[0, 1]]), length=2))
    got = read_dump(tmp_path / "x.h5")
    assert got.taps[0].layout == "L" and "L" in got.layouts
