"""Adversarial inputs a user or an attacker can hand parity: checkpoints, `--input` files,
`[tool.parity]`, `--device`, stats dumps.  Each is refused in one line with exit 2 (or,
for sizes, bounded by what the model declares), never a traceback, never a run that
eats the machine.  Every file here is built by the test itself (json, numpy,
safetensors, tiny seeded models)."""
from __future__ import annotations

import json
import pickle
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from ckpt_writers import L, openpi_config, openpi_state, write
from typer.testing import CliRunner

from parity.cli import app
from parity.probes.pi05.checkpoint import Checkpoint
from parity.probes.pi05.config import TINY
from parity.taps.backends import BackendError, BackendOptions, resolve

runner = CliRunner()
DEEP = 100_000  # nesting depth of the deep JSON files: far past Python's recursion limit
MAX_NUM_STEPS, MAX_POSITIONS = 100, 8192  # pi0.5's bounds, as docs/pi05.md states them


def cli(*args: str) -> tuple[int, str]:
    result = runner.invoke(app, list(args), catch_exceptions=False)
    return result.exit_code, result.output


def assert_one_line_exit_2(code: int, out: str, needle: str) -> None:
    assert code == 2, out
    assert "Traceback" not in out and len(out.strip().splitlines()) == 1, out
    assert out.startswith("error: ") and needle in out, out


def deep_json(depth: int = DEEP) -> str:
    return "[" * depth + "]" * depth


# ---- pi0.5 checkpoints: config.json and the weights' shapes --------------------------------
@pytest.fixture(scope="module")
def pi05_state():
    """Our seeded tiny pi0.5 as openpi's converter saves it (key -> tensor)."""
    model = resolve("pytorch", BackendOptions(device="cpu")).model
    return {k: v.detach().clone() for k, v in openpi_state(model).items()}, openpi_config(model, "float32")


def pi05_checkpoint(tmp_path: Path, pi05_state, config: dict | None = None, mutate=None) -> Path:
    """The checkpoint, its config.json updated by `config` (None: the key left out) and its
    weights by `mutate`."""
    state, base_config = pi05_state
    state = dict(state)
    if mutate is not None:
        mutate(state)
    merged = {k: v for k, v in {**base_config, **(config or {})}.items() if v is not None}
    return write(state, tmp_path / "ckpt", torch.float32, merged)


# Past what the model can take: openpi takes 10 steps, and the prompt, the image tokens and
# the actions share the Gemma stacks' 8192 RoPE positions.
TOO_BIG = {
    "num_steps": ({"num_steps": 10**6}, "num_steps 1000000 is more than 100 flow-matching steps"),
    "num_inference_steps": ({"num_inference_steps": 10**6}, "num_inference_steps 1000000"),
    "action_horizon": ({"action_horizon": 10**7}, "more than the 8192 the model declares"),
    "chunk_size": ({"action_horizon": None, "chunk_size": 10**7}, "chunk_size 10000000"),
    "max_token_len": ({"max_token_len": 10**8}, "max_token_len 100000000"),
    "tokenizer_max_length": ({"tokenizer_max_length": 10**8}, "more than the 8192 the model declares"),
}


@pytest.mark.parametrize("case", sorted(TOO_BIG))
def test_config_json_beyond_what_the_model_takes_is_refused_before_building(tmp_path, pi05_state, case):
    config, needle = TOO_BIG[case]
    ckpt = Checkpoint.open(pi05_checkpoint(tmp_path, pi05_state, config))
    with pytest.raises(ValueError, match="config.json") as err:
        ckpt.config_for(None)
    assert needle in str(err.value)


def test_config_json_at_the_model_bounds_is_taken(tmp_path, pi05_state):
    """The bounds are the model's own: the largest prompt that fits is accepted, one more
    token is not."""
    image_tokens = len(TINY.cameras) * TINY.vision.num_tokens
    fits = MAX_POSITIONS - image_tokens - TINY.action_horizon
    cfg = Checkpoint.open(pi05_checkpoint(tmp_path / "a", pi05_state, {"max_token_len": fits,
                                                                       "num_steps": MAX_NUM_STEPS})).config_for(None)
    assert cfg.max_token_len == fits and cfg.num_steps == MAX_NUM_STEPS
    assert cfg.prefix_len + cfg.action_horizon == MAX_POSITIONS
    over = Checkpoint.open(pi05_checkpoint(tmp_path / "b", pi05_state, {"max_token_len": fits + 1}))
    with pytest.raises(ValueError, match=f"= {MAX_POSITIONS + 1} positions"):
        over.config_for(None)


