"""pi0.5 mutations: where `parity.mutate`'s generic mutations go in the pi0.5 model, and
bugs planted in the code between its layers (embedding assembly, positions, noise, time
schedule, cache write).

Everything is planted on one model instance: forward hooks on its modules, or its own
methods replaced by wrappers set on the instance (`Pi05Policy` itself is never changed),
so a reference built from the same class is untouched.

`sites(model)` are the generic sites with pi0.5's q/k/v and attention taps moved to the
code that produces them: q/k/v are TapPoints after RoPE, so their mutations go on the
q/k/v projections; the attention core is a plain callable, so `expose_cores` wraps each
in a module (numerically the same) whose hooks isolation's re-runs also pass through.
`stages(cfg)` are the between-layer bugs, each with the tap that first observes it and
the last tap run before it enters.
"""
from __future__ import annotations

import contextlib
import math
from collections.abc import Callable, Iterator
from dataclasses import dataclass, replace

import torch
from torch import nn

from parity import mutate
from parity.probes.pi05.config import Pi05Config
from parity.probes.pi05.layers import Attention
from parity.probes.pi05.probe import PROBE

STACKS = ("vision", "prefix", "expert")


class CoreModule(nn.Module):
    """An attention core as a module, so hooks can reach its output (the `attn` tap)."""

    def __init__(self, core):
        super().__init__()
        self.inner = core

    def forward(self, q, k, v, ctx, scale):
        return self.inner(q, k, v, ctx, scale)


def expose_cores(model: nn.Module) -> nn.Module:
    """Wrap every attention core of this instance in a `CoreModule` (`...self_attn.core`)."""
    for module in model.modules():
        if isinstance(module, Attention) and not isinstance(module.core, CoreModule):
            module.core = CoreModule(module.core)
    return model


def _heads(cfg: Pi05Config, stack: str, component: str) -> int:
    c = cfg.vision if stack == "vision" else (cfg.llm if stack == "prefix" else cfg.expert)
    return c.num_kv_heads if component in ("k", "v") and stack != "vision" else c.num_heads


# Linear layers outside the taps whose square weight a transposition can hit, and the tap
# that first observes each (the time MLP feeds expert.time, the action projections the
# expert's embedding and the velocity).
FEEDERS = {"time_mlp_in": "time", "time_mlp_out": "time", "action_in_proj": "embed", "action_out_proj": "velocity"}


def sites(model: nn.Module) -> list[mutate.Site]:
    """The campaign's generic sites in a pi0.5 model whose cores are exposed."""
    cfg = model.cfg
    out = []
    for site in mutate.sites(model, PROBE):
        stack, _, rest = site.tap.partition(".")
        component = rest.rpartition(".")[2]
        if stack in STACKS and component in ("q", "k", "v", "attn"):
            producer = site.module.rsplit(".", 1)[0] + ("." + component + "_proj" if component != "attn" else ".core")
            site = replace(site, module=producer, heads=_heads(cfg, stack, component))
        out.append(site)
    out += [mutate.Site(name, f"expert.{tap}", stepped=True, tokens=tap != "time") for name, tap in FEEDERS.items()]
    for stack in ("prefix", "expert"):
        pairs = {"rope": "q"} if stack == "prefix" else {"rope": "q", "prefix_kv": "attn"}
        out += mutate.pair_sites(model, rf"{stack}\.layers\.(?P<layer>\d+)", stack, pairs, stepped=stack == "expert")
    return out


def fits(site: mutate.Site, mutation: mutate.Mutation) -> bool:
    """The feeder sites are there for the transposed weight only (any other mutation of
    them is the same as one at the tap they feed)."""
    return site.module not in FEEDERS or mutation.kind == "transpose"


def part_of(component: str) -> str | None:
    """Tap component -> the isolatable part producing it (the probe's declared map)."""
    return PROBE.components.part_of(component)


# ------------------------------------------------------------------ between-layer bugs


@dataclass(frozen=True)
class Stage:
    """A bug in code between taps: `plant(model)` wraps the instance's methods and returns
    the undo.  tap: the first tap observing it; enters_after: the last tap that runs before
    it enters (None: before the first); introduced, hints: what else a right answer may name."""

    kind: str
    label: str
    plant: Callable[[nn.Module], Callable[[], None]]
    tap: str
    enters_after: str | None
    introduced: tuple[str, ...] = ()
    hints: tuple[str, ...] = ()

    @property
    def where(self) -> str:
        """The method of the model the bug is planted in."""
        return getattr(self.plant, "where", "?")

    @contextlib.contextmanager
    def planted(self, model: nn.Module) -> Iterator[None]:
        undo = self.plant(model)
        try:
            yield
        finally:
            undo()

    def expected(self, control) -> mutate.Expected:
        return mutate.expect_between(self.tap, self.enters_after, control, self.introduced, self.hints)


