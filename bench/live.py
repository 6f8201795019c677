"""What a live diff costs: the on-device compare next to the two plain forwards, side by side.

    PYTHONPATH=. python bench/live.py --config full --device cuda

One process, backends built once, `--runs` interleaved rounds after a warm-up round
(bench/rounds.py: each round runs every variant once, in turn, so passing load weighs on all
alike; each run ended by a device sync; ratios per round, reported as median, min and max):
  plain       reference forward + candidate forward, no taps (the floor; goal: live <= 1.3x)
  host        the host path (`--host-compare`): both runs captured to host memory, numpy diff
  live        the on-device compare (`parity diff --ref --cand`, isolation off)
  live_fault  the same with a planted fault in the candidate (`--fault`), run to the end
  stop_first  the planted fault with --stop-at-first
and whether the live report equals the host report (verdicts, first divergence, largest
relative metric difference).  Writes bench/results/live_<card>.json (the config is inside).
"""
from __future__ import annotations

import argparse
import math
from dataclasses import replace

import torch
from record import write_result
from rounds import interleaved, spread

from parity.capture.recorder import capture
from parity.comparison.loop import diff
from parity.comparison.on_device import diff_on_device
from parity.comparison.rules import Thresholds
from parity.taps.backends import BackendOptions, resolve
from parity.taps.records import Capture


def host_diff(ref, cand, thresholds):
    ref_cap = capture(ref, Capture(meta=dict(ref.meta)))
    cand_cap = capture(cand, Capture(meta=dict(cand.meta)))
    return diff(ref_cap, cand_cap, thresholds)


PHASES: dict = {}  # seconds per phase of the plain live diff, summed over every round


def live_diff(ref, cand, thresholds, stop_at_first=False, phases=None):
    return diff_on_device(ref, cand, dict(ref.meta), dict(cand.meta), thresholds, stop_at_first=stop_at_first,
                          phases=phases)


def largest_relative_difference(a, b) -> float:
    """Largest |x - y| / max(1, |x|) over every metric of every tap of two reports."""
    worst = 0.0
    for ra, rb in zip(a.rows, b.rows):
        if ra.metrics is None or rb.metrics is None:
            continue
        for name in ("cos", "max_abs", "mean_abs", "rel_l2"):
            x, y = getattr(ra.metrics, name), getattr(rb.metrics, name)
            if math.isfinite(x) and math.isfinite(y):
                worst = max(worst, abs(x - y) / max(1.0, abs(x)))
    return worst


