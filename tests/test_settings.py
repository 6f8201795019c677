"""[tool.parity] in the current directory's pyproject.toml, overridden by flags."""
from __future__ import annotations

import json
import textwrap
from pathlib import Path

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


def test_merge_explicit_over_settings_over_defaults():
    from parity.comparison.rules import DEFAULT_MIN_COS, Thresholds
    from parity.errors import InputError
    from parity.settings import merge

    s = Settings(min_cos=0.995, thresholds=(("*.mlp", 0.99),), taps="prefix.*", output_dir=Path("out"))
    m = merge()
    assert (m.min_cos, m.thresholds.patterns, m.taps, m.output_dir) == (DEFAULT_MIN_COS, (), None, Path("reports"))
    m = merge(s)
    assert (m.min_cos, m.thresholds.patterns, m.taps, m.output_dir) == (0.995, (("*.mlp", 0.99),), "prefix.*",
                                                                         Path("out"))
    m = merge(s, min_cos=0.9, thresholds=["*.mlp=0.5", "x=0.1"], taps="a.*", output_dir="o2")
    assert m.min_cos == 0.9 and m.taps == "a.*" and m.output_dir == Path("o2")
    assert m.thresholds.patterns == (("*.mlp", 0.99), ("*.mlp", 0.5), ("x", 0.1))  # explicit after: they win
    assert m.thresholds.for_tap("prefix.0.mlp", "prefix.0.mlp") == 0.5
    assert merge(s, thresholds={"y": 0.2}).thresholds.patterns == (("*.mlp", 0.99), ("y", 0.2))
    ready = Thresholds(0.5, (("z", 0.1),))
    assert merge(s, thresholds=ready).thresholds is ready  # a ready gate is taken as it is
    assert merge(Settings(min_cos=0.0)).min_cos == 0.0  # a zero in [tool.parity] is a value, not "unset"
    with pytest.raises(InputError, match="bad threshold"):
        merge(s, thresholds=["nonsense"])


def test_cli_and_plugin_use_the_one_merge():
    """Neither has a merge of its own: both hand [tool.parity] to the library."""
    src = {name: (Path(__file__).resolve().parents[1] / "parity" / name).read_text()
           for name in ("cli.py", "pytest_plugin.py")}
    for name, text in src.items():
        assert "threshold_specs" not in text and ".min_cos or" not in text and "s.thresholds" not in text, name
    assert "settings=settings" in src["cli.py"] and '"settings", self.settings' in src["pytest_plugin.py"]


def test_settings_min_cos_of_zero_is_used_by_the_cli(tmp_path, monkeypatch):
    monkeypatch.chdir(write(tmp_path, "[tool.parity]\nmin_cos = 0.0\n"))
    result = runner.invoke(app, ["diff", "--ref", "pytorch", "--cand", "flash_fp8", "--inject", "nomask",
                                 "--taps", "prefix.0.*", "--no-isolate", "--json", "r.json"])
    assert json.loads((tmp_path / "r.json").read_text())["thresholds"]["min_cos"] == 0.0, result.output
