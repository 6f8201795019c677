"""What a stats scan costs: plain forward vs stats capture vs full capture to host, side by side.

    PYTHONPATH=. python bench/stats.py --config full --device cuda

Per backend (default `pytorch,fast`), interleaved rounds (bench/rounds.py: the modes take turns
within each round, after a warm-up round, CUDA synchronised; ratios per round, reported as
median, min and max) of: the plain run; parity's stats capture (every tap summarised
on its
device, results fetched in batches: `StatsSink`); the same plus writing the stats dump;
and parity's full capture to host memory (every tap copied to the host: `Capture`).
Ratios are to the plain run of the same backend in the same process.  Also the bytes
each mode brings to the host, and a check that the stats run's checksums equal those of
the full capture's host copies summarised again (the device and the host agree bit for bit).
Writes bench/results/stats_<card>.json (card, torch version, config, numbers).
"""
from __future__ import annotations

import argparse
import os
import tempfile
from pathlib import Path

import torch
from record import write_result
from rounds import cell, interleaved

from parity.capture.recorder import capture
from parity.capture.stats import StatsSink, checksum
from parity.dump.stats import write_stats
from parity.taps.backends import BackendOptions, resolve
from parity.taps.records import Capture


def stats_run(backend):
    sink = StatsSink(meta=dict(backend.meta))
    capture(backend, sink)
    return sink.finish()


def bench_backend(name: str, opts: BackendOptions, runs: int, tmp: Path) -> dict:
    backend = resolve(name, opts)
    path = tmp / f"{name}_stats.h5"
    graphed = getattr(backend.model, "graphed", None) is not None
    # a graph backend's plain run is a replay: re-captured untimed after a run with taps
    timing = interleaved({"plain": backend.run, "stats": lambda: stats_run(backend),
                          "stats_dump": lambda: write_stats(path, stats_run(backend)),
                          "full_host": lambda: capture(backend, Capture())}, runs,
                         setup={"plain": backend.run} if graphed else None)
    row = {"timing": timing, "graphed": graphed}
    stats, full = stats_run(backend), capture(backend, Capture())
    row["taps"] = len(stats.taps)
    row["full_host_bytes"] = sum(t.array.nbytes for t in full.taps)
    row["stats_host_bytes"] = sum(t.values.nbytes + 8 for t in stats.taps)
    row["stats_dump_bytes"] = path.stat().st_size
    # device vs host: the stats run's checksums equal the full capture's taps checksummed on the
    # host (taps under a token layout are summarised over their valid tokens: compare whole-tensor taps)
    whole = [s for s in stats.taps if s.tokens == "all"]
    by_key = full.by_key()
    mismatches = 0
    for s in whole:
        tap = by_key[s.key]
        host = torch.from_numpy(tap.array)
        mismatches += int(int(checksum(host)) != s.checksum)
    row["checksums_checked"], row["checksum_mismatches_device_vs_host"] = len(whole), mismatches
    backend = None  # the model goes before the next one is built (the closures above are done with it)
    if torch.cuda.is_available():
        torch.cuda.empty_cache()
    return row


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--config", default="tiny", choices=("tiny", "full"))
    ap.add_argument("--device", default="auto")
    ap.add_argument("--backends", default="pytorch,fast")
    ap.add_argument("--runs", type=int, default=7, help="interleaved rounds (at least 5 for a reported ratio)")
    ap.add_argument("--out", default="bench/results")
    args = ap.parse_args()
    opts = BackendOptions(config=args.config, device=args.device)
    on_cuda = torch.cuda.is_available() and args.device != "cpu"
    card = torch.cuda.get_device_name() if on_cuda else "cpu"
    rows, errors = {}, {}
    with tempfile.TemporaryDirectory(dir=os.environ.get("PARITY_BENCH_TMP")) as tmp:
        for name in args.backends.split(","):
            try:
                rows[name] = bench_backend(name, opts, args.runs, Path(tmp))
            except Exception as exc:  # noqa: BLE001 - one backend failing must not lose the others' figures
                print(f"{name}: failed: {type(exc).__name__}: {exc}")
                errors[name] = f"{type(exc).__name__}: {exc}"
    result = {"card": card, "torch": torch.__version__, "config": args.config, "device": args.device,
              "runs": args.runs, "cpus": os.cpu_count(), "backends": rows, "errors": errors}
    print(f"card {card}, torch {torch.__version__}, config {args.config}; ratios to the plain run of the same "
          f"round: median (min-max) of {args.runs} interleaved rounds (a graph backend's stats and full runs "
          "include re-capturing its graph with the taps inside; its plain run is a replay)")
    print(f"{'backend':10} {'taps':>5} {'plain ms':>9} {'stats':>20} {'stats + dump':>20} {'full to host':>20} "
          f"{'host bytes stats / full':>26}")
    for name, r in rows.items():
        t = r["timing"]
        cells = [cell(t, k) for k in ("stats", "stats_dump", "full_host")]
        print(f"{name:10} {r['taps']:5d} {t['ms']['plain']['median']:9.2f} {cells[0]:>20} {cells[1]:>20} "
              f"{cells[2]:>20} {r['stats_host_bytes']:>12,} / {r['full_host_bytes']:,}")
        print(f"{'':10} checksums device vs host: {r['checksum_mismatches_device_vs_host']} of "
              f"{r['checksums_checked']} whole-tensor taps differ")
    write_result(args.out, "stats", card, result)


if __name__ == "__main__":
    main()
