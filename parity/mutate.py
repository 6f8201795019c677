"""Planted mutations: generic bugs put into one model instance, to measure what a parity
setup finds on bugs nobody catalogued.

A `Mutation` changes what one module hands on: a value edit (scale, offset, sign flip,
token roll, head permutation, a zeroed head, a precision round trip) or a different
computation (the module skipped, its square weight transposed, a pair of its inputs
swapped).  A `Site` says where: a named module's output (or input) and the tap that first
observes the change, which is the expected first divergence.  `planted(model, plants)`
installs forward hooks on that instance only and removes them on exit; no class or
module-level function is touched, so a reference built from the same classes runs as it
always does.  The hooks fire on every call, isolation re-runs included.

    sites = mutate.sites(cand.model, cand.probe)               # every tapped module
    seen = mutate.survey(cand.model, cand.run, sites)          # one plain run: what each site hands on
    with mutate.planted(cand.model, [(site, mutate.scale(2.0))]):
        report = parity.compare(ref, cand)
    outcome = mutate.score(report, mutate.expect(site, control))

`expect` derives the answer from where the mutation was planted (the site's tap, the tap
before it in the control run's execution order), never from the diff being scored.
torch is imported only when a mutation runs.
"""
from __future__ import annotations

import contextlib
import inspect
import math
import re
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field
from typing import Any

OUTPUT, INPUT = "output", "input"


@dataclass(frozen=True)
class Site:
    """A place a mutation goes: `module`'s output (element `select` of a tuple), or with
    `on="input"` its first input, or with `arg` the named argument holding a pair.

    tap: the canonical tap name that first observes the change.  stepped: that tap has
    one key per call (`tap@0` is the first).  tokens: dim 1 of the value is a token axis.
    heads: how many attention heads the value's last dim (or dim -2) holds."""

    module: str
    tap: str
    on: str = OUTPUT
    select: int | None = None
    stepped: bool = False
    tokens: bool = False
    heads: int | None = None
    arg: str | None = None

    def __post_init__(self) -> None:
        if self.on not in (OUTPUT, INPUT):
            raise ValueError(f"site {self.module}: on must be {OUTPUT!r} or {INPUT!r}, not {self.on!r}")

    @property
    def key(self) -> str:
        """The tap key the change shows at first (the first call's, for a stepped tap)."""
        return f"{self.tap}@0" if self.stepped else self.tap


@dataclass(frozen=True)
class Call:
    """What a mutation sees of one module call besides the value: the module, its arguments, the site."""

    module: Any
    args: tuple
    kwargs: dict
    site: Site

    @property
    def input(self):
        """The module's first tensor input (positional, else keyword)."""
        return next((a for a in (*self.args, *self.kwargs.values()) if _is_tensor(a)), None)


@dataclass(frozen=True)
class Mutation:
    """A generic bug: `edit(value, call)` returns what the module hands on instead.

    kind: the class it is counted in ("scale", "roll", ...); label: this one ("scale x2").
    fits(value, call): whether it applies to a site (shapes, dtypes); pair: it swaps the
    pair in the site's `arg` instead of editing the output."""

    kind: str
    label: str
    edit: Callable[[Any, Call], Any]
    fits: Callable[[Any, Call], bool] = field(default=lambda value, call: True)
    pair: bool = False

    def applies(self, value, call: Call) -> bool:
        """Whether it fits the surveyed value and changes it (a no-op is no mutation)."""
        import torch

        if self.pair:
            return call.site.arg is not None and _pair(call, call.site.arg) is not None
        if call.site.arg is not None or not _is_tensor(value) or not value.is_floating_point():
            return False
        if not self.fits(value, call):
            return False
        with torch.inference_mode():
            edited = self.edit(value, call)
        return tuple(edited.shape) == tuple(value.shape) and edited.dtype == value.dtype and not torch.equal(
            edited, value)


def _is_tensor(x) -> bool:
    import torch

    return isinstance(x, torch.Tensor)


# ------------------------------------------------------------------ value edits


def scale(factor: float) -> Mutation:
    """The value times `factor` (a wrong scale: cosine alone cannot see it)."""
    return Mutation("scale", f"scale x{factor:g}", lambda v, c: v * factor)


