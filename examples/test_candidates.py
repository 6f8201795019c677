"""The candidates of `candidates.py` against the plain hf model, as a user's suite would
gate them: quantised ones pass within the allowance they declare and their weights are
judged as quantised; the torch.compile one is flagged as identical on a CPU (the eager
backend changes nothing) and its graph breaks are recorded; liger-kernel needs a GPU."""
from __future__ import annotations

import sys
from pathlib import Path

import pytest

pytest.importorskip("transformers")
sys.path.insert(0, str(Path(__file__).parent))  # candidates.py, make_tiny_model.py

from make_tiny_model import save_tiny_llama  # noqa: E402

import parity  # noqa: E402
from parity.api import run_weights  # noqa: E402


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory) -> Path:
    return save_tiny_llama(tmp_path_factory.mktemp("tiny-llama"))


@pytest.mark.parametrize("name, library", [("torchao_int8", "torchao"), ("quanto_int8", "optimum.quanto"),
                                           ("dynamic_int8", None)])
def test_quantised_candidates_pass_within_their_declared_allowance(model_dir, name, library):
    if library:
        pytest.importorskip(library)
    # on the CPU: torch.ao's dynamic quantisation has CPU kernels only
    report = parity.compare(f"hf:{model_dir}", f"candidates:{name}:{model_dir}", batch=3, padding="left",
                            device="cpu")
    assert report, report.first_divergence
    assert report.thresholds["calibration"]["lossy"]["from"] == "decoder.0.q"  # budgets judge the embedding
    strict = parity.compare(f"hf:{model_dir}", f"candidates:{name}:{model_dir}", batch=3, padding="left",
                            device="cpu", oracle=True)
    assert strict, strict.first_divergence
    weights = run_weights(f"hf:{model_dir}", f"candidates:{name}:{model_dir}", quantized_min_cos=0.99, device="cpu")
    assert weights and any(r.quantized for r in weights.rows)


def test_a_compiled_candidate_is_flagged_identical_and_its_graph_breaks_recorded(model_dir):
    report = parity.compare(f"hf:{model_dir}", f"candidates:compiled:{model_dir}", batch=3, padding="left",
                            device="cpu")
    assert report and any("identical to the reference" in w for w in report.warnings)
    assert report.cand_meta["observation"]["graph_breaks"] > 0


def test_liger_kernel_needs_its_package_and_a_gpu(model_dir):
    pytest.importorskip("liger_kernel", reason="liger-kernel is not installed here (a CUDA/Triton library)")
    import torch

    if not torch.cuda.is_available():
        pytest.skip("liger-kernel's kernels need a CUDA GPU")
    report = parity.compare(f"hf:{model_dir}@attn=eager", f"candidates:liger:{model_dir}", device="cuda", batch=3,
                            padding="left", min_cos=0.999)
    assert report, report.first_divergence
