"""The verdict in words, shared by every rendering (terminal, HTML, Markdown, JUnit, the
pytest failure message).

Each result's banner is worded here once, as a `Banner`: lines of text whose parts carry
a tone (what they mean, not how they look).  Renderers only map tones to styles, so every
rendering says the same thing in the same order, and the banners of diffs, stats diffs,
weights and components share their lines where they say the same thing (the PASS line,
the first divergence, run-level problems, the counts)."""

from __future__ import annotations

import math
from dataclasses import dataclass

from parity.report.results import (
    FramesResult,
    Localisation,
    PartResult,
    Report,
    StatsReport,
    TapResult,
    WeightsReport,
    suggested_commands,
)

# Tones: a verdict that holds, one that fails, supporting evidence, a lead to follow,
# a name to pick out, plain words.
PASS_TONE, FAIL_TONE, MUTED, HINT, STRONG, PLAIN = "pass", "fail", "muted", "hint", "strong", ""


@dataclass(frozen=True)
class Line:
    """One banner line as (text, tone) parts; a `detail` line explains the line above it
    (indented where the rendering indents)."""

    parts: tuple[tuple[str, str], ...]
    detail: bool = False

    @property
    def text(self) -> str:
        return "".join(text for text, _ in self.parts)


def say(text: str, tone: str = PLAIN) -> Line:
    return Line(((text, tone),))


def detail(text: str, tone: str = PLAIN) -> Line:
    return Line(((text, tone),), detail=True)


@dataclass(frozen=True)
class Banner:
    """A verdict in words: the headline first, then its evidence."""

    passed: bool
    lines: tuple[Line, ...]

    @property
    def headline(self) -> str:
        return self.lines[0].text

    def text(self) -> str:
        """Plain text, details indented (JUnit bodies, logs)."""
        return "\n".join(("  " if line.detail else "") + line.text for line in self.lines)


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
    """Per-region cosine of a tap, e.g. `image cos=1.000000 norm=7.0 | text cos=0.412`; the
    norm ratio is shown where the cosine passes and the size does not (what a cosine
    cannot show)."""
    parts = []
    limit = row.limit if math.isfinite(row.threshold) else None
    for name, m in row.regions.items():
        cos = "nan" if math.isnan(m.cos) else f"{m.cos:.6f}"
        size = f" norm={fmt(m.norm_ratio, 4)}" if limit is not None and limit.failed(m) == ("norm",) else ""
        parts.append(f"{name} cos={cos}{size} max_diff={m.max_abs:.4g}")
    return " | ".join(parts)


def bounds_words(thresholds: dict) -> str:
    """The bounds a tensor diff judged by, in words: `min cos 0.999, norm ratio within 0.0447 of 1`."""
    cos = thresholds.get("min_cos")
    norm = thresholds.get("max_norm_err")
    if norm is None and isinstance(cos, (int, float)):
        from parity.comparison.rules import norm_err_for

        norm = norm_err_for(cos)
    size = f", norm ratio within {norm:.3g} of 1" if isinstance(norm, (int, float)) else ""
    return f"min cos {cos}{size}"


def judgement_line(thresholds: dict) -> str | None:
    """How a live diff that was given no bounds judged its taps, in one line (None: the
    bounds were the user's, said by the verdict itself)."""
    cal = thresholds.get("calibration")
    if not isinstance(cal, dict):
        return None
    if cal.get("mode") == "oracle":
        line = (f"judged by calibrated budgets: {cal.get('factor'):g}x the reference's own error against its "
                f"{cal.get('oracle_dtype')} run")
        lossy = cal.get("lossy")
        if isinstance(lossy, dict):
            line += (f"; from {lossy.get('from')} on, by the candidate's declared bounds "
                     f"({lossy.get('why') or 'declared lossy'})")
        return line
    line = f"judged by fixed bounds ({bounds_words(thresholds)}): calibrated budgets off, {cal.get('why')}"
    lossy = thresholds.get("lossy")
    if isinstance(lossy, dict):
        line += f"; the candidate's declared bounds where they match ({lossy.get('why') or 'declared lossy'})"
    return line


