"""The distributed live diff with NCCL: one GPU per rank (as many ranks as there are GPUs,
up to 2), the TP tiny Llama on CUDA.  Skipped without CUDA or NCCL; the gloo tests cover
the same logic on the CPU."""
from __future__ import annotations

import os

import pytest

pytest.importorskip("transformers")

import torch  # noqa: E402
import torch.distributed as dist  # noqa: E402
from test_tp import HERE, OPTS, save_llama  # noqa: E402

pytestmark = [pytest.mark.gpu,
              pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU"),
              pytest.mark.skipif(not dist.is_available() or not dist.is_nccl_available(), reason="needs NCCL")]


def test_a_tp_candidate_on_nccl_ranks_passes_against_the_reference(tmp_path, monkeypatch):
    from parity.api import backend_options, diff_distributed

    world = min(2, torch.cuda.device_count())
    monkeypatch.setenv("PYTHONPATH", str(HERE) + os.pathsep + os.environ.get("PYTHONPATH", ""))
    model = save_llama(tmp_path / "llama")
    opts = backend_options(**dict(OPTS, device="cuda"))
    cand = f"tp_llama:candidate:{model}@attn=eager,dtype=float32"
    report = diff_distributed(f"hf:{model}@attn=eager,dtype=float32", cand, opts, world, dist_backend="nccl")
    assert len(report.cand_meta["ranks"]) == world
    assert report.cand_meta["dist_backend"] == "nccl" and report.cand_meta["world_size"] == world
    assert report, report.first_divergence
