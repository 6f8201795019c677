"""A report as JUnit XML for CI systems: one test case per tap, failures carry the reason;
the first divergence's failure (and the run's, for run-level problems) carries the verdict
banner's lines too.

Taps are grouped into one test suite per stack (classname `parity.<stack>`), so a CI view
lists `decoder.1.mlp` under `decoder`.

Every text that came from a dump or a result goes through `shown`: XML 1.0 cannot hold
control characters or lone surrogates at all (the file would not parse), and bidi or ESC
characters would reach a CI log raw; ElementTree escapes the markup characters."""

from __future__ import annotations

import xml.etree.ElementTree as ET

from parity.report.results import Report
from parity.report.summary import Banner, fmt, fmt_g, report_banner, side_label
from parity.report.text import shown


def _verdict(banner: Banner) -> str:
    """The banner's lines as plain text, each line's words as data (no line can be added)."""
    return "\n".join(("  " if line.detail else "") + shown(line.text) for line in banner.lines)


def render_junit(report: Report, name: str = "parity") -> str:
    suites = ET.Element("testsuites", name=name, tests=str(len(report.rows)),
                        failures=str(sum(not r.passed for r in report.rows)))
    by_stack: dict[str, list] = {}
    for r in report.rows:
        by_stack.setdefault(shown(r.info.stack), []).append(r)
    first = report.first_divergence
    verdict = _verdict(report_banner(report))  # the banner's words, on the cases a CI view opens first
    for stack, rows in by_stack.items():
        suite = ET.SubElement(suites, "testsuite", name=f"{name}.{stack}", tests=str(len(rows)),
                              failures=str(sum(not r.passed for r in rows)), errors="0", skipped="0")
        props = ET.SubElement(suite, "properties")
        ET.SubElement(props, "property", name="ref", value=shown(side_label(report.ref_meta)))
        ET.SubElement(props, "property", name="cand", value=shown(side_label(report.cand_meta)))
        for r in rows:
            case = ET.SubElement(suite, "testcase", classname=f"{name}.{stack}", name=shown(r.key), time="0")
            m = r.metrics
            detail = (f"cos={fmt(r.cos)} max_abs={fmt_g(m.max_abs)} rel_l2={fmt_g(m.rel_l2)} "
                      f"threshold={r.threshold:g}") if m else f"threshold={r.threshold:g}"
            if r.passed:
                ET.SubElement(case, "system-out").text = detail
                continue
            message = shown(f"{r.status}: {r.reason}") + (" (first divergence)" if r is first else "")
            ET.SubElement(case, "failure", message=message, type=shown(r.status)).text = (
                f"{detail}\n\n{verdict}" if r is first else detail)
    if report.problems:
        suite = ET.SubElement(suites, "testsuite", name=f"{name}.run", tests="1", failures="1", errors="0",
                              skipped="0")
        case = ET.SubElement(suite, "testcase", classname=f"{name}.run", name="run", time="0")
        ET.SubElement(case, "failure", message="; ".join(map(shown, report.problems)), type="problem").text = verdict
    ET.indent(suites)
    return '<?xml version="1.0" encoding="utf-8"?>\n' + ET.tostring(suites, encoding="unicode") + "\n"
