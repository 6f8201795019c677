"""What observing costs: capture overhead next to the uninstrumented run, side by side.

    PYTHONPATH=. python bench/capture.py --config full

Per backend (eager `pytorch`, CUDA-graph `fast`), median wall time per inference of:
plain run; naive hooks (per-hook synchronous `.detach().float().cpu()` into a dict, the
baseline every throw-away script uses); parity's capture to host memory; parity's capture
to an HDF5 dump; and, for graph backends, a steady-state replay of the instrumented graph
(tap copies recorded inside it). Also the dump write rate against a raw sequential write
of the same bytes, and a bit-exactness check of parity's taps against the naive path.
Writes bench/results/capture_<config>_<card>.json.
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

from parity.capture.background import BackgroundWriter, InflightBudget
from parity.capture.recorder import Recorder, capture
from parity.dump.writer import DumpWriter
from parity.taps.backends import BackendOptions, resolve
from parity.taps.codec import to_float64
from parity.taps.records import Capture


def sync():
    if torch.cuda.is_available():
        torch.cuda.synchronize()


def timed(fn, runs: int) -> float:
    fn()  # warm-up
    sync()
    out = []
    for _ in range(runs):
        t0 = time.perf_counter()
        fn()
        sync()
        out.append((time.perf_counter() - t0) * 1e3)
    return statistics.median(out)


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


class Nothing:
    def add_layout(self, *a): pass
    def add_tap(self, *a): pass
    def set_error(self, *a): pass


class HooksOnly(Nothing):
    """Takes each tap as the live tensor and drops it: the cost of the hooks themselves."""
    def add_device_tap(self, info, order, value, layout): pass


class DeviceStash(Nothing):
    """Keeps a device-side clone of each tap: the floor of any exact capture (one copy per tap)."""
    def __init__(self): self.kept = []
    def add_device_tap(self, info, order, value, layout): self.kept.append(value.clone())


def breakdown(backend, runs: int) -> dict:
    """Where an eager capture's time goes: hooks alone, a device-side copy per tap, then the host."""
    return {"hooks_only_ms": timed(lambda: capture(backend, HooksOnly()), runs),
            "device_stash_ms": timed(lambda: capture(backend, DeviceStash()), runs)}


def bench_backend(name: str, opts: BackendOptions, runs: int, tmp: Path) -> dict:
    backend = resolve(name, opts)
    row = {"plain_ms": timed(backend.run, runs)}
    graphed = getattr(backend.model, "graphed", None) is not None
    if not graphed:  # hooks do not fire on graph replays: the naive path cannot observe a graph
        row["naive_ms"] = timed(lambda: naive_run(backend), runs)
    row["capture_host_ms"] = timed(lambda: capture(backend, Capture()), runs)
    if not graphed:
        row.update(breakdown(backend, runs))
    path = tmp / f"{name}.h5"

    def to_dump():
        path.unlink(missing_ok=True)
        with DumpWriter(path, dict(backend.meta)) as w:
            capture(backend, w)

    row["capture_dump_ms"] = timed(to_dump, max(3, runs // 3))
    row["dump_bytes"] = path.stat().st_size

    def to_dump_streamed():  # what `parity capture` does: staged copies, writer thread, bounded in flight
        path.unlink(missing_ok=True)
        half = 1 << 30
        with DumpWriter(path, dict(backend.meta)) as w, BackgroundWriter(w, InflightBudget(half)) as q:
            capture(backend, q, max_staged_bytes=half)

    row["capture_dump_streamed_ms"] = timed(to_dump_streamed, max(3, runs // 3))
    if graphed:  # steady state: replays of the graph with the tap copies inside it
        # the graph the taps force (layers compiled leaf by leaf), captured without taps:
        # separates the cost of the different execution from the cost of the copies
        backend.model.parity_instrumented(True)
        row["uninstrumented_leaf_graph_ms"] = timed(backend.run, runs)
        backend.model.parity_instrumented(False)
        with Recorder(backend.model, backend.probe, Nothing()) as rec:
            backend.run()
            rec.pending.clear()
            row["instrumented_replay_ms"] = timed(backend.run, runs)
            rec.pending.clear()
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
    ap.add_argument("--runs", type=int, default=10)
    ap.add_argument("--out", default="bench/results")
    args = ap.parse_args()
    opts = BackendOptions(config=args.config)
    card = torch.cuda.get_device_name() if torch.cuda.is_available() else "cpu"
    rows = {}
    with tempfile.TemporaryDirectory(dir=os.environ.get("PARITY_BENCH_TMP")) as tmp:
        for name in args.backends.split(","):
            rows[name] = bench_backend(name, opts, args.runs, Path(tmp))
        nbytes = max(r["dump_bytes"] for r in rows.values())
        raw = nbytes / 1e6 / raw_write_seconds(Path(tmp) / "raw.bin", nbytes)
    for r in rows.values():
        p = r["plain_ms"]
        r["ratios"] = {k.removesuffix("_ms"): r[k] / p for k in r if k.endswith("_ms") and k != "plain_ms"}
    result = {"card": card, "torch": torch.__version__, "config": args.config, "runs": args.runs,
              "raw_write_MBps": raw, "backends": rows}
    print(f"card {card}, torch {torch.__version__}, config {args.config}; ratios to the plain run")
    for name, r in rows.items():
        extras = ", ".join(f"{k} {v:.2f}x" for k, v in r["ratios"].items())
        print(f"{name:10} plain {r['plain_ms']:8.2f} ms | {extras} | dump {r['dump_bytes'] / 1e6:.0f} MB"
              + (f" | bit mismatches vs naive {r['bit_mismatches_vs_naive']}/{r['taps']}" if "taps" in r else ""))
    print(f"raw sequential write {raw:.0f} MB/s")
    write_result(args.out, f"capture_{args.config}", card, result)


if __name__ == "__main__":
    main()
