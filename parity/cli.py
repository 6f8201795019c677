"""`parity` command line: each command parses, calls one library function, renders, exits.

Exit codes: 0 parity holds, 1 parity failure (a finding), 2 usage or input error,
130 interrupted (Ctrl-C or SIGTERM).  Every rule of a request (which flags go together,
ranges, files read and written) lives in the library (parity.api), which raises
InputError; here each is only mapped to its exit code.  Everything a dump says (tap
names, paths, messages) is printed as data: consoles have markup off and control
characters are escaped.  Defaults come from `[tool.parity]` in ./pyproject.toml
(parity.settings.merge); flags win."""

from __future__ import annotations

import contextlib
import os
import signal
import sys
from pathlib import Path
from typing import List, Optional

import typer
from rich.console import Console
from rich.markup import escape
from rich.text import Text

# Light at load (no numpy, h5py or torch): `parity --help` stays fast.  The library
# proper (parity.api, the renderers) is imported by each command.
from parity.comparison.rules import DEFAULT_MIN_COS
from parity.report.text import shown

EXIT_PASS, EXIT_FAIL, EXIT_INPUT, EXIT_INTERRUPTED = 0, 1, 2, 130

NOTHING_JUDGED = "diff stopped before it finished; nothing was judged"


app = typer.Typer(add_completion=False, no_args_is_help=True, pretty_exceptions_enable=False,
                  help="Layer-by-layer numerical parity debugger: capture taps, diff them, find the first "
                       "diverging layer and component, gate on it.")


def _console() -> Console:
    """Terminal width on a terminal; 120 columns when piped (CI logs), unless COLUMNS says."""
    console = Console(highlight=False, soft_wrap=False, markup=False)
    if not console.is_terminal and "COLUMNS" not in os.environ:
        console = Console(highlight=False, soft_wrap=False, markup=False, width=120)
    return console


def _error_line(label: str, message: str) -> None:
    """One line on stderr: a red label, then the message as data."""
    # Our own messages may span lines (a checkpoint's list of problems); each line is data.
    line = Text(f"{label} ", style="bold red").append("\n".join(shown(part) for part in str(message).split("\n")))
    Console(stderr=True, highlight=False, markup=False).print(line, soft_wrap=True)


def _fail_input(message: str) -> None:
    _error_line("error:", message)
    raise typer.Exit(EXIT_INPUT)


def _interrupted(message: str) -> None:
    _error_line("interrupted:", message)
    raise typer.Exit(EXIT_INTERRUPTED)


@contextlib.contextmanager
def _exits(interrupted: Optional[str] = None):
    """Within the block, the library's InputError exits 2 with its one line; with
    `interrupted`, Ctrl-C exits 130 saying that."""
    from parity.errors import InputError

    try:
        yield
    except InputError as exc:
        _fail_input(str(exc))
    except KeyboardInterrupt:
        if interrupted is None:
            raise
        _interrupted(interrupted)


@contextlib.contextmanager
def _sigterm_interrupts():
    """Within the block, SIGTERM stops the command the way Ctrl-C does, so a capture that
    is terminated (a CI timeout) still closes its dump, marked incomplete, and a diff exits
    130 saying it judged nothing."""

    def on_term(signum, frame):
        raise KeyboardInterrupt(f"signal {signum}")

    try:
        previous = signal.signal(signal.SIGTERM, on_term)
    except ValueError:  # not the main thread: leave signals alone
        yield
        return
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)


def _settings():
    """[tool.parity] of ./pyproject.toml; malformed: exit 2."""
    from parity.settings import load_settings

    with _exits():
        return load_settings()


def _progress(quiet: bool):
    """A progress callback that shows a bar on stderr after 1 s, only on a terminal."""
    from parity.report.progress import DelayedProgress

    console = Console(stderr=True)
    return DelayedProgress(console, enabled=console.is_terminal and not quiet)


def _write_json(path: Optional[Path], data: dict) -> None:
    if path is not None:
        from parity.api import write_json

        with _exits():
            write_json(path, data)


# --------------------------------------------------------------------------- options
# Declared once, shared by the commands that take them.  Help is escaped: rich reads
# `[...]` as markup, and `[tool.parity]` must show as it is.

BACKENDS, MODEL, GATE, OUTPUT, LIVE, STATS, COMPONENT, FRAMES = (
    "Backends", "Model and inputs", "Taps and thresholds", "Output", "Live diffs", "Stats diffs", "Component",
    "Frames")


