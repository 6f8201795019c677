"""--weights: checkpoints in the openpi and lerobot layouts load bit-exactly, and every
broken checkpoint is an input error (exit 2) that names the key, never a random model."""
from __future__ import annotations

import json
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
import torch
from ckpt_writers import (
    EXPERT_LM_HEAD,
    PALIGEMMA_LM_HEAD,
    E,
    L,
    lerobot_config,
    lerobot_state,
    openpi_config,
    openpi_state,
    write,
)
from safetensors.torch import save_file
from typer.testing import CliRunner

from parity.capture.recorder import capture
from parity.cli import app
from parity.dump.reader import read_dump
from parity.probes.pi05.checkpoint import MAX_LINES, expected_shapes, infer_config
from parity.probes.pi05.ckpt_layout import LEROBOT, OPENPI, file_key, map_keys
from parity.probes.pi05.config import FULL, TINY, GemmaConfig
from parity.probes.pi05.fp8 import Fp8Weight
from parity.taps.backends import BackendOptions, resolve

CPU = BackendOptions(device="cpu")
GATE = L + "layers.0.mlp.gate_proj.weight"  # [128, 64] in tiny: not square, so a transpose changes its shape


def seeded(spec="pytorch", seed=0):
    return resolve(spec, replace(CPU, seed=seed))


def loaded(path, spec="pytorch", **kw):
    return resolve(spec, replace(CPU, weights=str(path), **kw))


@torch.no_grad()
def round_through(model, dtype):
    """What a checkpoint saved in `dtype` holds: every parameter rounded to it."""
    for p in model.parameters():
        p.copy_(p.to(dtype))
    return model


def assert_same_taps(a, b):
    """Bit-exact: the same taps, dtypes and bits, actions included."""
    ca, cb = capture(a), capture(b)
    assert ca.error is None and cb.error is None
    assert [t.key for t in ca.taps] == [t.key for t in cb.taps]
    for ta, tb in zip(ca.taps, cb.taps):
        assert ta.dtype == tb.dtype and np.array_equal(ta.array, tb.array), ta.key
    assert "output.actions" in {t.key for t in ca.taps}


def assert_same_params(a, b):
    pa, pb = dict(a.named_parameters()), dict(b.named_parameters())
    assert pa.keys() == pb.keys()
    for name in pa:
        assert pa[name].dtype == pb[name].dtype and torch.equal(pa[name], pb[name]), name


# ---- loading ------------------------------------------------------------------------
def test_openpi_bf16_checkpoint_as_converted_loads_bit_exact(tmp_path):
    """openpi's converter writes every tensor in bf16, the text embedding under the tied
    lm_head name, and the expert's unused lm_head."""
    ref = seeded()
    path = write(openpi_state(ref.model), tmp_path / "pi05_pytorch", torch.bfloat16,
                 openpi_config(ref.model, "bfloat16"))
    got = loaded(path)
    round_through(ref.model, torch.bfloat16)  # the fp32-kept norms/embeddings now hold bf16 values
    assert_same_params(ref.model, got.model)
    assert_same_taps(ref, got)
    meta = got.meta["weights"]
    assert got.meta["config"] == "tiny"
    assert meta["layout"] == OPENPI and meta["loaded_dtypes"] == {"bfloat16": meta["loaded"]}
    assert meta["unused_keys"] == [EXPERT_LM_HEAD]
    assert any(PALIGEMMA_LM_HEAD in n for n in meta["notes"])


def test_openpi_fp32_safetensors_file_without_config_json(tmp_path):
    ref = seeded()
    write(openpi_state(ref.model), tmp_path, torch.float32)
    got = loaded(tmp_path / "model.safetensors")
    assert got.meta["config"] == "tiny"
    assert_same_params(ref.model, got.model)
    assert_same_taps(ref, got)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_lerobot_layout_with_its_renames_and_drops_loads_bit_exact(tmp_path, dtype):
    ref = seeded()
    write(lerobot_state(ref.model), tmp_path, dtype, lerobot_config(ref.model))
    got = loaded(tmp_path)
    round_through(ref.model, dtype)
    assert_same_taps(ref, got)
    meta = got.meta["weights"]
    assert meta["layout"] == LEROBOT
    unused = meta["unused_keys"]
    assert "model.state_proj.weight" in unused and f"model.{E}layers.0.input_layernorm.weight" in unused
    assert f"model.{E}norm.weight" in unused and f"model.{EXPERT_LM_HEAD}" in unused


