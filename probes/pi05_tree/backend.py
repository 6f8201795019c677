"""A user's own pi0.5 (openpi's `PI0Pytorch`, lerobot's `PI05Policy`, or any module with
their tree) as a parity backend, lined up tap by tap with the bundled reference.

    from parity.probes import pi05_tree

    def my_pi05(options):
        cfg = pi05_tree.config_for(options)          # the sizes the bundled backends build
        model = build_my_pi05(cfg).to(device)        # your code
        return pi05_tree.backend(model, options)     # lerobot's sample_actions signature

`backend` fills the model with the reference's weights for the options (seeded, or
`options.weights`), builds the very observation and noise the bundled `pytorch` backend
builds for the same options, and taps the tree under the reference's canonical names.
"""
from __future__ import annotations

import contextlib
import platform
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
import torch
from torch import nn

from parity.probes.pi05.config import Pi05Config
from parity.probes.pi05.inputs import fingerprint, make_noise, make_observation
from parity.probes.pi05.layers import TapPoint
from parity.probes.pi05.model import Observation
from parity.probes.pi05_tree.tree import TREE_CHILD, VIEWS, probe_for
from parity.probes.pi05_tree.views import Views
from parity.probes.pi05_tree.weights import config_for, find_root, load_reference_weights, tree_parameters
from parity.taps.backends import Backend, BackendOptions, ParamView
from parity.taps.records import Layout, Region

__all__ = ["Inputs", "backend", "config_for", "sample_lerobot"]


@dataclass(frozen=True)
class Inputs:
    """What a sampler gets: the module holding `paligemma_with_expert` (`core`), parity's
    observation and noise on the model's device, and the config."""

    core: nn.Module
    obs: Observation
    noise: torch.Tensor  # [B, action_horizon, action_dim] float32
    cfg: Pi05Config

    def camera_lists(self) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
        """Per-camera images [B, 3, S, S] in [-1, 1] and masks [B] bool, as both trees take them."""
        C = self.obs.images.shape[1]
        return [self.obs.images[:, c] for c in range(C)], [self.obs.image_masks[:, c] for c in range(C)]


def sample_lerobot(inputs: Inputs) -> torch.Tensor:
    """lerobot's `PI05Pytorch.sample_actions(images, img_masks, tokens, masks, noise=,
    num_steps=)`, called on the already preprocessed observation: images in [-1, 1] at the
    model's resolution, the prompt's tokens and mask (`predict_action_chunk` and its
    resize/normalise steps are skipped, so both sides see the same pixels)."""
    images, masks = inputs.camera_lists()
    return inputs.core.sample_actions(images, masks, inputs.obs.tokens, inputs.obs.token_mask, noise=inputs.noise,
                                      num_steps=inputs.cfg.num_steps)


class Wrapped(nn.Module):
    """The user's model (`tree`), parity's view TapPoints (`views`) and the `actions` tap."""

    def __init__(self, tree: nn.Module, views: nn.ModuleDict):
        super().__init__()
        setattr(self, TREE_CHILD, tree)
        setattr(self, VIEWS, views)
        self.actions = TapPoint()


def _device_of(model: nn.Module) -> torch.device:
    p = next(model.parameters(), None)
    return torch.device("cpu") if p is None else p.device


def _dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).removeprefix("torch.")


def described_dtype(model: nn.Module, root: str) -> str:
    """The tree's compute dtype as a run declares it: its prefix LLM's projections',
    with the vision tower's added when that differs (lerobot keeps it in float32)."""
    mods = dict(model.named_modules())
    llm = mods[root + "paligemma_with_expert.paligemma.model.language_model.layers.0.self_attn.q_proj"].weight.dtype
    vision = mods.get(root + "paligemma_with_expert.paligemma.model.vision_tower.vision_model.encoder.layers.0."
                      "self_attn.q_proj")
    name = _dtype_name(llm)
    if vision is not None and vision.weight.dtype != llm:
        name += f" (vision tower {_dtype_name(vision.weight.dtype)})"
    return name


def layouts(cfg: Pi05Config, obs: Observation) -> dict[str, Layout]:
    """Vision rows camera-major (one tower call per camera), the prefix padded, the chunk."""
    n, C = cfg.vision.num_tokens, len(cfg.cameras)
    B = obs.image_masks.shape[0]
    masks = obs.image_masks.cpu().numpy()  # [B, C]
    cam, b = np.divmod(np.arange(C * B), B)  # row r = camera * B + sample
    slots = (b * C + cam)[:, None] * n + np.arange(n)[None, :]
    slots[~masks[b, cam]] = -1
    cams = tuple(Region(f"camera:{c}", i * n, (i + 1) * n) for i, c in enumerate(cfg.cameras))
    valid = np.concatenate([np.repeat(masks, n, axis=1), obs.token_mask.cpu().numpy()], axis=1)  # [B, P]
    canon = np.arange(valid.size, dtype=np.int64).reshape(valid.shape)
    H = cfg.action_horizon
    return {
        "vision": Layout(slots.astype(np.int64), C * n, cams),
        "prefix": Layout(np.where(valid, canon, -1), cfg.prefix_len, cams + (Region("text", C * n, cfg.prefix_len),)),
        "actions": Layout(np.arange(B * H, dtype=np.int64).reshape(B, H), H, (Region("actions", 0, H),)),
    }