def _option(default, *names: str, help: str, panel: str, **kwargs):
    return typer.Option(default, *names, help=escape(help), rich_help_panel=panel, **kwargs)


RefOpt = _option(..., "--ref", help="Reference backend, e.g. pytorch or 'hf:./model@attn=eager'.", panel=BACKENDS)
CandOpt = _option(..., "--cand", help="Candidate backend, e.g. flash_fp8 or 'hf:./model@attn=sdpa'.",
                  panel=BACKENDS)
InjectOpt = _option(None, "--inject", help="Fault(s) to inject into the candidate, NAME[,NAME]. See `parity backends`.",
                    panel=BACKENDS)

# The run-wide backend options: None = BackendOptions' default.  Where a default is the
# library's, the help states it (tests/test_cli.py checks it is what the library does).
ConfigOpt = _option(None, "--config", help="pi0.5 model size: tiny (CPU tests) or full (real pi0.5 sizes). "
                                           "Default: tiny, or the sizes --weights holds.", panel=MODEL)
SeedOpt = _option(None, "--seed", help="Seed for weights (unless --weights or an hf checkpoint), inputs and "
                                       "flow-matching noise (default: 0).", panel=MODEL)
WeightsOpt = _option(None, "--weights", help="pi0.5 checkpoint every backend loads: a .safetensors file or a "
                                             "directory with model.safetensors [+ config.json] (openpi or lerobot "
                                             "layout). hf backends load theirs from hf:PATH.", panel=MODEL)
DeviceOpt = _option(None, "--device", help="cpu, cuda, cuda:N or auto (cuda if available; default: auto).",
                    panel=MODEL)
DtypeOpt = _option(None, "--dtype", help="Model dtype (default: the backend's, bfloat16 for pi0.5, the "
                                         "checkpoint's for hf).", panel=MODEL)
BatchOpt = _option(None, "--batch", help="Batch size of generated inputs (default: 1).", panel=MODEL)
InputOpt = _option(None, "--input", help="hf backends: token ids from a .json (list of lists, or "
                                         "{input_ids, attention_mask}) or .npy file (negative = padding).",
                   panel=MODEL)
PaddingOpt = _option(None, "--padding", help="hf backends: left or right padding (a spec's @padding= wins).",
                     panel=MODEL)
SeqLenOpt = _option(None, "--seq-len", help="hf backends: tokens per generated prompt (default 16).", panel=MODEL)
DecodeOpt = _option(None, "--decode", help="hf causal LMs: after the prefill, N decode steps through the model's "
                                           "KV cache (the reference's greedy tokens, fed to the candidate); taps "
                                           "per step (@0 the prefill) and the K/V each layer reads.", panel=MODEL)

TapsOpt = _option(None, "--taps", help="Only these taps: glob(s) on canonical names, e.g. 'prefix.*.k'; "
                                       "'!GLOB' leaves taps out (default: [tool.parity] taps, else all).",
                  panel=GATE)
TapsFromOpt = _option(None, "--taps-from", help="Only the taps a stats diff suggests capturing in full: its --json "
                                                "result (suggested.taps).", panel=GATE)
ThresholdOpt = _option(None, "--threshold", help="Per-pattern bounds, GLOB=MIN_COS or GLOB=MIN_COS,MAX_NORM_ERR "
                                                 "(repeatable; last match wins), e.g. 'expert.*.mlp=0.995'.",
                       panel=GATE)
NormErrOpt = _option(None, "--max-norm-err", help="Size bound per tap: largest | ||cand|| / ||ref|| - 1 | (default: "
                                                  "[tool.parity] max_norm_err, else sqrt(2 (1 - min cos)) of the "
                                                  "tap: 0.0447 at 0.999).", panel=GATE)

JsonOpt = _option(None, "--json", help="Also write the machine-readable result here (input of `parity report`).",
                  panel=OUTPUT)
QuietOpt = _option(False, "--quiet", "-q", help="No progress bars.", panel=OUTPUT)

StatsOpt = _option(False, "--stats", help="Per-tap summaries (norms, moments, min/max, NaN/Inf counts, a bit "
                                          "checksum) computed on the device instead of whole tensors.", panel=STATS)
StatsTolOpt = _option(None, "--stats-tol", help="Stats diffs: relative tolerance of norm, std, max |x| and mean "
                                                "shift (in ref std), VALUE (default 0.05) or GLOB=VALUE "
                                                "(repeatable; last match wins).", panel=STATS)


