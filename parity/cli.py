"""`parity` command line: each command parses, calls one library function, renders, exits.

Exit codes: 0 parity holds, 1 parity failure (a finding), 2 usage or input error,
130 interrupted (Ctrl-C or SIGTERM).  Everything a dump says (tap names, paths, messages)
is printed as data: consoles have markup off and control characters are escaped.
Defaults come from `[tool.parity]` in ./pyproject.toml (parity.settings); flags win."""

from __future__ import annotations

import contextlib
import json
import os
import signal
import sys
from pathlib import Path
from typing import TYPE_CHECKING, List, Optional

import typer
from rich.console import Console
from rich.text import Text

from parity.report.text import shown

# The library (numpy, h5py, the backend registry) is imported by each command, not here:
# `parity --help` stays fast.
from parity.settings import DEFAULT_MIN_COS, Settings, SettingsError, load_settings

if TYPE_CHECKING:
    from parity.taps.backends import BackendOptions

EXIT_PASS, EXIT_FAIL, EXIT_INPUT, EXIT_INTERRUPTED = 0, 1, 2, 130


REPORT_FORMATS = {"html": ".html", "md": ".md", "junit": ".xml", "model-explorer": ".me.json"}


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
def _sigterm_interrupts():
    """Within the block, SIGTERM stops the command the way Ctrl-C does, so a capture that
    is terminated (a CI timeout) still closes its dump, marked incomplete."""

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


def _settings() -> Settings:
    try:
        return load_settings()
    except SettingsError as exc:
        _fail_input(str(exc))


def _progress(quiet: bool):
    """A progress callback that shows a bar on stderr after 1 s, only on a terminal."""
    from parity.report.progress import DelayedProgress

    console = Console(stderr=True)
    return DelayedProgress(console, enabled=console.is_terminal and not quiet)


def _faults(inject: Optional[List[str]]) -> tuple[str, ...]:
    return tuple(n.strip() for item in inject or [] for n in item.split(",") if n.strip())


def _options(config, seed, device, dtype, batch, faults=(), weights=None, inputs=None, padding=None,
             seq_len=None) -> BackendOptions:
    from parity.taps.backends import BackendOptions

    try:
        return BackendOptions(config=config, seed=seed, device=device, dtype=dtype, faults=faults, batch=batch,
                              weights=None if weights is None else str(weights),
                              inputs=str(inputs) if inputs is not None else None, padding=padding, seq_len=seq_len)
    except ValueError as exc:
        _fail_input(str(exc))


def _write(path: Path, text: str) -> None:
    """Write `text` to a temporary name and rename it: a full disk leaves no truncated file."""
    partial = path.with_name(path.name + ".partial")
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        partial.write_text(text)
        os.replace(partial, path)
    except OSError as exc:
        try:
            partial.unlink(missing_ok=True)
        except OSError:
            pass
        _fail_input(f"cannot write {path}: {exc.strerror or exc}")


def _write_json(path: Optional[Path], data: dict) -> None:
    if path is None:
        return
    try:
        text = json.dumps(data, indent=2, allow_nan=False)
    except ValueError as exc:  # a NaN where JSON has none
        _fail_input(f"cannot write {path}: {exc}")
    _write(path, text)


ConfigOpt = typer.Option(None, "--config", help="pi0.5 model size: tiny (CPU tests) or full (real pi0.5 sizes). "
                                                 "Default: tiny, or the sizes --weights holds.")


SeedOpt = typer.Option(0, "--seed", help="Seed for weights (unless --weights or an hf checkpoint), inputs and "
                                         "flow-matching noise.")


WeightsOpt = typer.Option(None, "--weights", help="pi0.5 checkpoint every backend loads: a .safetensors file or a "
                                                  "directory with model.safetensors [+ config.json] (openpi or "
                                                  "lerobot layout). hf backends load theirs from hf:PATH.")


DeviceOpt = typer.Option("auto", "--device", help="cpu, cuda, cuda:N or auto (cuda if available).")


DtypeOpt = typer.Option(None, "--dtype", help="Model dtype (default: the backend's, bfloat16 for pi0.5, the "
                                              "checkpoint's for hf).")


BatchOpt = typer.Option(1, "--batch", help="Batch size of generated inputs.")


