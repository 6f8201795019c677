"""`parity` command line: each command parses, calls one library function, renders, exits.

Exit codes: 0 parity holds, 1 parity failure (a finding), 2 usage or input error."""
from __future__ import annotations

import json
import os
from pathlib import Path
from typing import List, Optional

import typer
from rich.console import Console

from .api import InputError, capture_to_dump, diff_dumps, diff_live, load_dump, weights_live
from .backends import BackendOptions
from .diff import Thresholds

EXIT_PASS, EXIT_FAIL, EXIT_INPUT = 0, 1, 2

app = typer.Typer(add_completion=False, no_args_is_help=True, pretty_exceptions_enable=False,
                  help="Layer-by-layer numerical parity debugger: capture taps, diff them, find the first "
                       "diverging layer and component, gate on it.")


def _console() -> Console:
    """Terminal width on a terminal; 120 columns when piped (CI logs), unless COLUMNS says."""
    console = Console(highlight=False, soft_wrap=False)
    if not console.is_terminal and "COLUMNS" not in os.environ:
        console = Console(highlight=False, soft_wrap=False, width=120)
    return console


def _fail_input(message: str) -> None:
    Console(stderr=True, highlight=False).print(f"[bold red]error:[/] {message}", soft_wrap=True)
    raise typer.Exit(EXIT_INPUT)


def _faults(inject: Optional[List[str]]) -> tuple[str, ...]:
    return tuple(n.strip() for item in inject or [] for n in item.split(",") if n.strip())


def _options(config, seed, device, dtype, batch, faults=(), weights=None) -> BackendOptions:
    try:
        return BackendOptions(config=config, seed=seed, device=device, dtype=dtype, faults=faults, batch=batch,
                              weights=None if weights is None else str(weights))
    except ValueError as exc:
        _fail_input(str(exc))


ConfigOpt = typer.Option(None, "--config", help="Model size: tiny (CPU tests) or full (real pi0.5 sizes). "
                                                 "Default: tiny, or the sizes --weights holds.")
SeedOpt = typer.Option(0, "--seed", help="Seed for weights (unless --weights), inputs and flow-matching noise.")
WeightsOpt = typer.Option(None, "--weights", help="Checkpoint every backend loads: a .safetensors file or a directory "
                                                  "with model.safetensors [+ config.json] (openpi or lerobot layout).")
DeviceOpt = typer.Option("auto", "--device", help="cpu, cuda, cuda:N or auto (cuda if available).")
DtypeOpt = typer.Option(None, "--dtype", help="Model dtype (default: the backend's, bfloat16 for pi0.5).")
BatchOpt = typer.Option(1, "--batch", help="Batch size of the synthetic observation.")
InjectOpt = typer.Option(None, "--inject", help="Fault(s) to inject into the candidate, NAME[,NAME]. "
                                                "See `parity backends`.")
TapsOpt = typer.Option(None, "--taps", help="Only these taps: glob(s) on canonical names, e.g. 'prefix.*.k'.")


@app.command("diff")
def diff_cmd(
    dumps: Optional[List[Path]] = typer.Argument(None, help="Two dumps REF.h5 CAND.h5 (offline, no torch)."),
    ref: Optional[str] = typer.Option(None, "--ref", help="Reference backend (live), e.g. pytorch."),
    cand: Optional[str] = typer.Option(None, "--cand", help="Candidate backend (live), e.g. flash_fp8."),
    inject: Optional[List[str]] = InjectOpt,
    config: Optional[str] = ConfigOpt, seed: int = SeedOpt, device: str = DeviceOpt, dtype: Optional[str] = DtypeOpt,
    batch: int = BatchOpt, taps: Optional[str] = TapsOpt, weights: Optional[Path] = WeightsOpt,
    min_cos: float = typer.Option(0.999, "--min-cos", help="Default minimum cosine similarity per tap."),
    threshold: Optional[List[str]] = typer.Option(None, "--threshold",
                                                  help="Per-pattern minimum cosine, GLOB=VALUE (repeatable; "
                                                       "last match wins), e.g. 'expert.*.mlp=0.995'."),
    json_out: Optional[Path] = typer.Option(None, "--json", help="Also write the machine-readable result here."),
    show_all: bool = typer.Option(False, "--all", help="Also list every tap with all metrics."),
    allow_incomplete: bool = typer.Option(False, "--allow-incomplete", help="Diff interrupted captures too."),
) -> None:
    """Compare a candidate with a reference, tap by tap, and name the first divergence.

    Example (live):    parity diff --ref pytorch --cand flash_fp8 --inject nomask

    Example (offline): parity diff reports/pytorch.h5 reports/flash.h5

    Example (checkpoint): parity diff --ref pytorch --cand flash_fp8 --weights ~/ckpt/pi05_libero_pytorch
    """
    from .render import render_report

    try:
        thresholds = Thresholds.parse(min_cos, threshold or [])
    except ValueError as exc:
        _fail_input(str(exc))
    live = ref is not None or cand is not None
    if live and dumps:
        _fail_input("give either two dumps or --ref/--cand, not both")
    try:
        if live:
            if ref is None or cand is None:
                _fail_input("a live diff needs both --ref and --cand")
            report = diff_live(ref, cand, _options(config, seed, device, dtype, batch, weights=weights),
                               _faults(inject), thresholds, taps)
        else:
            if not dumps or len(dumps) != 2:
                _fail_input("give two dumps (REF.h5 CAND.h5) or --ref and --cand")
            if inject:
                _fail_input("--inject applies to a live candidate; capture it with `parity capture --inject`")
            if weights is not None:
                _fail_input("--weights applies to live backends; capture each dump with `parity capture --weights`")
            report = diff_dumps(dumps[0], dumps[1], thresholds, taps, allow_incomplete)
    except InputError as exc:
        _fail_input(str(exc))
    _console().print(render_report(report, show_all=show_all))
    _write_json(json_out, report.to_dict())
    raise typer.Exit(EXIT_PASS if report else EXIT_FAIL)


