"""`parity weights` on quantised candidates: torchao tensor subclasses, torch.ao's
`quantize_dynamic` (packed params, no parameters) and optimum-quanto (frozen QTensors, or
modules that quantise their float weight on every call) are dequantised through their own
library, marked with their scheme and judged by `--quantized-min-cos`; a weight that was
wrong before it was quantised is found at that parameter.

The candidates are user backends, `test_quantized_weights:KIND:PATH`: a tiny hf Llama
(tests/hf_tiny.py) quantised after loading, with an optional planted fault (`--inject`)."""
from __future__ import annotations

import json
import subprocess
import sys
import warnings
from dataclasses import replace

import numpy as np
import pytest
import torch
from typer.testing import CliRunner

from parity.api import weights_live
from parity.cli import app
from parity.comparison.weights import compare_params, model_parameters
from parity.taps.backends import Backend, BackendOptions, ParamView

CPU = BackendOptions(device="cpu")
SPEC = "test_quantized_weights"
runner = CliRunner()


# ---- the quantisers, each through its library's public API ------------------------------------
def _torchao(config):
    def apply(model):
        import torchao.quantization as Q

        Q.quantize_(model, config(Q))
    return apply


def _quanto(qtype: str, frozen: bool):
    def apply(model):
        from optimum import quanto

        quanto.quantize(model, weights=getattr(quanto, qtype))
        if frozen:
            quanto.freeze(model)
    return apply


def _dynamic(dtype):
    def apply(model):
        with warnings.catch_warnings():  # torch.ao.quantization is deprecated, and still in torch
            warnings.simplefilter("ignore")
            torch.ao.quantization.quantize_dynamic(model, {torch.nn.Linear}, dtype=getattr(torch, dtype), inplace=True)
    return apply


# kind -> (library to import, quantiser, scheme prefix, quantised dtype)
KINDS = {
    "torchao_int8": ("torchao", _torchao(lambda Q: Q.Int8WeightOnlyConfig()), "torchao Int8Tensor, int8", "int8"),
    "torchao_float8": ("torchao", _torchao(lambda Q: Q.Float8WeightOnlyConfig()),
                       "torchao Float8Tensor, float8_e4m3fn", "float8_e4m3fn"),
    "torchao_int4": ("torchao", _torchao(lambda Q: Q.IntxWeightOnlyConfig(weight_dtype=torch.int4)),
                     "torchao IntxUnpackedToInt8Tensor, int4", "int4"),
    "torch_ao_qint8": (None, _dynamic("qint8"), "torch.ao DynamicQuantizedLinear, qint8 per_tensor_affine", "qint8"),
    "torch_ao_float16": (None, _dynamic("float16"), "torch.ao DynamicQuantizedLinear, float16", "float16"),
    "quanto_int8": ("optimum.quanto", _quanto("qint8", frozen=True), "quanto qint8, axis 0", "int8"),
    "quanto_int4": ("optimum.quanto", _quanto("qint4", frozen=False), "quanto qint4, axis 0", "int4"),
}

# The tiny Llama: 30 parameters, 22 of them Linear weights (3 layers x 7, lm_head), which
# every kind quantises; norms and embeddings stay dense.  Measured quantised cosines
# (min-max): int8 0.99998, torch.ao qint8 0.99995-0.99998, float8 0.99968-0.99974,
# fp16 ~1 - 1e-7, int4 0.9949-0.9972: 4-bit weights fail the default 0.999, pass 0.99.
N_PARAMS, N_QUANTISED = 30, 22
PASSES = {"torchao_int8": (True, 0.99999), "torchao_float8": (True, 0.9999), "torchao_int4": (False, 0.99),
          "torch_ao_qint8": (True, 0.99999), "torch_ao_float16": (True, None), "quanto_int8": (True, 0.99999),
          "quanto_int4": (False, 0.99)}
# (default verdict, a --quantized-min-cos that flips it; None: fp16 rounding passes any bound)

FAULTS = {"transposed_q": "layer 1's square q projection transposed before quantising",
          "scaled_down": "layer 0's MLP down projection scaled by 2 before quantising"}
TRANSPOSED, SCALED = "model.layers.1.self_attn.q_proj.weight", "model.layers.0.mlp.down_proj.weight"


def _plant(model, faults):
    with torch.no_grad():
        if "transposed_q" in faults:
            q = model.model.layers[1].self_attn.q_proj.weight
            q.copy_(q.T.clone())
        if "scaled_down" in faults:
            model.model.layers[0].mlp.down_proj.weight.mul_(2.0)


