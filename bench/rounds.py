"""Interleaved rounds: the one way the benches time variants against each other.

Each round runs every variant once, in turn (device synchronised around each), so load
that comes and goes on a shared machine weighs on all of them alike.  A ratio is taken
per round (variant / base of the same round) and reported as the median of the rounds
with its min and max; an absolute time as the median, min and max of its samples.
Shared by the bench scripts (run as `python bench/NAME.py`, so this sits beside them)."""
from __future__ import annotations

import statistics
import time
from collections.abc import Callable


def sync() -> None:
    import torch

    if torch.cuda.is_available():
        torch.cuda.synchronize()


def spread(values: list[float]) -> dict:
    """median / min / max of a list of samples (and the samples themselves)."""
    return {"median": statistics.median(values), "min": min(values), "max": max(values),
            "samples": [round(v, 6) for v in values]}


def interleaved(variants: dict[str, Callable[[], object]], rounds: int, warmup: int = 1,
                base: str | None = None, keep_last: bool = False,
                setup: dict[str, Callable[[], object]] | None = None) -> dict:
    """{"ms": {name: spread}, "ratio": {name: spread of name / base per round}} after
    `warmup` untimed rounds; `base` defaults to the first variant.  `keep_last`: also
    "last": {name: what the variant returned in the last round}.  `setup`: per variant,
    something run untimed just before it (e.g. re-capturing a CUDA graph that the
    previous variant's taps replaced, so the plain replay is timed, not the re-capture)."""
    if rounds < 1:
        raise ValueError("at least one timed round")
    base = base or next(iter(variants))
    samples: dict[str, list[float]] = {name: [] for name in variants}
    last: dict[str, object] = {}
    for i in range(warmup + rounds):
        for name, fn in variants.items():
            if setup and name in setup:
                setup[name]()
            sync()
            t0 = time.perf_counter()
            out = fn()
            sync()
            elapsed = (time.perf_counter() - t0) * 1e3
            if keep_last:
                last[name] = out
            del out
            if i >= warmup:
                samples[name].append(elapsed)
    result = {"rounds": rounds, "base": base, "ms": {n: spread(v) for n, v in samples.items()},
              "ratio": {n: spread([a / b for a, b in zip(v, samples[base])])
                        for n, v in samples.items() if n != base}}
    if keep_last:
        result["last"] = last
    return result


def cell(r: dict, name: str) -> str:
    """'1.23x (1.20-1.31)': a ratio's median and spread, as the tables print it."""
    s = r["ratio"][name]
    return f"{s['median']:.2f}x ({s['min']:.2f}-{s['max']:.2f})"