ThresholdOpt = typer.Option(None, "--threshold", help="Per-pattern minimum cosine, GLOB=VALUE (repeatable; last "
                                                      "match wins), e.g. 'expert.*.mlp=0.995'.")
JsonOpt = typer.Option(None, "--json", help="Also write the machine-readable result here.")


def _write_json(path: Optional[Path], data: dict) -> None:
    if path is None:
        return
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(data, indent=2))
    except OSError as exc:
        _fail_input(f"cannot write {path}: {exc.strerror or exc}")


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
    from .render_weights import render_weights

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
    backend: str = typer.Option(..., "--backend", help="Backend to run, e.g. pytorch, flash, flash_fp8."),
    output: Path = typer.Option(None, "-o", "--output", help="Dump path (default reports/<backend>.h5)."),
    inject: Optional[List[str]] = InjectOpt,
    config: Optional[str] = ConfigOpt, seed: int = SeedOpt, device: str = DeviceOpt, dtype: Optional[str] = DtypeOpt,
    batch: int = BatchOpt, taps: Optional[str] = TapsOpt, weights: Optional[Path] = WeightsOpt,
    compression: Optional[str] = typer.Option(None, "--compression", help="gzip or lzf (default: none)."),
) -> None:
    """Run one backend with taps installed and write every tap to an HDF5 dump.

    Example: parity capture --backend flash --inject silu -o reports/flash_silu.h5
    """
    output = output or Path("reports") / f"{backend.replace(':', '_').replace('/', '_')}.h5"
    try:
        options = _options(config, seed, device, dtype, batch, _faults(inject), weights)
        summary = capture_to_dump(backend, options, output, taps, compression)
    except InputError as exc:
        _fail_input(str(exc))
    err = summary["error"]
    console = _console()
    console.print(f"wrote {summary['taps']} taps to {summary['path']}")
    if err is not None:
        console.print(f"[bold red]backend raised at {err.key or 'an untapped place'}:[/] {err.exc_type}: {err.message}")
        raise typer.Exit(EXIT_FAIL)


@app.command("inspect")
def inspect_cmd(dump: Path = typer.Argument(..., help="A dump written by `parity capture`.")) -> None:
    """List a dump's metadata and taps (no torch).

    Example: parity inspect reports/pytorch.h5
    """
    from rich.table import Table

    try:
        cap = load_dump(dump, allow_incomplete=True)
    except InputError as exc:
        _fail_input(str(exc))
    console = _console()
    console.print(f"[bold]{dump}[/]  complete={cap.complete}")
    for k, v in sorted(cap.meta.items()):
        console.print(f"  {k}: {v}")
    if cap.error:
        console.print(f"[red]  raised at {cap.error.key}: {cap.error.exc_type}: {cap.error.message}[/]")
    table = Table(pad_edge=False)
    for col in ("#", "tap", "shape", "dtype", "layout"):
        table.add_column(col)
    for t in cap.taps:
        table.add_row(str(t.order), t.key, str(list(t.shape)), t.dtype, t.layout or "-")
    console.print(table)


@app.command("backends")
def backends_cmd() -> None:
    """List the registered backends and the faults each accepts for --inject.

    Example: parity backends
    """
    from .backends import registered

    console = _console()
    for name, ep in sorted(registered().items()):
        try:
            factory = ep.load()
        except Exception as exc:  # noqa: BLE001 - a backend that fails to import is listed, not fatal
            console.print(f"[bold]{name}[/]  [red](unavailable: {exc})[/]")
            continue
        console.print(f"[bold]{name}[/]  {(factory.__doc__ or '').strip()}")
    faults: dict[str, str] = {}
    for ep in registered().values():
        try:
            faults.update(getattr(ep.load(), "faults", {}))
        except Exception:  # noqa: BLE001
            pass
    if faults:
        console.print("\n[bold]faults[/] (--inject NAME[,NAME])")
        for name, text in faults.items():
            console.print(f"  {name:18} {text}")


def main() -> None:
    app()


if __name__ == "__main__":
    main()