def _patch(model: nn.Module, **wrappers: Callable[[Callable], Callable]) -> Callable[[], None]:
    """Set `wrap(bound method)` as this instance's method, for each; the undo deletes them."""
    done: list[str] = []
    for method, wrap in wrappers.items():
        if method in vars(model):
            raise ValueError(f"{method} is already replaced on this instance")
        object.__setattr__(model, method, wrap(getattr(model, method)))
        done.append(method)

    def undo():
        for method in reversed(done):
            object.__delattr__(model, method)
    return undo


def _images(model) -> int:
    return len(model.cfg.cameras) * model.cfg.vision.num_tokens


def _embedded(edit: Callable[[nn.Module, torch.Tensor], torch.Tensor]):
    """embed_prefix's output [B, P, D] edited (image tokens [:, :C*n], then the text)."""
    def plant(model):
        return _patch(model, embed_prefix=lambda orig: lambda obs, plan: edit(model, orig(obs, plan)))
    plant.where = "embed_prefix"
    return plant


def _image_scale(model, x):
    n = _images(model)
    return torch.cat([(x[:, :n].float() * math.sqrt(model.cfg.llm.width)).to(x.dtype), x[:, n:]], dim=1)


def _text_unscaled(model, x):
    n = _images(model)
    return torch.cat([x[:, :n], (x[:, n:].float() / math.sqrt(model.cfg.llm.width)).to(x.dtype)], dim=1)


def _cameras_swapped(model, x):
    n = model.cfg.vision.num_tokens
    return torch.cat([x[:, n:2 * n], x[:, :n], x[:, 2 * n:]], dim=1)


def _text_shifted(model, x):
    n = _images(model)
    return torch.cat([x[:, :n], x[:, n:].roll(1, dims=1)], dim=1)


def _prefix_positions_padded(model):
    def wrap(orig):
        def plan_tokens(obs):
            plan = orig(obs)
            B, P = plan.valid.shape
            return replace(plan, positions=torch.arange(P, device=plan.valid.device).expand(B, -1))
        return plan_tokens
    return _patch(model, plan_tokens=wrap)


_prefix_positions_padded.where = "plan_tokens"


def _shift_rope(model, rope, by: int):
    """RoPE tables [B, T, 1, D/2] of positions + `by`: each angle advanced by `by` x its frequency."""
    cos, sin = rope
    half = cos.shape[-1]
    inv_freq = model.rope_theta ** (-torch.arange(half, dtype=torch.float32, device=cos.device) / half)
    c, s = torch.cos(by * inv_freq), torch.sin(by * inv_freq)
    return cos * c - sin * s, sin * c + cos * s


def _step_of(model, t: torch.Tensor) -> int:
    """The denoise step of time t [B] (t = 1 - step / num_steps): from the arguments, so an
    isolation re-run of one step's call is mutated exactly as the run was."""
    return int(round(float(1.0 - t.flatten()[0]) * model.cfg.num_steps))


def _velocity_args(edit):
    """velocity(cache, rope, x_t, t, cond, modulations) called with `edit(model, step, args)`."""
    def plant(model):
        def wrap(orig):
            def velocity(*args):
                return orig(*edit(model, _step_of(model, args[3]), args))
            return velocity
        return _patch(model, velocity=wrap)
    plant.where = "velocity"
    return plant


def _euler(step_wanted: int, factor: float):
    """euler_step(x_t, v, t, dt) at one step computing x_t + dt * factor * v (a model
    without an euler_step method, from before it had one, gets the velocity it hands to
    the update scaled instead: the same bug, entering at the same point)."""
    def plant(model):
        if not hasattr(model, "euler_step"):
            def velocity(orig):
                def run(*args):
                    v = orig(*args)
                    return v * factor if _step_of(model, args[3]) == step_wanted else v
                return run
            return _patch(model, velocity=velocity)

        def wrap(orig):
            def euler_step(x_t, v, t, dt):
                return orig(x_t, v * factor if _step_of(model, t) == step_wanted else v, t, dt)
            return euler_step
        return _patch(model, euler_step=wrap)
    plant.where = "euler_step"
    return plant


def _t_at(step_wanted: int | None, delta_steps: float):
    """t moved on by `delta_steps` steps (dt = -1/num_steps) at one step (None: at every step)."""
    def edit(model, step, args):
        if step_wanted is not None and step != step_wanted:
            return args
        cache, rope, x_t, t, *rest = args
        return (cache, rope, x_t, t - delta_steps / model.cfg.num_steps, *rest)
    return edit


