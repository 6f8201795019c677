"""The streamed offline diff gives the in-memory diff's verdicts and numbers, in chunks
small enough to cross rows, token windows and region boundaries."""
from __future__ import annotations

import math

import pytest

import parity.comparison.stream
from parity.api import capture_live, compare_captures
from parity.comparison.dumps import diff_dumps
from parity.dump.writer import write_dump
from parity.taps.backends import BackendOptions


@pytest.mark.parametrize("chunk", [7, 1000, 1 << 20])
def test_streamed_diff_equals_in_memory_diff(tmp_path, monkeypatch, chunk):
    monkeypatch.setattr(parity.comparison.stream, "CHUNK_ELEMENTS", chunk)
    opts = BackendOptions(seed=3, batch=2)
    ref = capture_live("pytorch", opts)
    cand = capture_live("flash", BackendOptions(seed=3, batch=2, faults=("nomask",)))  # packed layout, a bug
    write_dump(tmp_path / "r.h5", ref)
    write_dump(tmp_path / "c.h5", cand)
    want = compare_captures(ref, cand)
    got = diff_dumps(tmp_path / "r.h5", tmp_path / "c.h5")
    assert bool(got) == bool(want) and got.first_divergence.key == want.first_divergence.key
    assert [r.key for r in got.rows] == [r.key for r in want.rows]
    for a, b in zip(got.rows, want.rows):
        assert a.status == b.status, a.key
        if b.metrics is None:
            continue
        assert a.metrics.n == b.metrics.n and a.metrics.max_abs == b.metrics.max_abs
        assert a.metrics.max_abs_index == b.metrics.max_abs_index
        assert math.isclose(a.metrics.cos, b.metrics.cos, rel_tol=1e-12, abs_tol=1e-12)
        assert set(a.regions) == set(b.regions)
        for name in b.regions:
            assert math.isclose(a.regions[name].cos, b.regions[name].cos, rel_tol=1e-12, abs_tol=1e-12)


def test_streamed_diff_of_identical_dumps_is_exactly_one(tmp_path, monkeypatch):
    monkeypatch.setattr(parity.comparison.stream, "CHUNK_ELEMENTS", 100)
    cap = capture_live("flash", BackendOptions(seed=4))
    write_dump(tmp_path / "a.h5", cap)
    report = diff_dumps(tmp_path / "a.h5", tmp_path / "a.h5")
    assert report and all(r.metrics.cos == 1.0 and r.metrics.max_abs == 0.0 for r in report.rows)
