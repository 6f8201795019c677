"""pi0.5 taps: which module is which tap, and where each tensor's tokens live.

Canonical names: `vision.<layer>.<component>`, `prefix.<layer>.<component>` (the Gemma
prefix LLM, whose k/v are the K/V cache), `expert.<layer>.<component>@<step>` (the action
expert, once per denoise step), stack-level taps like `vision.embed`, and `actions`.
"""
from __future__ import annotations

import numpy as np

from parity.probes.pi05.components import PARTS, Pi05Components
from parity.taps.probe import Probe, TapRule
from parity.taps.records import Layout, Region

LAYER = r"(?P<layer>\d+)\."
ATTN_PARTS = r"self_attn\.(?P<component>q|k|v|attn|o_proj)"
NORM_PARTS = r"(?P<component>input_norm|post_attn_norm)"
MLP_PART = r"(?P<component>mlp)"
PART_NOTES = {"qkv": "projections + RoPE", "attn": "attention core, real mask", "layer": "the whole layer"}


def _layer_rules(stack: str, layout: str, stepped: bool, norm_select: int | None) -> tuple[TapRule, ...]:
    """Per-layer taps; Gemma norms return (output, gate), so their tap selects element 0."""
    base = rf"{stack}\.layers\." + LAYER
    return (
        TapRule(base + NORM_PARTS, stack, layout=layout, stepped=stepped, select=norm_select),
        TapRule(base + ATTN_PARTS, stack, layout=layout, stepped=stepped),
        TapRule(base + MLP_PART, stack, layout=layout, stepped=stepped),
    )


PROBE = Probe(
    arch="pi05",
    rules=(
        TapRule(r"vision\.embed", "vision", "embed", layout="vision"),
        *_layer_rules("vision", "vision", stepped=False, norm_select=None),
        TapRule(r"vision\.post_norm", "vision", "final_norm", layout="vision"),
        TapRule(r"projector", "vision", "projector", layout="vision"),
        TapRule(r"prefix\.embed", "prefix", "embed", layout="prefix"),
        *_layer_rules("prefix", "prefix", stepped=False, norm_select=0),
        TapRule(r"expert\.time", "expert", "time", stepped=True),
        TapRule(r"expert\.embed", "expert", "embed", layout="actions", stepped=True),
        *_layer_rules("expert", "actions", stepped=True, norm_select=0),
        TapRule(r"expert\.final_norm", "expert", "final_norm", layout="actions", stepped=True, select=0),
        TapRule(r"expert\.velocity", "expert", "velocity", layout="actions", stepped=True),
        TapRule(r"actions", "output", "actions", layout="actions"),
    ),
    components=Pi05Components(),
    default_stack="prefix",  # the Gemma prefix LLM, whose k/v are the K/V cache
    drift_taps="prefix.*.k",  # the K cache, by token region: which tokens a new frame changes
    parts=tuple((part, PART_NOTES.get(part, "")) for part in PARTS),
)


def layouts(model, obs) -> dict[str, Layout]:
    """Token layouts of one run: vision rows are (sample, camera) images; prefix slots are
    padded (reference) or packed (flash); action slots are the action chunk."""
    cfg = model.cfg
    n, cams = cfg.vision.num_tokens, cfg.cameras
    B, C = obs.image_masks.shape
    image_valid = obs.image_masks.cpu().numpy().reshape(B * C)
    rows = model.vision_rows(obs)  # the images this backend runs: all, or only unmasked cameras
    vision_slots = rows[:, None] * n + np.arange(n, dtype=np.int64)[None, :]  # [rows, n]
    vision_slots[~image_valid[rows]] = -1  # a masked camera's tokens are never attended to
    camera_regions = tuple(Region(f"camera:{c}", i * n, (i + 1) * n) for i, c in enumerate(cams))
    H = cfg.action_horizon
    return {
        "vision": Layout(vision_slots, C * n, camera_regions),
        "prefix": Layout(model.prefix_slots(obs), cfg.prefix_len,
                         camera_regions + (Region("text", C * n, cfg.prefix_len),)),
        "actions": Layout(np.arange(B * H, dtype=np.int64).reshape(B, H), H, (Region("actions", 0, H),)),
    }