def _actions_rope_shifted(model, step, args):
    cache, rope, *rest = args
    return (cache, _shift_rope(model, rope, 1), *rest)


def _noise(edit: Callable[[torch.Tensor], torch.Tensor]):
    def plant(model):
        return _patch(model, denoise=lambda orig: lambda obs, noise, cache: orig(obs, edit(noise), cache))
    plant.where = "denoise"
    return plant


def _redrawn(noise):
    gen = torch.Generator(device=noise.device).manual_seed(12345)
    return torch.randn(noise.shape, generator=gen, device=noise.device, dtype=noise.dtype)


def _cached(edit: Callable):
    """prefix_cache's PrefixCache edited after it is built (each run builds a new one)."""
    def plant(model):
        def wrap(orig):
            def prefix_cache(x, plan):
                cache = orig(x, plan)
                edit(cache)
                return cache
            return prefix_cache
        return _patch(model, prefix_cache=wrap)
    plant.where = "prefix_cache"
    return plant


def _layer_slot_off(cache):
    cache.keys, cache.values = cache.keys[1:] + cache.keys[:1], cache.values[1:] + cache.values[:1]


def _kv_swapped(cache):
    cache.keys, cache.values = cache.values, cache.keys


def _keys_rolled(cache):
    cache.keys = [k.roll(1, dims=1) for k in cache.keys]


def _mask_lost(cache):
    cache.key_valid = [torch.ones_like(v) for v in cache.key_valid]


CACHE = ("prefix.kv_cache",)  # the probe's stage for the prefix-to-expert K/V handoff


def stages(cfg: Pi05Config) -> list[Stage]:
    """Every between-layer bug, with its answer: the first tap that observes it and the
    last tap run before it enters (tiny config: 4 layers, 10 steps)."""
    last_prefix = f"prefix.{cfg.llm.depth - 1}.mlp"
    late, last = min(7, cfg.num_steps - 2), cfg.num_steps - 1
    mid = cfg.num_steps // 2
    embed = ("prefix.embed", "vision.projector")
    return [
        Stage("embedding assembly", "image tokens x sqrt(width)", _embedded(_image_scale), *embed),
        Stage("embedding assembly", "text embedding not x sqrt(width)", _embedded(_text_unscaled), *embed),
        Stage("embedding assembly", "cameras 0 and 1 swapped", _embedded(_cameras_swapped), *embed),
        Stage("embedding assembly", "text tokens shifted by one", _embedded(_text_shifted), *embed),
        Stage("positions", "prefix positions count padding", _prefix_positions_padded,
              "prefix.0.q", "prefix.embed", ("prefix.0.qkv",)),
        Stage("positions", "action positions off by one", _velocity_args(_actions_rope_shifted),
              "expert.0.q@0", last_prefix, ("expert.0.qkv@0",)),
        Stage("noise", "noise rolled by one action", _noise(lambda n: n.roll(1, dims=1)),
              "expert.embed@0", last_prefix),
        Stage("noise", "noise rounded to bf16", _noise(lambda n: n.to(torch.bfloat16).to(n.dtype)),
              "expert.embed@0", last_prefix),
        Stage("noise", "noise drawn again", _noise(_redrawn), "expert.embed@0", last_prefix),
        Stage("time schedule", f"step {mid}'s t off by half a step", _velocity_args(_t_at(mid, 0.5)),
              f"expert.time@{mid}", f"expert.velocity@{mid - 1}"),
        Stage("time schedule", "t grid shifted by one step", _velocity_args(_t_at(None, 1.0)),
              "expert.time@0", last_prefix),
        Stage("time schedule", f"Euler step {late} with 1.5 x velocity",
              _euler(late, 1.5), f"expert.embed@{late + 1}",
              f"expert.velocity@{late}", (f"expert.euler@{late}",)),
        Stage("time schedule", "last Euler update with the sign flipped",
              _euler(last, -1.0), "output.actions", f"expert.velocity@{last}",
              (f"expert.euler@{last}",)),
        Stage("cache write", "prefix K/V one layer slot off", _cached(_layer_slot_off), "expert.0.attn@0",
              last_prefix, CACHE),
        Stage("cache write", "K and V swapped in the cache", _cached(_kv_swapped), "expert.0.attn@0",
              last_prefix, CACHE),
        Stage("cache write", "cached keys one token off", _cached(_keys_rolled), "expert.0.attn@0",
              last_prefix, CACHE),
        Stage("cache write", "cache validity mask lost", _cached(_mask_lost), "expert.0.attn@0",
              last_prefix, ("expert.0.attn@0", *CACHE), ("ignores the padding",)),
    ]
