"""The long fuzz campaign behind the docs' figures: the fuzz properties of tests/dump/test_fuzz.py
and tests/test_hardening_dumps.py with many more examples, random seeds, and the byte sweep
at every offset.

Generators: random captures (round trips), mutated dumps (flips, cuts, spans), random diffs,
dumps against the same diff in memory (tests/dump/test_fuzz.py); dumps with a member
pointing outside the file (external and soft links, external raw storage, virtual datasets,
aimed at a FIFO, a file, an HDF5 file, the dump itself or nothing), compressed taps
declaring more than a compressor writes (decompression bombs), huge meta strings of any
characters, and taps and layouts without a crc32 (tests/test_hardening_dumps.py).

    .venv/bin/python tools/fuzz.py                       # 10,000 examples per property
    .venv/bin/python tools/fuzz.py --examples 500 --stride 7

pytest runs in a child process under a time limit, so a crash (segfault) or a hang in
the reader shows up as such instead of killing or stalling this script.  Every input
that was tried is tallied with its outcome (a clean DumpError, an identical read, or
"ok" for the diff engine); any other outcome fails the test and the campaign.
"""
from __future__ import annotations

import argparse
import collections
import os
import random
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent


# the fuzz properties (each draws its inputs from PARITY_FUZZ_EXAMPLES examples)
PROPERTIES = [
    "tests/dump/test_fuzz.py",
    *(f"tests/test_hardening_dumps.py::test_fuzzed_{name}" for name in (
        "pointers_outside_the_dump_are_refused_never_followed",
        "compressed_taps_declaring_too_much_are_refused_from_metadata",
        "huge_meta_strings_list_in_linear_time",
        "taps_without_checksums_are_read_and_named",
    )),
]


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--examples", type=int, default=10_000, help="hypothesis examples per property")
    parser.add_argument("--stride", type=int, default=1, help="byte sweep: every STRIDE-th offset")
    parser.add_argument("--seed", type=int, default=None, help="hypothesis seed (default: random)")
    parser.add_argument("--timeout", type=int, default=6 * 3600, help="seconds before the run counts as hung")
    args = parser.parse_args()
    if args.examples < 1 or args.stride < 1:
        parser.error("--examples and --stride must be positive")
    seed = args.seed if args.seed is not None else random.randrange(2**32)

    with tempfile.TemporaryDirectory() as tmp:
        tally = Path(tmp) / "tally"
        env = dict(os.environ, PARITY_FUZZ_EXAMPLES=str(args.examples), PARITY_FUZZ_STRIDE=str(args.stride),
                   PARITY_FUZZ_TALLY=str(tally))
        cmd = [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", *PROPERTIES,
               f"--hypothesis-seed={seed}", "--hypothesis-show-statistics"]
        started = time.monotonic()
        try:
            proc = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=args.timeout)
            rc, output = proc.returncode, proc.stdout + proc.stderr
        except subprocess.TimeoutExpired as exc:
            rc, output = "hung", f"{exc.stdout or ''}{exc.stderr or ''}"
        elapsed = time.monotonic() - started
        counts = collections.Counter(tuple(line.split()) for line in tally.read_text().splitlines()) \
            if tally.exists() else collections.Counter()

    print(output[-6000:])
    print(f"seed {seed}, {args.examples} examples per property, sweep stride {args.stride}, "
          f"{elapsed / 60:.1f} min, pytest exit {rc}")
    per_property = collections.defaultdict(dict)
    for (prop, outcome), n in sorted(counts.items()):
        per_property[prop][outcome] = n
    total = 0
    for prop, outcomes in per_property.items():
        n = sum(outcomes.values())
        total += n
        print(f"  {prop:14} {n:8d} inputs: " + ", ".join(f"{k} {v}" for k, v in outcomes.items()))
    print(f"  {'total':14} {total:8d} inputs, none escaped a clean error" if rc == 0 else
          "  FAILED: see the pytest output above")
    return 0 if rc == 0 else 1


if __name__ == "__main__":
    sys.exit(main())
