"""Isolation without a probe adapter: any model's tapped modules, re-run on the reference's
inputs, name the component that introduces an error.

Every bug is planted in the candidate's own instance (a hook, a weight, a patched
forward), never through a fault catalogue.  The expected answer is where the bug lives:
the tap of the module whose code is wrong, or, for a layer's own code between its tapped
modules (a residual), the layer itself (`out`); the first divergence expected is the
first tap that reads the wrong value.  The reference is eager attention left-padded, the
candidate SDPA right-padded, so every re-run moves the reference's inputs through the two
token layouts."""
from __future__ import annotations

import dataclasses
import functools
import json

import pytest
import torch
from typer.testing import CliRunner

pytest.importorskip("transformers")

import parity  # noqa: E402
from parity.cli import app  # noqa: E402
from parity.comparison.isolate import Isolator, Unit, record_calls  # noqa: E402
from parity.comparison.modules import ModuleAdapter, kept_bytes  # noqa: E402
from parity.taps.backends import Backend, BackendOptions, resolve  # noqa: E402
from parity.taps.probe import Probe, TapRule  # noqa: E402

OPTS = BackendOptions(batch=3, padding="left", seed=1, device="cpu")
LAYERS, HIDDEN, HEAD_DIM = 3, 32, 8  # tests/hf_tiny.py's TEXT config (and head_dim 8 for Qwen3)


@pytest.fixture(scope="module")
def qwen3(tmp_path_factory):
    """A tiny random Qwen3 (q_norm / k_norm per head), saved like hf_tiny's models."""
    import transformers as T
    from hf_tiny import TEXT

    torch.manual_seed(0)
    folder = tmp_path_factory.mktemp("qwen3")
    T.Qwen3ForCausalLM(T.Qwen3Config(**TEXT, head_dim=HEAD_DIM)).save_pretrained(folder)
    return folder


def reference(path):
    return resolve(f"hf:{path}@attn=eager,dtype=float32", OPTS)


def candidate(path, padding="right"):
    return resolve(f"hf:{path}@attn=sdpa,dtype=float32,padding={padding}", OPTS)


def layers(backend):
    return backend.model.model.layers


def introduced(report):
    loc = report.localisation
    assert loc is not None, "a failing live diff is localised"
    return loc.introduced


# --------------------------------------------------------------------------- planted bugs

def scale_odd_channels(by: float = 2.0):
    """A forward hook: the odd output channels scaled (a direction change, not just a size one)."""
    return lambda module, args, output: output * (1.0 + (by - 1.0) * (torch.arange(output.shape[-1]) % 2))


def test_mlp_bug_in_one_layer_is_introduced_at_that_mlp(tiny_models):
    m = tiny_models("llama")
    cand = candidate(m)
    layers(cand)[1].mlp.register_forward_hook(scale_odd_channels())
    report = parity.compare(reference(m), cand)
    assert not report and report.first_divergence.key == "decoder.1.mlp"
    assert introduced(report) == "decoder.1.mlp"
    assert not report.localisation.inherited and report.localisation.hint is None


@pytest.mark.parametrize("kind, layer, path, tap", [
    ("llama", 2, "post_attention_layernorm", "post_attn_norm"),
    ("qwen3", 1, "self_attn.q_norm", "q_norm"),
])
def test_rmsnorm_weight_offset_in_one_layer_is_introduced_at_that_norm(tiny_models, qwen3, kind, layer, path, tap):
    m = qwen3 if kind == "qwen3" else tiny_models(kind)
    cand = candidate(m)
    norm = layers(cand)[layer].get_submodule(path)
    with torch.no_grad():
        norm.weight += torch.linspace(-0.5, 0.5, norm.weight.numel())
    report = parity.compare(reference(m), cand)
    assert report.first_divergence.key == f"decoder.{layer}.{tap}"
    assert introduced(report) == f"decoder.{layer}.{tap}"


@pytest.mark.parametrize("kind", ["llama", "qwen3"])
def test_attention_patched_on_the_candidate_instance_is_introduced_at_attn(tiny_models, qwen3, kind):
    """Layer 2's attention module ignores the padding mask (its forward replaced on this
    instance only): q, k and v are right, the attention core's output is not."""
    m = qwen3 if kind == "qwen3" else tiny_models(kind)
    cand = candidate(m, padding="left")
    attn = layers(cand)[2].self_attn
    forward = attn.forward

    @functools.wraps(forward)
    def unmasked(*args, **kwargs):
        return forward(*args, **{**kwargs, "attention_mask": None})

    attn.forward = unmasked
    ref = reference(m)
    report = parity.compare(ref, cand)
    assert report.first_divergence.key == "decoder.2.attn"
    assert introduced(report) == "decoder.2.attn"
    # the hook catching the o-projection's input during the re-runs is gone, like every other
    assert all(not x._forward_pre_hooks and not x._forward_hooks for b in (ref, cand) for x in b.model.modules())


