"""FP8 e4m3 matmul: torch._scaled_mm where the GPU has FP8 units, exact emulation elsewhere.

Emulation dequantises the e4m3 operands (exactly representable in fp32) and multiplies in
fp32, so it computes what the fused kernel computes up to accumulation order.
"""
from __future__ import annotations

import torch
from torch import nn

E4M3_MAX = 448.0


class Fp8Weight(nn.Module):
    """An e4m3 weight [N, K] with its per-tensor float32 scale."""

    def __init__(self, data: torch.Tensor, scale: torch.Tensor):
        super().__init__()
        self.register_buffer("data", data)
        self.register_buffer("scale", scale)

    @classmethod
    def quantize(cls, weight: torch.Tensor) -> Fp8Weight:
        w = weight.detach().float()
        scale = (w.abs().amax().clamp(min=1e-12) / E4M3_MAX).reshape(())
        return cls((w / scale).clamp(-E4M3_MAX, E4M3_MAX).to(torch.float8_e4m3fn), scale)

    def dequantize(self) -> torch.Tensor:
        return self.data.float() * self.scale


def quantize_activation(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    scale = (x.detach().abs().amax().float().clamp(min=1e-12) / E4M3_MAX).reshape(())
    return (x.float() / scale).clamp(-E4M3_MAX, E4M3_MAX).to(torch.float8_e4m3fn), scale


def has_fp8_units(device: torch.device) -> bool:
    return device.type == "cuda" and torch.cuda.get_device_capability(device) >= (8, 9)


def fp8_linear(x: torch.Tensor, w: Fp8Weight, out_dtype: torch.dtype) -> torch.Tensor:
    """y = x W^T with both operands in e4m3. x [..., K]; W [N, K] -> [..., N]."""
    lead, K = x.shape[:-1], x.shape[-1]
    x8, x_scale = quantize_activation(x.reshape(-1, K))
    if has_fp8_units(x.device):
        y = torch._scaled_mm(x8, w.data.t(), scale_a=x_scale, scale_b=w.scale, out_dtype=out_dtype)
    else:
        y = ((x8.float() @ w.data.float().t()) * (x_scale * w.scale)).to(out_dtype)
    return y.reshape(*lead, -1)
