"""Terminal rendering of the listings: what a dump holds (`parity inspect`), what a
capture wrote (`parity capture`), and the registered backends (`parity backends`).

Everything a dump or a backend says (tap names, paths, messages, doc lines) is data:
shown as Text, control characters escaped, never read as console markup."""

from __future__ import annotations

from typing import TYPE_CHECKING

from rich.console import Group
from rich.table import Table
from rich.text import Text

from parity.report.text import shown

if TYPE_CHECKING:
    from parity.api import BackendListing, CaptureResult, DumpSummary


# Most characters of one value a listing shows.  A dump's strings can be any length, and
# the terminal's wrapping costs (length / width) x length: an 8 MB meta string took
# minutes to list.  Cut, each line costs its first characters, and says what it left out.
MAX_SHOWN = 10_000


def clipped(text: str, limit: int = MAX_SHOWN) -> str:
    """`text`, or its first `limit` characters and how many were left out."""
    if len(text) <= limit:
        return text
    return f"{text[:limit]} ... ({len(text) - limit} more characters not shown)"


def render_dump(summary: DumpSummary) -> Group:
    """The dump's path and completeness, its metadata one key a line, where the backend
    raised (if it did), then its taps: a table of identities, or a stats dump's summaries.
    Every value is shown as data, `clipped`: the listing costs time linear in the dump's
    metadata, whatever the length of its strings."""
    parts: list = [Text(shown(summary.path), style="bold").append(f"  complete={summary.complete}", style="")]
    for k, v in sorted(summary.meta.items()):
        if k == "modules" and isinstance(v, (dict, list)):
            v = f"{len(v)} taps mapped to modules"
        parts.append(Text(shown(clipped(f"  {k}: {v}"))))
    for note in summary.notes:
        parts.append(Text(shown(clipped(f"  WARNING: {note}")), style="yellow"))
    err = summary.error
    if err:
        parts.append(Text(shown(clipped(f"  raised at {err.key}: {err.exc_type}: {err.message}")), style="red"))
    if summary.stats:
        from parity.report.terminal.stats import render_stats_capture

        parts.append(render_stats_capture(summary.run))
        return Group(*parts)
    table = Table(pad_edge=False)
    for col in ("#", "tap", "shape", "dtype", "layout"):
        table.add_column(col)
    for t in summary.taps:
        table.add_row(str(t.order), Text(shown(clipped(t.key))), str(list(t.shape)), Text(shown(clipped(t.dtype))),
                      Text(shown(clipped(t.layout or "-"))))
    parts.append(table)
    return Group(*parts)


def render_capture(result: CaptureResult) -> Group:
    """What a capture wrote and, when the backend raised, where and what it means."""
    what = "summaries of " if result.stats else ""
    parts: list = [Text(shown(f"wrote {what}{result.taps} taps to {result.path}"))]
    if result.kept is not None:
        parts.append(Text(shown(f"{result.kept} was left as it was: a dump is replaced only by a complete one")))
    err = result.error
    if err is not None:
        line = Text(shown(f"backend raised at {err.key or 'an untapped place'}:"), style="bold red")
        parts.append(line.append(shown(f" {err.exc_type}: {err.message}")))
        parts.append(Text(shown(f"{result.path} is marked incomplete: diff it with --allow-incomplete")))
    return Group(*parts)


def _parts(probe) -> str:
    return ", ".join(f"{name} ({note})" if note else name for name, note in probe.parts)


def render_backends(listing: BackendListing) -> Group:
    """Each backend with its doc line and spec usage, the faults `--inject` takes, the
    component parts and defaults each declared probe gives `parity component` and
    `parity frames`, and how to name a backend of one's own."""
    parts: list = []
    for b in listing.backends:
        if b.error is not None:
            parts.append(Text(shown(b.name), style="bold").append(shown(f"  (unavailable: {b.error})"), style="red"))
            continue
        parts.append(Text(shown(b.name), style="bold").append(shown(f"  {b.doc}"))
                     .append("\n    " + shown(b.usage) if b.usage else ""))
    if listing.faults:
        parts.append(Text("\n").append("faults", style="bold").append(" (--inject NAME[,NAME])"))
        for name, text in listing.faults.items():
            parts.append(Text(shown(f"  {name:18} {text}")))
    probes = [(p, names) for p, names in listing.probes() if p.parts or p.default_stack or p.drift_taps]
    if probes:
        parts.append(Text("\n").append("components", style="bold")
                     .append(" (parity component --stack STACK --part PART; parity frames --drift-taps)"))
        for probe, names in probes:
            parts.append(Text(shown(f"  {probe.arch} ({', '.join(names)})")))
            if probe.default_stack:
                parts.append(Text(shown(f"    default --stack {probe.default_stack}")))
            if probe.parts:
                parts.append(Text(shown(f"    --part {_parts(probe)}")))
            if probe.drift_taps:
                parts.append(Text(shown(f"    default --drift-taps {probe.drift_taps}")))
    parts.append(Text("\nAlso: package.module:factory[:ARG] (a function returning a parity Backend)."))
    return Group(*parts)
