"""Tiny random `transformers` models for the hf tests (no downloads), and a planted bug.

`save_tiny(kind, folder)` builds a model from a tiny config and `save_pretrained`s it.
`perturbed_mlp` is a backend factory (`hf_tiny:perturbed_mlp:PATH`) that runs the real
model with one planted bug: layer 1's MLP output is nudged by a forward hook."""
from __future__ import annotations

import contextlib
from pathlib import Path

TEXT = dict(vocab_size=128, hidden_size=32, intermediate_size=64, num_hidden_layers=3, num_attention_heads=4,
            num_key_value_heads=2, max_position_embeddings=64, pad_token_id=0, bos_token_id=1, eos_token_id=2)
VISION = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4, image_size=16,
              patch_size=4)
KINDS = ("llama", "gemma", "gemma2", "gemma3", "qwen2", "qwen3", "phi3", "siglip", "vit", "paligemma",
         "gpt2", "gpt_neox", "opt", "falcon", "falcon_new", "bert", "roberta", "t5", "mixtral", "qwen2_moe",
         "qwen3_moe", "siglip_full", "mamba", "gptj")
SMALL = dict(vocab_size=128, hidden_size=32, num_hidden_layers=3, num_attention_heads=4)  # the other families
MOE = dict(num_experts_per_tok=2)


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
    return _build_more(T, kind)


def _build_more(T, kind: str):
    """The families declared after the first ten (GPT-2 to Mamba), same sizes."""
    ids = dict(pad_token_id=0, bos_token_id=1, eos_token_id=2)
    if kind == "gpt2":  # Conv1D layers, one fused c_attn (q, k, v side by side)
        return T.GPT2LMHeadModel(T.GPT2Config(vocab_size=128, n_embd=32, n_layer=3, n_head=4, n_positions=64,
                                              **ids))
    if kind == "gpt_neox":  # query_key_value interleaved per head
        return T.GPTNeoXForCausalLM(T.GPTNeoXConfig(**SMALL, intermediate_size=64, max_position_embeddings=64,
                                                    **ids))
    if kind == "opt":
        return T.OPTForCausalLM(T.OPTConfig(**SMALL, ffn_dim=64, max_position_embeddings=64, word_embed_proj_dim=32,
                                            **ids))
    if kind == "falcon":  # Falcon-7B's layout: multi-query, parallel attention and MLP
        return T.FalconForCausalLM(T.FalconConfig(**SMALL, max_position_embeddings=64, **ids))
    if kind == "falcon_new":  # Falcon-40B's: grouped kv heads, interleaved in query_key_value
        return T.FalconForCausalLM(T.FalconConfig(**SMALL, max_position_embeddings=64, new_decoder_architecture=True,
                                                  num_kv_heads=2, **ids))
    if kind == "bert":
        return T.BertForMaskedLM(T.BertConfig(**SMALL, intermediate_size=64, max_position_embeddings=64,
                                              pad_token_id=0))
    if kind == "roberta":  # position ids count from pad_token_id + 1
        return T.RobertaForMaskedLM(T.RobertaConfig(**SMALL, intermediate_size=64, max_position_embeddings=66,
                                                    pad_token_id=1, bos_token_id=0, eos_token_id=2))
    if kind == "t5":
        return T.T5ForConditionalGeneration(T.T5Config(vocab_size=128, d_model=32, d_kv=8, d_ff=64, num_layers=2,
                                                       num_decoder_layers=2, num_heads=4, pad_token_id=0,
                                                       eos_token_id=1, decoder_start_token_id=0))
    if kind == "mixtral":
        return T.MixtralForCausalLM(T.MixtralConfig(**TEXT, num_local_experts=4, **MOE))
    if kind == "qwen2_moe":  # routed experts plus a gated shared expert
        return T.Qwen2MoeForCausalLM(T.Qwen2MoeConfig(**TEXT, num_experts=4, moe_intermediate_size=16,
                                                      shared_expert_intermediate_size=32, **MOE))
    if kind == "qwen3_moe":
        return T.Qwen3MoeForCausalLM(T.Qwen3MoeConfig(**TEXT, head_dim=8, num_experts=4, moe_intermediate_size=16,
                                                      **MOE))
    if kind == "siglip_full":  # both towers (SiglipModel), the text one short
        text = dict(vocab_size=128, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                    max_position_embeddings=16, pad_token_id=1, bos_token_id=126, eos_token_id=127)
        return T.SiglipModel(T.SiglipConfig(text_config=text, vision_config=VISION))
    if kind == "mamba":  # refused: no attention
        return T.MambaForCausalLM(T.MambaConfig(vocab_size=128, hidden_size=32, num_hidden_layers=2, state_size=4))
    if kind == "gptj":  # declared by no bundled family: the entry-point tests declare it
        return T.GPTJForCausalLM(T.GPTJConfig(vocab_size=128, n_embd=32, n_layer=2, n_head=4, rotary_dim=4,
                                              n_positions=64, **ids))
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


def hooked(opts, arg: str):
    """the hf backend with probes/hf/registry.py's input and layout hooks applied after it
    (both idempotent): what `hf:PATH` does once backend.py calls them itself"""
    from parity.probes.hf import backend as hf
    from parity.probes.hf.families import TOKENS, family_for
    from parity.probes.hf.registry import eager_experts, family_inputs, family_layouts, float64_experts

    backend = hf.factory(opts, arg)
    model = backend.model
    float64_experts(model)
    widen = backend.widen

    @contextlib.contextmanager
    def widened(dtype):
        with eager_experts(model), widen(dtype):
            yield

    backend.widen = widened
    text = hf._text_config(model.config)
    family, _ = family_for(model.config.model_type, [n for n, _ in model.named_modules()], text)
    family_inputs(family, model.config, backend.inputs, opts.seed)  # in place: the run reads this dict
    layouts = backend.layouts

    def merged():
        own = layouts()
        return {**family_layouts(backend.probe, own.get(TOKENS)), **own}

    backend.layouts = merged
    return backend


def scaled(opts, arg: str):
    """`TAP=SPEC`: the hooked hf backend with a planted bug, the output of the module behind
    TAP (e.g. decoder.1.mlp) scaled by 1.05 plus an offset, on this instance only"""
    tap, _, rest = arg.partition("=")
    backend = hooked(opts, rest)
    module = dict(backend.model.named_modules())[backend.probe.modules(backend.model)[tap]]
    module.register_forward_hook(lambda module, args, out: out * 1.05 + 0.01)
    backend.meta["faults"] = [f"{tap} scaled"]
    return backend
