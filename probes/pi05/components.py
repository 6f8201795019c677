"""pi0.5 component adapters: how to run one part of a SigLIP or Gemma layer on its own.

A layer is a fixed sequence of steps over named values (x -> input_norm -> project -> rope
-> attention core -> o_proj -> residual -> post_attn_norm -> mlp -> residual).  Running a
part means running only its steps on values someone else supplies (the reference's,
moved into this backend's token layout); everything else a step needs (masks, RoPE
tables, the time condition, cached prefix K/V) is the backend's own, taken from the
layer call it really made.  The same steps, run on the reference, give the reference's
values.  Every backend's modules go through their own code (fused q|k|v, FP8 MLPs,
packed tokens): only the values are swapped.

`alternatives` are what known bug classes would compute, for the hint rules of
`parity.comparison.isolate`: they are pi0.5 knowledge, the rules that use them are not.

`STAGES` are the code between the layers, each a method of `Pi05Policy` re-run like a
part (`parity.comparison.isolate.StageAdapter`): the prefix embedding assembly
(`embed_prefix`, fed the reference's projector output), the prefix-to-expert K/V cache
handoff (`prefix_cache`, fed the reference's per-layer K/V), and per denoise step the
time embedding, the action in/out projections and the Euler step.  A backend that
overrides one of these methods (a subclass, or a method set on its instance) has its
own version re-run.  An attention re-run reads the candidate's own K/V cache (`kept`);
where a value read comes from outside its stream is `origin`.
"""
from __future__ import annotations

import inspect
from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from parity.comparison.isolate import IsolationError, Origin
from parity.probes.pi05.layers import AdaRMSNorm, AttnContext, GatedMLP, RMSNorm


@dataclass(frozen=True)
class Step:
    name: str
    inputs: tuple[str, ...]
    outputs: tuple[str, ...]


STEPS = (
    Step("input_norm", ("x",), ("h1", "gate1")),
    Step("project", ("h1",), ("q_pre", "k_pre", "v")),
    Step("rope", ("q_pre", "k_pre"), ("q", "k")),
    Step("attn", ("q", "k", "v", "prefix_k", "prefix_v"), ("attn",)),
    Step("o_proj", ("attn",), ("o",)),
    Step("residual1", ("x", "o", "gate1"), ("x2",)),
    Step("post_attn_norm", ("x2",), ("h2", "gate2")),
    Step("mlp", ("h2",), ("mlp",)),
    Step("residual2", ("x2", "mlp", "gate2"), ("out",)),
)
_STEP = {s.name: s for s in STEPS}

# part -> (its steps, {value compared: tap component it corresponds to})
PARTS: dict[str, tuple[tuple[str, ...], dict[str, str]]] = {
    "input_norm": (("input_norm",), {"h1": "input_norm"}),
    "qkv": (("project", "rope"), {"q": "q", "k": "k", "v": "v"}),
    "rope": (("rope",), {"q": "q", "k": "k"}),
    "attn": (("attn",), {"attn": "attn"}),
    "o_proj": (("o_proj",), {"o": "o_proj"}),
    "post_attn_norm": (("post_attn_norm",), {"h2": "post_attn_norm"}),
    "mlp": (("mlp",), {"mlp": "mlp"}),
    "layer": (tuple(s.name for s in STEPS), {"out": "layer"}),
}
WALK = ("input_norm", "qkv", "attn", "o_proj", "post_attn_norm", "mlp")
COMPONENT_PART = {"input_norm": "input_norm", "q": "qkv", "k": "qkv", "v": "qkv", "attn": "attn",
                  "o_proj": "o_proj", "post_attn_norm": "post_attn_norm", "mlp": "mlp"}
STACK_LAYOUT = {"vision": "vision", "prefix": "prefix", "expert": "actions"}


def _norm(norm, x, c, modulation):
    """Gemma norms return (output, gate); SigLIP's LayerNorm returns the output."""
    if isinstance(norm, RMSNorm):
        return norm(x, c["cond"], modulation)
    return norm(x), None


def _gated(x, y, gate):
    return x + (y if gate is None else y * gate)


def _context(module, args, kwargs) -> dict:
    """The layer call's arguments by name (SiglipLayer(x) or GemmaLayer(x, ctx, rope, ...))."""
    bound = inspect.signature(type(module).forward).bind(module, *args, **kwargs)
    bound.apply_defaults()
    a = bound.arguments
    prefix_kv = a.get("prefix_kv")
    return {"x": a["x"], "ctx": a.get("ctx", AttnContext()), "rope": a.get("rope"), "cond": a.get("cond"),
            "modulation": a.get("modulation", (None, None)),
            "prefix_k": None if prefix_kv is None else prefix_kv[0],
            "prefix_v": None if prefix_kv is None else prefix_kv[1]}