def test_config_json_with_too_many_steps_is_one_line_exit_2(tmp_path, pi05_state):
    path = pi05_checkpoint(tmp_path, pi05_state, {"num_steps": MAX_NUM_STEPS + 1})
    code, out = cli("capture", "--backend", "pytorch", "--device", "cpu", "--weights", str(path),
                    "-o", str(tmp_path / "x.h5"))
    assert_one_line_exit_2(code, out, "num_steps 101 is more than 100 flow-matching steps")
    assert not (tmp_path / "x.h5").exists()


def test_deeply_nested_config_json_is_one_line_exit_2(tmp_path, pi05_state):
    path = pi05_checkpoint(tmp_path, pi05_state)
    (path / "config.json").write_text(deep_json())
    code, out = cli("capture", "--backend", "pytorch", "--device", "cpu", "--weights", str(path),
                    "-o", str(tmp_path / "x.h5"))
    assert_one_line_exit_2(code, out, "nested too deeply")


def _no_k_rows(state: dict) -> None:
    """Every k_proj of the prefix stack with 0 rows (the head split divides by them)."""
    for key in [k for k in state if k.startswith(L) and "k_proj" in k]:
        state[key] = torch.zeros(0, state[key].shape[1])


def _one_empty(state: dict) -> None:
    state[L + "layers.0.self_attn.k_proj.weight"] = torch.zeros(0, 64)


@pytest.mark.parametrize("mutate", [_no_k_rows, _one_empty], ids=["every k_proj", "one k_proj"])
def test_k_proj_with_zero_rows_is_one_line_exit_2(tmp_path, pi05_state, mutate):
    path = pi05_checkpoint(tmp_path, pi05_state, mutate=mutate)
    code, out = cli("diff", "--ref", "pytorch", "--cand", "flash", "--device", "cpu", "--weights", str(path))
    assert_one_line_exit_2(code, out, f"empty tensor(s): {L}layers.0.self_attn.k_proj.weight [0, 64]")


def test_no_checkpoint_shape_makes_size_inference_raise_anything_but_value_error(tmp_path, pi05_state):
    """A 0 in any dimension of any weight: a ValueError (exit 2), never a ZeroDivisionError."""
    from parity.probes.pi05.checkpoint import expected_shapes, infer_config

    shapes = expected_shapes(TINY)
    for name, shape in shapes.items():
        for axis in range(len(shape)):
            broken = {n: (s if n != name else s[:axis] + (0,) + s[axis + 1:]) for n, s in shapes.items()}
            try:
                infer_config(broken)
            except ValueError:
                pass


# ---- hf checkpoints and --input files -------------------------------------------------------
def hf_capture(model: Path, tmp_path: Path, *args: str) -> tuple[int, str]:
    out = tmp_path / "x.h5"
    out.unlink(missing_ok=True)
    code, text = cli("capture", "--backend", f"hf:{model}", "--device", "cpu", "-o", str(out), "--quiet", *args)
    assert code != 2 or not out.exists(), "a refused run wrote a dump"
    return code, text


def test_hf_more_tokens_than_the_model_positions_is_refused_before_it_runs(tiny_models, tmp_path):
    """The tiny llama declares 64 positions (max_position_embeddings): 64 tokens run, 65
    are refused when the backend is built, from a file or generated."""
    model = tiny_models("llama")
    for n in (64, 65):
        (tmp_path / f"{n}.json").write_text(json.dumps([[5] * n, [6] * 3]))
    assert hf_capture(model, tmp_path, "--input", str(tmp_path / "64.json"))[0] == 0
    code, out = hf_capture(model, tmp_path, "--input", str(tmp_path / "65.json"))
    assert_one_line_exit_2(code, out, "row 0: 65 tokens, more than the 64 positions the model declares")
    code, out = hf_capture(model, tmp_path, "--seq-len", "65")
    assert_one_line_exit_2(code, out, "--seq-len: 65 tokens, more than the 64 positions")
    with pytest.raises(BackendError, match="more than the 64 positions"):  # the factory: nothing has run yet
        resolve(f"hf:{model}", BackendOptions(device="cpu", inputs=[[5] * 20_000]))


