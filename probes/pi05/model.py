"""The pi0.5 policy (openpi's pi05): SigLIP + projector + Gemma prefix LLM, a Gemma action
expert with adaRMSNorm time conditioning, flow-matching sampling over a prefix K/V cache.

One class serves the reference and every candidate: `Variant` says which attention core
and MLP a backend uses and whether it packs away invalid prefix tokens.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Protocol

import numpy as np
import torch
from torch import nn

from parity.probes.pi05.config import GemmaConfig, Pi05Config, VisionConfig
from parity.probes.pi05.faults import Faults
from parity.probes.pi05.graph import CudaGraphSampler, compile_layers, compile_leaves
from parity.probes.pi05.layers import (
    AdaRMSNorm,
    Attention,
    AttnContext,
    Fp8GatedMLP,
    GatedMLP,
    LayerNorm,
    MaskedCore,
    PackedCore,
    RMSNorm,
    SiglipMLP,
    TapPoint,
    init_weights,
    rope_tables,
    wide,
)


class WeightSource(Protocol):
    """Where `Pi05Policy.build` takes every weight from (a checked checkpoint)."""

    def load_into(self, model: nn.Module) -> None: ...


@dataclass(frozen=True)
class Variant:
    packed: bool = False  # flash: compact valid prefix tokens, mask-free fused attention
    fp8_mlp: bool = False  # flash_fp8: Gemma MLP gate/up projections in FP8 e4m3
    cuda_graph: bool = False  # fast: the whole inference replayed as one CUDA graph per token layout
    compiled: bool = False  # fast: norms, MLPs and RoPE fused by torch.compile (CUDA only)
    batched_conditioning: bool = False  # fast: all steps' time conditions and adaRMS modulations at once
    fused_qkv: bool = False  # fast: one q|k|v projection


@dataclass(frozen=True)
class Observation:
    images: torch.Tensor  # [B, C, 3, S, S] in [-1, 1]
    image_masks: torch.Tensor  # [B, C] bool
    tokens: torch.Tensor  # [B, L] int64
    token_mask: torch.Tensor  # [B, L] bool
    state: torch.Tensor  # [B, action_dim] (not in the prompt: discrete_state_input=False)

    def to(self, device) -> Observation:
        return Observation(*(getattr(self, f).to(device) for f in self.__dataclass_fields__))


class SiglipLayer(nn.Module):
    def __init__(self, cfg: VisionConfig, core, faults: Faults):
        super().__init__()
        self.input_norm = LayerNorm(cfg.width, eps=1e-6)
        self.self_attn = Attention(cfg.width, cfg.num_heads, cfg.num_heads, cfg.head_dim, core, bias=True,
                                   faults=faults)
        self.post_attn_norm = LayerNorm(cfg.width, eps=1e-6)
        self.mlp = SiglipMLP(cfg.width, cfg.mlp_dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y, _, _ = self.self_attn(self.input_norm(x), AttnContext())
        x = x + y
        return x + self.mlp(self.post_attn_norm(x))


class SiglipTower(nn.Module):
    """So400m/14-style encoder: patch conv, learned positions, pre-LN blocks, final norm."""

    def __init__(self, cfg: VisionConfig, core, faults: Faults):
        super().__init__()
        self.patch_embedding = nn.Conv2d(3, cfg.width, cfg.patch_size, stride=cfg.patch_size)
        self.patch_embedding.keep_fp32 = True
        self.position_embedding = nn.Parameter(torch.zeros(cfg.num_tokens, cfg.width))
        self.embed = TapPoint()
        self.layers = nn.ModuleList(SiglipLayer(cfg, core, faults) for _ in range(cfg.depth))
        self.post_norm = LayerNorm(cfg.width, eps=1e-6)

    def forward(self, images: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
        # images [N, 3, S, S] -> [N, tokens, width]
        x = self.patch_embedding(images.to(self.patch_embedding.weight.dtype)).flatten(2).transpose(1, 2)
        x = self.embed((x + self.position_embedding).to(dtype))
        for layer in self.layers:
            x = layer(x)
        return self.post_norm(x)


class GemmaLayer(nn.Module):
    def __init__(self, cfg: GemmaConfig, cond_dim: int | None, core, eps: float, faults: Faults):
        super().__init__()

        def norm():
            return RMSNorm(cfg.width, eps, faults) if cond_dim is None else AdaRMSNorm(cfg.width, cond_dim, eps, faults)

        self.input_norm = norm()
        self.self_attn = Attention(cfg.width, cfg.num_heads, cfg.num_kv_heads, cfg.head_dim, core, bias=False,
                                   faults=faults)
        self.post_attn_norm = norm()
        self.mlp = GatedMLP(cfg.width, cfg.mlp_dim, faults)

    def forward(self, x, ctx, rope, cond=None, prefix_kv=None, modulation=(None, None)):
        h, gate = self.input_norm(x, cond, modulation[0])
        y, k, v = self.self_attn(h, ctx, rope, prefix_kv)
        x = x + (y if gate is None else y * gate)
        h, gate = self.post_attn_norm(x, cond, modulation[1])
        y = self.mlp(h)
        return x + (y if gate is None else y * gate), k, v


class GemmaStack(nn.Module):
    def __init__(self, cfg: GemmaConfig, cond_dim, core, eps, faults):
        super().__init__()
        self.embed = TapPoint()
        self.layers = nn.ModuleList(GemmaLayer(cfg, cond_dim, core, eps, faults)
                                    for _ in range(cfg.depth))
        self.final_norm = (RMSNorm(cfg.width, eps, faults) if cond_dim is None
                           else AdaRMSNorm(cfg.width, cond_dim, eps, faults))

    def modulated_norms(self) -> list:
        """Every adaRMSNorm in execution order: per layer input, post-attention; then final."""
        return [n for layer in self.layers for n in (layer.input_norm, layer.post_attn_norm)] + [self.final_norm]


@dataclass(frozen=True)
class TokenPlan:
    """The prefix token layout of one inference, decided on the host."""

    gather: torch.Tensor | None  # [B, L] indices into the padded prefix; None = keep it padded
    valid: torch.Tensor  # [B, L] bool: real tokens among the row slots
    positions: torch.Tensor  # [B, L] RoPE positions (cumsum of the pad mask - 1)
    dense: bool  # every slot is a real token: attention needs no mask
    slots: np.ndarray  # [B, L] canonical prefix position of each slot, -1 = don't care
    image_rows: torch.Tensor | None = None  # flat (sample, camera) indices of the images run; None = all
    image_rows_host: np.ndarray | None = None  # the same on the host, for the vision token layout


class PrefixCache:
    """Per-layer prefix K/V (after RoPE) and which prefix keys are valid.

    Read-only by design: each denoise step concatenates its own K/V to a copy. The
    `kv_mutate` fault stores the concatenation back, as an in-place cache update would."""

    def __init__(self, keys, values, key_valid: torch.Tensor, dense: bool, mutate: bool):
        self.keys, self.values = list(keys), list(values)
        self.key_valid = [key_valid] * len(self.keys)
        self.dense, self.mutate = dense, mutate

    def for_layer(self, layer: int, suffix_len: int):
        """(prefix K, prefix V, attention context) for the suffix queries of one layer."""
        keys, values = self.keys[layer], self.values[layer]
        if self.dense:  # every cached key is real: no validity mask at all
            return (keys, values), AttnContext(dense=True)
        valid = self.key_valid[layer]
        suffix_valid = torch.ones(valid.shape[0], suffix_len, dtype=torch.bool, device=valid.device)
        return (keys, values), AttnContext(k_valid=torch.cat([valid, suffix_valid], dim=1))

    def after_step(self, layer: int, k: torch.Tensor, v: torch.Tensor) -> None:
        """Nothing, unless the `kv_mutate` fault stores this step's K/V into the cache."""
        if self.mutate:
            self.keys[layer] = torch.cat([self.keys[layer], k], dim=1)
            self.values[layer] = torch.cat([self.values[layer], v], dim=1)
            ones = torch.ones(k.shape[:2], dtype=torch.bool, device=k.device)
            self.key_valid[layer] = torch.cat([self.key_valid[layer], ones], dim=1)


