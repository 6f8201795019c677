"""Which modules of a `transformers` model are which taps: declared per model family.

Canonical names follow the pi0.5 probe: `<stack>.<layer>.<component>` plus stack-level
taps.  Stacks: `decoder` (the language model), `vision` (SigLIP / ViT encoders),
`output` (`output.logits`).  Per-layer components, in execution order:

  input_norm      the norm in front of attention
  q, k, v         the q/k/v projections, [batch, tokens, heads*head_dim].  transformers
                  applies RoPE inside the attention forward, not in a module, so the
                  rotated q/k are not observable without patching transformers: these
                  taps are the projections *before* RoPE (a fused qkv_proj is split).
  q_norm, k_norm  per-head q/k norms (Qwen3, Gemma3), when the model has them
  attn            the attention core's output (heads merged), i.e. the o-projection's input
  o_proj          the o-projection's output
  post_attn_norm  the module transformers calls post_attention_layernorm: the pre-MLP norm
                  in Llama/Gemma/Qwen2, the norm on the attention output in Gemma2/Gemma3
  pre_mlp_norm, post_mlp_norm   Gemma2/Gemma3's pre/post feed-forward norms
  mlp             the MLP's output
  out             the layer's output (the residual stream after the layer)

Stack-level: `decoder.embed`, `decoder.final_norm`, `vision.embed`, `vision.final_norm`,
`vision.pooled`, `vision.projector` (PaliGemma), `output.logits`.

Everything here is data: module-path patterns relative to a layer, and where each
family's stacks live.  The core never sees a model name.
"""
from __future__ import annotations

import re
from dataclasses import dataclass

from parity.taps.probe import ON_INPUT, ON_OUTPUT, Probe, TapRule

TOKENS = "tokens"  # the token layout every decoder tap uses (padding = don't care)


@dataclass(frozen=True)
class Part:
    """A per-layer tap: a module path inside the layer ("" = the layer itself)."""

    path: str
    component: str
    on: str = ON_OUTPUT
    split_qkv: bool = False  # a fused q/k/v projection, split into q, k, v
    token_axis: int = 1  # 2: the module returns [rows, heads, tokens, dim] (TapRule.token_axis)


@dataclass(frozen=True)
class StackPlan:
    """Where one stack lives: the layer list's path and the stack-level modules."""

    stack: str
    root: str  # regex prefix of the stack's modules, e.g. r"(?:model\.)?"
    layers: str  # path of the layer list under root
    parts: tuple[Part, ...]
    extras: tuple[tuple[str, str], ...]  # (path under root, component)
    layout: str | None


@dataclass(frozen=True)
class Family:
    name: str
    stacks: tuple[StackPlan, ...]
    inputs: str  # "text" | "image" | "image_text"
    logits: str | None = r"lm_head"  # module path of the logits, None = no logits tap
    position_offset: int = 0  # first position id of a row (PaliGemma counts from 1)
    prefix_lm: bool = False  # pass token_type_ids = 0: the prompt attends bidirectionally


_ATTN_CORE = (Part("self_attn.o_proj", "attn", ON_INPUT), Part("self_attn.o_proj", "o_proj"))
DECODER_PARTS = (
    Part("input_layernorm", "input_norm"),
    Part("self_attn.q_proj", "q"), Part("self_attn.k_proj", "k"), Part("self_attn.v_proj", "v"),
    Part("self_attn.q_norm", "q_norm"), Part("self_attn.k_norm", "k_norm"),
    *_ATTN_CORE,
    Part("post_attention_layernorm", "post_attn_norm"),
    Part("pre_feedforward_layernorm", "pre_mlp_norm"),
    Part("mlp", "mlp"),
    Part("post_feedforward_layernorm", "post_mlp_norm"),
    Part("", "out"),
)
# Gemma-3 applies its q/k norms after the transpose to [B, heads, T, head_dim] (Qwen3 before it)
GEMMA3_PARTS = tuple(Part(p.path, p.component, token_axis=2) if p.component in ("q_norm", "k_norm") else p
                     for p in DECODER_PARTS)
FUSED_DECODER_PARTS = tuple(p for p in DECODER_PARTS if p.component not in ("q", "k", "v")) + (
    Part("self_attn.qkv_proj", "qkv", split_qkv=True),)
