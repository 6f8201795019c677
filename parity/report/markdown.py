"""A report as Markdown for a pull-request comment: verdict, one compact per-layer table
per stack, the failing taps, metadata folded away.  GitHub-flavoured, no HTML needed
beyond <details>."""

from __future__ import annotations

from parity.report.results import Report, TapResult
from parity.report.series import stack_level, stack_series
from parity.report.summary import (
    counts_line,
    fmt,
    fmt_g,
    headline,
    localisation_lines,
    regions_line,
    side_label,
    upstream_matches,
    where,
)

MAX_FAILING = 50


def _esc(text: str) -> str:
    return text.replace("|", "\\|").replace("\n", " ")


def _cell(row: TapResult | None) -> str:
    if row is None:
        return ""
    mark = "✓" if row.passed else "✗"
    text = f"{fmt(row.cos)} {mark}" if row.cos is not None else f"{row.status} {mark}"
    if row.info.step is not None and not row.passed:
        text += f" @{row.info.step}"
    return f"**{text}**" if not row.passed else text


def render_markdown(report: Report) -> str:
    first = report.first_divergence
    icon = "✅" if report.passed else "❌"
    lines = [f"### {icon} parity: {_esc(headline(report))}", "",
             f"ref `{side_label(report.ref_meta)}` vs cand `{side_label(report.cand_meta)}`", ""]
    if first is not None:
        lines.append(f"> {_esc(where(first))}  ")
        lines.append(f"> {first.status}: {_esc(first.reason)}  ")
        up = upstream_matches(report, first)
        if up:
            lines.append(f"> still matching just before it: {_esc(up)}  ")
        if first.regions:
            lines.append(f"> by region: {_esc(regions_line(first))}  ")
        for text in localisation_lines(report):
            lines.append(f"> {_esc(text)}  ")
        lines.append("")
    for p in report.problems:
        lines.append(f"- FAIL: {_esc(p)}")
    lines += [f"{counts_line(report)}; cells are cosine similarity, ✓/✗ against the threshold.", ""]
    for s in stack_series(report):
        steps = f" (worst of {s.steps} steps)" if s.steps else ""
        lines.append(f"**{s.stack}**{steps}")
        lines.append("")
        lines.append("| layer | " + " | ".join(s.components) + " |")
        lines.append("|---:|" + "---:|" * len(s.components))
        for layer in s.layers:
            lines.append(f"| {layer} | " + " | ".join(_cell(s.cell(layer, c)) for c in s.components) + " |")
        lines.append("")
    others = stack_level(report)
    if others:
        lines += ["| tap | cos | max \\|Δ\\| | status |", "|---|---:|---:|---|"]
        for r in others:
            lines.append(f"| `{r.key}` | {fmt(r.cos)} | {fmt_g(r.metrics.max_abs) if r.metrics else ''} | "
                         f"{'✓' if r.passed else '✗ ' + _esc(r.status)} |")
        lines.append("")
    failing = [r for r in report.rows if not r.passed]
    if failing:
        lines += [f"<details><summary>{len(failing)} failing taps</summary>", "",
                  "| tap | cos | rel L2 | reason |", "|---|---:|---:|---|"]
        for r in failing[:MAX_FAILING]:
            lines.append(f"| `{r.key}` | {fmt(r.cos)} | {fmt_g(r.metrics.rel_l2) if r.metrics else ''} | "
                         f"{_esc(r.status + ': ' + r.reason)} |")
        if len(failing) > MAX_FAILING:
            lines.append(f"| … {len(failing) - MAX_FAILING} more | | | |")
        lines += ["", "</details>", ""]
    keys = [k for k in dict.fromkeys([*report.ref_meta, *report.cand_meta]) if k != "modules"]
    lines += ["<details><summary>run metadata</summary>", "", "| | ref | cand |", "|---|---|---|"]
    for k in keys:
        lines.append(f"| {k} | {_esc(str(report.ref_meta.get(k, '-')))} | {_esc(str(report.cand_meta.get(k, '-')))} |")
    lines += ["", "</details>", ""]
    return "\n".join(lines)
