"""Dumps an attacker or an accident can hand parity: what is stored outside the file, an
interrupted capture over a complete dump, signals, metadata-only listings, huge meta
strings, taps without checksums, a dump without a model dtype.

Every adversarial file is built here (h5py, numpy, json).  Real processes (`python -m
parity.cli`) are used where only a process can show it: a read that would hang (a FIFO),
signals, peak memory.
"""
from __future__ import annotations

import io
import itertools
import json
import os
import shutil
import signal
import subprocess
import sys
import threading
import time
import zlib
from pathlib import Path

import h5py
import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from rich.console import Console
from typer.testing import CliRunner

from parity.cli import app
from parity.dump.format import PARTIAL_SUFFIX, set_attrs
from parity.dump.writer import write_dump
from parity.taps.records import Capture, Layout, Region, Tap, TapInfo

REPO = Path(__file__).resolve().parent.parent
TESTS = REPO / "tests"
TOY = "toy_backends:slow"


# --------------------------------------------------------------------------- helpers

def cli(*args) -> tuple[int, str]:
    """The CLI in-process, on a wide console (no message wrapped)."""
    result = CliRunner().invoke(app, [str(a) for a in args], env={"COLUMNS": "400"}, catch_exceptions=False)
    return result.exit_code, result.output


def env(**knobs) -> dict:
    """Environment of a `python -m parity.cli` subprocess that can load the toy backends."""
    out = dict(os.environ)
    out["PYTHONPATH"] = os.pathsep.join(p for p in (str(TESTS), str(REPO), out.get("PYTHONPATH")) if p)
    out["COLUMNS"] = "400"
    out.update({f"PARITY_TOY_{k.upper()}": str(v) for k, v in knobs.items()})
    return out


def run(*args, timeout: float = 60, cwd: Path | None = None) -> subprocess.CompletedProcess:
    """`python -m parity.cli ARGS` in a real process; a hang fails the test instead of hanging it."""
    try:
        return subprocess.run([sys.executable, "-m", "parity.cli", *map(str, args)], env=env(), cwd=cwd,
                              capture_output=True, text=True, timeout=timeout)
    except subprocess.TimeoutExpired:
        pytest.fail(f"parity {' '.join(map(str, args))} did not finish within {timeout} s (hung)")


def one_line_error(out: str, path: Path | str) -> str:
    """Exactly one non-empty line, `error: <path>: <what is wrong>`, and no traceback."""
    lines = [line for line in out.splitlines() if line.strip()]
    assert len(lines) == 1 and "Traceback" not in out, out
    assert lines[0].startswith(f"error: {path}: "), lines[0]
    return lines[0]


def tap(name: str, order: int, array, dtype: str | None = None, layout: str | None = None) -> Tap:
    parts = name.split(".")
    array = np.asarray(array)
    return Tap(TapInfo(name, parts[0], int(parts[1]), parts[2]), order, array, dtype or array.dtype.name, layout)


DATA = np.arange(12, dtype=np.float32)


def good_dump(path: Path, meta: dict | None = None) -> Path:
    """Two taps over one layout, so every kind of member (layout slots, taps, error) exists."""
    layout = Layout(np.arange(12, dtype=np.int64).reshape(1, 12), length=12, regions=(Region("text", 0, 12),))
    write_dump(path, Capture(taps=[tap("a.0.x", 0, DATA), tap("a.1.x", 1, DATA)], layouts={"seq": layout},
                             meta={"backend": "b", "dtype": "float32", **(meta or {})}))
    return path


def replace_dataset(path: Path, where: str, make) -> None:
    """Replace dataset `where` by what `make(group, name, shape, dtype)` creates, keeping its attributes."""
    group_name, name = where.rsplit("/", 1)
    with h5py.File(path, "r+", libver=("v108", "latest")) as f:  # a virtual dataset needs the 1.10 format
        old = f[where]
        attrs, shape, dtype = dict(old.attrs), old.shape, old.dtype
        group = f[group_name]
        del group[name]
        new = make(group, name, shape, dtype)
        if new is not None:
            for key, value in attrs.items():
                new.attrs[key] = value


def external_storage(target: Path):
    return lambda g, n, shape, dtype: g.create_dataset(n, shape=shape, dtype=dtype,
                                                       external=[(str(target), 0, h5py.h5f.UNLIMITED)])


def virtual(source: Path):
    def make(g, n, shape, dtype):
        layout = h5py.VirtualLayout(shape=shape, dtype=dtype)
        layout[...] = h5py.VirtualSource(str(source), "d", shape=shape)
        return g.create_virtual_dataset(n, layout)
    return make


def external_link(target: Path, obj: str = "/d"):
    def make(g, n, shape, dtype):
        g[n] = h5py.ExternalLink(str(target), obj)
    return make


def soft_link(obj: str):
    def make(g, n, shape, dtype):
        g[n] = h5py.SoftLink(obj)
    return make


# --------------------------------------------------------------------------- nothing outside the file