InputOpt = typer.Option(None, "--input", help="hf backends: token ids from a .json (list of lists, or "
                                              "{input_ids, attention_mask}) or .npy file (negative = padding).")


PaddingOpt = typer.Option(None, "--padding", help="hf backends: left or right padding (a spec's @padding= wins).")


SeqLenOpt = typer.Option(None, "--seq-len", help="hf backends: tokens per generated prompt (default 16).")


InjectOpt = typer.Option(None, "--inject", help="Fault(s) to inject into the candidate, NAME[,NAME]. "
                                                "See `parity backends`.")


TapsOpt = typer.Option(None, "--taps", help="Only these taps: glob(s) on canonical names, e.g. 'prefix.*.k' "
                                            "(default: [tool.parity] taps, else all).")


QuietOpt = typer.Option(False, "--quiet", "-q", help="No progress bars.")


StatsOpt = typer.Option(False, "--stats", help="Per-tap summaries (norms, moments, min/max, NaN/Inf counts, a bit "
                                                 "checksum) computed on the device instead of whole tensors.")


StatsTolOpt = typer.Option(None, "--stats-tol", help="Stats diffs: relative tolerance of norm, std, max |x| and mean "
                                                     "shift (in ref std), VALUE (default 0.05) or GLOB=VALUE "
                                                     "(repeatable; last match wins).")


TapsFromOpt = typer.Option(None, "--taps-from", help="Only the taps a stats diff suggests capturing in full: its "
                                                     "--json result (suggested.taps).")


def _taps_from(path: Optional[Path], taps: Optional[str]) -> Optional[str]:
    """--taps, or the selection a stats diff's JSON result suggests."""
    if path is None:
        return taps
    if taps:
        _fail_input("give --taps or --taps-from, not both")
    try:
        data = json.loads(path.read_text())
    except OSError as exc:
        _fail_input(f"cannot read {path}: {exc.strerror or exc}")
    except (ValueError, UnicodeDecodeError) as exc:
        _fail_input(f"{path} is not JSON: {exc}")
    if not isinstance(data, dict) or data.get("format") != "parity-stats-report":
        _fail_input(f"{path} is not a stats diff result (write one with `parity diff A_stats.h5 B_stats.h5 --json`)")
    suggested = data.get("suggested")
    if not isinstance(suggested, dict) or not isinstance(suggested.get("taps"), str) or not suggested["taps"]:
        _fail_input(f"{path}: the stats diff passed, so it suggests no taps to capture")
    return suggested["taps"]


def _stats_dumps(dumps: Optional[List[Path]]) -> bool:
    """Whether any of the given dumps is a stats dump (then both must be)."""
    if not dumps:
        return False
    from parity.dump.stats import is_stats_dump

    kinds = [is_stats_dump(d) for d in dumps]
    if any(kinds) and not all(kinds) and len(dumps) == 2:
        stats_one, tensor_one = (dumps[0], dumps[1]) if kinds[0] else (dumps[1], dumps[0])
        _fail_input(f"{stats_one} is a stats dump and {tensor_one} a tensor dump: diff stats against stats "
                    "(capture both with --stats) or tensors against tensors")
    return any(kinds)


