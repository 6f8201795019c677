"""Tiny pi0.5 checkpoints in the layouts users have, written from one of our models.

The key names are spelled out here by hand from openpi's converter
(`examples/convert_jax_model_to_pytorch.py`, which saves `PI0Pytorch` with
`safetensors.torch.save_model`) and lerobot's key fixer, independently of the loader's
own tables in `probes/pi05/ckpt_layout.py`: a wrong mapping there cannot cancel out.
"""
from __future__ import annotations

import json
from pathlib import Path

import torch
from safetensors.torch import save_file

P = "paligemma_with_expert.paligemma.model."
V = P + "vision_tower.vision_model."
L = P + "language_model."
E = "paligemma_with_expert.gemma_expert.model."
PALIGEMMA_LM_HEAD = "paligemma_with_expert.paligemma.lm_head.weight"
EXPERT_LM_HEAD = "paligemma_with_expert.gemma_expert.lm_head.weight"


def openpi_state(model) -> dict[str, torch.Tensor]:
    """openpi PyTorch key -> tensor, as the converter's save_model writes it: the tied text
    embedding under PaliGemma's lm_head name, the expert's unused lm_head included."""
    sd: dict[str, torch.Tensor] = {}
    vis = model.vision
    sd[V + "embeddings.patch_embedding.weight"] = vis.patch_embedding.weight
    sd[V + "embeddings.patch_embedding.bias"] = vis.patch_embedding.bias
    sd[V + "embeddings.position_embedding.weight"] = vis.position_embedding  # nn.Embedding weight [n, W]
    for i, layer in enumerate(vis.layers):
        b = f"{V}encoder.layers.{i}."
        for ours, theirs in (("input_norm", "layer_norm1"), ("post_attn_norm", "layer_norm2")):
            sd[b + theirs + ".weight"] = getattr(layer, ours).weight
            sd[b + theirs + ".bias"] = getattr(layer, ours).bias
        for ours, theirs in (("q_proj", "q_proj"), ("k_proj", "k_proj"), ("v_proj", "v_proj"), ("o_proj", "out_proj")):
            sd[b + f"self_attn.{theirs}.weight"] = getattr(layer.self_attn, ours).weight
            sd[b + f"self_attn.{theirs}.bias"] = getattr(layer.self_attn, ours).bias
        for fc in ("fc1", "fc2"):
            sd[b + f"mlp.{fc}.weight"] = getattr(layer.mlp, fc).weight
            sd[b + f"mlp.{fc}.bias"] = getattr(layer.mlp, fc).bias
    sd[V + "post_layernorm.weight"] = vis.post_norm.weight
    sd[V + "post_layernorm.bias"] = vis.post_norm.bias
    sd[P + "multi_modal_projector.linear.weight"] = model.projector.weight
    sd[P + "multi_modal_projector.linear.bias"] = model.projector.bias
    sd[PALIGEMMA_LM_HEAD] = model.embed_tokens.weight
    for stack, root in ((model.prefix, L), (model.expert, E)):
        for i, layer in enumerate(stack.layers):
            b = f"{root}layers.{i}."
            for proj in ("q_proj", "k_proj", "v_proj", "o_proj"):
                sd[b + f"self_attn.{proj}.weight"] = getattr(layer.self_attn, proj).weight
            for proj in ("gate_proj", "up_proj", "down_proj"):
                sd[b + f"mlp.{proj}.weight"] = getattr(layer.mlp, proj).weight
            for ours, theirs in (("input_norm", "input_layernorm"), ("post_attn_norm", "post_attention_layernorm")):
                norm = getattr(layer, ours)
                if stack is model.prefix:
                    sd[b + theirs + ".weight"] = norm.weight
                else:  # adaRMS: Dense 1024 -> 3072
                    sd[b + theirs + ".dense.weight"] = norm.dense.weight
                    sd[b + theirs + ".dense.bias"] = norm.dense.bias
    sd[L + "norm.weight"] = model.prefix.final_norm.weight
    sd[E + "norm.dense.weight"] = model.expert.final_norm.dense.weight
    sd[E + "norm.dense.bias"] = model.expert.final_norm.dense.bias
    vocab, expert_width = model.embed_tokens.weight.shape[0], model.cfg.expert.width
    sd[EXPERT_LM_HEAD] = torch.randn(vocab, expert_width, generator=torch.Generator().manual_seed(7))
    for name in ("action_in_proj", "action_out_proj", "time_mlp_in", "time_mlp_out"):
        sd[f"{name}.weight"] = getattr(model, name).weight
        sd[f"{name}.bias"] = getattr(model, name).bias
    return sd


def lerobot_state(model) -> dict[str, torch.Tensor]:
    """lerobot's pi05 layout: every key under `model.`, time MLP under its pi0 name
    `action_time_mlp_*`, plus the keys lerobot's fixer drops (pi0's state_proj, the
    expert's plain norm weights)."""
    sd = openpi_state(model)
    for part in ("in", "out"):
        for kind in ("weight", "bias"):
            sd[f"action_time_mlp_{part}.{kind}"] = sd.pop(f"time_mlp_{part}.{kind}")
    width, action_dim = model.cfg.expert.width, model.cfg.action_dim
    sd["state_proj.weight"] = torch.zeros(width, action_dim)
    sd["state_proj.bias"] = torch.zeros(width)
    for i in range(model.cfg.expert.depth):
        sd[f"{E}layers.{i}.input_layernorm.weight"] = torch.zeros(width)
        sd[f"{E}layers.{i}.post_attention_layernorm.weight"] = torch.zeros(width)
    sd[E + "norm.weight"] = torch.zeros(width)
    return {f"model.{k}": v for k, v in sd.items()}


def write(state: dict[str, torch.Tensor], directory: Path, dtype: torch.dtype, config: dict | None = None) -> Path:
    """model.safetensors (every float tensor cast to `dtype`, as the converter's
    model.to(dtype)) and config.json in `directory`; returns the directory."""
    directory.mkdir(parents=True, exist_ok=True)
    tensors = {k: (v.detach().to(dtype) if v.is_floating_point() else v.detach()).contiguous().clone()
               for k, v in state.items()}
    save_file(tensors, str(directory / "model.safetensors"))
    if config is not None:
        (directory / "config.json").write_text(json.dumps(config, indent=2))
    return directory


def openpi_config(model, precision: str) -> dict:
    """config.json as openpi's converter writes it (no sizes: those are in the weights)."""
    return {"action_dim": model.cfg.action_dim, "action_horizon": model.cfg.action_horizon,
            "paligemma_variant": "dummy", "action_expert_variant": "dummy", "precision": precision}


def lerobot_config(model) -> dict:
    """The fields of lerobot's PI05Config that say what the weights cannot."""
    return {"type": "pi05", "chunk_size": model.cfg.action_horizon, "n_action_steps": model.cfg.action_horizon,
            "max_action_dim": model.cfg.action_dim, "num_inference_steps": model.cfg.num_steps,
            "tokenizer_max_length": model.cfg.max_token_len, "dtype": "float32"}
