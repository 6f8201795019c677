"""Progress bars appear only after a second, only on a terminal, never with --quiet."""
from __future__ import annotations

from io import StringIO

from rich.console import Console
from typer.testing import CliRunner

from parity.cli import app
from parity.report.progress import DelayedProgress


class Clock:
    def __init__(self):
        self.now = 0.0

    def __call__(self):
        return self.now


def terminal() -> Console:
    return Console(file=StringIO(), force_terminal=True, width=80)


def test_nothing_shown_within_the_first_second():
    clock = Clock()
    with DelayedProgress(terminal(), enabled=True, clock=clock) as p:
        clock.now = 0.5
        p("capture", 10, None)
    assert not p.was_shown


def test_shown_once_work_takes_longer_and_closed_after():
    clock, console = Clock(), terminal()
    with DelayedProgress(console, enabled=True, clock=clock) as p:
        clock.now = 1.5
        p("diff", 3, 10)
        p("diff", 10, 10)
        assert p.display is not None
    assert p.was_shown and p.display is None
    assert "diff" in console.file.getvalue()


def test_disabled_never_shows():
    clock = Clock()
    with DelayedProgress(terminal(), enabled=False, clock=clock) as p:
        clock.now = 100.0
        p("diff", 1, 2)
    assert not p.was_shown


def test_cli_output_has_no_progress_when_not_a_terminal():
    result = CliRunner().invoke(app, ["diff", "--ref", "pytorch", "--cand", "flash"])
    assert result.exit_code == 0
    assert "━" not in result.output.split("PASS")[-1] and "capture" not in result.output
