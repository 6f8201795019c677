"""Calibrated budgets (`--oracle`): each tap judged by its error against a float64 run of
the reference, relative to the reference's own.

The planted bugs are real fp32 bug classes that the fixed default bound passes (their
error is far below 1 - 0.999 yet thousands of times the rounding of an fp32 run); each is
planted per instance in the candidate, so the expected tap is the planted module's."""
from __future__ import annotations

import pytest

pytest.importorskip("transformers")

import torch  # noqa: E402

import parity  # noqa: E402
from parity.comparison.oracle import Budget, floor_for, upcast  # noqa: E402
from parity.errors import InputError  # noqa: E402
from parity.probes.hf.backend import factory  # noqa: E402
from parity.taps.backends import BackendOptions  # noqa: E402

OPTS = BackendOptions(batch=2, seq_len=16, padding="left")


def _attn_scale(model):
    for module in model.modules():
        for name in ("scaling", "scale"):  # Llama's, SigLIP's
            if isinstance(getattr(module, name, None), float):
                setattr(module, name, getattr(module, name) * 1.1)


def _exact_gelu(model):
    for module in model.modules():
        if hasattr(module, "act_fn"):
            module.act_fn = torch.nn.GELU()  # the reference's is the tanh approximation


def _norm_scale_in_bf16(model):
    """Gemma's RMSNorm with its (1 + w) computed in bf16 (the reference: in fp32)."""
    for module in model.modules():
        if type(module).__name__.endswith("RMSNorm") and hasattr(module, "_norm"):
            def forward(x, m=module):
                return (m._norm(x.float()) * (1.0 + m.weight.to(torch.bfloat16)).float()).type_as(x)
            module.forward = forward


def _embed_scale_in_bf16(model):
    """Gemma's embedding normaliser sqrt(hidden) rounded to bf16 (5.65625 for 5.6569)."""
    for module in model.modules():
        if isinstance(getattr(module, "embed_scale", None), torch.Tensor):
            module.embed_scale = module.embed_scale.to(torch.bfloat16).to(module.embed_scale.dtype)


def _with_norm_weights(kind, folder):
    from hf_tiny import build

    model = build(kind)
    gen = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "norm" in name:
                p.copy_(torch.randn(p.shape, generator=gen) * 0.5)
    model.save_pretrained(folder)
    return folder


@pytest.mark.parametrize("kind, plant, tap", [
    ("llama", _attn_scale, "decoder.0.attn"),
    ("gemma", _exact_gelu, "decoder.0.mlp"),
    ("gemma", _norm_scale_in_bf16, "decoder.0.input_norm"),
    ("gemma", _embed_scale_in_bf16, "decoder.embed"),
    ("siglip", _attn_scale, "vision.0.attn"),
])
def test_fp32_bugs_below_the_fixed_bound_fail_their_budget_by_default(tiny_models, tmp_path, kind, plant, tap):
    folder = tiny_models(kind)
    if plant is _norm_scale_in_bf16:  # a random model's norm weights are 0, where (1 + w) is exact in bf16
        folder = _with_norm_weights(kind, tmp_path / kind)
    opts = BackendOptions(batch=2) if kind == "siglip" else OPTS

    def pair():
        ref = factory(opts, f"{folder}@attn=eager")
        cand = factory(opts, f"{folder}@attn=sdpa")
        plant(cand.model)
        return ref, cand

    if kind != "siglip":  # tiny SigLIP's few channels show x1.1 even to the fixed bounds; real widths do not
        assert parity.compare(*pair(), oracle=False), "the fixed bound passes this bug (why the oracle exists)"
    report = parity.compare(*pair())  # the default on a small CPU model: calibrated budgets
    assert not report
    first = report.first_divergence
    assert first.key == tap and first.failed_bounds == ("budget",)
    assert first.budget.ratio > 10 and "x the reference's own" in first.reason
    assert all(r.passed for r in report.rows[: report.rows.index(first)])
    assert report.thresholds["calibration"]["oracle_dtype"] == "float64"


