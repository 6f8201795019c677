"""The verdict in words, shared by every rendering (terminal, HTML, Markdown, JUnit)."""

from __future__ import annotations

import math

from parity.report.results import Report, TapResult


def side_label(meta: dict) -> str:
    """`backend [inject f] (device, dtype)` for one run."""
    faults = meta.get("faults") or []  # a dump's meta is arbitrary JSON: any type may turn up
    faults = ",".join(map(str, faults)) if isinstance(faults, list) else str(faults)
    extra = f" [inject {faults}]" if faults else ""
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


UNIFORM_RATIO = 2.0  # every region fails and their relative errors lie within this factor: "uniform"


def concentration(row: TapResult, short: bool = False) -> str | None:
    """Which token regions carry a failing tap's error, in words, only when the evidence
    says so: some regions fail their threshold while others pass ("concentrated in"), or
    every region fails with relative errors within UNIFORM_RATIO of each other
    ("uniform").  None otherwise (or with fewer than two regions)."""
    regions = {k: m for k, m in row.regions.items() if m.n}
    if len(regions) < 2 or row.passed:
        return None
    failing = [k for k, m in regions.items() if not m.cos >= row.threshold]
    if failing and len(failing) < len(regions):
        if short:
            return f"in {', '.join(failing)}"
        return f"error concentrated in {', '.join(failing)} tokens (the other regions match)"
    if len(failing) == len(regions):
        errs = [m.rel_l2 for m in regions.values()]
        if all(math.isfinite(e) and e > 0 for e in errs) and max(errs) <= UNIFORM_RATIO * min(errs):
            if short:
                return "uniform"
            return f"uniform across tokens (every region fails, relative errors {min(errs):.3g}-{max(errs):.3g})"
    return None


def heads_line(row: TapResult) -> str:
    """Per-head cosine of a [tokens, heads, dim] tap, e.g. `h0 cos=1.000000 | h1 cos=0.41`."""
    return " | ".join(f"h{i} cos={fmt(m.cos)}" for i, m in enumerate(row.heads))


def localisation_lines(report: Report) -> list[str]:
    """The isolation verdict in words: introducing component, walk, sub-part, hint."""
    loc = report.localisation
    if loc is None:
        return []
    out = [f"introduced at: {loc.introduced}"] if loc.introduced else []
    out.append(f"isolation: {loc.line()}")
    if loc.narrowed:
        out.append(f"narrowed to: {loc.narrowed}")
    if loc.hint:
        out.append(f"hint: {loc.hint}")
    return out