def counts_line(result, noun: str = "taps") -> str:
    """`413 taps: fail 321, pass 92` for any result with rows (a Report, a WeightsReport)."""
    counts = ", ".join(f"{k} {v}" for k, v in sorted(result.counts().items()))
    return f"{len(result.rows)} {noun}: {counts}"


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
    failing = [k for k, m in regions.items() if not row.within(m)]
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


# ---------------------------------------------------------------- lines banners share


def pass_line(n: int, noun: str, within: str) -> Line:
    return say(f"PASS: all {n} {noun} within {within}", PASS_TONE)


def divergence_lines(first: TapResult, label: str = "FIRST DIVERGENCE") -> list[Line]:
    """Where the first failing tap sits and why it fails."""
    return [say(f"{label}: {first.key}", FAIL_TONE), detail(where(first)),
            detail(f"{first.status}: {first.reason}")]


def problem_lines(problems: list[str]) -> list[Line]:
    return [say(f"FAIL: {p}", FAIL_TONE) for p in problems]


def _failed(lines: list[Line], counts: str) -> Banner:
    """A failing banner: its lines (a headline even when nothing says why), then the counts."""
    return Banner(False, tuple(lines or [say("FAIL: nothing was compared", FAIL_TONE)]) + (say(counts, MUTED),))


# ---------------------------------------------------------------- one banner per result


def evidence_lines(report: Report, first: TapResult) -> list[Line]:
    """What the other taps say about the first divergence: what still matches before it,
    per region, where along the tokens, per head."""
    out = []
    upstream = upstream_matches(report, first)
    if upstream:
        out.append(detail(f"still matching just before it: {upstream}", MUTED))
    if first.regions:
        out.append(detail(f"by region: {regions_line(first)}", MUTED))
    words = concentration(first)
    if words:
        out.append(detail(f"where: {words}"))
    if first.heads:
        out.append(detail(f"by head: {heads_line(first)}", MUTED))
    return out


def localisation_lines(loc: Localisation | None) -> list[Line]:
    """The isolation verdict: introducing component, walk, sub-part, hint."""
    if loc is None:
        return []
    out = [say(f"INTRODUCED AT: {loc.introduced}", FAIL_TONE)] if loc.introduced else []
    out.append(detail(f"isolation: {loc.line()}"))
    inside = loc.introduced is None or any(u.get("unit") == loc.introduced for u in loc.between)
    bracket = loc.bracket_line() if not loc.note and (loc.introduced is None or loc.about) and inside else None
    if bracket:  # the error enters outside layers: say where, in terms of the taps
        out.append(detail(bracket))
    if loc.narrowed:
        out.append(detail(f"narrowed to: {loc.narrowed} (fails on its own inside {loc.introduced})"))
    if loc.hint:
        out.append(detail(f"hint: {loc.hint}", HINT))
    return out


def warning_lines(warnings: list[str]) -> list[Line]:
    """Doubts that do not fail the run (a dump whose taps carry no checksum, a stale
    `.partial` beside a dump): said whatever the verdict."""
    return [say(f"WARNING: {w}", HINT) for w in warnings]


def report_banner(report: Report) -> Banner:
    """A tensor diff's verdict."""
    if report.passed:
        cal = report.thresholds.get("calibration")
        if isinstance(cal, dict) and cal.get("mode") == "oracle":
            within = (f"calibrated budgets ({cal.get('factor'):g}x the reference's own error against its "
                      f"{cal.get('oracle_dtype')} run" + (", the declared lossy parts' bounds from "
                                                          f"{cal['lossy'].get('from')} on)" if isinstance(
                                                              cal.get("lossy"), dict) else ")"))
        else:
            within = f"thresholds ({bounds_words(report.thresholds)}" + (
                ", the candidate's declared bounds where they match)" if isinstance(
                    report.thresholds.get("lossy"), dict) else ")")
        return Banner(True, (pass_line(len(report.rows), "taps", within),
                             *warning_lines(report.warnings)))
    lines = []
    first = report.first_divergence
    if first is not None:
        lines += divergence_lines(first) + evidence_lines(report, first) + localisation_lines(report.localisation)
    return _failed(lines + problem_lines(report.problems) + warning_lines(report.warnings), counts_line(report))


