"""Project defaults from `[tool.parity]` in the current directory's pyproject.toml.

    [tool.parity]
    min_cos = 0.999                      # default minimum cosine per tap
    max_norm_err = 0.05                  # default size bound: | ||cand|| / ||ref|| - 1 | per tap
    taps = ["decoder.*", "output.*"]     # default --taps (globs; a string works too)
    output_dir = "reports"               # where captures and reports go by default

    [tool.parity.thresholds]             # per-pattern minimum cosine (later wins)
    "*.mlp" = 0.995
    "output.logits" = [0.99, 0.1]        # [minimum cosine, size bound]

One merge, `merge()`, used by the CLI and the pytest plugin alike: explicit arguments
(flags, keyword arguments) over these settings over the built-in defaults.  `min_cos`
replaces min_cos, `max_norm_err` replaces max_norm_err (unset: each tap's size bound
follows from its cosine bound, see parity.comparison.rules), explicit threshold
patterns are applied after these (the last match wins), `taps` replaces taps, `output_dir` (`-o`) replaces output_dir.
"""

from __future__ import annotations

import sys
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

# light at load (no numpy): the CLI imports this module at start-up
from parity.comparison.rules import DEFAULT_MIN_COS, Thresholds
from parity.errors import InputError

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover - exercised on 3.10 only
    import tomli as tomllib


KEYS = ("min_cos", "max_norm_err", "thresholds", "taps", "output_dir")


DEFAULT_OUTPUT_DIR = Path("reports")


class SettingsError(InputError):
    """[tool.parity] is malformed (exit code 2)."""


@dataclass(frozen=True)
class Settings:
    min_cos: float | None = None
    thresholds: tuple[tuple[str, float], ...] = ()
    taps: str | None = None
    output_dir: Path = DEFAULT_OUTPUT_DIR
    source: str | None = None  # the pyproject.toml these came from, None = built-in defaults
    max_norm_err: float | None = None
    norm_thresholds: tuple[tuple[str, float], ...] = ()  # size bounds of patterns given as [cos, size]

    def threshold_specs(self, extra: list[str] | tuple[str, ...] = ()) -> list[str]:
        """GLOB=VALUE[,SIZE] specs: these settings' patterns, then `extra` (flags win: last match wins)."""
        sizes = dict(self.norm_thresholds)
        return [f"{g}={v}" + (f",{sizes[g]}" if g in sizes else "") for g, v in self.thresholds] + list(extra)


ThresholdsArg = Thresholds | Mapping[str, float] | Iterable[str] | str | None


@dataclass(frozen=True)
class Merged:
    """What one run uses: explicit arguments over [tool.parity] over the defaults."""

    thresholds: Thresholds
    taps: str | None
    output_dir: Path
    bounds_from: str | None = None  # who set bounds: "flags", "settings" or None (the defaults)

    def live_thresholds(self, oracle: bool | None) -> Thresholds | None:
        """What a live diff is given (`api.diff_live`): None when nobody set bounds, so the
        defaults apply (calibrated budgets where cheap); also None when --oracle is asked
        for over bounds from [tool.parity] (the flag is the more specific request)."""
        if self.bounds_from is None or (oracle and self.bounds_from == "settings"):
            return None
        return self.thresholds

    @property
    def min_cos(self) -> float:
        return self.thresholds.min_cos


def specs(thresholds: ThresholdsArg) -> list[str]:
    """GLOB=MIN_COS[,MAX_NORM_ERR] specs from {glob: min_cos or (min_cos, max_norm_err)},
    one such spec or a list of them; InputError for a malformed one."""
    if thresholds is None:
        return []
    if isinstance(thresholds, Mapping):
        out = []
        for g, v in thresholds.items():
            both = isinstance(v, (list, tuple))
            if both and len(v) != 2:
                raise InputError(f"threshold {g!r}: expected MIN_COS or (MIN_COS, MAX_NORM_ERR), not {v!r}")
            out.append(f"{g}={v[0]},{v[1]}" if both else f"{g}={v}")
        return out
    if isinstance(thresholds, str):
        return [thresholds]
    return [str(s) for s in thresholds]