def _huge_npy(path: Path) -> None:
    """A .npy whose header declares 2**40 int64 ids (8 TiB) over 64 bytes of data."""
    with path.open("wb") as f:
        np.lib.format.write_array_header_1_0(f, {"descr": "<i8", "fortran_order": False, "shape": (2**20, 2**20)})
        f.write(bytes(64))


BAD_INPUT_FILES = {
    "json nested 100,000 deep": ("deep.json", lambda p: p.write_text(deep_json()), "nested too deeply"),
    "npy header of 2**40 elements": ("huge.npy", _huge_npy, "its header declares 1099511627776 elements"),
    "(0, 4) npy": ("empty.npy", lambda p: np.save(p, np.zeros((0, 4), dtype=np.int64)), "no token ids and no pixels"),
    "input_ids null": ("null.json", lambda p: p.write_text('{"input_ids": null}'), "no token ids and no pixels"),
    "uint64 above 2**63": ("u64.npy", lambda p: np.save(p, np.array([[5, 6, 2**63 + 5]], dtype=np.uint64)),
                           "token id 9223372036854775813 does not fit in int64"),
    "float ids under a mask": ("float.json", lambda p: p.write_text(json.dumps(
        {"input_ids": [[5.7, 6.2]], "attention_mask": [[1, 1]]})), "input_ids must be integer token ids"),
}


@pytest.mark.parametrize("case", sorted(BAD_INPUT_FILES))
def test_bad_input_file_is_one_line_exit_2_never_replaced_by_generated_prompts(tiny_models, tmp_path, case):
    name, make, needle = BAD_INPUT_FILES[case]
    make(tmp_path / name)
    code, out = hf_capture(tiny_models("llama"), tmp_path, "--input", str(tmp_path / name))
    assert_one_line_exit_2(code, out, needle)


def test_empty_inputs_in_memory_are_refused_too(tiny_models):
    for empty in (np.zeros((0, 4), dtype=np.int64), {"input_ids": None}, {"input_ids": None, "pixel_values": None}):
        with pytest.raises(BackendError, match="no token ids and no pixels"):
            resolve(f"hf:{tiny_models('llama')}", BackendOptions(device="cpu", inputs=empty))


class _Trap:
    """Unpickling this creates the file `marker`: proof that a pickle was executed."""

    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return (open, (str(self.marker), "w"))


def _hf_folder(tiny_models, tmp_path: Path, name: str) -> Path:
    folder = tmp_path / name
    shutil.copytree(tiny_models("llama"), folder)
    return folder


def test_hf_checkpoint_of_pickled_weights_is_refused_unopened(tiny_models, tmp_path):
    """A pytorch_model.bin is a pickle: refused in one line without being opened (not even
    by torch.load's weights_only check); next to safetensors weights it is ignored."""
    marker = tmp_path / "unpickled"
    folder = _hf_folder(tiny_models, tmp_path, "bin")
    (folder / "pytorch_model.bin").write_bytes(pickle.dumps(_Trap(marker)))
    (folder / "model.safetensors").unlink()
    code, out = hf_capture(folder, tmp_path)
    assert_one_line_exit_2(code, out, "has no .safetensors weights (it holds pytorch_model.bin")
    both = _hf_folder(tiny_models, tmp_path, "both")
    (both / "pytorch_model.bin").write_bytes(pickle.dumps(_Trap(marker)))
    assert hf_capture(both, tmp_path)[0] == 0
    assert not marker.exists()


def _config(folder: Path, edit) -> None:
    path = folder / "config.json"
    if callable(edit):
        path.write_text(json.dumps(edit(json.loads(path.read_text()))))
    else:
        path.write_text(edit)


