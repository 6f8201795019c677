"""Offline cost of parity: dump write vs raw write, streamed diff vs plain h5py read,
diff peak memory on a multi-GB dump, and CLI startup.  All ratios in the same run.

    PYTHONPATH=. python bench/offline.py --gb 2          # this machine: "cpu"

Synthetic pi0.5-shaped dumps (bf16 taps with a padded token layout, ~0.5-8 MB each,
the candidate a perturbed copy) are written to a temp dir (PARITY_BENCH_TMP, else the
system one; check `df -h` first: the run needs ~2.2x `--gb` of free disk).  Writes
bench/results/offline_<card>.json.  No torch: this is the path that never imports it.

The machine may be shared: each side-by-side figure alternates its two sides for ROUNDS
rounds (page cache dropped before every read) and keeps the best of each side; the load
average before and after is recorded.  The diff is timed in-process after one warm-up
diff (numba imported, its kernel loaded from the on-disk cache, as in any later run of a
library user); `cli_fresh_process` is `parity diff` end to end in a new process, imports
included.  `numpy_engine` is the same diff with the fused kernel off (the path small
dumps and machines without numba take).
"""
from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import h5py
import numpy as np
from disk import raw_write_seconds
from record import write_result

from parity.comparison.dumps import diff_dumps
from parity.comparison.metrics import compare
from parity.dump.reader import read_dump
from parity.dump.writer import DumpWriter
from parity.taps.codec import to_float64
from parity.taps.records import Layout, Region, Tap, TapInfo

ROWS, TOKENS = 2, 968  # batch 2, 3 cameras x 256 + 200 text tokens
ROUNDS = 3  # alternating rounds per side-by-side figure; the best of each side is kept


def layout() -> Layout:
    slots = np.arange(ROWS * TOKENS, dtype=np.int64).reshape(ROWS, TOKENS)
    slots[:, 900:] = -1  # padding
    return Layout(slots, TOKENS, (Region("image", 0, 768), Region("text", 768, TOKENS)))


def tap_specs(total_bytes: int):
    """(key, feature width) of taps adding up to total_bytes of bf16."""
    widths = [256, 2048, 2048, 256, 2048, 16384, 2048, 2048]  # q, k, v-ish, mlp hidden ...
    out, used, i = [], 0, 0
    while used < total_bytes:
        w = widths[i % len(widths)]
        out.append((f"prefix.{i // len(widths)}.c{i % len(widths)}", w))
        used += ROWS * TOKENS * w * 2
        i += 1
    return out


