"""A tensor-parallel tiny Llama (tests/distributed/tp_llama.py) run with gloo on 2 and 4 CPU
processes: each rank writes its own dump; the shards put back together are the single
process reference's taps, and the replicated taps agree with it."""
from __future__ import annotations

import os
import sys
from pathlib import Path

import numpy as np
import pytest

pytest.importorskip("transformers")

import torch  # noqa: E402
import torch.distributed as dist  # noqa: E402
from jobs import spawn  # noqa: E402

HERE = Path(__file__).parent
TEXT = dict(vocab_size=128, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
            num_key_value_heads=4, max_position_embeddings=64, pad_token_id=0, bos_token_id=1, eos_token_id=2)
OPTS = dict(batch=2, seq_len=8, padding="left", device="cpu")


def save_llama(folder: Path) -> Path:
    import transformers as T

    torch.manual_seed(0)
    T.LlamaForCausalLM(T.LlamaConfig(**TEXT)).save_pretrained(folder)
    return folder


def _rank(rank: int, world: int, port: int, model: str, out: str, bug: str | None) -> None:
    import os

    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=world)
    try:
        sys.path.insert(0, str(HERE))
        import tp_llama

        from parity.api import backend_options, capture_to_dump
        from parity.probes.hf.backend import factory

        opts = backend_options(**OPTS)
        backend = tp_llama.shard(factory(opts, f"{model}@attn=eager,dtype=float32"), rank, world, bug)
        capture_to_dump(backend, opts, Path(out) / "cand.h5")
        dist.barrier()  # every rank done before any tears the group down (gloo aborts otherwise)
    finally:
        dist.destroy_process_group()


def run_ranks(model: Path, out: Path, world: int, bug: str | None = None) -> list[Path]:
    """Every rank's dump of the TP candidate (gloo, `world` CPU processes)."""
    spawn(_rank, world, str(model), str(out), bug)
    return [out / f"cand-rank{r}.h5" for r in range(world)]


@pytest.mark.parametrize("world", [2, 4])
def test_the_shards_put_back_together_are_the_reference(tmp_path, world):
    from parity.api import backend_options, capture_live
    from parity.dump.reader import read_dump

    model = save_llama(tmp_path / "llama")
    ref = capture_live(f"hf:{model}@attn=eager,dtype=float32", backend_options(**OPTS)).by_key()
    ranks = [read_dump(p) for p in run_ranks(model, tmp_path, world)]
    assert [r.meta["rank"] for r in ranks] == list(range(world)) and ranks[0].meta["sharding"]
    taps = [r.by_key() for r in ranks]
    for key in ("decoder.0.q", "decoder.1.k", "decoder.1.attn"):  # column-parallel: this rank's heads
        whole = np.concatenate([t[key].array for t in taps], axis=-1)
        np.testing.assert_allclose(whole, ref[key].array, rtol=1e-5, atol=1e-6)
    for key in ("decoder.0.o_proj", "decoder.1.mlp", "output.logits"):  # all-reduced: every rank holds it
        for t in taps:
            np.testing.assert_allclose(t[key].array, ref[key].array, rtol=1e-4, atol=1e-5)


def _diff(tmp_path, model, world, bug=None):
    """`parity diff REF.h5 'cand-rank*.h5'` of the TP candidate against the reference."""
    import json

    from typer.testing import CliRunner

    from parity.cli import app

    ref = tmp_path / "ref.h5"
    args = ["capture", "--backend", f"hf:{model}@attn=eager,dtype=float32", "--batch", "2", "--seq-len", "8",
            "--padding", "left", "--device", "cpu", "-o", str(ref)]
    assert CliRunner().invoke(app, args).exit_code == 0
    out = tmp_path / bug if bug else tmp_path / "ok"
    out.mkdir()
    run_ranks(model, out, world, bug)
    result = CliRunner().invoke(app, ["diff", str(ref), str(out / "cand-rank*.h5"), "--json", str(out / "r.json")],
                                env={"COLUMNS": "200"})
    return result, json.loads((out / "r.json").read_text())


@pytest.mark.parametrize("world", [2, 4])
def test_a_correct_tp_candidate_passes_against_the_single_process_reference(tmp_path, world):
    result, report = _diff(tmp_path, save_llama(tmp_path / "llama"), world)
    assert result.exit_code == 0, result.output
    assert report["passed"] and len(report["cand"]["ranks"]) == world


@pytest.mark.parametrize("bug, tap, rank_line", [
    ("order", "decoder.0.q", "all 2 ranks diverge at decoder.0.q"),
    ("stale", "decoder.0.q", "rank 1 of 2 diverges at decoder.0.q"),
    ("no_reduce", "decoder.0.mlp", "rank 1 of 2 disagrees"),
    ("replicated", "decoder.0.input_norm", "rank 1 of 2 disagrees"),
])
def test_tp_bugs_are_found_at_their_tap_and_rank(tmp_path, bug, tap, rank_line):
    result, report = _diff(tmp_path, save_llama(tmp_path / "llama"), 2, bug)
    assert result.exit_code == 1, result.output
    said = " ".join(report["warnings"] + [str(p) for p in report["problems"]])
    assert rank_line in said and tap in said, said
    first = report["first_divergence"]
    # a replicated tap that differs on one rank is a finding in itself (a problem naming the rank),
    # even where rank 0's copy, the one compared, matches the reference
    assert (first or {}).get("tap", tap) == tap, first


def test_the_live_api_runs_the_ranks_and_unshards_them(tmp_path, monkeypatch):
    """`parity.api.diff_distributed`: the reference here, the candidate's ranks as a gloo job
    (each building it from its spec), the rank dumps unsharded against the reference."""
    from parity.api import backend_options, diff_distributed
    from parity.errors import InputError

    if not dist.is_available() or not dist.is_gloo_available():
        pytest.skip("this torch has no gloo")
    monkeypatch.setenv("PYTHONPATH", str(HERE) + os.pathsep + os.environ.get("PYTHONPATH", ""))
    model = save_llama(tmp_path / "llama")
    opts = backend_options(**OPTS)
    report = diff_distributed(f"hf:{model}@attn=eager,dtype=float32",
                              f"tp_llama:candidate:{model}@attn=eager,dtype=float32", opts, 2)
    assert report, report.first_divergence
    assert len(report.cand_meta["ranks"]) == 2
    alone = diff_distributed(f"hf:{model}@attn=eager,dtype=float32",
                             f"tp_llama:candidate:{model}@attn=eager,dtype=float32", opts, 1)
    assert alone and len(alone.cand_meta["ranks"]) == 1  # a job of one rank names its dump too
    with pytest.raises(InputError, match="world size must be 1 or more"):
        diff_distributed(f"hf:{model}", f"tp_llama:candidate:{model}", opts, 0)
    with pytest.raises(InputError, match="failed on a rank"):
        diff_distributed(f"hf:{model}", "tp_llama:candidate:/no/such/model", opts, 2)
