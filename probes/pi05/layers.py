"""pi0.5 building blocks, shared by the reference and every candidate.

A candidate differs from the reference only through the attention core it is given
(`MaskedCore` vs `PackedCore`), the MLP class (`GatedMLP` vs `Fp8GatedMLP`) and the
faults it was built with; everything else is this one code path.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from parity.probes.pi05.faults import Faults
from parity.probes.pi05.fp8 import Fp8Weight, fp8_linear

MASK_VALUE = -2.3819763e38  # openpi's additive mask value


class TapPoint(nn.Identity):
    """A named place in the forward pass where a probe can read a tensor that no module
    returns on its own (q/k/v after RoPE, the attention core output)."""


@dataclass(frozen=True)
class AttnContext:
    """Which query rows and key columns are real tokens (None = all of them).

    Query i may attend key j iff both are valid: pi0.5's prefix is bidirectional and the
    suffix sees every valid prefix token and the whole action block."""

    q_valid: torch.Tensor | None = None  # [B, T] bool
    k_valid: torch.Tensor | None = None  # [B, S] bool
    dense: bool = False  # known on the host: every query and key is valid, no mask needed


class MaskedCore:
    """Reference attention: explicit logits, fp32 additive mask and softmax."""

    def __init__(self, faults: Faults):
        self.ignore_mask = faults.has("nomask")

    def __call__(self, q, k, v, ctx: AttnContext, scale: float) -> torch.Tensor:
        # q [B, T, Hq, D]; k, v [B, S, Hkv, D] -> [B, T, Hq*D]
        B, T, Hq, D = q.shape
        group = Hq // k.shape[2]
        k = k.repeat_interleave(group, dim=2)
        v = v.repeat_interleave(group, dim=2)
        # logits in the model dtype, scaled after the product as HF/openpi PyTorch do (for
        # SigLIP's head_dim 72 the scale is not a power of two, so the order rounds differently)
        logits = (torch.einsum("bthd,bshd->bhts", q, k) * scale).float()  # [B, H, T, S]
        if not (self.ignore_mask or ctx.dense) and (ctx.q_valid is not None or ctx.k_valid is not None):
            qv = ctx.q_valid if ctx.q_valid is not None else torch.ones(B, T, dtype=torch.bool, device=q.device)
            kv = (ctx.k_valid if ctx.k_valid is not None
                  else torch.ones(B, k.shape[1], dtype=torch.bool, device=q.device))
            allowed = qv[:, None, :, None] & kv[:, None, None, :]  # [B, 1, T, S]
            logits = logits.masked_fill(~allowed, MASK_VALUE)
        probs = logits.softmax(dim=-1).to(q.dtype)
        out = torch.einsum("bhts,bshd->bthd", probs, v)
        return out.reshape(B, T, Hq * D)


class PackedCore:
    """Fused, mask-free attention (PyTorch SDPA: flash / cuDNN / efficient kernels on GPU)
    over only the valid tokens of each sample, so no mask is ever needed."""

    def __init__(self, faults: Faults):
        self.ignore_mask = faults.has("nomask")

    def __call__(self, q, k, v, ctx: AttnContext, scale: float) -> torch.Tensor:
        B, T, Hq, D = q.shape
        gqa = Hq != k.shape[2]
        if self.ignore_mask or ctx.dense or (ctx.q_valid is None and ctx.k_valid is None):
            out = F.scaled_dot_product_attention(
                q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), scale=scale, enable_gqa=gqa
            )  # [B, Hq, T, D]
            return out.transpose(1, 2).reshape(B, T, Hq * D)
        out = q.new_zeros(B, T, Hq * D)
        for b in range(B):
            qi = ctx.q_valid[b] if ctx.q_valid is not None else slice(None)
            ki = ctx.k_valid[b] if ctx.k_valid is not None else slice(None)
            ob = F.scaled_dot_product_attention(
                q[b, qi].transpose(0, 1)[None], k[b, ki].transpose(0, 1)[None],
                v[b, ki].transpose(0, 1)[None], scale=scale, enable_gqa=gqa,
            )  # [1, Hq, Tb, D]
            out[b, qi] = ob[0].transpose(0, 1).reshape(-1, Hq * D)
        return out


def wide(dtype: torch.dtype) -> torch.dtype:
    """The dtype of the parts computed "in fp32": float32, or float64 when the model runs in
    float64 (parity's oracle run), so that no part of it rounds to float32."""
    return torch.promote_types(dtype, torch.float32)


def rope_tables(positions: torch.Tensor, head_dim: int, theta: float,
                dtype: torch.dtype = torch.float32) -> tuple[torch.Tensor, torch.Tensor]:
    """cos/sin of theta_i = theta^(-2i/D) times position, in fp32 (`dtype`): [B, T, 1, D/2] each.

    Computed once per inference per stack (positions do not change across layers or
    denoise steps), not once per attention call."""
    half = head_dim // 2
    inv_freq = theta ** (-torch.arange(half, dtype=dtype, device=positions.device) * 2.0 / head_dim)
    angles = positions.to(dtype)[..., None] * inv_freq  # [B, T, half]
    return angles.cos()[:, :, None, :], angles.sin()[:, :, None, :]


def apply_rope(x: torch.Tensor, tables: tuple[torch.Tensor, torch.Tensor], interleaved: bool) -> torch.Tensor:
    """Rotary embedding in fp32, cast once. x [B, T, H, D]; tables from `rope_tables`.

    Half-split (rotate_half) pairing: channel i rotates with channel i + D/2."""
    cos, sin = tables
    xf = x.to(torch.promote_types(x.dtype, cos.dtype))
    if interleaved:
        x1, x2 = xf[..., 0::2], xf[..., 1::2]
        out = torch.stack((x1 * cos - x2 * sin, x2 * cos + x1 * sin), dim=-1).flatten(-2)
    else:
        half = x.shape[-1] // 2
        x1, x2 = xf[..., :half], xf[..., half:]
        out = torch.cat((x1 * cos - x2 * sin, x2 * cos + x1 * sin), dim=-1)
    return out.to(x.dtype)


class RMSNorm(nn.Module):
    """Gemma RMSNorm: fp32 statistics, scale (1 + w), cast back to the input dtype."""

    keep_fp32 = True

    def __init__(self, dim: int, eps: float, faults: Faults):
        super().__init__()
        self.weight = nn.Parameter(torch.zeros(dim))
        self.eps = eps
        self.plain_w = faults.has("norm_plain_w")

    def normalize(self, x: torch.Tensor) -> torch.Tensor:
        xf = x.to(wide(x.dtype))
        return xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + self.eps)

    def forward(self, x: torch.Tensor, cond: torch.Tensor | None = None, modulation: torch.Tensor | None = None):
        scale = self.weight if self.plain_w else 1.0 + self.weight
        return (self.normalize(x) * scale).to(x.dtype), None


