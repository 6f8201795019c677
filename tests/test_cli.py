"""Golden CLI tests through Typer's CliRunner: exit codes, banner, JSON."""
from __future__ import annotations

import json
import subprocess
import sys

import pytest
from typer.testing import CliRunner

from parity.cli import app

runner = CliRunner()


def run(*args):
    result = runner.invoke(app, list(args), catch_exceptions=False)
    return result.exit_code, result.output


def assert_close(a, b, path="") -> None:
    """JSON results equal, numbers to float64 rounding (the live diff sums on the device,
    in another order than numpy)."""
    if isinstance(a, float) and isinstance(b, float):
        assert a == b or abs(a - b) <= 1e-12 * max(1.0, abs(a)), f"{path}: {a} vs {b}"
    elif isinstance(a, dict) and isinstance(b, dict):
        assert a.keys() == b.keys(), path
        for k in a:
            assert_close(a[k], b[k], f"{path}.{k}")
    elif isinstance(a, list) and isinstance(b, list):
        assert len(a) == len(b), path
        for i, (x, y) in enumerate(zip(a, b)):
            assert_close(x, y, f"{path}[{i}]")
    else:
        assert a == b, f"{path}: {a!r} vs {b!r}"


def test_main_job_names_first_divergence_and_exits_1(tmp_path):
    out_json = tmp_path / "r.json"
    code, out = run("diff", "--ref", "pytorch", "--cand", "flash_fp8", "--inject", "nomask", "--json", str(out_json))
    assert code == 1
    assert "FIRST DIVERGENCE: prefix.0.attn" in out
    assert "stack prefix, layer 0, component attn" in out
    assert "k cos=1.000000 max_diff=0 | v cos=1.000000 max_diff=0" in out
    assert "Traceback" not in out
    data = json.loads(out_json.read_text())
    assert data["passed"] is False
    assert data["first_divergence"] == {"tap": "prefix.0.attn", "stack": "prefix", "layer": 0, "component": "attn",
                                        "step": None, "status": "fail",
                                        "reason": data["first_divergence"]["reason"]}
    tap_keys = {"tap", "stack", "layer", "component", "step", "cos", "max_abs", "mean_abs", "rel_l2", "nan_ref",
                "nan_cand", "status"}
    assert data["taps"] and all(tap_keys <= set(t) for t in data["taps"])


def test_flash_passes_and_exits_0():
    code, out = run("diff", "--ref", "pytorch", "--cand", "flash")
    assert code == 0 and "PASS: all" in out


def test_fp8_gate_as_documented():
    code, _ = run("diff", "--ref", "pytorch", "--cand", "flash_fp8", "--min-cos", "0.995", "--threshold", "*.mlp=0.99")
    assert code == 0
    code, out = run("diff", "--ref", "pytorch", "--cand", "flash_fp8", "--min-cos", "0.999")
    assert code == 1 and "component mlp" in out  # FP8's error is real
    code, out = run("diff", "--ref", "pytorch", "--cand", "flash_fp8")  # the candidate's declared allowance
    assert code == 0 and "declared bounds (FP8 e4m3 Gemma MLP gate/up projections)" in out


def test_candidate_that_raises_is_a_finding_not_a_traceback():
    code, out = run("diff", "--ref", "pytorch", "--cand", "flash_fp8", "--inject", "dtype")
    assert code == 1
    assert "FIRST DIVERGENCE: prefix.0.mlp" in out and "raised: RuntimeError" in out
    assert "Traceback" not in out


def test_streamed_offline_breakdowns_equal_live_ones(tmp_path):
    ref, cand = tmp_path / "ref.h5", tmp_path / "cand.h5"
    assert run("capture", "--backend", "pytorch", "--taps", "prefix.*", "-o", str(ref))[0] == 0
    assert run("capture", "--backend", "flash", "--inject", "nomask", "--taps", "prefix.*", "-o", str(cand))[0] == 0
    run("diff", str(ref), str(cand), "--by-token", "16", "--json", str(tmp_path / "off.json"))
    live_args = ("diff", "--ref", "pytorch", "--cand", "flash", "--inject", "nomask", "--taps", "prefix.*",
                 "--by-token", "16", "--no-isolate", "--no-oracle")  # dumps are judged by the fixed bounds
    run(*live_args, "--json", str(tmp_path / "live.json"))
    run(*live_args, "--host-compare", "--json", str(tmp_path / "host.json"))
    off, live, host = (json.loads((tmp_path / f).read_text())["taps"] for f in ("off.json", "live.json", "host.json"))
    assert off == host and any(t.get("chunks") for t in off) and any(t.get("heads") for t in off)
    assert_close(off, live)  # the on-device compare: the same, to float64 rounding