def _diff_stats(dumps, ref, cand, inject, options, taps, stats_tol, json_out, show_all, allow_incomplete, quiet,
                tensor_only: dict) -> None:
    """`parity diff --stats` / `parity diff A_stats.h5 B_stats.h5`: compare summaries."""
    from parity.api import diff_stats_dumps, diff_stats_live
    from parity.comparison.stats import DEFAULT_TOLERANCE, tolerances
    from parity.errors import InputError
    from parity.report.terminal.stats import render_stats_report

    given = [flag for flag, value in tensor_only.items() if value]
    if given:
        _fail_input(f"{', '.join(given)} appl{'y' if len(given) > 1 else 'ies'} to tensor diffs; a stats diff "
                    "takes --stats-tol")
    specs = [s for s in stats_tol or [] if "=" in s]
    bare = [s for s in stats_tol or [] if "=" not in s]
    try:
        default = float(bare[-1]) if bare else DEFAULT_TOLERANCE
    except ValueError:
        _fail_input(f"--stats-tol: bad value {bare[-1]!r}: expected VALUE or GLOB=VALUE, e.g. 0.05 or 'expert.*=0.1'")
    try:
        tol = tolerances(default, specs)
    except ValueError as exc:
        _fail_input(f"--stats-tol: {exc}")
    taps = taps or _settings().taps
    try:
        if ref is not None or cand is not None:
            if dumps:
                _fail_input("give either two dumps or --ref/--cand, not both")
            if ref is None or cand is None:
                _fail_input("a live diff needs both --ref and --cand")
            with _progress(quiet) as progress:
                report = diff_stats_live(ref, cand, options(), _faults(inject), tol, taps, progress)
        else:
            if not dumps or len(dumps) != 2:
                _fail_input("give two stats dumps (REF_stats.h5 CAND_stats.h5) or --ref and --cand with --stats")
            if inject:
                _fail_input("--inject applies to a live candidate; capture it with `parity capture --stats --inject`")
            report = diff_stats_dumps(dumps[0], dumps[1], tol, taps, allow_incomplete)
    except InputError as exc:
        _fail_input(str(exc))
    except KeyboardInterrupt:
        _interrupted("diff stopped before it finished; nothing was judged")
    _console().print(render_stats_report(report, show_all=show_all))
    _write_json(json_out, report.to_dict())
    raise typer.Exit(EXIT_PASS if report else EXIT_FAIL)


