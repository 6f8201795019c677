"""Where observing spends its time, per tap: the evidence behind the capture figures.

    PYTHONPATH=. python bench/tap_costs.py --config full --rounds 7

One backend (default `pytorch`), interleaved rounds (bench/rounds.py) of: the plain run;
installing and removing the taps alone (no run); the hooks alone (each tap handed over as
the live tensor and dropped); a device clone per tap; parity's staging with the host copies
dropped; parity's capture to host memory; the stats scan.  Each is printed as the median,
min and max, and as microseconds per tap over the plain run.  Then one capture, one stats
scan and one live compare (against `--cand`) under cProfile: the functions the time is
spent in, written beside the JSON (bench/results/tap_costs_<card>.json).
"""
from __future__ import annotations

import argparse
import cProfile
import io
import pstats
from pathlib import Path

import torch
from record import write_result
from rounds import interleaved, sync
from sinks import DeviceClone, Dropped, HooksOnly

from parity.capture.recorder import Recorder, capture
from parity.capture.stats import StatsSink
from parity.comparison.on_device import diff_on_device
from parity.comparison.rules import Thresholds
from parity.taps.backends import BackendOptions, resolve
from parity.taps.records import Capture


def stats_run(backend):
    sink = StatsSink(meta=dict(backend.meta))
    capture(backend, sink)
    return sink.finish()


def install_only(backend):
    with Recorder(backend.model, backend.probe, Dropped()):
        pass


def unit_costs(device: str, n: int = 2000) -> dict[str, float]:
    """Microseconds per call of each step a tap costs, alone in a tight loop (a [1, 1024,
    2048] bf16 tap, as pi0.5's prefix taps are), device synchronised around each loop."""
    import time

    from parity.capture.staging import Stager

    x = torch.randn(1, 1024, 2048, device=device).to(torch.bfloat16)
    slot = torch.empty(64 << 20, dtype=torch.uint8, device=device).view(torch.bfloat16)
    lin = torch.nn.Linear(8, 8).to(device)
    small = torch.randn(1, 8, device=device)
    hooked = torch.nn.Linear(8, 8).to(device)
    hooked.register_forward_hook(lambda m, a, o: None)
    event = torch.cuda.Event() if device.startswith("cuda") else None
    if event is not None:
        event.record()
    stager = Stager(ring_on_cpu=True)

    def per_call(fn) -> float:
        fn()
        sync()
        t0 = time.perf_counter()
        for _ in range(n):
            fn()
        sync()
        return (time.perf_counter() - t0) * 1e6 / n

    costs = {
        "module call, no hook": per_call(lambda: lin(small)),
        "module call, one forward hook": per_call(lambda: hooked(small)),
        "x.clone()": per_call(lambda: x.clone()),
        "x.detach()": per_call(lambda: x.detach()),
        "slot.as_strided(...).copy_(x)": per_call(
            lambda: slot.as_strided(x.shape, (x.shape[1] * x.shape[2], x.shape[2], 1), 0).copy_(x)),
        "Stager.stage(x) (ring)": per_call(lambda: stager.stage(x)),
    }
    if event is not None:
        costs["torch.cuda.is_current_stream_capturing()"] = per_call(torch.cuda.is_current_stream_capturing)
        costs["event.query()"] = per_call(event.query)
        costs["torch.cuda.Event() + record()"] = per_call(lambda: torch.cuda.Event().record())
    return costs


def device_work(fn) -> dict | None:
    """What one run asks of the GPU: the summed time of its kernels and copies (from
    torch.profiler), how many there were, and how many device allocations the caching
    allocator had to make (cudaMalloc) or retry.  Kernel time close to the wall time
    means the run is bound by the GPU; far below it, by the host launching work."""
    if not torch.cuda.is_available():
        return None
    from torch.profiler import ProfilerActivity, profile

    fn()
    sync()
    before = torch.cuda.memory_stats()
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        fn()
        sync()
    after = torch.cuda.memory_stats()
    device = [e for e in prof.key_averages() if str(getattr(e, "device_type", "")).endswith("CUDA")]
    busy = sum(getattr(e, "self_device_time_total", getattr(e, "self_cuda_time_total", 0)) for e in device)
    return {"device_ms": busy / 1e3, "device_ops": sum(e.count for e in device),
            "cuda_mallocs": after.get("segment.all.allocated", 0) - before.get("segment.all.allocated", 0),
            "alloc_retries": after.get("num_alloc_retries", 0) - before.get("num_alloc_retries", 0)}


