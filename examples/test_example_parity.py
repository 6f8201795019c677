"""Gate a candidate backend in your own test suite: a runnable example that is itself a
test (collected by parity's suite).

The `parity_check` fixture comes with parity (pytest plugin).  It compares a candidate
with a reference tap by tap and, on failure, shows the first-divergence banner and the
table of the failing layer.  Here the model is a tiny random Llama saved to a temporary
folder; point the specs at your own checkpoint instead.
"""
from __future__ import annotations

import sys
from pathlib import Path

import pytest

pytest.importorskip("transformers")
sys.path.insert(0, str(Path(__file__).parent))  # the example's helper modules

from make_tiny_model import save_tiny_llama  # noqa: E402
from planted_bug import mlp_offset  # noqa: E402


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory) -> Path:
    return save_tiny_llama(tmp_path_factory.mktemp("tiny-llama"))


def test_sdpa_matches_eager(parity_check, model_dir):
    # Four prompts of different lengths, left-padded: padding positions are don't-care.
    report = parity_check(f"hf:{model_dir}@attn=eager,dtype=float32", f"hf:{model_dir}@attn=sdpa,dtype=float32",
                          batch=4, padding="left")
    assert report.counts() == {"pass": len(report.rows)}


def test_bf16_within_a_looser_gate(parity_check, model_dir):
    parity_check(f"hf:{model_dir}@dtype=float32", f"hf:{model_dir}@dtype=bfloat16", batch=2, min_cos=0.995,
                 thresholds={"output.logits": 0.99})


def test_a_planted_bug_is_named(parity_check, model_dir):
    from parity.taps.backends import BackendOptions

    candidate = mlp_offset(BackendOptions(batch=2), f"{model_dir}@attn=sdpa")  # a ready Backend object works too
    with pytest.raises(AssertionError) as failure:
        parity_check(f"hf:{model_dir}@attn=eager", candidate, batch=2)
    message = str(failure.value)
    assert "FIRST DIVERGENCE: decoder.1.mlp" in message
    assert "decoder layer 1" in message and "decoder.1.post_attn_norm" in message  # the failing layer's table
