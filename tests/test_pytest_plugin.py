"""The pytest plugin as a user meets it: a test file using `parity_check`, run by pytest."""
from __future__ import annotations

import pytest

from parity.report.results import Report
from parity.testing import ParityAssertionError, assert_parity, failure_message

pytest_plugins = ["pytester"]

USER_TESTS = '''
import pytest

def test_flash_matches(parity_check):
    report = parity_check("pytorch", "flash")
    assert report.passed

def test_nomask_is_caught(parity_check):
    parity_check("pytorch", "flash_fp8", faults=["nomask"])

def test_compare_does_not_assert(parity_check):
    assert not parity_check.compare("pytorch", "flash_fp8", faults=["nomask"])
'''


def test_plugin_fixture_passes_and_fails_with_banner_and_layer_table(pytester):
    pytester.makepyfile(test_user=USER_TESTS)
    result = pytester.runpytest_subprocess("-p", "no:cacheprovider")
    result.assert_outcomes(passed=2, failed=1)
    out = result.stdout.str()
    assert "ParityAssertionError" in out
    assert "FIRST DIVERGENCE: prefix.0.attn" in out
    assert "prefix layer 0" in out and "prefix.0.k " in out  # the failing layer's table, row per tap
    assert "still matching just before it" in out


def test_plugin_reads_tool_parity_and_writes_html_on_failure(pytester):
    pytester.makepyprojecttoml('[tool.parity]\nmin_cos = 0.4\ntaps = "prefix.0.*"\n')
    pytester.makepyfile(test_user='''
def test_loose_gate_passes(parity_check):
    report = parity_check("pytorch", "flash_fp8", faults=["nomask"])
    assert {r.info.layer for r in report.rows} == {0}

def test_explicit_gate_fails(parity_check):
    parity_check("pytorch", "flash_fp8", faults=["nomask"], min_cos=0.999)
''')
    result = pytester.runpytest_subprocess("-p", "no:cacheprovider", "--parity-html", "html")
    result.assert_outcomes(passed=1, failed=1)
    assert "HTML report: html/test_explicit_gate_fails.html" in result.stdout.str()
    assert (pytester.path / "html" / "test_explicit_gate_fails.html").read_text().startswith("<!DOCTYPE html>")


def test_assert_parity_on_a_report_and_message_is_plain_fixed_width():
    from parity.api import compare

    report = compare("pytorch", "flash_fp8", faults=["silu"])
    with pytest.raises(ParityAssertionError) as exc:
        assert_parity(report, width=100)
    message = str(exc.value)
    assert exc.value.report is report and isinstance(exc.value, AssertionError)
    assert "\x1b[" not in message  # no colour codes
    assert max(len(line) for line in message.splitlines()) <= 100
    assert "FIRST DIVERGENCE: prefix.0.mlp" in message and "prefix layer 0" in message
    assert failure_message(report, 100) == message
    assert assert_parity(compare("pytorch", "flash")).passed


def test_assert_parity_argument_errors():
    with pytest.raises(TypeError):
        assert_parity("pytorch")
    with pytest.raises(TypeError):
        assert_parity(Report(rows=[]), "flash")


def test_fixture_merges_tool_parity_as_the_cli_does():
    """Keyword thresholds apply after [tool.parity]'s patterns (they win where both
    match), min_cos and taps given replace the settings', as `--threshold`/`--min-cos`
    do on the command line (parity.settings.merge)."""
    from parity.pytest_plugin import ParityCheck
    from parity.settings import Settings

    settings = Settings(min_cos=0.5, thresholds=(("toy.0.*", 0.4), ("toy.1.*", 0.3)), taps="toy.[01].*")
    check = ParityCheck(settings, None, "t")
    report = check.compare("toy_backends:slow", "toy_backends:slow", device="cpu", thresholds={"toy.1.*": 0.9})
    assert report.thresholds["min_cos"] == 0.5
    assert report.thresholds["patterns"] == {"toy.0.*": 0.4, "toy.1.*": 0.9}
    assert {r.key for r in report.rows} == {"toy.0.out", "toy.1.out"}
    report = check.compare("toy_backends:slow", "toy_backends:slow", device="cpu", min_cos=0.8, taps="toy.2.*")
    assert report.thresholds["min_cos"] == 0.8 and {r.key for r in report.rows} == {"toy.2.out"}
    assert ParityCheck(Settings(), None, "t").compare("toy_backends:slow", "toy_backends:slow",
                                                      device="cpu").thresholds["min_cos"] == 0.999
