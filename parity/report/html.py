"""A report as one self-contained HTML file: verdict banner, per-stack curves (cosine and
relative error on a log axis) as inline SVG, per-layer and per-tap tables, region
breakdown and run metadata.  No scripts, no external resources: it opens anywhere and
can be attached to a ticket as it is.  Every text that came from a dump or a result is
written as data (`html_text`): markup characters as entities, control, bidi and ESC
characters escaped."""

from __future__ import annotations

import json
import math

from parity.report.results import Report, TapResult
from parity.report.series import StackSeries, stack_level, stack_series
from parity.report.summary import (
    FAIL_TONE,
    HINT,
    MUTED,
    PASS_TONE,
    PLAIN,
    STRONG,
    Banner,
    fmt,
    fmt_g,
    report_banner,
    side_label,
)
from parity.report.svg import Mark, line_chart
from parity.report.text import html_text

CSS = """
body { font-family: system-ui, -apple-system, Segoe UI, sans-serif; margin: 24px; color: #222; }
h1 { font-size: 20px; } h2 { font-size: 17px; margin-top: 28px; } h3 { font-size: 14px; }
.banner { border: 2px solid; border-radius: 6px; padding: 10px 14px; margin: 12px 0; }
.banner.pass { border-color: #2ca02c; background: #eefaee; }
.banner.fail { border-color: #d62728; background: #fdeeee; }
.banner .head { font-weight: bold; font-size: 16px; }
.banner div { margin: 2px 0; } .banner div.in { margin-left: 18px; }
.banner .good { color: #1e7b1e; font-weight: bold; } .banner .bad { color: #b71c1c; font-weight: bold; }
.banner .hint { color: #8a6100; font-weight: bold; } .banner .strong { font-weight: bold; }
table { border-collapse: collapse; font-size: 12px; margin: 8px 0; }
th, td { border: 1px solid #ccc; padding: 3px 6px; text-align: right; white-space: nowrap; }
th { background: #f4f4f4; } td.l, th.l { text-align: left; }
td.pass { background: #eefaee; } td.fail, tr.fail td { background: #fdeeee; }
td.first, tr.first td { outline: 2px solid #d62728; }
.charts { display: flex; flex-wrap: wrap; gap: 12px; }
.muted { color: #777; } code { font-size: 12px; }
details { margin: 8px 0; }
"""


def _td(text: str, cls: str = "") -> str:
    return f'<td class="{cls}">{html_text(text)}</td>' if cls else f"<td>{html_text(text)}</td>"


def _number_td(text: str) -> str:
    """A cell of a number parity formatted itself (digits, `.`, `-`, `e`, `nan`): nothing to escape."""
    return f"<td>{text}</td>"


def _status_class(row: TapResult | None, first: TapResult | None) -> str:
    if row is None:
        return ""
    cls = "pass" if row.passed else "fail"
    return cls + (" first" if row is first else "")


TONE_CLASS = {PASS_TONE: "good", FAIL_TONE: "bad", MUTED: "muted", HINT: "hint", STRONG: "strong", PLAIN: ""}


def banner(report: Report) -> str:
    return banner_html(report_banner(report))


def banner_html(b: Banner) -> str:
    """The verdict's lines, one <div> each: the headline first, details indented."""
    out = []
    for i, line in enumerate(b.lines):
        classes = ["head"] if i == 0 else []
        if line.detail:
            classes.append("in")
        if len(line.parts) == 1:
            classes.append(TONE_CLASS[line.parts[0][1]])
            body = html_text(line.text)
        else:
            body = "".join(f'<span class="{TONE_CLASS[tone]}">{html_text(text)}</span>' if TONE_CLASS[tone]
                           else html_text(text) for text, tone in line.parts)
        cls = " ".join(c for c in classes if c)
        out.append(f'<div class="{cls}">{body}</div>' if cls else f"<div>{body}</div>")
    return f'<div class="banner {"pass" if b.passed else "fail"}" id="verdict">{"".join(out)}</div>'


def _marks(s: StackSeries, component: str, value) -> list[Mark]:
    out = []
    for p in s.points[component]:
        v = value(p)
        label = f"{p.row.key}: cos {fmt(p.cos)}, rel err {fmt_g(p.rel_l2)}, {p.row.status}"
        out.append(Mark(p.layer, v, not p.row.passed, label))
    return out


def charts(s: StackSeries, min_cos: float | None) -> str:
    cos = {c: _marks(s, c, lambda p: p.cos) for c in s.components}
    rel = {c: _marks(s, c, lambda p: p.rel_l2) for c in s.components}
    steps = f" (worst of {s.steps} steps)" if s.steps else ""
    finite = [m.y for ms in cos.values() for m in ms if m.y is not None and math.isfinite(m.y)]
    lo = min(finite + ([min_cos] if min_cos is not None else [])) if finite else None
    pad = max((1 - lo) * 0.05, 1e-7) if lo is not None else 0
    return ('<div class="charts">'
            + line_chart(cos, title=f"{s.stack}: cosine similarity per layer{steps}", y_label="cos",
                         y_min=None if lo is None else lo - pad, y_max=1 + pad, threshold=min_cos)
            + line_chart(rel, title=f"{s.stack}: relative L2 error per layer{steps}", y_label="rel err", log_y=True)
            + "</div>")


