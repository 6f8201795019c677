"""Where inside a tap an error lives: per region, per chunk of positions, per head.

The groups are defined once here (`Groups`) and every comparer (host, streamed, on the
device) breaks a tap down by them, so their tables agree group for group and label for
label.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator
from dataclasses import dataclass

import numpy as np

from parity.comparison.align import Alignment
from parity.comparison.metrics import Metrics, compare

MAX_CHUNKS = 1024  # per tap: a finer --by-token is widened to this many chunks (labels show the real ranges)
MAX_HEADS = 256  # a tap with more "heads" than this gets no per-head rows (memory and JSON stay bounded)


def chunk_size(chunk: int, length: int) -> int:
    """The chunk size used for a layout of `length` positions: `chunk`, widened so that a
    tap has at most MAX_CHUNKS chunks."""
    return max(chunk, -(-length // MAX_CHUNKS))


def chunk_label(k: int, size: int, length: int) -> str:
    """Chunk k of `size` canonical positions, as the tables name it: "16-31"."""
    return f"{k * size}-{min((k + 1) * size, length) - 1}"


@dataclass(frozen=True)
class Groups:
    """The groups of one aligned pair: the named region and the `--by-token` chunk each
    compared token is in, and the attention heads of a token.  Empty without a token
    layout (the whole tensor is compared as one)."""

    region_of: np.ndarray | None  # [N] region index of each compared token (-1: none); None: no regions
    regions: tuple[str, ...]  # region names, by index
    chunk_of: np.ndarray | None  # [N] chunk index of each compared token; None: no chunks asked for
    chunks: tuple[str, ...]  # chunk labels, by index: "0-15", "16-31", ...
    heads: int  # heads per token for [N, heads, dim] taps (q, k, v as attention sees them), else 0

    @classmethod
    def of(cls, a: Alignment, chunk: int | None) -> Groups:
        """The groups of `a`'s compared tokens; `chunk`: positions per chunk (None: no chunks)."""
        idx, layout = a.canonical, a.layout
        if idx is None or layout is None:
            return cls(None, (), None, (), 0)
        region_of = layout.region_of(idx) if layout.regions else None
        chunk = chunk_size(chunk, layout.length) if chunk else None
        chunk_of = (idx % layout.length) // chunk if chunk else None
        chunks = tuple(chunk_label(k, chunk, layout.length) for k in range(-(-layout.length // chunk))) \
            if chunk else ()
        feats = a.shape[1:]
        heads = feats[0] if len(feats) == 2 and 2 <= feats[0] <= MAX_HEADS else 0
        return cls(region_of, tuple(r.name for r in layout.regions), chunk_of, chunks, heads)

    def token_groups(self) -> Iterator[tuple[str, str, np.ndarray]]:
        """(kind, name, which tokens [N] bool) of every region, then every chunk, that holds
        a compared token, in index order."""
        for kind, of, names in (("region", self.region_of, self.regions), ("chunk", self.chunk_of, self.chunks)):
            if of is None:
                continue
            for i, name in enumerate(names):
                on = of == i
                if on.any():
                    yield kind, name, on

    def tables(self, regions: Iterable[tuple[int, Metrics]],
               chunks: Iterable[tuple[int, Metrics]]) -> tuple[dict, dict]:
        """(regions, chunks) tables from metrics by group index (tokens in no region: -1)."""
        return ({self.regions[i]: m for i, m in sorted(regions, key=lambda p: p[0]) if i >= 0},
                {self.chunks[k]: m for k, m in sorted(chunks, key=lambda p: p[0])})


def breakdown(r64: np.ndarray, c64: np.ndarray, groups: Groups) -> tuple[dict, dict, list]:
    """(regions, chunks, heads) Metrics of a pair's compared arrays r64, c64 [N, *features]."""
    tables: dict[str, dict] = {"region": {}, "chunk": {}}
    for kind, name, on in groups.token_groups():
        tables[kind][name] = compare(r64[on], c64[on])
    heads = [compare(r64[:, h], c64[:, h]) for h in range(groups.heads)]  # [N, dim] per head
    return tables["region"], tables["chunk"], heads