def _factory(kind: str):
    quantise = KINDS[kind][1]

    def factory(opts: BackendOptions, arg: str) -> Backend:
        from parity.probes.hf.backend import factory as hf

        backend = hf(replace(opts, faults=()), arg)
        _plant(backend.model, opts.faults)
        quantise(backend.model)
        backend.name = kind
        backend.meta["faults"] = list(opts.faults)
        return backend

    factory.__doc__ = f"the hf backend, quantised after loading ({kind})"
    factory.faults = FAULTS
    return factory


for _kind in KINDS:
    globals()[_kind] = _factory(_kind)


def need(kind: str) -> None:
    library = KINDS[kind][0]
    if library:
        pytest.importorskip(library)


def cli(*args):
    result = runner.invoke(app, list(args), catch_exceptions=False)
    assert "Traceback" not in result.output
    return result.exit_code, result.output


@pytest.fixture(scope="module")
def llama(tiny_models):
    return str(tiny_models("llama"))


# ---- through the command line -----------------------------------------------------------------
@pytest.mark.parametrize("kind", list(KINDS))
def test_quantised_candidate_is_compared_by_its_scheme(kind, llama, tmp_path):
    need(kind)
    _, _, prefix, qdtype = KINDS[kind]
    default_passes, flip = PASSES[kind]
    out_json = tmp_path / "w.json"
    code, out = cli("weights", "--ref", f"hf:{llama}", "--cand", f"{SPEC}:{kind}:{llama}", "--json", str(out_json))
    assert code == (0 if default_passes else 1), out
    assert "missing" not in out and f"(q) quantised as: {prefix}" in out and f"({N_QUANTISED})" in out
    data = json.loads(out_json.read_text())
    rows = data["parameters"]
    assert len(rows) == N_PARAMS
    quantised = [r for r in rows if r["quantized"]]
    assert len(quantised) == N_QUANTISED and all(r["name"].endswith("proj.weight") or r["name"] == "lm_head.weight"
                                                 for r in quantised)
    assert all(r["quantized"].startswith(prefix) and r["cand_dtype"] == qdtype for r in quantised)
    assert all(r["status"] == "pass" for r in rows if not r["quantized"])  # norms, embeddings: dense and exact
    assert all(r["threshold"] == 0.999 for r in quantised)
    if not default_passes:  # 4-bit: every quantised weight below 0.999, named with its scheme
        assert set(data["findings"]) == {r["name"] for r in quantised}
        assert all(r["status"] == "fail" and f"< 0.999; quantised ({prefix}" in r["reason"] for r in quantised)
    if flip is not None:
        code, out = cli("weights", "--ref", f"hf:{llama}", "--cand", f"{SPEC}:{kind}:{llama}",
                        "--quantized-min-cos", str(flip))
        assert code == (1 if default_passes else 0), out
        if default_passes:
            assert f"{N_QUANTISED} FINDING(S)" in out and f"quantised ({prefix.split(',')[0]}" in out  # lines wrap


@pytest.mark.parametrize("kind", ["torchao_int8", "torch_ao_qint8", "quanto_int8", "quanto_int4"])
@pytest.mark.parametrize("fault, at, status", [("transposed_q", TRANSPOSED, "transposed"),
                                               ("scaled_down", SCALED, "fail")])
def test_a_weight_wrong_before_quantising_is_found_there(kind, fault, at, status, llama):
    need(kind)
    loose = ("--quantized-min-cos", "0.99") if kind.endswith("int4") else ()  # 4-bit rounding passes, the bug not
    code, out = cli("weights", "--ref", f"hf:{llama}", "--cand", f"{SPEC}:{kind}:{llama}", "--inject", fault, *loose)
    assert code == 1 and "1 FINDING(S)" in out, out
    report = weights_live(f"hf:{llama}", f"{SPEC}:{kind}:{llama}", CPU, faults=(fault,),
                          quantized_min_cos=0.99 if loose else None)
    [finding] = report.findings
    assert finding.name == at and finding.status == status and finding.quantized
    if status == "transposed":  # square: only the cosine tells, once transposed back it is the quantisation's
        assert "once transposed back" in finding.reason
    else:  # a weight at 2x its value has cos 1: its size gives it away
        assert finding.metrics.cos > 0.99 and 1.98 < finding.metrics.norm_ratio < 2.02
        assert finding.reason.startswith("norm ratio 2.0") or finding.reason.startswith("norm ratio 1.99")
        assert f"quantised ({KINDS[kind][2]}" in finding.reason


# ---- the library, on small modules ------------------------------------------------------------
def _mlp():
    torch.manual_seed(0)
    return torch.nn.Sequential(torch.nn.Linear(32, 64), torch.nn.ReLU(), torch.nn.Linear(64, 32))


def _copy(model):
    import copy

    return copy.deepcopy(model)


