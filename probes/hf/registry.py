"""What backend.py asks of the declared families, before and after the model loads.

Three hooks, each a plain function of data backend.py already has:

  check_family(model_type, config, weight_names)
      BEFORE the weights load (in `load_model`, after `AutoConfig.from_pretrained`, before
      `cls.from_pretrained`): declared, generic fallback, or refused, with a one-line
      reason.  `FamilyCheck.refuse()` raises the ValueError backend.py turns into exit 2.
  family_inputs(family, config, kwargs, seed)
      AFTER the model's keyword arguments are built (in `factory`, before `run` is
      defined): what the family needs beyond input_ids / attention_mask / position_ids /
      pixel_values (T5's decoder_input_ids, no position ids; SiglipModel's text tower).
  family_layouts(probe, layout)
      where `factory` builds `layouts=`: the flat token layouts of the MoE router and
      expert taps, next to `TOKENS`.

  float64_experts(model)    after `load_model` returns, and
  eager_experts(model)      around the float64 oracle run (inside `_widened`, with `upcast`):
      transformers 5.x runs MoE experts through torch's grouped_mm by default, which refuses
      float64 on the CPU ("Expected mat_a to be Float32, BFloat16 or Float16 matrix, got
      Double"): a `dtype=float64` MoE model, or the oracle run of any MoE model, switches
      to transformers' eager experts (the same math, a loop over experts).

family_inputs and family_layouts are idempotent, so a wrapper calling them again changes
nothing.
"""
from __future__ import annotations

import contextlib
import re
from collections.abc import Iterable, Iterator
from dataclasses import dataclass

import numpy as np

from parity.probes.hf.families import (
    _LLAMA_LAYERS,
    ENTRY_POINT_GROUP,
    FAMILIES,
    FLAT,
    GENERIC,
    Family,
    declared,
    flat_layout,
    refusal,
)
from parity.taps.records import Layout

DECLARED, FALLBACK, REFUSED = "declared", "generic", "refused"


@dataclass(frozen=True)
class FamilyCheck:
    """The verdict on a model_type before its weights load."""

    verdict: str  # DECLARED | FALLBACK | REFUSED
    name: str | None  # the family's name (GENERIC for the fallback); None when refused
    reason: str  # one line

    @property
    def ok(self) -> bool:
        return self.verdict != REFUSED

    def refuse(self) -> None:
        """Raise the refusal as the one-line ValueError backend.py reports (exit 2)."""
        if not self.ok:
            raise ValueError(self.reason)


def module_names(weight_names: Iterable[str]) -> set[str]:
    """The modules that hold the checkpoint's tensors: `a.b.weight` -> `a.b`, and every
    module above it."""
    names: set[str] = set()
    for key in weight_names:
        parts = key.split(".")[:-1]
        names.update(".".join(parts[: i + 1]) for i in range(len(parts)))
    return names


def check_family(model_type: str, config=None, weight_names: Iterable[str] = (), entry_points=None) -> FamilyCheck:
    """Declared, generic fallback, or refused: from the config and the checkpoint's tensor
    names alone, before any weight is read.

    Declared: `model_type` has a `parity.hf_families` entry point or is in `FAMILIES`
    (nothing else is needed).  Refused: a state-space, recurrent or hybrid model_type
    (`families.REFUSED`), or an undeclared one whose config has a state-space size.  The
    generic fallback cannot be told from a config (any architecture can call itself
    anything): it is decided from the tensor names in the safetensors headers (backend.py's
    `weight_shapes`, read without loading data): a `[model.]layers.N.self_attn.q_proj`
    module means Llama-style decoder layers, the same test `family_for` makes on the built
    model.  `config`: the loaded (transformers) config, for families that depend on it
    and for the state-space test; its text config is used, as `probe_for` uses it."""
    text = config.get_text_config() if hasattr(config, "get_text_config") else config
    try:
        found = declared(model_type, text, entry_points)
    except ValueError as exc:  # a user's entry point that cannot be loaded or returns no Family
        return FamilyCheck(REFUSED, None, str(exc))
    if found is not None:
        family, how = found
        return FamilyCheck(DECLARED, family.name, f"model_type {model_type!r}: declared ({how})")
    why = refusal(model_type, config) or (refusal(model_type, text) if text is not config else None)
    if why is not None:
        return FamilyCheck(REFUSED, None, why)
    names = module_names(weight_names)
    if any(_LLAMA_LAYERS.fullmatch(n) for n in names):
        return FamilyCheck(FALLBACK, GENERIC, f"model_type {model_type!r} is not declared: the {GENERIC} rules "
                                              "(its weights have Llama-style layers.N.self_attn.q_proj)")
    known = ", ".join(sorted(FAMILIES))
    return FamilyCheck(REFUSED, None, f"no parity probe for model_type {model_type!r}: not declared ({known}), and "
                                      "its weights have no Llama-style layers.N.self_attn.q_proj (declare one "
                                      f"through the {ENTRY_POINT_GROUP} entry points, or pass your own "
                                      "package.module:factory)")


