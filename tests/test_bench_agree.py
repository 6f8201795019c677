"""bench/agree.py: which figures of two benchmark runs agree within 10 % (the rule a GPU
figure is reported by)."""
from __future__ import annotations

import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "bench"))

import agree  # noqa: E402


def spread(m: float) -> dict:
    return {"median": m, "min": m * 0.9, "max": m * 1.2, "samples": [m]}


def result(live: float, stats: float) -> dict:
    return {"card": "x", "timing": {"ms": {"plain": spread(200.0)},
                                    "ratio": {"live": spread(live), "stats": spread(stats)}}}


def test_figures_within_ten_percent_agree_and_others_do_not():
    rows = agree.agreement(result(2.0, 1.5), result(2.1, 1.8), 0.10, only="ratio")
    assert [(p, ok) for p, _, _, ok in rows] == [("timing.ratio.live", True), ("timing.ratio.stats", False)]
    assert rows[0][1:3] == (2.0, 2.1)
    every = agree.agreement(result(2.0, 1.5), result(2.0, 1.5), 0.10, only="")
    assert [p for p, *_ in every] == ["timing.ms.plain", "timing.ratio.live", "timing.ratio.stats"]


def test_exit_codes(tmp_path, monkeypatch, capsys):
    a, b, c = (tmp_path / n for n in ("a.json", "b.json", "c.json"))
    a.write_text(json.dumps(result(2.0, 1.5)))
    b.write_text(json.dumps(result(2.05, 1.52)))
    c.write_text(json.dumps(result(3.0, 1.5)))
    for args, code in (([a, b], 0), ([a, c], 1), ([a, tmp_path / "missing.json"], 2)):
        monkeypatch.setattr(sys, "argv", ["agree.py", *map(str, args)])
        assert agree.main() == code
    assert "DIFFER" in capsys.readouterr().out