def test_dynamic_quantisation_packed_weights_are_found_under_the_float_names():
    """quantize_dynamic's Linear holds weight and bias packed: no parameters at all."""
    ref = _mlp()
    cand = _copy(ref)
    _dynamic("qint8")(cand)
    assert list(cand.named_parameters()) == []
    params = model_parameters(cand)
    assert list(params) == ["0.weight", "0.bias", "2.weight", "2.bias"]
    assert params["0.weight"].quantized == "torch.ao DynamicQuantizedLinear, qint8 per_tensor_affine"
    assert params["0.bias"].quantized is None and params["0.weight"].dtype == "qint8"
    rows = compare_params(model_parameters(ref), params)
    assert [r.status for r in rows] == ["pass"] * 4
    assert rows[1].metrics.max_abs == 0.0  # biases stay float


def test_torchao_subclass_is_dequantised_not_staged_as_is():
    """`.numpy()` is not supported for tensor subclasses: torchao's weights go through `dequantize()`."""
    pytest.importorskip("torchao")
    ref = _mlp()
    cand = _copy(ref)
    _torchao(lambda Q: Q.Int8WeightOnlyConfig())(cand)
    rows = {r.name: r for r in compare_params(model_parameters(ref), model_parameters(cand))}
    assert rows["0.weight"].passed and rows["0.weight"].quantized == "torchao Int8Tensor, int8, per-row"
    assert 0.99998 < rows["0.weight"].metrics.cos < 1


def test_undeclared_quantised_tensor_from_a_backend_view_is_recognised():
    """A backend's own `parameters` handing out a torchao weight it did not declare: judged
    as quantised (by --quantized-min-cos), not as a failing dense weight."""
    pytest.importorskip("torchao")
    ref = _mlp()
    cand = _copy(ref)
    _torchao(lambda Q: Q.IntxWeightOnlyConfig(weight_dtype=torch.int4))(cand)
    w = cand[0].weight
    [row] = compare_params({"w": ParamView("float32", (64, 32), lambda: ref[0].weight.detach())},
                           {"w": ParamView("float32", (64, 32), lambda: w)}, quantized_min_cos=0.99)
    assert row.passed and row.quantized.startswith("torchao IntxUnpackedToInt8Tensor, int4") and row.threshold == 0.99


def test_quanto_module_not_frozen_is_judged_by_what_it_computes_with():
    """Before `freeze`, a quanto QLinear holds the float weight and quantises it on every call."""
    pytest.importorskip("optimum.quanto")
    ref = _mlp()
    cand = _copy(ref)
    _quanto("qint8", frozen=False)(cand)
    assert type(cand[0].weight) is torch.nn.Parameter  # still dense, as a parameter
    params = model_parameters(cand)
    assert params["0.weight"].quantized == "quanto qint8, axis 0" and params["0.weight"].dtype == "int8"
    assert params["0.bias"].quantized is None
    rows = {r.name: r for r in compare_params(model_parameters(ref), params)}
    assert rows["0.weight"].passed and rows["0.weight"].metrics.cos < 1  # the quantised values, not the float ones


def test_native_quantised_tensor_is_dequantised():
    from parity.comparison.quantized import scheme

    w = torch.randn(8, 4)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        q = torch.quantize_per_tensor(w, scale=0.02, zero_point=0, dtype=torch.qint8)
    assert scheme(q) == "torch qint8 per_tensor_affine"
    [row] = compare_params({"w": ParamView("float32", (8, 4), lambda: w)}, {"w": ParamView("qint8", (8, 4), lambda: q)})
    assert row.passed and row.quantized == "torch qint8 per_tensor_affine"


def test_dense_models_are_untouched():
    """No quantisation: the views are the parameters as before, none marked quantised."""
    from parity.comparison.quantized import scheme

    model = _mlp()
    model[0].weight.data = model[0].weight.data.to(torch.bfloat16)
    params = model_parameters(model)
    assert [(n, v.dtype, v.quantized) for n, v in params.items()] == [
        ("0.weight", "bfloat16", None), ("0.bias", "float32", None), ("2.weight", "float32", None),
        ("2.bias", "float32", None)]
    assert np.array_equal(params["2.weight"].load().numpy(), model[2].weight.detach().numpy())
    assert scheme(torch.nn.Parameter(torch.ones(2))) is None and scheme(torch.ones(2)) is None


def test_quantisation_libraries_are_not_imported_to_look():
    """Recognised by type module name and duck typing: comparing a dense model imports neither."""
    code = ("import sys, torch; from parity.comparison.weights import compare_params, model_parameters; "
            "m = torch.nn.Linear(4, 4); compare_params(model_parameters(m), model_parameters(m)); "
            "print(sorted(k for k in sys.modules if k.split('.')[0] in ('torchao', 'optimum')))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "[]"
