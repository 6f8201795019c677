"""Your own model as a parity backend: a two-layer toy MLP stack, its probe, and a
candidate with a planted bug (docs/backends.md walks through it).

    parity diff --ref examples.toy_backend:reference --cand examples.toy_backend:candidate
"""
from __future__ import annotations

import numpy as np

from parity.taps.backends import Backend, BackendOptions
from parity.taps.probe import Probe, TapRule
from parity.taps.records import Layout, Region

TOKENS, WIDTH = 8, 16

# Which module is which tap: `layers.N.norm` is tap toy.N.norm, `layers.N.mlp` is toy.N.mlp.
PROBE = Probe(arch="toy", rules=(
    TapRule(r"layers\.(?P<layer>\d+)\.(?P<component>norm|mlp)", stack="toy", layout="tokens"),
))


def _build(options: BackendOptions, gelu: bool) -> Backend:
    import torch

    class Layer(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.norm = torch.nn.LayerNorm(WIDTH)
            self.mlp = torch.nn.Sequential(torch.nn.Linear(WIDTH, 4 * WIDTH),
                                           torch.nn.GELU() if gelu else torch.nn.SiLU(),
                                           torch.nn.Linear(4 * WIDTH, WIDTH))

        def forward(self, x):
            return x + self.mlp(self.norm(x))

    torch.manual_seed(options.seed)  # the same seed gives both sides the same weights and inputs
    model = torch.nn.Module()
    model.layers = torch.nn.ModuleList([Layer(), Layer()])
    # Inputs kept in `inputs`, read at run time: parity's float64 oracle run upcasts them there.
    inputs = {"x": torch.randn(options.batch, TOKENS, WIDTH)}

    def run():
        with torch.no_grad():
            h = inputs["x"]
            for layer in model.layers:
                h = layer(h)
            return h

    # Every token slot maps to its canonical position; -1 would mark a don't-care slot.
    slots = np.arange(options.batch * TOKENS).reshape(options.batch, TOKENS)
    layouts = {"tokens": Layout(slots, TOKENS, (Region("first", 0, 4), Region("rest", 4, TOKENS)))}
    return Backend(name="toy", model=model, probe=PROBE, run=run, layouts=lambda: layouts, inputs=inputs,
                   meta={"arch": "toy", "seed": options.seed, "device": "cpu", "dtype": "float32"})


def reference(options: BackendOptions) -> Backend:
    """The toy model as specified: GELU MLPs."""
    return _build(options, gelu=True)


def candidate(options: BackendOptions) -> Backend:
    """The same weights with a bug: SiLU instead of GELU."""
    return _build(options, gelu=False)
