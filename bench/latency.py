"""Speed next to parity: per backend, median latency split into vision / prefix / denoise
(CUDA events, warm-up, N runs), speed-up vs the reference measured in the same run, and
the parity figures of the same inputs (min cos over taps, final-action cos / max diff).

    PYTHONPATH=. python bench/latency.py --config full --backends pytorch,flash,flash_fp8

Writes bench/results/latency_<config>_<card>.json and prints a table.
"""
from __future__ import annotations

import argparse
import statistics
import time

import torch
from record import write_result

from parity.api import compare_captures
from parity.capture.recorder import capture
from parity.comparison.metrics import compare
from parity.comparison.rules import Thresholds
from parity.taps.backends import BackendOptions, resolve
from parity.taps.codec import to_float64
from parity.taps.records import Capture

STAGES = ("vision", "prefix", "denoise")


def _graph_only(opts):
    """`fast` without torch.compile: how much the graph alone buys."""
    from parity.probes.pi05.backends import build
    from parity.probes.pi05.model import Variant

    return build("fast", opts, Variant(packed=True, fp8_mlp=True, cuda_graph=True, compiled=False))


ABLATIONS = {"fast_nocompile": _graph_only}


def time_backend(backend, runs: int, warmup: int) -> dict:
    """Median ms per stage and total, timed with CUDA events (host clock on CPU)."""
    model = backend.model
    cuda = next(model.parameters()).is_cuda
    samples: dict[str, list[float]] = {}
    for i in range(warmup + runs):
        marks: list[tuple[str, object]] = []

        def mark(stage, marks=marks):
            if cuda:
                ev = torch.cuda.Event(enable_timing=True)
                ev.record()
                marks.append((stage, ev))
            else:
                marks.append((stage, time.perf_counter()))

        mark("start")
        model.sample_actions(*backend.inputs, mark=mark)
        if cuda:
            torch.cuda.synchronize()
        if i < warmup:
            continue
        for (_, a), (stage, b) in zip(marks, marks[1:]):
            samples.setdefault(stage, []).append(a.elapsed_time(b) if cuda else (b - a) * 1e3)
        first, last = marks[0][1], marks[-1][1]
        samples.setdefault("total", []).append(first.elapsed_time(last) if cuda else (last - first) * 1e3)
    return {k: statistics.median(v) for k, v in samples.items() if v}


def parity_figures(ref_cap, cand_cap) -> dict:
    report = compare_captures(ref_cap, cand_cap, Thresholds())
    coses = [r.metrics.cos for r in report.rows if r.metrics is not None]
    a = {t.key: t for t in ref_cap.taps}["output.actions"]
    b = {t.key: t for t in cand_cap.taps}["output.actions"]
    m = compare(to_float64(a.array, a.dtype), to_float64(b.array, b.dtype))
    return {"min_cos": min(coses) if coses else None, "action_cos": m.cos, "action_max_abs": m.max_abs,
            "first_divergence": report.first_divergence.key if report.first_divergence else None}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--config", default="tiny")
    ap.add_argument("--backends", default="pytorch,flash,flash_fp8,fast")
    ap.add_argument("--runs", type=int, default=20)
    ap.add_argument("--warmup", type=int, default=3)
    ap.add_argument("--device", default="auto")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--out", default="bench/results")
    args = ap.parse_args()
    opts = BackendOptions(config=args.config, seed=args.seed, device=args.device)
    names = args.backends.split(",")
    rows, ref_cap = {}, None
    for name in names:
        backend = ABLATIONS[name](opts) if name in ABLATIONS else resolve(name, opts)
        rows[name] = {"latency_ms": time_backend(backend, args.runs, args.warmup), "device": backend.meta["device"]}
        cap = capture(backend, Capture(meta=dict(backend.meta)))
        del backend
        if torch.cuda.is_available():
            torch.cuda.empty_cache()
        if ref_cap is None:
            ref_cap = cap
        rows[name]["parity"] = parity_figures(ref_cap, cap)
        del cap
    ref_total = rows[names[0]]["latency_ms"]["total"]
    for r in rows.values():
        r["speedup"] = ref_total / r["latency_ms"]["total"]
    card = torch.cuda.get_device_name() if torch.cuda.is_available() and args.device != "cpu" else "cpu"
    result = {"card": card, "torch": torch.__version__, "config": args.config, "runs": args.runs,
              "warmup": args.warmup, "seed": args.seed, "backends": rows}
    print(f"card {card}, torch {torch.__version__}, config {args.config}, median of {args.runs} runs")
    print(f"{'backend':12} {'total ms':>9} {'vision':>8} {'prefix':>8} {'denoise':>8} {'speedup':>8} "
          f"{'min cos':>9} {'act cos':>10} {'act maxd':>9}")
    for name, r in rows.items():
        lat, par = r["latency_ms"], r["parity"]
        stages = " ".join(f"{lat[s]:8.2f}" for s in STAGES)
        print(f"{name:12} {lat['total']:9.2f} {stages} "
              f"{r['speedup']:7.2f}x {par['min_cos']:9.6f} {par['action_cos']:10.6f} {par['action_max_abs']:9.4g}")
    write_result(args.out, f"latency_{args.config}", card, result)


if __name__ == "__main__":
    main()