def same_verdicts(a, b) -> bool:
    return ([(r.key, r.status) for r in a.rows] == [(r.key, r.status) for r in b.rows]
            and a.problems == b.problems)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--config", default="tiny")
    ap.add_argument("--device", default="auto")
    ap.add_argument("--ref", default="pytorch")
    ap.add_argument("--cand", default="flash")
    ap.add_argument("--fault", default="nomask", help="planted in the candidate for live_fault and stop_first")
    ap.add_argument("--min-cos", type=float, default=0.999)
    ap.add_argument("--runs", type=int, default=7, help="interleaved rounds (at least 5 for a reported ratio)")
    ap.add_argument("--time-host", action=argparse.BooleanOptionalAction, default=True,
                    help="time the host path in every round (at full size on a GPU it takes ~50x a forward)")
    ap.add_argument("--out", default="bench/results")
    args = ap.parse_args()
    opts = BackendOptions(config=args.config, device=args.device)
    ref, cand = resolve(args.ref, opts), resolve(args.cand, opts)
    faulty = resolve(args.cand, replace(opts, faults=(args.fault,)))
    thresholds = Thresholds(args.min_cos)
    variants = {"ref_plain": ref.run, "cand_plain": cand.run, "faulty_plain": faulty.run}
    if args.time_host:
        variants["host"] = lambda: host_diff(ref, cand, thresholds)
    r = interleaved({
        **variants,
        "live": lambda: live_diff(ref, cand, thresholds, phases=PHASES),
        "live_fault": lambda: live_diff(ref, faulty, thresholds),
        "stop_first": lambda: live_diff(ref, faulty, thresholds, stop_at_first=True),
    }, args.runs, keep_last=True)
    last = {f"{k}_ms": v for k, v in r.pop("last").items()}
    if not args.time_host:  # the host report once, for the equality check
        last["host_ms"] = host_diff(ref, cand, thresholds)
    sample = {k: v["samples"] for k, v in r["ms"].items()}
    plain_s = [a + b for a, b in zip(sample["ref_plain"], sample["cand_plain"])]
    fault_s = [a + b for a, b in zip(sample["ref_plain"], sample["faulty_plain"])]
    spreads = {"plain": spread(plain_s), **r["ms"]}
    rows = {f"{k}_ms": v["median"] for k, v in spreads.items()}
    ratio_spreads = {k: spread([x / y for x, y in zip(sample[k], base)])
                     for k, base in (("host", plain_s), ("live", plain_s), ("live_fault", fault_s),
                                     ("stop_first", fault_s)) if k in sample}
    host, live, live_fault, stopped = (last[k] for k in ("host_ms", "live_ms", "live_fault_ms", "stop_first_ms"))
    host_fault = host_diff(ref, faulty, thresholds)
    taps = len(host.rows)
    tap_bytes = sum(math.prod(r.ref_shape) * torch.empty(0, dtype=getattr(torch, r.ref_dtype)).element_size()
                    for r in host.rows if r.ref_shape is not None)
    plain_fault = spread(fault_s)["median"]
    ratios = {k: v["median"] for k, v in ratio_spreads.items()}
    checks = {
        "same_verdicts": same_verdicts(host, live), "same_verdicts_fault": same_verdicts(host_fault, live_fault),
        "max_rel_metric_diff": max(largest_relative_difference(host, live),
                                   largest_relative_difference(host_fault, live_fault)),
        "passed": bool(live), "first_divergence_fault": live_fault.first_divergence.key
        if live_fault.first_divergence else None,
        "stop_first_divergence": stopped.first_divergence.key if stopped.first_divergence else None,
        "stop_first_compared": sum(r.metrics is not None for r in stopped.rows),
    }
    on_cuda = torch.cuda.is_available() and (args.device == "auto" or args.device.startswith("cuda"))
    card = torch.cuda.get_device_name() if on_cuda else "cpu"
    # where the live diff's time goes (the phase split syncs between phases: a little slower)
    phases_ms = {k: v * 1e3 / (args.runs + 1) for k, v in PHASES.items()}
    result = {"card": card, "torch": torch.__version__, "config": args.config, "runs": args.runs,
              "ref": args.ref, "cand": args.cand, "fault": args.fault, "taps": taps, "tap_bytes": tap_bytes,
              "ms": rows, "ratios": ratios, "timing": {"ms": spreads, "ratio": ratio_spreads}, "checks": checks,
              "live_phases_ms": phases_ms}
    print(f"card {card}, torch {torch.__version__}, config {args.config}, {args.ref} vs {args.cand}, "
          f"{taps} taps ({tap_bytes / 1e6:.1f} MB per forward), ratios per round: median (min-max) of "
          f"{args.runs} interleaved rounds")
    print(f"{'what':42} {'ms':>10} {'ratio':>22}   (fault rows: ratio to ref + faulty cand, {plain_fault:.1f} ms)")
    table = [("plain ref + cand forward", "plain", None), ("host path (capture to host, diff)", "host", "host"),
             ("live on-device compare", "live", "live"), (f"live, --inject {args.fault}", "live_fault", "live_fault"),
             (f"live, --inject {args.fault} --stop-at-first", "stop_first", "stop_first")]
    for what, key, ratio in table:
        if key + "_ms" not in rows:
            continue
        s = ratio_spreads.get(ratio)
        text = f"{s['median']:.2f}x ({s['min']:.2f}-{s['max']:.2f})" if s else "1.00x"
        print(f"{what:42} {rows[key + '_ms']:10.2f} {text:>22}")
    print("live diff phases (mean ms per round, device synced between phases): "
          + ", ".join(f"{k} {v:.1f}" for k, v in phases_ms.items()))
    print(f"live report == host report: verdicts {checks['same_verdicts']} / {checks['same_verdicts_fault']} "
          f"(fault), largest relative metric difference {checks['max_rel_metric_diff']:.2e}; "
          f"stop-at-first: first divergence {checks['stop_first_divergence']}, "
          f"{checks['stop_first_compared']} taps compared")
    write_result(args.out, "live", card, result)


if __name__ == "__main__":
    main()