BAD_HF_CONFIGS = {
    "architectures pipeline": (lambda c: {**c, "architectures": ["pipeline"]},
                               "architectures names 'pipeline', which is not a transformers model class"),
    "architectures a number": (lambda c: {**c, "architectures": 5}, "architectures must be a list of class names"),
    "architectures a config class": (lambda c: {**c, "architectures": ["LlamaConfig"]},
                                     "which loads a LlamaConfig, not a transformers model"),
    "nested 100,000 deep": (deep_json(), "nested too deeply"),
    "not an object": ("[1, 2]", "expected a JSON object"),
    "a size of the wrong type": (lambda c: {**c, "num_hidden_layers": 1e9}, "expected int, got float"),
    "more layers than the weights hold": (lambda c: {**c, "num_hidden_layers": 4},
                                          "num_hidden_layers 4, but the weights hold at most 3 layers"),
    "other sizes than the weights hold": (lambda c: {**c, "intermediate_size": 63},
                                          "9 weight(s) do not have the shape config.json describes"),
    # transformers would build these at config.json's sizes before reading a weight
    "10^7 layers": (lambda c: {**c, "num_hidden_layers": 10**7}, "num_hidden_layers 10000000, but the weights hold "
                                                                 "at most 3 layers"),
    "10^7 layers in a sub-config": (lambda c: {**c, "vision_config": {"num_hidden_layers": 10**7}},
                                    "vision_config.num_hidden_layers 10000000"),
    "hidden size 10^6": (lambda c: {**c, "hidden_size": 10**6}, "config.json describes a model of 1,127,000,000 "
                                                                "parameters, but the weights hold 36,064"),
    "vocabulary 10^9": (lambda c: {**c, "vocab_size": 10**9}, "but the weights hold 36,064"),
}


@pytest.mark.parametrize("case", sorted(BAD_HF_CONFIGS))
def test_bad_hf_config_json_is_one_line_exit_2(tiny_models, tmp_path, case):
    edit, needle = BAD_HF_CONFIGS[case]
    folder = _hf_folder(tiny_models, tmp_path, "m")
    _config(folder, edit)
    code, out = hf_capture(folder, tmp_path)
    assert_one_line_exit_2(code, out, needle)


def test_hf_weights_that_leave_a_parameter_unfilled_are_refused(tiny_models, tmp_path):
    """transformers fills what the weights lack at random and says so in a log line only:
    the final norm's weight swapped for an unrelated tensor of the same size is refused."""
    from safetensors.torch import load_file, save_file

    folder = _hf_folder(tiny_models, tmp_path, "m")
    state = load_file(str(folder / "model.safetensors"))
    state["unrelated.weight"] = state.pop("model.norm.weight")
    save_file(state, str(folder / "model.safetensors"), metadata={"format": "pt"})
    code, out = hf_capture(folder, tmp_path)
    assert_one_line_exit_2(code, out, "the weights leave 1 parameter(s) of the model config.json describes unfilled "
                                      "(model.norm.weight)")


def test_hf_architectures_may_name_an_auto_class(tiny_models, tmp_path):
    folder = _hf_folder(tiny_models, tmp_path, "m")
    _config(folder, lambda c: {**c, "architectures": ["AutoModelForCausalLM"]})
    assert hf_capture(folder, tmp_path)[0] == 0


@pytest.mark.parametrize("device, needle", [("bogus", "device 'bogus' is not a device"),
                                            ("meta", "device meta holds no values")])
def test_hf_spec_device_that_cannot_compute_is_one_line_exit_2(tiny_models, tmp_path, device, needle):
    code, out = cli("capture", "--backend", f"hf:{tiny_models('llama')}@device={device}", "-o",
                    str(tmp_path / "x.h5"), "--quiet")
    assert_one_line_exit_2(code, out, needle)


# ---- [tool.parity] in pyproject.toml ----------------------------------------------------------
BAD_PYPROJECTS = {
    "tool = 5": (b"tool = 5\n", "tool must be a table"),
    "tool a string": (b'tool = "parity"\n', "tool must be a table"),
    "not UTF-8": (b"[tool.parity]\nmin_cos = 0.9  # caf\xe9\n", "not UTF-8"),
    "nested 100,000 deep": (f"a = {deep_json()}\n".encode(), "nested too deeply"),
}


@pytest.mark.parametrize("case", sorted(BAD_PYPROJECTS))
def test_bad_pyproject_is_one_line_exit_2(tmp_path, monkeypatch, case):
    content, needle = BAD_PYPROJECTS[case]
    (tmp_path / "pyproject.toml").write_bytes(content)
    monkeypatch.chdir(tmp_path)
    code, out = cli("diff", "a.h5", "b.h5")
    assert_one_line_exit_2(code, out, needle)
    assert "pyproject.toml" in out


