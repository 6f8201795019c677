"""Where every benchmark's result goes: bench/results/<what>_<card>.json, and the line saying so.

Shared by the bench scripts (run as `python bench/NAME.py`, so this sits beside them)."""
from __future__ import annotations

import json
from pathlib import Path


def write_result(out: str | Path, what: str, card: str, result: dict) -> Path:
    """Write `result` as <out>/<what>_<card slug>.json (the card named as the JSON says it)."""
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    slug = "".join(c if c.isalnum() else "_" for c in card).strip("_").lower()
    path = out / f"{what}_{slug}.json"
    path.write_text(json.dumps(result, indent=2))
    print(f"wrote {path}")
    return path
