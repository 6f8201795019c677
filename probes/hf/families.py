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

Other families add (each only where the model has the module):

  qkv             a fused q/k/v projection tapped whole: its q, k and v are interleaved
                  per head (GPT-NeoX, Falcon-40B's grouped layout), so they are not
                  contiguous slices of the last dimension, the only split `TapRule.split` makes
  mlp_up          the MLP's first projection (OPT's fc1, BERT's intermediate), when the
                  MLP is not one module
  cross_norm, cross_q, cross_k, cross_v, cross_attn, cross_o_proj
                  a decoder's cross-attention over the encoder's output (T5)
  router          an MoE router's logits, [tokens, experts] (the `gate` output)
  experts         the routed experts' weighted sum, [tokens, hidden]
  shared_expert, shared_gate   Qwen2-MoE's shared expert and its sigmoid gate's logit
  mlp             for an MoE layer: the MoE block's output

Stack-level: `decoder.embed`, `decoder.pos_embed` (learned positions: GPT-2, OPT),
`decoder.final_norm`, `encoder.embed`, `encoder.final_norm`, `vision.embed`,
`vision.final_norm`, `vision.pooled`, `vision.projector` (PaliGemma), `text.*` (SigLIP's
text tower), `output.logits`.

MoE routers and experts see the tokens flattened, [rows * slots, ...]: their taps use a
flat token layout (`flat_layout`), one slot per (token, feature) pair, so that padding
stays don't-care there too.

Everything here is data: module-path patterns relative to a layer, and where each
family's stacks live.  The core never sees a model name.
"""
from __future__ import annotations

import inspect
import re
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import numpy as np

from parity.taps.probe import ON_INPUT, ON_OUTPUT, Probe, TapRule
from parity.taps.records import Layout, Region

TOKENS = "tokens"  # the token layout every decoder tap uses (padding = don't care)
FLAT = TOKENS + "_flat"  # + width: the flat token layout of [rows * slots, width] taps (MoE routers)
GENERIC = "generic decoder"  # the fallback's name, for an undeclared model_type with Llama-style layers


@dataclass(frozen=True)
class Part:
    """A per-layer tap: a module path inside the layer ("" = the layer itself)."""

    path: str
    component: str
    on: str = ON_OUTPUT
    # a fused q/k/v projection, split into consecutive q, k, v: True = sizes from the config
    # (`qkv_split`), or a function of the config giving the (name, size) chunks
    split_qkv: bool | Callable[[Any], tuple[tuple[str, int], ...]] = False
    token_axis: int = 1  # 2: the module returns [rows, heads, tokens, dim] (TapRule.token_axis)
    # the module sees the tokens flattened, [rows * slots, width]: the width, as a number or
    # the config attribute(s) holding it ("num_local_experts|num_experts": the first set)
    flat: int | str | None = None
    per_head: bool = False  # the split repeats per attention head (GPT-NeoX: [heads, q|k|v])


@dataclass(frozen=True)
class StackPlan:
    """Where one stack lives: the layer list's path and the stack-level modules."""

    stack: str
    root: str  # regex prefix of the stack's modules, e.g. r"(?:model\.)?"
    layers: str  # path of the layer list under root
    parts: tuple[Part, ...]
    # (path under root, component) or (path, component, on): on=ON_INPUT taps the module's
    # first input (T5's embedding: the input of its first block)
    extras: tuple[tuple[str, ...], ...]
    layout: str | None


@dataclass(frozen=True)
class Family:
    name: str
    stacks: tuple[StackPlan, ...]
    inputs: str  # "text" | "image" | "image_text"
    logits: str | None = r"lm_head"  # module path of the logits, None = no logits tap
    position_offset: int = 0  # first position id of a row (PaliGemma counts from 1)
    prefix_lm: bool = False  # pass token_type_ids = 0: the prompt attends bidirectionally
    # What `family_inputs` adds to or takes from the inputs backend.py builds:
    position_ids: bool = True  # False: the model takes none (T5: relative position buckets)
    decoder_inputs: bool = False  # an encoder-decoder: the decoder reads the same rows, teacher-forced
    fixed_text: int = 0  # a two-tower model fed images (SiglipModel): its text tower gets N fixed tokens per row


# A family as `FAMILIES` (or an entry point) holds it: the Family, or a function of the
# model's text config returning one (a layout the config decides, e.g. Falcon's q/k/v)
FamilyEntry = Family | Callable[..., Family]


def projections(q: str, k: str, v: str, prefix: str = "") -> tuple[Part, ...]:
    """The q, k and v taps of an attention with separate projections (module paths)."""
    return Part(q, prefix + "q"), Part(k, prefix + "k"), Part(v, prefix + "v")


def output_projection(path: str, prefix: str = "") -> tuple[Part, ...]:
    """The two taps around an attention's output projection: its input is the attention
    core's output (`attn`, heads merged), its output `o_proj`."""
    return Part(path, prefix + "attn", ON_INPUT), Part(path, prefix + "o_proj")


def attention(at: str, q: str = "q_proj", k: str = "k_proj", v: str = "v_proj", o: str = "o_proj",
              prefix: str = "") -> tuple[Part, ...]:
    """q, k, v, attn and o_proj of the attention module at `at` (its projections' names)."""
    return (*projections(f"{at}.{q}", f"{at}.{k}", f"{at}.{v}", prefix), *output_projection(f"{at}.{o}", prefix))


DECODER_PARTS = (
    Part("input_layernorm", "input_norm"),
    *projections("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj"),
    Part("self_attn.q_norm", "q_norm"), Part("self_attn.k_norm", "k_norm"),
    *output_projection("self_attn.o_proj"),
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
    *attention("self_attn", o="out_proj"),
    Part("layer_norm2", "post_attn_norm"),
    Part("mlp", "mlp"),
    Part("", "out"),
)
VIT_PARTS = (
    Part("layernorm_before", "input_norm"),
    *attention("attention"),
    Part("layernorm_after", "post_attn_norm"),
    Part("mlp", "mlp"),
    Part("", "out"),
)
def _falcon_split(config) -> tuple[tuple[str, int], ...]:
    """Falcon-7B's multi-query layout: all query heads, then one key head, one value head."""
    head_dim = config.hidden_size // config.num_attention_heads
    return (("q", config.num_attention_heads * head_dim), ("k", head_dim), ("v", head_dim))


GPT2_PARTS = (
    Part("ln_1", "input_norm"),
    Part("attn.c_attn", "qkv", split_qkv=True),  # a Conv1D: [.., 3 * hidden], q, k, v side by side
    *output_projection("attn.c_proj"),
    Part("ln_2", "post_attn_norm"),
    Part("mlp", "mlp"),
    Part("", "out"),
)
def _neox_split(config) -> tuple[tuple[str, int], ...]:
    """One head's q, k, v in GPT-NeoX's query_key_value ([.., heads, 3 * head_dim])."""
    head_dim = config.hidden_size // config.num_attention_heads
    return (("q", head_dim), ("k", head_dim), ("v", head_dim))


# query_key_value is [.., heads, 3 * head_dim]: q, k, v interleaved per head, split per head
NEOX_PARTS = (
    Part("input_layernorm", "input_norm"),
    Part("attention.query_key_value", "qkv", split_qkv=_neox_split, per_head=True),
    *output_projection("attention.dense"),
    Part("post_attention_layernorm", "post_attn_norm"),
    Part("mlp", "mlp"),
    Part("", "out"),
)


def opt(config) -> Family:
    """OPT flattens the tokens around its MLP ([rows * slots, hidden]: fc1, fc2, and the
    pre-MLP final_layer_norm of the models that normalise first); OPT-350m normalises after
    the residual, on [rows, slots, hidden] again."""
    before = getattr(config, "do_layer_norm_before", True)
    parts = (
        Part("self_attn_layer_norm", "input_norm"),
        *attention("self_attn", o="out_proj"),
        Part("final_layer_norm", "post_attn_norm", flat="hidden_size" if before else None),
        Part("fc1", "mlp_up", flat="ffn_dim"), Part("fc2", "mlp", flat="hidden_size"),
        Part("", "out"),
    )
    return Family("opt", (StackPlan("decoder", r"(?:model\.)?decoder\.", "layers", parts,
                                    (("embed_tokens", "embed"), ("project_in", "embed_proj"),
                                     ("embed_positions", "pos_embed"), ("final_layer_norm", "final_norm"),
                                     ("project_out", "final_proj")), TOKENS),), "text")


def _falcon_parts(qkv: Part) -> tuple[Part, ...]:
    return (
        Part("input_layernorm", "input_norm"), Part("ln_attn", "input_norm"), Part("ln_mlp", "pre_mlp_norm"),
        qkv,
        *output_projection("self_attention.dense"),
        Part("post_attention_layernorm", "post_attn_norm"),
        Part("mlp", "mlp"),
        Part("", "out"),
    )


# BERT is post-LN: attention.output is dense + residual + LayerNorm, the attention block's output
BERT_PARTS = (
    *projections("attention.self.query", "attention.self.key", "attention.self.value"),
    Part("attention.self", "attn"),  # returns (heads merged, weights)
    Part("attention.output.dense", "o_proj"),
    Part("attention.output", "post_attn_norm"),
    Part("intermediate", "mlp_up"), Part("output.dense", "mlp"),
    Part("", "out"),
)


def _t5_attention(layer: str, module: str, norm: str, prefix: str = "") -> tuple[Part, ...]:
    return Part(f"{layer}.layer_norm", norm), *attention(f"{layer}.{module}", "q", "k", "v", "o", prefix)


# The decoder's cross_k, cross_v project the encoder's output: the same rows (teacher-forced), one layout
T5_ENCODER_PARTS = (*_t5_attention("layer.0", "SelfAttention", "input_norm"),
                    Part("layer.1.layer_norm", "post_attn_norm"), Part("layer.1.DenseReluDense", "mlp"),
                    Part("", "out"))
T5_DECODER_PARTS = (*_t5_attention("layer.0", "SelfAttention", "input_norm"),
                    *_t5_attention("layer.1", "EncDecAttention", "cross_norm", "cross_"),
                    Part("layer.2.layer_norm", "post_attn_norm"), Part("layer.2.DenseReluDense", "mlp"),
                    Part("", "out"))


def _moe_parts(experts: str, shared: bool = False, base: tuple[Part, ...] = None) -> tuple[Part, ...]:
    """A Llama-style decoder whose `mlp` is an MoE block: its router's logits, the routed
    experts' sum (and Qwen2-MoE's shared expert), then the block's output (`mlp`)."""
    moe = ((Part("mlp.shared_expert", "shared_expert", flat="hidden_size"),) if shared else ()) + (
        Part("mlp.gate", "router", flat=experts), Part("mlp.experts", "experts", flat="hidden_size")) + (
        (Part("mlp.shared_expert_gate", "shared_gate", flat=1),) if shared else ())
    base = base or DECODER_PARTS
    at = next(i for i, p in enumerate(base) if p.component == "mlp")
    return base[:at] + moe + base[at:]


_DECODER_EXTRAS = (("embed_tokens", "embed"), ("norm", "final_norm"))
_SIGLIP_EXTRAS = (("embeddings", "embed"), ("post_layernorm", "final_norm"), ("head", "pooled"))


def decoder(root: str = r"(?:model\.)?", parts: tuple[Part, ...] = DECODER_PARTS) -> StackPlan:
    return StackPlan("decoder", root, "layers", parts, _DECODER_EXTRAS, TOKENS)


def siglip(root: str = r"(?:vision_model\.)?") -> StackPlan:
    return StackPlan("vision", root, "encoder.layers", SIGLIP_PARTS, _SIGLIP_EXTRAS, None)


def falcon(config) -> Family:
    """Falcon's fused query_key_value is split only in Falcon-7B's multi-query layout
    (queries, then one key and one value head); the grouped (Falcon-40B,
    new_decoder_architecture) and per-head interleaved layouts are tapped whole (`qkv`)."""
    contiguous = getattr(config, "multi_query", False) and not getattr(config, "new_decoder_architecture", False)
    qkv = Part("self_attention.query_key_value", "qkv", split_qkv=_falcon_split if contiguous else False)
    return Family("falcon", (StackPlan("decoder", r"(?:transformer\.)?", "h", _falcon_parts(qkv),
                                       (("word_embeddings", "embed"), ("ln_f", "final_norm")), TOKENS),), "text")


def bert(root: str) -> Callable[[Any], Family]:
    """A BERT-style encoder; RoBERTa counts positions from pad_token_id + 1, as its own
    position ids do (`position_offset`)."""

    def family(config) -> Family:
        offset = (getattr(config, "pad_token_id", None) or 0) + 1 if root.startswith("(?:roberta") else 0
        return Family("bert encoder", (StackPlan("encoder", root, "encoder.layer", BERT_PARTS,
                                                 (("embeddings", "embed"),), TOKENS),),
                      "text", logits=r"cls\.predictions|lm_head", position_offset=offset)

    return family


T5 = Family("t5 encoder-decoder", (
    StackPlan("encoder", r"encoder\.", "block", T5_ENCODER_PARTS,
              (("block.0", "embed", ON_INPUT), ("final_layer_norm", "final_norm")), TOKENS),
    StackPlan("decoder", r"decoder\.", "block", T5_DECODER_PARTS,
              (("block.0", "embed", ON_INPUT), ("final_layer_norm", "final_norm")), TOKENS),
), "text", position_ids=False, decoder_inputs=True)

DECODER = Family("decoder", (decoder(),), "text")
FAMILIES: dict[str, FamilyEntry] = {
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
    "gpt2": Family("gpt2", (StackPlan("decoder", r"(?:transformer\.)?", "h", GPT2_PARTS,
                                      (("wte", "embed"), ("wpe", "pos_embed"), ("ln_f", "final_norm")), TOKENS),),
                   "text"),
    "gpt_neox": Family("gpt-neox", (StackPlan("decoder", r"(?:gpt_neox\.)?", "layers", NEOX_PARTS,
                                              (("embed_in", "embed"), ("final_layer_norm", "final_norm")), TOKENS),),
                       "text", logits=r"lm_head|embed_out"),
    "opt": opt,
    "falcon": falcon,
    "bert": bert(r"(?:bert\.)?"),
    "roberta": bert(r"(?:roberta\.)?"),
    "t5": T5,
    "mixtral": Family("moe decoder", (decoder(parts=_moe_parts("num_local_experts")),), "text"),
    "qwen2_moe": Family("moe decoder", (decoder(parts=_moe_parts("num_experts", shared=True)),), "text"),
    "qwen3_moe": Family("moe decoder", (decoder(parts=_moe_parts("num_experts")),), "text"),
    "siglip": Family("siglip (both towers)", (
        siglip(r"vision_model\."),
        StackPlan("text", r"text_model\.", "encoder.layers", SIGLIP_PARTS,
                  (("embeddings", "embed"), ("final_layer_norm", "final_norm"), ("head", "pooled")), None),
    ), "image", logits=None, fixed_text=8),
}
# No attention or KV structure the probe knows: refused before the weights load, with why.
SSM = "a state-space model (selective scan, no attention or KV cache)"
RECURRENT = "a recurrent model (no attention or KV cache)"
HYBRID = "a hybrid whose layers mix attention with state-space or recurrent blocks"
REFUSED: dict[str, str] = {
    **dict.fromkeys(("mamba", "mamba2", "falcon_mamba"), SSM),
    **dict.fromkeys(("rwkv", "xlstm"), RECURRENT),
    **dict.fromkeys(("jamba", "zamba", "zamba2", "bamba", "falcon_h1", "granitemoehybrid", "nemotron_h",
                     "recurrent_gemma", "lfm2", "qwen3_next"), HYBRID),
}
SSM_CONFIG_KEYS = ("ssm_state_size", "state_size", "mamba_d_state", "time_step_rank")  # an undeclared SSM's config


def qkv_split(config) -> tuple[tuple[str, int], ...]:
    """Sizes of q, k and v in a fused projection's output, from the (text) config."""
    heads = config.num_attention_heads
    kv_heads = getattr(config, "num_key_value_heads", None) or heads
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // heads
    return (("q", heads * head_dim), ("k", kv_heads * head_dim), ("v", kv_heads * head_dim))


def _width(flat: int | str, config) -> int | None:
    if isinstance(flat, int):
        return flat
    for attr in flat.split("|"):
        value = getattr(config, attr, None)
        if isinstance(value, int) and value > 0:
            return value
    return None


def _split(part: Part, config) -> tuple[tuple[str, int], ...]:
    if part.split_qkv is True:
        return qkv_split(config)
    return tuple(part.split_qkv(config)) if callable(part.split_qkv) else ()


def rules_for(family: Family, text_config) -> tuple[TapRule, ...]:
    rules: list[TapRule] = []
    for plan in family.stacks:
        if plan.layers:
            base = plan.root + re.escape(plan.layers) + r"\.(?P<layer>\d+)"
            for part in plan.parts:
                pattern = base + (r"\." + re.escape(part.path) if part.path else "")
                split = _split(part, text_config)
                layout = plan.layout
                if part.flat is not None and layout is not None:
                    width = _width(part.flat, text_config)
                    if width is None:
                        continue  # the config has no such module (e.g. no experts)
                    layout = f"{FLAT}{width}"
                groups = int(text_config.num_attention_heads) if part.per_head and split else 1
                rules.append(TapRule(pattern, plan.stack, None if split else part.component, layout,
                                     select=0, on=part.on, split=split, token_axis=part.token_axis,
                                     split_groups=groups))
        for path, component, *on in plan.extras:
            rules.append(TapRule(plan.root + re.escape(path), plan.stack, component, plan.layout, select=0,
                                 on=on[0] if on else ON_OUTPUT))
    if family.logits:
        layout = TOKENS if family.inputs != "image" else None
        rules.append(TapRule(family.logits, "output", "logits", layout, select=0))
    return tuple(rules)


ENTRY_POINT_GROUP = "parity.hf_families"  # model_type -> a Family, or a callable returning one
_LLAMA_LAYERS = re.compile(r"(?:model\.)?layers\.\d+\.self_attn\.q_proj")


def _entry_points(group: str, entry_points=None):
    if entry_points is None:
        import importlib.metadata

        entry_points = importlib.metadata.entry_points
    return entry_points(group=group)


def user_family(model_type: str, entry_points=None) -> tuple[FamilyEntry, str] | None:
    """(what the `parity.hf_families` entry point named `model_type` holds, where it is), or
    None.  Only that entry point is loaded; one that cannot be is a one-line ValueError.
    `entry_points`: importlib.metadata.entry_points or a stand-in (tests)."""
    for ep in _entry_points(ENTRY_POINT_GROUP, entry_points):
        if ep.name != model_type:
            continue
        where = f"entry point {ENTRY_POINT_GROUP}:{ep.name} ({ep.value})"
        try:
            return ep.load(), where
        except Exception as exc:  # noqa: BLE001 - a user's plugin: one line, whatever it raised
            text = next((line.strip() for line in str(exc).splitlines() if line.strip()), "")
            raise ValueError(f"{where} cannot be loaded: {type(exc).__name__}" + (f": {text}" if text else "")) \
                from None
    return None


def resolve(entry: FamilyEntry, config, where: str) -> Family:
    """The Family an entry stands for: itself, or a callable's result (called with the
    model's text config when it takes an argument, else with none)."""
    if isinstance(entry, Family):
        return entry
    if not callable(entry):
        raise ValueError(f"{where} is a {type(entry).__name__}, not a Family or a callable returning one")
    try:
        params = [p for p in inspect.signature(entry).parameters.values()
                  if p.kind in (p.POSITIONAL_ONLY, p.POSITIONAL_OR_KEYWORD, p.VAR_POSITIONAL)]
    except (TypeError, ValueError):
        params = [None]
    try:
        family = entry(config) if params else entry()
    except Exception as exc:  # noqa: BLE001 - a user's callable: one line
        text = next((line.strip() for line in str(exc).splitlines() if line.strip()), "")
        raise ValueError(f"{where} raised {type(exc).__name__}" + (f": {text}" if text else "")) from None
    if not isinstance(family, Family):
        raise ValueError(f"{where} returned {type(family).__name__}, not a Family")
    return family


def declared(model_type: str, config=None, entry_points=None) -> tuple[Family, str] | None:
    """(Family, how it is named in the run's metadata) of a declared model_type: a user's
    entry point first (it may replace a bundled family), then `FAMILIES`; None if neither."""
    found = user_family(model_type, entry_points)
    if found is not None:
        family = resolve(found[0], config, found[1])
        return family, f"{family.name} ({found[1]})"
    if model_type in FAMILIES:
        family = resolve(FAMILIES[model_type], config, f"families.FAMILIES[{model_type!r}]")
        return family, family.name
    return None


def refusal(model_type: str, config=None) -> str | None:
    """Why a model_type has no probe, known from its name or config alone, or None."""
    if model_type in REFUSED:
        return (f"model_type {model_type!r} is {REFUSED[model_type]}: parity's hf probe has no attention/KV "
                "structure to tap in it (declare your own family, or pass your own package.module:factory)")
    keys = [k for k in SSM_CONFIG_KEYS if getattr(config, k, None) is not None] if config is not None else []
    if keys:
        return (f"model_type {model_type!r} is not declared and its config has a state-space size ({keys[0]}): "
                "no attention/KV structure the probe knows (declare your own family, or pass your own "
                "package.module:factory)")
    return None


def family_for(model_type: str, module_names: list[str], config=None, entry_points=None) -> tuple[Family, str]:
    """The declared family of a model_type; an undeclared one that has Llama-style decoder
    layers gets the generic decoder rules (said so in the second value)."""
    found = declared(model_type, config, entry_points)
    if found is not None:
        return found
    why = refusal(model_type, config)
    if why is not None:
        raise ValueError(why)
    if any(_LLAMA_LAYERS.fullmatch(n) for n in module_names):
        return DECODER, f"{GENERIC} (model_type {model_type!r} is not declared)"
    known = ", ".join(sorted(FAMILIES))
    raise ValueError(f"no parity probe for model_type {model_type!r}; declared: {known} "
                     f"(declare one through the {ENTRY_POINT_GROUP} entry points, or pass your own "
                     "package.module:factory)")


def probe_for(model, model_type: str, text_config, entry_points=None) -> tuple[Probe, Family, str]:
    names = [n for n, _ in model.named_modules()]
    family, how = family_for(model_type, names, text_config, entry_points)
    probe = Probe(arch=f"hf/{model_type}", rules=rules_for(family, text_config))
    if not any(probe.taps_for(n) for n in names):
        raise ValueError(f"the {family.name} probe finds no taps in this {model_type} model "
                         "(module names differ from the declared ones)")
    return probe, family, how


def flat_layout(layout: Layout, width: int) -> Layout:
    """The layout of a [rows * slots, width] tensor (an MoE router's logits: transformers
    flattens the tokens before routing) from the tokens' [rows, slots] layout: one slot per
    (token, feature) pair, canonical index token * width + feature, padding don't-care."""
    flat = layout.slots.reshape(-1, 1)
    slots = np.where(flat >= 0, flat * width + np.arange(width, dtype=np.int64), -1)
    regions = tuple(Region(r.name, r.start * width, r.stop * width) for r in layout.regions)
    return Layout(slots.astype(np.int64), layout.length * width, regions)
