"""pytest plugin (entry point `pytest11`): the `parity_check` fixture.

    def test_sdpa_matches_eager(parity_check):
        parity_check("hf:./m@attn=eager", "hf:./m@attn=sdpa", batch=4, padding="left")

`parity_check(ref, cand, inputs=None, **kwargs)` runs parity.compare with the defaults of
`[tool.parity]` in the rootdir's pyproject.toml, merged the way the CLI merges them
(`parity.settings.merge`: min_cos and taps given here replace the settings', thresholds
given here apply after the settings' patterns), asserts, and returns the Report.  `parity_check.compare(...)` returns
the Report without asserting.  With `--parity-html DIR`, each failing check also writes
a self-contained HTML report to DIR/<test>.html and names it in the failure."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

from parity.report.results import Report
from parity.settings import Settings, load_settings
from parity.testing import ParityAssertionError, assert_parity


def pytest_addoption(parser) -> None:
    group = parser.getgroup("parity")
    group.addoption("--parity-html", metavar="DIR", default=None,
                    help="write an HTML report for every failing parity_check into DIR")


class ParityCheck:
    """The fixture's value: callable to assert, `.compare` to just compare."""

    def __init__(self, settings: Settings, html_dir: Path | None, test_name: str):
        self.settings, self.html_dir, self.test_name = settings, html_dir, test_name
        self.calls = 0

    def compare(self, ref, cand, inputs=None, **kwargs) -> Report:
        from parity.api import compare

        kwargs.setdefault("settings", self.settings)  # merged by compare, as the CLI merges them
        return compare(ref, cand, inputs, **kwargs)

    def __call__(self, ref, cand, inputs=None, *, width: int = 120, **kwargs) -> Report:
        self.calls += 1
        report = self.compare(ref, cand, inputs, **kwargs)
        try:
            return assert_parity(report, width=width)
        except ParityAssertionError as exc:
            if self.html_dir is None:
                raise
            from parity.report.html import render_html

            name = re.sub(r"[^A-Za-z0-9_.-]+", "_", self.test_name) + (f"_{self.calls}" if self.calls > 1 else "")
            path = self.html_dir / f"{name}.html"
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_text(render_html(report))
            raise ParityAssertionError(f"{exc}\nHTML report: {path}", report) from None


@pytest.fixture
def parity_check(request) -> ParityCheck:
    """Assert parity of a candidate backend against a reference (see parity.pytest_plugin)."""
    html = request.config.getoption("--parity-html")
    return ParityCheck(load_settings(request.config.rootpath), Path(html) if html else None, request.node.name)