class AdaRMSNorm(RMSNorm):
    """pi0.5 action-expert norm: scale, shift and residual gate from the time condition."""

    def __init__(self, dim: int, cond_dim: int, eps: float, faults: Faults):
        super().__init__(dim, eps, faults)
        del self.weight
        self.dense = nn.Linear(cond_dim, 3 * dim)
        self.dense.keep_fp32 = True

    def forward(self, x: torch.Tensor, cond: torch.Tensor | None = None, modulation: torch.Tensor | None = None):
        """`modulation` = dense(cond) [B, 3*dim] when a caller computed it ahead (the `fast`
        candidate does all norms of all denoise steps in one matmul)."""
        if modulation is None:
            modulation = self.dense(cond.to(self.dense.weight.dtype))
        scale, shift, gate = modulation[:, None, :].chunk(3, dim=-1)  # each [B, 1, dim]
        return (self.normalize(x) * (1.0 + scale) + shift).to(x.dtype), gate.to(x.dtype)


class LayerNorm(nn.LayerNorm):
    """SigLIP LayerNorm computed in fp32, cast back."""

    keep_fp32 = True

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.layer_norm(x.to(wide(x.dtype)), self.normalized_shape, self.weight, self.bias, self.eps).to(x.dtype)


class GatedMLP(nn.Module):
    """Gemma GeGLU: down(gelu_tanh(x W_gate) * (x W_up))."""

    def __init__(self, width: int, hidden: int, faults: Faults):
        super().__init__()
        self.gate_proj = nn.Linear(width, hidden, bias=False)
        self.up_proj = nn.Linear(width, hidden, bias=False)
        self.down_proj = nn.Linear(hidden, width, bias=False)
        self.silu = faults.has("silu")
        self.fp16_hidden = faults.has("dtype")

    def gate_up(self, x: torch.Tensor, out_dtype: torch.dtype):
        return self.gate_proj(x).to(out_dtype), self.up_proj(x).to(out_dtype)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        gate, up = self.gate_up(x, torch.float16 if self.fp16_hidden else x.dtype)
        act = F.silu(gate) if self.silu else F.gelu(gate, approximate="tanh")
        return self.down_proj(act * up)


class Fp8GatedMLP(GatedMLP):
    """GeGLU whose gate and up projections run in FP8 e4m3 (per-tensor weight scale,
    dynamic per-tensor activation scale), quantised once at load; the down projection
    stays in the model dtype, as in the seed's backend."""

    def __init__(self, dense: GatedMLP):
        nn.Module.__init__(self)
        self.silu, self.fp16_hidden = dense.silu, dense.fp16_hidden
        # gate and up share one e4m3 weight [2F, D] and one scale: x is quantised once
        # and multiplied once
        self.gate_up_w = Fp8Weight.quantize(torch.cat([dense.gate_proj.weight, dense.up_proj.weight]))
        self.down_proj = dense.down_proj

    def gate_up(self, x: torch.Tensor, out_dtype: torch.dtype):
        return fp8_linear(x, self.gate_up_w, out_dtype).chunk(2, dim=-1)


