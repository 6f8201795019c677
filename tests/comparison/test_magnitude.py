"""Direction and size: a tap is judged on its cosine and on its norm ratio, so an error
the cosine cannot see (a wrong scale) fails at the tap where it enters.

The planted bugs live in the candidate's own code (a forward hook on one module of the
candidate instance), the way a user's backend would get them wrong; the expected tap is
the module that was changed."""
from __future__ import annotations

import math

import numpy as np
import pytest

from parity.comparison.metrics import compare
from parity.comparison.rules import Limit, Thresholds, judge, norm_err_for
from parity.errors import InputError


def test_a_tap_twice_its_reference_fails_on_size_alone():
    ref = np.random.default_rng(0).standard_normal(4096)
    m = compare(ref, 2 * ref)
    assert m.cos == 1.0 and m.norm_ratio == 2.0
    verdict = judge(m, "float32", "float32", 0.999)
    assert verdict["status"] == "fail" and "norm ratio 2.0000" in verdict["reason"]
    assert "cos" not in verdict["reason"].split(";")[0].split("norm")[0]  # the cosine bound was met


def test_noise_at_the_cosine_bound_stays_within_its_size_bound():
    """The size bound that follows from a cosine bound does not fail what the cosine passes:
    orthogonal noise barely moves the norm (by about e^2 / 2 for relative noise e)."""
    rng = np.random.default_rng(1)
    ref = rng.standard_normal(1 << 16)
    noise = rng.standard_normal(ref.size)
    for cos in (0.9999, 0.999, 0.99):
        e = norm_err_for(cos) * 0.9  # noise just inside the cosine bound
        m = compare(ref, ref + e * noise * np.linalg.norm(ref) / np.linalg.norm(noise))
        assert m.cos >= cos and Limit.of(cos).met(m), (cos, m)
        assert abs(m.norm_ratio - 1) < e * e  # second order in the noise


@pytest.mark.parametrize("scale, fails", [(1.10, True), (0.9, True), (1.03, False), (-1.0, True)])
def test_scale_errors_fail_beyond_the_size_bound(scale, fails):
    ref = np.random.default_rng(2).standard_normal(1000)
    m = compare(ref, scale * ref)
    assert (not Limit.of(0.999).met(m)) == fails, m


def test_both_bounds_can_be_given_per_pattern():
    t = Thresholds.parse(0.999, ["*.mlp=0.99", "out=0.995,0.2"], norm_err=0.01)
    assert t.limit("decoder.1.mlp", "decoder.1.mlp") == Limit(0.99, 0.01)  # the global size bound wins
    assert t.limit("out", "out") == Limit(0.995, 0.2)
    assert Thresholds.parse(0.999, ["*.mlp=0.99"]).limit("a.mlp", "a.mlp") == Limit(0.99, norm_err_for(0.99))
    assert math.isclose(norm_err_for(0.999), 0.04472, rel_tol=1e-3) and norm_err_for(1.0) == 0.0
    with pytest.raises(ValueError, match="GLOB=MIN_COS,MAX_NORM_ERR"):
        Thresholds.parse(0.999, ["*.mlp=0.99,x"])
    with pytest.raises(ValueError, match="norm error bound"):
        Thresholds(0.999, norm_err=-1.0)


def test_cli_and_settings_take_the_size_bound(tmp_path, monkeypatch):
    from parity.settings import load_settings, merge

    (tmp_path / "pyproject.toml").write_text('[tool.parity]\nmin_cos = 0.99\nmax_norm_err = 0.2\n'
                                             '[tool.parity.thresholds]\n"*.mlp" = [0.995, 0.01]\n')
    s = load_settings(tmp_path)
    m = merge(s)
    assert m.thresholds.limit("x", "x") == Limit(0.99, 0.2)
    assert m.thresholds.limit("d.mlp", "d.mlp") == Limit(0.995, 0.01)
    assert merge(s, max_norm_err=0.5).thresholds.limit("x", "x") == Limit(0.99, 0.5)
    with pytest.raises(InputError):
        merge(s, thresholds=["*.mlp=0.99,nope"])
    (tmp_path / "pyproject.toml").write_text('[tool.parity.thresholds]\n"*.mlp" = [0.995]\n')
    with pytest.raises(InputError, match="MIN_COS, MAX_NORM_ERR"):
        load_settings(tmp_path)


