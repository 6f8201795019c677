"""The pi0.5 module tree practitioners run (openpi's PyTorch port `PI0Pytorch`, lerobot's
`PI05Pytorch` inside `PI05Policy`), mapped to the bundled reference's canonical taps.

Both trees hold, under one root (`""` for openpi's `PI0Pytorch` and lerobot's
`PI05Pytorch`, `"model."` for lerobot's `PI05Policy`):

    paligemma_with_expert.paligemma.model.vision_tower[.vision_model].{embeddings,
        encoder.layers.N.{layer_norm1, self_attn.{q,k,v,out}_proj, layer_norm2, mlp},
        post_layernorm}
    paligemma_with_expert.paligemma.model.multi_modal_projector
    paligemma_with_expert.paligemma.model.language_model.layers.N.{input_layernorm,
        self_attn.{q,k,v,o}_proj, post_attention_layernorm, mlp}
    paligemma_with_expert.gemma_expert.model.{layers.N.(as above, adaRMS norms), norm}
    action_in_proj, action_out_proj, time_mlp_in, time_mlp_out

`TREE` says, as data, which module gives which tap.  A `direct` source is an ordinary
probe rule on the user's module.  A `view` source is a value the tree computes but no
module of it returns in the reference's shape; a hook on the user's module hands it to a
parity-owned `TapPoint` (`views.<stack>_<layer>_<component>`), which the probe taps:

- `heads`: a q/k/v projection's output split into heads, [B, T, H, D] as the reference
  taps it;
- `rope`: the same, rotated (half-split, in float32, cast once) by the cos/sin tables the
  tree's attention module was given (`position_embeddings`): the tree's own RoPE
  positions and tables, the reference's rotation arithmetic;
- `hidden`: a layer's input hidden states (the stack's embedding, as it enters layer 0);
- `cond`: the time condition an adaRMS norm is given (its `cond` argument);
- `plain`: the module's output (or input) as it is.

The vision tower runs once per camera in both trees, so every vision tap is a view that
gathers the per-camera calls (rows camera-major) before it is tapped.
"""
from __future__ import annotations

import re
from dataclasses import dataclass

from parity.taps.probe import Probe, TapRule

N = r"(?P<layer>\d+)"
PWE = r"paligemma_with_expert\."
# transformers 4.x (openpi) has SiglipVisionModel.vision_model; 5.x flattens it away
V = PWE + r"paligemma\.model\.vision_tower\.(?:vision_model\.)?"
L = PWE + r"paligemma\.model\.language_model\."
E = PWE + r"gemma_expert\.model\."
VIEWS = "views"  # the wrapper's child holding the view TapPoints
TREE_CHILD = "tree"  # the wrapper's child holding the user's model


@dataclass(frozen=True)
class Source:
    """One tap of the tree: `pattern` (a regex over module names under the tree's root,
    with a `layer` group for per-layer taps) gives `stack`.`component`."""

    pattern: str
    stack: str
    component: str
    kind: str = "direct"  # direct | view
    how: str = "plain"  # for views: plain | heads | rope | hidden | cond
    on: str = "output"  # output | input
    select: int | None = None
    layout: str | None = None
    stepped: bool = False
    gather: bool = False  # vision: the per-camera calls are gathered into one tap


def _gemma(base: str, stack: str, layout: str, stepped: bool) -> tuple[Source, ...]:
    """A Gemma stack's per-layer taps (the norms return (output, gate): element 0)."""
    layer = base + rf"layers\.{N}\."
    kw = dict(layout=layout, stepped=stepped)
    return (
        Source(layer + "input_layernorm", stack, "input_norm", select=0, **kw),
        Source(layer + r"self_attn\.q_proj", stack, "q", kind="view", how="rope", **kw),
        Source(layer + r"self_attn\.k_proj", stack, "k", kind="view", how="rope", **kw),
        Source(layer + r"self_attn\.v_proj", stack, "v", kind="view", how="heads", **kw),
        Source(layer + r"self_attn\.o_proj", stack, "attn", on="input", **kw),
        Source(layer + r"self_attn\.o_proj", stack, "o_proj", **kw),
        Source(layer + "post_attention_layernorm", stack, "post_attn_norm", select=0, **kw),
        Source(layer + "mlp", stack, "mlp", **kw),
    )


def _vision() -> tuple[Source, ...]:
    layer = V + rf"encoder\.layers\.{N}\."
    kw = dict(kind="view", layout="vision", gather=True)
    return (
        Source(V + "embeddings", "vision", "embed", **kw),
        Source(layer + "layer_norm1", "vision", "input_norm", **kw),
        Source(layer + r"self_attn\.q_proj", "vision", "q", how="heads", **kw),
        Source(layer + r"self_attn\.k_proj", "vision", "k", how="heads", **kw),
        Source(layer + r"self_attn\.v_proj", "vision", "v", how="heads", **kw),
        Source(layer + r"self_attn\.out_proj", "vision", "attn", on="input", **kw),
        Source(layer + r"self_attn\.out_proj", "vision", "o_proj", **kw),
        Source(layer + "layer_norm2", "vision", "post_attn_norm", **kw),
        Source(layer + "mlp", "vision", "mlp", **kw),
        Source(V + "post_layernorm", "vision", "final_norm", **kw),
        Source(PWE + r"paligemma\.model\.multi_modal_projector", "vision", "projector", **kw),
    )


TREE: tuple[Source, ...] = (
    *_vision(),
    Source(L + r"layers\.0", "prefix", "embed", kind="view", how="hidden", on="input", layout="prefix"),
    *_gemma(L, "prefix", "prefix", stepped=False),
    Source(E + r"layers\.0\.input_layernorm", "expert", "time", kind="view", how="cond", on="input", stepped=True),
    Source(E + r"layers\.0", "expert", "embed", kind="view", how="hidden", on="input", layout="actions",
           stepped=True),
    *_gemma(E, "expert", "actions", stepped=True),
    Source(E + "norm", "expert", "final_norm", select=0, layout="actions", stepped=True),
    Source(r"action_out_proj", "expert", "velocity", layout="actions", stepped=True),
)

# The sampler's result, tapped by the wrapper: no module of the tree returns it.
ACTIONS = TapRule(r"actions", "output", "actions", layout="actions")


def view_key(source: Source, layer: int | None) -> str:
    """The name of a view's TapPoint under the wrapper's `views`."""
    return f"{source.stack}_{layer}_{source.component}" if layer is not None else f"{source.stack}_{source.component}"


def _view_rule(source: Source) -> TapRule:
    layer = r"_(?P<layer>\d+)" if "(?P<layer>" in source.pattern else ""
    return TapRule(rf"{VIEWS}\.{source.stack}{layer}_{source.component}", source.stack, source.component,
                   layout=source.layout, stepped=source.stepped)


def probe_for(root: str) -> Probe:
    """The probe of a wrapped tree whose `paligemma_with_expert` sits under `root` ("" or
    "model.", ...): direct rules on the user's modules, the views' rules on parity's."""
    base = rf"{TREE_CHILD}\." + re.escape(root)
    rules = []
    for s in TREE:
        if s.kind == "view":
            rules.append(_view_rule(s))
        else:
            rules.append(TapRule(base + s.pattern, s.stack, s.component, layout=s.layout, stepped=s.stepped,
                                 select=s.select, on=s.on))
    rules.append(ACTIONS)
    return Probe(arch="pi05", rules=tuple(rules), default_stack="prefix", drift_taps="prefix.*.k")
