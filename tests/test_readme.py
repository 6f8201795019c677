"""The README's 'Any Hugging Face model' commands run as documented: same exit codes, same
verdicts, same input fingerprint (the numbers themselves may move with the CPU's BLAS)."""
from __future__ import annotations

import re
import shlex
from pathlib import Path

import pytest
from typer.testing import CliRunner

pytest.importorskip("transformers")

from parity.cli import app  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]


def section(title: str) -> str:
    text = (ROOT / "README.md").read_text()
    start = text.index(f"## {title}")
    return text[start:text.index("\n## ", start + 1)]


def commands(text: str) -> list[tuple[list[str], int]]:
    """`parity ...   # exit N` lines of the section's code blocks."""
    out = []
    for line in text.splitlines():
        m = re.fullmatch(r"parity (.*?)\s+# exit (\d)", line.strip())
        if m:
            out.append((shlex.split(m.group(1)), int(m.group(2))))
    return out


def test_hf_section_commands_run_as_documented(tmp_path, monkeypatch):
    import sys

    sys.path.insert(0, str(ROOT / "examples"))
    try:
        from make_tiny_model import save_tiny_llama
    finally:
        sys.path.remove(str(ROOT / "examples"))
    monkeypatch.chdir(tmp_path)
    monkeypatch.syspath_prepend(str(ROOT))  # `examples.planted_bug:...` as from the repository root
    save_tiny_llama(tmp_path / "reports" / "tiny-llama")
    text = section("Any Hugging Face model")
    cmds = commands(text)
    assert len(cmds) == 3
    outputs = []
    for args, expected in cmds:
        result = CliRunner().invoke(app, args, catch_exceptions=False)
        assert result.exit_code == expected, (args, result.output)
        outputs.append(result.output)
    for needle in ("PASS: all 30 taps within thresholds", "FIRST DIVERGENCE: decoder.1.mlp",
                   "stack decoder, layer 1, component mlp", "fingerprint b481dcb24f3637f6"):
        assert needle in text and needle in "".join(outputs), needle
    assert (tmp_path / "reports" / "tiny-bug.html").is_file()
