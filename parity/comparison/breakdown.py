"""Where inside a tap an error lives: per region, per chunk of positions, per head."""

from __future__ import annotations

import numpy as np

from parity.comparison.metrics import compare
from parity.taps.records import Layout


def chunk_metrics(r64: np.ndarray, c64: np.ndarray, idx: np.ndarray | None, layout: Layout | None,
                  size: int) -> dict:
    """Metrics per chunk of `size` canonical positions ("0-15", "16-31", ...), the seed's
    per-chunk table: where along the sequence an error lives, region names or not."""
    if layout is None or idx is None:
        return {}
    pos = idx % layout.length
    which = pos // size
    return {f"{k * size}-{min((k + 1) * size, layout.length) - 1}": compare(r64[which == k], c64[which == k])
            for k in np.unique(which)}


def head_metrics(r64: np.ndarray, c64: np.ndarray, idx: np.ndarray | None) -> list:
    """Per attention head, for token tensors whose features are [heads, head_dim] (q, k, v
    as the attention core sees them): which heads carry the error."""
    if idx is None or r64.ndim != 3 or r64.shape[1] < 2:
        return []
    return [compare(r64[:, h], c64[:, h]) for h in range(r64.shape[1])]


def region_metrics(r64: np.ndarray, c64: np.ndarray, idx: np.ndarray | None, layout: Layout | None) -> dict:
    """Metrics per named region of the layout (image vs text tokens, each camera, ...):
    where in the sequence a divergence lives.  Empty when the layout declares none."""
    if layout is None or idx is None or not layout.regions:
        return {}
    which = layout.region_of(idx)
    return {reg.name: compare(r64[which == i], c64[which == i]) for i, reg in enumerate(layout.regions)
            if (which == i).any()}
