"""A report as Markdown for a pull-request comment: verdict, one compact per-layer table
per stack, the failing taps, metadata folded away.  GitHub-flavoured, no HTML needed
beyond <details>.

Everything that came from a dump or a result (backend names, tap names, reasons, metadata)
is data: written through `md_text` or as a code span (`md_code`), so it can add no HTML,
heading, link, image, emphasis, table cell or line."""

from __future__ import annotations

from parity.report.results import Report, TapResult
from parity.report.series import stack_level, stack_series
from parity.report.summary import fmt, fmt_g, report_banner, side_label
from parity.report.text import md_code, md_text

MAX_FAILING = 50


def _cell(row: TapResult | None) -> str:
    if row is None:
        return ""
    mark = "✓" if row.passed else "✗"
    text = f"{fmt(row.cos)} {mark}" if row.cos is not None else f"{md_text(row.status)} {mark}"
    if row.info.step is not None and not row.passed:
        text += f" @{row.info.step}"
    return f"**{text}**" if not row.passed else text


def render_markdown(report: Report) -> str:
    verdict = report_banner(report)
    lines = [f"### {'✅' if verdict.passed else '❌'} parity: {md_text(verdict.headline)}", "",
             f"ref {md_code(side_label(report.ref_meta), in_table=False)} vs cand "
             f"{md_code(side_label(report.cand_meta), in_table=False)}", ""]
    if len(verdict.lines) > 1:
        lines += [f"> {md_text(line.text)}  " for line in verdict.lines[1:]] + [""]
    lines += ["Cells are cosine similarity, ✓/✗ against the threshold.", ""]
    for s in stack_series(report):
        steps = f" (worst of {s.steps} steps)" if s.steps else ""
        lines.append(f"**{md_text(s.stack)}**{steps}")
        lines.append("")
        lines.append("| layer | " + " | ".join(md_text(c) for c in s.components) + " |")
        lines.append("|---:|" + "---:|" * len(s.components))
        for layer in s.layers:
            lines.append(f"| {layer} | " + " | ".join(_cell(s.cell(layer, c)) for c in s.components) + " |")
        lines.append("")
    others = stack_level(report)
    if others:
        lines += ["| tap | cos | max \\|Δ\\| | status |", "|---|---:|---:|---|"]
        for r in others:
            lines.append(f"| {md_code(r.key)} | {fmt(r.cos)} | {fmt_g(r.metrics.max_abs) if r.metrics else ''} | "
                         f"{'✓' if r.passed else '✗ ' + md_text(r.status)} |")
        lines.append("")
    failing = [r for r in report.rows if not r.passed]
    if failing:
        lines += [f"<details><summary>{len(failing)} failing taps</summary>", "",
                  "| tap | cos | rel L2 | reason |", "|---|---:|---:|---|"]
        for r in failing[:MAX_FAILING]:
            lines.append(f"| {md_code(r.key)} | {fmt(r.cos)} | {fmt_g(r.metrics.rel_l2) if r.metrics else ''} | "
                         f"{md_text(r.status + ': ' + r.reason)} |")
        if len(failing) > MAX_FAILING:
            lines.append(f"| … {len(failing) - MAX_FAILING} more | | | |")
        lines += ["", "</details>", ""]
    keys = [k for k in dict.fromkeys([*report.ref_meta, *report.cand_meta]) if k != "modules"]
    lines += ["<details><summary>run metadata</summary>", "", "| | ref | cand |", "|---|---|---|"]
    for k in keys:
        lines.append(f"| {md_text(k)} | {md_text(report.ref_meta.get(k, '-'))} | "
                     f"{md_text(report.cand_meta.get(k, '-'))} |")
    lines += ["", "</details>", ""]
    return "\n".join(lines)
