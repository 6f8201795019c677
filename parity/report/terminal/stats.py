"""Terminal rendering of stats runs and stats diffs (rich); the results know nothing of it."""

from __future__ import annotations

import math

from rich.console import Group
from rich.panel import Panel
from rich.table import Table
from rich.text import Text

from parity.report.results import MEASURES, StatsReport, StatsResult
from parity.report.summary import stats_banner
from parity.report.terminal.banner import panel
from parity.report.terminal.diff import run_header
from parity.report.text import shown
from parity.taps.stats import StatsCapture

SAME, CLOSE, BAD = "=", "≈", "✗"


def _g(x: float | None) -> str:
    if x is None or (isinstance(x, float) and math.isnan(x)):
        return "nan"
    return f"{x:.4g}"


def _cell(rows: list[StatsResult]) -> Text:
    """A layer x component cell (the worst of its steps): = bit-identical, ≈ largest
    measure within tolerance, ✗ status or largest measure beyond it."""
    failing = [r for r in rows if not r.passed]
    if failing:
        r = failing[0]
        worst = r.worst
        shown_as = _g(worst) if r.status == "fail" and worst is not None else r.status
        return Text(f"{BAD} {shown_as}", style="bold red")
    if all(r.identical for r in rows):
        return Text(SAME, style="green")
    return Text(f"{CLOSE} {_g(max((r.worst or 0.0) for r in rows))}", style="green")


def stack_tables(report: StatsReport) -> list[Table]:
    """Per stack, one row per layer, one column per component (like the tensor diff's)."""
    by_stack: dict[str, list[StatsResult]] = {}
    other: list[StatsResult] = []
    for r in report.rows:
        (by_stack.setdefault(r.info.stack, []) if r.info.layer is not None else other).append(r)
    tables = []
    for stack, rows in by_stack.items():
        components = list(dict.fromkeys(r.info.component for r in rows))
        cells: dict[tuple[int, str], list[StatsResult]] = {}
        for r in rows:
            cells.setdefault((r.info.layer, r.info.component), []).append(r)
        table = Table(title=Text(shown(stack)), title_justify="left", pad_edge=False)
        table.add_column("layer", justify="right")
        for c in components:
            table.add_column(Text(shown(c)))
        for layer in sorted({r.info.layer for r in rows}):
            table.add_row(str(layer), *[_cell(cells[(layer, c)]) if (layer, c) in cells else Text("")
                                        for c in components])
        tables.append(table)
    if other:
        names: dict[str, list[StatsResult]] = {}
        for r in other:
            names.setdefault(r.info.name, []).append(r)
        table = Table(title="other taps", title_justify="left", pad_edge=False)
        table.add_column("tap")
        table.add_column("stats")
        for name, rows in names.items():
            table.add_row(Text(shown(name)), _cell(rows))
        tables.append(table)
    return tables


def all_taps_table(report: StatsReport) -> Table:
    table = Table(title="every tap (measures: relative change of L2 norm, std, max |x|; mean shift in ref std)",
                  title_justify="left", pad_edge=False)
    for col in ("tap", "ref norm", *MEASURES, "status"):
        table.add_column(col)
    for r in report.rows:
        ref = r.ref_stats
        status = "= identical" if r.identical else f"{r.status} {shown(r.reason)}".strip()
        table.add_row(Text(shown(r.key)), _g(ref["l2"]) if ref is not None else "-",
                      *[_g(r.measures.get(m)) if r.measures else "-" for m in MEASURES],
                      Text(status, style="green" if r.passed else "bold red"))
    return table


def banner(report: StatsReport) -> Panel:
    return panel(stats_banner(report))


def render_stats_report(report: StatsReport, show_all: bool = False) -> Group:
    parts = [run_header(report.ref_meta, report.cand_meta), *stack_tables(report)]
    if show_all:
        parts.append(all_taps_table(report))
    parts.append(banner(report))
    return Group(*parts)


def render_stats_capture(stats: StatsCapture) -> Table:
    """`parity inspect` of a stats dump: each tap's identity and summaries."""
    table = Table(title="stats dump (per-tap summaries, no tensors)", title_justify="left", pad_edge=False)
    for col in ("#", "tap", "shape", "dtype", "layout", "l2", "mean", "std", "min", "max", "nan/inf", "checksum"):
        table.add_column(col)
    for t in stats.taps:
        bad = int(t["nan"] + t["posinf"] + t["neginf"])
        table.add_row(str(t.order), Text(shown(t.key)), str(list(t.shape)), Text(shown(t.dtype)),
                      Text(shown((t.layout or "-") + (" (valid)" if t.tokens == "valid" else ""))),
                      _g(t["l2"]), _g(t["mean"]), _g(t["std"]), _g(t["min"]), _g(t["max"]),
                      Text(str(bad), style="bold red" if bad else ""), f"{t.checksum & 0xFFFFFFFFFFFFFFFF:016x}")
    return table