def _run_step(name: str, layer, c: dict, v: dict, core=None, scale=None, rope_interleaved=None) -> dict:
    attn = layer.self_attn
    if name == "input_norm":
        h, g = _norm(layer.input_norm, v["x"], c, c["modulation"][0])
        return {"h1": h, "gate1": g}
    if name == "project":
        q, k, val = attn.project(v["h1"])
        return {"q_pre": q, "k_pre": k, "v": val}
    if name == "rope":
        if c["rope"] is None:
            return {"q": v["q_pre"], "k": v["k_pre"]}
        inter = attn.rope_interleaved if rope_interleaved is None else rope_interleaved
        return {"q": attn.rope_fn(v["q_pre"], c["rope"], inter), "k": attn.rope_fn(v["k_pre"], c["rope"], inter)}
    if name == "attn":
        keys, values = v["k"], v["v"]
        if v.get("prefix_k") is not None:  # suffix queries attend to [cached prefix, own suffix]
            keys, values = torch.cat([v["prefix_k"], keys], dim=1), torch.cat([v["prefix_v"], values], dim=1)
        fn = core or attn.core
        return {"attn": fn(v["q"], keys, values, c["ctx"], attn.scale if scale is None else scale)}
    if name == "o_proj":
        return {"o": attn.o_proj(v["attn"])}
    if name == "residual1":
        return {"x2": _gated(v["x"], v["o"], v.get("gate1"))}
    if name == "post_attn_norm":
        h, g = _norm(layer.post_attn_norm, v["x2"], c, c["modulation"][1])
        return {"h2": h, "gate2": g}
    if name == "mlp":
        return {"mlp": layer.mlp(v["h2"])}
    if name == "residual2":
        return {"out": _gated(v["x2"], v["mlp"], v.get("gate2"))}
    raise ValueError(f"unknown step {name!r}")


class Pi05Components:
    """The `parity.comparison.isolate.ComponentAdapter` of pi0.5's three stacks."""

    layer_pattern = r"(?P<stack>vision|prefix|expert)\.layers\.(?P<layer>\d+)"
    stepped = frozenset({"expert"})

    def walk_parts(self, stack: str) -> tuple[str, ...]:
        return WALK

    def parts_for(self, stack: str) -> tuple[str, ...]:
        return tuple(p for p in PARTS if not (stack == "vision" and p == "rope"))  # SigLIP has no RoPE

    def part_of(self, component: str) -> str | None:
        return COMPONENT_PART.get(component)

    def inputs(self, part: str) -> tuple[str, ...]:
        steps, _ = PARTS[part]
        made: set[str] = set()
        needed: list[str] = []
        for name in steps:
            for value in _STEP[name].inputs:
                if value not in made and value not in needed:
                    needed.append(value)
            made.update(_STEP[name].outputs)
        return tuple(needed)

    def outputs(self, part: str) -> dict[str, str]:
        return dict(PARTS[part][1])

    def layout(self, stack: str, value: str) -> str:
        return "prefix" if value in ("prefix_k", "prefix_v") else STACK_LAYOUT[stack]

    def subparts(self, part: str) -> tuple[str, ...]:
        return ("rope",) if part == "qkv" else ()

    def kept(self, part: str) -> tuple[str, ...]:
        """An attention reads the candidate's own cache: a wrong cache is judged as read."""
        return ("prefix_k", "prefix_v") if "attn" in PARTS[part][0] else ()

    def origin(self, stack: str, layer: int, step: int | None, value: str) -> Origin | None:
        """The cached prefix K/V an expert attention reads come from the cache handoff."""
        return Origin(stack="prefix", part="kv_cache") if value in ("prefix_k", "prefix_v") else None

    @property
    def stages(self) -> tuple:
        return STAGES

    @torch.inference_mode()
    def run(self, module, args, kwargs, feed=None, part=None, until=None, **overrides) -> dict:
        """Named values of one layer call: all of them (part=None, until=None), those
        before `until`'s first step, or only `part`'s steps on `feed`."""
        c = _context(module, args, kwargs)
        values = {"x": c["x"], "prefix_k": c["prefix_k"], "prefix_v": c["prefix_v"], **(feed or {})}
        names = [s.name for s in STEPS]
        if part is not None:
            names = list(PARTS[part][0])
        elif until is not None:
            names = names[: names.index(PARTS[until][0][0])]
        for name in names:
            values.update(_run_step(name, module, c, values, **overrides))
        return values

    def alternatives(self, part: str, stack: str) -> list[tuple[str, Callable]]:
        """What a known bug computes on the reference's inputs, as (hint, fn)."""
        out: list[tuple[str, Callable]] = []

        def alt(step: str, **overrides):
            def fn(module, args, kwargs, values):
                return _run_step(step, module, _context(module, args, kwargs), values, **overrides)
            return fn

        if part == "attn":
            out.append(("attention ignores the padding/camera mask",
                        _unmasked))
            out.append(("attention logits scaled by 1/head_dim instead of 1/sqrt(head_dim)", _scale_by_dim))
        if part in ("qkv", "rope") and stack != "vision":
            out.append(("RoPE pairs interleaved channels (GPT-J style) instead of rotate_half",
                        _with_steps(("rope",), rope_interleaved=True) if part == "rope"
                        else _with_steps(("project", "rope"), rope_interleaved=True)))
        if part == "mlp":
            out.append(("wrong activation (SiLU vs GELU-tanh): matches a SiLU-gated MLP", _silu_mlp))
        if part in ("input_norm", "post_attn_norm"):
            out.append(("RMSNorm weight offset: scales by w instead of 1 + w", _plain_w_norm(part)))
        return out