def write_pair(tmp: Path, total_bytes: int) -> tuple[Path, Path, float, int]:
    """Reference and candidate dumps; returns paths, the write seconds of the reference, bytes."""
    rng = np.random.default_rng(0)
    base = {w: (rng.standard_normal((ROWS, TOKENS, w), dtype=np.float32)) for w in {w for _, w in tap_specs(1)}}
    paths = tmp / "ref.h5", tmp / "cand.h5"
    seconds, nbytes = 0.0, 0
    for side, path in enumerate(paths):
        taps = []
        for order, (key, w) in enumerate(tap_specs(total_bytes)):
            x = base.get(w)
            if x is None:
                x = base[w] = rng.standard_normal((ROWS, TOKENS, w), dtype=np.float32)
            x = x * (1 + order * 1e-3) + side * 1e-3
            bits = (x.view(np.uint32) >> 16).astype(np.uint16)
            taps.append(Tap(TapInfo(key, "prefix", order // 8, f"c{order % 8}"), order, bits, "bfloat16", "prefix"))
            if len(taps) == 8 or order == len(tap_specs(total_bytes)) - 1:
                t0 = time.perf_counter()
                if order < 8:
                    writer = DumpWriter(path, {"dtype": "bfloat16"})
                    writer.add_layout("prefix", layout())
                for t in taps:
                    writer.add_tap(t)
                seconds += time.perf_counter() - t0
                nbytes += sum(t.array.nbytes for t in taps) if side == 0 else 0
                taps = []
        t0 = time.perf_counter()
        writer.close()
        fsync(path)
        seconds += time.perf_counter() - t0
        if side == 0:
            ref_seconds = seconds
    return paths[0], paths[1], ref_seconds, nbytes


def fsync(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    os.fsync(fd)
    os.close(fd)


def plain_read(paths) -> float:
    """h5py reading every tap of both files in 8 MB slabs: the I/O floor of a diff."""
    t0 = time.perf_counter()
    for path in paths:
        with h5py.File(path, "r") as f:
            for name in f["taps"]:
                ds = f["taps"][name]
                rows = max(1, (8 << 20) // max(1, ds.nbytes // max(1, ds.shape[0])))
                for s in range(0, ds.shape[0], rows):
                    ds[s:s + rows]
    return time.perf_counter() - t0


def naive_diff(paths) -> float:
    """Read both dumps whole, then numpy per tap: the throw-away-script way."""
    t0 = time.perf_counter()
    a, b = read_dump(paths[0]), read_dump(paths[1])
    for ta, tb in zip(a.taps, b.taps):
        compare(to_float64(ta.array, ta.dtype), to_float64(tb.array, tb.dtype))
    return time.perf_counter() - t0


def drop_cache(paths) -> None:
    for p in paths:
        fd = os.open(p, os.O_RDONLY)
        os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
        os.close(fd)


def child_peak_rss_mb(code: str) -> float:
    """Peak RSS (VmHWM, reset at exec, unlike ru_maxrss which a forked child inherits)."""
    out = subprocess.run([sys.executable, "-c", code + "\nprint('RSS', [l.split()[1] for l in "
                          "open('/proc/self/status') if l.startswith('VmHWM')][0])"],
                         capture_output=True, text=True, check=True, env={**os.environ, "PYTHONPATH": os.getcwd()})
    return int(out.stdout.split("RSS")[-1]) / 1024


def startup(argv: list[str], runs: int = 5) -> dict:
    exe = str(Path(sys.executable).with_name("parity"))
    # Python's default: bytecode caches written on first import and used after (this
    # machine sets PYTHONDONTWRITEBYTECODE=1, which recompiles parity's modules every run:
    # measured too, as `no_bytecode_cache`)
    cached = {k: v for k, v in os.environ.items() if k != "PYTHONDONTWRITEBYTECODE"}
    subprocess.run([exe, *argv], capture_output=True, env=cached)

    def median(env: dict, cpu: bool = False) -> float:
        """Median wall seconds, or (cpu) median user + system CPU seconds of the process,
        which the load of other work on the machine inflates less."""
        times = []
        for _ in range(runs):
            r0, t0 = resource.getrusage(resource.RUSAGE_CHILDREN), time.perf_counter()
            subprocess.run([exe, *argv], capture_output=True, env=env)
            r1, t1 = resource.getrusage(resource.RUSAGE_CHILDREN), time.perf_counter()
            times.append(r1.ru_utime - r0.ru_utime + r1.ru_stime - r0.ru_stime if cpu else t1 - t0)
        return sorted(times)[len(times) // 2]

    no_cache = {**os.environ, "PYTHONDONTWRITEBYTECODE": "1"}
    probe = subprocess.run([sys.executable, "-c", "import sys, runpy; sys.argv = ['parity', *sys.argv[1:]]\n"
                            "try: runpy.run_module('parity.cli', run_name='__main__')\n"
                            "except SystemExit: pass\n"
                            "print('IMPORTED', 'torch' in sys.modules, 'numba' in sys.modules, file=sys.stderr)",
                            *argv], capture_output=True, text=True)
    torch, numba = probe.stderr.split("IMPORTED")[-1].split()
    return {"median_s": median(cached), "median_s_no_bytecode_cache": median(no_cache),
            "median_cpu_s": median(cached, cpu=True),
            "torch_imported": torch == "True", "numba_imported": numba == "True"}


FRESH_ROUNDS = 5  # interleaved rounds of the fresh-process figure


def fresh_process(tmp: Path, gb: float) -> dict:
    """`parity diff --quiet REF CAND` in a new process (imports, numba's cached kernel
    load, the diff) against a plain h5py read of both files: FRESH_ROUNDS interleaved
    rounds, page cache dropped before every read; the ratio per round (read / diff)."""
    from rounds import spread

    folder = tmp / "fresh"
    folder.mkdir()
    ref, cand, _, _ = write_pair(folder, int(gb * 1e9))
    exe = str(Path(sys.executable).with_name("parity"))
    subprocess.run([exe, "diff", "--quiet", str(ref), str(cand)], capture_output=True)  # numba's cache filled
    read, cli = [], []
    for _ in range(FRESH_ROUNDS):
        drop_cache((ref, cand))
        read.append(plain_read((ref, cand)))
        drop_cache((ref, cand))
        cli.append(_timed(lambda: subprocess.run([exe, "diff", "--quiet", str(ref), str(cand)], capture_output=True)))
    both = os.path.getsize(ref) + os.path.getsize(cand)
    return {"bytes_both": both, "rounds": FRESH_ROUNDS, "plain_read_s": spread(read), "cli_s": spread(cli),
            "cli_vs_plain_read": spread([r / c for r, c in zip(read, cli)])}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--gb", type=float, default=2.0, help="size of each synthetic dump (the multi-GB RSS check)")
    ap.add_argument("--naive-gb", type=float, default=0.5, help="size for the naive whole-read baseline")
    ap.add_argument("--fresh-gb", type=float, default=1.0, help="size of each dump of the fresh-process figure")
    ap.add_argument("--only-fresh", action="store_true", help="only the fresh-process figure")
    ap.add_argument("--out", default="bench/results")
    args = ap.parse_args()
    res: dict = {"card": "cpu", "torch": None, "numpy": np.__version__, "h5py": h5py.version.version,
                 "hdf5": h5py.version.hdf5_version, "cpus": os.cpu_count(), "load_before": os.getloadavg()}
    if args.only_fresh:
        with tempfile.TemporaryDirectory(dir=os.environ.get("PARITY_BENCH_TMP")) as tmp:
            res["fresh_process"] = fresh_process(Path(tmp), args.fresh_gb)
        res["load_after"] = os.getloadavg()
        f = res["fresh_process"]["cli_vs_plain_read"]
        print(f"fresh `parity diff` process vs plain h5py read of both {args.fresh_gb} GB dumps: "
              f"{f['median']:.0%} ({f['min']:.0%}-{f['max']:.0%}), {FRESH_ROUNDS} interleaved rounds")
        write_result(args.out, "offline_fresh", "cpu", res)
        return
    with tempfile.TemporaryDirectory(dir=os.environ.get("PARITY_BENCH_TMP")) as tmp:
        tmp = Path(tmp)
        res["fresh_process"] = fresh_process(tmp, args.fresh_gb)
        # throughput, side by side on a dump small enough for the naive baseline's RAM;
        # each ratio from rounds that alternate the two sides (this machine is shared)
        small = tmp / "small"
        small.mkdir()
        wsecs, rsecs = [], []
        for _ in range(ROUNDS):
            for p in small.iterdir():
                p.unlink()
            ref, cand, wsec, nbytes = write_pair(small, int(args.naive_gb * 1e9))
            wsecs.append(wsec)
            rsecs.append(raw_write_seconds(small / "raw.bin", nbytes))
        wsec, rsec = min(wsecs), min(rsecs)
        res["write"] = {"bytes": nbytes, "dump_MBps": nbytes / 1e6 / wsec, "raw_MBps": nbytes / 1e6 / rsec,
                        "ratio": rsec / wsec, "taps": len(tap_specs(int(args.naive_gb * 1e9))),
                        "rounds": ROUNDS, "checksum": _checksum_impl()}
        both = 2 * os.path.getsize(ref)
        diff_dumps(ref, cand)  # compile or load the kernel once (the numba cache), as any earlier run did
        timings: dict = {"plain_read": [], "parity_diff": [], "parity_cpu": []}
        for _ in range(ROUNDS):
            drop_cache((ref, cand))
            timings["plain_read"].append(plain_read((ref, cand)))
            drop_cache((ref, cand))
            cpu = time.process_time()
            timings["parity_diff"].append(_timed(lambda: diff_dumps(ref, cand)))
            timings["parity_cpu"].append(time.process_time() - cpu)
        drop_cache((ref, cand))
        cli = _timed(lambda: subprocess.run([str(Path(sys.executable).with_name("parity")), "diff", "--quiet",
                                             str(ref), str(cand)], capture_output=True))
        drop_cache((ref, cand))
        numpy_engine = _timed(lambda: _diff_engine(ref, cand, "numpy"))
        drop_cache((ref, cand))
        naive = naive_diff((ref, cand))
        plain, parity = min(timings["plain_read"]), min(timings["parity_diff"])
        res["diff"] = {"bytes_both": both, "rounds": ROUNDS, "engine": _engine_used(both),
                       "plain_read_MBps": both / 1e6 / plain, "parity_diff_MBps": both / 1e6 / parity,
                       "parity_vs_plain_read": plain / parity,
                       "parity_cpu_s": min(timings["parity_cpu"]), "parity_diff_s": parity, "plain_read_s": plain,
                       "cli_fresh_process_MBps": both / 1e6 / cli, "cli_vs_plain_read": plain / cli,
                       "numpy_engine_MBps": both / 1e6 / numpy_engine,
                       "numpy_engine_vs_plain_read": plain / numpy_engine,
                       "naive_diff_MBps": both / 1e6 / naive, "naive_vs_plain_read": plain / naive}
        # peak RSS on a multi-GB dump
        big = tmp / "big"
        big.mkdir()
        for p in (small / "raw.bin", ref, cand):
            p.unlink()
        bref, bcand, _, bbytes = write_pair(big, int(args.gb * 1e9))
        largest = max(ROWS * TOKENS * w * 2 for _, w in tap_specs(int(args.gb * 1e9)))
        t0 = time.perf_counter()
        rss = child_peak_rss_mb(f"from parity.api import diff_dumps; diff_dumps({str(bref)!r}, {str(bcand)!r})")
        res["rss"] = {"dump_bytes_each": os.path.getsize(bref), "largest_tap_MB": largest / 1e6,
                      "peak_rss_MB": rss, "goal_MB": 300 + 2 * largest / 1e6, "seconds": time.perf_counter() - t0,
                      "baseline_import_rss_MB": child_peak_rss_mb("import parity.api, parity.comparison.stream")}
        res["startup"] = {"help": startup(["--help"]), "diff": startup(["diff", str(bref), str(bcand)][:1] + [
            str(_tiny(tmp, "a")), str(_tiny(tmp, "b"))])}
    res["load_after"] = os.getloadavg()
    print(json.dumps(res, indent=2))
    write_result(args.out, "offline", "cpu", res)


def _diff_engine(ref: Path, cand: Path, engine: str) -> None:
    from parity.comparison.stream import diff_readers
    from parity.dump.reader import open_dump

    with open_dump(ref) as a, open_dump(cand) as b:
        diff_readers(a, b, engine=engine)


def _engine_used(data_bytes: int) -> str:
    from parity.comparison import engine

    kernel = engine.load_kernel("auto", data_bytes)
    if kernel is None:
        return "numpy"
    import numba

    return f"fused (numba {numba.__version__})"


def _checksum_impl() -> str:
    from parity.dump import checksum

    return checksum.crc32.__module__


def _timed(fn) -> float:
    t0 = time.perf_counter()
    fn()
    return time.perf_counter() - t0


def _tiny(tmp: Path, name: str) -> Path:
    path = tmp / f"{name}.h5"
    with DumpWriter(path, {}) as w:
        w.add_tap(Tap(TapInfo("t", "s", 0, "c"), 0, np.ones((4, 8), np.float32), "float32"))
    return path


if __name__ == "__main__":
    main()
