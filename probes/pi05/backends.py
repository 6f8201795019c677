"""The bundled pi0.5 backends: `pytorch` (the reference), `flash`, `flash_fp8`.

They share one model class and differ only by `Variant`; any of them accepts faults and
`--weights` (a checkpoint every backend of a comparison loads the same way).
"""
from __future__ import annotations

import platform

import torch

from parity.probes.pi05.checkpoint import Checkpoint
from parity.probes.pi05.config import get_config
from parity.probes.pi05.faults import CATALOGUE, Faults
from parity.probes.pi05.inputs import fingerprint, make_noise, make_observation
from parity.probes.pi05.model import Pi05Policy, Variant
from parity.probes.pi05.params import effective_parameters
from parity.probes.pi05.probe import PROBE, layouts
from parity.taps.backends import Backend, BackendOptions, Lossy

VARIANTS = {
    "pytorch": (Variant(), "reference: eager attention with the explicit padding/camera mask, dense GeGLU"),
    "flash": (Variant(packed=True), "packs away padding and masked cameras; mask-free fused SDPA attention"),
    "flash_fp8": (Variant(packed=True, fp8_mlp=True),
                  "flash + Gemma MLP gate/up projections in FP8 e4m3 (torch._scaled_mm on sm89+, emulated elsewhere)"),
    "fast": (Variant(packed=True, fp8_mlp=True, cuda_graph=True, compiled=True, batched_conditioning=True,
                     fused_qkv=True),
             "flash_fp8 + fused q|k|v, all denoise steps' adaRMS modulations in one matmul, torch.compile'd "
             "layers, replayed as CUDA graphs per token layout (graphs and compile on CUDA only)"),
}
# FP8 e4m3 keeps 3 mantissa bits: the Gemma MLPs lose about 1 % of their output and
# everything after them inherits it.  Measured allowance (docs/commands.md, "Thresholds"):
# cos 0.99 at the MLPs, 0.995 elsewhere, at the tiny and the full size.
FP8_LOSSY = Lossy(parts=("prefix.*.mlp", "expert.*.mlp"), bounds={"*": 0.995, "*.mlp": 0.99},
                  why="FP8 e4m3 Gemma MLP gate/up projections")
DTYPES = {"bfloat16": torch.bfloat16, "float32": torch.float32, "float16": torch.float16}


def _device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name.startswith("cuda") and not torch.cuda.is_available():
        raise ValueError("device cuda requested but no CUDA device is available")
    return torch.device(name)


def build(variant_name: str, opts: BackendOptions, variant: Variant | None = None) -> Backend:
    """Build a bundled backend; `variant` overrides the name's (benchmarks of ablations)."""
    variant = variant or VARIANTS[variant_name][0]
    if opts.takes_inputs:
        raise ValueError("pi0.5 backends build their observation from --seed and --batch; "
                         "--input/--padding/--seq-len apply to hf backends")
    faults = Faults.parse(opts.faults)
    device = _device(opts.device)
    dtype_name = opts.dtype or "bfloat16"
    if dtype_name not in DTYPES:
        raise ValueError(f"unknown dtype {dtype_name!r}; known: {', '.join(DTYPES)}")
    weights = None
    if opts.weights is None:
        cfg = get_config(opts.config or "tiny")
    else:
        weights = Checkpoint.open(opts.weights)
        cfg = weights.config_for(opts.config)
        weights.check(cfg)
    model = Pi05Policy.build(cfg, opts.seed, variant, faults, DTYPES[dtype_name], device, weights)
    obs = make_observation(cfg, opts.seed, opts.batch, opts.frame)
    noise = make_noise(cfg, opts.seed, opts.batch)
    fed = _frame_fed(cfg, opts, faults, obs)  # what a stale-state fault really feeds the model
    meta = {
        "backend": variant_name,
        "arch": PROBE.arch,
        "faults": sorted(faults.names),
        "config": cfg.name,
        "seed": opts.seed,
        "batch": opts.batch,
        "frame": opts.frame,
        "dtype": dtype_name,
        "device": torch.cuda.get_device_name(device) if device.type == "cuda" else f"cpu ({platform.machine()})",
        "torch": torch.__version__,
        "input_fingerprint": fingerprint(obs, noise),
        "execution": ("cuda graph; re-captured with tap copies inside when instrumented"
                      if model.graphed is not None else "eager")
        + ("; whole layers torch.compile'd, leaves only (norms, MLPs, RoPE) while taps are installed"
           if variant.compiled and device.type == "cuda" else ""),
        "weights": None if weights is None else weights.describe(),
    }
    obs, noise = fed.to(device), noise.to(device)
    if model.graphed is not None:  # compile and capture now, outside any parity capture
        model.graphed.warm_up(obs, noise)
        model.sample_actions(obs, noise)
    return Backend(
        name=variant_name,
        model=model,
        probe=PROBE,
        run=lambda: model.sample_actions(obs, noise),
        layouts=lambda: layouts(model, obs),
        meta=meta,
        inputs=(obs, noise),
        parameters=lambda: effective_parameters(model),
        lossy=FP8_LOSSY if variant.fp8_mlp else None,
    )


def _frame_fed(cfg, opts: BackendOptions, faults: Faults, obs):
    """The observation the model computes with at this frame: the requested one, unless a
    fault keeps state from an earlier frame (the fingerprint stays the requested one's)."""
    if faults.has("kv_reuse") and opts.frame % 2:  # the whole prefix comes from the previous frame
        return make_observation(cfg, opts.seed, opts.batch, opts.frame - 1)
    if faults.has("stale_vision") and opts.frame:  # images of frame 0, the rest of this frame
        first = make_observation(cfg, opts.seed, opts.batch, 0)
        return type(obs)(first.images, obs.image_masks, obs.tokens, obs.token_mask, obs.state)
    return obs


def _factory(variant_name: str):
    def factory(opts: BackendOptions) -> Backend:
        return build(variant_name, opts)

    factory.__doc__ = VARIANTS[variant_name][1]
    factory.faults = CATALOGUE
    factory.probe = PROBE  # what `parity backends` lists of its components
    return factory


pytorch = _factory("pytorch")
flash = _factory("flash")
flash_fp8 = _factory("flash_fp8")
fast = _factory("fast")
