"""A small pi0.5 with the module tree of openpi's PyTorch port / lerobot's PI05Policy
(`model.paligemma_with_expert.paligemma.model.{vision_tower.vision_model, multi_modal_projector,
language_model}`, `...gemma_expert.model`, `model.action_in_proj` ...), written here from
parity's own reference math for the tests of `parity.probes.pi05_tree`.

It is shaped like those trees where the probe depends on it: the vision tower runs once per
camera, norms return (output, gate), attention modules get HF-style `position_embeddings`
(cos, sin over the full head dim) and a 4-D additive mask, the prefix K/V cache is a
per-layer list the expert's attention reads, and the sampler is lerobot's
`sample_actions(images, img_masks, tokens, masks, noise=, num_steps=)`.  Its rounding points
are the reference's (probes/pi05/config.py), so the correct one passes against `pytorch`.

`flat_vision` is the correct one with transformers 5.x's SigLIP layout (no `vision_model`
level).  `BUGS` plant one bug each: `expert_mlp` (expert layer 2's MLP output scaled by 1.05),
`prefix_nomask` (the prefix attention ignores its mask).

    parity diff --ref pytorch --cand tree_pi05:correct        (from tests/probes)
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from parity.probes import pi05_tree
from parity.probes.pi05.config import GemmaConfig, Pi05Config, VisionConfig
from parity.probes.pi05.layers import rope_tables
from parity.taps.backends import BackendOptions

MASK = -2.3819763e38
BUGS = ("expert_mlp", "prefix_nomask")


def additive(allowed: torch.Tensor) -> torch.Tensor:
    """[B, T, S] bool -> [B, 1, T, S] float32: 0 where allowed, MASK elsewhere."""
    return torch.where(allowed[:, None], 0.0, MASK)


def eager_attention(q, k, v, mask, scale):
    """q [B, T, H, D], k/v [B, S, Hkv, D]: logits in the model dtype, scaled, fp32 mask and
    softmax, probabilities back in the model dtype -> [B, T, H*D]."""
    B, T, H, D = q.shape
    k = k.repeat_interleave(H // k.shape[2], dim=2)
    v = v.repeat_interleave(H // v.shape[2], dim=2)
    logits = (torch.einsum("bthd,bshd->bhts", q, k) * scale).float()
    if mask is not None:
        logits = logits + mask
    probs = logits.softmax(dim=-1).to(q.dtype)
    return torch.einsum("bhts,bshd->bthd", probs, v).reshape(B, T, H * D)


def rope(x, cos, sin):
    """Half-split rotation by HF-style cos/sin [B, T, D], in fp32, cast once."""
    xf = x.float()
    half = x.shape[-1] // 2
    rotated = torch.cat((-xf[..., half:], xf[..., :half]), dim=-1)
    return (xf * cos[:, :, None] + rotated * sin[:, :, None]).to(x.dtype)


class FloatLayerNorm(nn.LayerNorm):
    def forward(self, x):
        return F.layer_norm(x.float(), self.normalized_shape, self.weight, self.bias, self.eps).to(x.dtype)


class SiglipAttention(nn.Module):
    def __init__(self, width, heads):
        super().__init__()
        self.heads, self.head_dim = heads, width // heads
        self.q_proj, self.k_proj, self.v_proj, self.out_proj = (nn.Linear(width, width) for _ in range(4))

    def forward(self, hidden_states):
        B, T, _ = hidden_states.shape
        q, k, v = (p(hidden_states).view(B, T, self.heads, self.head_dim) for p in (self.q_proj, self.k_proj,
                                                                                    self.v_proj))
        return self.out_proj(eager_attention(q, k, v, None, self.head_dim ** -0.5))


class SiglipMLP(nn.Module):
    def __init__(self, width, hidden):
        super().__init__()
        self.fc1, self.fc2 = nn.Linear(width, hidden), nn.Linear(hidden, width)

    def forward(self, x):
        return self.fc2(F.gelu(self.fc1(x), approximate="tanh"))


class SiglipLayer(nn.Module):
    def __init__(self, cfg: VisionConfig):
        super().__init__()
        self.layer_norm1 = FloatLayerNorm(cfg.width, eps=1e-6)
        self.self_attn = SiglipAttention(cfg.width, cfg.num_heads)
        self.layer_norm2 = FloatLayerNorm(cfg.width, eps=1e-6)
        self.mlp = SiglipMLP(cfg.width, cfg.mlp_dim)

    def forward(self, x):
        x = x + self.self_attn(self.layer_norm1(x))
        return x + self.mlp(self.layer_norm2(x))


class SiglipEmbeddings(nn.Module):
    def __init__(self, cfg: VisionConfig):
        super().__init__()
        self.patch_embedding = nn.Conv2d(3, cfg.width, cfg.patch_size, stride=cfg.patch_size)
        self.position_embedding = nn.Embedding(cfg.num_tokens, cfg.width)

    def forward(self, pixels, dtype):
        x = self.patch_embedding(pixels.float()).flatten(2).transpose(1, 2)
        return (x + self.position_embedding.weight).to(dtype)


class SiglipVisionModel(nn.Module):
    def __init__(self, cfg: VisionConfig):
        super().__init__()
        self.embeddings = SiglipEmbeddings(cfg)
        self.encoder = nn.Module()
        self.encoder.layers = nn.ModuleList(SiglipLayer(cfg) for _ in range(cfg.depth))
        self.post_layernorm = FloatLayerNorm(cfg.width, eps=1e-6)

    def forward(self, pixels, dtype):
        x = self.embeddings(pixels, dtype)
        for layer in self.encoder.layers:
            x = layer(x)
        return self.post_layernorm(x)


class RMSNorm(nn.Module):
    """Gemma RMSNorm (scale 1 + w) or, with `cond_dim`, adaRMS (scale, shift, gate from
    `dense(cond)`); returns (output, gate) like the trees' norms."""

    def __init__(self, dim, cond_dim=None, eps=1e-6):
        super().__init__()
        self.eps = eps
        if cond_dim is None:
            self.weight = nn.Parameter(torch.zeros(dim))
        else:
            self.dense = nn.Linear(cond_dim, 3 * dim)

    def forward(self, x, cond=None):
        xf = x.float()
        normed = xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + self.eps)
        if cond is None:
            return (normed * (1.0 + self.weight.float())).to(x.dtype), None
        scale, shift, gate = self.dense(cond.float())[:, None, :].chunk(3, dim=-1)
        return (normed * (1.0 + scale) + shift).to(x.dtype), gate.to(x.dtype)