SIGLIP_PARTS = (
    Part("layer_norm1", "input_norm"),
    Part("self_attn.q_proj", "q"), Part("self_attn.k_proj", "k"), Part("self_attn.v_proj", "v"),
    Part("self_attn.out_proj", "attn", ON_INPUT), Part("self_attn.out_proj", "o_proj"),
    Part("layer_norm2", "post_attn_norm"),
    Part("mlp", "mlp"),
    Part("", "out"),
)
VIT_PARTS = (
    Part("layernorm_before", "input_norm"),
    Part("attention.q_proj", "q"), Part("attention.k_proj", "k"), Part("attention.v_proj", "v"),
    Part("attention.o_proj", "attn", ON_INPUT), Part("attention.o_proj", "o_proj"),
    Part("layernorm_after", "post_attn_norm"),
    Part("mlp", "mlp"),
    Part("", "out"),
)
_DECODER_EXTRAS = (("embed_tokens", "embed"), ("norm", "final_norm"))
_SIGLIP_EXTRAS = (("embeddings", "embed"), ("post_layernorm", "final_norm"), ("head", "pooled"))


def decoder(root: str = r"(?:model\.)?", parts: tuple[Part, ...] = DECODER_PARTS) -> StackPlan:
    return StackPlan("decoder", root, "layers", parts, _DECODER_EXTRAS, TOKENS)


def siglip(root: str = r"(?:vision_model\.)?") -> StackPlan:
    return StackPlan("vision", root, "encoder.layers", SIGLIP_PARTS, _SIGLIP_EXTRAS, None)


DECODER = Family("decoder", (decoder(),), "text")
FAMILIES: dict[str, Family] = {
    **dict.fromkeys(("llama", "mistral", "qwen2", "qwen3", "gemma", "gemma2"), DECODER),
    "gemma3_text": Family("decoder", (decoder(parts=GEMMA3_PARTS),), "text"),
    "phi3": Family("fused-qkv decoder", (decoder(parts=FUSED_DECODER_PARTS),), "text"),
    "siglip_vision_model": Family("siglip", (siglip(),), "image", logits=None),
    "vit": Family("vit", (StackPlan("vision", r"(?:vit\.)?", "layers", VIT_PARTS,
                                    (("embeddings", "embed"), ("layernorm", "final_norm"), ("pooler", "pooled")),
                                    None),), "image", logits=r"classifier"),
    "paligemma": Family("paligemma", (
        StackPlan("vision", r"model\.vision_tower\.(?:vision_model\.)?", "encoder.layers", SIGLIP_PARTS,
                  _SIGLIP_EXTRAS, None),
        StackPlan("vision", r"model\.", "", (), (("multi_modal_projector", "projector"),), None),
        decoder(r"model\.language_model\."),
    ), "image_text", position_offset=1, prefix_lm=True),
}


def qkv_split(config) -> tuple[tuple[str, int], ...]:
    """Sizes of q, k and v in a fused projection's output, from the (text) config."""
    heads = config.num_attention_heads
    kv_heads = getattr(config, "num_key_value_heads", None) or heads
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // heads
    return (("q", heads * head_dim), ("k", kv_heads * head_dim), ("v", kv_heads * head_dim))


def rules_for(family: Family, text_config) -> tuple[TapRule, ...]:
    rules: list[TapRule] = []
    for plan in family.stacks:
        if plan.layers:
            base = plan.root + re.escape(plan.layers) + r"\.(?P<layer>\d+)"
            for part in plan.parts:
                pattern = base + (r"\." + re.escape(part.path) if part.path else "")
                split = qkv_split(text_config) if part.split_qkv else ()
                rules.append(TapRule(pattern, plan.stack, None if split else part.component, plan.layout,
                                     select=0, on=part.on, split=split, token_axis=part.token_axis))
        for path, component in plan.extras:
            rules.append(TapRule(plan.root + re.escape(path), plan.stack, component, plan.layout, select=0))
    if family.logits:
        layout = TOKENS if family.inputs != "image" else None
        rules.append(TapRule(family.logits, "output", "logits", layout, select=0))
    return tuple(rules)


def family_for(model_type: str, module_names: list[str]) -> tuple[Family, str]:
    """The declared family of a model_type; an undeclared one that has Llama-style decoder
    layers gets the generic decoder rules (said so in the second value)."""
    if model_type in FAMILIES:
        return FAMILIES[model_type], FAMILIES[model_type].name
    layer_q = re.compile(r"(?:model\.)?layers\.\d+\.self_attn\.q_proj")
    if any(layer_q.fullmatch(n) for n in module_names):
        return DECODER, f"generic decoder (model_type {model_type!r} is not declared)"
    known = ", ".join(sorted(FAMILIES))
    raise ValueError(f"no parity probe for model_type {model_type!r}; declared: {known} "
                     "(or pass your own package.module:factory)")


def probe_for(model, model_type: str, text_config) -> tuple[Probe, Family, str]:
    names = [n for n, _ in model.named_modules()]
    family, how = family_for(model_type, names)
    probe = Probe(arch=f"hf/{model_type}", rules=rules_for(family, text_config))
    if not any(probe.taps_for(n) for n in names):
        raise ValueError(f"the {family.name} probe finds no taps in this {model_type} model "
                         "(module names differ from the declared ones)")
    return probe, family, how
