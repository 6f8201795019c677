"""parity fails closed and keeps what it captured: one test (or a few) per row of the
the guarantees table (docs/guarantees.md), through the CLI wherever the row speaks of exit codes.

Real processes (`python -m parity.cli`) are used where only a process can show it:
signals, kills, a file-size limit, two captures at once.  Their timing is made
deterministic with the toy backends' progress and gate files (tests/toy_backends.py),
never with guessed sleeps.
"""
from __future__ import annotations

import ast
import json
import os
import re
import resource
import signal
import subprocess
import sys
import time
from pathlib import Path

import h5py
import numpy as np
import pytest
from typer.testing import CliRunner

from parity.cli import app
from parity.comparison.loop import diff
from parity.dump.format import PARTIAL_SUFFIX
from parity.dump.reader import open_dump, read_dump
from parity.dump.writer import write_dump
from parity.taps.records import Capture, Layout, Region, Tap, TapInfo

REPO = Path(__file__).resolve().parent.parent
TESTS = REPO / "tests"
TOY = "toy_backends:slow"
WEIRD = "toy_backends:weird"
TOY_KEYS = [f"toy.{i}.out" for i in range(8)]


# --------------------------------------------------------------------------- helpers

def cli(*args) -> tuple[int, str]:
    """Run the CLI in-process; a wide console so that no message is wrapped."""
    result = CliRunner().invoke(app, [str(a) for a in args], env={"COLUMNS": "400"}, catch_exceptions=False)
    return result.exit_code, result.output


def assert_one_line_error(out: str, path: Path | str | None = None) -> str:
    """Exactly one non-empty line, `error: <path>: <what is wrong>`, and no traceback."""
    lines = [line for line in out.splitlines() if line.strip()]
    assert len(lines) == 1, out
    assert "Traceback" not in out
    line = lines[0]
    assert line.startswith("error: "), line
    if path is not None:
        assert line.startswith(f"error: {path}: ") and len(line) > len(f"error: {path}: ") + 5, line
    return line


def tap(name: str, order: int, array, dtype: str | None = None, layout: str | None = None) -> Tap:
    parts = name.split(".")
    layer = int(parts[1]) if len(parts) == 3 else None
    array = np.asarray(array)
    return Tap(TapInfo(name, parts[0], layer, parts[-1]), order, array, dtype or array.dtype.name, layout)


def rand(*shape: int, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).standard_normal(shape).astype(np.float32)


def dump(path: Path, *taps: Tap, layouts: dict | None = None, meta: dict | None = None) -> Path:
    write_dump(path, Capture(taps=list(taps), layouts=dict(layouts or {}), meta=dict(meta or {})))
    return path


def sample_dump(path: Path) -> Path:
    """A dump with a bit of everything: layouts, bf16/fp8 bits, ints, a scalar, odd names."""
    rng = np.random.default_rng(7)
    layout = Layout(np.array([[0, 1, 2, -1], [4, 5, -1, -1]]), length=4, regions=(Region("text", 0, 2),))
    return dump(
        path,
        tap("blk.0.k", 0, rng.standard_normal((2, 4, 8)).astype(np.float32), layout="pad"),
        tap("blk.0.v", 1, rng.integers(0, 1 << 16, (64, 33)).astype(np.uint16), "bfloat16"),
        tap("blk.0.attn", 2, np.arange(256, dtype=np.uint8).reshape(16, 16), "float8_e4m3fn"),
        tap("blk.1.mlp", 3, rng.standard_normal((300,)).astype(np.float16)),
        tap("head.ids", 4, np.arange(10, dtype=np.int64)),
        tap("head.loss", 5, np.array(1.5)),
        tap("we/ird.../ünï", 6, np.ones(3, np.float32)),
        layouts={"pad": layout},
        meta={"backend": "sample", "input_fingerprint": "abc"},
    )


def assert_same_capture(got: Capture, want: Capture) -> None:
    assert (got.meta, got.complete, got.error) == (want.meta, want.complete, want.error)
    assert got.layouts.keys() == want.layouts.keys()
    for name, layout in want.layouts.items():
        other = got.layouts[name]
        assert (other.length, other.regions) == (layout.length, layout.regions)
        assert np.array_equal(other.slots, layout.slots)
    assert [(t.key, t.info, t.order, t.dtype, t.layout) for t in got.taps] == \
           [(t.key, t.info, t.order, t.dtype, t.layout) for t in want.taps]
    for a, b in zip(got.taps, want.taps):
        assert a.array.dtype == b.array.dtype and a.array.shape == b.array.shape
        assert a.array.tobytes() == b.array.tobytes()


def toy_env(**knobs) -> dict:
    """Environment of a `python -m parity.cli` subprocess that can load the toy backends."""
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(p for p in (str(TESTS), str(REPO), env.get("PYTHONPATH")) if p)
    env["COLUMNS"] = "400"
    env.update({f"PARITY_TOY_{k.upper()}": str(v) for k, v in knobs.items()})
    return env