def test_offline_diff_equals_live_diff(tmp_path):
    ref, cand = tmp_path / "ref.h5", tmp_path / "cand.h5"
    assert run("capture", "--backend", "pytorch", "-o", str(ref))[0] == 0
    assert run("capture", "--backend", "flash_fp8", "--inject", "nomask", "-o", str(cand))[0] == 0
    code_off, _ = run("diff", str(ref), str(cand), "--json", str(tmp_path / "off.json"))
    # the bounds two dumps are judged by, given: no calibrated budgets, no declared allowance
    code_live, _ = run("diff", "--ref", "pytorch", "--cand", "flash_fp8", "--inject", "nomask", "--min-cos", "0.999",
                       "--json", str(tmp_path / "live.json"))
    code_host, _ = run("diff", "--ref", "pytorch", "--cand", "flash_fp8", "--inject", "nomask", "--host-compare",
                       "--min-cos", "0.999", "--json", str(tmp_path / "host.json"))
    off, live, host = (json.loads((tmp_path / f).read_text()) for f in ("off.json", "live.json", "host.json"))
    assert code_off == code_live == code_host == 1
    assert off["taps"] == host["taps"] and off["first_divergence"] == host["first_divergence"]
    assert_close(off["taps"], live["taps"])  # the on-device compare: the same, to float64 rounding
    assert off["first_divergence"] == live["first_divergence"]


def test_capture_of_raising_candidate_keeps_taps_and_exits_1(tmp_path):
    path = tmp_path / "bad.h5"
    code, out = run("capture", "--backend", "flash", "--inject", "dtype", "-o", str(path))
    assert code == 1 and "raised at prefix.0.mlp" in out
    code, out = run("inspect", str(path))
    assert code == 0 and "prefix.0.post_attn_norm" in out and "raised at prefix.0.mlp" in out


def test_tap_selection_by_glob(tmp_path):
    path = tmp_path / "k.h5"
    assert run("capture", "--backend", "pytorch", "--taps", "prefix.*.k", "-o", str(path))[0] == 0
    code, out = run("inspect", str(path))
    assert "prefix.3.k" in out and "prefix.0.v" not in out and "vision" not in out.split("taps:")[-1]


@pytest.mark.parametrize("args, needle", [
    (("diff", "--ref", "pytorch", "--cand", "nosuch"), "unknown backend 'nosuch'"),
    (("diff", "--ref", "pytorch", "--cand", "flash", "--inject", "nosuch"), "unknown fault nosuch"),
    (("diff", "--ref", "pytorch", "--cand", "flash", "--threshold", "abc"), "bad threshold"),
    (("diff", "--ref", "pytorch"), "needs both --ref and --cand"),
    (("diff", "only_one.h5"), "give two dumps"),
    (("diff", "--ref", "pytorch", "--cand", "flash", "--config", "huge"), "unknown pi0.5 config"),
    (("diff", "--ref", "pytorch", "--cand", "no.such.module:factory"), "cannot load backend factory"),
])
def test_usage_errors_exit_2_with_one_line(args, needle):
    code, out = run(*args)
    assert code == 2
    assert needle in out and "Traceback" not in out
    assert len([line for line in out.strip().splitlines() if line.strip()]) == 1


def test_corrupt_or_missing_dump_exits_2(tmp_path):
    bad = tmp_path / "bad.h5"
    bad.write_bytes(b"not an hdf5 file at all")
    code, out = run("diff", str(bad), str(bad))
    assert code == 2 and str(bad) in out and "Traceback" not in out
    code, out = run("diff", str(tmp_path / "missing.h5"), str(bad))
    assert code == 2 and "missing.h5" in out


def test_dumps_of_different_inputs_are_refused(tmp_path):
    a, b = tmp_path / "a.h5", tmp_path / "b.h5"
    run("capture", "--backend", "pytorch", "--taps", "vision.embed", "-o", str(a))
    run("capture", "--backend", "pytorch", "--seed", "1", "--taps", "vision.embed", "-o", str(b))
    code, out = run("diff", str(a), str(b))
    assert code == 2 and "different inputs" in out


def test_every_command_has_help_with_an_example():
    code, out = run("--help")
    assert code == 0
    commands = {c.name for c in app.registered_commands}
    assert commands == {"diff", "capture", "inspect", "backends", "report", "weights", "component", "frames"}
    for name in commands:
        assert name in out
        code, text = run(name, "--help")
        assert code == 0 and "Usage" in text and "Example" in text, name


def test_backends_lists_builtins_and_faults():
    code, out = run("backends")
    assert code == 0
    for word in ("pytorch", "flash", "flash_fp8", "nomask", "silu", "dtype", "norm_plain_w", "rope_interleaved",
                 "kv_mutate"):
        assert word in out


def test_help_and_offline_diff_work_without_torch(tmp_path):
    """The offline path must not import torch: run it with torch made unimportable."""
    ref = tmp_path / "ref.h5"
    run("capture", "--backend", "pytorch", "--taps", "vision.*", "-o", str(ref))
    script = (
        "import sys; sys.modules['torch'] = None\n"
        "from typer.testing import CliRunner\nfrom parity.cli import app\n"
        "r = CliRunner().invoke(app, ['--help']); assert r.exit_code == 0, r.output\n"
        f"r = CliRunner().invoke(app, ['diff', {str(ref)!r}, {str(ref)!r}]); assert r.exit_code == 0, r.output\n"
        "assert 'PASS' in r.output\n"
    )
    proc = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr + proc.stdout