def _min_cos(what: str):
    """--min-cos of the commands that do not read [tool.parity]: DEFAULT_MIN_COS."""
    return _option(None, "--min-cos", help=f"Minimum cosine similarity per {what} (default: {DEFAULT_MIN_COS}).",
                   panel=GATE)


# --------------------------------------------------------------------------- commands


@app.command("diff")
def diff_cmd(
    dumps: Optional[List[Path]] = typer.Argument(None, help="Two dumps REF.h5 CAND.h5 (offline, no torch); "
                                                                "CAND may be a quoted glob of per-rank dumps."),
    ref: Optional[str] = _option(None, "--ref", help="Reference backend (live), e.g. pytorch or "
                                                     "'hf:./model@attn=eager'.", panel=BACKENDS),
    cand: Optional[str] = _option(None, "--cand", help="Candidate backend (live), e.g. flash_fp8 or "
                                                       "'hf:./model@attn=sdpa,dtype=bfloat16'.", panel=BACKENDS),
    inject: Optional[List[str]] = InjectOpt,
    config: Optional[str] = ConfigOpt, seed: Optional[int] = SeedOpt, device: Optional[str] = DeviceOpt,
    dtype: Optional[str] = DtypeOpt, batch: Optional[int] = BatchOpt, inputs: Optional[Path] = InputOpt,
    padding: Optional[str] = PaddingOpt, seq_len: Optional[int] = SeqLenOpt, weights: Optional[Path] = WeightsOpt,
    decode: Optional[int] = DecodeOpt,
    taps: Optional[str] = TapsOpt, taps_from: Optional[Path] = TapsFromOpt,
    min_cos: Optional[float] = _option(None, "--min-cos", help="Default minimum cosine similarity per tap "
                                                               f"(default: [tool.parity] min_cos, else "
                                                               f"{DEFAULT_MIN_COS}).", panel=GATE),
    threshold: Optional[List[str]] = ThresholdOpt,
    max_norm_err: Optional[float] = NormErrOpt,
    json_out: Optional[Path] = JsonOpt,
    show_all: bool = _option(False, "--all", help="Also list every tap with all metrics.", panel=OUTPUT),
    by_region: bool = _option(False, "--by-region", help="Print the failing taps' error per token region "
                                                         "(cameras, text, actions).", panel=OUTPUT),
    by_token: Optional[int] = _option(None, "--by-token", help="Print the failing taps' error per chunk of CHUNK "
                                                               "canonical token positions (1 or more).",
                                      panel=OUTPUT),
    quiet: bool = QuietOpt,
    allow_incomplete: bool = _option(False, "--allow-incomplete", help="Diff interrupted captures too, as far as "
                                                                       "they go (never exit 0).", panel=OUTPUT),
    no_isolate: bool = _option(False, "--no-isolate", help="Live diffs: do not re-run the first failing component "
                                                           "on the reference's inputs.", panel=LIVE),
    stop_at_first: bool = _option(False, "--stop-at-first", help="Live diffs: end the candidate run at the first "
                                                                 "failing tap (later taps: not reached).", panel=LIVE),
    host_compare: bool = _option(False, "--host-compare", help="Live diffs: copy every tap of both runs to host "
                                                               "memory and diff there, instead of comparing on the "
                                                               "device as the candidate runs.", panel=LIVE),
    ref_device_mb: Optional[float] = _option(None, "--ref-device-mb",
                                             help="Live diffs: most MB of reference taps kept on the device; the "
                                                  "rest wait in pinned host memory (default: half the free device "
                                                  "memory).", panel=LIVE),
    stats: bool = StatsOpt, stats_tol: Optional[List[str]] = StatsTolOpt,
    oracle: Optional[bool] = _option(None, "--oracle/--no-oracle",
                                     help="Live diffs: judge each tap by its error against a float64 run of the "
                                          "reference (float32 on a GPU), relative to the reference's own "
                                          "(calibrated budgets), or not (fixed bounds).  Default: budgets when no "
                                          "bound is set and the reference is small and on the CPU.",
                                     panel=GATE),
) -> None:
    """Compare a candidate with a reference, tap by tap, and name the first divergence.

    Example (live):    parity diff --ref pytorch --cand flash_fp8 --inject nomask

    Example (hf):      parity diff --ref 'hf:./m@attn=eager' --cand 'hf:./m@attn=sdpa' --batch 4 --padding left

    Example (stop early): parity diff --ref pytorch --cand flash --inject silu --stop-at-first

    Example (offline): parity diff reports/pytorch.h5 reports/flash.h5

    Example (per rank): parity diff reports/pytorch.h5 'reports/tp-rank*.h5'

    Example (checkpoint): parity diff --ref pytorch --cand flash_fp8 --weights ~/ckpt/pi05_libero_pytorch

    Example (stats):   parity diff reports/pytorch_stats.h5 reports/flash_stats.h5   (or --ref/--cand --stats)
    """
    from parity.api import run_diff  # the offline diff imports no backend and no torch

    settings = _settings()
    with _exits(NOTHING_JUDGED), _sigterm_interrupts(), _progress(quiet) as progress:
        result = run_diff(dumps, ref, cand, faults=inject, config=config, seed=seed, device=device, dtype=dtype,
                          batch=batch, weights=weights, inputs=inputs, padding=padding, seq_len=seq_len,
                          decode=decode, min_cos=min_cos, thresholds=threshold, max_norm_err=max_norm_err, taps=taps,
                          taps_from=taps_from, stats=stats,
                          stats_tol=stats_tol, allow_incomplete=allow_incomplete, isolate=not no_isolate,
                          chunk=by_token, by_region=by_region, on_device=not host_compare,
                          stop_at_first=stop_at_first, ref_device_mb=ref_device_mb, settings=settings,
                          oracle=oracle, progress=progress)
    if result.stats:
        from parity.report.terminal.stats import render_stats_report
        _console().print(render_stats_report(result.report, show_all=show_all))
    else:
        from parity.report.terminal.diff import render_report
        _console().print(render_report(result.report, show_all=show_all, by_region=by_region,
                                       by_token=by_token is not None))
    _write_json(json_out, result.to_dict())
    raise typer.Exit(EXIT_PASS if result else EXIT_FAIL)


