"""`parity` command line: each command parses, calls one library function, renders, exits.

Exit codes: 0 parity holds, 1 parity failure (a finding), 2 usage or input error,
130 interrupted (Ctrl-C or SIGTERM).  Everything a dump says (tap names, paths, messages)
is printed as data: consoles have markup off and control characters are escaped."""
from __future__ import annotations

import contextlib
import json
import os
import signal
from pathlib import Path
from typing import List, Optional

import typer
from rich.console import Console
from rich.text import Text

from .api import CaptureInterrupted, InputError, capture_to_dump, diff_dumps, diff_live, load_dump
from .backends import BackendOptions
from .diff import Thresholds
from .render import shown

EXIT_PASS, EXIT_FAIL, EXIT_INPUT, EXIT_INTERRUPTED = 0, 1, 2, 130

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
    line = Text(f"{label} ", style="bold red").append(shown(message))
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


def _faults(inject: Optional[List[str]]) -> tuple[str, ...]:
    return tuple(n.strip() for item in inject or [] for n in item.split(",") if n.strip())


def _options(config, seed, device, dtype, batch, faults=()) -> BackendOptions:
    try:
        return BackendOptions(config=config, seed=seed, device=device, dtype=dtype, faults=faults, batch=batch)
    except ValueError as exc:
        _fail_input(str(exc))


ConfigOpt = typer.Option("tiny", "--config", help="Model size: tiny (CPU tests) or full (real pi0.5 sizes).")
SeedOpt = typer.Option(0, "--seed", help="Seed for weights, inputs and flow-matching noise.")
DeviceOpt = typer.Option("auto", "--device", help="cpu, cuda, cuda:N or auto (cuda if available).")
DtypeOpt = typer.Option(None, "--dtype", help="Model dtype (default: the backend's, bfloat16 for pi0.5).")
BatchOpt = typer.Option(1, "--batch", help="Batch size of the synthetic observation.")
InjectOpt = typer.Option(None, "--inject", help="Fault(s) to inject into the candidate, NAME[,NAME]. "
                                                "See `parity backends`.")
TapsOpt = typer.Option(None, "--taps", help="Only these taps: glob(s) on canonical names, e.g. 'prefix.*.k'.")


def _write_json(path: Path, data: dict) -> None:
    """Write `data` to a temporary name and rename it: a full disk leaves no truncated JSON."""
    partial = path.with_name(path.name + ".partial")
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        partial.write_text(json.dumps(data, indent=2, allow_nan=False))
        os.replace(partial, path)
    except (OSError, ValueError) as exc:  # ValueError: a NaN where JSON has none
        partial.unlink(missing_ok=True)
        _fail_input(f"cannot write {path}: {getattr(exc, 'strerror', None) or exc}")


