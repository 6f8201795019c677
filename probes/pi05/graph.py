"""Replaying a whole pi0.5 inference as one CUDA graph (the `fast` candidate).

Eager pi0.5 is launch-bound: thousands of small kernels per inference, most of them in
the 10 denoise steps. One graph per token layout (camera masks + prompt mask) removes the
launch gaps; inputs are copied into static buffers before each replay.
"""
from __future__ import annotations

import torch

from .layers import Attention, GatedMLP, LayerNorm, RMSNorm, SiglipMLP, apply_rope

FUSED_LEAVES = (RMSNorm, GatedMLP, LayerNorm, SiglipMLP)  # subclasses (AdaRMSNorm, Fp8GatedMLP) included


def compile_leaves(policy) -> int:
    """torch.compile the elementwise-heavy leaves (norms, MLPs, RoPE) so each becomes a
    few fused kernels: inside a CUDA graph the cost is per kernel, not per launch call.

    Only leaves: parity's taps sit on module boundaries (__call__), outside the compiled
    forwards, so an instrumented run executes exactly the same kernels."""
    count = 0
    rope = torch.compile(apply_rope, dynamic=False)
    for module in policy.modules():
        if isinstance(module, FUSED_LEAVES):
            module.forward = torch.compile(module.forward, dynamic=False)
            count += 1
        elif isinstance(module, Attention):
            module.rope_fn = rope
    return count


class CudaGraphSampler:
    def __init__(self, policy):
        self.policy = policy
        self.graphs: dict = {}
        self.instrumented = False

    def reset(self, instrumented: bool) -> None:
        """Drop captured graphs; with `instrumented`, the next capture runs with parity's
        taps installed, so their copies are recorded inside the graph (no warm-up pass then:
        it would fire the taps twice)."""
        self.graphs.clear()
        self.instrumented = instrumented

    def __call__(self, obs, noise, mark):
        plan_key = (obs.image_masks.cpu().numpy().tobytes(), obs.token_mask.cpu().numpy().tobytes(),
                    tuple(obs.images.shape), tuple(noise.shape))
        entry = self.graphs.get(plan_key)
        if entry is None:
            entry = self.graphs[plan_key] = self._capture(obs, noise)
        graph, static_obs, static_noise, _plan, out = entry
        for name in obs.__dataclass_fields__:
            getattr(static_obs, name).copy_(getattr(obs, name))
        static_noise.copy_(noise)
        graph.replay()
        mark("graph")
        return out.clone()

    def _capture(self, obs, noise):
        policy = self.policy
        static_obs = type(obs)(*(getattr(obs, f).clone() for f in obs.__dataclass_fields__))
        static_noise = noise.clone()
        plan = policy.plan_tokens(static_obs)
        if not self.instrumented:  # warm up kernels and library handles outside the capture
            side = torch.cuda.Stream()
            side.wait_stream(torch.cuda.current_stream())
            with torch.cuda.stream(side):
                policy.sample_eager(static_obs, static_noise, plan)
            torch.cuda.current_stream().wait_stream(side)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            out = policy.sample_eager(static_obs, static_noise, plan)
        # everything the graph reads must outlive it: the plan's index tensors too
        return graph, static_obs, static_noise, plan, out