def test_weights_come_from_the_file_not_the_seed(tmp_path):
    other = seeded(seed=1)
    write(openpi_state(other.model), tmp_path, torch.float32)
    got = loaded(tmp_path, seed=0)  # seed 0 still draws the inputs and noise
    assert_same_params(other.model, got.model)
    assert not torch.equal(seeded().model.projector.weight, got.model.projector.weight)


def test_fp8_candidate_quantises_the_loaded_weights(tmp_path):
    ref = seeded("flash_fp8")
    write(openpi_state(seeded().model), tmp_path, torch.float32)
    got = loaded(tmp_path, "flash_fp8")
    assert_same_taps(ref, got)
    write(openpi_state(seeded().model), tmp_path / "bf16", torch.bfloat16)
    mlp = round_through(seeded().model, torch.bfloat16).prefix.layers[0].mlp
    fp8 = loaded(tmp_path / "bf16", "flash_fp8").model.prefix.layers[0].mlp.gate_up_w
    want = Fp8Weight.quantize(torch.cat([mlp.gate_proj.weight, mlp.up_proj.weight]))
    assert torch.equal(fp8.data.view(torch.uint8), want.data.view(torch.uint8)) and torch.equal(fp8.scale, want.scale)


def test_config_json_sets_what_weights_cannot(tmp_path):
    ref = seeded()
    config = {**openpi_config(ref.model, "float32"), "action_horizon": 4}
    write(openpi_state(ref.model), tmp_path, torch.float32, config)
    got = loaded(tmp_path)
    assert got.model.cfg.action_horizon == 4 and got.meta["config"] == "tiny(action_horizon=4)"
    assert got.run().shape == (1, 4, TINY.action_dim)


# ---- the key tables and size inference, without files ---------------------------------
@pytest.mark.parametrize("layout", [OPENPI, LEROBOT])
def test_every_parameter_has_a_key_that_maps_back(layout):
    names = list(expected_shapes(TINY))
    keys = [file_key(n, layout) for n in names]
    assert None not in keys and len(set(keys)) == len(keys)
    keymap = map_keys(keys)
    assert keymap.layout == layout and not keymap.problems
    assert keymap.sources == dict(zip(names, keys))


def test_sizes_are_inferred_from_shapes():
    assert infer_config(expected_shapes(FULL)) == FULL
    assert infer_config(expected_shapes(TINY)) == TINY
    wider = replace(TINY, llm=GemmaConfig(width=96, depth=4, mlp_dim=192, num_heads=2, num_kv_heads=1, head_dim=16),
                    vocab_size=300)
    got = infer_config(expected_shapes(wider))
    assert got.name == "custom" and replace(got, name=wider.name) == wider


# ---- broken checkpoints: exit 2, one line per problem, the key named ----------------
runner = CliRunner()


def cli(*args):
    result = runner.invoke(app, list(args), catch_exceptions=False)
    return result.exit_code, result.output


def variant(tmp_path, mutate) -> Path:
    state = {k: v.detach().clone() for k, v in openpi_state(seeded().model).items()}
    mutate(state)
    return write(state, tmp_path / "ckpt", torch.bfloat16)


def _set(key, value):
    return lambda sd: sd.__setitem__(key, value(sd) if callable(value) else value)


BROKEN = {
    "missing": (lambda sd: sd.pop(L + "layers.2.self_attn.q_proj.weight"),
                f"missing key {L}layers.2.self_attn.q_proj.weight [32, 64]"),
    "unexpected": (_set(L + "layers.0.self_attn.rotary.weight", torch.zeros(4)),
                   f"unexpected key {L}layers.0.self_attn.rotary.weight"),
    "wrong shape": (_set(GATE, lambda sd: sd[GATE][:, :63]), f"{GATE}: shape [128, 63], expected [128, 64]"),
    "transposed": (_set(GATE, lambda sd: sd[GATE].T), f"{GATE}: shape [64, 128], expected [128, 64] (transposed?)"),
    "int dtype": (_set(GATE, lambda sd: sd[GATE].to(torch.int8)), f"{GATE}: dtype I8 is not a float weight"),
    "nan": (_set(GATE, lambda sd: sd[GATE].index_fill(0, torch.tensor([3]), float("nan"))),
            f"{GATE}: 64 NaN/Inf value(s)"),
    "pi0": (_set("state_proj.weight", torch.zeros(32, 32)), "this looks like a pi0 checkpoint"),
    "mixed layouts": (_set("model." + GATE, torch.zeros(1)), "checkpoint mixes layouts"),
}


