"""A Banner (the verdict in words, report/summary.py) as a rich Panel: each tone becomes a
style, and every part is shown as data (control characters escaped, no markup)."""

from __future__ import annotations

from rich.panel import Panel
from rich.text import Text

from parity.report.summary import FAIL_TONE, HINT, MUTED, PASS_TONE, PLAIN, STRONG, Banner
from parity.report.text import shown

STYLES = {PASS_TONE: "bold green", FAIL_TONE: "bold red", MUTED: "dim", HINT: "bold yellow", STRONG: "bold",
          PLAIN: ""}


def panel(banner: Banner) -> Panel:
    text = Text()
    for i, line in enumerate(banner.lines):
        if i:
            text.append("\n")
        if line.detail:
            text.append("  ")
        for part, tone in line.parts:
            text.append(shown(part), style=STYLES[tone])
    return Panel(text, border_style="green" if banner.passed else "red")
