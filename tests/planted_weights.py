"""Backends with a planted weight-loading bug, for `parity weights` tests.

Each builds the pytorch reference from the same options and then breaks its weights the
way a real loader does.  Importable as `planted_weights:NAME` (pytest puts tests/ on
sys.path), like any user's `package.module:factory` backend."""
from __future__ import annotations

import torch

from parity.probes.pi05.backends import pytorch
from parity.probes.pi05.layers import AdaRMSNorm, RMSNorm
from parity.taps.backends import Backend, BackendOptions


def _planted(opts: BackendOptions, name: str) -> Backend:
    backend = pytorch(opts)
    backend.name = backend.meta["backend"] = name
    return backend


@torch.no_grad()
def transposed_q(opts: BackendOptions) -> Backend:
    """A JAX kernel [in, out] loaded without its `.T`: SigLIP layer 0's q projection is
    square, so nothing in the shapes gives it away."""
    backend = _planted(opts, "planted_transposed_q")
    q = backend.model.vision.layers[0].self_attn.q_proj.weight
    q.copy_(q.T.clone())
    return backend


@torch.no_grad()
def fp16_norms(opts: BackendOptions) -> Backend:
    """Gemma RMSNorm weights, kept in float32 by the reference, held in float16."""
    backend = _planted(opts, "planted_fp16_norms")
    for m in backend.model.modules():
        if isinstance(m, RMSNorm) and not isinstance(m, AdaRMSNorm):
            m.weight.data = m.weight.data.to(torch.float16)
    return backend


def raw_parameters(opts: BackendOptions) -> Backend:
    """The reference without its effective-parameter view: parity falls back to the model's
    named_parameters(), so norm weights are compared as stored."""
    backend = _planted(opts, "raw_parameters")
    backend.parameters = None
    return backend