@app.command("diff")
def diff_cmd(
    dumps: Optional[List[Path]] = typer.Argument(None, help="Two dumps REF.h5 CAND.h5 (offline, no torch)."),
    ref: Optional[str] = typer.Option(None, "--ref", help="Reference backend (live), e.g. pytorch or "
                                                          "'hf:./model@attn=eager'."),
    cand: Optional[str] = typer.Option(None, "--cand", help="Candidate backend (live), e.g. flash_fp8 or "
                                                            "'hf:./model@attn=sdpa,dtype=bfloat16'."),
    inject: Optional[List[str]] = InjectOpt,
    config: Optional[str] = ConfigOpt, seed: int = SeedOpt, device: str = DeviceOpt, dtype: Optional[str] = DtypeOpt,
    batch: int = BatchOpt, inputs: Optional[Path] = InputOpt, padding: Optional[str] = PaddingOpt,
    seq_len: Optional[int] = SeqLenOpt, taps: Optional[str] = TapsOpt, weights: Optional[Path] = WeightsOpt,
    min_cos: Optional[float] = typer.Option(None, "--min-cos", help="Default minimum cosine similarity per tap "
                                                                    "(default: [tool.parity] min_cos, else 0.999)."),
    threshold: Optional[List[str]] = typer.Option(None, "--threshold",
                                                  help="Per-pattern minimum cosine, GLOB=VALUE (repeatable; "
                                                       "last match wins), e.g. 'expert.*.mlp=0.995'."),
    json_out: Optional[Path] = typer.Option(None, "--json", help="Also write the machine-readable result here "
                                                                 "(input of `parity report`)."),
    show_all: bool = typer.Option(False, "--all", help="Also list every tap with all metrics."),
    allow_incomplete: bool = typer.Option(False, "--allow-incomplete",
                                          help="Diff interrupted captures too, as far as they go (never exit 0)."),
    by_region: bool = typer.Option(False, "--by-region", help="Print the failing taps' error per token region "
                                                              "(cameras, text, actions)."),
    by_token: Optional[int] = typer.Option(None, "--by-token", help="Print the failing taps' error per chunk of "
                                                                    "CHUNK canonical token positions.", min=1),
    no_isolate: bool = typer.Option(False, "--no-isolate", help="Live diffs: do not re-run the first failing "
                                                                "component on the reference's inputs."),
    stop_at_first: bool = typer.Option(False, "--stop-at-first", help="Live diffs: end the candidate run at the "
                                                                      "first failing tap (later taps: not reached)."),
    host_compare: bool = typer.Option(False, "--host-compare", help="Live diffs: copy every tap of both runs to "
                                                                    "host memory and diff there, instead of "
                                                                    "comparing on the device as the candidate runs."),
    ref_device_mb: Optional[float] = typer.Option(None, "--ref-device-mb",
                                                  help="Live diffs: most MB of reference taps kept on the device; "
                                                       "the rest wait in pinned host memory (default: half the "
                                                       "free device memory)."),
    stats: bool = StatsOpt, stats_tol: Optional[List[str]] = StatsTolOpt, taps_from: Optional[Path] = TapsFromOpt,
    quiet: bool = QuietOpt,
) -> None:
    """Compare a candidate with a reference, tap by tap, and name the first divergence.

    Example (live):    parity diff --ref pytorch --cand flash_fp8 --inject nomask

    Example (hf):      parity diff --ref 'hf:./m@attn=eager' --cand 'hf:./m@attn=sdpa' --batch 4 --padding left

    Example (stop early): parity diff --ref pytorch --cand flash --inject silu --stop-at-first

    Example (offline): parity diff reports/pytorch.h5 reports/flash.h5

    Example (checkpoint): parity diff --ref pytorch --cand flash_fp8 --weights ~/ckpt/pi05_libero_pytorch

    Example (stats):   parity diff reports/pytorch_stats.h5 reports/flash_stats.h5   (or --ref/--cand --stats)
    """
    from parity.comparison.dumps import diff_dumps  # the offline diff alone: no backend registry to import
    from parity.comparison.rules import Thresholds
    from parity.errors import InputError
    from parity.report.terminal.diff import render_report

    taps = _taps_from(taps_from, taps)
    if stats or stats_tol or _stats_dumps(dumps):
        _diff_stats(dumps, ref, cand, inject, lambda: _options(config, seed, device, dtype, batch, weights=weights,
                                                                 inputs=inputs, padding=padding, seq_len=seq_len),
                    taps, stats_tol, json_out, show_all, allow_incomplete, quiet,
                    tensor_only={"--min-cos": min_cos, "--threshold": threshold, "--by-region": by_region,
                                 "--by-token": by_token, "--no-isolate": no_isolate, "--stop-at-first": stop_at_first,
                                 "--host-compare": host_compare, "--ref-device-mb": ref_device_mb is not None})
    settings = _settings()
    try:
        thresholds = Thresholds.parse(min_cos if min_cos is not None else settings.min_cos or DEFAULT_MIN_COS,
                                      settings.threshold_specs(threshold or []))
    except ValueError as exc:
        _fail_input(str(exc))
    taps = taps or settings.taps
    live = ref is not None or cand is not None
    if live and dumps:
        _fail_input("give either two dumps or --ref/--cand, not both")
    try:
        with _progress(quiet) as progress:
            if live:
                if ref is None or cand is None:
                    _fail_input("a live diff needs both --ref and --cand")
                from parity.api import diff_live

                options = _options(config, seed, device, dtype, batch, weights=weights, inputs=inputs,
                                   padding=padding, seq_len=seq_len)
                report = diff_live(ref, cand, options, _faults(inject), thresholds, taps, progress,
                                   isolate=not no_isolate, chunk=by_token, on_device=not host_compare,
                                   stop_at_first=stop_at_first, ref_device_mb=ref_device_mb)
            else:
                if not dumps or len(dumps) != 2:
                    _fail_input("give two dumps (REF.h5 CAND.h5) or --ref and --cand")
                if inject:
                    _fail_input("--inject applies to a live candidate; capture it with `parity capture --inject`")
                for flag, given in (("--stop-at-first", stop_at_first), ("--host-compare", host_compare),
                                    ("--ref-device-mb", ref_device_mb is not None)):
                    if given:
                        _fail_input(f"{flag} applies to a live diff (--ref/--cand), not to two dumps")
                if weights is not None:
                    _fail_input("--weights applies to live backends; capture each dump with `parity capture --weights`")
                report = diff_dumps(dumps[0], dumps[1], thresholds, taps, allow_incomplete, progress, by_token)
    except InputError as exc:
        _fail_input(str(exc))
    except KeyboardInterrupt:
        _interrupted("diff stopped before it finished; nothing was judged")
    _console().print(render_report(report, show_all=show_all, by_region=by_region, by_token=by_token is not None))
    _write_json(json_out, report.to_dict())
    raise typer.Exit(EXIT_PASS if report else EXIT_FAIL)


