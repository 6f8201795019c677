"""Honest localisation: errors that enter outside layer parts are named where they enter,
and the walk re-runs nothing it does not need.

Every bug is planted in the candidate's own code, the way a user writes a backend: a
method set on the bundled `flash` model's instance, or a subclass of it assigned to that
instance alone (the reference's class is never touched).  Each expectation comes from
where the bug lives:

- image tokens scaled in `embed_prefix`: the prefix embedding assembly, between the
  vision projector (bit-exact: nothing before it changed) and `prefix.embed`;
- the sampler's noise rolled by one action before the denoise loop: no component is
  wrong, the x_t the action in-projection of step 0 reads is;
- step 5's t moved by half a step on its way into `velocity`: the time embedding is
  right, the t it reads is not;
- the Euler update of step 7 with the velocity's sign flipped (`euler_step`): the Euler
  step of step 7, seen first by step 8's action in-projection;
- the prefix K/V cache written one layer slot off (`prefix_cache`): every prefix k/v tap
  passes, expert layer 0's attention reads layer 1's K/V, and the handoff is to blame.
"""
from __future__ import annotations

import math

import pytest
import torch

from parity.api import diff_live
from parity.comparison.isolate import Isolator, record_calls
from parity.probes.pi05.model import Pi05Policy
from parity.report.results import Unit
from parity.report.summary import component_banner, localisation_lines
from parity.taps.backends import BackendOptions, resolve

OPTS = BackendOptions(device="cpu")
NUM_STEPS = 10  # tiny config: t = 1.0, 0.9, ..., 0.1


def _flash():
    return resolve("flash", OPTS)


def _at(t: torch.Tensor, value: float) -> bool:
    return abs(float(t[0]) - value) < 1e-3


def _banner(loc) -> str:
    return "\n".join(line.text for line in localisation_lines(loc))


def _walked(loc) -> list[str]:
    return [s["component"] for s in loc.steps]


def _never_before_them(report) -> None:
    assert "before them" not in _banner(report.localisation)


def _image_tokens_scaled():
    backend = _flash()
    model = backend.model
    n = len(model.cfg.cameras) * model.cfg.vision.num_tokens
    orig = model.embed_prefix

    def embed_prefix(obs, plan):  # the user's assembly multiplies image tokens by sqrt(width)
        x = orig(obs, plan)
        return torch.cat([(x[:, :n].float() * math.sqrt(model.cfg.llm.width)).to(x.dtype), x[:, n:]], dim=1)

    model.embed_prefix = embed_prefix
    return backend


def test_error_in_the_prefix_embedding_assembly_is_introduced_there():
    report = diff_live("pytorch", _image_tokens_scaled(), OPTS)
    loc = report.localisation
    assert report.first_divergence.key == "prefix.embed"
    assert loc.introduced == "prefix.embed" and loc.about == "the prefix embedding assembly"
    assert loc.bracket == {"after": "vision.projector", "before": "prefix.embed", "after_exact": True}
    assert _walked(loc) == ["prefix.embed"]  # no vision part re-run: none lies between the two taps
    banner = _banner(loc)
    assert "INTRODUCED AT: prefix.embed" in banner
    assert "enters between vision.projector (bit-exact) and prefix.embed: prefix.embed (the prefix embedding " \
           "assembly)" in banner
    _never_before_them(report)


def test_noise_of_the_sampler_is_named_without_re_running_the_prefix():
    backend = _flash()
    orig = backend.model.denoise
    backend.model.denoise = lambda obs, noise, cache: orig(obs, noise.roll(1, dims=1), cache)
    report = diff_live("pytorch", backend, OPTS)
    loc = report.localisation
    assert report.first_divergence.key == "expert.embed@0"
    assert loc.introduced is None
    assert loc.bracket == {"after": "expert.time@0", "before": "expert.embed@0", "after_exact": True}
    assert _walked(loc) == ["expert.embed@0"]  # the action in-projection, right on the reference's x_t
    assert loc.enters.startswith("the x_t it reads differs") and "the sampler's noise" in loc.enters
    assert "enters between expert.time@0 (bit-exact) and expert.embed@0" in _banner(loc)
    _never_before_them(report)


