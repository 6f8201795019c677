"""Which key of a pi0.5 checkpoint holds which of our parameters, declared as data.

Two layouts (spec section 6):

- `openpi`: openpi's PyTorch export (`examples/convert_jax_model_to_pytorch.py`):
  `paligemma_with_expert.paligemma.model.{vision_tower.vision_model, multi_modal_projector,
  language_model}.*`, `paligemma_with_expert.gemma_expert.model.*` and top-level
  `action_in_proj` / `action_out_proj` / `time_mlp_in` / `time_mlp_out`.  Weights are
  already [out, in] like nn.Linear: no transposes.  The converter saves with
  `safetensors.torch.save_model`, which keeps one name of a tied pair: the text embedding
  may be stored as PaliGemma's `lm_head.weight`; the action expert's unused
  `lm_head.weight` is saved too.
- `lerobot`: the same keys under `model.`, read the way lerobot's key fixer reads them:
  `action_time_mlp_*` is `time_mlp_*`, `state_proj.*` and the expert's plain norm weights
  (pi0 leftovers; pi0.5's expert uses adaRMS) are dropped.

Unknown keys are never silently skipped: only the keys declared unused here are, and
the loader reports them.
"""
from __future__ import annotations

import re
from collections.abc import Mapping
from dataclasses import dataclass, field
from string import Formatter
from types import MappingProxyType

OPENPI, LEROBOT = "openpi", "lerobot"
LEROBOT_PREFIX = "model."
ROOT = "paligemma_with_expert."

_V = "paligemma_with_expert.paligemma.model.vision_tower.vision_model."
_L = "paligemma_with_expert.paligemma.model.language_model."
_E = "paligemma_with_expert.gemma_expert.model."

# What a {placeholder} in the key templates below may stand for.
SLOTS: Mapping[str, str] = MappingProxyType({
    "i": r"\d+", "wb": "weight|bias", "qkv": "q|k|v", "qkvo": "q|k|v|o", "fc": "fc1|fc2", "mlp": "gate|up|down",
    "io": "in|out", "norm": "input_layernorm|post_attention_layernorm",
    "top": "action_in_proj|action_out_proj|time_mlp_in|time_mlp_out"})

# (file key, our parameter name): both directions, the first match wins.
RULES: tuple[tuple[str, str], ...] = (
    (_V + "embeddings.patch_embedding.{wb}", "vision.patch_embedding.{wb}"),
    (_V + "embeddings.position_embedding.weight", "vision.position_embedding"),  # nn.Embedding -> Parameter
    (_V + "encoder.layers.{i}.layer_norm1.{wb}", "vision.layers.{i}.input_norm.{wb}"),
    (_V + "encoder.layers.{i}.layer_norm2.{wb}", "vision.layers.{i}.post_attn_norm.{wb}"),
    (_V + "encoder.layers.{i}.self_attn.{qkv}_proj.{wb}", "vision.layers.{i}.self_attn.{qkv}_proj.{wb}"),
    (_V + "encoder.layers.{i}.self_attn.out_proj.{wb}", "vision.layers.{i}.self_attn.o_proj.{wb}"),
    (_V + "encoder.layers.{i}.mlp.{fc}.{wb}", "vision.layers.{i}.mlp.{fc}.{wb}"),
    (_V + "post_layernorm.{wb}", "vision.post_norm.{wb}"),
    ("paligemma_with_expert.paligemma.model.multi_modal_projector.linear.{wb}", "projector.{wb}"),
    (_L + "embed_tokens.weight", "embed_tokens.weight"),
    (_L + "layers.{i}.input_layernorm.weight", "prefix.layers.{i}.input_norm.weight"),
    (_L + "layers.{i}.post_attention_layernorm.weight", "prefix.layers.{i}.post_attn_norm.weight"),
    (_L + "layers.{i}.self_attn.{qkvo}_proj.weight", "prefix.layers.{i}.self_attn.{qkvo}_proj.weight"),
    (_L + "layers.{i}.mlp.{mlp}_proj.weight", "prefix.layers.{i}.mlp.{mlp}_proj.weight"),
    (_L + "norm.weight", "prefix.final_norm.weight"),
    (_E + "layers.{i}.input_layernorm.dense.{wb}", "expert.layers.{i}.input_norm.dense.{wb}"),
    (_E + "layers.{i}.post_attention_layernorm.dense.{wb}", "expert.layers.{i}.post_attn_norm.dense.{wb}"),
    (_E + "layers.{i}.self_attn.{qkvo}_proj.weight", "expert.layers.{i}.self_attn.{qkvo}_proj.weight"),
    (_E + "layers.{i}.mlp.{mlp}_proj.weight", "expert.layers.{i}.mlp.{mlp}_proj.weight"),
    (_E + "norm.dense.{wb}", "expert.final_norm.dense.{wb}"),
    ("{top}.{wb}", "{top}.{wb}"),
)

# Read only when the primary key is absent: (file key, our name, why it holds that parameter).
ALIASES: tuple[tuple[str, str, str], ...] = (
    ("paligemma_with_expert.paligemma.lm_head.weight", "embed_tokens.weight",
     "PaliGemma's LM head, tied to the text embedding (save_model kept this name of the pair)"),
)

