"""A candidate backend with a planted bug, as a user would write one for their own kernel:
`planted_bug:mlp_offset:PATH[@opts]` runs the hf model at PATH with layer 1's MLP output
nudged by a forward hook.  parity should name `decoder.1.mlp` as the first divergence.

    cd examples && parity diff --ref 'hf:../reports/tiny-llama' --cand 'planted_bug:mlp_offset:../reports/tiny-llama'
"""
from __future__ import annotations


def mlp_offset(options, arg: str):
    """the hf backend with layer 1's MLP output scaled by 1.05 and shifted by 0.01"""
    from parity.probes.hf.backend import factory

    backend = factory(options, arg)
    backend.model.model.layers[1].mlp.register_forward_hook(lambda module, args, out: out * 1.05 + 0.01)
    backend.meta["faults"] = ["mlp_offset@layer1"]
    return backend
