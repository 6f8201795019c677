"""A candidate's build-time patches cannot change the reference's run, and a candidate
that equals the reference everywhere is pointed out.

The patching candidate (tests/hf_tiny.py:rope_patched) replaces a module-level
transformers function while it is built, as liger-kernel does.  Before the reference ran
to completion ahead of the candidate's build, both runs used the patch, every tap was
bit-identical and the diff passed."""
from __future__ import annotations

import pytest

pytest.importorskip("transformers")


@pytest.fixture
def restored(monkeypatch):
    """Undo the candidate's module-wide patch after the test."""
    import transformers.models.llama.modeling_llama as llama

    monkeypatch.setattr(llama, "apply_rotary_pos_emb", llama.apply_rotary_pos_emb)


@pytest.mark.parametrize("on_device", [True, False])
def test_a_candidate_patching_shared_code_does_not_patch_the_reference(tiny_models, restored, on_device):
    import parity

    folder = tiny_models("llama")
    report = parity.compare(f"hf:{folder}@attn=eager", f"hf_tiny:rope_patched:{folder}@attn=eager", batch=2,
                            seq_len=8, on_device=on_device)
    differs = [r for r in report.rows if r.metrics is not None and r.metrics.max_abs > 0]
    assert differs, "the reference ran the candidate's patch"
    # RoPE acts on q and k inside attention: the first tap that sees it is layer 0's
    # attention output (q/k are tapped before RoPE), never anything upstream of it.
    assert (differs[0].info.layer, differs[0].info.component) == (0, "attn"), differs[0].key
    assert not report.warnings


def test_a_candidate_equal_everywhere_is_a_warning_not_a_failure(tiny_models, tmp_path):
    import json

    from typer.testing import CliRunner

    from parity.cli import app

    folder = tiny_models("llama")
    spec = f"hf:{folder}@attn=eager"
    out = tmp_path / "r.json"
    result = CliRunner().invoke(app, ["diff", "--ref", spec, "--cand", spec, "--seq-len", "8", "--json", str(out)])
    assert result.exit_code == 0, result.output
    assert "WARNING: identical to the reference on every tap" in result.output
    data = json.loads(out.read_text())
    assert data["passed"] and data["warnings"] and "really different" in data["warnings"][0]


def test_a_real_difference_gets_no_warning(tiny_models):
    import parity

    folder = tiny_models("llama")
    report = parity.compare(f"hf:{folder}@attn=eager", f"hf:{folder}@attn=sdpa", batch=2, seq_len=8)
    assert report and not report.warnings