def layer_table(s: StackSeries, first: TapResult | None) -> str:
    head = "".join(f"<th>{html_text(c)}</th>" for c in s.components)
    rows = []
    for layer in s.layers:
        cells = []
        for c in s.components:
            row = s.cell(layer, c)
            text = "" if row is None else (fmt(row.cos) if row.cos is not None else row.status)
            if row is not None and row.info.step is not None and not row.passed:
                text += f" @{row.info.step}"
            cells.append(_td(text, _status_class(row, first)))
        rows.append(f"<tr><td>{layer}</td>{''.join(cells)}</tr>")
    return f'<table class="layers"><tr><th>layer</th>{head}</tr>{"".join(rows)}</table>'


def tap_table(report: Report, rows: list[TapResult], first: TapResult | None, table_id: str) -> str:
    cols = ("#", "tap", "cos", "max |Δ|", "mean |Δ|", "rel L2", "threshold", "shape", "dtype", "status")
    head = "".join(f'<th class="{"l" if c in ("tap", "status") else ""}">{html_text(c)}</th>' for c in cols)
    body = []
    for r in rows:
        m = r.metrics
        dtype = r.ref_dtype if r.ref_dtype == r.cand_dtype else f"{r.ref_dtype} / {r.cand_dtype}"
        shape = list(r.ref_shape or r.cand_shape or [])
        status = r.status if r.passed else f"{r.status}: {r.reason}"
        cls = ("pass" if r.passed else "fail") + (" first" if r is first else "")
        body.append(f'<tr class="{cls}">' + "".join([
            _number_td("" if r.order is None else str(r.order)), _td(r.key, "l"), _number_td(fmt(r.cos)),
            _number_td(fmt_g(m.max_abs) if m else ""), _number_td(fmt_g(m.mean_abs) if m else ""),
            _number_td(fmt_g(m.rel_l2) if m else ""), _number_td(f"{r.threshold:g}"), _number_td(str(shape)),
            _td(str(dtype or "")), _td(status, "l")]) + "</tr>")
    return f'<table class="taps" id="{table_id}"><tr>{head}</tr>{"".join(body)}</table>'


def region_table(report: Report) -> str:
    """Per-region metrics of every tap with regions, failing taps first (at most 30)."""
    rows = [r for r in report.rows if r.regions]
    if not rows:
        return ""
    rows = sorted(rows, key=lambda r: (r.passed, r.order if r.order is not None else 1 << 30))[:30]
    names = list(dict.fromkeys(n for r in rows for n in r.regions))
    head = "".join(f"<th>{html_text(n)}</th>" for n in names)
    body = []
    for r in rows:
        cells = "".join(_td(fmt(r.regions[n].cos) if n in r.regions else "",
                            ("pass" if r.within(r.regions[n]) else "fail") if n in r.regions else "")
                        for n in names)
        body.append(f'<tr><td class="l">{html_text(r.key)}</td>{cells}</tr>')
    return ('<h2>Region breakdown</h2><p class="muted">cosine per token region (failing taps first).</p>'
            f'<table class="regions"><tr><th class="l">tap</th>{head}</tr>{"".join(body)}</table>')


def meta_table(report: Report) -> str:
    r, c = report.ref_meta, report.cand_meta
    keys = [k for k in dict.fromkeys([*r, *c]) if k != "modules"]
    body = []
    for k in keys:
        a, b = r.get(k), c.get(k)
        cls = "" if a == b else "fail"
        body.append(f'<tr><td class="l">{html_text(k)}</td>{_td(_show(a), "l " + cls)}{_td(_show(b), "l " + cls)}</tr>')
    body.append(f'<tr><td class="l">thresholds</td><td class="l" colspan="2">'
                f'{html_text(json.dumps(report.thresholds))}</td></tr>')
    return f'<table class="meta"><tr><th class="l">key</th><th class="l">ref</th><th class="l">cand</th></tr>' \
           f'{"".join(body)}</table>'


def _show(v) -> str:
    if v is None:
        return "-"
    return v if isinstance(v, str) else json.dumps(v)


def render_html(report: Report, title: str | None = None) -> str:
    first = report.first_divergence
    min_cos = report.thresholds.get("min_cos")
    title = title or f"parity: {report.ref_meta.get('backend', 'ref')} vs {report.cand_meta.get('backend', 'cand')}"
    parts = [f"<h1>{html_text(title)}</h1>",
             f'<p>ref <code>{html_text(side_label(report.ref_meta))}</code> vs cand '
             f'<code>{html_text(side_label(report.cand_meta))}</code></p>',
             banner(report)]
    for s in stack_series(report):
        parts.append(f'<h2 id="stack-{html_text(s.stack)}">Stack {html_text(s.stack)}</h2>')
        parts.append(charts(s, min_cos))
        parts.append(layer_table(s, first))
    others = stack_level(report)
    if others:
        parts.append("<h2>Stack-level taps</h2>" + tap_table(report, others, first, "stack-level"))
    parts.append(region_table(report))
    parts.append("<h2>All taps</h2>" + tap_table(report, report.rows, first, "all-taps"))
    parts.append("<h2>Run metadata</h2>" + meta_table(report))
    return ("<!DOCTYPE html>\n<html lang=\"en\"><head><meta charset=\"utf-8\">"
            f"<title>{html_text(title)}</title><style>{CSS}</style></head><body>\n"
            + "\n".join(p for p in parts if p) + "\n</body></html>\n")