@app.command("component")
def component_cmd(
    ref: str = typer.Option(..., "--ref", help="Reference backend, e.g. pytorch."),
    cand: str = typer.Option(..., "--cand", help="Candidate backend, e.g. flash_fp8."),
    layer: int = typer.Option(..., "--layer", help="Layer index within the stack."),
    part: str = typer.Option(..., "--part", help="input_norm, qkv (projections + RoPE), rope, attn (attention "
                                                 "core, real mask), o_proj, post_attn_norm, mlp or layer."),
    stack: str = typer.Option("prefix", "--stack", help="Stack of the layer: prefix, expert or vision (pi0.5)."),
    step: Optional[int] = typer.Option(None, "--step", help="Denoise step, for stacks run once per step "
                                                            "(default 0)."),
    inject: Optional[List[str]] = InjectOpt,
    config: Optional[str] = ConfigOpt, seed: int = SeedOpt, device: str = DeviceOpt, dtype: Optional[str] = DtypeOpt,
    batch: int = BatchOpt, weights: Optional[Path] = WeightsOpt,
    min_cos: float = typer.Option(DEFAULT_MIN_COS, "--min-cos", help="Minimum cosine similarity per output."),
    threshold: Optional[List[str]] = typer.Option(None, "--threshold", help="Per-pattern minimum cosine, "
                                                                            "GLOB=VALUE, e.g. '*.mlp=0.99'."),
    json_out: Optional[Path] = typer.Option(None, "--json", help="Also write the result here."),
) -> None:
    """Run one component of the reference and of the candidate on the reference's own
    inputs (so no upstream error can leak in) and compare the outputs: exit 1 means the
    candidate's component itself is wrong.

    Example: parity component --ref pytorch --cand flash_fp8 --inject silu --layer 0 --part mlp

    Example: parity component --ref pytorch --cand flash --stack expert --step 3 --layer 1 --part attn
    """
    from parity.api import isolate_component
    from parity.comparison.rules import Thresholds
    from parity.errors import InputError
    from parity.report.terminal.diff import render_component

    try:
        thresholds = Thresholds.parse(min_cos, threshold or [])
    except ValueError as exc:
        _fail_input(str(exc))
    try:
        result = isolate_component(ref, cand, _options(config, seed, device, dtype, batch, weights=weights), stack,
                                   layer, part, step, _faults(inject), thresholds)
    except InputError as exc:
        _fail_input(str(exc))
    _console().print(render_component(result))
    _write_json(json_out, {"format": "parity-component", "format_version": 1, **result.to_dict(),
                           "ref": result.ref_meta, "cand": result.cand_meta})
    raise typer.Exit(EXIT_PASS if result else EXIT_FAIL)


ThresholdOpt = typer.Option(None, "--threshold", help="Per-pattern minimum cosine, GLOB=VALUE (repeatable; last "
                                                      "match wins), e.g. 'expert.*.mlp=0.995'.")


JsonOpt = typer.Option(None, "--json", help="Also write the machine-readable result here.")


@app.command("weights")
def weights_cmd(
    ref: str = typer.Option(..., "--ref", help="Reference backend, e.g. pytorch."),
    cand: str = typer.Option(..., "--cand", help="Candidate backend, e.g. flash_fp8."),
    weights: Optional[Path] = WeightsOpt, inject: Optional[List[str]] = InjectOpt,
    config: Optional[str] = ConfigOpt, seed: int = SeedOpt, device: str = DeviceOpt, dtype: Optional[str] = DtypeOpt,
    min_cos: float = typer.Option(0.99999, "--min-cos", help="Default minimum cosine similarity per parameter."),
    quantized_min_cos: float = typer.Option(0.999, "--quantized-min-cos",
                                            help="Minimum cosine of a parameter the backend declares quantised "
                                                 "(e.g. FP8), unless a --threshold pattern matches."),
    threshold: Optional[List[str]] = ThresholdOpt, json_out: Optional[Path] = JsonOpt,
    show_all: bool = typer.Option(False, "--all", help="Also list every parameter with its metrics."),
) -> None:
    """Compare, parameter by parameter, what each backend computes with (FP8 dequantised,
    norm weights as the scale they apply): cosine, max abs, relative error, and shape,
    dtype, transposition and norm-offset findings.

    Example: parity weights --ref pytorch --cand flash_fp8 --weights ~/ckpt/pi05_libero_pytorch
    """
    from parity.api import weights_live
    from parity.comparison.rules import Thresholds
    from parity.errors import InputError
    from parity.report.terminal.weights import render_weights

    try:
        thresholds = Thresholds.parse(min_cos, threshold or [])
    except ValueError as exc:
        _fail_input(str(exc))
    try:
        report = weights_live(ref, cand, _options(config, seed, device, dtype, 1, weights=weights), _faults(inject),
                              thresholds, quantized_min_cos)
    except InputError as exc:
        _fail_input(str(exc))
    _console().print(render_weights(report, show_all=show_all))
    _write_json(json_out, report.to_dict())
    raise typer.Exit(EXIT_PASS if report else EXIT_FAIL)


