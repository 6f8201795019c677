"""Small inline SVG line charts, written by hand so a report is one self-contained file
(no plotting library, no CDN, no JavaScript).  Titles, series names and tooltips may come
from a dump (tap names): they are written as data (`html_text`)."""

from __future__ import annotations

import math
from dataclasses import dataclass

from parity.report.text import html_text

PALETTE = ("#1f77b4", "#ff7f0e", "#2ca02c", "#9467bd", "#8c564b", "#e377c2", "#17becf", "#bcbd22", "#7f7f7f",
           "#d62728", "#393b79", "#637939")


FAIL = "#d62728"


@dataclass(frozen=True)
class Mark:
    """One point of a series: x, y (None = no value), whether it failed, and a tooltip."""

    x: float
    y: float | None
    failed: bool = False
    label: str = ""


def _log_ticks(lo: float, hi: float) -> list[float]:
    return [10.0 ** e for e in range(math.floor(math.log10(lo)), math.ceil(math.log10(hi)) + 1)]


def _lin_ticks(lo: float, hi: float, n: int = 5) -> list[float]:
    if hi <= lo:
        return [lo]
    raw = (hi - lo) / n
    mag = 10 ** math.floor(math.log10(raw))
    step = next(m * mag for m in (1, 2, 2.5, 5, 10) if m * mag >= raw)
    start = math.ceil(lo / step) * step
    return [start + i * step for i in range(int((hi - start) / step + 1e-9) + 1)]


def _fmt(v: float) -> str:
    if v == 0:
        return "0"
    if abs(v) >= 1e-3 and abs(v) < 1e4:
        return f"{v:.6g}"
    return f"{v:.0e}"


def line_chart(series: dict[str, list[Mark]], *, title: str, y_label: str, x_label: str = "layer",
               log_y: bool = False, y_min: float | None = None, y_max: float | None = None,
               threshold: float | None = None, width: int = 560, height: int = 280,
               log_floor: float = 1e-12) -> str:
    """An SVG line chart, one line per series; failed points are red rings.  On a log
    axis values <= log_floor (exact zeros) sit on the floor, said in their tooltip."""
    left, right, top, bottom = 64, 130, 28, 40
    pw, ph = width - left - right, height - top - bottom
    xs = [m.x for marks in series.values() for m in marks]
    ys = [m.y for marks in series.values() for m in marks if m.y is not None and math.isfinite(m.y)]
    floored = log_y and any(y <= log_floor for y in ys)
    if log_y:
        ys = [max(y, log_floor) for y in ys]
    x0, x1 = (min(xs), max(xs)) if xs else (0.0, 1.0)
    if x1 == x0:
        x0, x1 = x0 - 0.5, x1 + 0.5
    lo = y_min if y_min is not None else (min(ys) if ys else 0.0)
    hi = y_max if y_max is not None else (max(ys) if ys else 1.0)
    if threshold is not None:
        lo, hi = min(lo, threshold), max(hi, threshold)
    if log_y:
        lo, hi = max(lo, log_floor), max(hi, log_floor)
        lo, hi = 10 ** math.floor(math.log10(lo)), 10 ** math.ceil(math.log10(hi))
        if hi <= lo:
            hi = lo * 10
    elif hi - lo < 1e-12:
        lo, hi = lo - 0.5, hi + 0.5

    def sx(x: float) -> float:
        return left + (x - x0) / (x1 - x0) * pw

    def sy(y: float) -> float:
        if log_y:
            y = max(y, log_floor)
            f = (math.log10(y) - math.log10(lo)) / (math.log10(hi) - math.log10(lo))
        else:
            f = (y - lo) / (hi - lo)
        return top + (1 - min(max(f, 0.0), 1.0)) * ph

    out = [f'<svg xmlns="http://www.w3.org/2000/svg" class="chart" width="{width}" height="{height}" '
           f'viewBox="0 0 {width} {height}" role="img" aria-label="{html_text(title)}">',
           f'<title>{html_text(title)}</title>',
           f'<text x="{left}" y="16" font-size="13" font-weight="bold">{html_text(title)}</text>',
           f'<rect x="{left}" y="{top}" width="{pw}" height="{ph}" fill="none" stroke="#999"/>']
    for t in (_log_ticks(lo, hi) if log_y else _lin_ticks(lo, hi)):
        y = sy(t)
        out.append(f'<line x1="{left}" x2="{left + pw}" y1="{y:.1f}" y2="{y:.1f}" stroke="#eee"/>')
        out.append(f'<text x="{left - 4}" y="{y + 4:.1f}" font-size="10" text-anchor="end">{_fmt(t)}</text>')
    ticks = sorted({m.x for marks in series.values() for m in marks})
    every = max(1, math.ceil(len(ticks) / 16))
    for t in ticks[::every]:
        out.append(f'<text x="{sx(t):.1f}" y="{top + ph + 14}" font-size="10" text-anchor="middle">{_fmt(t)}</text>')
    out.append(f'<text x="{left + pw / 2}" y="{height - 6}" font-size="11" text-anchor="middle">'
               f'{html_text(x_label)}</text>')
    out.append(f'<text x="14" y="{top + ph / 2}" font-size="11" text-anchor="middle" '
               f'transform="rotate(-90 14 {top + ph / 2})">{html_text(y_label)}{" (log)" if log_y else ""}</text>')
    if threshold is not None:
        y = sy(threshold)
        out.append(f'<line class="threshold" x1="{left}" x2="{left + pw}" y1="{y:.1f}" y2="{y:.1f}" '
                   f'stroke="{FAIL}" stroke-dasharray="4 3"><title>threshold {threshold}</title></line>')
    for i, (name, marks) in enumerate(series.items()):
        color = PALETTE[i % len(PALETTE)]
        pts = [(sx(m.x), sy(m.y), m) for m in marks if m.y is not None and math.isfinite(m.y)]
        if len(pts) > 1:
            path = " ".join(f"{x:.1f},{y:.1f}" for x, y, _ in pts)
            out.append(f'<polyline points="{path}" fill="none" stroke="{color}" stroke-width="1.5"/>')
        for x, y, m in pts:
            ring = f' stroke="{FAIL}" stroke-width="2"' if m.failed else ""
            out.append(f'<circle cx="{x:.1f}" cy="{y:.1f}" r="{4 if m.failed else 2.5}" fill="{color}"{ring}>'
                       f'<title>{html_text(m.label or f"{name} {m.x}: {m.y}")}</title></circle>')
        ly = top + 12 + i * 15
        out.append(f'<line x1="{left + pw + 10}" x2="{left + pw + 26}" y1="{ly - 4}" y2="{ly - 4}" '
                   f'stroke="{color}" stroke-width="2"/>')
        out.append(f'<text x="{left + pw + 30}" y="{ly}" font-size="11">{html_text(name)}</text>')
    if floored:
        out.append(f'<text x="{left + pw}" y="{top - 4}" font-size="10" text-anchor="end" fill="#777">'
                   f'exact (0) drawn at {_fmt(log_floor)}</text>')
    out.append("</svg>")
    return "\n".join(out)
