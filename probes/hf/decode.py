"""`--decode N` for causal LMs: the prefill, then N decode steps through the model's own KV
cache, every step tapped.

Most inference-backend bugs live in the decode path (the cache write, the decode kernel,
a paged or quantised cache), which a single prefill forward never runs.  Here a run is
the prefill (`use_cache=True`) and N single-token forwards on the same cache object, as
`generate` would make them: the attention mask grows by one column per step, each row's
position id is its own length so far, `cache_position` is the slot written.  The tokens
are the reference's greedy ones; a candidate is fed them (`BackendOptions.feed`, teacher
forcing), so both sides always see the same inputs and a divergence is the candidate's.

Taps are stepped (`@0` the prefill, `@1..N` the decode steps), each step with its own
token layout (`tokens@s`: the prompt's slots at the prefill, one slot per row after).  The
K/V each attention layer really reads after its cache update are taps too
(`decoder.N.cache_k@s`, `cache_v@s`): the cache object's `update` is wrapped so that what
it returns passes through identity modules per layer (`parity_kv.N.keys`, `.values`), laid out by
`cache@s` (canonical position = the row's prompt token, then its decoded tokens; padding
and the unused slots of a static cache are don't-care).
"""

from __future__ import annotations

import dataclasses
from typing import Any

import numpy as np

from parity.probes.hf.families import TOKENS
from parity.taps.probe import Probe, TapRule, step_layout
from parity.taps.records import Layout

KV_MODULE = "parity_kv"  # the identity modules the cache's reads pass through
CACHE = "cache"  # the cache reads' layout (per step: `cache@s`)


def decode_probe(probe: Probe, stack: str) -> Probe:
    """`probe` for a decoding run: every rule stepped (one call per forward), the rules on
    the token layout laid out per step, and the cache reads of each layer as taps."""
    rules = [dataclasses.replace(r, stepped=True, step_layouts=r.layout == TOKENS) for r in probe.rules]
    for component, part in (("cache_k", "keys"), ("cache_v", "values")):
        rules.append(TapRule(rf"{KV_MODULE}\.(?P<layer>\d+)\.{part}", stack, component, CACHE, stepped=True,
                             step_layouts=True))
    return dataclasses.replace(probe, rules=tuple(rules))


def kv_taps(model, n_layers: int):
    """Identity modules, one per layer, registered on `model` as `parity_kv.N`: the K/V a
    layer's attention reads after the cache update are their input and output."""
    import torch

    class Read(torch.nn.Module):
        """What one attention layer reads from the cache, keys or values (an identity)."""

        def forward(self, x):
            return x

    class KVRead(torch.nn.Module):
        """The K/V one attention layer reads from the cache: tap points `keys`, `values`."""

        def __init__(self):
            super().__init__()
            self.keys, self.values = Read(), Read()

        def forward(self, keys, values):
            # the taps see [B, tokens, heads, dim] (views: the cache's own tensors go on)
            return self.keys(keys.transpose(1, 2)).transpose(1, 2), self.values(values.transpose(1, 2)).transpose(1, 2)

    if not hasattr(model, KV_MODULE):
        model.add_module(KV_MODULE, torch.nn.ModuleList(KVRead() for _ in range(n_layers)))
    return getattr(model, KV_MODULE)


def make_cache(kind: str, config, max_len: int):
    """A fresh transformers cache of `kind` (dynamic, static) for one run."""
    import transformers

    if kind == "static":
        return transformers.StaticCache(config=config, max_cache_len=max_len)
    return transformers.DynamicCache(config=config)


def tap_reads(cache, taps, slots) -> None:
    """Route what `cache.update` returns (the K/V attention reads) through `taps[layer]`
    when it holds `slots()` token slots (the whole cache so far); a layer whose cache keeps
    less (a sliding window) is not tapped: its slots have no fixed place."""
    update = cache.update

    def tapped(key_states, value_states, layer_idx, *args, **kwargs):
        keys, values = update(key_states, value_states, layer_idx, *args, **kwargs)
        if keys.shape[-2] != slots():
            return keys, values
        return taps[layer_idx](keys, values)

    cache.update = tapped


