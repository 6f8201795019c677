"""The pi0.5 policy (openpi's pi05): SigLIP + projector + Gemma prefix LLM, a Gemma action
expert with adaRMSNorm time conditioning, flow-matching sampling over a prefix K/V cache.

One class serves the reference and every candidate: `Variant` says which attention core
and MLP a backend uses and whether it packs away invalid prefix tokens.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import TYPE_CHECKING

import numpy as np
import torch
from torch import nn

from .config import GemmaConfig, Pi05Config, VisionConfig
from .faults import Faults
from .layers import (AdaRMSNorm, Attention, AttnContext, Fp8GatedMLP, GatedMLP, LayerNorm, MaskedCore,
                     PackedCore, RMSNorm, SiglipMLP, TapPoint, init_weights)

if TYPE_CHECKING:
    from .checkpoint import Checkpoint


@dataclass(frozen=True)
class Variant:
    packed: bool = False  # flash: compact valid prefix tokens, mask-free fused attention
    fp8_mlp: bool = False  # flash_fp8: Gemma MLP gate/up projections in FP8 e4m3


@dataclass(frozen=True)
class Observation:
    images: torch.Tensor  # [B, C, 3, S, S] in [-1, 1]
    image_masks: torch.Tensor  # [B, C] bool
    tokens: torch.Tensor  # [B, L] int64
    token_mask: torch.Tensor  # [B, L] bool
    state: torch.Tensor  # [B, action_dim] (not in the prompt: discrete_state_input=False)

    def to(self, device) -> "Observation":
        return Observation(*(getattr(self, f).to(device) for f in self.__dataclass_fields__))


class SiglipLayer(nn.Module):
    def __init__(self, cfg: VisionConfig, core, faults: Faults):
        super().__init__()
        self.input_norm = LayerNorm(cfg.width, eps=1e-6)
        self.self_attn = Attention(cfg.width, cfg.num_heads, cfg.num_heads, cfg.head_dim, core, bias=True,
                                   rope_theta=None, faults=faults)
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
        x = self.patch_embedding(images.float()).flatten(2).transpose(1, 2)
        x = self.embed((x + self.position_embedding).to(dtype))
        for layer in self.layers:
            x = layer(x)
        return self.post_norm(x)


class GemmaLayer(nn.Module):
    def __init__(self, cfg: GemmaConfig, cond_dim: int | None, core, eps: float, theta: float, faults: Faults,
                 variant: Variant):
        super().__init__()

        def norm():
            return RMSNorm(cfg.width, eps, faults) if cond_dim is None else AdaRMSNorm(cfg.width, cond_dim, eps, faults)

        self.input_norm = norm()
        self.self_attn = Attention(cfg.width, cfg.num_heads, cfg.num_kv_heads, cfg.head_dim, core, bias=False,
                                   rope_theta=theta, faults=faults)
        self.post_attn_norm = norm()
        self.mlp = GatedMLP(cfg.width, cfg.mlp_dim, faults)

    def forward(self, x, ctx, positions, cond=None, kv_prefix=None):
        h, gate = self.input_norm(x, cond)
        y, k, v = self.self_attn(h, ctx, positions, kv_prefix)
        x = x + (y if gate is None else y * gate)
        h, gate = self.post_attn_norm(x, cond)
        y = self.mlp(h)
        return x + (y if gate is None else y * gate), k, v


class GemmaStack(nn.Module):
    def __init__(self, cfg: GemmaConfig, cond_dim, core, eps, theta, faults, variant):
        super().__init__()
        self.embed = TapPoint()
        self.layers = nn.ModuleList(GemmaLayer(cfg, cond_dim, core, eps, theta, faults, variant)
                                    for _ in range(cfg.depth))
        self.final_norm = (RMSNorm(cfg.width, eps, faults) if cond_dim is None
                           else AdaRMSNorm(cfg.width, cond_dim, eps, faults))


class PrefixCache:
    """Per-layer prefix K/V (after RoPE) and which prefix keys are valid.

    Read-only by design: each denoise step concatenates its own K/V to a copy. The
    `kv_mutate` fault stores the concatenation back, as an in-place cache update would."""

    def __init__(self, keys, values, key_valid: torch.Tensor, mutate: bool):
        self.keys, self.values = list(keys), list(values)
        self.key_valid = [key_valid] * len(self.keys)
        self.mutate = mutate

    def joiner(self, layer: int):
        def join(k, v, ctx: AttnContext):
            keys = torch.cat([self.keys[layer], k], dim=1)
            values = torch.cat([self.values[layer], v], dim=1)
            suffix_valid = torch.ones(k.shape[:2], dtype=torch.bool, device=k.device)
            key_valid = torch.cat([self.key_valid[layer], suffix_valid], dim=1)
            if self.mutate:
                self.keys[layer], self.values[layer], self.key_valid[layer] = keys, values, key_valid
            return keys, values, AttnContext(q_valid=ctx.q_valid, k_valid=key_valid)

        return join


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
    return torch.cat([angle.sin(), angle.cos()], dim=-1).float()


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
        self.prefix = GemmaStack(cfg.llm, None, core, cfg.norm_eps, cfg.rope_theta, faults, variant)
        self.expert = GemmaStack(cfg.expert, cfg.expert.width, core, cfg.norm_eps, cfg.rope_theta, faults, variant)
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

    # ---- building ---------------------------------------------------------------
    @classmethod
    def build(cls, cfg: Pi05Config, seed: int, variant: Variant, faults: Faults, dtype: torch.dtype,
              device: torch.device, weights: "Checkpoint | None" = None) -> "Pi05Policy":
        """Seeded random weights, or every weight from a checkpoint (checked already):
        the model is then allocated empty and each parameter is filled from the file,
        so no random value can survive.  FP8 MLPs quantise whatever dense weights the
        model holds at this point: the seeded or the loaded ones."""
        if weights is None:
            model = cls(cfg, variant, faults)
            init_weights(model, seed)
            model.to(device)
            _cast_linears(model, dtype)
        else:
            with torch.device("meta"):  # no memory until the final dtypes are known
                model = cls(cfg, variant, faults)
            _cast_linears(model, dtype)
            model.to_empty(device=device)
            weights.load_into(model)  # file values cast to each parameter's dtype
        if variant.fp8_mlp:
            for stack in (model.prefix, model.expert):
                for layer in stack.layers:
                    layer.mlp = Fp8GatedMLP(layer.mlp)
        model.dtype = dtype
        return model.eval()

    # ---- token layout -----------------------------------------------------------
    def prefix_valid(self, obs: Observation) -> torch.Tensor:
        """[B, P] bool: which prefix slots are real tokens (camera masks, prompt mask)."""
        n = self.cfg.vision.num_tokens
        cams = obs.image_masks[:, :, None].expand(-1, -1, n).reshape(obs.image_masks.shape[0], -1)
        return torch.cat([cams, obs.token_mask], dim=1)

    def prefix_slots(self, obs: Observation) -> np.ndarray:
        """Canonical prefix position of every row slot this backend computes, -1 = don't care."""
        valid = self.prefix_valid(obs).cpu().numpy()
        B, P = valid.shape
        canon = np.arange(B * P, dtype=np.int64).reshape(B, P)
        if not self.packs_prefix:
            return np.where(valid, canon, -1)
        lmax = int(valid.sum(1).max())
        slots = np.full((B, lmax), -1, dtype=np.int64)
        for b in range(B):
            idx = canon[b][valid[b]]
            slots[b, : idx.size] = idx
        return slots

    # ---- forward ------------------------------------------------------------------
    def embed_prefix(self, obs: Observation):
        B, C = obs.image_masks.shape
        imgs = self.vision(obs.images.flatten(0, 1), self.dtype)  # [B*C, n, Dv]
        img_tokens = self.projector(imgs).reshape(B, -1, self.cfg.llm.width)  # [B, C*n, D]
        text = self.embed_tokens(obs.tokens) * math.sqrt(self.cfg.llm.width)  # [B, L, D]
        return torch.cat([img_tokens, text.to(self.dtype)], dim=1), self.prefix_valid(obs)

    def pack(self, x: torch.Tensor, valid: torch.Tensor):
        """Gather valid tokens to the front of each row: [B, P, D] -> [B, Lmax, D]."""
        lengths = valid.sum(1)
        order = torch.argsort((~valid).to(torch.int8), dim=1, stable=True)[:, : int(lengths.max())]
        packed_valid = torch.arange(order.shape[1], device=x.device)[None, :] < lengths[:, None]
        return x.gather(1, order[..., None].expand(-1, -1, x.shape[-1])), packed_valid

    def run_prefix(self, obs: Observation) -> PrefixCache:
        x, valid = self.embed_prefix(obs)
        positions = (valid.cumsum(1) - 1).clamp(min=0)
        if self.packs_prefix:
            x, valid = self.pack(x, valid)
            positions = torch.arange(x.shape[1], device=x.device).expand(x.shape[0], -1)
        x = self.prefix.embed(x)
        ctx = AttnContext(q_valid=valid, k_valid=valid)
        keys, values = [], []
        for layer in self.prefix.layers:
            x, k, v = layer(x, ctx, positions)
            keys.append(k)
            values.append(v)
        return PrefixCache(keys, values, valid, mutate=self.faults.has("kv_mutate"))

    def velocity(self, cache: PrefixCache, num_valid: torch.Tensor, x_t: torch.Tensor, t: torch.Tensor):
        cond = torch.nn.functional.silu(self.time_mlp_in(sincos_time_embedding(t, self.cfg.expert.width)))
        cond = self.expert.time(torch.nn.functional.silu(self.time_mlp_out(cond)))  # [B, De] fp32
        x = self.expert.embed(self.action_in_proj(x_t).to(self.dtype))  # [B, H, De]
        H = x.shape[1]
        positions = num_valid[:, None] + torch.arange(H, device=x.device)[None, :]
        ctx = AttnContext()
        for i, layer in enumerate(self.expert.layers):
            x, _, _ = layer(x, ctx, positions, cond, kv_prefix=cache.joiner(i))
        x, _ = self.expert.final_norm(x, cond)
        return self.expert.velocity(self.action_out_proj(x.float()))  # [B, H, action_dim] fp32

    @torch.inference_mode()
    def sample_actions(self, obs: Observation, noise: torch.Tensor) -> torch.Tensor:
        cache = self.run_prefix(obs)
        num_valid = self.prefix_valid(obs).sum(1)
        dt = torch.tensor(-1.0 / self.cfg.num_steps, dtype=torch.float32, device=noise.device)
        t = torch.ones(noise.shape[0], dtype=torch.float32, device=noise.device)
        x_t = noise.float()
        for _ in range(self.cfg.num_steps):
            x_t = x_t + dt * self.velocity(cache, num_valid, x_t, t)
            t = t + dt
        return self.actions(x_t)