@app.command("capture")
def capture_cmd(
    backend: str = typer.Option(..., "--backend", help="Backend to run, e.g. pytorch, flash_fp8, 'hf:./model'."),
    output: Path = typer.Option(None, "-o", "--output", help="Dump path (default <output_dir>/<backend>.h5)."),
    inject: Optional[List[str]] = InjectOpt,
    config: Optional[str] = ConfigOpt, seed: int = SeedOpt, device: str = DeviceOpt, dtype: Optional[str] = DtypeOpt,
    batch: int = BatchOpt, inputs: Optional[Path] = InputOpt, padding: Optional[str] = PaddingOpt,
    seq_len: Optional[int] = SeqLenOpt, taps: Optional[str] = TapsOpt, weights: Optional[Path] = WeightsOpt,
    compression: Optional[str] = typer.Option(None, "--compression", help="gzip or lzf (default: none)."),
    max_inflight_mb: float = typer.Option(2048, "--max-inflight-mb",
                                          help="Most MB of tap copies between the model and the disk (staged "
                                               "on their way to the host, queued for the writer thread); past it "
                                               "the capture waits for the writer."),
    stats: bool = StatsOpt, taps_from: Optional[Path] = TapsFromOpt,
    quiet: bool = QuietOpt,
) -> None:
    """Run one backend with taps installed and write every tap to an HDF5 dump.

    Example: parity capture --backend flash --inject silu -o reports/flash_silu.h5

    Example: parity capture --backend flash --stats -o reports/flash_stats.h5   (summaries only)
    """
    from parity.api import CaptureInterrupted, capture_to_dump
    from parity.errors import InputError
    settings = _settings()
    taps = _taps_from(taps_from, taps)
    safe = "".join(ch if ch.isalnum() or ch in "-_." else "_" for ch in backend).strip("_.") or "capture"
    output = output or settings.output_dir / f"{safe}{'_stats' if stats else ''}.h5"
    try:
        options = _options(config, seed, device, dtype, batch, _faults(inject), weights, inputs, padding, seq_len)
        with _sigterm_interrupts(), _progress(quiet) as progress:
            if stats:
                if compression:
                    _fail_input("--compression applies to tensor dumps; a stats dump is a few KB")
                from parity.api import capture_stats
                summary = capture_stats(backend, options, output, taps or settings.taps, progress)
            else:
                summary = capture_to_dump(backend, options, output, taps or settings.taps, compression, progress,
                                          max_inflight_mb)
    except InputError as exc:
        _fail_input(str(exc))
    except CaptureInterrupted as exc:
        _interrupted(str(exc).removeprefix("capture interrupted: "))
    except KeyboardInterrupt:
        _interrupted("nothing was written")
    err = summary["error"]
    console = _console()
    console.print(Text(shown(f"wrote {'summaries of ' if stats else ''}{summary['taps']} taps to {summary['path']}")))
    if err is not None:
        line = Text(shown(f"backend raised at {err.key or 'an untapped place'}:"), style="bold red")
        line.append(shown(f" {err.exc_type}: {err.message}"))
        console.print(line)
        console.print(Text(shown(f"{summary['path']} is marked incomplete: diff it with --allow-incomplete")))
        raise typer.Exit(EXIT_FAIL)