@app.command("component")
def component_cmd(
    ref: str = RefOpt, cand: str = CandOpt, inject: Optional[List[str]] = InjectOpt,
    layer: int = _option(..., "--layer", help="Layer index within the stack.", panel=COMPONENT),
    part: str = _option(..., "--part", help="Part of the layer to run, e.g. mlp or attn: one the reference's probe "
                                            "declares (`parity backends` lists them).", panel=COMPONENT),
    stack: Optional[str] = _option(None, "--stack", help="Stack of the layer (default: the one the reference's "
                                                         "probe names; `parity backends` lists it).",
                                   panel=COMPONENT),
    step: Optional[int] = _option(None, "--step", help="Denoise step, for stacks run once per step (default 0).",
                                  panel=COMPONENT),
    config: Optional[str] = ConfigOpt, seed: Optional[int] = SeedOpt, device: Optional[str] = DeviceOpt,
    dtype: Optional[str] = DtypeOpt, batch: Optional[int] = BatchOpt, weights: Optional[Path] = WeightsOpt,
    min_cos: Optional[float] = _min_cos("output"), threshold: Optional[List[str]] = ThresholdOpt,
    json_out: Optional[Path] = JsonOpt,
) -> None:
    """Run one component of the reference and of the candidate on the reference's own
    inputs (so no upstream error can leak in) and compare the outputs: exit 1 means the
    candidate's component itself is wrong.

    Example: parity component --ref pytorch --cand flash_fp8 --inject silu --layer 0 --part mlp

    Example: parity component --ref pytorch --cand flash --stack expert --step 3 --layer 1 --part attn
    """
    from parity.api import run_component
    from parity.report.results import component_json
    from parity.report.terminal.diff import render_component

    with _exits():
        result = run_component(ref, cand, layer=layer, part=part, stack=stack, step=step, faults=inject,
                               min_cos=min_cos, thresholds=threshold, config=config, seed=seed, device=device,
                               dtype=dtype, batch=batch, weights=weights)
    _console().print(render_component(result))
    _write_json(json_out, component_json(result))
    raise typer.Exit(EXIT_PASS if result else EXIT_FAIL)