def _child_setup(fsize_limit: int | None = None):
    def setup():
        # A capture started from a shell's background job inherits SIGINT ignored;
        # Python only turns SIGINT into KeyboardInterrupt when it starts at default.
        signal.signal(signal.SIGINT, signal.SIG_DFL)
        if fsize_limit is not None:
            signal.signal(signal.SIGXFSZ, signal.SIG_IGN)  # EFBIG instead of being killed
            resource.setrlimit(resource.RLIMIT_FSIZE, (fsize_limit, fsize_limit))
    return setup


def spawn(args, env: dict, cwd: Path, fsize_limit: int | None = None) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-m", "parity.cli", *map(str, args)], env=env, cwd=cwd,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            preexec_fn=_child_setup(fsize_limit))


def wait_for_progress(progress: Path, at_least: int, proc: subprocess.Popen, timeout: float = 120) -> int:
    """Wait until the toy backend is about to run layer `at_least` (taps before it are written)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            out, err = proc.communicate()
            pytest.fail(f"capture ended early (rc {proc.returncode}): {out}{err}")
        try:
            value = int(progress.read_text().strip() or -1)
        except (FileNotFoundError, ValueError):
            value = -1
        if value >= at_least:
            return value
        time.sleep(0.02)
    proc.kill()
    pytest.fail("the toy capture made no progress")


@pytest.fixture
def toy_full(tmp_path: Path) -> Path:
    """An uninterrupted capture of the toy chain: what an interrupted one must be a prefix of."""
    path = tmp_path / "full.h5"
    code, out = cli("capture", "--backend", TOY, "-o", path)
    assert code == 0, out
    assert [t.key for t in read_dump(path).taps] == TOY_KEYS
    return path


def assert_prefix_of(got: Capture, full: Capture, at_least: int) -> None:
    """`got` holds the first taps of `full`, bit for bit, at least `at_least` of them."""
    assert len(got.taps) >= at_least
    assert [t.key for t in got.taps] == [t.key for t in full.taps][: len(got.taps)]
    for a, b in zip(got.taps, full.taps):
        assert a.array.tobytes() == b.array.tobytes()


# --------------------------------------------------------------------------- nothing compared / one-sided

def test_empty_dump_fails_and_is_named(tmp_path):
    empty = dump(tmp_path / "empty.h5")
    good = dump(tmp_path / "good.h5", tap("a.x", 0, rand(3)), tap("b.x", 1, rand(3)))
    for ref, cand, needles in [
        (empty, empty, [f"reference {empty} has no taps", f"candidate {empty} has no taps"]),
        (good, empty, [f"candidate {empty} has no taps", f"2 taps only in the reference {good}: a.x, b.x"]),
        (empty, good, [f"reference {empty} has no taps", f"2 taps only in the candidate {good}: a.x, b.x"]),
    ]:
        code, out = cli("diff", ref, cand, "--json", tmp_path / "r.json")
        assert code == 1, out
        problems = json.loads((tmp_path / "r.json").read_text())["problems"]
        for needle in needles:
            assert any(needle in p for p in problems) and needle in out
    # a --taps selection that matches nothing compares nothing: a failure, not a pass
    code, out = cli("diff", good, good, "--taps", "nosuch.*")
    assert code == 1 and "has no taps: nothing was compared" in out


def test_no_taps_in_common_fails_and_names_them(tmp_path):
    ref = dump(tmp_path / "ref.h5", tap("a.x", 0, rand(3)))
    cand = dump(tmp_path / "cand.h5", tap("b.x", 0, rand(3)))
    code, out = cli("diff", ref, cand)
    assert code == 1
    assert f"no tap in common between reference {ref} and candidate {cand}: nothing was compared" in out
    assert f"1 tap only in the reference {ref}: a.x" in out and f"1 tap only in the candidate {cand}: b.x" in out


@pytest.mark.parametrize("side", ["reference", "candidate"])
def test_a_tap_on_one_side_only_fails_and_is_named(tmp_path, side):
    both = [tap("a.x", 0, rand(3)), tap("c.x", 2, rand(3, seed=2))]
    full = dump(tmp_path / "full.h5", both[0], tap("b.x", 1, rand(3, seed=1)), both[1])
    part = dump(tmp_path / "part.h5", *both)
    ref, cand = (full, part) if side == "reference" else (part, full)
    code, out = cli("diff", ref, cand, "--json", tmp_path / "r.json")
    assert code == 1
    report = json.loads((tmp_path / "r.json").read_text())
    assert report["first_divergence"]["tap"] == "b.x"
    assert report["first_divergence"]["status"] == ("missing" if side == "reference" else "extra")
    assert f"1 tap only in the {side} {full}: b.x" in out
    assert {t["tap"]: t["status"] for t in report["taps"]}["a.x"] == "pass"


# --------------------------------------------------------------------------- truncated / corrupted dumps

def test_truncated_dump_exits_2_with_one_line(tmp_path):
    good = sample_dump(tmp_path / "good.h5")
    data = good.read_bytes()
    n = len(data)
    offsets = sorted({0, 1, 7, 8, 47, 48, 100, 511, 512, 2047, 2048, 4096, n - 1, n - 2, n - 8, n - 100, n - 1000,
                      *range(0, n, max(1, n // 48))})
    reasons = set()
    for off in offsets:
        cut = tmp_path / f"cut{off}.h5"
        cut.write_bytes(data[:off])
        for args in ((cut, good), (good, cut)):
            code, out = cli("diff", *args)
            assert code == 2, (off, out)
            reasons.add(assert_one_line_error(out, cut).split(": ", 2)[-1][:40])
        cut.unlink()
    assert len(reasons) > 1  # the message says what is wrong, not one canned line


def test_flipped_bytes_exit_2_or_read_back_bit_identical(tmp_path):
    """Every flip is either caught (exit 2, one line) or changed nothing parity reads:
    tensor data carries a CRC-32 and HDF5 checksums the metadata."""
    good = sample_dump(tmp_path / "good.h5")
    want = read_dump(good)
    clean_code, _ = cli("diff", good, good)
    data = good.read_bytes()
    bad = tmp_path / "bad.h5"
    caught = 0
    for seed in range(120):
        rng = np.random.default_rng(seed)
        buf = bytearray(data)
        hi = len(buf) if seed % 2 else min(len(buf), 4096)  # half aim at the metadata up front
        for pos in rng.integers(0, hi, size=rng.integers(1, 6)):
            buf[pos] ^= int(rng.integers(1, 256))
        bad.write_bytes(bytes(buf))
        code, out = cli("diff", bad, good)
        if code == 2:
            assert_one_line_error(out, bad)
            caught += 1
        else:
            assert code == clean_code, out  # identical to the original, so the same verdict
            assert_same_capture(read_dump(bad), want)
    assert caught > 60  # most flips land somewhere that matters


def test_data_flip_is_caught_by_the_checksum(tmp_path):
    good = dump(tmp_path / "good.h5", tap("a.x", 0, np.zeros(4096, np.float32)))
    data = bytearray(good.read_bytes())
    where = data.rfind(bytes(4096 * 4))  # the tap's raw data: 16 KiB of zero bytes
    assert where > 0
    data[where + 1000] ^= 0x40
    bad = tmp_path / "bad.h5"
    bad.write_bytes(bytes(data))
    code, out = cli("diff", bad, good)
    assert code == 2 and "does not match its checksum" in assert_one_line_error(out, bad)


def test_corrupt_dump_in_a_real_process_prints_one_line_on_stderr(tmp_path):
    good = sample_dump(tmp_path / "good.h5")
    cut = tmp_path / "cut.h5"
    cut.write_bytes(good.read_bytes()[: good.stat().st_size // 2])
    proc = subprocess.run([sys.executable, "-m", "parity.cli", "diff", str(cut), str(good)], env=toy_env(),
                          cwd=tmp_path, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2 and proc.stdout == ""
    assert_one_line_error(proc.stderr, cut)


# --------------------------------------------------------------------------- interrupted captures

@pytest.mark.parametrize("signum", [signal.SIGINT, signal.SIGTERM], ids=["ctrl-c", "sigterm"])
def test_interrupted_capture_keeps_its_taps_marked_incomplete(tmp_path, toy_full, signum):
    out_path, progress = tmp_path / "cut.h5", tmp_path / "progress"
    proc = spawn(["capture", "--backend", TOY, "-o", out_path], toy_env(sleep=0.25, progress=progress), tmp_path)
    reached = wait_for_progress(progress, 3, proc)
    proc.send_signal(signum)
    stdout, stderr = proc.communicate(timeout=120)
    assert proc.returncode == 130, stdout + stderr
    lines = [line for line in stderr.splitlines() if line.strip()]
    assert len(lines) == 1 and "Traceback" not in stderr, stderr
    assert lines[0].startswith(f"interrupted: {out_path} holds the ") and "marked incomplete" in lines[0]

    assert out_path.exists() and not Path(str(out_path) + PARTIAL_SUFFIX).exists()
    got = read_dump(out_path)
    assert got.complete is False and got.error is None
    assert_prefix_of(got, read_dump(toy_full), at_least=reached)
    assert len(got.taps) < len(TOY_KEYS)
    assert f"holds the {len(got.taps)} taps" in lines[0]

    # diff refuses it, either side, unless --allow-incomplete; even then it never passes
    for args in ((out_path, toy_full), (toy_full, out_path)):
        code, out = cli("diff", *args)
        assert code == 2 and "incomplete" in assert_one_line_error(out, out_path) and "--allow-incomplete" in out
    code, out = cli("diff", toy_full, out_path, "--allow-incomplete")
    assert code == 1 and f"candidate {out_path} capture is incomplete" in out and "only in the reference" in out
    code, out = cli("diff", out_path, out_path, "--allow-incomplete")
    assert code == 1 and "capture is incomplete (interrupted)" in out


def test_ctrl_c_during_a_live_diff_exits_130_judging_nothing(tmp_path):
    progress = tmp_path / "progress"
    proc = spawn(["diff", "--ref", TOY, "--cand", TOY], toy_env(sleep=0.25, progress=progress), tmp_path)
    wait_for_progress(progress, 2, proc)
    proc.send_signal(signal.SIGINT)
    stdout, stderr = proc.communicate(timeout=120)
    assert proc.returncode == 130 and stdout == "" and "Traceback" not in stderr
    assert stderr.strip() == "interrupted: diff stopped before it finished; nothing was judged"


def test_killed_capture_leaves_a_readable_partial_file(tmp_path, toy_full):
    out_path, progress = tmp_path / "cut.h5", tmp_path / "progress"
    partial = Path(str(out_path) + PARTIAL_SUFFIX)
    proc = spawn(["capture", "--backend", TOY, "-o", out_path], toy_env(sleep=0.25, progress=progress), tmp_path)
    reached = wait_for_progress(progress, 4, proc)
    proc.kill()
    proc.communicate(timeout=120)
    assert proc.returncode == -signal.SIGKILL

    assert partial.exists() and not out_path.exists()  # nothing at the final name looks complete
    with open_dump(partial) as reader:
        assert reader.complete is False
    assert_prefix_of(read_dump(partial), read_dump(toy_full), at_least=reached)

    code, out = cli("diff", out_path, toy_full)
    assert code == 2 and str(partial) in assert_one_line_error(out, out_path)  # points at what was kept
    code, out = cli("diff", partial, toy_full)
    assert code == 2 and "incomplete" in assert_one_line_error(out, partial)
    code, out = cli("diff", partial, toy_full, "--allow-incomplete")
    assert code == 1
    # the stale partial file blocks the next capture to that path, saying why
    code, out = cli("capture", "--backend", TOY, "-o", out_path)
    assert code == 2 and "killed" in assert_one_line_error(out, out_path)


def test_exception_in_the_model_keeps_taps_marked_incomplete(tmp_path, toy_full):
    out_path = tmp_path / "raised.h5"
    code, out = cli("capture", "--backend", TOY, "--inject", "raise", "-o", out_path)
    assert code == 1 and "backend raised at toy.3.out: RuntimeError: toy layer exploded [on purpose]" in out
    got = read_dump(out_path)
    assert got.complete is False and got.error.key == "toy.3.out"
    assert [t.key for t in got.taps] == TOY_KEYS[:3]
    assert_prefix_of(got, read_dump(toy_full), at_least=3)

    code, out = cli("diff", toy_full, out_path)
    line = assert_one_line_error(out, out_path)
    assert code == 2 and "incomplete (the backend raised at toy.3.out: RuntimeError" in line
    code, out = cli("diff", toy_full, out_path, "--allow-incomplete", "--json", tmp_path / "r.json")
    assert code == 1
    first = json.loads((tmp_path / "r.json").read_text())["first_divergence"]
    assert (first["tap"], first["status"]) == ("toy.3.out", "raised")


# --------------------------------------------------------------------------- unwritable output, full disk

@pytest.mark.parametrize("where", ["no-such-root", "under-a-file", "a-directory"])
def test_unwritable_output_exits_2_with_the_reason(tmp_path, where):
    (tmp_path / "file").write_text("")
    (tmp_path / "dir").mkdir()
    target = {"no-such-root": Path("/proc/parity-no-such-dir/x.h5"), "under-a-file": tmp_path / "file" / "x.h5",
              "a-directory": tmp_path / "dir"}[where]
    before = sorted(p.name for p in tmp_path.rglob("*"))
    code, out = cli("capture", "--backend", TOY, "-o", target)
    line = assert_one_line_error(out, target)
    assert code == 2
    assert any(why in line for why in ("No such file", "Not a directory", "is a directory", "cannot create")), line
    assert sorted(p.name for p in tmp_path.rglob("*")) == before


@pytest.mark.skipif(os.geteuid() == 0, reason="root ignores directory permissions")
def test_read_only_output_directory_exits_2(tmp_path):
    ro = tmp_path / "ro"
    ro.mkdir()
    ro.chmod(0o500)
    try:
        code, out = cli("capture", "--backend", TOY, "-o", ro / "x.h5")
        assert code == 2 and "ermission denied" in assert_one_line_error(out, ro / "x.h5")
    finally:
        ro.chmod(0o700)


def test_disk_full_exits_2_and_leaves_no_half_written_dump(tmp_path):
    """A full disk, played by a file-size limit: the capture fails with the reason, its
    partial file is removed, and the complete dump already at that path is untouched."""
    out_path = tmp_path / "x.h5"
    sample_dump(out_path)
    old = out_path.read_bytes()
    proc = spawn(["capture", "--backend", TOY, "-o", out_path], toy_env(width=4096), tmp_path,
                 fsize_limit=100_000)  # 8 taps of 32 KiB do not fit
    stdout, stderr = proc.communicate(timeout=120)
    assert proc.returncode == 2, stdout + stderr
    assert_one_line_error(stderr, out_path)
    assert "write failed, dump discarded: File too large" in stderr
    assert sorted(p.name for p in tmp_path.iterdir()) == ["x.h5"]
    assert out_path.read_bytes() == old


# --------------------------------------------------------------------------- format versions

@pytest.mark.parametrize("version", [2, 99, 0, -1, "1", "2", 1.0, None], ids=repr)
def test_unknown_format_version_exits_2_naming_the_supported_one(tmp_path, version):
    path = sample_dump(tmp_path / "v.h5")
    with h5py.File(path, "r+") as f:
        if version is None:
            del f.attrs["format_version"]
        else:
            f.attrs["format_version"] = version
    code, out = cli("diff", path, path)
    line = assert_one_line_error(out, path)
    assert code == 2 and "is not supported; this version of parity reads format_version 1 only" in line
    if version in (2, 99):
        assert f"format_version {version} is not supported" in line and "newer" in line


# --------------------------------------------------------------------------- NaN / Inf

NONFINITE = [  # (dtype, storage array with the special value at flat index 5 of a [3, 4], label)
    ("float32", np.float32(np.nan), "nan=1 inf=0"),
    ("float32", np.float32(-np.inf), "nan=0 inf=1"),
    ("float16", np.float16(np.inf), "nan=0 inf=1"),
    ("float64", np.float64(np.nan), "nan=1 inf=0"),
    ("bfloat16", np.uint16(0x7FC0), "nan=1 inf=0"),
    ("bfloat16", np.uint16(0xFF80), "nan=0 inf=1"),
    ("float8_e4m3fn", np.uint8(0x7F), "nan=1 inf=0"),
    ("float8_e5m2", np.uint8(0x7C), "nan=0 inf=1"),
    ("float8_e5m2", np.uint8(0xFE), "nan=1 inf=0"),
]


@pytest.mark.parametrize("side", ["ref", "cand"])
@pytest.mark.parametrize("dtype, special, counts", NONFINITE, ids=lambda v: str(v))
def test_nan_or_inf_on_either_side_fails_with_counts_and_first_index(side, dtype, special, counts):
    from parity.taps.codec import storage_dtype

    clean = np.ones((3, 4), storage_dtype(dtype)) if dtype in ("float32", "float16", "float64") else \
        np.full((3, 4), {"bfloat16": 0x3F80, "float8_e4m3fn": 0x38, "float8_e5m2": 0x3C}[dtype], storage_dtype(dtype))
    dirty = clean.copy()
    dirty.reshape(-1)[5] = special
    ref, cand = (dirty, clean) if side == "ref" else (clean, dirty)
    report = diff(Capture([tap("a.x", 0, ref, dtype)]), Capture([tap("a.x", 0, cand, dtype)]))
    row = report.rows[0]
    assert not report and row.status == "nonfinite"
    assert f"{side} {counts}" in row.reason and "first at flat index 5 [1, 1]" in row.reason
    assert row.metrics.first_nonfinite == 5


def test_nan_and_inf_through_the_cli(tmp_path):
    layout = Layout(np.array([[0, 1, -1, 2]]), length=3)
    r = rand(1, 4, 2)
    r[0, 2] = np.nan  # padding: never compared
    c = r.copy()
    c[0, 3, 1] = np.inf  # valid token 2, feature 1
    ref = dump(tmp_path / "ref.h5", tap("a.x", 0, rand(4)), tap("b.x", 1, r, layout="t"), layouts={"t": layout})
    n = rand(4)
    n[[1, 3]] = np.nan
    cand = dump(tmp_path / "cand.h5", tap("a.x", 0, n), tap("b.x", 1, c, layout="t"), layouts={"t": layout})
    code, out = cli("diff", ref, cand, "--json", tmp_path / "r.json", "--all")
    assert code == 1
    assert "nonfinite: NaN/Inf: ref nan=0 inf=0, cand nan=2 inf=0, first at flat index 1 [1]" in out
    taps = {t["tap"]: t for t in json.loads((tmp_path / "r.json").read_text())["taps"]}
    assert (taps["a.x"]["status"], taps["a.x"]["nan_cand"]) == ("nonfinite", 2)
    assert (taps["b.x"]["status"], taps["b.x"]["inf_cand"], taps["b.x"]["nan_ref"]) == ("nonfinite", 1, 0)
    assert "first at flat index 5 of the valid tokens (canonical token position 2)" in taps["b.x"]["reason"]


# --------------------------------------------------------------------------- shape / dtype / layout mismatch

def mismatch_captures():
    pad = Layout(np.array([[0, 1, -1]]), length=2)
    other = Layout(np.array([[0, -1, 2]]), length=3)  # valid positions {0, 2}, not {0, 1}
    ref = Capture([
        tap("a.first", 0, rand(2, 3)),
        tap("b.shape", 1, rand(2, 3)),
        tap("c.dtype", 2, rand(2, 3)),
        tap("d.layout", 3, rand(1, 3, 2), layout="pad"),
        tap("e.misfit", 4, rand(1, 3, 2), layout="pad"),
        tap("f.whole", 5, rand(1, 3, 2), layout="pad"),
        tap("g.decode", 6, rand(4)),
        tap("h.last", 7, rand(5)),
    ], layouts={"pad": pad})
    cand = Capture([
        tap("a.first", 0, rand(2, 3)),
        tap("b.shape", 1, rand(3, 2)),
        tap("c.dtype", 2, rand(2, 3).astype(np.float16)),
        tap("d.layout", 3, rand(1, 3, 2), layout="other"),
        tap("e.misfit", 4, rand(1, 4, 2), layout="pad"),
        tap("f.whole", 5, rand(3, 2)),
        tap("g.decode", 6, np.ones(4, np.complex64)),  # a dtype the codec cannot decode
        tap("h.last", 7, rand(5)),
    ], layouts={"pad": pad, "other": other})
    return ref, cand


def test_mismatches_fail_their_tap_with_both_shapes_and_the_run_goes_on(tmp_path):
    ref, cand = mismatch_captures()
    report = diff(ref, cand)
    rows = {r.key: r for r in report.rows}
    assert {k: r.status for k, r in rows.items()} == {
        "a.first": "pass", "b.shape": "shape", "c.dtype": "dtype", "d.layout": "layout", "e.misfit": "layout",
        "f.whole": "layout", "g.decode": "dtype", "h.last": "pass"}
    for key in ("b.shape", "c.dtype", "d.layout", "e.misfit", "f.whole", "g.decode"):
        r = rows[key]
        assert f"ref {list(r.ref_shape)} {r.ref_dtype}, cand {list(r.cand_shape)} {r.cand_dtype}" in r.reason, r.reason
    assert rows["h.last"].metrics.cos == 1.0
    assert report.first_divergence.key == "b.shape"

    write_dump(tmp_path / "ref.h5", ref)
    write_dump(tmp_path / "cand.h5", cand)
    code, out = cli("diff", tmp_path / "ref.h5", tmp_path / "cand.h5", "--json", tmp_path / "r.json")
    assert code == 1 and "shape (2, 3) vs (3, 2) (ref [2, 3] float32, cand [3, 2] float32)" in out
    taps = json.loads((tmp_path / "r.json").read_text())["taps"]
    assert [t["status"] for t in taps] == ["pass", "shape", "dtype", "layout", "layout", "layout", "dtype", "pass"]
    assert taps[1]["ref_shape"] == [2, 3] and taps[1]["cand_shape"] == [3, 2]


# --------------------------------------------------------------------------- zeros, denormals, huge values

EDGE_VALUES = [
    # (label, dtype, ref, cand, status)
    ("both zero", "float32", np.zeros(6, np.float32), np.zeros(6, np.float32), "pass"),
    ("signed zeros", "bfloat16", np.zeros(6, np.uint16), np.full(6, 0x8000, np.uint16), "pass"),
    ("ref zero", "float32", np.zeros(6, np.float32), np.ones(6, np.float32), "fail"),
    ("cand zero", "float16", np.ones(6, np.float16), np.zeros(6, np.float16), "fail"),
    ("fp16 subnormals", "float16", np.full(6, 6e-8, np.float16), np.full(6, 6e-8, np.float16), "pass"),
    ("fp16 subnormal vs zero", "float16", np.full(6, 6e-8, np.float16), np.zeros(6, np.float16), "fail"),
    ("fp64 subnormals", "float64", np.full(6, 5e-324), np.full(6, 5e-324), "pass"),
    ("bf16 subnormals", "bfloat16", np.full(6, 0x0001, np.uint16), np.full(6, 0x0001, np.uint16), "pass"),
    ("e4m3 subnormals", "float8_e4m3fn", np.full(6, 0x01, np.uint8), np.full(6, 0x01, np.uint8), "pass"),
    ("fp16 max", "float16", np.full(6, 65504, np.float16), np.full(6, 65504, np.float16), "pass"),
    ("fp16 overflow", "float16", np.full(6, 65504, np.float16), np.array([65504] * 5 + [np.inf], np.float16),
     "nonfinite"),
    ("bf16 huge", "bfloat16", np.full(6, 0x7F7F, np.uint16), np.full(6, 0x7F7F, np.uint16), "pass"),
    ("fp64 huge opposite", "float64", np.full(6, 1.7e308), np.full(6, -1.7e308), "fail"),
    ("e5m2 max", "float8_e5m2", np.full(6, 0x7B, np.uint8), np.full(6, 0x7B, np.uint8), "pass"),
]


@pytest.mark.parametrize("label, dtype, ref, cand, status", EDGE_VALUES, ids=[e[0] for e in EDGE_VALUES])
def test_edge_values_have_defined_metrics(label, dtype, ref, cand, status):
    report = diff(Capture([tap("a.x", 0, ref, dtype)]), Capture([tap("a.x", 0, cand, dtype)]))
    row = report.rows[0]
    assert row.status == status, row.reason
    assert bool(report) is (status == "pass")
    m = row.metrics
    if m.finite:
        for name in ("cos", "max_abs", "mean_abs", "rel_l2"):
            assert not np.isnan(getattr(m, name)), name  # defined: no 0/0 anywhere
        assert -1.0 <= m.cos <= 1.0
    json.dumps(report.to_dict(), allow_nan=False)  # JSON-safe whatever the values


# --------------------------------------------------------------------------- two captures, one path

def test_two_captures_to_one_path_one_wins_the_other_exits_2(tmp_path):
    out_path, gate = tmp_path / "x.h5", tmp_path / "go"
    env = toy_env(gate=gate)
    procs = [spawn(["capture", "--backend", TOY, "-o", out_path], env, tmp_path) for _ in range(2)]
    # The capture holding the file waits at the gate; the other must give up without it.
    deadline = time.monotonic() + 120
    while all(p.poll() is None for p in procs) and time.monotonic() < deadline:
        time.sleep(0.02)
    gate.write_text("go")
    results = [(p.wait(timeout=120), *p.communicate()) for p in procs]
    codes = sorted(r[0] for r in results)
    assert codes == [0, 2], results
    loser = next(r for r in results if r[0] == 2)
    assert "being written by another capture" in assert_one_line_error(loser[2], out_path)
    got = read_dump(out_path)
    assert got.complete and [t.key for t in got.taps] == TOY_KEYS
    assert not Path(str(out_path) + PARTIAL_SUFFIX).exists()


# --------------------------------------------------------------------------- no pickle

SOURCE_DIRS = ("parity", "probes", "bench", "tools")
UNPICKLERS = {"pickle", "_pickle", "cPickle", "dill", "cloudpickle", "joblib", "shelve", "marshal", "jsonpickle"}


def _python_files():
    for folder in SOURCE_DIRS:
        yield from sorted((REPO / folder).rglob("*.py"))


def _call_name(node: ast.Call) -> str:
    parts, f = [], node.func
    while isinstance(f, ast.Attribute):
        parts.append(f.attr)
        f = f.value
    if isinstance(f, ast.Name):
        parts.append(f.id)
    return ".".join(reversed(parts))


def _keyword_is(node: ast.Call, name: str, value) -> bool:
    return any(k.arg == name and isinstance(k.value, ast.Constant) and k.value.value is value for k in node.keywords)


def unpickling_offences(source: str, where: str) -> list[str]:
    """What in `source` could unpickle: an unpickling module imported, torch.load without
    weights_only=True (or imported bare, so its calls cannot be checked), np.load with
    allow_pickle=True, torch.jit.load, pandas.read_pickle."""
    offences = []
    for node in ast.walk(ast.parse(source)):
        at = f"{where}:{getattr(node, 'lineno', '?')}"
        if isinstance(node, ast.Import):
            offences += [f"{at} imports {a.name}" for a in node.names if a.name.split(".")[0] in UNPICKLERS]
        elif isinstance(node, ast.ImportFrom) and (node.module or "").split(".")[0] in UNPICKLERS:
            offences.append(f"{at} imports from {node.module}")
        elif isinstance(node, ast.ImportFrom) and (node.module or "").startswith("torch") and \
                any(a.name == "load" for a in node.names):
            offences.append(f"{at} imports load from {node.module} (its calls cannot be checked)")
        elif isinstance(node, ast.Call):
            name = _call_name(node)
            if name.endswith(("torch.load", "serialization.load")) and not _keyword_is(node, "weights_only", True):
                offences.append(f"{at} calls {name} without weights_only=True")
            if name.split(".")[0] in ("np", "numpy") and name.endswith(".load") and \
                    _keyword_is(node, "allow_pickle", True):
                offences.append(f"{at} calls {name} with allow_pickle=True")
            if name.endswith(("jit.load", "read_pickle")):
                offences.append(f"{at} calls {name}")
    return offences


def test_the_pickle_scan_catches_what_it_must():
    bad = (
        "import pickle\nimport dill as d\nfrom joblib import load\nfrom torch import load\n"
        "torch.load(f)\ntorch.load(f, weights_only=False)\nnp.load(f, allow_pickle=True)\n"
        "torch.jit.load(f)\npd.read_pickle(f)\n"
    )
    assert len(unpickling_offences(bad, "x.py")) == 9
    good = "torch.load(f, weights_only=True)\nnp.load(f)\nnp.load(f, allow_pickle=False)\nimport json\n"
    assert unpickling_offences(good, "x.py") == []


def test_no_code_path_can_unpickle_static_scan():
    """Every Python file of parity/, probes/, bench/ and tools/ passes the scan above."""
    files = list(_python_files())
    assert len(files) > 20  # the scan sees the code base
    offences = []
    for path in files:
        offences += unpickling_offences(path.read_text(), str(path.relative_to(REPO)))
    assert offences == []


def test_no_code_path_unpickles_at_run_time(tmp_path, monkeypatch):
    """Capture (the real pi0.5 reference and the toy), inspect and diff, with every
    unpickling entry point booby-trapped."""
    import _pickle
    import pickle

    import torch

    calls = []

    def trap(name):
        def refuse(*args, **kwargs):
            calls.append(name)
            raise AssertionError(f"{name} called: parity must never unpickle")
        return refuse

    class TrappedUnpickler:
        def __init__(self, *args, **kwargs):
            trap("Unpickler")()

    for module in (pickle, _pickle):
        monkeypatch.setattr(module, "load", trap(f"{module.__name__}.load"))
        monkeypatch.setattr(module, "loads", trap(f"{module.__name__}.loads"))
        monkeypatch.setattr(module, "Unpickler", TrappedUnpickler)
    monkeypatch.setattr(torch, "load", trap("torch.load"))
    monkeypatch.setattr(np, "load", trap("np.load"))

    ref, cand = tmp_path / "ref.h5", tmp_path / "cand.h5"
    assert cli("capture", "--backend", "pytorch", "-o", ref)[0] == 0
    assert cli("capture", "--backend", "flash", "-o", cand)[0] == 0
    assert cli("inspect", ref)[0] == 0
    assert cli("diff", ref, cand)[0] == 0
    assert cli("capture", "--backend", TOY, "-o", tmp_path / "toy.h5")[0] == 0
    assert cli("diff", tmp_path / "toy.h5", tmp_path / "toy.h5")[0] == 0
    assert calls == []


# --------------------------------------------------------------------------- tap names that look like paths

def test_tap_names_with_slashes_dots_unicode_are_data_not_paths(tmp_path):
    from toy_backends import WEIRD_NAMES

    out_dir = tmp_path / "out"
    out_dir.mkdir()
    path = out_dir / "weird.h5"
    code, out = cli("capture", "--backend", WEIRD, "-o", path)
    assert code == 0, out
    want = [f"{stack}.{i}.{comp}" for i, (stack, comp) in enumerate(WEIRD_NAMES)]
    got = read_dump(path)
    assert [t.key for t in got.taps] == want and [t.info.stack for t in got.taps] == [s for s, _ in WEIRD_NAMES]

    # nothing but the dump was created, and inside it every object is a numbered member
    assert sorted(p.name for p in tmp_path.rglob("*")) == ["out", "weird.h5"]
    members = []
    with h5py.File(path, "r") as f:
        f.visit(members.append)
    assert all(re.fullmatch(r"layouts|taps|taps/\d{6}|error|layouts/\d+(/slots)?", m) for m in members), members

    # listed as data: markup is not interpreted, control characters are escaped
    code, listing = cli("inspect", path)
    assert code == 0 and "Traceback" not in listing
    for name in want:
        shown = name.replace("\x1b", "\\x1b").replace("\u202e", "\\u202e")
        assert shown in listing, shown
    assert "\x1b" not in listing and "\u202e" not in listing
    code, report = cli("diff", path, path, "--all", "--json", tmp_path / "r.json")
    assert code == 0 and "[/]" in report and "\\x1b[2Jclear" in report and "\x1b" not in report
    assert [t["tap"] for t in json.loads((tmp_path / "r.json").read_text())["taps"]] == want


# --------------------------------------------------------------------------- the README names real tests

def test_docs_guarantees_name_tests_that_exist():
    """Every test the guarantees table (docs/guarantees.md) cites exists, and every row cites one."""
    section = (REPO / "docs" / "guarantees.md").read_text()
    rows = [line for line in section.splitlines() if line.startswith("| ") and not line.startswith("| case")]
    assert len(rows) >= 13  # the table parsed (rows are only ever added)
    defined: dict[str, set[str]] = {}
    for row in rows:
        cited = re.findall(r"`(?:(test_\w+\.py)::)?(test_\w+)\b(?!\.py)", row.split(" | ")[-1])
        assert cited, row
        for module, name in cited:
            module = module or "test_guarantees.py"
            if module not in defined:
                (path,) = TESTS.rglob(module)  # tests mirror the package: find the module in its folder
                tree = ast.parse(path.read_text())
                defined[module] = {n.name for n in ast.walk(tree) if isinstance(n, ast.FunctionDef)}
            assert name in defined[module], f"README cites {module}::{name}, which does not exist"