def offset(fraction: float = 0.1) -> Mutation:
    """The value plus a constant `fraction` of its RMS (a bias added twice)."""
    def edit(v, c):
        rms = v.float().pow(2).mean().sqrt()
        return v + (fraction * rms).to(v.dtype)
    return Mutation("offset", f"offset +{fraction:g} rms", edit)


def sign_flip() -> Mutation:
    """The value negated."""
    return Mutation("sign", "sign flip", lambda v, c: -v)


def roll_tokens(shift: int = 1) -> Mutation:
    """Tokens moved by `shift` along dim 1 (an off-by-one in a gather or a cache write)."""
    return Mutation("roll", f"token roll {shift:+d}", lambda v, c: v.roll(shift, dims=1),
                    fits=lambda v, c: c.site.tokens and v.ndim >= 2 and v.shape[1] > 1)


def _by_head(v, heads: int):
    """`v` as [..., heads, head_dim] (a flat last dim is split), and how to undo it."""
    if v.ndim >= 4 and v.shape[-2] == heads:
        return v, lambda x: x
    return v.unflatten(-1, (heads, v.shape[-1] // heads)), lambda x: x.flatten(-2)


def _heads_fit(v, c) -> bool:
    h = c.site.heads
    return bool(h and h >= 2 and ((v.ndim >= 4 and v.shape[-2] == h) or v.shape[-1] % h == 0))


def permute_heads() -> Mutation:
    """Heads rotated by one (head i gets head i+1's values: a wrong head split)."""
    def edit(v, c):
        x, back = _by_head(v, c.site.heads)
        return back(x.roll(1, dims=-2))
    return Mutation("head_perm", "head permutation", edit, fits=_heads_fit)


def zero_head(index: int = 0) -> Mutation:
    """Head `index` zeroed (a head dropped by a kernel's tiling)."""
    def edit(v, c):
        x, back = _by_head(v, c.site.heads)
        x = x.clone()
        x[..., index, :] = 0
        return back(x)
    return Mutation("head_zero", f"zeroed head {index}", edit, fits=_heads_fit)


def downcast(dtype: str) -> Mutation:
    """The value rounded to `dtype` ("bfloat16", "float16") and back: a silent precision loss
    (applies to float32 values only)."""
    def edit(v, c):
        import torch

        return v.to(getattr(torch, dtype)).to(v.dtype)

    def fits(v, c):
        import torch

        return v.dtype == torch.float32
    short = {"bfloat16": "bf16", "float16": "fp16"}.get(dtype, dtype)
    return Mutation("downcast", f"downcast {short}", edit, fits=fits)


# ------------------------------------------------------------------ module edits


def transpose_weight() -> Mutation:
    """A linear layer computing with its square weight transposed (a [in, out] checkpoint read as [out, in])."""
    def edit(v, c):
        import torch.nn.functional as F

        m = c.module
        return F.linear(c.input.to(m.weight.dtype), m.weight.t(), m.bias).to(v.dtype)

    def fits(v, c):
        import torch

        m = c.module
        return (c.site.on == OUTPUT and isinstance(m, torch.nn.Linear)
                and m.weight.shape[0] == m.weight.shape[1] and c.input is not None)
    return Mutation("transpose", "transposed square weight", edit, fits=fits)


def skip() -> Mutation:
    """The module skipped: its input handed on as its output (where the shapes allow)."""
    def fits(v, c):
        import torch

        x = c.input
        return (c.site.on == OUTPUT and x is not None and not isinstance(c.module, torch.nn.Identity)
                and tuple(x.shape) == tuple(v.shape) and x.is_floating_point())
    return Mutation("skip", "skipped module", lambda v, c: c.input.to(v.dtype), fits=fits)


def swap_pair() -> Mutation:
    """The two tensors of the site's pair argument swapped (cos/sin of RoPE, K/V of a cache)."""
    def edit(pair, c):
        return type(pair)((pair[1], pair[0]))
    return Mutation("swap", "swapped inputs", edit, pair=True)


def generic() -> list[Mutation]:
    """Every generic mutation, one per variant."""
    return [scale(2.0), scale(1.1), offset(), sign_flip(), roll_tokens(), permute_heads(), zero_head(),
            transpose_weight(), downcast("bfloat16"), downcast("float16"), skip(), swap_pair()]


# ------------------------------------------------------------------ where: sites


def sites(model, probe) -> list[Site]:
    """Every tapped module of `model` as a Site on its own tap (split taps left out: a
    mutation of one chunk of a fused projection needs its own site)."""
    out = []
    for name, _ in model.named_modules():
        for hit in probe.taps_for(name):
            if hit.chunk is not None:
                continue
            out.append(Site(name, hit.name, hit.rule.on, hit.rule.select, hit.rule.stepped,
                            tokens=hit.rule.layout is not None))
    return out


def pair_sites(model, layer_pattern: str, stack: str, pairs: dict[str, str], stepped: bool = False) -> list[Site]:
    """Sites swapping a pair argument of every module whose name matches `layer_pattern`
    (a regex whose `layer` group is the layer index): `pairs` maps the argument's name to
    the tap component that first uses it, e.g. {"position_embeddings": "attn"}."""
    regex = re.compile(layer_pattern)
    return [Site(name, f"{stack}.{int(m.group('layer'))}.{component}", stepped=stepped, arg=arg)
            for name, _ in model.named_modules() if (m := regex.fullmatch(name)) is not None
            for arg, component in pairs.items()]


@dataclass
class Seen:
    """One site's first call in a plain run: the call and the value it handed on."""

    call: Call
    value: Any


def survey(model, run: Callable[[], Any], where: Iterable[Site]) -> dict[Site, Seen]:
    """Run once without mutations and keep each site's first call (cloned values), so
    `Mutation.applies` can be asked without running the mutation through the model."""
    import torch

    where = list(where)
    seen: dict[Site, Seen] = {}
    handles = []
    modules = dict(model.named_modules())

    def clone(x):
        if isinstance(x, torch.Tensor):
            return x.detach().clone()
        if isinstance(x, (tuple, list)):
            return type(x)(clone(i) for i in x)
        return x

    def hook_for(site: Site):
        def hook(module, args, kwargs, output):
            if site not in seen:
                value = output if site.select is None or not isinstance(output, tuple) else output[site.select]
                if site.on == INPUT:
                    value = next((a for a in (*args, *kwargs.values()) if isinstance(a, torch.Tensor)), None)
                seen[site] = Seen(Call(module, clone(args), clone(kwargs), site), clone(value))
        return hook

    try:
        for site in where:
            if site.module not in modules:
                raise ValueError(f"no module {site.module!r} in the model")
            handles.append(modules[site.module].register_forward_hook(hook_for(site), with_kwargs=True))
        run()
    finally:
        for h in handles:
            h.remove()
    return seen


# ------------------------------------------------------------------ planting


def _pair(call: Call, arg: str):
    """The named argument of a call if it is a pair of same-shaped tensors, else None."""
    try:
        pair = _arguments(call.module, call.args, call.kwargs).get(arg)
    except TypeError:
        return None
    if (isinstance(pair, (tuple, list)) and len(pair) == 2 and all(_is_tensor(p) for p in pair)
            and pair[0].shape == pair[1].shape):
        return pair
    return None


def _arguments(module, args, kwargs) -> dict:
    """A call's arguments by name, **kwargs spread out."""
    sig = inspect.signature(module.forward)
    out = {}
    for name, value in sig.bind(*args, **kwargs).arguments.items():
        if sig.parameters[name].kind == inspect.Parameter.VAR_KEYWORD:
            out.update(value)
        else:
            out[name] = value
    return out


def _swapped(module, args, kwargs, arg: str, edit: Callable, site: Site):
    sig = inspect.signature(module.forward)
    bound = sig.bind(*args, **kwargs)
    if arg in bound.arguments:
        bound.arguments[arg] = edit(bound.arguments[arg], Call(module, args, kwargs, site))
    else:
        var = next(k for k, p in sig.parameters.items() if p.kind == inspect.Parameter.VAR_KEYWORD)
        extra = dict(bound.arguments[var])
        extra[arg] = edit(extra[arg], Call(module, args, kwargs, site))
        bound.arguments[var] = extra
    return bound.args, bound.kwargs


def plant(model, site: Site, mutation: Mutation):
    """Install one mutation on `model`'s module at `site`; returns the hook handle
    (`.remove()` takes it out).  Prefer `planted`, which always removes it."""
    import torch

    module = model.get_submodule(site.module)
    if mutation.pair:
        if site.arg is None:
            raise ValueError(f"{mutation.label} needs a site with a pair argument, not {site.module}")

        def pre_pair(mod, args, kwargs):
            return _swapped(mod, args, kwargs, site.arg, mutation.edit, site)
        return module.register_forward_pre_hook(pre_pair, with_kwargs=True)
    if site.on == INPUT:
        def pre(mod, args, kwargs):
            if not args or not isinstance(args[0], torch.Tensor):
                raise ValueError(f"{site.module}: the input mutation needs a positional tensor input")
            return (mutation.edit(args[0], Call(mod, args, kwargs, site)), *args[1:]), kwargs
        return module.register_forward_pre_hook(pre, with_kwargs=True)

    def post(mod, args, kwargs, output):
        call = Call(mod, args, kwargs, site)
        if site.select is not None and isinstance(output, tuple):
            items = list(output)
            items[site.select] = mutation.edit(items[site.select], call)
            return type(output)(items) if type(output) is tuple else output.__class__(*items)
        return mutation.edit(output, call)
    return module.register_forward_hook(post, with_kwargs=True)


@contextlib.contextmanager
def planted(model, plants: Iterable[tuple[Site, Mutation]]) -> Iterator[None]:
    """Mutations installed on `model` for the duration of the block, removed in `finally`."""
    handles = []
    try:
        for site, mutation in plants:
            handles.append(plant(model, site, mutation))
        yield
    finally:
        for h in handles:
            h.remove()


# ------------------------------------------------------------------ the answer and the score


@dataclass(frozen=True)
class Expected:
    """What a diff should say about a planted mutation, derived from where it went.

    tap: the first divergence's key.  introduced: names an INTRODUCED AT may give (the
    tap, the isolatable part producing it).  after: the taps a bracket's passing end may
    be (from the last tap run before the change entered to the one just before `tap`;
    None stands for "the start of the run").  hints: words a right hint contains (none:
    every hint is wrong)."""

    tap: str
    introduced: tuple[str, ...]
    after: tuple[str | None, ...]
    hints: tuple[str, ...] = ()


def _key_step(key: str) -> str | None:
    return key.rpartition("@")[2] if "@" in key else None


def expect(site: Site, control, part_of: Callable[[str], str | None] | None = None,
           hints: tuple[str, ...] = ()) -> Expected:
    """The answer for a mutation at `site`, from a passing control diff (its tap order and
    the module each tap observes, `ref.modules`), and the probe's part map (`part_of`:
    tap component -> the isolatable part producing it, e.g. q -> qkv)."""
    keys = _keys(control, site.key)
    end = keys.index(site.key)
    start = end
    if site.on == INPUT or site.arg is not None:  # enters as the module starts: before every tap inside it
        modules = control.ref_meta.get("modules", {})
        step = _key_step(site.key)
        inside = [i for i, k in enumerate(keys) if _key_step(k) == step
                  and _at_or_in(modules.get(k.partition("@")[0], ""), site.module)]
        start = min(inside, default=end)
    return Expected(site.key, _names(site.key, part_of), _span(keys, start, end), hints)


def expect_between(tap: str, enters_after: str | None, control, introduced: tuple[str, ...] = (),
                   hints: tuple[str, ...] = ()) -> Expected:
    """The answer for a change made in code between taps: first seen at the tap key `tap`,
    entering after the tap key `enters_after` ran (None: before the first tap)."""
    keys = _keys(control, tap)
    start = 0 if enters_after is None else _keys(control, enters_after).index(enters_after) + 1
    return Expected(tap, (tap, *introduced), _span(keys, start, keys.index(tap)), hints)


def _keys(control, key: str) -> list[str]:
    keys = [r.key for r in control.rows]
    if key not in keys:
        raise ValueError(f"tap {key} is not in the control run")
    return keys


def _span(keys: list[str], start: int, end: int) -> tuple[str | None, ...]:
    """The taps a bracket's passing end may be: the one before `start` (None: the run's
    start) up to the one before `end`."""
    return tuple(keys[i] if i >= 0 else None for i in range(start - 1, end))


def _at_or_in(module: str, root: str) -> bool:
    module = module.removesuffix(":input")
    return module == root or module.startswith(root + ".")


def _names(key: str, part_of) -> tuple[str, ...]:
    """The tap key, and the unit name of the part producing it (`prefix.0.qkv`, `expert.1.mlp@0`)."""
    name, _, step = key.partition("@")
    head, _, component = name.rpartition(".")
    out = [key]
    part = part_of(component) if part_of is not None and head else None
    if part is not None and part != component:
        out.append(f"{head}.{part}" + (f"@{step}" if step else ""))
    return tuple(out)


_BETWEEN = re.compile(r"between (\S+?)(?: \([^)]*\))? and (\S+?)(?=[\s:;,)]|$)")


def bracket_of(localisation) -> tuple[str | None, str] | None:
    """(last passing tap, first failing tap) the localisation brackets the error with:
    its `bracket` field ([after, before] or a dict of the two), else the words "between A
    and B" in its line; None when it gives none."""
    if localisation is None:
        return None
    d = localisation.to_dict() if hasattr(localisation, "to_dict") else dict(localisation)
    b = d.get("bracket")
    if isinstance(b, dict):
        b = [v for v in b.values() if v is None or isinstance(v, str)][:2]
    if isinstance(b, (list, tuple)) and len(b) >= 2:
        return b[0], b[1]
    line = localisation.line() if hasattr(localisation, "line") else (d.get("note") or "")
    m = _BETWEEN.search(line or "")
    return (m.group(1), m.group(2).rstrip(".")) if m else None


@dataclass(frozen=True)
class Outcome:
    """How a diff did on one planted mutation."""

    detected: bool
    first: str | None  # the first divergence's key
    first_right: bool
    introduced: str | None
    bracket: tuple[str | None, str] | None
    located_right: bool  # INTRODUCED AT names the planted component; without one, the bracket holds it
    hint: str | None
    hint_wrong: bool

    def to_dict(self) -> dict[str, Any]:
        return {"detected": self.detected, "first": self.first, "first_right": self.first_right,
                "introduced": self.introduced, "bracket": None if self.bracket is None else list(self.bracket),
                "located_right": self.located_right, "hint": self.hint, "hint_wrong": self.hint_wrong}


def score(report, expected: Expected) -> Outcome:
    """Score a diff against the answer derived from where the mutation was planted."""
    first = report.first_divergence
    detected = not report
    key = first.key if first is not None else None
    loc = report.localisation
    introduced = getattr(loc, "introduced", None)
    bracket = bracket_of(loc)
    hint = getattr(loc, "hint", None)
    bracket_right = bracket is not None and bracket[1] == expected.tap and bracket[0] in expected.after
    # An INTRODUCED AT is a claim and must be right; only without one does the bracket count.
    located = detected and (introduced in expected.introduced if introduced is not None else bracket_right)
    wrong = hint is not None and not any(h in hint for h in expected.hints)
    return Outcome(detected, key, detected and key == expected.tap, introduced, bracket, located, hint, wrong)


def summary(outcomes: Iterable[Outcome]) -> dict[str, float | int]:
    """Counts and fractions over outcomes: detected, first divergence right, introduced-at
    or bracket right, wrong hints."""
    rows = list(outcomes)
    n = len(rows)

    def frac(k: int) -> float:
        return k / n if n else math.nan
    det = sum(o.detected for o in rows)
    first = sum(o.first_right for o in rows)
    loc = sum(o.located_right for o in rows)
    return {"n": n, "detected": det, "first_right": first, "located_right": loc,
            "wrong_hints": sum(o.hint_wrong for o in rows), "detected_frac": frac(det),
            "first_right_frac": frac(first), "located_right_frac": frac(loc)}