def layouts(prefill: Layout, starts: list[int], lengths: list[int], steps: int, cache_slots: int | None) -> dict:
    """The per-step token layouts of a decoding run: `tokens@0` the prompt's, `tokens@s`
    (s >= 1) one slot per row (canonical: the row), `cache@s` the cache after step s's
    update: `cache_slots` slots (None: a dynamic cache, prompt + s), the prompt's valid
    slots then the decoded ones at their canonical place after the row's prompt."""
    rows, width = prefill.slots.shape
    out = {step_layout(TOKENS, 0): prefill}
    one = np.arange(rows, dtype=np.int64)[:, None]
    length = max(lengths) + steps  # canonical positions per row: its prompt, then its decoded tokens
    for s in range(steps + 1):
        if s:
            out[step_layout(TOKENS, s)] = Layout(one.copy(), 1)
        n = cache_slots if cache_slots is not None else width + s
        slots = np.full((rows, n), -1, dtype=np.int64)
        for r in range(rows):
            slots[r, starts[r]:starts[r] + lengths[r]] = r * length + np.arange(lengths[r])
            for k in range(s):  # decode step k + 1 wrote slot width + k
                slots[r, width + k] = r * length + lengths[r] + k
        out[step_layout(CACHE, s)] = Layout(slots, length)
    return out


def cache_argument(call) -> str:
    """The keyword a model's forward takes its cache by: `cache` (transformers >= 5.2x),
    `past_key_values` before."""
    import inspect

    forward = getattr(call, "forward", call)
    try:
        params = inspect.signature(forward).parameters
    except (TypeError, ValueError):
        return "past_key_values"
    return "cache" if "cache" in params else "past_key_values"


def decoding_run(call, config, kwargs: dict, steps: int, kind: str, taps, feed: Any, state: dict,
                 position_offset: int = 0):
    """One full run: the prefill then `steps` greedy (or fed) decode steps.  `state` keeps
    the tokens decoded by the first run ("tokens": [rows][steps] ints), fed to every later
    run of this backend (the oracle's) and, by the live diff, to the candidate."""
    import torch

    ids, mask = kwargs["input_ids"], kwargs["attention_mask"]
    rows, width = ids.shape
    given = feed if feed is not None else state.get("tokens")
    if given is not None:
        given = torch.as_tensor(np.asarray(given, dtype=np.int64), device=ids.device)
        if tuple(given.shape) != (rows, steps):
            raise ValueError(f"--decode {steps}: fed tokens of shape {tuple(given.shape)}, need {(rows, steps)}")
    step = [0]
    name = cache_argument(call)
    with torch.no_grad():
        cache = make_cache(kind, config, width + steps)
        tap_reads(cache, taps, lambda: width + steps if kind == "static" else width + step[0])
        base = {k: v for k, v in kwargs.items() if k not in ("use_cache",)}
        out = call(**base, use_cache=True, **{name: cache})
        lengths = mask.sum(dim=1)
        last = (mask * torch.arange(width, device=mask.device)).argmax(dim=1)  # each row's last real token
        logits = out.logits[torch.arange(rows, device=ids.device), last]
        decoded = []
        for k in range(steps):
            token = given[:, k] if given is not None else logits.argmax(dim=-1)
            decoded.append(token)
            step[0] = k + 1
            mask = torch.cat([mask, torch.ones_like(mask[:, :1])], dim=1)
            out = call(input_ids=token[:, None], attention_mask=mask,
                       position_ids=(lengths + k + position_offset)[:, None],
                       cache_position=torch.tensor([width + k], device=ids.device), use_cache=True,
                       **{name: cache})
            logits = out.logits[:, -1]
    if state.get("tokens") is None and decoded:
        state["tokens"] = torch.stack(decoded, dim=1).tolist()
    return out