def _no_mark(stage: str) -> None:
    pass


def _cast_linears(model: nn.Module, dtype: torch.dtype) -> None:
    """Linear and embedding weights to the model dtype, except those kept in fp32."""
    for m in model.modules():
        if isinstance(m, (nn.Linear, nn.Embedding)) and not getattr(m, "keep_fp32", False):
            m.to(dtype)


def sincos_time_embedding(t: torch.Tensor, dim: int, min_period=4e-3, max_period=4.0) -> torch.Tensor:
    """[sin(2 pi t / p_k), cos(2 pi t / p_k)], p_k log-spaced from min to max period.

    Computed in float64 and rounded once to float32, as openpi's PyTorch port does: in
    float32 (JAX's choice) the angles reach 2 pi / 4e-3 ~ 1571 rad and the embedding is
    off by a relative 2.4e-5 at t = 1."""
    fraction = torch.linspace(0.0, 1.0, dim // 2, dtype=torch.float64, device=t.device)
    period = min_period * (max_period / min_period) ** fraction
    angle = (2 * math.pi / period)[None, :] * t.double()[:, None]  # [B, dim/2] float64
    return torch.cat([angle.sin(), angle.cos()], dim=-1).to(wide(t.dtype))


class Pi05Policy(nn.Module):
    def __init__(self, cfg: Pi05Config, variant: Variant, faults: Faults):
        super().__init__()
        self.cfg, self.variant, self.faults = cfg, variant, faults
        core = (PackedCore if variant.packed else MaskedCore)(faults)
        # SigLIP attention has no mask (every image token is real), so every bundled
        # backend runs it the same way; the variants differ in the Gemma stacks only.
        self.vision = SiglipTower(cfg.vision, MaskedCore(faults), faults)
        self.projector = nn.Linear(cfg.vision.width, cfg.llm.width)
        self.embed_tokens = nn.Embedding(cfg.vocab_size, cfg.llm.width)
        self.prefix = GemmaStack(cfg.llm, None, core, cfg.norm_eps, faults)
        self.expert = GemmaStack(cfg.expert, cfg.expert.width, core, cfg.norm_eps, faults)
        self.action_in_proj = nn.Linear(cfg.action_dim, cfg.expert.width)
        self.action_out_proj = nn.Linear(cfg.expert.width, cfg.action_dim)
        self.time_mlp_in = nn.Linear(cfg.expert.width, cfg.expert.width)
        self.time_mlp_out = nn.Linear(cfg.expert.width, cfg.expert.width)
        for m in (self.action_in_proj, self.action_out_proj, self.time_mlp_in, self.time_mlp_out):
            m.keep_fp32 = True
        self.expert.time = TapPoint()
        self.expert.velocity = TapPoint()
        self.actions = TapPoint()
        self.packs_prefix = variant.packed and not faults.has("nomask")
        if faults.has("mid_norm"):  # one middle layer's norm only: everything after it inherits the error
            self.prefix.layers[cfg.llm.depth // 2].input_norm.plain_w = True
        self.rope_theta = 1e6 if faults.has("rope_base") else cfg.rope_theta
        self.graphed = None  # a CudaGraphSampler when the variant replays CUDA graphs

    # ---- building ---------------------------------------------------------------
    @classmethod
    def build(cls, cfg: Pi05Config, seed: int, variant: Variant, faults: Faults, dtype: torch.dtype,
              device: torch.device, weights: WeightSource | None = None) -> Pi05Policy:
        """Seeded random weights, or every weight from a checkpoint (checked already):
        the model is allocated empty (no memory, no default init) and every parameter is
        filled from the seed or the file, so no other value can survive.  FP8 MLPs
        quantise whatever dense weights the model holds at this point."""
        with torch.device("meta"):
            model = cls(cfg, variant, faults)
        if weights is None:
            model.to_empty(device=device)
            init_weights(model, seed)
            _cast_linears(model, dtype)
        else:
            _cast_linears(model, dtype)
            model.to_empty(device=device)
            weights.load_into(model)  # file values cast to each parameter's dtype
        if variant.fused_qkv:
            for module in model.modules():
                if isinstance(module, Attention):
                    module.fuse_qkv()
        if variant.fp8_mlp:
            for stack in (model.prefix, model.expert):
                for layer in stack.layers:
                    layer.mlp = Fp8GatedMLP(layer.mlp)
        model.dtype = dtype
        model.requires_grad_(False)  # inference only: no autograd graphs, also not in torch.compile
        compiled_layers = None
        if variant.compiled and device.type == "cuda":
            compile_leaves(model)
            compiled_layers = compile_layers(model)
        if variant.cuda_graph and device.type == "cuda":
            model.graphed = CudaGraphSampler(model, compiled_layers)
        return model.eval()

    # ---- token layout -----------------------------------------------------------
    def prefix_valid(self, obs: Observation) -> torch.Tensor:
        """[B, P] bool: which prefix slots are real tokens (camera masks, prompt mask)."""
        n = self.cfg.vision.num_tokens
        cams = obs.image_masks[:, :, None].expand(-1, -1, n).reshape(obs.image_masks.shape[0], -1)
        return torch.cat([cams, obs.token_mask], dim=1)

    def plan_tokens(self, obs: Observation) -> TokenPlan:
        """Decide the prefix token layout on the host, once per inference (one small sync),
        so that nothing inside the forward has to ask the device."""
        valid_dev = self.prefix_valid(obs)
        valid = valid_dev.cpu().numpy()
        B, P = valid.shape
        canon = np.arange(B * P, dtype=np.int64).reshape(B, P)
        device = valid_dev.device
        if not self.packs_prefix:
            positions = (valid_dev.cumsum(1) - 1).clamp(min=0)
            return TokenPlan(None, valid_dev, positions, bool(valid.all()), np.where(valid, canon, -1))
        lengths = valid.sum(1)
        lmax = int(lengths.max())
        slots = np.full((B, lmax), -1, dtype=np.int64)
        gather = np.zeros((B, lmax), dtype=np.int64)
        for b in range(B):
            idx = np.flatnonzero(valid[b])
            slots[b, : idx.size] = canon[b, idx]
            gather[b, : idx.size] = idx
        packed_valid = torch.from_numpy(slots >= 0).to(device)
        positions = torch.arange(lmax, device=device).expand(B, -1)
        rows = np.flatnonzero(obs.image_masks.cpu().numpy().reshape(-1))
        return TokenPlan(torch.from_numpy(gather).to(device), packed_valid, positions, bool((lengths == lmax).all()),
                         slots, torch.from_numpy(rows).to(device), rows)

    def prefix_slots(self, obs: Observation) -> np.ndarray:
        """Canonical prefix position of every row slot this backend computes, -1 = don't care."""
        return self.plan_tokens(obs).slots

    def vision_rows(self, obs: Observation) -> np.ndarray:
        """Flat (sample, camera) index of every image the vision tower runs on."""
        rows = self.plan_tokens(obs).image_rows_host
        return np.arange(obs.image_masks.numel()) if rows is None else rows

    # ---- forward ------------------------------------------------------------------
    def embed_prefix(self, obs: Observation, plan: TokenPlan) -> torch.Tensor:
        B, C = obs.image_masks.shape
        images = obs.images.flatten(0, 1)  # [B*C, 3, S, S]
        if plan.image_rows is None:
            img_tokens = self.projector(self.vision(images, self.dtype))  # [B*C, n, D]
        else:  # packing backends skip masked cameras: their tokens are never attended to
            valid = self.projector(self.vision(images[plan.image_rows], self.dtype))  # [V, n, D]
            img_tokens = valid.new_zeros(B * C, *valid.shape[1:]).index_copy(0, plan.image_rows, valid)
        img_tokens = img_tokens.reshape(B, -1, self.cfg.llm.width)  # [B, C*n, D]
        text = self.embed_tokens(obs.tokens) * math.sqrt(self.cfg.llm.width)  # [B, L, D]
        return torch.cat([img_tokens, text.to(self.dtype)], dim=1)  # [B, P, D]

    def run_prefix(self, obs: Observation, plan: TokenPlan, mark=_no_mark) -> PrefixCache:
        x = self.embed_prefix(obs, plan)
        mark("vision")
        return self.prefix_cache(x, plan)

    def prefix_cache(self, x: torch.Tensor, plan: TokenPlan) -> PrefixCache:
        """The prefix LLM over the prefix embeddings [B, P, D]: per-layer K/V after RoPE."""
        if plan.gather is not None:  # packed: valid tokens only, [B, P, D] -> [B, L, D]
            x = x.gather(1, plan.gather[..., None].expand(-1, -1, x.shape[-1]))
        x = self.prefix.embed(x)
        ctx = AttnContext(q_valid=plan.valid, k_valid=plan.valid, dense=plan.dense)
        rope = rope_tables(plan.positions, self.cfg.llm.head_dim, self.rope_theta, wide(self.dtype))
        keys, values = [], []
        for layer in self.prefix.layers:
            x, k, v = layer(x, ctx, rope)
            keys.append(k)
            values.append(v)
        return PrefixCache(keys, values, plan.valid, plan.dense, mutate=self.faults.has("kv_mutate"))

    def time_condition(self, t: torch.Tensor) -> torch.Tensor:
        """c = swish(time_mlp_out(swish(time_mlp_in(posemb(t))))): [N] -> [N, De] fp32."""
        cond = torch.nn.functional.silu(self.time_mlp_in(sincos_time_embedding(t, self.cfg.expert.width)))
        return torch.nn.functional.silu(self.time_mlp_out(cond))

    def velocity(self, cache: PrefixCache, rope, x_t: torch.Tensor, t: torch.Tensor, cond=None, modulations=None):
        """v(x_t, t). `cond` and `modulations` (every adaRMSNorm's dense(cond), in
        expert.modulated_norms() order) may come precomputed for all steps at once."""
        cond = self.expert.time(self.time_condition(t) if cond is None else cond)  # [B, De] fp32
        mods = modulations if modulations is not None else [None] * (2 * len(self.expert.layers) + 1)
        x = self.expert.embed(self.action_in(x_t))  # [B, H, De]
        for i, layer in enumerate(self.expert.layers):
            prefix_kv, ctx = cache.for_layer(i, x.shape[1])
            x, k, v = layer(x, ctx, rope, cond, prefix_kv, (mods[2 * i], mods[2 * i + 1]))
            cache.after_step(i, k, v)
        x, _ = self.expert.final_norm(x, cond, mods[-1])
        return self.expert.velocity(self.action_out(x))  # [B, H, action_dim] fp32

    def action_in(self, x_t: torch.Tensor) -> torch.Tensor:
        """The action in-projection: x_t [B, H, action_dim] fp32 -> [B, H, De] in the model dtype."""
        return self.action_in_proj(x_t).to(self.dtype)

    def action_out(self, x: torch.Tensor) -> torch.Tensor:
        """The action out-projection, in fp32: [B, H, De] -> the velocity [B, H, action_dim]."""
        return self.action_out_proj(x.to(self.action_out_proj.weight.dtype))

    def euler_step(self, x_t: torch.Tensor, v: torch.Tensor, t: torch.Tensor, dt: torch.Tensor) -> torch.Tensor:
        """One flow-matching Euler update at time t [B]: x_t + dt * v, in fp32 ([B, H, action_dim])."""
        return x_t + dt * v

    @torch.inference_mode()
    def sample_actions(self, obs: Observation, noise: torch.Tensor, mark=_no_mark) -> torch.Tensor:
        """Flow matching from t=1 (noise) to t=0. `mark(stage)` is called as each stage
        (vision, prefix, denoise) ends, so a benchmark can time them without a copy of
        this loop."""
        if self.graphed is not None:
            return self.graphed(obs, noise, mark)
        return self.sample_eager(obs, noise, self.plan_tokens(obs), mark)

    def sample_eager(self, obs: Observation, noise: torch.Tensor, plan: TokenPlan, mark=_no_mark) -> torch.Tensor:
        cache = self.run_prefix(obs, plan, mark)
        mark("prefix")
        out = self.denoise(obs, noise, cache)
        mark("denoise")
        return out

    def denoise(self, obs: Observation, noise: torch.Tensor, cache: PrefixCache) -> torch.Tensor:
        """The flow-matching loop over the (never mutated) prefix cache."""
        num_valid = self.prefix_valid(obs).sum(1)  # [B]
        H = noise.shape[1]
        positions = num_valid[:, None] + torch.arange(H, device=noise.device)[None, :]  # [B, H]
        fp32 = wide(self.dtype)  # float64 in parity's oracle run
        rope = rope_tables(positions, self.cfg.expert.head_dim, self.rope_theta, fp32)
        dt = torch.full((), -1.0 / self.cfg.num_steps, dtype=fp32, device=noise.device)
        t = torch.ones(noise.shape[0], dtype=fp32, device=noise.device)
        times = [t]
        for _ in range(self.cfg.num_steps - 1):  # t accumulates in fp32, as openpi does
            times.append(times[-1] + dt)
        conds, mods = self.precondition(torch.stack(times)) if self.variant.batched_conditioning else (None, None)
        x_t = noise.to(fp32)
        for step, t in enumerate(times):
            v = self.velocity(cache, rope, x_t, t, None if conds is None else conds[step],
                              None if mods is None else [m[step] for m in mods])
            x_t = self.euler_step(x_t, v, t, dt)
        return self.actions(x_t)

    def precondition(self, times: torch.Tensor):
        """Time condition and every adaRMSNorm modulation for all steps in one matmul each
        (they depend on t only, and t's schedule is fixed): [S, B] -> [S, B, De] and, per
        norm, [S, B, 3*De]."""
        S, B = times.shape
        conds = self.time_condition(times.reshape(-1))  # [S*B, De]
        norms = self.expert.modulated_norms()
        weight = torch.cat([n.dense.weight for n in norms])  # [N*3*De, De]
        bias = torch.cat([n.dense.bias for n in norms])
        mods = torch.nn.functional.linear(conds, weight, bias).reshape(S, B, -1)
        return conds.reshape(S, B, -1), mods.chunk(len(norms), dim=-1)

    @property
    def parity_static_buffers(self) -> bool:
        """Told to parity's isolation: layer calls made while a CUDA graph is captured see
        static buffers, so it records them in a run of its own."""
        return self.graphed is not None

    def parity_instrumented(self, active: bool) -> str | None:
        """Called by parity's Recorder as taps are installed and removed: a captured CUDA
        graph is dropped so that the next call re-captures it with the tap copies inside.
        Returns how the instrumented run differs (parity records it with the capture)."""
        if self.graphed is None:
            return None
        self.graphed.reset(instrumented=active)
        if active and self.graphed.compiled_layers:
            return ("CUDA graph re-captured with the tap copies inside; layers compiled leaf by leaf "
                    "instead of whole (taps sit on module boundaries)")
        return "CUDA graph re-captured with the tap copies inside" if active else None