@app.command("weights")
def weights_cmd(
    ref: str = RefOpt, cand: str = CandOpt, inject: Optional[List[str]] = InjectOpt,
    weights: Optional[Path] = WeightsOpt,
    config: Optional[str] = ConfigOpt, seed: Optional[int] = SeedOpt, device: Optional[str] = DeviceOpt,
    dtype: Optional[str] = DtypeOpt,
    min_cos: Optional[float] = _option(None, "--min-cos", help="Default minimum cosine similarity per parameter "
                                                               "(default: 0.99999).", panel=GATE),
    quantized_min_cos: Optional[float] = _option(None, "--quantized-min-cos",
                                                 help="Minimum cosine of a parameter the backend declares quantised "
                                                      "(e.g. FP8), unless a --threshold pattern matches "
                                                      "(default: 0.999).", panel=GATE),
    threshold: Optional[List[str]] = ThresholdOpt, json_out: Optional[Path] = JsonOpt,
    show_all: bool = _option(False, "--all", help="Also list every parameter with its metrics.", panel=OUTPUT),
) -> None:
    """Compare, parameter by parameter, what each backend computes with (FP8 dequantised,
    norm weights as the scale they apply): cosine, max abs, relative error, and shape,
    dtype, transposition and norm-offset findings.

    Example: parity weights --ref pytorch --cand flash_fp8 --weights ~/ckpt/pi05_libero_pytorch
    """
    from parity.api import run_weights
    from parity.report.terminal.weights import render_weights

    with _exits():
        report = run_weights(ref, cand, faults=inject, min_cos=min_cos, quantized_min_cos=quantized_min_cos,
                             thresholds=threshold, config=config, seed=seed, device=device, dtype=dtype,
                             weights=weights)
    _console().print(render_weights(report, show_all=show_all))
    _write_json(json_out, report.to_dict())
    raise typer.Exit(EXIT_PASS if report else EXIT_FAIL)


@app.command("capture")
def capture_cmd(
    backend: str = _option(..., "--backend", help="Backend to run, e.g. pytorch, flash_fp8, 'hf:./model'.",
                           panel=BACKENDS),
    inject: Optional[List[str]] = InjectOpt,
    output: Optional[Path] = _option(None, "-o", "--output", help="Dump path (default <output_dir>/<backend>.h5).",
                                     panel=OUTPUT),
    config: Optional[str] = ConfigOpt, seed: Optional[int] = SeedOpt, device: Optional[str] = DeviceOpt,
    dtype: Optional[str] = DtypeOpt, batch: Optional[int] = BatchOpt, inputs: Optional[Path] = InputOpt,
    padding: Optional[str] = PaddingOpt, seq_len: Optional[int] = SeqLenOpt, weights: Optional[Path] = WeightsOpt,
    taps: Optional[str] = TapsOpt, taps_from: Optional[Path] = TapsFromOpt,
    compression: Optional[str] = _option(None, "--compression", help="gzip or lzf (default: none).", panel=OUTPUT),
    max_inflight_mb: Optional[float] = _option(None, "--max-inflight-mb",
                                               help="Most MB of tap copies between the model and the disk (staged "
                                                    "on their way to the host, queued for the writer thread); past "
                                                    "it the capture waits for the writer (default: 2048).",
                                               panel=OUTPUT),
    quiet: bool = QuietOpt,
    stats: bool = StatsOpt,
) -> None:
    """Run one backend with taps installed and write every tap to an HDF5 dump.

    Example: parity capture --backend flash --inject silu -o reports/flash_silu.h5

    Example: parity capture --backend flash --stats -o reports/flash_stats.h5   (summaries only)
    """
    from parity.api import CaptureInterrupted, run_capture
    from parity.report.terminal.listing import render_capture

    settings = _settings()
    with _exits("nothing was written"):
        try:
            with _sigterm_interrupts(), _progress(quiet) as progress:
                result = run_capture(backend, output, stats=stats, compression=compression, taps=taps,
                                     taps_from=taps_from, max_inflight_mb=max_inflight_mb, settings=settings,
                                     progress=progress, faults=inject, config=config, seed=seed, device=device,
                                     dtype=dtype, batch=batch, weights=weights, inputs=inputs, padding=padding,
                                     seq_len=seq_len)
        except CaptureInterrupted as exc:  # what it kept is the library's to say
            _interrupted(str(exc).removeprefix("capture interrupted: "))
    _console().print(render_capture(result))
    raise typer.Exit(EXIT_PASS if result else EXIT_FAIL)


