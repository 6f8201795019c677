"""Terminal rendering of a Report: per-layer tables per stack and the verdict banner.

Rendering is its own layer: the report knows nothing about rich."""

from __future__ import annotations

import math

from rich.console import Group
from rich.panel import Panel
from rich.table import Table
from rich.text import Text

from parity.capture.observation import describe
from parity.report.results import Report, TapResult
from parity.report.series import worst as _worst
from parity.report.summary import (
    component_banner,
    concentration,
    frames_banner,
    judgement_line,
    report_banner,
    side_label,
)
from parity.report.terminal.banner import panel
from parity.report.text import shown  # noqa: F401 - part of this module's interface (render.shown)

OK, BAD = "✓", "✗"


def _cell(row: TapResult | None) -> Text:
    if row is None:
        return Text("")
    m = row.metrics
    if m is None or m.n == 0:
        return Text(f"{row.status} {BAD}", style="bold red")
    cos = "nan" if math.isnan(m.cos) else f"{m.cos:.6f}"
    style = "green" if row.passed else "bold red"
    text = Text(f"{cos} {OK if row.passed else BAD}", style=style)
    text.append(f"\nΔ {m.max_abs:.4g}", style="dim")
    return text


def stack_table(stack: str, rows: list[TapResult]) -> Table:
    """One row per layer, one column per component, like the seed's K/V table."""
    components: list[str] = []
    cells: dict[tuple[int, str], list[TapResult]] = {}
    for r in rows:
        if r.info.component not in components:
            components.append(r.info.component)
        cells.setdefault((r.info.layer, r.info.component), []).append(r)
    steps = sorted({r.info.step for r in rows if r.info.step is not None})
    title = f"{stack}" + (f"  (worst of {len(steps)} steps)" if steps else "")
    table = Table(title=Text(shown(title)), title_justify="left", show_lines=False, pad_edge=False)
    table.add_column("layer", justify="right")
    for c in components:
        table.add_column(Text(shown(c)))
    for layer in sorted({r.info.layer for r in rows}):
        row = [str(layer)]
        for c in components:
            found = cells.get((layer, c))
            cell = _cell(_worst(found)) if found else Text("")
            if found and steps and not _worst(found).passed and _worst(found).info.step is not None:
                cell.append(f" @{_worst(found).info.step}", style="red")
            row.append(cell)
        table.add_row(*row)
    return table


def layer_table(title: str, rows: list[TapResult]) -> Table:
    """One layer (or any few taps) top to bottom: a row per tap with all metrics.  Fits a
    narrow terminal or a test failure message where a per-layer row would wrap."""
    table = Table(title=Text(shown(title)), title_justify="left", pad_edge=False)
    for col in ("tap", "cos", "max |Δ|", "rel L2", "status"):
        table.add_column(col)
    for r in rows:
        m = r.metrics
        nums = ["", "", ""] if m is None else [f"{m.cos:.6f}", f"{m.max_abs:.4g}", f"{m.rel_l2:.4g}"]
        status = f"{OK} {r.status}" if r.passed else f"{BAD} {r.status}: {shown(r.reason)}"
        table.add_row(Text(shown(r.key)), *nums, Text(status, style="green" if r.passed else "bold red"))
    return table


def other_table(rows: list[TapResult]) -> Table:
    table = Table(title="other taps", title_justify="left", pad_edge=False)
    for col in ("tap", "cos", "max |Δ|", "status"):
        table.add_column(col)
    groups: dict[str, list[TapResult]] = {}
    for r in rows:
        groups.setdefault(r.info.name, []).append(r)
    for name, found in groups.items():
        w = _worst(found)
        m = w.metrics
        label = w.key if len(found) > 1 and not w.passed else name
        table.add_row(Text(shown(label)), "" if m is None else f"{m.cos:.6f}", "" if m is None else f"{m.max_abs:.4g}",
                      Text(f"{w.status} {OK if w.passed else BAD}", style="green" if w.passed else "bold red"))
    return table


def banner(report: Report) -> Panel:
    return panel(report_banner(report))


def header(report: Report) -> Text:
    text = run_header(report.ref_meta, report.cand_meta)
    judged = judgement_line(report.thresholds)
    if judged:
        text.append("\n")
        text.append(shown(judged), style="dim")
    return text


def run_header(r: dict, c: dict) -> Text:
    """Which two runs were compared: backend, faults, device, dtype; then config (pi0.5)
    or inputs (hf) and, for checkpoint runs, the weights both sides loaded."""
    text = Text(shown(f"ref {side_label(r)}  vs  cand {side_label(c)}"), style="bold")
    if r.get("config") is not None:
        text.append("\n")
        text.append(shown(f"config {r.get('config')}, seed {r.get('seed')}, inputs {r.get('input_fingerprint', '?')}"),
                    style="dim")
    elif r.get("inputs") is not None:
        text.append("\n")
        decode = f", then {r.get('decode')} decode steps ({r.get('cache')} cache)" if r.get("decode") else ""
        text.append(shown(f"inputs {r.get('inputs')} (batch {r.get('batch')}, fingerprint "
                          f"{r.get('input_fingerprint', '?')}), padding {r.get('padding')} vs {c.get('padding')}"
                          + decode), style="dim")
    for side, meta in (("ref", r), ("cand", c)):
        probe = meta.get("probe")
        if isinstance(probe, str) and "not declared" in probe:  # a backend's fallback rules, said so
            text.append("\n")
            text.append(shown(f"{side} tapped by the {probe}"), style="yellow")
    weights = r.get("weights")
    if isinstance(weights, dict):
        text.append("\n")
        text.append(shown(f"weights {weights.get('path', '?')} ({weights.get('layout', '?')} layout)"), style="dim")
    for side, meta in (("ref", r), ("cand", c)):
        note = describe(meta.get("observation"))
        if note:
            text.append("\n")
            text.append(shown(f"{side} observed differently: {note}"), style="yellow")
    return text


