"""`--decode N`: the prefill, then N decode steps through the model's own KV cache, both
sides fed the reference's greedy tokens; taps per step and the K/V each layer reads.

The planted bug lives only in the decode path: layer 1's cache layer writes the previous
slot's key again at each single-token step (the prefill writes it right), so the expected
first divergence is the K that layer 1 reads at the first decode step."""
from __future__ import annotations

import functools

import pytest

pytest.importorskip("transformers")

import parity  # noqa: E402
from parity.errors import InputError  # noqa: E402
from parity.probes.hf.backend import factory  # noqa: E402
from parity.taps.backends import BackendOptions  # noqa: E402

STEPS = 3


def opts(**kw):
    return BackendOptions(batch=3, padding="left", **kw)


def stale_key_in_decode(backend, layer=1):
    """The candidate's layer `layer` cache writes the previous slot's key at decode steps."""
    attn = backend.model.model.layers[layer].self_attn
    forward = attn.forward

    @functools.wraps(forward)
    def planted(*args, **kwargs):
        cache = kwargs.get("cache", kwargs.get("past_key_values"))  # its name in transformers 5.2x, before
        store = getattr(cache, "layers", [None] * (layer + 1))[layer]
        if store is not None and not getattr(store, "_planted", False):
            update = store.update

            def wrong(key_states, value_states, *a, **k):
                if key_states.shape[-2] == 1 and getattr(store, "keys", None) is not None and store.keys.numel():
                    key_states = store.keys[..., -1:, :].clone()
                return update(key_states, value_states, *a, **k)

            store.update, store._planted = wrong, True
        return forward(*args, **kwargs)

    attn.forward = planted
    return backend


@pytest.mark.parametrize("cache", ["dynamic", "static"])
def test_correct_pairs_pass_every_decode_step(tiny_models, cache):
    m = tiny_models("llama")
    report = parity.compare(f"hf:{m}@attn=eager,cache={cache}", f"hf:{m}@attn=sdpa,cache={cache}",
                            batch=3, padding="left", decode=STEPS)
    assert report, report.first_divergence
    keys = {r.key for r in report.rows}
    assert {f"decoder.1.q@{s}" for s in range(STEPS + 1)} <= keys
    assert {f"decoder.2.cache_k@{s}" for s in range(STEPS + 1)} | {f"decoder.0.cache_v@{STEPS}"} <= keys
    assert {f"output.logits@{s}" for s in range(STEPS + 1)} <= keys
    assert report.ref_meta["decode"] == STEPS and report.ref_meta["cache"] == cache


def test_right_padding_against_left_padding_decodes_the_same_tokens(tiny_models):
    m = tiny_models("llama")
    report = parity.compare(f"hf:{m}@attn=eager,padding=right", f"hf:{m}@attn=sdpa,padding=left", batch=3,
                            decode=STEPS)
    assert report, report.first_divergence


def test_a_decode_only_cache_bug_is_found_where_the_cache_is_read(tiny_models):
    m = tiny_models("llama")
    ref = factory(opts(), f"{m}@attn=eager")
    assert parity.compare(ref, stale_key_in_decode(factory(opts(), f"{m}@attn=sdpa"))), \
        "the prefill alone cannot see a decode-path bug"
    ref = factory(opts(decode=STEPS), f"{m}@attn=eager")
    cand = stale_key_in_decode(factory(opts(decode=STEPS), f"{m}@attn=sdpa"))
    report = parity.compare(ref, cand)
    first = report.first_divergence
    assert first is not None and first.key == "decoder.1.cache_k@1", first
    assert all(r.passed for r in report.rows if r.info.step == 0)  # the prefill is right
    loc = report.localisation  # never a claim elsewhere: the cache read, or an honest "cannot isolate"
    assert loc is not None and loc.introduced in (None, "decoder.1.cache_k@1"), loc.line()


def test_the_candidate_is_fed_the_reference_tokens(tiny_models):
    """Both sides see the same inputs: the candidate decodes the reference's greedy tokens,
    even where its own greedy choice would differ (a candidate with a scaled head)."""
    m = tiny_models("llama")
    ref = factory(opts(decode=STEPS), f"{m}@attn=eager")
    ref.run()
    tokens = ref.feed()
    assert len(tokens) == 3 and all(len(row) == STEPS for row in tokens)
    cand = factory(opts(decode=STEPS, feed=tokens), f"{m}@attn=sdpa")
    cand.model.lm_head.register_forward_hook(lambda mod, args, out: -out)  # its own argmax would differ
    cand.run()
    assert cand.feed() is None or cand.feed() == tokens


def test_decode_requests_that_cannot_work_are_one_line(tiny_models):
    m = tiny_models("llama")
    with pytest.raises(InputError, match="cache applies to --decode"):
        parity.compare(f"hf:{m}@cache=static", f"hf:{m}", batch=2)
    with pytest.raises(InputError, match="causal language models"):
        parity.compare(f"hf:{tiny_models('siglip')}", f"hf:{tiny_models('siglip')}", batch=2, decode=2)
    with pytest.raises(InputError, match="decode must be 0 to"):
        parity.compare(f"hf:{m}", f"hf:{m}", decode=-1)