@pytest.fixture
def outside(tmp_path: Path) -> dict:
    """What a dump could point at: a FIFO (opening it blocks), a file holding exactly the
    bytes of the tap (so a followed pointer would diff as a pass), an HDF5 file with them."""
    fifo = tmp_path / "fifo"
    os.mkfifo(fifo)
    victim = tmp_path / "victim"
    victim.write_bytes(DATA.tobytes())
    source = tmp_path / "source.h5"
    with h5py.File(source, "w") as f:
        f["d"] = DATA
    return {"fifo": fifo, "victim": victim, "source": source, "good": good_dump(tmp_path / "good.h5")}


# (case, member replaced, how): each points out of the file, or at another member.
POINTERS = {
    "tap external storage -> file": ("taps/000001", lambda o: external_storage(o["victim"])),
    "tap external link -> dump": ("taps/000001", lambda o: external_link(o["source"])),
    "tap virtual dataset -> file": ("taps/000001", lambda o: virtual(o["source"])),
    "tap soft link -> other tap": ("taps/000001", lambda o: soft_link("/taps/000000")),
    "layout slots external storage": ("layouts/0/slots", lambda o: external_storage(o["victim"])),
    "taps group external link": ("taps", lambda o: external_link(o["good"], "/taps")),
}


FIFO_POINTERS = {
    "tap external storage -> FIFO": ("taps/000001", lambda o: external_storage(o["fifo"])),
    "tap external link -> FIFO": ("taps/000001", lambda o: external_link(o["fifo"])),
    "tap virtual dataset -> FIFO": ("taps/000001", lambda o: virtual(o["fifo"])),
}


def pointing_dump(tmp_path: Path, outside: dict, where: str, how) -> Path:
    bad = tmp_path / "bad.h5"
    shutil.copy(outside["good"], bad)
    if where == "taps":  # a whole group: replace it by a link
        with h5py.File(bad, "r+", libver=("v108", "v108")) as f:
            del f["taps"]
            how(outside)(f, "taps", None, None)
    else:
        replace_dataset(bad, where, how(outside))
    return bad


@pytest.mark.parametrize("case", list(POINTERS))
def test_a_dump_pointing_outside_itself_is_refused_in_one_line(tmp_path, outside, case):
    """External links, external raw storage, virtual datasets and soft links are refused
    by inspect and diff (either side), never followed: a tap pointing at a file holding
    the very bytes of the reference would otherwise diff as a pass."""
    where, how = POINTERS[case]
    bad = pointing_dump(tmp_path, outside, where, how)
    for args in (("inspect", bad), ("diff", outside["good"], bad), ("diff", bad, outside["good"])):
        code, out = cli(*args)
        line = one_line_error(out, bad)
        assert code == 2, out
        assert "self-contained" in line or "soft link" in line, line


@pytest.mark.parametrize("case", list(FIFO_POINTERS))
def test_a_dump_pointing_at_a_fifo_never_hangs(tmp_path, outside, case):
    """A FIFO behind an external link or external storage blocked inspect and diff for
    ever (and Ctrl-C with them): refused at once, in a real process."""
    where, how = FIFO_POINTERS[case]
    bad = pointing_dump(tmp_path, outside, where, how)
    for args in (("inspect", bad), ("diff", outside["good"], bad)):
        proc = run(*args, timeout=30)
        assert proc.returncode == 2 and proc.stdout == "", proc.stdout + proc.stderr
        assert "self-contained" in one_line_error(proc.stderr, bad)


def test_a_fifo_named_as_a_dump_is_never_opened(tmp_path, outside):
    proc = run("diff", outside["fifo"], outside["good"], timeout=30)
    assert proc.returncode == 2 and "not a regular file" in one_line_error(proc.stderr, outside["fifo"])


def test_error_group_and_stats_tables_pointing_outside_are_refused(tmp_path, outside):
    """The other members a reader opens: a tensor dump's /error, a stats dump's tables."""
    bad = tmp_path / "error.h5"
    shutil.copy(outside["good"], bad)
    with h5py.File(bad, "r+", libver=("v108", "v108")) as f:
        f["error"] = h5py.ExternalLink(str(outside["fifo"]), "/e")
    proc = run("inspect", bad, timeout=30)
    assert proc.returncode == 2 and "/error is an external link" in one_line_error(proc.stderr, bad)

    from parity.dump.stats import write_stats
    from parity.taps.stats import FIELDS, StatsCapture, TapStats

    stats = StatsCapture(taps=[TapStats(info=TapInfo("a.0.x", "a", 0, "x"), order=0, dtype="float32", layout=None,
                                        shape=(12,), summarised_shape=(12,), tokens="all", positions="",
                                        values=np.zeros(len(FIELDS)), checksum=1)],
                         meta={"backend": "b", "dtype": "float32"})
    path = tmp_path / "s.h5"
    write_stats(path, stats)
    replace_dataset(path, "stats/checksums", external_storage(outside["victim"]))
    for args in (("inspect", path), ("diff", path, path)):
        code, out = cli(*args)
        assert code == 2 and "self-contained" in one_line_error(out, path)


