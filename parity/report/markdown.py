"""A report as Markdown for a pull-request comment: verdict, one compact per-layer table
per stack, the failing taps, metadata folded away.  GitHub-flavoured, no HTML needed
beyond <details>."""

from __future__ import annotations

from parity.report.results import Report, TapResult
from parity.report.series import stack_level, stack_series
from parity.report.summary import fmt, fmt_g, report_banner, side_label

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
    verdict = report_banner(report)
    lines = [f"### {'✅' if verdict.passed else '❌'} parity: {_esc(verdict.headline)}", "",
             f"ref `{side_label(report.ref_meta)}` vs cand `{side_label(report.cand_meta)}`", ""]
    if len(verdict.lines) > 1:
        lines += [f"> {_esc(line.text)}  " for line in verdict.lines[1:]] + [""]
    lines += ["Cells are cosine similarity, ✓/✗ against the threshold.", ""]
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
