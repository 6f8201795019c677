"""Capture inside a torch.distributed job (gloo, 2 and 4 CPU processes): each rank writes
its own dump, stamped with its rank, the world size and the candidate's declared sharding;
nothing is communicated by the capture itself."""
from __future__ import annotations

import sys
from pathlib import Path

import pytest
import torch.distributed as dist
from jobs import spawn

EXAMPLES = Path(__file__).parents[2] / "examples"
SHARDING = {"toy.*.mlp": {"kind": "column"}, "*": {"kind": "replicated"}}


def _rank(rank: int, world: int, port: int, out: str, template: bool) -> None:
    import os

    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=world)
    try:
        sys.path.insert(0, str(EXAMPLES))
        import toy_backend

        from parity.api import capture_to_dump
        from parity.taps.backends import BackendOptions

        backend = toy_backend.reference(BackendOptions())
        backend.sharding = SHARDING
        path = Path(out) / ("cand-rank{rank}.h5" if template else "cand.h5")
        capture_to_dump(backend, BackendOptions(), path)
        dist.barrier()  # every rank done before any tears the group down (gloo aborts otherwise)
    finally:
        dist.destroy_process_group()


@pytest.mark.parametrize("world, template", [(2, False), (4, True)])
def test_each_rank_writes_its_own_dump_stamped_with_its_place(tmp_path, world, template):
    spawn(_rank, world, str(tmp_path), template)
    from parity.dump.reader import read_meta

    paths = sorted(tmp_path.glob("cand-rank*.h5"))
    assert [p.name for p in paths] == [f"cand-rank{r}.h5" for r in range(world)]
    for r, p in enumerate(paths):
        meta = read_meta(p)
        assert (meta["rank"], meta["world_size"], meta["dist_backend"]) == (r, world, "gloo")
        assert meta["sharding"] == SHARDING


def test_outside_a_job_nothing_changes(tmp_path):
    from parity.api import distributed, rank_path

    assert distributed() == {}
    assert rank_path(tmp_path / "a.h5", {}) == tmp_path / "a.h5"
    assert rank_path(tmp_path / "a.h5", {"rank": 1, "world_size": 2}) == tmp_path / "a-rank1.h5"
    assert rank_path(tmp_path / "a-{rank}.h5", {"rank": 3, "world_size": 4}) == tmp_path / "a-3.h5"
    assert rank_path(tmp_path / "a.h5", {"rank": 0, "world_size": 1}) == tmp_path / "a.h5"