@app.command("report")
def report_cmd(
    result: Path = typer.Argument(..., help="A result written by `parity diff --json`."),
    output: Optional[Path] = typer.Option(None, "-o", "--output",
                                          help="Output file (default <output_dir>/<result name> + extension); "
                                               "'-' writes to stdout."),
    fmt: str = typer.Option("html", "--format", "-f", help="html (one self-contained file), md (PR comment), "
                                                           "junit (CI), model-explorer (node data JSON)."),
    exported_program: Optional[Path] = typer.Option(
        None, "--exported-program", help="model-explorer: a torch.export .pt2 of the reference model; node ids "
                                         "become its FX node names (needs torch). Without it parity also writes "
                                         "its own tap graph next to the node data."),
) -> None:
    """Render a diff result as a shareable report (no model, no torch).

    Example: parity diff --ref 'hf:./m@attn=eager' --cand 'hf:./m@attn=sdpa' --json reports/r.json;
    parity report reports/r.json -o reports/r.html

    Example: parity report reports/r.json --format md -o - >> comment.md
    """
    from parity.report.results import Report

    if fmt not in REPORT_FORMATS:
        _fail_input(f"unknown format {fmt!r}; known: {', '.join(REPORT_FORMATS)}")
    if exported_program is not None and fmt != "model-explorer":
        _fail_input("--exported-program applies to --format model-explorer")
    try:
        report = Report.from_dict(json.loads(result.read_text()))
    except OSError as exc:
        _fail_input(f"cannot read {result}: {exc.strerror or exc}")
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        from parity.dump.stats import is_stats_dump
        if is_stats_dump(result):
            _fail_input(f"{result} is a stats dump (per-tap summaries), not a diff result: compare two with "
                        "`parity diff A_stats.h5 B_stats.h5`; `parity report` renders `parity diff --json` results")
        _fail_input(f"{result} is not JSON: {exc}")
    except ValueError as exc:
        _fail_input(f"{result}: {exc}")
    stem = result.name.removesuffix(".json")
    output = output or _settings().output_dir / (stem + REPORT_FORMATS[fmt])
    extra: dict[Path, str] = {}
    if fmt == "html":
        from parity.report.html import render_html
        text = render_html(report)
    elif fmt == "md":
        from parity.report.markdown import render_markdown
        text = render_markdown(report)
    elif fmt == "junit":
        from parity.report.junit import render_junit
        text = render_junit(report)
    else:
        text, extra = _model_explorer(report, exported_program, output)
    if str(output) == "-":
        sys.stdout.write(text)
        raise typer.Exit(EXIT_PASS)
    _write(output, text)
    for path, content in extra.items():
        _write(path, content)
    console = _console()
    for path in (output, *extra):
        console.print(Text(shown(f"wrote {path}")))


def _model_explorer(report, exported_program: Optional[Path], output: Path) -> tuple[str, dict[Path, str]]:
    from parity.report import model_explorer as me

    if exported_program is None:
        graph = output.with_name(output.name.removesuffix(".json").removesuffix(".me") + ".graph.json")
        return (json.dumps(me.node_data(report), indent=2),
                {graph: json.dumps(me.tap_graph(report), indent=2)} if str(output) != "-" else {})
    modules = report.ref_meta.get("modules")
    if not modules:
        _fail_input("the reference run recorded no module names (ref.modules): cannot map taps to graph nodes")
    try:
        import torch
        ep = torch.export.load(str(exported_program))
    except ImportError:
        _fail_input("--exported-program needs torch")
    except Exception as exc:  # noqa: BLE001 - any unreadable .pt2 is an input error
        _fail_input(f"cannot load {exported_program}: {str(exc).strip().splitlines()[0] if str(exc) else exc}")
    ids = me.node_ids_from_exported_program(ep, modules)
    if not ids:
        _fail_input(f"no tap module of this report appears in {exported_program}")
    return json.dumps(me.node_data(report, ids), indent=2), {}


@app.command("inspect")
def inspect_cmd(dump: Path = typer.Argument(..., help="A dump written by `parity capture`.")) -> None:
    """List a dump's metadata and taps (no torch).

    Example: parity inspect reports/pytorch.h5
    """
    from rich.table import Table

    from parity.api import load_dump
    from parity.dump.stats import is_stats_dump
    from parity.errors import InputError
    stats = is_stats_dump(dump)
    try:
        if stats:
            from parity.api import load_stats
            cap = load_stats(dump, allow_incomplete=True)
        else:
            cap = load_dump(dump, allow_incomplete=True)
    except InputError as exc:
        _fail_input(str(exc))
    console = _console()
    console.print(Text(shown(dump), style="bold").append(f"  complete={cap.complete}", style=""))
    for k, v in sorted(cap.meta.items()):
        if k == "modules" and isinstance(v, (dict, list)):
            v = f"{len(v)} taps mapped to modules"
        console.print(Text(shown(f"  {k}: {v}")))
    if cap.error:
        console.print(Text(shown(f"  raised at {cap.error.key}: {cap.error.exc_type}: {cap.error.message}"),
                           style="red"))
    if stats:
        from parity.report.terminal.stats import render_stats_capture
        console.print(render_stats_capture(cap))
        return
    table = Table(pad_edge=False)
    for col in ("#", "tap", "shape", "dtype", "layout"):
        table.add_column(col)
    for t in cap.taps:
        table.add_row(str(t.order), Text(shown(t.key)), str(list(t.shape)), Text(shown(t.dtype)),
                      Text(shown(t.layout or "-")))
    console.print(table)


