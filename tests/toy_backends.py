"""Toy backends for the fail-closed tests, loaded by spec: `toy_backends:slow` etc.

Importable with tests/ on the path (pytest puts it there; subprocesses get PYTHONPATH).
Timing is made deterministic with files instead of guesses: before running tap i the
model writes i to $PARITY_TOY_PROGRESS (so taps 0..i-1 have reached the sink when a
test reads i), and with $PARITY_TOY_GATE set it waits for that file to exist before the
first tap.  The run is a chain of tapped layers, so a tap's values depend on the seed
only, and an interrupted capture can be checked tap by tap against a complete one.

Knobs (environment, read when the factory runs): PARITY_TOY_TAPS (number of tapped
layers, default 8), PARITY_TOY_SLEEP (seconds before each layer, default 0),
PARITY_TOY_WIDTH (features per tap, default 16).  `--inject raise` makes layer 3 raise.
"""
from __future__ import annotations

import os
import time
from pathlib import Path

import torch
from torch import nn

from parity.taps.backends import Backend, BackendOptions
from parity.taps.probe import Probe, TapRule

RAISE_AT = 3
WEIRD_NAMES = (  # (stack, component): become tap names "<stack>.<layer>.<component>"
    ("a/b", "c/d"),
    ("..", ".."),
    ("../../etc", "passwd"),
    ("/abs", "x"),
    ("ünï", "日本🙂"),
    ("[/]", "[bold red]x"),
    ("esc", "\x1b[2Jclear"),
    ("bidi", "\u202eevil"),
)


class Layer(nn.Module):
    def __init__(self, width: int, fail: bool):
        super().__init__()
        self.lin = nn.Linear(width, width)
        self.fail = fail

    def forward(self, h):
        if self.fail:
            raise RuntimeError("toy layer exploded [on purpose]")
        return torch.tanh(self.lin(h))


class Chain(nn.Module):
    def __init__(self, n: int, width: int, fail_at: int | None, sleep: float):
        super().__init__()
        self.layers = nn.ModuleList(Layer(width, i == fail_at) for i in range(n))
        self.sleep = sleep

    def forward(self, h):
        progress, gate = os.environ.get("PARITY_TOY_PROGRESS"), os.environ.get("PARITY_TOY_GATE")
        if gate:
            deadline = time.monotonic() + 120
            while not Path(gate).exists() and time.monotonic() < deadline:
                time.sleep(0.02)
        for i, layer in enumerate(self.layers):
            if progress:
                Path(progress).write_text(f"{i}\n")
            time.sleep(self.sleep)
            h = layer(h)
        return h


def _build(opts: BackendOptions, rules, name: str) -> Backend:
    n = int(os.environ.get("PARITY_TOY_TAPS", "8"))
    width = int(os.environ.get("PARITY_TOY_WIDTH", "16"))
    sleep = float(os.environ.get("PARITY_TOY_SLEEP", "0"))
    unknown = set(opts.faults) - {"raise"}
    if unknown:
        raise ValueError(f"unknown fault {', '.join(sorted(unknown))} (toy knows: raise)")
    torch.manual_seed(opts.seed)
    model = Chain(n, width, RAISE_AT if "raise" in opts.faults else None, sleep)
    x = torch.randn(2, width, generator=torch.Generator().manual_seed(opts.seed))

    def run():
        with torch.no_grad():
            model(x)

    meta = {"backend": name, "arch": "toy", "faults": sorted(opts.faults), "seed": opts.seed,
            "input_fingerprint": f"toy-{opts.seed}-{n}-{width}"}
    return Backend(name, model, Probe("toy", tuple(rules)), run=run, layouts=dict, meta=meta)


def slow(opts: BackendOptions) -> Backend:
    """A chain of tapped layers `toy.<i>.out`, optionally slow (see the module doc)."""
    return _build(opts, [TapRule(r"layers\.(?P<layer>\d+)", stack="toy", component="out")], "toy")


def weird(opts: BackendOptions) -> Backend:
    """The same chain, its taps named with '/', '..', unicode, markup and control characters."""
    rules = [TapRule(rf"layers\.(?P<layer>{i})", stack=stack, component=comp)
             for i, (stack, comp) in enumerate(WEIRD_NAMES)]
    return _build(opts, rules, "weird")
