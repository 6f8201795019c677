"""What a pi0.5 backend really computes with, under names shared by every backend.

`parity weights` compares these, not the raw state dicts, because the raw tensors hide
the bugs that matter: an FP8 MLP holds e4m3 codes and a scale (compared here dequantised,
under the dense name `...mlp.gate_proj.weight`), and a Gemma RMSNorm stores an offset `w`
but multiplies by `1 + w` (reported here as the scale it applies, so a norm that forgot
its `+ 1` shows up as an offset of exactly 1).
"""
from __future__ import annotations

import torch
from torch import nn

from parity.probes.pi05.layers import AdaRMSNorm, Attention, Fp8GatedMLP, RMSNorm
from parity.taps.backends import ParamView

FP8_SCHEME = "fp8 e4m3, per-tensor scale"


def _dtype_name(t: torch.Tensor) -> str:
    return str(t.dtype).removeprefix("torch.")


def _plain(p: torch.Tensor) -> ParamView:
    return ParamView(dtype=_dtype_name(p), shape=tuple(p.shape), load=lambda: p.detach())


def _norm_scale(norm: RMSNorm) -> ParamView:
    w = norm.weight
    return ParamView(dtype=_dtype_name(w), shape=tuple(w.shape),
                     load=lambda: (w.detach() if norm.plain_w else 1.0 + w.detach()))


def _fp8_half(weight, half: int) -> ParamView:
    """One half ([gate; up] are quantised together) of a fused e4m3 weight, dequantised."""
    rows = weight.data.shape[0] // 2
    shape = (rows, *weight.data.shape[1:])
    return ParamView(dtype=_dtype_name(weight.data), shape=shape,
                     load=lambda: weight.dequantize()[half * rows:(half + 1) * rows], quantized=FP8_SCHEME)


def _split_qkv(attn: Attention, prefix: str) -> dict[str, ParamView]:
    """A fused q|k|v projection under the three names every other backend uses."""
    nq, nkv = attn.num_heads * attn.head_dim, attn.num_kv_heads * attn.head_dim
    bounds = {"q_proj": (0, nq), "k_proj": (nq, nq + nkv), "v_proj": (nq + nkv, nq + 2 * nkv)}
    out = {}
    for name, (lo, hi) in bounds.items():
        for kind in ("weight", "bias"):
            p = getattr(attn.qkv_proj, kind)
            if p is not None:
                out[f"{prefix}{name}.{kind}"] = ParamView(dtype=_dtype_name(p), shape=(hi - lo, *p.shape[1:]),
                                                          load=lambda p=p, lo=lo, hi=hi: p.detach()[lo:hi])
    return out


def effective_parameters(model: nn.Module) -> dict[str, ParamView]:
    """Canonical name -> the parameter as the forward pass uses it, in module order."""
    out: dict[str, ParamView] = {}
    fused = {id(m.qkv_proj) for m in model.modules() if isinstance(m, Attention) and hasattr(m, "qkv_proj")}
    for module_name, module in model.named_modules():
        if id(module) in fused:  # reported split, under q_proj / k_proj / v_proj
            continue
        prefix = f"{module_name}." if module_name else ""
        if isinstance(module, RMSNorm) and not isinstance(module, AdaRMSNorm):
            out[prefix + "weight"] = _norm_scale(module)
            continue
        if isinstance(module, Attention) and hasattr(module, "qkv_proj"):
            out.update(_split_qkv(module, prefix))
        if isinstance(module, Fp8GatedMLP):
            out[prefix + "gate_proj.weight"] = _fp8_half(module.gate_up_w, 0)
            out[prefix + "up_proj.weight"] = _fp8_half(module.gate_up_w, 1)
        for name, p in module.named_parameters(recurse=False):
            out[prefix + name] = _plain(p)
    return out
