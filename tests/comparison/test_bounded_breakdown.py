"""Per-chunk and per-head breakdowns stay bounded whatever a dump declares: a tap with
millions of "heads" or a `--by-token 1` over a layout of 2^24 positions took gigabytes
and wrote a JSON of hundreds of MB."""
from __future__ import annotations

from types import SimpleNamespace

import numpy as np

from parity.comparison.breakdown import MAX_CHUNKS, MAX_HEADS, Groups


def _alignment(n_tokens: int, length: int, feats: tuple[int, ...]):
    layout = SimpleNamespace(length=length, regions=(), region_of=None)
    return SimpleNamespace(canonical=np.arange(n_tokens) * (length // n_tokens), layout=layout,
                           shape=(n_tokens, *feats))


def test_a_fine_by_token_over_a_long_layout_is_widened_to_the_chunk_cap():
    groups = Groups.of(_alignment(1000, 1 << 24, (8,)), chunk=1)
    assert len(groups.chunks) == MAX_CHUNKS
    assert groups.chunks[0] == f"0-{(1 << 24) // MAX_CHUNKS - 1}"  # the label says the real range
    assert groups.chunk_of.max() < MAX_CHUNKS


def test_a_short_layout_keeps_the_chunk_asked_for():
    groups = Groups.of(_alignment(64, 64, (8,)), chunk=16)
    assert groups.chunks == ("0-15", "16-31", "32-47", "48-63")


def test_too_many_heads_get_no_per_head_rows():
    assert Groups.of(_alignment(4, 4, (MAX_HEADS, 2)), chunk=None).heads == MAX_HEADS
    assert Groups.of(_alignment(4, 4, (2_000_000, 1)), chunk=None).heads == 0