def _with_steps(steps, **overrides):
    def fn(module, args, kwargs, values):
        c = _context(module, args, kwargs)
        v = dict(values)
        with torch.inference_mode():
            for s in steps:
                v.update(_run_step(s, module, c, v, **overrides))
        return {k: v[k] for s in steps for k in _STEP[s].outputs}
    return fn


@torch.inference_mode()
def _unmasked(module, args, kwargs, values):
    c = _context(module, args, kwargs)
    if c["ctx"].dense or (c["ctx"].q_valid is None and c["ctx"].k_valid is None):
        raise ValueError("this attention has no mask")
    return _run_step("attn", module, {**c, "ctx": AttnContext()}, values)


@torch.inference_mode()
def _scale_by_dim(module, args, kwargs, values):
    return _run_step("attn", module, _context(module, args, kwargs), values, scale=1.0 / module.self_attn.head_dim)


@torch.inference_mode()
def _silu_mlp(module, args, kwargs, values):
    mlp = module.mlp
    if not isinstance(mlp, GatedMLP) or not hasattr(mlp, "gate_proj"):
        raise ValueError("not a dense gated MLP")
    h = values["h2"]
    return {"mlp": mlp.down_proj(F.silu(mlp.gate_proj(h)) * mlp.up_proj(h))}


def _plain_w_norm(part: str):
    @torch.inference_mode()
    def fn(module, args, kwargs, values):
        norm = getattr(module, part)
        if not isinstance(norm, RMSNorm) or isinstance(norm, AdaRMSNorm):
            raise ValueError("not a plain Gemma RMSNorm")
        x = values["x" if part == "input_norm" else "x2"]
        out = (norm.normalize(x) * norm.weight).to(x.dtype)
        return {"h1" if part == "input_norm" else "h2": out}
    return fn


# ---------------------------------------------------------------- stages: code between layers

SCHEDULE = "the denoise loop's time schedule"


def _bound(owner, method: str, args, kwargs) -> inspect.BoundArguments:
    """A recorded call's arguments by name, from the policy's own signature of the method
    (an instance's wrapper may take *args)."""
    return inspect.signature(getattr(type(owner), method)).bind(owner, *args, **kwargs)


def _call(fn, bound: inspect.BoundArguments):
    return fn(*bound.args[1:], **bound.kwargs)  # positionally, as the model calls it; without self


def _x_t_origin(step: int | None) -> Origin:
    """x_t of a step: the sampler's noise at the first, the previous Euler step after."""
    if not step:
        return Origin(words="the sampler's noise (x_t of the first step)")
    return Origin(stack="expert", step=step - 1, part="euler")


@dataclass(frozen=True)
class ArgStage:
    """A policy method whose tensor arguments are the values it reads and whose return
    value is its output (`out`)."""

    stack: str
    part: str
    about: str
    method: str
    reads: tuple[str, ...]
    out: str
    layouts: tuple[tuple[str, str], ...] = ()
    tap: str | None = None  # the tap its output is, every call
    last_tap: str | None = None  # the tap its last call's output is
    origins: Callable | None = None  # (value, step) -> Origin | None
    owner: str = ""
    stepped: bool = True

    @property
    def taps(self) -> dict[str, str]:
        return {} if self.tap is None else {self.out: self.tap}

    @property
    def last_taps(self) -> dict[str, str]:
        return {} if self.last_tap is None else {self.out: self.last_tap}

    def layout(self, value: str) -> str | None:
        return dict(self.layouts).get(value)

    def run(self, owner, fn, args, kwargs, feed=None):
        bound = _bound(owner, self.method, args, kwargs)
        bound.arguments.update(feed or {})
        reads = {name: bound.arguments[name] for name in self.reads}
        return reads, {self.out: _call(fn, bound)}

    def origin(self, value: str, step: int | None) -> Origin | None:
        return None if self.origins is None else self.origins(value, step)


