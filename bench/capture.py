"""What observing costs: capture overhead next to the uninstrumented run, side by side.

    PYTHONPATH=. python bench/capture.py --config full

Per backend (eager `pytorch`, CUDA-graph `fast`), interleaved rounds (bench/rounds.py: each
round runs every variant once, ratios taken within the round, reported as median, min and
max) of: the plain run; naive hooks (per-hook synchronous `.detach().float().cpu()` into a
dict, the baseline every throw-away script uses); the hooks alone; a device clone per tap;
parity's capture to host memory; to an HDF5 dump; streamed to HDF5 as `parity capture`
does.  For graph backends, rounds of steady-state replays: the plain graph, the graph the
taps force without taps (layers compiled leaf by leaf), and the graph with the tap copies
inside, each re-captured untimed before its replays.  Also the dump write rate against a
raw sequential write of the same bytes, and a bit-exactness check of parity's taps against
the naive path.  Writes bench/results/capture_<config>_<card>.json.
"""
from __future__ import annotations

import argparse
import os
import statistics
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
from disk import raw_write_seconds
from record import write_result
from rounds import cell, interleaved, spread, sync
from sinks import DeviceClone, Dropped, HooksOnly

from parity.capture.background import BackgroundWriter, InflightBudget
from parity.capture.recorder import Recorder, capture
from parity.dump.writer import DumpWriter
from parity.taps.backends import BackendOptions, resolve
from parity.taps.codec import to_float64
from parity.taps.records import Capture


def naive_run(backend) -> dict:
    """The throw-away-script way: a forward hook per tapped module, synchronous host copy."""
    store, handles = {}, []
    for name, module in backend.model.named_modules():
        hit = backend.probe.tap_for(name)
        if hit is None:
            continue
        rule, _, _, tap = hit

        def hook(m, a, out, tap=tap, rule=rule):
            value = out[rule.select] if rule.select is not None else out
            store.setdefault(tap, []).append(value.detach().float().cpu())

        handles.append(module.register_forward_hook(hook))
    try:
        backend.run()
    finally:
        for h in handles:
            h.remove()
    return store


def replays(backend, n: int) -> float:
    """Median ms of `n` graph replays (the first run after a reset re-captures: untimed)."""
    backend.run()
    out = []
    for _ in range(n):
        sync()
        t0 = time.perf_counter()
        backend.run()
        sync()
        out.append((time.perf_counter() - t0) * 1e3)
    return statistics.median(out)


def graph_rounds(backend, rounds: int, per_round: int = 10) -> dict:
    """For a CUDA-graph backend: per round, replays of the plain graph, of the graph the
    taps force with no tap installed (layers compiled leaf by leaf), and of the graph with
    the tap copies inside, each after its own untimed re-capture; ratios per round."""
    ms: dict[str, list[float]] = {"plain": [], "leaf_graph": [], "instrumented_replay": []}
    for i in range(rounds + 1):
        backend.model.parity_instrumented(False)
        plain = replays(backend, per_round)
        backend.model.parity_instrumented(True)
        leaf = replays(backend, per_round)
        backend.model.parity_instrumented(False)
        with Recorder(backend.model, backend.probe, Dropped()) as rec:
            backend.run()  # re-captures with the tap copies inside
            rec.pending.clear()
            inst = replays(backend, per_round)
            rec.pending.clear()
        if i:  # the first round warms up
            ms["plain"].append(plain)
            ms["leaf_graph"].append(leaf)
            ms["instrumented_replay"].append(inst)
    backend.model.parity_instrumented(False)
    return {"rounds": rounds, "base": "plain", "ms": {k: spread(v) for k, v in ms.items()},
            "ratio": {k: spread([a / b for a, b in zip(v, ms["plain"])]) for k, v in ms.items() if k != "plain"}}