@pytest.mark.parametrize("kind", ["llama", "gemma", "qwen2"])
@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_correct_pairs_keep_to_their_budget(tiny_models, kind, dtype):
    folder = tiny_models(kind)
    report = parity.compare(f"hf:{folder}@attn=eager", f"hf:{folder}@attn=sdpa", batch=2, seq_len=16,
                            padding="left", dtype=dtype, oracle=True)
    assert report, report.first_divergence
    ratios = [r.budget.ratio for r in report.rows if r.budget is not None]
    assert ratios and max(ratios) < 2.0


def test_the_oracle_leaves_the_reference_model_as_it_was(tiny_models):
    ref = factory(BackendOptions(dtype="bfloat16"), str(tiny_models("llama")))
    before = {k: (v.dtype, v.clone()) for k, v in ref.model.state_dict().items()}
    inputs = dict(x=torch.ones(2, dtype=torch.bfloat16), ids=torch.ones(2, dtype=torch.long))
    with upcast(ref.model, torch.float64, inputs):
        assert all(p.dtype == torch.float64 for p in ref.model.parameters())
        assert inputs["x"].dtype == torch.float64 and inputs["ids"].dtype == torch.long
    after = ref.model.state_dict()
    assert all(after[k].dtype == d and torch.equal(after[k], v) for k, (d, v) in before.items())
    assert inputs["x"].dtype == torch.bfloat16


def test_budget_rule():
    assert Budget(3e-7, 1e-7, 2.0, 6e-8).met and not Budget(3.3e-7, 1e-7, 2.0, 6e-8).met  # 2 x (1e-7 + 6e-8)
    assert Budget(5e-8, 0.0, 2.0, floor_for("float32")).met  # an exact reference tap: the floor decides
    assert not Budget(float("nan"), 1e-7, 2.0, 6e-8).met
    assert floor_for("bfloat16", "float32") == 2.0 ** -8


def test_oracle_requests_that_cannot_work_are_one_line(tmp_path):
    from parity.api import diff_request

    with pytest.raises(InputError, match="applies to live backends"):
        diff_request([tmp_path / "a.h5", tmp_path / "b.h5"], oracle=True)
    with pytest.raises(InputError, match="does not take --min-cos"):
        diff_request(ref="pytorch", cand="flash", oracle=True, min_cos=0.99)
    with pytest.raises(InputError, match="--stop-at-first"):
        diff_request(ref="pytorch", cand="flash", oracle=True, stop_at_first=True)
    with pytest.raises(InputError, match="--oracle"):
        diff_request(ref="pytorch", cand="flash", stats=True, oracle=True)


def test_cli_oracle_writes_the_budgets(tiny_models, tmp_path):
    import json

    from typer.testing import CliRunner

    from parity.cli import app

    folder = tiny_models("llama")
    out = tmp_path / "r.json"
    r = CliRunner().invoke(app, ["diff", "--ref", f"hf:{folder}@attn=eager", "--cand", f"hf:{folder}@attn=sdpa",
                                 "--seq-len", "8", "--oracle", "--json", str(out)])
    assert r.exit_code == 0, r.output
    data = json.loads(out.read_text())
    assert data["thresholds"]["calibration"]["factor"] == 2.0
    assert all("budget" in t for t in data["taps"] if t["status"] == "pass")


def test_pi05_oracle_runs_in_float64_and_keeps_clean_flash_within_budget():
    report = parity.compare("pytorch", "flash", taps="prefix.*,vision.*")
    assert report, report.first_divergence
    assert report.thresholds["calibration"]["oracle_dtype"] == "float64"  # its "fp32" parts widen too
    # a planted bug in one middle layer's input norm: the budget fails there, not before
    bad = parity.compare("pytorch", "flash", faults=["mid_norm"], taps="prefix.*,vision.*")
    first = bad.first_divergence
    assert not bad and (first.info.stack, first.info.layer, first.info.component) == ("prefix", 2, "input_norm")


def test_tied_weights_are_put_back_once_not_twice():
    """A parameter shared by two modules (Gemma's embedding and lm_head) is upcast once and
    put back as it was; visited twice, its upcast copy was saved as the original."""
    model = torch.nn.Sequential(torch.nn.Embedding(8, 4), torch.nn.Linear(4, 8, bias=False)).to(torch.bfloat16)
    model[1].weight = model[0].weight
    before = model[0].weight.detach().clone()
    with upcast(model, torch.float64):
        assert model[1].weight.dtype == torch.float64
    assert model[0].weight.dtype == torch.bfloat16 and torch.equal(model[0].weight, before)


