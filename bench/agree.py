"""Which figures of two runs of one benchmark agree: a GPU figure is reported only when a
second run, in a separate call, agrees within 10 % (docs/benchmarks.md).

    python bench/agree.py bench/results/stats_nvidia_h200_run1.json bench/results/stats_nvidia_h200_run2.json

Walks both JSON files for the spreads bench/rounds.py writes ({"median", "min", "max"}) at
the same place and prints, per figure, both medians and whether they agree within
`--within` (relative to the smaller).  Exits 1 if any figure does not, 2 on a bad file.
"""
from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Iterator
from pathlib import Path


def spreads(node, path: str = "") -> Iterator[tuple[str, float]]:
    """(path, median) of every spread in a result, in file order."""
    if isinstance(node, dict):
        if {"median", "min", "max"} <= node.keys() and isinstance(node["median"], (int, float)):
            yield path, float(node["median"])
            return
        for key, value in node.items():
            yield from spreads(value, f"{path}.{key}" if path else str(key))


def agreement(a: dict, b: dict, within: float, only: str = "") -> list[tuple[str, float, float, bool]]:
    """(figure, median 1, median 2, agree?) for the spreads both results hold under `only`."""
    second = dict(spreads(b))
    rows = []
    for path, x in spreads(a):
        if path in second and only in path:
            y = second[path]
            low = min(abs(x), abs(y))
            rows.append((path, x, y, abs(x - y) <= within * low if low else x == y))
    return rows


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("first")
    ap.add_argument("second")
    ap.add_argument("--within", type=float, default=0.10)
    ap.add_argument("--only", default="ratio", help="figures whose path contains this ('' for all)")
    args = ap.parse_args()
    try:
        a, b = (json.loads(Path(p).read_text()) for p in (args.first, args.second))
    except (OSError, ValueError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    rows = agreement(a, b, args.within, args.only)
    if not rows:
        print("error: no figure in common", file=sys.stderr)
        return 2
    width = max(len(p) for p, *_ in rows)
    for path, x, y, ok in rows:
        print(f"{path:{width}}  {x:10.4g}  {y:10.4g}  {'agree' if ok else 'DIFFER'}")
    differ = sum(not ok for *_, ok in rows)
    print(f"{len(rows) - differ} of {len(rows)} figures agree within {args.within:.0%}")
    return 1 if differ else 0


if __name__ == "__main__":
    sys.exit(main())
