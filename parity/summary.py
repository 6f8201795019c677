"""The verdict in words, shared by every rendering (terminal, HTML, Markdown, JUnit)."""
from __future__ import annotations

import math

from .report import Report, TapResult


def side_label(meta: dict) -> str:
    """`backend [inject f] (device, dtype)` for one run."""
    faults = meta.get("faults") or []
    extra = f" [inject {','.join(faults)}]" if faults else ""
    return f"{meta.get('backend', '?')}{extra} ({meta.get('device', '?')}, {meta.get('dtype', '?')})"


def where(row: TapResult) -> str:
    i = row.info
    text = f"stack {i.stack}, layer {i.layer if i.layer is not None else '-'}, component {i.component}"
    return text + (f", step {i.step}" if i.step is not None else "")


def upstream_matches(report: Report, first: TapResult, limit: int = 3) -> str:
    """The passing taps of the same layer just before the first divergence (e.g. the K/V
    that still match when attention fails)."""
    out = []
    for r in report.rows:
        if r is first:
            break
        same = (r.info.stack, r.info.layer, r.info.step) == (first.info.stack, first.info.layer, first.info.step)
        if same and r.passed and r.metrics is not None:
            out.append(f"{r.info.component} cos={r.metrics.cos:.6f} max_diff={r.metrics.max_abs:.4g}")
    return " | ".join(out[-limit:])


def regions_line(row: TapResult) -> str:
    """Per-region cosine of a tap, e.g. `image cos=1.000000 | text cos=0.412`."""
    parts = []
    for name, m in row.regions.items():
        cos = "nan" if math.isnan(m.cos) else f"{m.cos:.6f}"
        parts.append(f"{name} cos={cos} max_diff={m.max_abs:.4g}")
    return " | ".join(parts)


def counts_line(report: Report) -> str:
    counts = ", ".join(f"{k} {v}" for k, v in sorted(report.counts().items()))
    return f"{len(report.rows)} taps: {counts}"


def headline(report: Report) -> str:
    if report.passed:
        return f"PASS: all {len(report.rows)} taps within thresholds (min cos {report.thresholds.get('min_cos')})"
    first = report.first_divergence
    if first is not None:
        return f"FIRST DIVERGENCE: {first.key}"
    return "FAIL: " + "; ".join(report.problems)


def fmt(x: float | None, digits: int = 6) -> str:
    if x is None:
        return ""
    if math.isnan(x):
        return "nan"
    return f"{x:.{digits}f}"


def fmt_g(x: float | None) -> str:
    if x is None:
        return ""
    return "nan" if math.isnan(x) else f"{x:.4g}"