def test_fixed_bounds_by_request_or_where_budgets_are_not_cheap_say_why(tmp_path):
    """`--no-oracle` (and a reference on an accelerator: the GPU path) judge by the fixed
    bounds with the candidate's declared allowance; the header and the JSON say why."""
    import json

    from typer.testing import CliRunner

    from parity.cli import app
    from parity.comparison.oracle import unavailable

    out = tmp_path / "r.json"
    r = CliRunner().invoke(app, ["diff", "--ref", "pytorch", "--cand", "flash_fp8", "--no-oracle", "--json", str(out)],
                           env={"COLUMNS": "200"})
    assert r.exit_code == 0, r.output
    assert "judged by fixed bounds (min cos 0.999, norm ratio within 0.0447 of 1): calibrated budgets off, asked " \
           "for (--no-oracle); the candidate's declared bounds where they match" in r.output
    assert "PASS: all 413 taps within thresholds (min cos 0.999, norm ratio within 0.0447 of 1, the candidate's " \
           "declared bounds where they match)" in r.output
    data = json.loads(out.read_text())
    assert data["thresholds"]["calibration"] == {"mode": "fixed", "why": "asked for (--no-oracle)"}
    assert data["thresholds"]["patterns"] == {"*": 0.995, "*.mlp": 0.99}
    on_gpu = torch.nn.Linear(4, 4, device="meta")
    assert "accelerator" in unavailable(on_gpu, "bfloat16")
    assert "already runs in float64" in unavailable(torch.nn.Linear(4, 4), "float64")
    assert unavailable(torch.nn.Linear(4, 4), "float32") is None
    big = torch.nn.Linear(1, 1)
    big.weight = torch.nn.Parameter(torch.empty(0).expand(0))  # no elements ...
    big.register_parameter("huge", torch.nn.Parameter(torch.empty((), device="cpu").expand(1 << 28)))
    assert "MB" in unavailable(big, "float32")


def test_an_oracle_with_nan_where_the_reference_has_none_leaves_those_taps_to_the_fixed_bounds():
    """A float64 run can produce NaN the reference does not (a library's float32 softmax of
    a fully masked row): no budget is computed from it; those taps get the fixed bounds
    and the report says so."""
    import contextlib
    import sys
    from pathlib import Path

    sys.path.insert(0, str(Path(__file__).parents[2] / "examples"))
    import toy_backend

    ref = toy_backend.reference(BackendOptions())

    @contextlib.contextmanager
    def nan_in_layer_1(dtype):
        handle = ref.model.layers[1].norm.register_forward_hook(lambda mod, args, out: out * float("nan"))
        try:
            with upcast(ref.model, dtype, ref.inputs):
                yield
        finally:
            handle.remove()

    ref.widen = nan_in_layer_1
    report = parity.compare(ref, toy_backend.reference(BackendOptions()))
    assert report, report.first_divergence
    by_key = {r.key: r for r in report.rows}
    assert by_key["toy.0.mlp"].budget is not None  # before the NaN: budgets
    assert by_key["toy.1.norm"].budget is None and by_key["toy.1.mlp"].budget is None  # the fixed bounds
    assert any("oracle run has NaN/Inf there where the reference has none" in w for w in report.warnings)


def test_a_budget_past_sqrt_2_leaves_isolation_a_size_bound_not_an_error():
    """A tap whose reference errs hugely against the oracle has a budget above sqrt(2): its
    cosine bound would be below 0, which a bound may not be; the re-run keeps the size bound."""
    import dataclasses
    import sys
    from pathlib import Path

    from parity.comparison.oracle import isolation_thresholds

    sys.path.insert(0, str(Path(__file__).parents[2] / "examples"))
    import toy_backend

    report = parity.compare(toy_backend.reference(BackendOptions()), toy_backend.candidate(BackendOptions()))
    row = report.rows[0]
    report.rows[0] = dataclasses.replace(row, budget=Budget(5.0, 1.0, 2.0, 6e-8))
    from parity.comparison.rules import Thresholds

    limit = isolation_thresholds(report, Thresholds()).limit(row.info.name, row.key)
    assert limit.min_cos == 0.0 and limit.max_norm_err == pytest.approx(2 * (1.0 + 6e-8))