def family_inputs(family: Family, config, kwargs: dict, seed: int = 0) -> dict:
    """`kwargs` (the model's keyword arguments, as backend.py builds them) completed for
    `family`, in place, and returned:

    * `position_ids=False` (T5): position ids are dropped; the model takes none.
    * `decoder_inputs` (T5): the decoder reads the encoder's rows, teacher-forced:
      decoder_input_ids = input_ids, decoder_attention_mask = attention_mask.  So one
      token layout (`TOKENS`) covers the encoder, the decoder and the cross-attention's
      keys and values, and padding is don't-care in all of them.
    * `fixed_text` (SiglipModel fed images): both towers run in its forward, so its text
      tower gets `fixed_text` tokens per image, drawn from `seed`, unpadded (its taps
      are compared as whole tensors: no padding to leave out).
    Calling it twice changes nothing."""
    if not family.position_ids:
        kwargs.pop("position_ids", None)
    if family.decoder_inputs and "input_ids" in kwargs:
        kwargs.setdefault("decoder_input_ids", kwargs["input_ids"])
        if "attention_mask" in kwargs:
            kwargs.setdefault("decoder_attention_mask", kwargs["attention_mask"])
    if family.fixed_text and "input_ids" not in kwargs and "pixel_values" in kwargs:
        import torch

        text = getattr(config, "text_config", None) or config
        pixels = kwargs["pixel_values"]
        length = min(family.fixed_text, getattr(text, "max_position_embeddings", None) or family.fixed_text)
        ids = np.random.default_rng(seed).integers(0, text.vocab_size, size=(pixels.shape[0], length))
        kwargs["input_ids"] = torch.from_numpy(ids.astype(np.int64)).to(pixels.device)
    return kwargs


_FLAT = re.compile(re.escape(FLAT) + r"(\d+)")


def family_layouts(probe, layout: Layout | None) -> dict[str, Layout]:
    """The flat token layouts the probe's rules use (`tokens_flat<width>`: MoE routers and
    experts, which see the tokens flattened), built from the tokens' layout; {} when the
    run has no token layout or the probe uses none."""
    if layout is None:
        return {}
    out: dict[str, Layout] = {}
    for rule in probe.rules:
        m = _FLAT.fullmatch(rule.layout or "")
        if m and rule.layout not in out:
            out[rule.layout] = flat_layout(layout, int(m.group(1)))
    return out


def _experts(model) -> str | None:
    impl = getattr(getattr(model, "config", None), "_experts_implementation", None)
    return impl if callable(getattr(model, "set_experts_implementation", None)) else None


def float64_experts(model) -> bool:
    """A float64 MoE model's experts switched to transformers' eager path (its default,
    grouped_mm, refuses float64 on the CPU); whether it switched."""
    import torch

    impl = _experts(model)
    if impl is None or impl == "eager" or getattr(model, "dtype", None) != torch.float64:
        return False
    model.set_experts_implementation("eager")
    return True


@contextlib.contextmanager
def eager_experts(model) -> Iterator[None]:
    """The model's MoE experts on transformers' eager path meanwhile (parity's float64
    oracle run), put back afterwards; a model without experts is left alone."""
    impl = _experts(model)
    switch = impl is not None and impl != "eager"
    if switch:
        try:
            model.set_experts_implementation("eager")
        except (ValueError, RuntimeError, AttributeError):
            switch = False
    try:
        yield
    finally:
        if switch:
            model.set_experts_implementation(impl)