def test_inherited_error_walks_back_to_the_planted_module(tiny_models):
    """Only K/V are diffed: layer 1's MLP bug shows first at layer 2's k; layer 2's own
    modules pass on the reference's inputs, and the walk goes upstream to layer 1's MLP."""
    m = tiny_models("llama")
    cand = candidate(m)
    layers(cand)[1].mlp.register_forward_hook(scale_odd_channels(10.0))  # large enough to reach layer 2
    report = parity.compare(reference(m), cand, taps="decoder.*.k,decoder.*.v")
    assert report.first_divergence.key == "decoder.2.k"
    loc = report.localisation
    assert loc.start == "decoder.2.k" and loc.inherited
    assert loc.introduced == "decoder.1.mlp"
    assert all(s["passed"] for s in loc.steps[:-1]) and not loc.steps[-1]["passed"]


def test_a_layers_own_code_between_its_modules_is_introduced_at_the_layer(tiny_models):
    """Layer 1 subtracts the attention output instead of adding it: every tapped module
    inside the layer is right, the first tap reading the wrong residual is the pre-MLP
    norm, and the smallest tapped module holding the bug is the layer itself."""
    m = tiny_models("llama")
    cand = candidate(m)
    layer = layers(cand)[1]

    def forward(hidden_states, **kwargs):
        attn, _ = layer.self_attn(hidden_states=layer.input_layernorm(hidden_states), **kwargs)
        hidden_states = hidden_states - attn  # the bug: residual + attn
        return hidden_states + layer.mlp(layer.post_attention_layernorm(hidden_states))

    layer.forward = forward
    report = parity.compare(reference(m), cand)
    assert report.first_divergence.key == "decoder.1.post_attn_norm"
    assert introduced(report) == "decoder.1.out"
    assert report.localisation.narrowed is None  # no tapped module inside the layer fails


# --------------------------------------------------------------------------- a user's own backend

TOY = BackendOptions(seed=3)


def toy_candidate(bad_layer: int = 3):
    """tests/toy_backends.py's chain of `toy.<i>.out` layers (no token layout: each tap is
    compared whole), one layer's weight disturbed on the candidate's instance."""
    from toy_backends import slow

    cand = slow(TOY)
    lin = cand.model.layers[bad_layer].lin
    with torch.no_grad():
        lin.weight += 0.5 * torch.randn(lin.weight.shape, generator=torch.Generator().manual_seed(7))
    return cand


def test_user_backend_bug_is_introduced_at_its_layer():
    from toy_backends import slow

    report = parity.compare(slow(TOY), toy_candidate(3))
    assert report.first_divergence.key == "toy.3.out"
    assert introduced(report) == "toy.3.out"


def test_user_backend_inherited_error_walks_back():
    from toy_backends import slow

    report = parity.compare(slow(TOY), toy_candidate(3), taps="toy.5.out,toy.6.out,toy.7.out")
    assert report.first_divergence.key == "toy.5.out"
    assert report.localisation.inherited and introduced(report) == "toy.3.out"


class StepLayer(torch.nn.Module):
    """A layer told which step it runs (like a time-conditioned denoiser's), wrong at `bad_step`."""

    def __init__(self, bad_step: int | None):
        super().__init__()
        self.lin = torch.nn.Linear(16, 16)
        self.bad_step = bad_step

    def forward(self, h, step: int):
        out = torch.tanh(self.lin(h))
        return out * 2.0 + 1.0 if step == self.bad_step else out


def stepped_chain(bad_step: int | None = None):
    """A user's model whose two layers run once per step (3 steps, like a denoise loop):
    taps `toy.<i>.out@<step>`.  With `bad_step`, layer 1 is wrong at that step only."""
    torch.manual_seed(5)
    model = torch.nn.Module()
    model.layers = torch.nn.ModuleList([StepLayer(None), StepLayer(bad_step)])
    x = torch.randn(2, 16, generator=torch.Generator().manual_seed(5))

    def run():
        with torch.no_grad():
            h = x
            for step in range(3):
                for layer in model.layers:
                    h = layer(h, step=step)

    probe = Probe("stepped", (TapRule(r"layers\.(?P<layer>\d+)", stack="toy", component="out", stepped=True),))
    return Backend("stepped", model, probe, run=run, layouts=dict, meta={"arch": "stepped", "input_fingerprint": "x"})


def test_a_bug_at_one_step_is_introduced_at_that_step():
    report = parity.compare(stepped_chain(), stepped_chain(bad_step=2))
    assert report.first_divergence.key == "toy.1.out@2"
    assert introduced(report) == "toy.1.out@2"
    assert not parity.compare(stepped_chain(), stepped_chain(bad_step=2), taps="toy.0.out").first_divergence