def test_one_steps_time_value_is_named_as_the_time_it_reads():
    backend = _flash()
    orig = backend.model.velocity

    def velocity(cache, rope, x_t, t, *rest):  # step 5 (t = 0.5) gets t half a step on
        return orig(cache, rope, x_t, t - 0.5 / NUM_STEPS if _at(t, 0.5) else t, *rest)

    backend.model.velocity = velocity
    report = diff_live("pytorch", backend, OPTS)
    loc = report.localisation
    assert report.first_divergence.key == "expert.time@5"
    assert loc.introduced is None and loc.start == "expert.time@5"
    assert loc.bracket["after"] == "expert.velocity@4" and loc.bracket["before"] == "expert.time@5"
    assert _walked(loc) == ["expert.time@5"]  # the time embedding is right on the reference's t
    assert loc.enters.startswith("the t it reads differs") and "time schedule" in loc.enters
    assert {"unit": "expert.time@5", "about": "the time embedding"} in loc.between
    _never_before_them(report)


def _euler_at_step_7(factor: float):
    backend = _flash()

    def euler_step(x_t, v, t, dt):  # the user's update of step 7 (t = 0.3)
        return x_t + dt * (v * factor if _at(t, 0.3) else v)

    backend.model.euler_step = euler_step
    return backend


def test_a_late_euler_update_is_introduced_at_that_step():
    report = diff_live("pytorch", _euler_at_step_7(-1.0), OPTS)
    loc = report.localisation
    assert report.first_divergence.key == "expert.embed@8"
    assert loc.introduced == "expert.euler@7" and loc.about == "the Euler step" and loc.inherited
    assert _walked(loc) == ["expert.embed@8", "expert.euler@7"]  # x_t read by step 8 -> the update making it
    assert "introduced at expert.euler@7 (the Euler step)" in loc.line()
    _never_before_them(report)


def test_an_update_error_within_the_budget_of_its_tap_is_introduced_where_it_enters():
    """1.5 x the velocity at step 7 moves x_t by 4 %: 18x the reference's own error at
    expert.embed@8, and the Euler step alone errs more than that tap's budget allows."""
    report = diff_live("pytorch", _euler_at_step_7(1.5), OPTS)
    assert report.first_divergence.key == "expert.embed@8"
    assert report.localisation.introduced == "expert.euler@7"
    _never_before_them(report)


def test_an_update_error_within_the_thresholds_is_pointed_at_not_claimed():
    """With the fixed bounds, 1.5 x the velocity at step 7 stays within them there (rel L2
    0.04) and fails only inside step 8: no component fails on its own, and the line says
    which one came closest on the reference's own inputs."""
    report = diff_live("pytorch", _euler_at_step_7(1.5), OPTS, oracle=False)
    loc = report.localisation
    assert report.first_divergence.key.endswith("@8")
    assert loc.introduced is None
    assert "expert.euler@7" in _walked(loc)
    assert "the largest error on the reference's own inputs: expert.euler@7" in loc.line()
    assert not any(c.startswith(("prefix.", "vision.")) or (c.endswith("@7") and c != "expert.euler@7")
                   for c in _walked(loc))
    _never_before_them(report)


STAGE_BUGS = {  # method of the candidate's instance -> (its wrong version, the tap it feeds, about)
    "time_condition": (lambda orig: lambda t: orig(t) * 1.5, "expert.time@0", "the time embedding"),
    "action_in": (lambda orig: lambda x_t: orig(x_t.flip(-1)), "expert.embed@0", "the action in-projection"),
    "action_out": (lambda orig: lambda x: orig(x) * 2.0, "expert.velocity@0", "the action out-projection"),
}