@app.command("diff")
def diff_cmd(
    dumps: Optional[List[Path]] = typer.Argument(None, help="Two dumps REF.h5 CAND.h5 (offline, no torch)."),
    ref: Optional[str] = typer.Option(None, "--ref", help="Reference backend (live), e.g. pytorch."),
    cand: Optional[str] = typer.Option(None, "--cand", help="Candidate backend (live), e.g. flash_fp8."),
    inject: Optional[List[str]] = InjectOpt,
    config: str = ConfigOpt, seed: int = SeedOpt, device: str = DeviceOpt, dtype: Optional[str] = DtypeOpt,
    batch: int = BatchOpt, taps: Optional[str] = TapsOpt,
    min_cos: float = typer.Option(0.999, "--min-cos", help="Default minimum cosine similarity per tap."),
    threshold: Optional[List[str]] = typer.Option(None, "--threshold",
                                                  help="Per-pattern minimum cosine, GLOB=VALUE (repeatable; "
                                                       "last match wins), e.g. 'expert.*.mlp=0.995'."),
    json_out: Optional[Path] = typer.Option(None, "--json", help="Also write the machine-readable result here."),
    show_all: bool = typer.Option(False, "--all", help="Also list every tap with all metrics."),
    allow_incomplete: bool = typer.Option(False, "--allow-incomplete",
                                          help="Diff interrupted captures too, as far as they go (never exit 0)."),
) -> None:
    """Compare a candidate with a reference, tap by tap, and name the first divergence.

    Example (live):    parity diff --ref pytorch --cand flash_fp8 --inject nomask

    Example (offline): parity diff reports/pytorch.h5 reports/flash.h5
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
            report = diff_live(ref, cand, _options(config, seed, device, dtype, batch), _faults(inject),
                               thresholds, taps)
        else:
            if not dumps or len(dumps) != 2:
                _fail_input("give two dumps (REF.h5 CAND.h5) or --ref and --cand")
            if inject:
                _fail_input("--inject applies to a live candidate; capture it with `parity capture --inject`")
            report = diff_dumps(dumps[0], dumps[1], thresholds, taps, allow_incomplete)
    except InputError as exc:
        _fail_input(str(exc))
    except KeyboardInterrupt:
        _interrupted("diff stopped before it finished; nothing was judged")
    _console().print(render_report(report, show_all=show_all))
    if json_out is not None:
        _write_json(json_out, report.to_dict())
    raise typer.Exit(EXIT_PASS if report else EXIT_FAIL)


@app.command("capture")
def capture_cmd(
    backend: str = typer.Option(..., "--backend", help="Backend to run, e.g. pytorch, flash, flash_fp8."),
    output: Path = typer.Option(None, "-o", "--output", help="Dump path (default reports/<backend>.h5)."),
    inject: Optional[List[str]] = InjectOpt,
    config: str = ConfigOpt, seed: int = SeedOpt, device: str = DeviceOpt, dtype: Optional[str] = DtypeOpt,
    batch: int = BatchOpt, taps: Optional[str] = TapsOpt,
    compression: Optional[str] = typer.Option(None, "--compression", help="gzip or lzf (default: none)."),
) -> None:
    """Run one backend with taps installed and write every tap to an HDF5 dump.

    Example: parity capture --backend flash --inject silu -o reports/flash_silu.h5
    """
    output = output or Path("reports") / f"{backend.replace(':', '_').replace('/', '_')}.h5"
    try:
        options = _options(config, seed, device, dtype, batch, _faults(inject))
        with _sigterm_interrupts():
            summary = capture_to_dump(backend, options, output, taps, compression)
    except InputError as exc:
        _fail_input(str(exc))
    except CaptureInterrupted as exc:
        _interrupted(str(exc).removeprefix("capture interrupted: "))
    except KeyboardInterrupt:
        _interrupted("nothing was written")
    err = summary["error"]
    console = _console()
    console.print(Text(shown(f"wrote {summary['taps']} taps to {summary['path']}")))
    if err is not None:
        line = Text(shown(f"backend raised at {err.key or 'an untapped place'}:"), style="bold red")
        line.append(shown(f" {err.exc_type}: {err.message}"))
        console.print(line)
        console.print(Text(shown(f"{summary['path']} is marked incomplete: diff it with --allow-incomplete")))
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
    console.print(Text(shown(dump), style="bold").append(f"  complete={cap.complete}", style=""))
    for k, v in sorted(cap.meta.items()):
        console.print(Text(shown(f"  {k}: {v}")))
    if cap.error:
        console.print(Text(shown(f"  raised at {cap.error.key}: {cap.error.exc_type}: {cap.error.message}"),
                           style="red"))
    table = Table(pad_edge=False)
    for col in ("#", "tap", "shape", "dtype", "layout"):
        table.add_column(col)
    for t in cap.taps:
        table.add_row(str(t.order), Text(shown(t.key)), str(list(t.shape)), Text(shown(t.dtype)),
                      Text(shown(t.layout or "-")))
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
            console.print(Text(shown(name), style="bold").append(shown(f"  (unavailable: {exc})"), style="red"))
            continue
        console.print(Text(shown(name), style="bold").append(shown(f"  {(factory.__doc__ or '').strip()}")))
    faults: dict[str, str] = {}
    for ep in registered().values():
        try:
            faults.update(getattr(ep.load(), "faults", {}))
        except Exception:  # noqa: BLE001
            pass
    if faults:
        console.print(Text("\n").append("faults", style="bold").append(" (--inject NAME[,NAME])"))
        for name, text in faults.items():
            console.print(Text(shown(f"  {name:18} {text}")))


def main() -> None:
    app()


if __name__ == "__main__":
    main()