class GemmaMLP(nn.Module):
    def __init__(self, width, hidden, scale=1.0):
        super().__init__()
        self.gate_proj = nn.Linear(width, hidden, bias=False)
        self.up_proj = nn.Linear(width, hidden, bias=False)
        self.down_proj = nn.Linear(hidden, width, bias=False)
        self.scale = scale

    def forward(self, x):
        out = self.down_proj(F.gelu(self.gate_proj(x), approximate="tanh") * self.up_proj(x))
        return out if self.scale == 1.0 else out * self.scale


class GemmaAttention(nn.Module):
    def __init__(self, cfg: GemmaConfig, layer_idx: int, ignore_mask=False):
        super().__init__()
        self.layer_idx, self.heads, self.kv_heads, self.head_dim = layer_idx, cfg.num_heads, cfg.num_kv_heads, \
            cfg.head_dim
        self.q_proj = nn.Linear(cfg.width, cfg.num_heads * cfg.head_dim, bias=False)
        self.k_proj = nn.Linear(cfg.width, cfg.num_kv_heads * cfg.head_dim, bias=False)
        self.v_proj = nn.Linear(cfg.width, cfg.num_kv_heads * cfg.head_dim, bias=False)
        self.o_proj = nn.Linear(cfg.num_heads * cfg.head_dim, cfg.width, bias=False)
        self.ignore_mask = ignore_mask

    def forward(self, hidden_states, attention_mask=None, position_embeddings=None, cache=None, store=False):
        B, T, _ = hidden_states.shape
        q = self.q_proj(hidden_states).view(B, T, self.heads, self.head_dim)
        k = self.k_proj(hidden_states).view(B, T, self.kv_heads, self.head_dim)
        v = self.v_proj(hidden_states).view(B, T, self.kv_heads, self.head_dim)
        q, k = rope(q, *position_embeddings), rope(k, *position_embeddings)
        if store:  # the prefix pass fills the cache
            cache.append((k, v))
            keys, values = k, v
        elif cache is not None:  # a denoise step reads the prefix's, never writes it
            pk, pv = cache[self.layer_idx]
            keys, values = torch.cat([pk, k], dim=1), torch.cat([pv, v], dim=1)
        else:
            keys, values = k, v
        mask = None if self.ignore_mask else attention_mask
        return self.o_proj(eager_attention(q, keys, values, mask, self.head_dim ** -0.5)), None


