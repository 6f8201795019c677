"""A tensor-parallel candidate, split by hand: the hf backend's own tiny Llama, cut in place
into this rank's shard (Megatron style), as a user's TP backend would run it.

Column-parallel: q/k/v projections (whole heads per rank) and the MLP's gate/up; their taps
are this rank's slice of the last axis.  Row-parallel: o_proj and down_proj hold the input
columns of this rank's heads / MLP slice, and their partial outputs are all-reduced, so
everything after them is replicated.  `bug` plants what goes wrong in real TP code:

  order       the rank loads the next rank's shard of q_proj (shards in the wrong order)
  no_reduce   rank 1's MLP drops its all-reduce's result, keeping its partial sum (a missing
              all-reduce; it still joins the collective, as the others wait for it)
  stale       rank 1's q_proj comes from other weights (a rank with stale weights)
  replicated  rank 1's input norm scale differs (a replicated tap that differs on one rank)
"""
from __future__ import annotations

import torch
import torch.distributed as dist

SHARDING = {
    "*": {"kind": "replicated"},
    "decoder.*.q": {"kind": "column"}, "decoder.*.k": {"kind": "column"}, "decoder.*.v": {"kind": "column"},
    "decoder.*.attn": {"kind": "column"},
}


class RowParallel(torch.nn.Module):
    """A row-parallel Linear: this rank's input columns, the partial output all-reduced."""

    def __init__(self, linear: torch.nn.Linear, reduce: bool = True):
        super().__init__()
        self.linear, self.reduce = linear, reduce

    def forward(self, x):
        out = self.linear(x)
        summed = out.clone()
        dist.all_reduce(summed)
        return summed if self.reduce else out


def _rows(weight: torch.Tensor, rank: int, world: int) -> torch.Tensor:
    n = weight.shape[0] // world
    return weight[rank * n:(rank + 1) * n].clone()


def _cols(weight: torch.Tensor, rank: int, world: int) -> torch.Tensor:
    n = weight.shape[1] // world
    return weight[:, rank * n:(rank + 1) * n].clone()


def _linear(weight: torch.Tensor) -> torch.nn.Linear:
    layer = torch.nn.Linear(weight.shape[1], weight.shape[0], bias=False, dtype=weight.dtype)
    layer.weight = torch.nn.Parameter(weight, requires_grad=False)
    return layer


def shard(backend, rank: int, world: int, bug: str | None = None):
    """`backend` (the hf backend of a Llama) cut into `rank`'s shard of `world`, in place."""
    model = backend.model.model
    with torch.no_grad():
        for i, layer in enumerate(model.layers):
            attn, mlp = layer.self_attn, layer.mlp
            source = (rank + 1) % world if bug == "order" else rank
            q = attn.q_proj.weight
            if bug == "stale" and rank == 1:  # another checkpoint's weights (seeded)
                q = q + torch.randn(q.shape, generator=torch.Generator().manual_seed(i), dtype=q.dtype) * q.std()
            attn.q_proj = _linear(_rows(q, source, world))
            attn.k_proj = _linear(_rows(attn.k_proj.weight, rank, world))
            attn.v_proj = _linear(_rows(attn.v_proj.weight, rank, world))
            attn.o_proj = RowParallel(_linear(_cols(attn.o_proj.weight, rank, world)))
            mlp.gate_proj = _linear(_rows(mlp.gate_proj.weight, rank, world))
            mlp.up_proj = _linear(_rows(mlp.up_proj.weight, rank, world))
            mlp.down_proj = RowParallel(_linear(_cols(mlp.down_proj.weight, rank, world)),
                                        reduce=not (bug == "no_reduce" and rank == 1))
            if bug == "replicated" and rank == 1 and i == 0:
                layer.input_layernorm.weight.mul_(1.05)
    backend.sharding = SHARDING
    backend.meta["backend"] = f"tp{world} {backend.meta.get('backend', backend.name)}"
    return backend


def candidate(options, arg: str):
    """the hf Llama at ARG, sharded for this rank of the running torch.distributed job"""
    from parity.probes.hf.backend import factory

    return shard(factory(options, arg), dist.get_rank(), dist.get_world_size())