def test_cli_start_up_imports_neither_numpy_nor_h5py():
    """`parity --help` must start fast: the library is imported by each command, not at start-up."""
    code = "import sys, parity.cli; bad = {'numpy', 'h5py', 'torch'} & set(sys.modules); assert not bad, bad"
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr


def wide(*args) -> str:
    """Help or output on a console wide enough that nothing wraps."""
    result = runner.invoke(app, list(args), env={"COLUMNS": "400"}, catch_exceptions=False)
    assert result.exit_code == 0, result.output
    return " ".join(result.output.split())


def test_help_shows_bracketed_text_literally():
    """Rich reads `[...]` as markup: help is escaped so `[tool.parity]` shows as written."""
    diff_help = wide("diff", "--help")
    assert "(default: [tool.parity] taps, else all)" in diff_help
    assert "(default: [tool.parity] min_cos, else" in diff_help
    assert "[+ config.json]" in diff_help and "NAME[,NAME]" in diff_help
    assert "[tool.parity] taps" in wide("capture", "--help")


def test_help_states_the_librarys_defaults():
    """Defaults are defined once, in the library; where the help states one, it is that one."""
    from parity.capture.background import DEFAULT_MAX_INFLIGHT_MB
    from parity.comparison import weights
    from parity.comparison.rules import DEFAULT_MIN_COS
    from parity.comparison.stats import DEFAULT_TOLERANCE
    from parity.taps.backends import BackendOptions

    o = BackendOptions()
    diff_help = wide("diff", "--help")
    assert f"else {DEFAULT_MIN_COS})" in diff_help and f"VALUE (default {DEFAULT_TOLERANCE})" in diff_help
    for text in (f"noise (default: {o.seed})", f"(cuda if available; default: {o.device})",
                 f"inputs (default: {o.batch})"):
        assert text in diff_help, text
    assert f"per output (default: {DEFAULT_MIN_COS})" in wide("component", "--help")
    assert f"per tap (default: {DEFAULT_MIN_COS})" in wide("frames", "--help")
    weights_help = wide("weights", "--help")
    assert f"per parameter (default: {weights.DEFAULT_MIN_COS})" in weights_help
    assert f"matches (default: {weights.DEFAULT_QUANTIZED_MIN_COS})" in weights_help
    assert f"writer (default: {DEFAULT_MAX_INFLIGHT_MB})" in wide("capture", "--help")


def test_shared_options_are_declared_once():
    """--threshold, --json, --inject, the model options: one declaration, one help text."""
    import typer

    group = typer.main.get_command(app)
    helps: dict[str, set[str]] = {}
    for command in group.commands.values():
        for param in command.params:
            helps.setdefault(param.opts[0], set()).add(param.help)
    for flag in ("--threshold", "--json", "--inject", "--config", "--seed", "--device", "--dtype", "--weights",
                 "--batch", "--quiet", "--stats", "--taps-from"):
        assert len(helps[flag]) == 1, (flag, helps[flag])


def test_options_are_grouped_in_panels():
    diff_help = wide("diff", "--help")
    for panel in ("Backends", "Model and inputs", "Taps and thresholds", "Output", "Live diffs", "Stats diffs"):
        assert f"╭─ {panel} " in diff_help, panel
    assert "╭─ Component " in wide("component", "--help") and "╭─ Frames " in wide("frames", "--help")


def test_pi05_defaults_come_from_its_probe_not_the_cli():
    """component --stack and frames --drift-taps default to what the reference's probe
    declares; the generic CLI names no pi0.5 stack, part or tap."""
    from parity.probes.pi05.probe import PROBE

    assert (PROBE.default_stack, PROBE.drift_taps) == ("prefix", "prefix.*.k")
    assert "mlp" in dict(PROBE.parts) and "[default: prefix" not in wide("component", "--help")
    assert "prefix.*.k]" not in wide("frames", "--help")
    listing = wide("backends")
    assert "default --stack prefix" in listing and "default --drift-taps prefix.*.k" in listing
    assert "qkv (projections + RoPE)" in listing and "attn (attention core, real mask)" in listing


def test_by_token_range_is_the_librarys_one_line_error():
    code, out = run("diff", "a.h5", "b.h5", "--by-token", "0")
    assert code == 2 and out.strip() == "error: --by-token must be 1 or more, got 0"


def test_inspect_and_backends_render_library_results(tmp_path):
    from parity.api import BackendListing, DumpSummary, inspect_dump, list_backends

    path = tmp_path / "k.h5"
    assert run("capture", "--backend", "pytorch", "--taps", "prefix.0.k", "-o", str(path))[0] == 0
    summary = inspect_dump(path)
    assert isinstance(summary, DumpSummary) and [t.key for t in summary.taps] == ["prefix.0.k"]
    listing = list_backends()
    assert isinstance(listing, BackendListing) and {"pytorch", "hf"} <= {b.name for b in listing.backends}
    assert "nomask" in listing.faults and [p.arch for p, _ in listing.probes()] == ["pi05"]
