"""Project defaults from `[tool.parity]` in the current directory's pyproject.toml.

    [tool.parity]
    min_cos = 0.999                      # default minimum cosine per tap
    taps = ["decoder.*", "output.*"]     # default --taps (globs; a string works too)
    output_dir = "reports"               # where captures and reports go by default

    [tool.parity.thresholds]             # per-pattern minimum cosine (later wins)
    "*.mlp" = 0.995
    "output.logits" = 0.99

Command-line flags win: `--min-cos` replaces min_cos, `--threshold` patterns are applied
after these, `--taps` replaces taps, `-o` replaces output_dir.
"""

from __future__ import annotations

import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover - exercised on 3.10 only
    import tomli as tomllib


KEYS = ("min_cos", "thresholds", "taps", "output_dir")


DEFAULT_MIN_COS = 0.999


class SettingsError(Exception):
    """[tool.parity] is malformed (exit code 2)."""


@dataclass(frozen=True)
class Settings:
    min_cos: float | None = None
    thresholds: tuple[tuple[str, float], ...] = ()
    taps: str | None = None
    output_dir: Path = Path("reports")
    source: str | None = None  # the pyproject.toml these came from, None = built-in defaults

    def threshold_specs(self, extra: list[str] | tuple[str, ...] = ()) -> list[str]:
        """GLOB=VALUE specs: these settings' patterns, then `extra` (flags win: last match wins)."""
        return [f"{g}={v}" for g, v in self.thresholds] + list(extra)


def _number(value: Any, where: str) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise SettingsError(f"{where} must be a number, not {value!r}")
    return float(value)


def parse(table: dict, source: str) -> Settings:
    unknown = sorted(set(table) - set(KEYS))
    if unknown:
        raise SettingsError(f"{source} [tool.parity]: unknown key {unknown[0]!r}; known: {', '.join(KEYS)}")
    min_cos = None if "min_cos" not in table else _number(table["min_cos"], f"{source} [tool.parity] min_cos")
    thresholds = table.get("thresholds", {})
    if not isinstance(thresholds, dict):
        raise SettingsError(f"{source} [tool.parity] thresholds must be a table of \"GLOB\" = MIN_COS")
    pairs = tuple((str(g), _number(v, f"{source} [tool.parity.thresholds] {g!r}")) for g, v in thresholds.items())
    taps = table.get("taps")
    if isinstance(taps, list) and all(isinstance(t, str) for t in taps):
        taps = ",".join(taps)
    if taps is not None and not isinstance(taps, str):
        raise SettingsError(f"{source} [tool.parity] taps must be a glob or a list of globs")
    out = table.get("output_dir", "reports")
    if not isinstance(out, str) or not out:
        raise SettingsError(f"{source} [tool.parity] output_dir must be a folder name")
    return Settings(min_cos, pairs, taps or None, Path(out), source)


def load_settings(directory: str | Path | None = None) -> Settings:
    """[tool.parity] of `directory`/pyproject.toml (default: the current directory);
    built-in defaults when there is no such file or table."""
    path = Path(directory or ".") / "pyproject.toml"
    if not path.is_file():
        return Settings()
    try:
        data = tomllib.loads(path.read_text())
    except (OSError, tomllib.TOMLDecodeError) as exc:
        raise SettingsError(f"cannot read {path}: {exc}") from None
    table = data.get("tool", {}).get("parity")
    if table is None:
        return Settings()
    if not isinstance(table, dict):
        raise SettingsError(f"{path} [tool.parity] must be a table")
    return parse(table, str(path))