def stats_banner(report: StatsReport) -> Banner:
    """A stats diff's verdict: also where bits first differ and what to capture in full."""
    n, same, bits = len(report.rows), report.identical_count(), report.first_bit_difference
    if report.passed:
        tail = f"; bits first differ at {bits.key}" if bits else ""
        return Banner(True, (pass_line(n, "taps' summaries", f"tolerance {report.thresholds.get('min_cos')}"),
                             detail(f"bit-identical: {same} of {n}{tail}", MUTED), *warning_lines(report.warnings)))
    first = report.first_divergence
    lines = divergence_lines(first, "FIRST DIVERGENCE (stats)") if first is not None else []
    if bits is not None:
        lines.append(detail(f"bits first differ at {bits.key}: every tap before it is bit-identical "
                            f"({same} of {n} taps in all)", MUTED))
    lines += problem_lines(report.problems)
    taps = report.suggested_taps()
    if taps:
        lines.append(Line((("CAPTURE IN FULL: ", HINT), (f"--taps '{','.join(taps)}'", PLAIN))))
        lines += [detail(command, MUTED) for command in suggested_commands(report, taps)]
    return _failed(lines + warning_lines(report.warnings), counts_line(report))


MAX_FINDINGS = 20  # findings named one by one; the rest are counted


def weights_banner(report: WeightsReport) -> Banner:
    """A weights comparison's verdict: each finding on a line of its own."""
    n = len(report.rows)
    if report.passed:
        t = report.thresholds
        within = f"thresholds (min cos {t.get('min_cos')}, quantised {t.get('quantized_min_cos')})"
        return Banner(True, (pass_line(n, "parameters", within),))
    lines = []
    findings = report.findings
    if findings:
        lines.append(say(f"{len(findings)} FINDING(S)", FAIL_TONE))
        lines += [Line(((f"{r.name}: ", STRONG), (r.reason, PLAIN)), detail=True) for r in findings[:MAX_FINDINGS]]
        if len(findings) > MAX_FINDINGS:
            lines.append(detail(f"... and {len(findings) - MAX_FINDINGS} more"))
    return _failed(lines + problem_lines(report.problems), counts_line(report, "parameters"))


def component_banner(result: PartResult) -> Banner:
    """`parity component`'s verdict: does the part fail on the reference's own inputs?"""
    name = result.unit.name
    if result.passed:
        return Banner(True, (say(f"PASS: {name} matches the reference on the reference's own inputs", PASS_TONE),))
    if result.inherited_via:
        via = " and ".join(result.inherited_via)
        lines = [say(f"FAIL: {name}: the {via} it reads differ from the reference's (it matches on the "
                     "reference's)", FAIL_TONE), detail(result.summary())]
    else:
        lines = [say(f"FAIL: {name} introduces an error (fails on the reference's own inputs)", FAIL_TONE),
                 detail(result.summary())]
    if result.narrowed:
        lines.append(detail(f"narrowed to: {result.narrowed} (fails on its own)"))
    if result.hint:
        lines.append(detail(f"hint: {result.hint}", HINT))
    return Banner(False, tuple(lines))


def frames_banner(result: FramesResult) -> Banner:
    passing = sum(bool(r) for r in result.frames)
    return Banner(result.passed, (say(f"frames: {passing} of {len(result.frames)} pass",
                                      PASS_TONE if result.passed else FAIL_TONE),))