class DecoderLayer(nn.Module):
    def __init__(self, cfg: GemmaConfig, layer_idx, cond_dim=None, mlp_scale=1.0, ignore_mask=False):
        super().__init__()
        self.input_layernorm = RMSNorm(cfg.width, cond_dim)
        self.self_attn = GemmaAttention(cfg, layer_idx, ignore_mask)
        self.post_attention_layernorm = RMSNorm(cfg.width, cond_dim)
        self.mlp = GemmaMLP(cfg.width, cfg.mlp_dim, mlp_scale)

    def forward(self, hidden_states, attention_mask=None, position_embeddings=None, cache=None, store=False,
                adarms_cond=None):
        residual = hidden_states
        h, gate = self.input_layernorm(hidden_states, cond=adarms_cond)
        h, _ = self.self_attn(h, attention_mask=attention_mask, position_embeddings=position_embeddings, cache=cache,
                              store=store)
        x = residual + (h if gate is None else h * gate)
        h, gate = self.post_attention_layernorm(x, cond=adarms_cond)
        h = self.mlp(h)
        return x + (h if gate is None else h * gate)


class GemmaModel(nn.Module):
    def __init__(self, cfg: GemmaConfig, vocab=None, cond_dim=None, theta=10000.0, bug=None):
        super().__init__()
        if vocab is not None:
            self.embed_tokens = nn.Embedding(vocab, cfg.width)
        self.layers = nn.ModuleList(
            DecoderLayer(cfg, i, cond_dim, mlp_scale=1.05 if (bug == "expert_mlp" and i == 2) else 1.0,
                         ignore_mask=bug == "prefix_nomask")
            for i in range(cfg.depth))
        self.norm = RMSNorm(cfg.width, cond_dim)
        self.head_dim, self.theta = cfg.head_dim, theta

    def forward(self, inputs_embeds, attention_mask, position_ids, cache, store=False, adarms_cond=None):
        c, s = rope_tables(position_ids, self.head_dim, self.theta)  # [B, T, 1, D/2] fp32
        tables = (torch.cat([c, c], -1)[:, :, 0], torch.cat([s, s], -1)[:, :, 0])  # HF style [B, T, D]
        x = inputs_embeds
        for layer in self.layers:
            x = layer(x, attention_mask=attention_mask, position_embeddings=tables, cache=cache, store=store,
                      adarms_cond=adarms_cond)
        return self.norm(x, adarms_cond)[0]


class Projector(nn.Module):
    def __init__(self, width, out):
        super().__init__()
        self.linear = nn.Linear(width, out)

    def forward(self, x):
        return self.linear(x)


class PaliGemmaWithExpert(nn.Module):
    def __init__(self, cfg: Pi05Config, bug, flat_vision=False):
        super().__init__()
        self.paligemma = nn.Module()
        self.paligemma.model = nn.Module()
        if flat_vision:  # transformers 5.x: no vision_model level
            self.paligemma.model.vision_tower = SiglipVisionModel(cfg.vision)
        else:  # transformers 4.x (openpi)
            self.paligemma.model.vision_tower = nn.Module()
            self.paligemma.model.vision_tower.vision_model = SiglipVisionModel(cfg.vision)
        self.paligemma.model.multi_modal_projector = Projector(cfg.vision.width, cfg.llm.width)
        self.paligemma.model.language_model = GemmaModel(cfg.llm, cfg.vocab_size,
                                                         bug=bug if bug == "prefix_nomask" else None)
        self.gemma_expert = nn.Module()
        self.gemma_expert.model = GemmaModel(cfg.expert, cond_dim=cfg.expert.width,
                                             bug=bug if bug == "expert_mlp" else None)
        self.gemma_expert.lm_head = nn.Linear(cfg.expert.width, cfg.vocab_size, bias=False)  # unused, as in the trees


