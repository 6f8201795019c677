"""Where along the tokens: per-region and per-chunk breakdowns, per-head metrics, and the
banner's words only when the evidence supports them (captures built by hand: no torch)."""
from __future__ import annotations

import numpy as np
from rich.console import Console

from parity.comparison.loop import diff
from parity.report.summary import concentration
from parity.report.terminal.diff import render_report
from parity.taps.records import Capture, Layout, Region, Tap, TapInfo

REGIONS = (Region("camera:a", 0, 8), Region("camera:b", 8, 16), Region("text", 16, 24))


def capture(array: np.ndarray, name: str = "s.0.x") -> Capture:
    slots = np.arange(24, dtype=np.int64)[None, :]
    info = TapInfo(name, "s", 0, name.rsplit(".", 1)[1])
    return Capture([Tap(info, 0, array.astype(np.float32), "float32", "tokens")],
                   {"tokens": Layout(slots, 24, REGIONS)})


def noisy(base: np.ndarray, span: slice, scale: float, seed: int = 1) -> np.ndarray:
    out = base.copy()
    noise = np.random.default_rng(seed).standard_normal(out[:, span].shape)
    out[:, span] += scale * noise * np.abs(base[:, span]).mean()
    return out


def text_of(report, **kw) -> str:
    console = Console(file=None, width=200, color_system=None, record=True)
    console.print(render_report(report, **kw))
    return console.export_text()


def test_error_in_one_camera_is_called_concentrated():
    base = np.random.default_rng(0).standard_normal((1, 24, 16))
    report = diff(capture(base), capture(noisy(base, slice(0, 8), 1.0)), chunk=8)
    first = report.first_divergence
    assert concentration(first) == "error concentrated in camera:a tokens (the other regions match)"
    assert set(first.chunks) == {"0-7", "8-15", "16-23"}
    assert first.chunks["0-7"].cos < 0.9 and first.chunks["8-15"].cos == 1.0
    out = text_of(report, by_region=True, by_token=True)
    assert "where: error concentrated in camera:a tokens" in out
    assert "by token region" in out and "by token chunk" in out and "in camera:a" in out


def test_error_everywhere_alike_is_called_uniform():
    base = np.random.default_rng(0).standard_normal((1, 24, 16))
    report = diff(capture(base), capture(noisy(base, slice(0, 24), 0.5)))
    assert concentration(report.first_divergence).startswith("uniform across tokens")


def test_no_words_without_evidence():
    """Every region fails but one far more than another: neither words apply."""
    base = np.random.default_rng(0).standard_normal((1, 24, 16))
    cand = noisy(noisy(base, slice(0, 16), 0.2), slice(16, 24), 3.0, seed=2)
    report = diff(capture(base), capture(cand))
    assert concentration(report.first_divergence) is None
    assert "where:" not in text_of(report)


def test_per_head_metrics_for_head_shaped_taps():
    base = np.random.default_rng(0).standard_normal((1, 24, 2, 8))
    cand = base.copy()
    cand[:, :, 1] += 0.5
    report = diff(capture(base, "s.0.q"), capture(cand, "s.0.q"))
    heads = report.first_divergence.heads
    assert len(heads) == 2 and heads[0].cos == 1.0 and heads[1].cos < 0.99
    assert "by head: h0 cos=1.000000 | h1 cos=" in text_of(report)
    again = type(report).from_dict(report.to_dict())
    assert len(again.rows[0].heads) == 2