def test_a_filter_plugin_is_refused(tmp_path, outside):
    """A filter parity never writes would be loaded by HDF5 as a plugin from outside the file."""
    bad = tmp_path / "filtered.h5"
    shutil.copy(outside["good"], bad)

    def bzip2(g, n, shape, dtype):
        ds = g.create_dataset(n, shape=shape, dtype=dtype, chunks=shape, compression=307, allow_unknown_filter=True)
        ds.id.write_direct_chunk((0,), DATA.tobytes())
        return ds

    replace_dataset(bad, "taps/000001", bzip2)
    code, out = cli("diff", outside["good"], bad)
    assert code == 2 and "HDF5 filter 307" in one_line_error(out, bad)


# --------------------------------------------------------------------------- inspect reads metadata only

PEAK = """
import json, resource, subprocess, sys
limit = int(sys.argv[1])
def cap():
    resource.setrlimit(resource.RLIMIT_AS, (limit, limit))
p = subprocess.run(sys.argv[2:], capture_output=True, text=True, preexec_fn=cap)
peak = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss
print(json.dumps({"rc": p.returncode, "out": p.stdout, "err": p.stderr, "peak_mb": peak / 1024}))
"""


def peak(*args, limit_mb: int = 1536) -> dict:
    """Run `parity ARGS` in a real process under an address-space limit; its exit code,
    output and peak resident memory (MB)."""
    cmd = [sys.executable, "-c", PEAK, str(limit_mb << 20), sys.executable, "-m", "parity.cli", *map(str, args)]
    proc = subprocess.run(cmd, env=env(), capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr
    return json.loads(proc.stdout)


def compressed_zeros(path: Path, elements: int, chunk: int = 1 << 18, written: bool = True) -> Path:
    """A dump holding one gzip-compressed float32 tap of `elements` zeros, its chunks
    written from one compressed chunk (cheap to build at any size), or never written."""
    write_dump(path, Capture(meta={"backend": "b", "dtype": "float32"}))
    block = zlib.compress(bytes(chunk * 4), 9)
    zeros, crc = bytes(chunk * 4), 0
    for _ in range(elements // chunk):
        crc = zlib.crc32(zeros, crc)
    with h5py.File(path, "r+", libver=("v108", "v108")) as f:
        ds = f["taps"].create_dataset("000000", shape=(elements,), dtype=np.float32, chunks=(chunk,),
                                      compression="gzip")
        if written:
            for i in range(elements // chunk):
                ds.id.write_direct_chunk((i * chunk,), block)
        set_attrs(ds, {"key": "a.0.x", "name": "a.0.x", "stack": "a", "layer": 0, "component": "x", "step": -1,
                       "order": 0, "dtype": "float32", "layout": "", "crc32": crc})
        set_attrs(f, {"tap_count": 1})
    return path


def test_inspect_reads_metadata_only(tmp_path):
    """Listing a dump read (and inflated) every tap: a 512 MiB compressed tap took its
    512 MiB to list one header line.  Now its peak memory is that of a tiny dump."""
    small = peak("inspect", good_dump(tmp_path / "small.h5"))
    big_path = compressed_zeros(tmp_path / "big.h5", 1 << 27)
    assert big_path.stat().st_size < 2 << 20  # 512 MiB of zeros in ~0.5 MB
    big = peak("inspect", big_path)
    assert big["rc"] == 0 and "a.0.x" in big["out"] and "[134217728]" in big["out"], big
    assert big["peak_mb"] < small["peak_mb"] + 48, (small["peak_mb"], big["peak_mb"])


def test_a_decompression_bomb_is_refused_before_it_is_inflated(tmp_path):
    """A 3 KB file declaring a compressed tap of 2**30 float32 (chunks never written: HDF5
    hands out 4 GiB of zeros) took 4.3 GB and 34 s to list; now inspect and diff refuse it
    from its metadata, in one line."""
    bomb = compressed_zeros(tmp_path / "bomb.h5", 1 << 30, written=False)
    assert bomb.stat().st_size < 16 << 10
    for args in (("inspect", bomb), ("diff", bomb, bomb)):
        got = peak(*args)
        assert got["rc"] == 2 and got["out"] == "", got
        assert "more than a compressor writes" in one_line_error(got["err"], bomb)
        assert got["peak_mb"] < 400, got["peak_mb"]


# --------------------------------------------------------------------------- inspect is linear in its strings

def test_inspect_is_linear_in_the_length_of_a_meta_string(tmp_path):
    """An 8 MB meta string took 30 s to list (8 MB of ESC characters: over 15 minutes, the
    terminal wrapping being quadratic in a line's length): each value is cut to its first
    characters and says how many it left out."""
    path = tmp_path / "long.h5"
    write_dump(path, Capture(taps=[tap("a.0.x", 0, DATA)], meta={"backend": "b", "note": "\x1b" * (8 << 20)}))
    started = time.monotonic()
    proc = run("inspect", path, timeout=60)
    assert proc.returncode == 0, proc.stderr
    assert time.monotonic() - started < 60
    words = " ".join(proc.stdout.split())  # the console wraps long lines at spaces
    assert f"({len('  note: ') + (8 << 20) - 10_000} more characters not shown)" in words
    assert len(proc.stdout) < 100_000 and "\x1b" not in proc.stdout and "a.0.x" in proc.stdout


# --------------------------------------------------------------------------- an interrupted capture keeps the old dump

def spawn(args, cwd: Path, **knobs) -> subprocess.Popen:
    def setup():
        signal.signal(signal.SIGINT, signal.SIG_DFL)  # a background job may inherit SIGINT ignored
    return subprocess.Popen([sys.executable, "-m", "parity.cli", *map(str, args)], env=env(**knobs), cwd=cwd,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, preexec_fn=setup)


def wait_for_progress(progress: Path, at_least: int, proc: subprocess.Popen, timeout: float = 120) -> int:
    """Wait until the toy backend is about to run layer `at_least` (taps before it are written)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            out, err = proc.communicate()
            pytest.fail(f"the command ended early (rc {proc.returncode}): {out}{err}")
        try:
            value = int(progress.read_text().strip() or -1)
        except (FileNotFoundError, ValueError):
            value = -1
        if value >= at_least:
            return value
        time.sleep(0.02)
    proc.kill()
    pytest.fail("the toy backend made no progress")


def complete_capture(path: Path, *extra: str) -> bytes:
    """A complete toy capture at `path`; its bytes."""
    code, out = cli("capture", "--backend", TOY, "-o", path, *extra)
    assert code == 0, out
    return path.read_bytes()


INCOMPLETE = ".incomplete"


@pytest.mark.parametrize("kind", ["tensors", "stats"])
@pytest.mark.parametrize("signum", [signal.SIGINT, signal.SIGTERM], ids=["ctrl-c", "sigterm"])
def test_an_interrupted_capture_never_replaces_a_complete_dump(tmp_path, signum, kind):
    """Ctrl-C or SIGTERM with -o naming a complete dump replaced it with the incomplete
    one.  The old dump stays as it was; what the stopped capture wrote goes beside it,
    and the message names both."""
    from parity.dump.reader import read_dump
    from parity.dump.stats import read_stats

    extra = ("--stats",) if kind == "stats" else ()
    out_path, progress = tmp_path / "x.h5", tmp_path / "progress"
    old = complete_capture(out_path, *extra)
    proc = spawn(["capture", "--backend", TOY, "-o", out_path, *extra], tmp_path, sleep=0.25, progress=progress)
    wait_for_progress(progress, 3, proc)
    proc.send_signal(signum)
    stdout, stderr = proc.communicate(timeout=120)
    assert proc.returncode == 130, stdout + stderr
    side = Path(str(out_path) + INCOMPLETE)
    lines = [line for line in stderr.splitlines() if line.strip()]
    assert len(lines) == 1 and "Traceback" not in stderr, stderr
    assert lines[0].startswith(f"interrupted: {side} holds the ") and f"{out_path} was left as it was" in lines[0]
    assert out_path.read_bytes() == old  # bit for bit
    assert not Path(str(out_path) + PARTIAL_SUFFIX).exists()
    got = read_stats(side) if kind == "stats" else read_dump(side)
    assert got.complete is False and 0 < len(got.taps) < 8


def test_a_capture_stopped_before_its_first_tap_keeps_the_old_dump(tmp_path):
    """Even with no tap written, the complete dump was replaced (by an empty one)."""
    out_path, progress = tmp_path / "x.h5", tmp_path / "progress"
    old = complete_capture(out_path)
    proc = spawn(["capture", "--backend", TOY, "-o", out_path], tmp_path, sleep=2, progress=progress)
    wait_for_progress(progress, 0, proc)  # layer 0 is asleep: no tap recorded yet
    proc.send_signal(signal.SIGINT)
    _, stderr = proc.communicate(timeout=120)
    assert proc.returncode == 130 and f"{out_path} was left as it was" in stderr, stderr
    assert out_path.read_bytes() == old


def test_a_backend_that_raises_never_replaces_a_complete_dump(tmp_path):
    from parity.dump.reader import read_dump

    out_path = tmp_path / "x.h5"
    old = complete_capture(out_path)
    code, out = cli("capture", "--backend", TOY, "--inject", "raise", "-o", out_path)
    side = Path(str(out_path) + INCOMPLETE)
    assert code == 1 and f"wrote 3 taps to {side}" in out and f"{out_path} was left as it was" in out, out
    assert out_path.read_bytes() == old
    got = read_dump(side)
    assert got.complete is False and got.error.key == "toy.3.out" and len(got.taps) == 3
    # a new complete capture does replace it
    code, out = cli("capture", "--backend", TOY, "--seed", "1", "-o", out_path)
    assert code == 0 and out_path.read_bytes() != old


def test_a_stale_partial_beside_a_dump_is_named_by_diff_and_inspect(tmp_path):
    """After a SIGKILL the old dump stays and `<dump>.partial` beside it; a later diff used
    the old dump without a word.  Now the banner (and the JSON, and inspect) say so."""
    out_path, progress = tmp_path / "x.h5", tmp_path / "progress"
    old = complete_capture(out_path)
    proc = spawn(["capture", "--backend", TOY, "-o", out_path], tmp_path, sleep=0.25, progress=progress)
    wait_for_progress(progress, 3, proc)
    proc.kill()
    proc.communicate(timeout=120)
    partial = Path(str(out_path) + PARTIAL_SUFFIX)
    assert partial.exists() and out_path.read_bytes() == old
    code, out = cli("diff", out_path, out_path, "--json", tmp_path / "r.json")
    words = " ".join(out.split())
    note = f"{partial} exists beside {out_path}"
    assert code == 0 and note in words, out
    assert any(note in w for w in json.loads((tmp_path / "r.json").read_text())["warnings"])
    code, out = cli("inspect", out_path)
    assert code == 0 and note in " ".join(out.split()), out


# --------------------------------------------------------------------------- SIGTERM to diff

def test_sigterm_to_diff_exits_130_judging_nothing(tmp_path):
    """SIGTERM (a CI timeout) ended `parity diff` with 143, not the documented 130."""
    progress = tmp_path / "progress"
    proc = spawn(["diff", "--ref", TOY, "--cand", TOY], tmp_path, sleep=0.25, progress=progress)
    wait_for_progress(progress, 2, proc)
    proc.send_signal(signal.SIGTERM)
    stdout, stderr = proc.communicate(timeout=120)
    assert proc.returncode == 130, (proc.returncode, stdout, stderr)
    assert stdout == "" and stderr.strip() == "interrupted: diff stopped before it finished; nothing was judged"


# --------------------------------------------------------------------------- data without checksums

def strip_crc(path: Path, *members: str) -> Path:
    with h5py.File(path, "r+", libver=("v108", "v108")) as f:
        for name in members:
            del f[name].attrs["crc32"]
    return path


def test_taps_without_a_checksum_are_accepted_and_said(tmp_path):
    """A dump whose taps carry no crc32 (early writers) was read unverified without a word:
    a flipped bit there goes unnoticed.  The diff's banner and JSON warnings, and inspect,
    now name them."""
    good = good_dump(tmp_path / "good.h5")
    bare = strip_crc(good_dump(tmp_path / "bare.h5"), "taps/000001", "layouts/0/slots")
    note = f"{bare}: 1 of 2 taps carry no crc32 checksum (a.1.x): their data is read unverified"
    code, out = cli("diff", good, bare, "--json", tmp_path / "r.json")
    words = " ".join(out.split())
    assert code == 0 and f"WARNING: {note}" in words, out
    assert f"{bare}: 1 of 1 layouts carry no crc32 checksum (seq)" in words
    warnings = json.loads((tmp_path / "r.json").read_text())["warnings"]
    assert any(w.startswith(note) for w in warnings), warnings
    code, out = cli("inspect", bare)
    assert code == 0 and note in " ".join(out.split()), out
    # a dump with every checksum says nothing of the kind
    code, out = cli("diff", good, good)
    assert code == 0 and "crc32" not in out


def test_stats_tables_without_a_checksum_are_accepted_and_said(tmp_path):
    from parity.dump.stats import write_stats
    from parity.taps.stats import FIELDS, StatsCapture, TapStats

    stats = StatsCapture(taps=[TapStats(info=TapInfo("a.0.x", "a", 0, "x"), order=0, dtype="float32", layout=None,
                                        shape=(12,), summarised_shape=(12,), tokens="all", positions="",
                                        values=np.ones(len(FIELDS)), checksum=1)],
                         meta={"backend": "b", "dtype": "float32"})
    good, bare = tmp_path / "good.h5", tmp_path / "bare.h5"
    write_stats(good, stats)
    write_stats(bare, stats)
    strip_crc(bare, "stats/values")
    note = f"{bare}: 1 of 3 summary tables carry no crc32 checksum (/stats/values)"
    code, out = cli("diff", good, bare)
    assert code == 0 and note in " ".join(out.split()), out
    code, out = cli("inspect", bare)
    assert code == 0 and note in " ".join(out.split()), out


# --------------------------------------------------------------------------- a run that declares no model dtype

def dtype_dump(path: Path, dtype_meta, tap_dtype=np.float32) -> Path:
    meta = {"backend": "b"} if dtype_meta is ... else {"backend": "b", "dtype": dtype_meta}
    write_dump(path, Capture(taps=[tap("a.0.x", 0, DATA.astype(tap_dtype))], meta=meta))
    return path


def test_a_dump_declaring_no_model_dtype_never_switches_the_dtype_check_off(tmp_path):
    """The diff fails a tap whose dtype changed unless both runs declare different model
    dtypes (fp32 against bf16, asked for).  A candidate dump without `dtype` in its meta
    switched the check off without a word: a float16 tap passed against a float32 one.
    parity cannot tell an accidental cast from a requested one there, so it refuses, in
    one line naming the dump (either side), and says what to do."""
    ref = dtype_dump(tmp_path / "ref.h5", "float32")
    bare = dtype_dump(tmp_path / "bare.h5", ..., np.float16)
    for a, b in ((ref, bare), (bare, ref)):
        code, out = cli("diff", a, b)
        line = one_line_error(out, bare)
        assert code == 2 and "declares no model dtype" in line and "'float32'" in line, out
        assert "declare 'dtype' in the backend's meta" in line

    # a dtype that is not a name is refused too; two runs declaring none keep the check on
    odd = dtype_dump(tmp_path / "odd.h5", 5, np.float16)
    code, out = cli("diff", ref, odd)
    assert code == 2 and "meta 'dtype' must be a dtype name, got 5" in one_line_error(out, odd)
    code, out = cli("diff", dtype_dump(tmp_path / "bare32.h5", ...), bare, "--json", tmp_path / "r.json")
    result = json.loads((tmp_path / "r.json").read_text())
    assert code == 1 and result["taps"][0]["status"] == "dtype" and result["thresholds"]["exact_dtypes"] is True
    # runs declaring different dtypes judge values only, as before
    code, out = cli("diff", ref, dtype_dump(tmp_path / "half.h5", "float16", np.float16))
    assert code == 0, out


def test_the_python_api_refuses_one_sided_dtypes_too(tmp_path):
    from parity import api
    from parity.errors import InputError

    ref = Capture(taps=[tap("a.0.x", 0, DATA)], meta={"dtype": "float32"})
    cand = Capture(taps=[tap("a.0.x", 0, DATA.astype(np.float16))], meta={})
    with pytest.raises(InputError, match="the candidate: its meta declares no model dtype"):
        api.compare_captures(ref, cand)


def test_a_stats_dump_declaring_no_model_dtype_is_refused(tmp_path):
    from parity.dump.stats import write_stats
    from parity.taps.stats import FIELDS, StatsCapture, TapStats

    def stats(path: Path, meta: dict, dtype: str) -> Path:
        row = TapStats(info=TapInfo("a.0.x", "a", 0, "x"), order=0, dtype=dtype, layout=None, shape=(12,),
                       summarised_shape=(12,), tokens="all", positions="", values=np.ones(len(FIELDS)), checksum=1)
        write_stats(path, StatsCapture(taps=[row], meta=meta))
        return path

    ref = stats(tmp_path / "ref.h5", {"backend": "b", "dtype": "float32"}, "float32")
    bare = stats(tmp_path / "bare.h5", {"backend": "b"}, "float16")
    code, out = cli("diff", ref, bare)
    assert code == 2 and "declares no model dtype" in one_line_error(out, bare), out


# --------------------------------------------------------------------------- fuzzing these classes
# Random instances of every class above (tools/fuzz.py runs them at length, with
# tests/dump/test_fuzz.py): whatever the dump points at, the reader refuses it in one line
# and never opens it; bombs are refused from their metadata, fast; huge meta strings list
# in time linear in their length; taps without a checksum are read and named.

FUZZ_EXAMPLES = int(os.environ.get("PARITY_FUZZ_EXAMPLES", "40"))
TALLY = os.environ.get("PARITY_FUZZ_TALLY")
FUZZ = settings(max_examples=FUZZ_EXAMPLES, deadline=None, derandomize=FUZZ_EXAMPLES <= 500,
                suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture,
                                       HealthCheck.data_too_large])


def tally(prop: str, outcome: str) -> None:
    """Count an input for the long campaign's figures (no-op in the normal suite)."""
    if TALLY:
        with open(TALLY, "a", encoding="utf-8") as f:
            f.write(f"{prop} {outcome}\n")


def never_hangs(fn, fifo: Path, timeout: float = 20):
    """fn() in a thread; if it blocks (on the FIFO), unblock it by opening the FIFO's write
    end, then fail.  What fn raised is raised here."""
    box: dict = {}

    def target():
        try:
            box["value"] = fn()
        except BaseException as exc:  # noqa: BLE001 - handed to the test's thread
            box["error"] = exc

    thread = threading.Thread(target=target, daemon=True)
    thread.start()
    thread.join(timeout)
    if thread.is_alive():
        try:
            os.close(os.open(fifo, os.O_WRONLY | os.O_NONBLOCK))  # the blocked reader gets EOF
        except OSError:
            pass
        thread.join(5)
        pytest.fail("a dump reader blocked on something outside the dump (hung)")
    if "error" in box:
        raise box["error"]
    return box.get("value")


@st.composite
def base_dumps(draw, path: Path) -> Path:
    """A small random dump: 1-4 float taps, one layout or none, maybe an error, maybe incomplete."""
    n = draw(st.integers(1, 4))
    layouts = {}
    if draw(st.booleans()):
        layouts["seq"] = Layout(np.arange(6, dtype=np.int64).reshape(1, 6), length=6, regions=(Region("t", 0, 6),))
    taps = [tap(f"a.{i}.x", i, np.random.default_rng(i).standard_normal(draw(st.integers(1, 64))).astype(np.float32))
            for i in range(n)]
    error = None
    if draw(st.booleans()):
        from parity.taps.records import CaptureError

        error = CaptureError(key=None, info=None, exc_type="RuntimeError", message="x")
    write_dump(path, Capture(taps=taps, layouts=layouts, meta={"backend": "b", "dtype": "float32"}, error=error,
                             complete=draw(st.booleans())))
    return path


def _members(path: Path) -> list[str]:
    with h5py.File(path, "r") as f:
        found: list[str] = []
        f.visit(found.append)
    return found + (["error"] if "error" not in found else [])


@FUZZ
@given(data=st.data())
def test_fuzzed_pointers_outside_the_dump_are_refused_never_followed(tmp_path_factory, data):
    """A random member (a tap, a group, a layout's slots, /error) replaced by an external or
    soft link, external raw storage or a virtual dataset, aimed at a FIFO, a file, an HDF5
    file, the dump itself or nothing: every reader entry point refuses it or, for the
    light passes, says nothing; none blocks."""
    from parity.api import inspect_dump
    from parity.dump.format import DumpError
    from parity.dump.reader import dump_notes, open_dump, read_meta
    from parity.errors import InputError

    root = tmp_path_factory.mktemp("ptr")
    fifo, victim, source = root / "fifo", root / "victim", root / "source.h5"
    os.mkfifo(fifo)
    victim.write_bytes(os.urandom(4096))
    path = data.draw(base_dumps(root / "x.h5"))
    member = data.draw(st.sampled_from(_members(path)))
    kind = data.draw(st.sampled_from(["external link", "soft link", "external storage", "virtual"]))
    target = data.draw(st.sampled_from([fifo, victim, source, root / "missing", path]))
    with h5py.File(path, "r+", libver=("v108", "latest")) as f:
        old = f.get(member)
        is_data = isinstance(old, h5py.Dataset)
        if kind in ("external storage", "virtual") and not is_data:
            kind = "external link"
        shape, dtype = (old.shape, old.dtype) if is_data else ((4,), np.dtype(np.float32))
        attrs = dict(old.attrs) if old is not None else {}
        if old is not None:
            del f[member]
        parent, name = (f[member.rsplit("/", 1)[0]], member.rsplit("/", 1)[1]) if "/" in member else (f, member)
        if kind == "external link":
            parent[name] = h5py.ExternalLink(str(target), data.draw(st.sampled_from(["/", "/d", "/taps", "/x/y"])))
        elif kind == "soft link":
            parent[name] = h5py.SoftLink(data.draw(st.sampled_from(["/taps", "/taps/000000", "/nowhere", "/"])))
        else:
            if kind == "virtual":
                with h5py.File(source, "w") as g:
                    g.create_dataset("d", shape=shape, dtype=dtype)
                layout = h5py.VirtualLayout(shape=shape, dtype=dtype)
                layout[...] = h5py.VirtualSource(str(target), "d", shape=shape)
                new = parent.create_virtual_dataset(name, layout)
            else:
                new = parent.create_dataset(name, shape=shape, dtype=dtype,
                                            external=[(str(target), data.draw(st.integers(0, 64)),
                                                       h5py.h5f.UNLIMITED)])
            for key, value in attrs.items():
                new.attrs[key] = value
    with pytest.raises(DumpError) as refused:
        never_hangs(lambda: open_dump(path).close(), fifo)
    assert "self-contained" in str(refused.value) or "soft link" in str(refused.value), refused.value
    with pytest.raises(InputError):
        never_hangs(lambda: inspect_dump(path), fifo)
    never_hangs(lambda: (dump_notes(path), read_meta(path)), fifo)  # light passes: no note, no hang
    tally("outside", "refused")


@FUZZ
@given(data=st.data())
def test_fuzzed_compressed_taps_declaring_too_much_are_refused_from_metadata(tmp_path_factory, data):
    """A compressed tap of random dtype, shape and chunking with a few chunks written or
    none: refused from its metadata (fast, nothing inflated) exactly when it declares more
    than a compressor writes or chunks over the bound; listed otherwise."""
    from parity.dump.format import MAX_COMPRESSED_CHUNK_BYTES, MAX_EXPANSION, DumpError
    from parity.dump.reader import open_dump

    path = tmp_path_factory.mktemp("bomb") / "b.h5"
    write_dump(path, Capture(meta={"backend": "b", "dtype": "float32"}))
    dtype = np.dtype(data.draw(st.sampled_from(["float32", "float16", "uint8", "int64"])))
    shape = tuple(1 << data.draw(st.integers(0, 14)) for _ in range(data.draw(st.integers(1, 3))))
    chunks = [max(1, s >> data.draw(st.integers(0, 8))) for s in shape]
    while int(np.prod(chunks)) * dtype.itemsize >= 1 << 32:  # HDF5's chunk limit (format 1.8)
        chunks[chunks.index(max(chunks))] //= 2
    chunks = tuple(chunks)
    written = data.draw(st.integers(0, 3))
    compression = data.draw(st.sampled_from(["gzip", "lzf"]))
    chunk_bytes = int(np.prod(chunks)) * dtype.itemsize
    with h5py.File(path, "r+", libver=("v108", "v108")) as f:
        ds = f["taps"].create_dataset("000000", shape=shape, dtype=dtype, chunks=chunks, compression=compression)
        grid = [range(0, s, c) for s, c in zip(shape, chunks)]
        for offset in list(itertools.product(*grid))[:written]:
            block = np.zeros(chunks, dtype)
            ds.id.write_direct_chunk(offset, zlib.compress(block.tobytes(), 9) if compression == "gzip"
                                     else block.tobytes(), filter_mask=0 if compression == "gzip" else 1)
        stored = ds.id.get_storage_size()
        set_attrs(ds, {"key": "a.0.x", "name": "a.0.x", "stack": "a", "layer": 0, "component": "x", "step": -1,
                       "order": 0, "dtype": dtype.name, "layout": "", "crc32": 0})
        set_attrs(f, {"tap_count": 1})
    declared = int(np.prod(shape)) * dtype.itemsize
    bomb = chunk_bytes > MAX_COMPRESSED_CHUNK_BYTES or declared > MAX_EXPANSION * stored + chunk_bytes
    started = time.monotonic()
    try:
        open_dump(path).close()
        outcome = "listed"
    except DumpError as exc:
        assert "compress" in str(exc), exc
        outcome = "refused"
    assert time.monotonic() - started < 5  # metadata only, whatever it declares
    assert outcome == ("refused" if bomb else "listed"), (shape, chunks, dtype, stored)
    tally("bomb", outcome)


@FUZZ
@given(unit=st.text(st.characters(blacklist_categories=("Cs",), blacklist_characters="\x00"), min_size=1, max_size=4),
       repeat=st.integers(0, 1 << 20), keys=st.integers(1, 3))
def test_fuzzed_huge_meta_strings_list_in_linear_time(tmp_path_factory, unit, repeat, keys):
    """Meta strings of any characters up to a few MB: inspect lists them in time linear in
    their length, each cut to its first characters."""
    from parity.api import inspect_dump
    from parity.report.terminal.listing import render_dump

    path = tmp_path_factory.mktemp("meta") / "m.h5"
    meta = {"backend": "b", **{f"k{i}": unit * (repeat >> i) for i in range(keys)}}
    write_dump(path, Capture(taps=[tap("a.0.x", 0, DATA)], meta=meta))
    length = sum(len(v) for v in meta.values())
    started = time.monotonic()
    out = io.StringIO()
    Console(file=out, width=120, color_system=None).print(render_dump(inspect_dump(path)))
    assert time.monotonic() - started < 2 + length / 2e6  # >= 2 MB a second (quadratic: minutes at 8 MB)
    assert len(out.getvalue()) < (keys + 12) * 80_000 and "\x1b" not in out.getvalue()
    tally("meta", "listed")


@FUZZ
@given(data=st.data())
def test_fuzzed_taps_without_checksums_are_read_and_named(tmp_path_factory, data):
    """crc32 stripped from a random subset of taps and layouts: the dump still reads back
    bit for bit, and the reader's notes and the light pass name exactly those."""
    from parity.dump.reader import dump_notes, open_dump, read_dump

    path = data.draw(base_dumps(tmp_path_factory.mktemp("crc") / "c.h5"))
    with h5py.File(path, "r") as f:
        taps = sorted(f["taps"])
        slots = [f"layouts/{n}/slots" for n in sorted(f["layouts"])]
    stripped = data.draw(st.lists(st.sampled_from(taps + slots), unique=True)) if taps + slots else []
    want = read_dump(path)
    strip_crc(path, *(m if m in slots else f"taps/{m}" for m in stripped))
    got = read_dump(path)
    assert [t.array.tobytes() for t in got.taps] == [t.array.tobytes() for t in want.taps]
    bare_taps = sum(m in taps for m in stripped)
    with open_dump(path) as reader:
        notes = list(reader.notes)
        assert sum(not h.checked for h in reader.headers) == bare_taps
    for found in (notes, dump_notes(path)):
        tap_notes = [n for n in found if "taps carry no crc32" in n]
        assert (f"{bare_taps} of {len(taps)} taps" in tap_notes[0]) if bare_taps else not tap_notes, found
        assert any("layouts carry no crc32" in n for n in found) == any(m in slots for m in stripped), found
    tally("crc", "named")