def bench_backend(name: str, opts: BackendOptions, rounds: int, tmp: Path) -> dict:
    backend = resolve(name, opts)
    graphed = getattr(backend.model, "graphed", None) is not None
    path = tmp / f"{name}.h5"

    def to_dump():
        path.unlink(missing_ok=True)
        with DumpWriter(path, dict(backend.meta)) as w:
            capture(backend, w)

    def to_dump_streamed():  # what `parity capture` does: staged copies, writer thread, bounded in flight
        path.unlink(missing_ok=True)
        half = 1 << 30
        with DumpWriter(path, dict(backend.meta)) as w, BackgroundWriter(w, InflightBudget(half)) as q:
            capture(backend, q, max_staged_bytes=half)

    variants = {"plain": backend.run}
    if not graphed:  # hooks do not fire on graph replays: the naive path cannot observe a graph
        variants.update({"naive": lambda: naive_run(backend), "hooks_only": lambda: capture(backend, HooksOnly()),
                         "device_clone": lambda: capture(backend, DeviceClone())})
    variants.update({"capture_host": lambda: capture(backend, Capture()), "capture_dump": to_dump,
                     "capture_dump_streamed": to_dump_streamed})
    # a graph backend's plain run is a replay: re-captured untimed after a run with taps
    row = {"timing": interleaved(variants, rounds, setup={"plain": backend.run} if graphed else None)}
    row["dump_bytes"] = path.stat().st_size
    if graphed:  # steady state: replays of the graph with the tap copies inside it
        row["graph"] = graph_rounds(backend, rounds)
    else:  # exactness: parity's taps decode to exactly what the naive float copy holds
        cap = capture(backend, Capture())
        naive = naive_run(backend)
        seen: dict[str, int] = {}
        mismatches = 0
        for t in cap.taps:
            i = seen.get(t.info.name, 0)
            seen[t.info.name] = i + 1
            ref = naive[t.info.name][i].numpy().astype(np.float64)
            mismatches += int(not np.array_equal(to_float64(t.array, t.dtype), ref))
        row["taps"], row["bit_mismatches_vs_naive"] = len(cap.taps), mismatches
    backend = None  # the model goes before the next one is built (the closures above are done with it)
    if torch.cuda.is_available():
        torch.cuda.empty_cache()
    return row


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--config", default="tiny")
    ap.add_argument("--backends", default="pytorch,fast")
    ap.add_argument("--rounds", type=int, default=7, help="interleaved rounds (at least 5 for a reported ratio)")
    ap.add_argument("--out", default="bench/results")
    args = ap.parse_args()
    opts = BackendOptions(config=args.config)
    card = torch.cuda.get_device_name() if torch.cuda.is_available() else "cpu"
    rows = {}
    with tempfile.TemporaryDirectory(dir=os.environ.get("PARITY_BENCH_TMP")) as tmp:
        for name in args.backends.split(","):
            rows[name] = bench_backend(name, opts, args.rounds, Path(tmp))
        nbytes = max(r["dump_bytes"] for r in rows.values())
        raw = nbytes / 1e6 / raw_write_seconds(Path(tmp) / "raw.bin", nbytes)
    result = {"card": card, "torch": torch.__version__, "config": args.config, "rounds": args.rounds,
              "raw_write_MBps": raw, "backends": rows}
    print(f"card {card}, torch {torch.__version__}, config {args.config}; ratios to the plain run of the same "
          f"round: median (min-max) of {args.rounds} interleaved rounds")
    for name, r in rows.items():
        t = r["timing"]
        extras = ", ".join(f"{k} {cell(t, k)}" for k in t["ratio"])
        print(f"{name:10} plain {t['ms']['plain']['median']:8.2f} ms | {extras} | dump {r['dump_bytes'] / 1e6:.0f} MB"
              + (f" | bit mismatches vs naive {r['bit_mismatches_vs_naive']}/{r['taps']}" if "taps" in r else ""))
        if "graph" in r:
            g = r["graph"]
            print(f"{'':10} graph replay {g['ms']['plain']['median']:.2f} ms | "
                  + ", ".join(f"{k} {cell(g, k)}" for k in g["ratio"]))
    print(f"raw sequential write {raw:.0f} MB/s")
    write_result(args.out, f"capture_{args.config}", card, result)


if __name__ == "__main__":
    main()