@pytest.mark.parametrize("case", sorted(BROKEN))
def test_broken_checkpoint_is_an_input_error_naming_the_key(tmp_path, case):
    mutate, needle = BROKEN[case]
    path = variant(tmp_path, mutate)
    code, out = cli("diff", "--ref", "pytorch", "--cand", "flash", "--weights", str(path))
    assert code == 2, out
    assert needle in out and "Traceback" not in out
    assert out.startswith("error: backend 'pytorch'")


def _garbage(tmp_path):
    (tmp_path / "model.safetensors").write_bytes(b"definitely not a safetensors file")
    return tmp_path


def _truncated(tmp_path):
    path = write(openpi_state(seeded().model), tmp_path, torch.bfloat16) / "model.safetensors"
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])
    return tmp_path


def _pickle(tmp_path):
    torch.save({"a": torch.zeros(1)}, tmp_path / "model.pt")
    return tmp_path / "model.pt"


def _foreign(tmp_path):
    save_file({"encoder.weight": torch.zeros(2, 2)}, str(tmp_path / "model.safetensors"))
    return tmp_path


def _bad_config_json(tmp_path):
    write(openpi_state(seeded().model), tmp_path, torch.bfloat16)
    (tmp_path / "config.json").write_text(json.dumps({"action_horizon": -3}))
    return tmp_path


UNREADABLE = {
    "garbage": (_garbage, "cannot read checkpoint"),
    "truncated": (_truncated, "incomplete metadata"),
    "pickle": (_pickle, "only .safetensors files are read"),
    "foreign": (_foreign, "not a pi0.5 checkpoint"),
    "no file": (lambda p: p / "nothing_here", "no such file or directory"),
    "empty dir": (lambda p: p, "has no model.safetensors"),
    "bad config.json": (_bad_config_json, "action_horizon must be a positive integer"),
}


@pytest.mark.parametrize("case", sorted(UNREADABLE))
def test_unreadable_checkpoint_is_one_line_exit_2(tmp_path, case):
    make, needle = UNREADABLE[case]
    code, out = cli("capture", "--backend", "flash_fp8", "--weights", str(make(tmp_path)), "-o",
                    str(tmp_path / "x.h5"))
    assert code == 2, out
    assert needle in out and "Traceback" not in out
    assert len(out.strip().splitlines()) == 1
    assert not (tmp_path / "x.h5").exists()


def test_explicit_config_must_match_the_weights(tmp_path):
    path = write(openpi_state(seeded().model), tmp_path, torch.bfloat16)
    code, out = cli("diff", "--ref", "pytorch", "--cand", "flash", "--weights", str(path), "--config", "full")
    assert code == 2 and "the weights are config tiny, not full: vision width 32 (config 1152)" in out
    assert "leave out --config" in out


def test_a_screenful_of_problems_then_a_count(tmp_path):
    path = variant(tmp_path, lambda sd: [sd.pop(k) for k in list(sd) if k.startswith(E + "layers.")])
    code, out = cli("diff", "--ref", "pytorch", "--cand", "flash", "--weights", str(path))
    lines = out.strip().splitlines()
    assert code == 2 and "44 problem(s)" in lines[0]
    assert len(lines) == 1 + MAX_LINES + 1 and lines[-1].strip() == f"... and {44 - MAX_LINES} more"


def test_weights_with_offline_diff_is_a_usage_error(tmp_path):
    code, out = cli("diff", "a.h5", "b.h5", "--weights", str(tmp_path))
    assert code == 2 and "--weights applies to live backends" in out


# ---- the CLI with a good checkpoint -----------------------------------------------
def test_live_diff_and_capture_with_weights(tmp_path):
    path = write(lerobot_state(seeded().model), tmp_path / "ckpt", torch.bfloat16, lerobot_config(seeded().model))
    code, out = cli("diff", "--ref", "pytorch", "--cand", "flash", "--weights", str(path))
    assert code == 0 and "PASS: all" in out and "(lerobot layout)" in out
    dump = tmp_path / "fp8.h5"
    code, _ = cli("capture", "--backend", "flash_fp8", "--weights", str(path), "-o", str(dump))
    assert code == 0
    meta = read_dump(dump).meta
    assert meta["weights"]["layout"] == LEROBOT and meta["weights"]["path"].endswith("model.safetensors")
