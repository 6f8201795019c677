"""Terminal rendering of a WeightsReport: one row per kind of parameter (layers folded
into `*`), the findings one line each, and the verdict banner."""

from __future__ import annotations

import math
from collections.abc import Mapping
from types import MappingProxyType

from rich.console import Group
from rich.panel import Panel
from rich.table import Table
from rich.text import Text

from parity.report.results import ParamResult, WeightsReport
from parity.report.summary import weights_banner
from parity.report.terminal.banner import panel
from parity.report.terminal.diff import BAD, OK, run_header


def _fmt(x: float | None, spec: str) -> str:
    return "" if x is None or math.isnan(x) else format(x, spec)


SHORT: Mapping[str, str] = MappingProxyType({"float64": "f64", "float32": "f32", "bfloat16": "bf16", "float16": "f16",
                                             "float8_e4m3fn": "e4m3", "float8_e5m2": "e5m2"})


def _dtypes(rows: list[ParamResult]) -> str:
    """Short dtype names, `ref -> cand` where they differ, `(q)` for declared quantisation."""
    pairs = {(SHORT.get(r.ref_dtype, r.ref_dtype or "-"), SHORT.get(r.cand_dtype, r.cand_dtype or "-"))
             for r in rows}
    text = ", ".join(a if a == b else f"{a} -> {b}" for a, b in sorted(pairs))
    return text + (" (q)" if any(r.quantized for r in rows) else "")


def _schemes(rows: list[ParamResult]) -> str | None:
    """The quantisation schemes the (q) rows were judged as, with how many parameters each."""
    counts: dict[str, int] = {}
    for r in rows:
        if r.quantized:
            counts[r.quantized] = counts.get(r.quantized, 0) + 1
    if not counts:
        return None
    return "(q) quantised as: " + "; ".join(f"{name} ({n})" for name, n in counts.items())


def group_table(report: WeightsReport) -> Table:
    groups: dict[str, list[ParamResult]] = {}
    for r in report.rows:
        groups.setdefault(r.group, []).append(r)
    table = Table(title="parameters (layers folded into *; (q) = declared quantised)", title_justify="left",
                  caption=_schemes(report.rows), caption_justify="left", pad_edge=False)
    for col, justify in (("parameter", "left"), ("n", "right"), ("dtype", "left"), ("min cos", "right"),
                         ("max |Δ|", "right"), ("max rel", "right"), ("status", "left")):
        table.add_column(col, justify=justify)
    for name, rows in groups.items():
        measured = [r.metrics for r in rows if r.metrics is not None and r.metrics.n]
        cos = min((m.cos for m in measured), default=None)
        max_abs = max((m.max_abs for m in measured), default=None)
        rel = max((m.rel_l2 for m in measured), default=None)
        failing = [r for r in rows if not r.passed]
        if failing:
            status = Text(f"{failing[0].status} {BAD}" + (f" ({len(failing)})" if len(rows) > 1 else ""),
                          style="bold red")
        else:
            status = Text(f"pass {OK}", style="green")
        table.add_row(name, str(len(rows)), _dtypes(rows), _fmt(cos, ".6f"), _fmt(max_abs, ".4g"), _fmt(rel, ".3g"),
                      status)
    return table


def all_params_table(report: WeightsReport) -> Table:
    table = Table(title="all parameters", title_justify="left", pad_edge=False)
    for col in ("parameter", "dtype", "cos", "max |Δ|", "rel", "status"):
        table.add_column(col)
    for r in report.rows:
        m = r.metrics
        table.add_row(r.name, _dtypes([r]), _fmt(m.cos if m else None, ".6f"), _fmt(m.max_abs if m else None, ".4g"),
                      _fmt(m.rel_l2 if m else None, ".3g"),
                      Text(r.status if r.passed else r.reason, style="green" if r.passed else "red"))
    return table


def banner(report: WeightsReport) -> Panel:
    return panel(weights_banner(report))


def render_weights(report: WeightsReport, show_all: bool = False) -> Group:
    parts = [run_header(report.ref_meta, report.cand_meta), group_table(report)]
    if show_all:
        parts.append(all_params_table(report))
    parts.append(banner(report))
    return Group(*parts)