# Present in real checkpoints, used by nothing at inference: (file key, why).
_OPENPI_UNUSED = (
    ("paligemma_with_expert.gemma_expert.lm_head.weight", "the action expert's LM head: unused by flow matching"),
    ("paligemma_with_expert.paligemma.lm_head.weight", "PaliGemma's LM head: unused at inference"),
)
UNUSED: Mapping[str, tuple[tuple[str, str], ...]] = MappingProxyType({
    OPENPI: _OPENPI_UNUSED,
    LEROBOT: _OPENPI_UNUSED + (
        (_E + "layers.{i}.{norm}.weight",
         "plain norm weight of the action expert: pi0.5 uses adaRMS (lerobot drops it)"),
        (_E + "norm.weight", "plain final norm weight of the action expert: pi0.5 uses adaRMS (lerobot drops it)"),
        ("state_proj.{wb}", "pi0's state projection: pi0.5 has none (lerobot drops it)"),
    ),
})

# lerobot's renames (file key -> the openpi key it stands for), applied before RULES.
RENAMES: Mapping[str, tuple[tuple[str, str], ...]] = MappingProxyType({
    OPENPI: (),
    LEROBOT: (("action_time_mlp_{io}.{wb}", "time_mlp_{io}.{wb}"),),
})


def _regex(template: str) -> re.Pattern:
    """A key template's regex: literal text escaped, each {slot} a named group (the re
    module caches compiled patterns)."""
    parts = []
    for literal, slot, _, _ in Formatter().parse(template):
        parts.append(re.escape(literal))
        if slot is not None:
            parts.append(f"(?P<{slot}>{SLOTS[slot]})")
    return re.compile("".join(parts))


def _translate(key: str, pairs, forward: bool = True) -> str | None:
    """Rewrite `key` by the first (from, to) template pair it matches (to, from if not forward)."""
    for a, b in pairs:
        src, dst = (a, b) if forward else (b, a)
        m = _regex(src).fullmatch(key)
        if m:
            return dst.format(**m.groupdict())
    return None


def _matches(key: str, templates) -> str | None:
    """The reason of the first (template, why) pair that `key` matches."""
    return next((why for t, why in templates if _regex(t).fullmatch(key)), None)


def file_key(name: str, layout: str) -> str | None:
    """The key a checkpoint of `layout` stores our parameter `name` under (the current
    name, not a legacy one that RENAMES also accepts)."""
    key = _translate(name, RULES, forward=False)
    if key is None:
        return None
    return LEROBOT_PREFIX + key if layout == LEROBOT else key


def natural(name: str) -> tuple:
    """Sort key that puts layer 2 before layer 10."""
    return tuple(int(part) if part.isdigit() else part for part in re.split(r"(\d+)", name))


PI0_HINT_KEYS = ("state_proj.weight", "action_time_mlp_in.weight")


@dataclass
class KeyMap:
    """The result of reading a checkpoint's key list against a layout."""

    layout: str
    sources: dict[str, str] = field(default_factory=dict)  # our name -> file key
    unused: dict[str, str] = field(default_factory=dict)  # file key -> why it is not loaded
    notes: list[str] = field(default_factory=list)  # aliases read, one line each
    problems: list[str] = field(default_factory=list)  # unexpected / duplicate keys, one line each


def detect_layout(keys: list[str]) -> str:
    """openpi or lerobot, from the key prefixes; ValueError if neither or both."""
    lerobot = sum(k.startswith(LEROBOT_PREFIX + ROOT) for k in keys)
    openpi = sum(k.startswith(ROOT) for k in keys)
    if lerobot and openpi:
        raise ValueError(f"checkpoint mixes layouts: {openpi} keys start with {ROOT!r} (openpi) and {lerobot} with "
                         f"{LEROBOT_PREFIX + ROOT!r} (lerobot)")
    if not (lerobot or openpi):
        sample = ", ".join(sorted(keys)[:3]) or "no keys at all"
        raise ValueError(f"not a pi0.5 checkpoint: no key starts with {ROOT!r} or {LEROBOT_PREFIX + ROOT!r} "
                         f"(first keys: {sample})")
    return LEROBOT if lerobot else OPENPI


def map_keys(keys: list[str]) -> KeyMap:
    """Our parameter name for every key of the file, the declared-unused keys, and a
    line per unexpected or duplicated key."""
    layout = detect_layout(keys)
    out = KeyMap(layout)
    aliases = {alias: (name, why) for alias, name, why in ALIASES}
    aliased: list[tuple[str, str]] = []
    for stored in sorted(keys, key=natural):
        key = stored
        if layout == LEROBOT:
            if not key.startswith(LEROBOT_PREFIX):
                out.problems.append(f"unexpected key {stored} (lerobot keys start with {LEROBOT_PREFIX!r})")
                continue
            key = key[len(LEROBOT_PREFIX):]
        key = _translate(key, RENAMES[layout]) or key
        name = _translate(key, RULES)
        if name is not None:
            if name in out.sources:
                out.problems.append(f"two keys for {name}: {out.sources[name]} and {stored}")
            else:
                out.sources[name] = stored
        elif key in aliases:
            aliased.append((stored, key))
        elif (why := _matches(key, UNUSED[layout])) is not None:
            out.unused[stored] = why
        else:
            out.problems.append(f"unexpected key {stored}")
    for stored, key in aliased:  # after the loop: only where the primary key is absent
        name, why = aliases[key]
        if name in out.sources:
            out.unused[stored] = _matches(key, UNUSED[layout]) or "unused"
        else:
            out.sources[name] = stored
            out.notes.append(f"{name} read from {stored}: {why}")
    if layout == OPENPI and any(k in keys for k in PI0_HINT_KEYS):
        out.problems.append("hint: state_proj / action_time_mlp_* are pi0 keys: this looks like a pi0 checkpoint, "
                            "not pi0.5")
    return out
