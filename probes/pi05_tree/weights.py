"""parity's pi0.5 weights (seeded, or a checkpoint) loaded into a user's module tree.

The tree's own parameter names are openpi's checkpoint keys (lerobot's, under `model.`),
so the bundled key tables (`parity.probes.pi05.ckpt_layout`) name each of them: every
parameter of the tree is matched to one of the reference's, shapes checked, and filled
from the same values the bundled `pytorch` backend computes with, cast to the tree's own
dtype.  A parameter the tables do not know, or one of the reference's the tree lacks, is
an error listing them all: never a half-loaded model.  The parameters the tables declare
unused at inference (the LM heads) are left as they are and recorded.
"""
from __future__ import annotations

import torch
from torch import nn

from parity.probes.pi05.checkpoint import Checkpoint, expected_shapes, problems_error
from parity.probes.pi05.ckpt_layout import map_keys, natural
from parity.probes.pi05.config import Pi05Config, get_config
from parity.taps.backends import BackendOptions


def find_root(model: nn.Module) -> str:
    """The prefix of the tree's `paligemma_with_expert` ("" or "model.", ...)."""
    found = [name for name, _ in model.named_modules()
             if name == "paligemma_with_expert" or name.endswith(".paligemma_with_expert")]
    if len(found) != 1:
        what = "no module" if not found else f"{len(found)} modules ({', '.join(found[:3])})"
        raise ValueError(f"{type(model).__name__} is not a pi0.5 tree: {what} named paligemma_with_expert")
    return found[0][: -len("paligemma_with_expert")]


def config_for(options: BackendOptions) -> Pi05Config:
    """The pi0.5 sizes the bundled backends build for these options: the checkpoint's
    (`options.weights`), else `options.config` (default tiny).  Build your model to them."""
    if options.weights is None:
        return get_config(options.config or "tiny")
    ckpt = Checkpoint.open(options.weights)
    cfg = ckpt.config_for(options.config)
    ckpt.check(cfg)
    return cfg


class _Renamed:
    """The tree's parameters under the reference's names, for `Checkpoint.load_into`."""

    def __init__(self, params: dict[str, nn.Parameter]):
        self.params = params

    def named_parameters(self):
        return iter(self.params.items())


VISION = "paligemma_with_expert.paligemma.model.vision_tower."


def layout_key(name: str) -> str:
    """A tree parameter's name (under its root) as openpi's / lerobot's checkpoints store
    it: transformers 5.x's SigLIP has no `vision_model` level, their checkpoints do."""
    if name.startswith(VISION) and not name.startswith(VISION + "vision_model."):
        return VISION + "vision_model." + name[len(VISION):]
    return name


def checkpoint_state(model: nn.Module) -> dict[str, torch.Tensor]:
    """The tree's state dict under checkpoint keys (lerobot's layout for a `PI05Policy`,
    openpi's for `PI0Pytorch`), one copy per tensor (tied ones included), ready for
    `safetensors.torch.save_file`: the file `--weights` reads for both sides of a diff."""
    root = find_root(model)
    return {name[: len(root)] + layout_key(name[len(root):]) if name.startswith(root) else name:
            t.detach().contiguous().clone() for name, t in model.state_dict().items()}


def tree_parameters(model: nn.Module, root: str, cfg: Pi05Config) -> tuple[dict[str, nn.Parameter], dict[str, str]]:
    """({reference name: the tree's parameter}, {tree name: why it is not loaded});
    ValueError listing every parameter that does not fit."""
    own = {layout_key(name[len(root):]): (name, p) for name, p in model.named_parameters() if name.startswith(root)}
    outside = sorted(name for name, _ in model.named_parameters() if not name.startswith(root))
    keymap = map_keys(list(own))
    expected = expected_shapes(cfg)
    problems = [f"{name}: outside the tree's root {root!r}" for name in outside] + list(keymap.problems)
    problems += [f"the tree has no {root}{key} for the reference's {name} {list(expected[name])}"
                 for name, key in ((n, _key(n)) for n in sorted(set(expected) - set(keymap.sources), key=natural))]
    problems += [f"{own[key][0]}: the reference has no {name}"
                 for name, key in sorted(keymap.sources.items()) if name not in expected]
    mapped = {}
    for name, key in sorted(keymap.sources.items(), key=lambda kv: natural(kv[0])):
        if name not in expected:
            continue
        tree_name, p = own[key]
        if tuple(p.shape) != expected[name]:
            problems.append(f"{tree_name}: shape {list(p.shape)}, the reference's {name} is {list(expected[name])}")
        mapped[name] = p
    if problems:
        raise problems_error(f"{type(model).__name__} does not fit pi0.5 config {cfg.name}: {len(problems)} "
                             "problem(s)", problems)
    return mapped, {own[k][0]: why for k, why in keymap.unused.items()}


def _key(name: str) -> str:
    from parity.probes.pi05.ckpt_layout import OPENPI, file_key

    return file_key(name, OPENPI) or name


@torch.no_grad()
def load_reference_weights(model: nn.Module, root: str, cfg: Pi05Config, options: BackendOptions,
                           device: torch.device) -> dict:
    """Fill every parameter of the tree with the reference's values for `options`: the
    checkpoint's, or the seeded ones the bundled backends draw (on `device`'s type, in
    float32, then cast to each parameter's dtype exactly as the reference casts its own).
    Returns what the run metadata records about the weights."""
    params, unused = tree_parameters(model, root, cfg)
    if options.weights is not None:
        ckpt = Checkpoint.open(options.weights)
        ckpt.load_into(_Renamed(params))
        return {**ckpt.describe(), "tree_unused": sorted(unused)}
    from parity.probes.pi05.faults import Faults
    from parity.probes.pi05.model import Pi05Policy, Variant

    seeded = Pi05Policy.build(cfg, options.seed, Variant(), Faults(), torch.float32, device)
    for name, p in seeded.named_parameters():
        params[name].copy_(p)
    del seeded
    return {"seeded": options.seed, "tree_unused": sorted(unused)}
