"""Parity as an assertion in a user's own test suite.

    from parity.testing import assert_parity
    assert_parity("hf:./m@attn=eager", "hf:./m@attn=sdpa", batch=4, padding="left")

On failure the AssertionError's message is the first-divergence banner plus the table of
the failing layer, rendered to fixed-width text (no colour), so it reads the same in a
terminal, a CI log and a pytest report.  No pytest import: the plugin builds on this."""

from __future__ import annotations

from io import StringIO

from rich.console import Console, Group

from parity.report.results import Report


class ParityAssertionError(AssertionError):
    """A parity check failed; `.report` holds the whole result."""

    def __init__(self, message: str, report: Report):
        super().__init__(message)
        self.report = report


def failure_message(report: Report, width: int = 120) -> str:
    """Banner of the first divergence + the table of its layer (or its stack-level tap)."""
    from parity.report.terminal.diff import banner, header, layer_table

    parts = [header(report)]
    first = report.first_divergence
    if first is not None:
        i = first.info
        if i.layer is not None:
            same = [r for r in report.rows if (r.info.stack, r.info.layer, r.info.step) == (i.stack, i.layer, i.step)]
            title = f"{i.stack} layer {i.layer}" + (f" step {i.step}" if i.step is not None else "")
        else:
            same, title = [first], f"{i.stack} (stack-level tap)"
        parts.append(layer_table(title, same))
    parts.append(banner(report))
    out = StringIO()
    Console(file=out, width=width, color_system=None, highlight=False, soft_wrap=False).print(Group(*parts))
    return out.getvalue().rstrip()


def assert_parity(ref, cand=None, inputs=None, *, width: int = 120, **compare_kwargs) -> Report:
    """Assert that `cand` matches `ref` (specs or Backends; see parity.compare for the
    keyword arguments), or that an existing Report passed.  Returns the report."""
    if isinstance(ref, Report):
        if cand is not None or inputs is not None or compare_kwargs:
            raise TypeError("assert_parity(report) takes no other arguments")
        report = ref
    else:
        if cand is None:
            raise TypeError("assert_parity needs a candidate: assert_parity(ref, cand, ...)")
        from parity.api import compare

        report = compare(ref, cand, inputs, **compare_kwargs)
    if not report:
        raise ParityAssertionError(failure_message(report, width), report)
    return report