def _scaled(spec: str, module_path: str, scale: float, seq_len: int = 8):
    """The hf backend of `spec` with one module's output scaled (candidate instance only)."""
    from parity.probes.hf.backend import factory
    from parity.taps.backends import BackendOptions

    head, _, arg = spec.partition(":")
    backend = factory(BackendOptions(batch=2, seq_len=seq_len), arg)
    module = backend.model.get_submodule(module_path)
    module.register_forward_hook(lambda mod, args, out: out * scale)
    return backend


@pytest.mark.parametrize("module_path, component, scale", [
    ("model.layers.1.self_attn.o_proj", "o_proj", 2.0),
    ("model.layers.1.mlp", "mlp", 1.10),
])
def test_hf_scale_bug_fails_at_the_scaled_tap(tiny_models, module_path, component, scale):
    pytest.importorskip("transformers")
    import parity
    from parity.probes.hf.backend import factory
    from parity.taps.backends import BackendOptions

    folder = tiny_models("llama")
    ref = factory(BackendOptions(batch=2, seq_len=8), f"{folder}@attn=eager")
    cand = _scaled(f"hf:{folder}@attn=eager", module_path, scale)
    report = parity.compare(ref, cand, oracle=False)  # the fixed bounds: the size bound sees it
    assert not report
    first = report.first_divergence
    assert (first.info.layer, first.info.component) == (1, component), first.key
    assert "norm ratio" in first.reason and first.failed_bounds == ("norm",)
    assert report.rows[[r.key for r in report.rows].index(first.key)].to_dict()["failed_bounds"] == ["norm"]
    calibrated = parity.compare(ref, cand)  # the default budgets, at the same tap
    assert calibrated.first_divergence.key == first.key and calibrated.first_divergence.failed_bounds == ("budget",)


def _pi05(name: str = "flash"):
    from parity.taps.backends import BackendOptions, resolve

    return resolve(name, BackendOptions())


def test_pi05_velocity_head_twice_its_size_fails_at_the_velocity_tap():
    import parity

    cand = _pi05()
    cand.model.action_out_proj.register_forward_hook(lambda mod, args, out: out * 2)
    report = parity.compare(_pi05("pytorch"), cand, taps="expert.*", oracle=False)
    first = report.first_divergence
    assert first is not None and first.key == "expert.velocity@0", first
    assert first.failed_bounds == ("norm",)
    assert parity.compare(_pi05("pytorch"), cand, taps="expert.*").first_divergence.key == "expert.velocity@0"


def test_pi05_image_tokens_scaled_in_the_embedding_assembly_are_placed_in_the_cameras():
    """Image tokens multiplied by sqrt(width), as the text embedding is (a copied line):
    every region keeps cosine 1, so only the size says where the error is."""
    import math

    import torch

    import parity
    from parity.report.summary import concentration

    cand = _pi05()
    model, assemble = cand.model, cand.model.embed_prefix

    def scaled(obs, plan):
        out = assemble(obs, plan)
        n_text = obs.tokens.shape[1]
        return torch.cat([out[:, :-n_text] * math.sqrt(model.cfg.llm.width), out[:, -n_text:]], dim=1)

    model.embed_prefix = scaled  # this instance only
    report = parity.compare(_pi05("pytorch"), cand, taps="vision.*,prefix.*")
    first = report.first_divergence
    assert first is not None and first.key == "prefix.embed", first
    words = concentration(first)
    assert words and "error concentrated in camera" in words and "text" not in words, words