@dataclass(frozen=True)
class AssemblyStage:
    """`embed_prefix`: the vision tower, the projector, then the assembly of image tokens
    and the scaled text embedding.  Its value read is the projector's output (a hook puts
    the reference's in its place, so the vision tower's own run does not matter); its
    output is compared in the prefix layout, packed as `prefix_cache` packs it for the
    `prefix.embed` tap."""

    stack: str = "prefix"
    part: str = "embed"
    about: str = "the prefix embedding assembly"
    method: str = "embed_prefix"
    owner: str = ""
    stepped: bool = False

    @property
    def taps(self) -> dict[str, str]:
        return {"embed": "prefix.embed"}

    def layout(self, value: str) -> str | None:
        return {"img": "vision", "embed": "prefix"}[value]

    def run(self, owner, fn, args, kwargs, feed=None):
        seen: dict = {}

        def hook(module, inputs, output):
            seen["img"] = output  # [images run, n, D]
            return (feed or {}).get("img")  # None keeps the candidate's own

        handle = owner.projector.register_forward_hook(hook)
        try:
            x = fn(*args, **kwargs)  # [B, P, D]
        finally:
            handle.remove()
        if "img" not in seen:
            raise IsolationError(f"{self.method} did not run the projector: its input cannot be replaced")
        plan = _bound(owner, self.method, args, kwargs).arguments["plan"]
        if plan.gather is not None:  # packed: valid tokens only, [B, P, D] -> [B, L, D]
            x = x.gather(1, plan.gather[..., None].expand(-1, -1, x.shape[-1]))
        return {"img": (feed or {}).get("img", seen["img"])}, {"embed": x}

    def origin(self, value: str, step: int | None) -> Origin | None:
        return Origin(stack="vision")  # the end of the vision tower's stream


@dataclass(frozen=True)
class CacheStage:
    """`prefix_cache`: the prefix LLM and the handoff of each layer's K/V to the cache the
    expert reads.  Its values read are each prefix layer's K/V (hooks on the layers put
    the reference's in their place); its outputs are the K/V each expert layer reads from
    the cache it returns."""

    stack: str = "prefix"
    part: str = "kv_cache"
    about: str = "the prefix-to-expert K/V cache handoff"
    method: str = "prefix_cache"
    owner: str = ""
    stepped: bool = False

    @property
    def taps(self) -> dict[str, str]:
        return {}

    def layout(self, value: str) -> str | None:
        return "prefix"

    def run(self, owner, fn, args, kwargs, feed=None):
        feed = feed or {}
        seen: dict = {}

        def hook_for(i: int):
            def hook(module, inputs, output):
                x, k, v = output  # k, v [B, L, Hkv, D] after RoPE
                seen[f"k.{i}"], seen[f"v.{i}"] = k, v
                if f"k.{i}" in feed or f"v.{i}" in feed:
                    return x, feed.get(f"k.{i}", k), feed.get(f"v.{i}", v)
                return None
            return hook

        layers = owner.prefix.layers
        handles = [layer.register_forward_hook(hook_for(i)) for i, layer in enumerate(layers)]
        try:
            cache = fn(*args, **kwargs)
        finally:
            for h in handles:
                h.remove()
        outputs = {}
        for i in range(len(owner.expert.layers)):
            (k, v), _ = cache.for_layer(i, 1)
            outputs[f"cache.{i}.k"], outputs[f"cache.{i}.v"] = k, v
        return {**seen, **feed}, outputs

    def origin(self, value: str, step: int | None) -> Origin | None:
        return Origin(stack="prefix", layer=int(value.split(".")[1]), part="qkv")


def _euler_origin(value: str, step: int | None) -> Origin | None:
    if value == "x_t":
        return _x_t_origin(step)
    if value == "v":
        return Origin(stack="expert", step=step, part="velocity")
    return Origin(words=SCHEDULE)


STAGES = (
    AssemblyStage(),
    CacheStage(),
    ArgStage("expert", "time", "the time embedding", "time_condition", ("t",), "time", tap="expert.time",
             origins=lambda value, step: Origin(words=SCHEDULE)),
    ArgStage("expert", "embed", "the action in-projection", "action_in", ("x_t",), "embed",
             (("x_t", "actions"), ("embed", "actions")), tap="expert.embed",
             origins=lambda value, step: _x_t_origin(step)),
    ArgStage("expert", "velocity", "the action out-projection", "action_out", ("x",), "velocity",
             (("x", "actions"), ("velocity", "actions")), tap="expert.velocity"),
    ArgStage("expert", "euler", "the Euler step", "euler_step", ("x_t", "v", "t", "dt"), "euler",
             (("x_t", "actions"), ("v", "actions"), ("euler", "actions")), last_tap="output.actions",
             origins=_euler_origin),
)
