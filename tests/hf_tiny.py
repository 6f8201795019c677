"""Tiny random `transformers` models for the hf tests (no downloads), and a planted bug.

`save_tiny(kind, folder)` builds a model from a tiny config and `save_pretrained`s it.
`perturbed_mlp` is a backend factory (`hf_tiny:perturbed_mlp:PATH`) that runs the real
model with one planted bug: layer 1's MLP output is nudged by a forward hook."""
from __future__ import annotations

from pathlib import Path

TEXT = dict(vocab_size=128, hidden_size=32, intermediate_size=64, num_hidden_layers=3, num_attention_heads=4,
            num_key_value_heads=2, max_position_embeddings=64, pad_token_id=0, bos_token_id=1, eos_token_id=2)
VISION = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4, image_size=16,
              patch_size=4)
KINDS = ("llama", "gemma", "gemma2", "gemma3", "qwen2", "qwen3", "phi3", "siglip", "vit", "paligemma")


def build(kind: str, seed: int = 0):
    import torch
    import transformers as T

    torch.manual_seed(seed)
    if kind == "llama":
        return T.LlamaForCausalLM(T.LlamaConfig(**TEXT))
    if kind == "gemma":
        return T.GemmaForCausalLM(T.GemmaConfig(**TEXT, head_dim=8))
    if kind == "gemma2":
        return T.Gemma2ForCausalLM(T.Gemma2Config(**TEXT, head_dim=8))
    if kind == "gemma3":  # q/k norms after the transpose to [B, heads, T, head_dim]
        return T.Gemma3ForCausalLM(T.Gemma3TextConfig(**TEXT, head_dim=8, sliding_window=8))
    if kind == "qwen3":  # q/k norms before it
        return T.Qwen3ForCausalLM(T.Qwen3Config(**TEXT, head_dim=8))
    if kind == "qwen2":
        return T.Qwen2ForCausalLM(T.Qwen2Config(**TEXT))
    if kind == "phi3":
        return T.Phi3ForCausalLM(T.Phi3Config(**TEXT))
    if kind == "siglip":
        return T.SiglipVisionModel(T.SiglipVisionConfig(**VISION))
    if kind == "vit":
        return T.ViTModel(T.ViTConfig(**VISION))
    if kind == "paligemma":
        cfg = T.PaliGemmaConfig(vision_config=dict(model_type="siglip_vision_model", **VISION, projection_dim=32),
                                text_config=dict(model_type="gemma", **TEXT, head_dim=8),
                                image_token_index=127, projection_dim=32, vocab_size=128)
        return T.PaliGemmaForConditionalGeneration(cfg)
    raise ValueError(f"unknown tiny model {kind!r}")


def save_tiny(kind: str, folder: Path) -> Path:
    import transformers

    logging = transformers.utils.logging
    bars = logging.is_progress_bar_enabled()
    logging.disable_progress_bar()
    try:
        build(kind).save_pretrained(folder)
    finally:
        if bars:
            logging.enable_progress_bar()
    return folder


def perturbed_mlp(opts, arg: str):
    """the hf backend with a planted bug: layer 1's MLP output scaled by 1.05 plus an offset"""
    from parity.probes.hf.backend import factory

    backend = factory(opts, arg)
    mlp = backend.model.model.layers[1].mlp
    mlp.register_forward_hook(lambda module, args, out: out * 1.05 + 0.01)
    backend.meta["faults"] = ["layer 1 mlp perturbed"]
    return backend


def rope_patched(opts, arg: str):
    """the hf backend built the way liger-kernel's `apply_liger_kernel_to_llama` works: it
    replaces transformers' module-level `apply_rotary_pos_emb` (here with one that rotates the
    other way), so every Llama in the process would run the patch"""
    import transformers.models.llama.modeling_llama as llama

    from parity.probes.hf.backend import factory

    original = llama.apply_rotary_pos_emb

    def skewed(q, k, cos, sin, *args, **kwargs):
        return original(q, k, cos, -sin, *args, **kwargs)

    llama.apply_rotary_pos_emb = skewed
    backend = factory(opts, arg)
    backend.meta["faults"] = ["apply_rotary_pos_emb patched module-wide"]
    return backend
