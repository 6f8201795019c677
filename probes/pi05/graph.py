"""Replaying a whole pi0.5 inference as one CUDA graph (the `fast` candidate).

Eager pi0.5 is launch-bound: thousands of small kernels per inference, most of them in
the 10 denoise steps. One graph per token layout (camera masks + prompt mask) removes the
launch gaps; inputs are copied into static buffers before each replay.
"""
from __future__ import annotations

import torch

from parity.probes.pi05.layers import Attention, GatedMLP, LayerNorm, RMSNorm, SiglipMLP, apply_rope

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


def compile_layers(policy) -> list:
    """Whole transformer layers compiled (residuals, gates, the cache concat and RoPE fuse
    with their neighbours): returns (layer, compiled forward) pairs for CudaGraphSampler to
    switch on and off."""
    pairs = []
    for stack in (policy.vision, policy.prefix, policy.expert):
        for layer in stack.layers:
            pairs.append((layer, torch.compile(layer.forward, dynamic=False)))
    return pairs


class CudaGraphSampler:
    """One set of graphs per token layout: vision+embedding, prefix LLM, denoise loop.

    Three graphs instead of one cost two extra graph launches (microseconds) and give the
    per-stage timings a benchmark needs; they share one memory pool, so each graph's
    outputs stay valid inputs of the next."""

    def __init__(self, policy, compiled_layers: list | None = None):
        self.policy = policy
        self.compiled_layers = compiled_layers or []
        self.graphs: dict = {}
        self.instrumented = False
        self._use_compiled_layers(True)

    def _use_compiled_layers(self, on: bool) -> None:
        for layer, compiled in self.compiled_layers:
            if on:
                layer.forward = compiled
            elif "forward" in vars(layer):
                del layer.forward  # back to the class's forward: module boundaries for the taps

    @torch.inference_mode()
    def warm_up(self, obs, noise) -> None:
        """Compile both execution paths (whole layers; leaves only, used while taps are
        installed) before any capture: nothing may compile inside a graph capture."""
        plan = self.policy.plan_tokens(obs)
        for on in (False, True) if self.compiled_layers else (True,):
            self._use_compiled_layers(on)
            self.policy.sample_eager(obs, noise, plan)
        torch.cuda.synchronize()

    def reset(self, instrumented: bool) -> None:
        """Drop captured graphs; with `instrumented`, the next capture runs with parity's
        taps installed, so their copies are recorded inside the graphs. Taps live on module
        boundaries, so while instrumented the layers run leaf-compiled, not whole-layer
        compiled (the execution note in the backend's metadata says so); no warm-up pass
        then: it would fire the taps twice."""
        self.graphs.clear()
        self.instrumented = instrumented
        self._use_compiled_layers(not instrumented)

    def __call__(self, obs, noise, mark):
        key = (obs.image_masks.cpu().numpy().tobytes(), obs.token_mask.cpu().numpy().tobytes(),
               tuple(obs.images.shape), tuple(noise.shape))
        entry = self.graphs.get(key)
        if entry is None:
            entry = self.graphs[key] = self._capture(obs, noise)
        for name in obs.__dataclass_fields__:
            getattr(entry["obs"], name).copy_(getattr(obs, name))
        entry["noise"].copy_(noise)
        for stage, graph in entry["graphs"]:
            graph.replay()
            mark(stage)
        return entry["out"].clone()

    def _capture(self, obs, noise) -> dict:
        policy = self.policy
        static_obs = type(obs)(*(getattr(obs, f).clone() for f in obs.__dataclass_fields__))
        static_noise = noise.clone()
        plan = policy.plan_tokens(static_obs)
        if not self.instrumented:  # warm up kernels, compilation and library handles outside capture
            side = torch.cuda.Stream()
            side.wait_stream(torch.cuda.current_stream())
            with torch.cuda.stream(side):
                policy.sample_eager(static_obs, static_noise, plan)
            torch.cuda.current_stream().wait_stream(side)
        pool = torch.cuda.graph_pool_handle()
        graphs = [(stage, torch.cuda.CUDAGraph()) for stage in ("vision", "prefix", "denoise")]
        with torch.cuda.graph(graphs[0][1], pool=pool):
            x = policy.embed_prefix(static_obs, plan)
        with torch.cuda.graph(graphs[1][1], pool=pool):
            cache = policy.prefix_cache(x, plan)
        with torch.cuda.graph(graphs[2][1], pool=pool):
            out = policy.denoise(static_obs, static_noise, cache)
        # everything the graphs read must outlive them: inputs, the plan's index tensors,
        # the intermediate embeddings and cache
        return {"graphs": graphs, "obs": static_obs, "noise": static_noise, "plan": plan, "x": x, "cache": cache,
                "out": out}