class SiglipMLP(nn.Module):
    def __init__(self, width: int, hidden: int):
        super().__init__()
        self.fc1 = nn.Linear(width, hidden)
        self.fc2 = nn.Linear(hidden, width)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(F.gelu(self.fc1(x), approximate="tanh"))


class Attention(nn.Module):
    """Projections, optional RoPE, taps on q/k/v as the core uses them, core, o-proj."""

    def __init__(self, width, num_heads, num_kv_heads, head_dim, core, *, bias: bool, faults: Faults):
        super().__init__()
        self.num_heads, self.num_kv_heads, self.head_dim = num_heads, num_kv_heads, head_dim
        self.q_proj = nn.Linear(width, num_heads * head_dim, bias=bias)
        self.k_proj = nn.Linear(width, num_kv_heads * head_dim, bias=bias)
        self.v_proj = nn.Linear(width, num_kv_heads * head_dim, bias=bias)
        self.o_proj = nn.Linear(num_heads * head_dim, width, bias=bias)
        self.q, self.k, self.v, self.attn = TapPoint(), TapPoint(), TapPoint(), TapPoint()
        self.core = core
        self.rope_interleaved = faults.has("rope_interleaved")
        self.rope_fn = apply_rope
        self.scale = 1.0 / head_dim if faults.has("attn_scale") else head_dim ** -0.5

    def fuse_qkv(self) -> None:
        """One projection for q, k and v (one matmul instead of three): the `fast` candidate."""
        parts = (self.q_proj, self.k_proj, self.v_proj)
        fused = nn.Linear(parts[0].in_features, sum(p.out_features for p in parts), bias=parts[0].bias is not None,
                          device=parts[0].weight.device, dtype=parts[0].weight.dtype)
        with torch.no_grad():
            fused.weight.copy_(torch.cat([p.weight for p in parts]))
            if fused.bias is not None:
                fused.bias.copy_(torch.cat([p.bias for p in parts]))
        fused.requires_grad_(False)
        del self.q_proj, self.k_proj, self.v_proj
        self.qkv_proj = fused

    def project(self, h: torch.Tensor):
        B, T, _ = h.shape
        nq, nkv = self.num_heads * self.head_dim, self.num_kv_heads * self.head_dim
        if hasattr(self, "qkv_proj"):
            q, k, v = self.qkv_proj(h).split([nq, nkv, nkv], dim=-1)
        else:
            q, k, v = self.q_proj(h), self.k_proj(h), self.v_proj(h)
        return (q.reshape(B, T, self.num_heads, self.head_dim), k.reshape(B, T, self.num_kv_heads, self.head_dim),
                v.reshape(B, T, self.num_kv_heads, self.head_dim))

    def forward(self, h, ctx: AttnContext, rope=None, prefix_kv=None):
        q, k, v = self.project(h)
        if rope is not None:
            q = self.rope_fn(q, rope, self.rope_interleaved)
            k = self.rope_fn(k, rope, self.rope_interleaved)
        q, k, v = self.q(q), self.k(k), self.v(v)
        keys, values = k, v
        if prefix_kv is not None:  # suffix queries attend to [cached prefix, own suffix]
            keys, values = torch.cat([prefix_kv[0], k], dim=1), torch.cat([prefix_kv[1], v], dim=1)
        out = self.attn(self.core(q, keys, values, ctx, self.scale))
        return self.o_proj(out), k, v


def init_weights(module: nn.Module, seed: int) -> None:
    """Deterministic weights from the seed, drawn in float32 parameter by parameter in name
    order, on the parameters' own device (a full-size model is drawn in seconds on a GPU;
    the same seed gives the same weights on every machine of that device type)."""
    device = next(module.parameters()).device
    gen = torch.Generator(device=device).manual_seed(seed)
    for name, p in sorted(module.named_parameters(), key=lambda kv: kv[0]):
        if name.endswith("bias"):
            std = 0.02
        elif p.ndim == 1:  # norm scales: offsets from 1 (Gemma) or around 1 (LayerNorm)
            std = 0.1
        else:  # fan-in scaling: unit-variance activations through every projection
            std = 1.0 / math.sqrt(p[0].numel())
        values = torch.randn(p.shape, generator=gen, device=device, dtype=torch.float32) * std
        if name.endswith("weight") and p.ndim == 1 and isinstance(_owner(module, name), nn.LayerNorm):
            values += 1.0
        with torch.no_grad():
            p.copy_(values)


def _owner(module: nn.Module, param_name: str) -> nn.Module:
    return module.get_submodule(param_name.rsplit(".", 1)[0]) if "." in param_name else module
