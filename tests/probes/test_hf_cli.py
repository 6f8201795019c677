"""The hf backend through the CLI: exit codes, banner, one-line errors, inputs from files,
report formats, Model Explorer node ids from a torch.export program."""
from __future__ import annotations

import json

import numpy as np
import pytest
from typer.testing import CliRunner

pytest.importorskip("transformers")

from parity.cli import app  # noqa: E402

runner = CliRunner()


def run(*args):
    result = runner.invoke(app, list(args), catch_exceptions=False)
    return result.exit_code, result.output


def test_eager_vs_sdpa_exits_0(tiny_models):
    m = tiny_models("llama")
    code, out = run("diff", "--ref", f"hf:{m}@attn=eager,dtype=float32", "--cand", f"hf:{m}@attn=sdpa,dtype=float32",
                    "--batch", "3", "--padding", "left")
    assert code == 0, out
    assert "PASS: all 30 taps" in out and "padding left vs left" in out


def test_planted_bug_exits_1_and_names_layer_and_component(tiny_models, tmp_path):
    m = tiny_models("llama")
    code, out = run("diff", "--ref", f"hf:{m}", "--cand", f"hf_tiny:perturbed_mlp:{m}", "--batch", "2",
                    "--json", str(tmp_path / "r.json"))
    assert code == 1
    assert "FIRST DIVERGENCE: decoder.1.mlp" in out and "stack decoder, layer 1, component mlp" in out
    data = json.loads((tmp_path / "r.json").read_text())
    assert data["first_divergence"]["tap"] == "decoder.1.mlp"
    assert data["ref"]["modules"]["decoder.1.mlp"] == "model.layers.1.mlp"
    assert data["ref"]["modules"]["decoder.1.attn"] == "model.layers.1.self_attn.o_proj:input"


def test_inputs_file_and_left_padding(tiny_models, tmp_path):
    m = tiny_models("qwen2")
    ids = tmp_path / "ids.json"
    ids.write_text(json.dumps([[5, 6, 7, 8, 9, 10], [11, 12], [13, 14, 15]]))
    code, out = run("diff", "--ref", f"hf:{m}@attn=eager", "--cand", f"hf:{m}@attn=sdpa", "--input", str(ids),
                    "--padding", "left")
    assert code == 0, out
    assert f"inputs {ids} (batch 3" in out.replace("\n", "")


@pytest.mark.parametrize("cand, extra, needle", [
    ("hf:{m}@colour=red", (), "unknown hf option 'colour'"),
    ("hf:{m}/nowhere", (), "is not a saved transformers model"),
    ("hf:{m}", ("--input", "{tmp}/missing.json"), "does not exist"),
    ("hf:{m}", ("--input", "{tmp}/bad.npy"), "expected token ids"),
    ("hf:{m}", ("--padding", "middle"), "padding must be left or right"),
    ("hf", (), "needs an argument"),
    ("hf:{m}", ("--weights", "{tmp}/ckpt"), "--weights and --config apply to the pi0.5 backends"),
    ("hf:{m}", ("--config", "tiny"), "--weights and --config apply to the pi0.5 backends"),
])
def test_usage_errors_exit_2_with_one_line(tiny_models, tmp_path, cand, extra, needle):
    m = tiny_models("llama")
    np.save(tmp_path / "bad.npy", np.zeros((2, 2, 2), dtype=np.int64))
    args = [a.format(m=m, tmp=tmp_path) for a in extra]
    code, out = run("diff", "--ref", f"hf:{m}", "--cand", cand.format(m=m), *args)
    assert code == 2, out
    assert needle in out and "Traceback" not in out
    assert len([line for line in out.strip().splitlines() if line.strip()]) == 1


def test_capture_then_offline_diff(tiny_models, tmp_path):
    m = tiny_models("gemma")
    a, b = tmp_path / "eager.h5", tmp_path / "sdpa.h5"
    assert run("capture", "--backend", f"hf:{m}@attn=eager", "--batch", "2", "-o", str(a))[0] == 0
    assert run("capture", "--backend", f"hf:{m}@attn=sdpa", "--batch", "2", "-o", str(b))[0] == 0
    code, out = run("diff", str(a), str(b))
    assert code == 0 and "PASS" in out
    code, out = run("inspect", str(a))
    assert code == 0 and "decoder.2.mlp" in out and "taps mapped to modules" in out


def test_model_explorer_node_ids_from_an_exported_program(tiny_models, tmp_path):
    import torch
    import transformers

    m = tiny_models("llama")
    result = tmp_path / "r.json"
    assert run("diff", "--ref", f"hf:{m}", "--cand", f"hf_tiny:perturbed_mlp:{m}", "--json", str(result))[0] == 1
    model = transformers.AutoModelForCausalLM.from_pretrained(m).eval()
    ep = torch.export.export(model, (), {"input_ids": torch.ones(1, 8, dtype=torch.long), "use_cache": False},
                             strict=False)
    torch.export.save(ep, tmp_path / "model.pt2")
    out = tmp_path / "r.me.json"
    code, text = run("report", str(result), "--format", "model-explorer", "--exported-program",
                     str(tmp_path / "model.pt2"), "-o", str(out))
    assert code == 0, text
    results = json.loads(out.read_text())["results"]
    fx_names = {n.name for n in ep.graph_module.graph.nodes}
    assert results and set(results) <= fx_names
    mlp_node = next(n for n in ep.graph_module.graph.nodes if n.name in results and results[n.name]["bgColor"] ==
                    "#f4a3a3")
    assert mlp_node.meta["nn_module_stack"]  # the first failing node sits inside a module
    assert any(p == "model.layers.1.mlp" for p, _ in mlp_node.meta["nn_module_stack"].values())


def test_weights_command_compares_hf_parameters(tiny_models, tmp_path):
    """`parity weights` on backends without `Backend.parameters`: named_parameters() of each model."""
    m = tiny_models("llama")
    code, out = run("weights", "--ref", f"hf:{m}@attn=eager", "--cand", f"hf:{m}@attn=sdpa")
    assert code == 0, out
    assert "PASS: all" in out and "parameters within thresholds" in out
    code, out = run("weights", "--ref", f"hf:{m}@dtype=float32", "--cand", f"hf:{m}@dtype=bfloat16",
                    "--json", str(tmp_path / "w.json"))
    assert code == 1, out
    assert "lossy cast float32 -> bfloat16" in out
    data = json.loads((tmp_path / "w.json").read_text())
    assert data["passed"] is False and data["counts"].get("dtype", 0) > 0


def test_help_states_the_hf_backends_defaults():
    from parity.probes.hf.backend import DEFAULT_PADDING
    from parity.probes.hf.inputs import DEFAULT_SEQ_LEN
    from parity.probes.hf.spec import OPTIONS

    result = runner.invoke(app, ["diff", "--help"], env={"COLUMNS": "400"})
    text = " ".join(result.output.split())
    assert f"tokens per generated prompt (default {DEFAULT_SEQ_LEN})" in text
    assert f"else {DEFAULT_PADDING}" in OPTIONS["padding"]