# --------------------------------------------------------------------------- controls

@pytest.mark.parametrize("kind", ["llama", "qwen3"])
def test_clean_candidate_passes_and_every_module_passes_alone(tiny_models, qwen3, kind):
    m = qwen3 if kind == "qwen3" else tiny_models(kind)
    ref, cand = reference(m), candidate(m)
    report = parity.compare(ref, cand)
    assert report and report.localisation is None
    iso = Isolator(ref, cand)
    units = iso.units()
    tapped = {(r.info.layer, r.info.component) for r in report.rows if r.info.layer is not None}
    assert {(u.layer, u.part) for u in units} == tapped  # every tap inside a layer is a part
    for unit in units:
        res = iso.isolate(unit)
        assert res.passed, (unit.name, res.summary())


def test_clean_user_backend_passes_alone():
    from toy_backends import slow

    iso = Isolator(slow(TOY), slow(TOY))
    assert [u.name for u in iso.units()] == [f"toy.{i}.out" for i in range(8)]
    assert all(iso.isolate(u).passed for u in iso.units())
    assert iso.isolate(Unit("toy", 3, None, "out")).rows[0].cos == pytest.approx(1.0)


# --------------------------------------------------------------------------- the CLI

runner = CliRunner()


def test_cli_diff_and_component_name_the_planted_module(tiny_models, tmp_path):
    m = tiny_models("llama")
    result = runner.invoke(app, ["diff", "--ref", f"hf:{m}", "--cand", f"hf_tiny:perturbed_mlp:{m}", "--batch", "2",
                                 "--json", str(tmp_path / "r.json")], catch_exceptions=False)
    assert result.exit_code == 1
    assert "INTRODUCED AT: decoder.1.mlp" in result.output and "declares no component" not in result.output
    assert json.loads((tmp_path / "r.json").read_text())["isolation"]["introduced"] == "decoder.1.mlp"
    for layer, code in ((1, 1), (0, 0)):
        result = runner.invoke(app, ["component", "--ref", f"hf:{m}", "--cand", f"hf_tiny:perturbed_mlp:{m}",
                                     "--stack", "decoder", "--layer", str(layer), "--part", "mlp"],
                               catch_exceptions=False)
        assert result.exit_code == code, result.output


# --------------------------------------------------------------------------- what it costs

def test_kept_inputs_are_what_the_layers_hold(tiny_models):
    """Per Llama layer five distinct [batch, tokens, hidden] activations are held (the
    layer's input, the normed input shared by the attention module and q/k/v, the
    attention core's output, the residual after attention, the normed residual); the
    mask, position ids and RoPE tables are shared by every layer and counted once."""
    backend = reference(tiny_models("llama"))
    log = record_calls(backend)
    batch, tokens = backend.inputs["input_ids"].shape
    activation = batch * tokens * HIDDEN * 4
    shared = batch * tokens * tokens * 4 + batch * tokens * 8 + 2 * batch * tokens * HEAD_DIM * 4
    assert 5 * LAYERS * activation <= kept_bytes(log.calls) <= 5 * LAYERS * activation + shared
    assert all(not m._forward_pre_hooks and not m._forward_hooks for m in backend.model.modules())


def capped(backend, max_mb):
    probe = dataclasses.replace(backend.probe, components=ModuleAdapter(backend.probe, backend.model, max_mb))
    return dataclasses.replace(backend, probe=probe)


def test_the_cap_stops_keeping_inputs_and_says_so(tiny_models):
    """With a cap of half what the run needs, layer 0's bug is still isolated; layer 2's
    inputs were not kept, and the banner says why instead of blaming anything."""
    m = tiny_models("llama")
    full = kept_bytes(record_calls(reference(m)).calls) / (1 << 20)
    for bad, expected in ((0, "decoder.0.mlp"), (2, None)):
        cand = candidate(m)
        layers(cand)[bad].mlp.register_forward_hook(scale_odd_channels())
        report = parity.compare(capped(reference(m), full / 2), capped(cand, full / 2))
        assert report.first_divergence.key == f"decoder.{bad}.mlp"
        assert introduced(report) == expected
        if expected is None:
            note = report.localisation.note
            assert "not kept" in note and "cap of" in note, note


def test_an_input_changed_in_place_is_not_re_run():
    """A layer that scales its input in place: what it received is gone, so isolating it
    says so rather than re-running it on the changed value."""
    from toy_backends import slow

    def in_place(backend):
        layer = backend.model.layers[2]
        forward = layer.forward
        layer.forward = lambda h: forward(h.mul_(1.5))
        return backend

    report = parity.compare(slow(TOY), in_place(slow(TOY)))
    assert report.first_divergence.key == "toy.2.out"
    assert introduced(report) is None and "changed in place" in report.localisation.note
