"""Terminal rendering of a Report: per-layer tables per stack and the verdict banner.

Rendering is its own layer: the report knows nothing about rich."""
from __future__ import annotations

import math
import unicodedata

from rich.console import Group
from rich.panel import Panel
from rich.table import Table
from rich.text import Text

from .report import Report, TapResult

OK, BAD = "✓", "✗"
# Unicode categories never shown raw: controls (ESC can rewrite the terminal), format
# characters (bidi overrides reorder what is shown), line/paragraph separators, surrogates.
_HIDDEN_CATEGORIES = frozenset({"Cc", "Cf", "Zl", "Zp", "Cs", "Co", "Cn"})


def shown(value: object) -> str:
    """`value` as text that is safe on a terminal: control and format characters escaped.

    Tap names, paths and messages come from dumps, which may come from anywhere; they are
    shown as data (callers wrap them in `Text`, never in console markup) and a name like
    "\\x1b[2J" must not clear the screen."""
    text = str(value)
    if text.isprintable():
        return text
    out = []
    for ch in text:
        if unicodedata.category(ch) in _HIDDEN_CATEGORIES:
            code = ord(ch)
            out.append(f"\\x{code:02x}" if code < 0x100 else f"\\u{code:04x}" if code < 0x10000 else f"\\U{code:08x}")
        else:
            out.append(ch)
    return "".join(out)


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


def _worst(rows: list[TapResult]) -> TapResult:
    """The row to show for a (layer, component) seen at several steps: the first failure,
    else the lowest cosine."""
    failing = [r for r in rows if not r.passed]
    if failing:
        return failing[0]
    return min(rows, key=lambda r: r.cos if r.cos is not None and not math.isnan(r.cos) else -2.0)


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
    first = report.first_divergence
    n = len(report.rows)
    if report.passed:
        return Panel(Text(f"PASS: all {n} taps within thresholds (min cos {report.thresholds.get('min_cos')})",
                          style="bold green"), border_style="green")
    lines = Text()
    if first is not None:
        i = first.info
        where = f"stack {i.stack}, layer {i.layer if i.layer is not None else '-'}, component {i.component}"
        if i.step is not None:
            where += f", step {i.step}"
        lines.append(f"FIRST DIVERGENCE: {shown(first.key)}\n", style="bold red")
        lines.append(f"  {shown(where)}\n")
        lines.append(f"  {first.status}: {shown(first.reason)}\n")
        upstream = _upstream_matches(report, first)
        if upstream:
            lines.append(f"  still matching just before it: {shown(upstream)}\n", style="dim")
    for p in report.problems:
        lines.append(f"FAIL: {shown(p)}\n", style="bold red")
    counts = ", ".join(f"{k} {v}" for k, v in sorted(report.counts().items()))
    lines.append(f"{n} taps: {counts}", style="dim")
    return Panel(lines, border_style="red")


def _upstream_matches(report: Report, first: TapResult, limit: int = 3) -> str:
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


def header(report: Report) -> Text:
    def side(meta: dict) -> str:
        faults = meta.get("faults") or []  # a dump's meta is arbitrary JSON: any type may turn up
        faults = ",".join(map(str, faults)) if isinstance(faults, list) else str(faults)
        extra = f" [inject {faults}]" if faults else ""
        return f"{meta.get('backend', '?')}{extra} ({meta.get('device', '?')}, {meta.get('dtype', '?')})"

    r, c = report.ref_meta, report.cand_meta
    text = Text(shown(f"ref {side(r)}  vs  cand {side(c)}"), style="bold")
    if r.get("config") is not None:
        text.append("\n")
        text.append(shown(f"config {r.get('config')}, seed {r.get('seed')}, inputs {r.get('input_fingerprint', '?')}"),
                    style="dim")
    return text


def render_report(report: Report, show_all: bool = False) -> Group:
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