def test_min_cos_of_zero_in_pyproject_is_the_gate_of_a_live_compare(tmp_path):
    """[tool.parity] min_cos = 0 is a value (the gate), not "unset": the pytest plugin's
    path (parity.compare with the settings) keeps it, as the CLI does."""
    from parity.api import compare
    from parity.settings import load_settings

    (tmp_path / "pyproject.toml").write_text("[tool.parity]\nmin_cos = 0\n")
    report = compare("pytorch", "flash_fp8", faults=["nomask"], device="cpu", taps="prefix.0.attn",
                     settings=load_settings(tmp_path))
    assert report.thresholds["min_cos"] == 0.0
    assert all(row.threshold == 0.0 for row in report.rows)


# ---- --device ---------------------------------------------------------------------------------
DEVICE_COMMANDS = {
    "diff": ["diff", "--ref", "pytorch", "--cand", "flash"],
    "capture": ["capture", "--backend", "pytorch", "-o", "unused.h5"],
    "component": ["component", "--ref", "pytorch", "--cand", "flash", "--layer", "0", "--part", "mlp"],
    "weights": ["weights", "--ref", "pytorch", "--cand", "flash"],
    "frames": ["frames", "--ref", "pytorch", "--cand", "flash", "--frames", "2"],
}


@pytest.mark.parametrize("command", sorted(DEVICE_COMMANDS))
@pytest.mark.parametrize("device, needle", [("bogus", "--device 'bogus' is not a device"),
                                            ("meta", "--device meta holds shapes, no values"),
                                            ("cpu:-1", "is not a device")])
def test_device_that_is_not_one_or_cannot_compute_is_one_line_exit_2(tmp_path, monkeypatch, command, device, needle):
    monkeypatch.chdir(tmp_path)
    code, out = cli(*DEVICE_COMMANDS[command], "--device", device)
    assert_one_line_exit_2(code, out, needle)
    assert not (tmp_path / "unused.h5").exists()


def test_device_is_checked_by_the_python_api_too():
    from parity.api import compare
    from parity.errors import InputError

    for device in ("bogus", "meta"):
        with pytest.raises(InputError, match="--device"):
            compare("pytorch", "flash", device=device)


# ---- stats dumps whose meta has the wrong types ---------------------------------------------------
def _stats_dumps(tmp_path: Path, ref_meta: dict, cand_meta: dict) -> tuple[Path, Path]:
    """Two stats dumps of the toy chain, the candidate's weights changed (so the diff fails
    and suggests commands from the runs' metadata), each meta updated as given."""
    from parity.api import run_capture

    paths = []
    for name, patch, scale in (("ref", ref_meta, 1.0), ("cand", cand_meta, 1.5)):
        backend = resolve("toy_backends:slow", BackendOptions(device="cpu"))
        with torch.no_grad():
            next(backend.model.parameters()).mul_(scale)
        backend.meta.update(patch)
        paths.append(Path(run_capture(backend, tmp_path / f"{name}_stats.h5", stats=True).path))
    return paths[0], paths[1]


BAD_STATS_META = {
    "backend a number": ({"backend": 5}, "its meta backend is int 5, not a string"),
    "backend an object": ({"backend": {"a": 1}}, "its meta backend is dict"),
    "faults a number": ({"faults": 7}, "its meta faults is int 7, not a list of names"),
    "faults a string": ({"faults": "nomask"}, "its meta faults is str"),
    "faults of numbers": ({"faults": [1, 2]}, "its meta faults is list [1, 2]"),
}


@pytest.mark.parametrize("side", ["reference", "candidate"])
@pytest.mark.parametrize("case", sorted(BAD_STATS_META))
def test_stats_diff_whose_meta_has_wrong_types_is_one_line_exit_2(tmp_path, side, case):
    patch, needle = BAD_STATS_META[case]
    ref, cand = _stats_dumps(tmp_path, patch if side == "reference" else {}, patch if side == "candidate" else {})
    code, out = cli("diff", str(ref), str(cand))
    assert_one_line_exit_2(code, out, f"{side} {ref if side == 'reference' else cand}: {needle}")


def test_stats_diff_with_well_typed_meta_still_suggests_commands(tmp_path):
    ref, cand = _stats_dumps(tmp_path, {}, {"faults": ["planted"]})
    code, out = cli("diff", str(ref), str(cand))
    assert code == 1, out
    assert "parity diff --ref toy --cand toy --inject planted" in out
