"""Running a function as the ranks of a gloo job on this machine, for the distributed tests."""
from __future__ import annotations

import socket

import pytest
import torch.distributed as dist
import torch.multiprocessing as mp


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def spawn(fn, world: int, *args) -> None:
    """`fn(rank, world, port, *args)` in `world` fresh processes (skips without gloo); a
    rank that raises fails the call."""
    if not dist.is_available() or not dist.is_gloo_available():
        pytest.skip("this torch has no gloo")
    mp.start_processes(fn, args=(world, free_port(), *args), nprocs=world, join=True, start_method="spawn")
