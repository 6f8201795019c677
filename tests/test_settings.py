"""[tool.parity] in the current directory's pyproject.toml, overridden by flags."""
from __future__ import annotations

import json
import textwrap

import pytest
from typer.testing import CliRunner

from parity.cli import app
from parity.settings import Settings, SettingsError, load_settings

runner = CliRunner()

GOOD = """
[project]
name = "someone-elses-model"

[tool.parity]
min_cos = 0.995
taps = ["prefix.*", "output.*"]
output_dir = "out"

[tool.parity.thresholds]
"*.mlp" = 0.99
"prefix.0.attn" = 0.4
"""


def write(tmp_path, text):
    (tmp_path / "pyproject.toml").write_text(textwrap.dedent(text))
    return tmp_path


def test_no_pyproject_or_no_table_means_defaults(tmp_path):
    assert load_settings(tmp_path) == Settings()
    assert load_settings(write(tmp_path, "[project]\nname='x'\n")) == Settings()


def test_table_is_read(tmp_path):
    s = load_settings(write(tmp_path, GOOD))
    assert s.min_cos == 0.995 and s.taps == "prefix.*,output.*" and str(s.output_dir) == "out"
    assert s.thresholds == (("*.mlp", 0.99), ("prefix.0.attn", 0.4))
    assert s.threshold_specs(["x=1"]) == ["*.mlp=0.99", "prefix.0.attn=0.4", "x=1"]


@pytest.mark.parametrize("table, needle", [
    ("[tool.parity]\nmin_cosine = 0.9\n", "unknown key 'min_cosine'"),
    ("[tool.parity]\nmin_cos = 'high'\n", "min_cos must be a number"),
    ("[tool.parity]\nthresholds = 3\n", "thresholds must be a table"),
    ("[tool.parity.thresholds]\n'*.mlp' = true\n", "must be a number"),
    ("[tool.parity]\ntaps = 3\n", "taps must be a glob"),
    ("[tool.parity\n", "cannot read"),
])
def test_bad_tables_are_settings_errors(tmp_path, table, needle):
    with pytest.raises(SettingsError, match=needle):
        load_settings(write(tmp_path, table))


def test_cli_uses_settings_and_flags_win(tmp_path, monkeypatch):
    monkeypatch.chdir(write(tmp_path, GOOD))
    result = runner.invoke(app, ["diff", "--ref", "pytorch", "--cand", "flash_fp8", "--inject", "nomask",
                                 "--json", "r.json"])
    data = json.loads((tmp_path / "r.json").read_text())
    assert data["thresholds"]["min_cos"] == 0.995
    assert data["thresholds"]["patterns"] == {"*.mlp": 0.99, "prefix.0.attn": 0.4}
    assert {t["stack"] for t in data["taps"]} == {"prefix", "output"}  # default taps
    assert "FIRST DIVERGENCE: prefix.0.o_proj" in result.output  # prefix.0.attn let through by its 0.4
    result = runner.invoke(app, ["diff", "--ref", "pytorch", "--cand", "flash_fp8", "--inject", "nomask",
                                 "--min-cos", "0.9", "--threshold", "prefix.0.attn=0.999", "--taps", "prefix.0.*",
                                 "--json", "r2.json"])
    data = json.loads((tmp_path / "r2.json").read_text())
    assert data["thresholds"]["min_cos"] == 0.9 and data["thresholds"]["patterns"]["prefix.0.attn"] == 0.999
    assert {t["layer"] for t in data["taps"]} == {0}
    assert "FIRST DIVERGENCE: prefix.0.attn" in result.output


def test_capture_default_path_uses_output_dir(tmp_path, monkeypatch):
    monkeypatch.chdir(write(tmp_path, GOOD))
    result = runner.invoke(app, ["capture", "--backend", "pytorch"])
    assert result.exit_code == 0, result.output
    assert (tmp_path / "out" / "pytorch.h5").is_file()


def test_malformed_settings_exit_2_with_one_line(tmp_path, monkeypatch):
    monkeypatch.chdir(write(tmp_path, "[tool.parity]\ncolour = 'red'\n"))
    result = runner.invoke(app, ["diff", "--ref", "pytorch", "--cand", "flash"])
    assert result.exit_code == 2 and "unknown key 'colour'" in result.output
    assert len(result.output.strip().splitlines()) == 1