def patterns(thresholds: ThresholdsArg) -> tuple[tuple[str, float], ...]:
    """(glob, min_cos) pairs of `thresholds` (see `specs`); InputError for a malformed one."""
    try:
        return Thresholds.parse(DEFAULT_MIN_COS, specs(thresholds)).patterns
    except (TypeError, ValueError) as exc:
        raise InputError(str(exc)) from None


def merge(settings: Settings | None = None, *, min_cos: float | None = None, thresholds: ThresholdsArg = None,
          taps: str | None = None, output_dir: str | Path | None = None,
          max_norm_err: float | None = None) -> Merged:
    """Explicit arguments over `settings` over the built-in defaults (None = not given).

    min_cos: explicit, else settings' min_cos, else DEFAULT_MIN_COS.  thresholds: the
    settings' patterns, then the explicit ones (the last match wins, so an explicit
    pattern wins where both match); a ready `Thresholds` is taken as it is, its own
    default included.  taps and output_dir: explicit, else the settings'.  A malformed
    threshold raises InputError."""
    s = settings or Settings()
    flags = min_cos is not None or max_norm_err is not None or isinstance(thresholds, Thresholds) or \
        bool(specs(thresholds))
    ours = s.min_cos is not None or bool(s.thresholds) or s.max_norm_err is not None or bool(s.norm_thresholds)
    bounds_from = "flags" if flags else "settings" if ours else None
    if isinstance(thresholds, Thresholds):
        gate = thresholds
    else:
        default = min_cos if min_cos is not None else s.min_cos if s.min_cos is not None else DEFAULT_MIN_COS
        norm = max_norm_err if max_norm_err is not None else s.max_norm_err
        try:
            gate = Thresholds.parse(float(default), s.threshold_specs(specs(thresholds)),
                                    norm_err=None if norm is None else float(norm))
        except (TypeError, ValueError) as exc:
            raise InputError(str(exc)) from None
    return Merged(gate, taps or s.taps, Path(output_dir) if output_dir is not None else s.output_dir, bounds_from)


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
    pairs, sizes = [], []
    for g, v in thresholds.items():
        where = f"{source} [tool.parity.thresholds] {g!r}"
        if isinstance(v, list):
            if len(v) != 2:
                raise SettingsError(f"{where} must be MIN_COS or [MIN_COS, MAX_NORM_ERR]")
            sizes.append((str(g), _number(v[1], where)))
            v = v[0]
        pairs.append((str(g), _number(v, where)))
    max_norm_err = None if "max_norm_err" not in table else \
        _number(table["max_norm_err"], f"{source} [tool.parity] max_norm_err")
    taps = table.get("taps")
    if isinstance(taps, list) and all(isinstance(t, str) for t in taps):
        taps = ",".join(taps)
    if taps is not None and not isinstance(taps, str):
        raise SettingsError(f"{source} [tool.parity] taps must be a glob or a list of globs")
    out = table.get("output_dir", str(DEFAULT_OUTPUT_DIR))
    if not isinstance(out, str) or not out:
        raise SettingsError(f"{source} [tool.parity] output_dir must be a folder name")
    return Settings(min_cos, tuple(pairs), taps or None, Path(out), source, max_norm_err, tuple(sizes))


def load_settings(directory: str | Path | None = None) -> Settings:
    """[tool.parity] of `directory`/pyproject.toml (default: the current directory);
    built-in defaults when there is no such file or table."""
    path = Path(directory or ".") / "pyproject.toml"
    if not path.is_file():
        return Settings()
    try:
        data = tomllib.loads(path.read_bytes().decode("utf-8"))  # TOML is UTF-8, whatever the locale
    except UnicodeDecodeError as exc:
        raise SettingsError(f"cannot read {path}: not UTF-8 ({exc.reason} at byte {exc.start})") from None
    except (OSError, tomllib.TOMLDecodeError) as exc:
        raise SettingsError(f"cannot read {path}: {exc}") from None
    except RecursionError:
        raise SettingsError(f"cannot read {path}: nested too deeply") from None
    tool = data.get("tool", {})
    if not isinstance(tool, dict):
        raise SettingsError(f"{path}: tool must be a table ([tool.parity] is read from it), not {repr(tool)[:60]}")
    table = tool.get("parity")
    if table is None:
        return Settings()
    if not isinstance(table, dict):
        raise SettingsError(f"{path} [tool.parity] must be a table")
    return parse(table, str(path))