@pytest.mark.parametrize("method", sorted(STAGE_BUGS))
def test_a_stage_the_candidate_overrides_is_introduced_at_its_tap(method):
    wrong, tap, about = STAGE_BUGS[method]
    backend = _flash()
    setattr(backend.model, method, wrong(getattr(backend.model, method)))
    report = diff_live("pytorch", backend, OPTS)
    loc = report.localisation
    assert report.first_divergence.key == tap
    assert loc.introduced == tap and loc.about == about and _walked(loc) == [tap]
    _never_before_them(report)


class SlotOff(Pi05Policy):
    """A user's policy whose cache handoff stores each prefix layer's K/V one slot off."""

    def prefix_cache(self, x, plan):
        cache = super().prefix_cache(x, plan)
        cache.keys, cache.values = cache.keys[1:] + cache.keys[:1], cache.values[1:] + cache.values[:1]
        return cache


def _slot_off():
    backend = _flash()
    backend.model.__class__ = SlotOff  # this instance only
    return backend


def test_a_cache_written_one_slot_off_is_introduced_at_the_handoff():
    report = diff_live("pytorch", _slot_off(), OPTS)
    loc = report.localisation
    rows = {r.key: r for r in report.rows}
    assert all(r.passed for k, r in rows.items() if k.startswith("prefix.") and k.endswith((".k", ".v")))
    assert report.first_divergence.key == "expert.0.attn@0"
    assert loc.start == "expert.0.attn@0" and loc.introduced == "prefix.kv_cache"
    assert loc.about == "the prefix-to-expert K/V cache handoff"
    first = loc.steps[0]
    assert first["inherited_via"] == ["prefix_k", "prefix_v"] and not first["passed"]
    reads = {r["component"]: r for r in first["reads"]}
    assert reads["prefix_k"]["status"] == "fail" and reads["q"]["status"] == "pass"
    assert _walked(loc) == ["expert.0.attn@0", "prefix.kv_cache"]
    assert "matches once it reads the reference's prefix_k and prefix_v" in loc.line()
    _never_before_them(report)


def test_an_attention_is_judged_on_the_cache_it_really_reads():
    """Isolating the attention keeps the candidate's own cache: a wrong cache fails it, and
    the result says that only the cache makes it fail; a right cache reads as the
    reference's."""
    ref = resolve("pytorch", OPTS)
    unit = Unit("expert", 0, 0, "attn")
    res = Isolator(ref, _slot_off()).isolate(unit)
    assert not res.passed and res.inherited_via == ["prefix_k", "prefix_v"] and res.hint is None
    words = "\n".join(line.text for line in component_banner(res).lines)
    assert "FAIL: expert.0.attn@0: the prefix_k and prefix_v it reads differ from the reference's" in words
    assert "introduces an error" not in words
    clean = Isolator(ref, _flash()).isolate(unit)
    assert clean.passed and clean.inherited_via == []
    assert {r.info.component for r in clean.reads} >= {"q", "k", "v", "prefix_k", "prefix_v"}
    assert all(r.passed for r in clean.reads)


def test_stage_recording_leaves_the_instance_as_it_was():
    backend = _image_tokens_scaled()
    patched = backend.model.embed_prefix
    log = record_calls(backend)
    assert ("prefix", "embed", None) in log.stages and ("expert", "euler", NUM_STEPS - 1) in log.stages
    assert backend.model.embed_prefix is patched  # the user's own method, put back
    assert not {"prefix_cache", "time_condition", "action_in", "action_out", "euler_step"} & set(vars(backend.model))


@pytest.mark.parametrize("fault", ["nomask", "kv_mutate"])
def test_catalogued_faults_keep_their_answers(fault):
    """Unchanged answers where a layer part is to blame: no bracket line in the banner."""
    report = diff_live("pytorch", "flash", OPTS, faults=(fault,))
    loc = report.localisation
    assert loc.introduced == {"nomask": "prefix.0.attn", "kv_mutate": "expert.0.attn@1"}[fault]
    assert "enters between" not in _banner(loc)