@app.command("backends")
def backends_cmd() -> None:
    """List the registered backends (entry-point group parity.backends) and their faults.

    Example: parity backends
    """
    from parity.taps.backends import registered

    console = _console()
    faults: dict[str, str] = {}
    for name, ep in sorted(registered().items()):
        try:
            factory = ep.load()
        except Exception as exc:  # noqa: BLE001 - a backend that fails to import is listed, not fatal
            console.print(Text(shown(name), style="bold").append(shown(f"  (unavailable: {exc})"), style="red"))
            continue
        usage = getattr(factory, "usage", None)
        doc = (factory.__doc__ or "").strip().splitlines()[0] if factory.__doc__ else ""
        console.print(Text(shown(name), style="bold").append(shown(f"  {doc}"))
                      .append("\n    " + shown(usage) if usage else ""))
        try:
            faults.update(getattr(factory, "faults", {}))
        except Exception:  # noqa: BLE001 - a malformed fault table is not fatal either
            pass
    if faults:
        console.print(Text("\n").append("faults", style="bold").append(" (--inject NAME[,NAME])"))
        for name, text in faults.items():
            console.print(Text(shown(f"  {name:18} {text}")))
    console.print("\nAlso: package.module:factory[:ARG] (a function returning a parity Backend).")


@app.command("frames")
def frames_cmd(
    ref: str = typer.Option(..., "--ref", help="Reference backend, e.g. pytorch."),
    cand: str = typer.Option(..., "--cand", help="Candidate backend, e.g. flash."),
    frames: int = typer.Option(3, "--frames", help="Number of consecutive observations (same prompt, new images)."),
    inject: Optional[List[str]] = InjectOpt,
    config: Optional[str] = ConfigOpt, seed: int = SeedOpt, device: str = DeviceOpt, dtype: Optional[str] = DtypeOpt,
    taps: Optional[str] = TapsOpt,
    drift_taps: str = typer.Option("prefix.*.k", "--drift-taps",
                                   help="Taps whose frame-to-frame drift is shown by token region."),
    min_cos: float = typer.Option(DEFAULT_MIN_COS, "--min-cos", help="Minimum cosine similarity per tap."),
    threshold: Optional[List[str]] = typer.Option(None, "--threshold", help="Per-pattern minimum cosine, GLOB=VALUE."),
    json_out: Optional[Path] = typer.Option(None, "--json", help="Also write the machine-readable result here."),
) -> None:
    """Compare a candidate with the reference over a sequence of frames, and show which
    tokens of the reference change from frame to frame, layer by layer (stale K/V reuse).

    Example: parity frames --ref pytorch --cand flash --inject kv_reuse --frames 3
    """
    from parity.api import compare_frames
    from parity.comparison.rules import Thresholds
    from parity.errors import InputError
    from parity.report.terminal.diff import render_frames

    try:
        thresholds = Thresholds.parse(min_cos, threshold or [])
        result = compare_frames(ref, cand, _options(config, seed, device, dtype, 1), frames, _faults(inject),
                                thresholds, taps, drift_taps)
    except (InputError, ValueError) as exc:
        _fail_input(str(exc))
    _console().print(render_frames(result))
    _write_json(json_out, result.to_dict())
    raise typer.Exit(EXIT_PASS if result else EXIT_FAIL)


def main() -> None:
    # Like `python -m`, make the current directory importable, so `my_backends:factory`
    # specs work from a project folder without installing it.
    if os.getcwd() not in sys.path and "" not in sys.path:
        sys.path.insert(0, os.getcwd())
    app()


if __name__ == "__main__":
    main()