def time_embedding(t, dim, min_period=4e-3, max_period=4.0):
    fraction = torch.linspace(0.0, 1.0, dim // 2, dtype=torch.float64)
    period = min_period * (max_period / min_period) ** fraction
    angle = (2 * math.pi / period)[None, :] * t.double()[:, None]
    return torch.cat([angle.sin(), angle.cos()], dim=-1).float()


class TreePi05(nn.Module):
    """lerobot's `PI05Pytorch` shape: paligemma_with_expert + the action/time projections."""

    def __init__(self, cfg: Pi05Config, bug=None, flat_vision=False):
        super().__init__()
        self.cfg = cfg
        self.paligemma_with_expert = PaliGemmaWithExpert(cfg, bug, flat_vision)
        W = cfg.expert.width
        self.action_in_proj = nn.Linear(cfg.action_dim, W)
        self.action_out_proj = nn.Linear(W, cfg.action_dim)
        self.time_mlp_in, self.time_mlp_out = nn.Linear(W, W), nn.Linear(W, W)

    def half(self, dtype):
        """Projections of the three stacks in `dtype`; vision embeddings, norms and the
        top-level projections stay float32 (the reference's precision policy)."""
        pwe = self.paligemma_with_expert
        for name, m in pwe.named_modules():
            if isinstance(m, nn.Linear) and not name.endswith(".dense"):
                m.to(dtype)
        pwe.paligemma.model.language_model.embed_tokens.to(dtype)
        self.dtype = dtype
        return self

    @torch.no_grad()
    def sample_actions(self, images, img_masks, tokens, masks, noise, num_steps):
        pwe, cfg = self.paligemma_with_expert, self.cfg
        tower = pwe.paligemma.model.vision_tower
        vision = getattr(tower, "vision_model", tower)
        embs = [pwe.paligemma.model.multi_modal_projector(vision(img, self.dtype)) for img in images]
        n = embs[0].shape[1]
        text = pwe.paligemma.model.language_model.embed_tokens(tokens) * math.sqrt(cfg.llm.width)
        prefix = torch.cat(embs + [text.to(self.dtype)], dim=1)
        valid = torch.cat([m[:, None].expand(-1, n) for m in img_masks] + [masks], dim=1)  # [B, P]
        positions = (valid.cumsum(1) - 1).clamp(min=0)
        cache: list = []
        pwe.paligemma.model.language_model(prefix, additive(valid[:, :, None] & valid[:, None, :]), positions, cache,
                                           store=True)
        B, H = noise.shape[:2]
        suffix_positions = valid.sum(1)[:, None] + torch.arange(H)[None, :]
        allowed = torch.cat([valid[:, None, :].expand(-1, H, -1), torch.ones(B, H, H, dtype=torch.bool)], dim=2)
        mask = additive(allowed)
        dt = torch.tensor(-1.0 / num_steps)
        t = torch.tensor(1.0)
        x_t = noise
        for _ in range(num_steps):
            cond = F.silu(self.time_mlp_out(F.silu(self.time_mlp_in(time_embedding(t.expand(B), cfg.expert.width)))))
            x = self.action_in_proj(x_t).to(self.dtype)
            out = pwe.gemma_expert.model(x, mask, suffix_positions, cache, adarms_cond=cond)
            v = self.action_out_proj(out.float())
            x_t = x_t + dt * v
            t = t + dt
        return x_t


class TreePolicy(nn.Module):
    """lerobot's `PI05Policy` shape: the model under `model.`."""

    def __init__(self, cfg: Pi05Config, bug=None, dtype=torch.bfloat16, flat_vision=False):
        super().__init__()
        self.model = TreePi05(cfg, bug, flat_vision).half(dtype)


DTYPES = {"bfloat16": torch.bfloat16, "float32": torch.float32}


def build(options: BackendOptions, bug=None, flat_vision=False):
    cfg = pi05_tree.config_for(options)
    policy = TreePolicy(cfg, bug, DTYPES[options.dtype or "bfloat16"], flat_vision)
    return pi05_tree.backend(policy, options, name=f"tree_pi05:{bug or 'correct'}")


def correct(options: BackendOptions):
    return build(options)


def flat_vision(options: BackendOptions):
    """The correct tree with transformers 5.x's SigLIP (no `vision_model` level)."""
    return build(options, flat_vision=True)


def expert_mlp(options: BackendOptions):
    return build(options, "expert_mlp")


def prefix_nomask(options: BackendOptions):
    return build(options, "prefix_nomask")