def _parameters(params: dict[str, nn.Parameter]) -> Callable[[], dict[str, ParamView]]:
    """The tree's weights under the reference's names; a Gemma RMSNorm offset as the scale
    it applies (1 + w), as the reference reports its own."""
    def views():
        out = {}
        for name, p in params.items():
            plain_norm = name.startswith("prefix.") and name.endswith("norm.weight")
            load = (lambda p=p: 1.0 + p.detach()) if plain_norm else (lambda p=p: p.detach())
            out[name] = ParamView(dtype=_dtype_name(p.dtype), shape=tuple(p.shape), load=load)
        return out
    return views


def backend(model: nn.Module, options: BackendOptions, sample: Callable[[Inputs], torch.Tensor] = sample_lerobot,
            name: str = "pi05_tree", load_weights: bool = True, dtype: str | None = None) -> Backend:
    """`model` (any module with the openpi / lerobot pi0.5 tree, on its device, in its own
    precision) as a backend lined up with the bundled `pytorch` one for `options`.

    `sample(inputs)` runs one inference and returns the actions [B, H, action_dim]
    (default: lerobot's `sample_actions` signature; openpi's takes an observation object,
    write yours).  `load_weights`: fill the model with the reference's weights for the
    options (seeded, or `options.weights`); False keeps the model's own (the diff then
    compares different weights unless you loaded the same).  `dtype`: the dtype the run
    declares (default: the tree's, `described_dtype`)."""
    if options.takes_inputs:
        raise ValueError("pi0.5 backends build their observation from --seed and --batch; "
                         "--input/--padding/--seq-len apply to hf backends")
    if options.faults:
        raise ValueError(f"backend {name!r} takes no --inject faults: plant the bug in your model")
    root = find_root(model)
    cfg = config_for(options)
    device = _device_of(model)
    if load_weights:
        weights = load_reference_weights(model, root, cfg, options, device)
        params, _ = tree_parameters(model, root, cfg)
    else:
        params, unused = tree_parameters(model, root, cfg)
        weights = {"own": True, "tree_unused": sorted(unused)}
    model.eval()
    obs = make_observation(cfg, options.seed, options.batch, options.frame)
    noise = make_noise(cfg, options.seed, options.batch)
    head_dims = {"vision": cfg.vision.head_dim, "prefix": cfg.llm.head_dim, "expert": cfg.expert.head_dim}
    views = Views(model, root, head_dims, options.batch * len(cfg.cameras), len(cfg.cameras))
    wrapped = Wrapped(model, views.points)
    meta = {
        "backend": name,
        "arch": "pi05",
        "tree": f"{type(model).__name__} (paligemma_with_expert under {root or 'the root'!r})",
        "config": cfg.name,
        "seed": options.seed,
        "batch": options.batch,
        "frame": options.frame,
        "dtype": dtype or described_dtype(model, root),
        "device": torch.cuda.get_device_name(device) if device.type == "cuda" else f"cpu ({platform.machine()})",
        "torch": torch.__version__,
        "input_fingerprint": fingerprint(obs, noise),
        "execution": "eager; q/k/v, stage inputs and vision taps observed through views (probes/pi05_tree)",
        "weights": weights,
    }
    inputs = Inputs(_core(model, root), obs.to(device), noise.to(device), cfg)

    def run():
        views.reset()
        with torch.inference_mode():
            return wrapped.actions(sample(inputs))

    return Backend(name=name, model=wrapped, probe=probe_for(f"{root}"), run=run,
                   layouts=lambda: layouts(cfg, obs), meta=meta, inputs=(inputs.obs, inputs.noise),
                   parameters=_parameters(params), widen=_no_widen)


def _core(model: nn.Module, root: str) -> nn.Module:
    return model.get_submodule(root[:-1]) if root else model


@contextlib.contextmanager
def _no_widen(dtype):
    """A user's tree keeps its own precision policy: it does not run as parity's oracle."""
    raise RuntimeError("a user's pi0.5 tree does not run at a higher precision (compare it against the bundled "
                       "reference, which does)")
    yield  # pragma: no cover