def profiled(fn, top: int) -> str:
    prof = cProfile.Profile()
    sync()
    prof.enable()
    fn()
    sync()
    prof.disable()
    text = io.StringIO()
    pstats.Stats(prof, stream=text).sort_stats("tottime").print_stats(top)
    return text.getvalue()


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--config", default="tiny")
    ap.add_argument("--device", default="auto")
    ap.add_argument("--backend", default="pytorch")
    ap.add_argument("--cand", default="flash", help="the live compare's candidate in the profile")
    ap.add_argument("--rounds", type=int, default=7)
    ap.add_argument("--top", type=int, default=30)
    ap.add_argument("--out", default="bench/results")
    args = ap.parse_args()
    opts = BackendOptions(config=args.config, device=args.device)
    backend = resolve(args.backend, opts)
    taps = len(capture(backend, Capture()).taps)
    r = interleaved({"plain": backend.run, "install": lambda: install_only(backend),
                     "hooks": lambda: capture(backend, HooksOnly()),
                     "clone": lambda: capture(backend, DeviceClone()),
                     "staged": lambda: capture(backend, Dropped()),
                     "host": lambda: capture(backend, Capture()),
                     "stats": lambda: stats_run(backend)}, args.rounds)
    plain = r["ms"]["plain"]["median"]
    per_tap = {n: (s["median"] - (0 if n == "install" else plain)) * 1e3 / taps for n, s in r["ms"].items()
               if n != "plain"}
    units = unit_costs(str(next(backend.model.parameters()).device))
    cand = resolve(args.cand, opts)
    profiles = {
        "host": profiled(lambda: capture(backend, Capture()), args.top),
        "stats": profiled(lambda: stats_run(backend), args.top),
        "live": profiled(lambda: diff_on_device(backend, cand, dict(backend.meta), dict(cand.meta),
                                                Thresholds(0.999)), args.top),
    }
    live = lambda: diff_on_device(backend, cand, dict(backend.meta), dict(cand.meta), Thresholds(0.999))  # noqa: E731
    work = {name: device_work(fn) for name, fn in (
        ("plain", backend.run), ("hooks", lambda: capture(backend, HooksOnly())),
        ("host", lambda: capture(backend, Capture())), ("stats", lambda: stats_run(backend)),
        ("plain_ref_and_cand", lambda: (backend.run(), cand.run())), ("live", live))}
    on_cuda = torch.cuda.is_available() and args.device != "cpu"
    card = torch.cuda.get_device_name() if on_cuda else "cpu"
    print(f"card {card}, torch {torch.__version__}, config {args.config}, {args.backend}, {taps} taps, "
          f"{args.rounds} interleaved rounds")
    print(f"{'variant':10} {'median ms':>10} {'min':>9} {'max':>9} {'ratio':>22} {'us/tap':>8}")
    for n, s in r["ms"].items():
        ratio = r["ratio"].get(n)
        cell = "" if ratio is None or n == "install" else \
            f"{ratio['median']:.2f}x ({ratio['min']:.2f}-{ratio['max']:.2f})"
        print(f"{n:10} {s['median']:10.2f} {s['min']:9.2f} {s['max']:9.2f} {cell:>22} "
              f"{per_tap.get(n, 0.0):8.1f}")
    path = write_result(args.out, f"tap_costs_{args.config}", card,
                        {"card": card, "torch": torch.__version__, "config": args.config, "backend": args.backend,
                         "taps": taps, "timing": r, "us_per_tap": per_tap, "unit_costs_us": units, "device_work": work})
    print("unit costs (us per call): " + "; ".join(f"{k} {v:.1f}" for k, v in units.items()))
    for name, w in work.items():
        if w is not None:
            print(f"device work, {name}: {w['device_ms']:.1f} ms in {w['device_ops']} kernels/copies, "
                  f"{w['cuda_mallocs']} cudaMalloc, {w['alloc_retries']} allocator retries")
    for name, text in profiles.items():
        Path(path.with_suffix(f".{name}.prof.txt")).write_text(text)
        print(f"--- profile: {name} (top {args.top} by own time)")
        print("\n".join(text.splitlines()[:args.top // 2 + 8]))


if __name__ == "__main__":
    main()