def breakdown_table(report: Report, field: str, title: str, limit: int = 24) -> Table | None:
    """Failing taps (first `limit`, execution order) against their token regions
    (`field="regions"`) or chunks (`"chunks"`): cosine per cell, ✗ below the tap's threshold."""
    rows = [r for r in report.rows if not r.passed and getattr(r, field)]
    if not rows:
        return None
    cols: list[str] = []
    for r in rows:
        for k in getattr(r, field):
            if k not in cols:
                cols.append(k)
    first = rows[:limit]
    more = f"  (first {limit} of {len(rows)} failing taps)" if len(rows) > limit else ""
    table = Table(title=Text(shown(title + more)), title_justify="left", pad_edge=False)
    table.add_column("tap")
    for c in cols:
        table.add_column(Text(shown(c)))
    if field == "regions":
        table.add_column("where")
    for r in first:
        cells = []
        for c in cols:
            m = getattr(r, field).get(c)
            if m is None or m.n == 0:
                cells.append(Text(""))
                continue
            ok = r.within(m)
            cells.append(Text(f"{m.cos:.4f} {OK if ok else BAD}", style="green" if ok else "red"))
        extra = [Text(concentration(r, short=True) or "", style="dim")] if field == "regions" else []
        table.add_row(Text(shown(r.key)), *cells, *extra)
    return table


def render_report(report: Report, show_all: bool = False, by_region: bool = False, by_token: bool = False) -> Group:
    parts = [header(report)]
    by_stack: dict[str, list[TapResult]] = {}
    others: list[TapResult] = []
    for r in report.rows:
        (by_stack.setdefault(r.info.stack, []) if r.info.layer is not None else others).append(r)
    for stack, rows in by_stack.items():
        parts.append(stack_table(stack, rows))
    if others:
        parts.append(other_table(others))
    if show_all:
        parts.append(all_taps_table(report))
    if by_region:
        table = breakdown_table(report, "regions", "by token region (cos per region)")
        parts.append(table if table is not None else Text("by region: no failing tap has token regions"))
    if by_token:
        table = breakdown_table(report, "chunks", "by token chunk (cos per chunk of canonical positions)")
        parts.append(table if table is not None else Text("by token: no failing tap has a token layout"))
    parts.append(banner(report))
    return Group(*parts)


def all_taps_table(report: Report) -> Table:
    table = Table(title="all taps", title_justify="left", pad_edge=False)
    for col in ("#", "tap", "cos", "max |Δ|", "mean |Δ|", "rel L2", "status"):
        table.add_column(col)
    for r in report.rows:
        m = r.metrics
        nums = ["", "", "", ""] if m is None else [f"{m.cos:.6f}", f"{m.max_abs:.4g}", f"{m.mean_abs:.4g}",
                                                   f"{m.rel_l2:.4g}"]
        table.add_row(str(r.order if r.order is not None else "-"), Text(shown(r.key)), *nums,
                      Text(r.status if r.passed else f"{r.status}: {shown(r.reason)}",
                           style="green" if r.passed else "red"))
    return table


def render_component(result) -> Group:
    """`parity component`: the re-run part's outputs, one row each, and its verdict."""
    parts = [run_header(result.ref_meta, result.cand_meta)]
    if result.rows:
        parts.append(layer_table(f"{result.unit.name} on the reference's inputs", result.rows))
    parts.append(panel(component_banner(result)))
    return Group(*parts)


def render_frames(result) -> Group:
    """Per-frame verdicts, then the reference's own drift from frame 0 to frame 1 by region
    (the seed's per-chunk table: which tokens change between frames, at which layer)."""
    table = Table(title="candidate vs reference, frame by frame", title_justify="left", pad_edge=False)
    for col in ("frame", "verdict", "first divergence", "reason"):
        table.add_column(col)
    for frame, report in enumerate(result.frames):
        first = report.first_divergence
        table.add_row(str(frame), Text("pass" if report else "FAIL", style="green" if report else "bold red"),
                      Text(first.key if first else "-"), Text(first.reason if first else ""))
    parts = [table]
    if result.drift:
        rows = [r for r in result.drift[0].rows if r.metrics is not None]
        regions = sorted({name for r in rows for name in r.regions})
        drift = Table(title="reference drift, frame 0 -> 1 (cos by token region)", title_justify="left",
                      pad_edge=False)
        drift.add_column("tap")
        for name in regions:
            drift.add_column(name)
        for r in rows:
            drift.add_row(Text(r.key), *(f"{r.regions[n].cos:.6f}" if n in r.regions else "" for n in regions))
        parts.append(drift)
    parts.append(panel(frames_banner(result)))
    return Group(*parts)