@app.command("report")
def report_cmd(
    result: Path = typer.Argument(..., help="A result written by `parity diff --json`."),
    output: Optional[Path] = _option(None, "-o", "--output",
                                     help="Output file (default <output_dir>/<result name> + extension); '-' "
                                          "writes to stdout; a device or FIFO (/dev/null) is written "
                                          "through.", panel=OUTPUT),
    fmt: str = _option("html", "--format", "-f", help="html (one self-contained file), md (PR comment), junit (CI), "
                                                      "model-explorer (node data JSON).", panel=OUTPUT),
    exported_program: Optional[Path] = _option(
        None, "--exported-program", help="model-explorer: a torch.export .pt2 of the reference model; node ids "
                                         "become its FX node names (only its graph is read, as JSON: no torch, "
                                         "nothing unpickled). Without it parity also writes "
                                         "its own tap graph next to the node data.", panel=OUTPUT),
) -> None:
    """Render a diff result as a shareable report (no model, no torch).

    Example: parity diff --ref 'hf:./m@attn=eager' --cand 'hf:./m@attn=sdpa' --json reports/r.json;
    parity report reports/r.json -o reports/r.html

    Example: parity report reports/r.json --format md -o - >> comment.md
    """
    from dataclasses import replace

    from parity.api import ReportRequest, load_report, write_text

    with _exits():
        request = ReportRequest(result, fmt, output, exported_program)
        report = load_report(result)
    if output is None:  # the default path is under [tool.parity] output_dir: read only when needed
        request = replace(request, output_dir=_settings().output_dir)
    with _exits():
        files = request.render(report)
        if request.to_stdout:
            sys.stdout.write(files[request.path])
            raise typer.Exit(EXIT_PASS)
        for path, text in files.items():
            write_text(path, text)
    console = _console()
    for path in files:
        console.print(Text(shown(f"wrote {path}")))


@app.command("inspect")
def inspect_cmd(dump: Path = typer.Argument(..., help="A dump written by `parity capture`.")) -> None:
    """List a dump's metadata and taps (no torch).

    Example: parity inspect reports/pytorch.h5
    """
    from parity.api import inspect_dump
    from parity.report.terminal.listing import render_dump

    with _exits():
        summary = inspect_dump(dump)
    _console().print(render_dump(summary))


@app.command("backends")
def backends_cmd() -> None:
    """List the registered backends (entry-point group parity.backends), their faults and
    the components their probes declare.

    Example: parity backends
    """
    from parity.api import list_backends
    from parity.report.terminal.listing import render_backends

    _console().print(render_backends(list_backends()))


@app.command("frames")
def frames_cmd(
    ref: str = RefOpt, cand: str = CandOpt, inject: Optional[List[str]] = InjectOpt,
    frames: int = _option(3, "--frames", help="Number of consecutive observations (same prompt, new images).",
                          panel=FRAMES),
    drift_taps: Optional[str] = _option(None, "--drift-taps", help="Taps whose frame-to-frame drift is shown by "
                                                                   "token region (default: the ones the reference's "
                                                                   "probe names, else all; `parity backends` lists "
                                                                   "them).", panel=FRAMES),
    config: Optional[str] = ConfigOpt, seed: Optional[int] = SeedOpt, device: Optional[str] = DeviceOpt,
    dtype: Optional[str] = DtypeOpt,
    taps: Optional[str] = _option(None, "--taps", help="Only these taps: glob(s) on canonical names, e.g. "
                                                       "'prefix.*.k'; '!GLOB' leaves taps out (default: all).",
                                  panel=GATE),
    min_cos: Optional[float] = _min_cos("tap"), threshold: Optional[List[str]] = ThresholdOpt,
    json_out: Optional[Path] = JsonOpt,
) -> None:
    """Compare a candidate with the reference over a sequence of frames, and show which
    tokens of the reference change from frame to frame, layer by layer (stale K/V reuse).

    Example: parity frames --ref pytorch --cand flash --inject kv_reuse --frames 3
    """
    from parity.api import run_frames
    from parity.report.terminal.diff import render_frames

    with _exits():
        result = run_frames(ref, cand, frames=frames, faults=inject, min_cos=min_cos, thresholds=threshold,
                            taps=taps, drift_taps=drift_taps, config=config, seed=seed, device=device, dtype=dtype)
    _console().print(render_frames(result))
    _write_json(json_out, result.to_dict())
    raise typer.Exit(EXIT_PASS if result else EXIT_FAIL)


def main() -> None:
    # sys.path is left alone: a `my_backends:factory` spec is imported with the current
    # directory appended (parity.taps.backends.load_factory), so an `h5py.py` next to the
    # dumps never shadows the installed module.
    app()


if __name__ == "__main__":
    main()
