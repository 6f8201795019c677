"""The backend interface and the registry that turns a spec string into a Backend.

Specs: a registered name (entry-point group `parity.backends`; the bundled pi0.5
backends and `hf` register there), optionally followed by `:ARG` (`hf:./model@attn=sdpa`),
or `package.module:factory[:ARG]`.  A factory takes BackendOptions (and the ARG string,
when the spec has one) and returns a Backend.  Any installed package can add backends
by declaring entry points in the `parity.backends` group.  torch is imported only by
the factories, never here.
"""

from __future__ import annotations

import contextlib
import dataclasses
import importlib
import inspect
import os
import sys
from collections.abc import Callable
from dataclasses import dataclass, field
from importlib.metadata import entry_points
from typing import Any

from parity.taps.probe import Probe
from parity.taps.records import Layout

ENTRY_POINT_GROUP = "parity.backends"
MAX_DECODE = 1024  # decode steps: every step is a full set of per-layer taps


class BackendError(Exception):
    """A backend cannot be resolved or built (unknown name, bad option, bad fault)."""


class DetailedError(ValueError):
    """A factory's input error laid out for the terminal: a title line, then detail lines
    (e.g. one per problem of a checkpoint).  `resolve` keeps such a message whole; any
    other exception is cut to its first line (third-party messages can run for pages)."""


@dataclass(frozen=True)
class BackendOptions:
    """What every backend of one comparison is built from.  A live diff gives the
    reference and the candidate the same options (faults aside), so both see the same
    weights, inputs and noise."""

    config: str | None = None  # model size; None = the backend's default (or what `weights` holds)
    seed: int = 0
    device: str = "auto"  # "auto" = cuda if available, else cpu
    dtype: str | None = None  # None = the backend's default
    faults: tuple[str, ...] = ()
    batch: int = 1
    weights: str | None = None  # checkpoint path both sides load; None = seeded random weights
    # Model inputs, for backends that take them (e.g. `hf`): a file path (.json/.npy) or
    # an in-memory value (token id rows, a dict with input_ids/attention_mask); None =
    # generated from the seed.  Backends that build their own inputs refuse them.
    inputs: Any = field(default=None, compare=False)
    padding: str | None = None  # "left" | "right" | None (the backend's default)
    seq_len: int | None = None  # generated inputs: tokens per row (None = the backend's default)
    frame: int = 0  # index in a sequence of observations (`parity frames`), for backends that make their own
    decode: int = 0  # decode steps after the prefill, for backends that generate (causal LMs); 0 = prefill only
    # What the reference's run produced for the candidate to be fed (the greedy tokens of
    # `decode`, teacher-forced so both sides see the same inputs); set by the live diff.
    feed: Any = field(default=None, compare=False)

    def __post_init__(self) -> None:
        if self.batch < 1:
            raise ValueError("batch must be >= 1")
        if self.frame < 0:
            raise ValueError("frame must be >= 0")
        if self.weights is not None and not str(self.weights).strip():
            raise ValueError("weights path is empty")
        if self.padding not in (None, "left", "right"):
            raise ValueError(f"padding must be left or right, not {self.padding!r}")
        if self.seq_len is not None and self.seq_len < 1:
            raise ValueError("seq_len must be >= 1")
        if not 0 <= self.decode <= MAX_DECODE:
            raise ValueError(f"decode must be 0 to {MAX_DECODE} steps, got {self.decode}")

    @classmethod
    def given(cls, **fields: Any) -> BackendOptions:
        """Options from what a user gave: a None field takes its default, a path (a
        checkpoint, an input file) is kept as its string.  ValueError if one is bad."""
        unknown = sorted(set(fields) - {f.name for f in dataclasses.fields(cls)})
        if unknown:
            raise TypeError(f"unknown backend option {unknown[0]!r}")
        for name in ("weights", "inputs"):
            if isinstance(fields.get(name), os.PathLike):
                fields[name] = os.fspath(fields[name])
        return cls(**{k: v for k, v in fields.items() if v is not None})

    @property
    def takes_inputs(self) -> bool:
        """Whether any input option is set (a backend that ignores them must refuse them)."""
        return self.inputs is not None or self.padding is not None or self.seq_len is not None


@dataclass(frozen=True)
class ParamView:
    """One parameter as a backend computes with it, materialised only when compared (a
    full-size model's dequantised weights would not fit in memory all at once).

    dtype: the precision the backend holds it in ("bfloat16", "float8_e4m3fn", ...).
    quantized: the backend's declared quantisation scheme, if any: such a parameter is
        lossy by design and judged by its cosine threshold, not as an accidental cast."""

    dtype: str
    shape: tuple[int, ...]
    load: Callable[[], Any]  # -> torch.Tensor or numpy array of the values computed with
    quantized: str | None = None


@dataclass(frozen=True)
class Lossy:
    """What a backend computes lossily on purpose (an FP8 MLP), declared so that it is
    judged by an allowance and not as a bug.

    `parts`: globs of the taps those components produce ("prefix.*.mlp").  `bounds`:
    {glob: min_cos or (min_cos, max_norm_err)}, the fixed bounds that judge the taps they
    match, over the default, whenever the user sets none: the lossy parts' own and those
    of everything that inherits their loss.  With calibrated budgets, taps before the
    first lossy part in execution order keep their budgets (no loss has entered yet)."""

    parts: tuple[str, ...]
    bounds: Any  # Mapping[str, float | tuple[float, float]]
    why: str = ""  # one line for the reports: "FP8 e4m3 MLP gate/up projections"


@dataclass
class Backend:
    """A model ready to run once on fixed inputs, with the probe that names its taps.

    `parameters`, when given, says what the model really computes with, under canonical
    names shared by the reference and its candidates (a quantised weight dequantised, a
    norm weight as the scale it applies): `parity weights` compares those.  Without it,
    `parity weights` falls back to the model's own `named_parameters()`."""

    name: str
    model: Any  # torch.nn.Module: the tree hooks are installed on
    probe: Probe
    run: Callable[[], Any]  # one full inference on the prepared inputs (noise included)
    layouts: Callable[[], dict[str, Layout]]
    meta: dict[str, Any] = field(default_factory=dict)
    inputs: Any = None  # the prepared inputs, for tools that drive the model directly (benchmarks)
    parameters: Callable[[], dict[str, ParamView]] | None = None
    lossy: Lossy | None = None  # what it computes lossily on purpose, and the allowance
    # how its run computes at a higher precision for calibrated budgets: widen(dtype), a
    # context manager; None = parity's generic upcast of the model and its inputs
    widen: Callable[[Any], Any] | None = None
    # after a run: what a candidate built from these options must be fed to see the same
    # inputs (BackendOptions.feed; the tokens it generated), None when nothing
    feed: Callable[[], Any] | None = None
    # how a sharded candidate's taps are split across ranks: {glob: {"kind": "column" |
    # "heads" | "sequence" | "partial" | "replicated", ...}}, written to each rank's dump
    sharding: Any = None


def registered() -> dict[str, Any]:
    """Registered backend names -> entry points (not loaded)."""
    return {ep.name: ep for ep in entry_points(group=ENTRY_POINT_GROUP)}


@dataclass(frozen=True)
class BackendSpec:
    """A parsed backend spec: which factory, and the argument string it receives.

    Grammar (a registered name before the first ':' wins over a module path):
      NAME              registered factory, called factory(options)
      NAME:ARG          registered factory, called factory(options, ARG)   e.g. hf:./m@attn=sdpa
      pkg.mod:attr      factory `attr` of module `pkg.mod`, called factory(options)
      pkg.mod:attr:ARG  the same, called factory(options, ARG)"""

    text: str
    target: str  # registered name or "pkg.mod:attr"
    arg: str | None
    registered: bool

    @classmethod
    def parse(cls, spec: str, names: set[str] | None = None) -> BackendSpec:
        spec = spec.strip()
        if not spec:
            raise BackendError("empty backend spec")
        names = set(registered()) if names is None else names
        head, sep, rest = spec.partition(":")
        if head in names:
            return cls(spec, head, rest if sep else None, True)
        if not sep:
            known = ", ".join(sorted(names)) or "none registered"
            raise BackendError(f"unknown backend {spec!r}; known: {known} (or give package.module:factory)")
        attr, sep2, arg = rest.partition(":")
        if not head or not attr:
            raise BackendError(f"bad backend spec {spec!r}: expected NAME[:ARG] or package.module:factory[:ARG]")
        return cls(spec, f"{head}:{attr}", arg if sep2 else None, False)


def load_factory(spec: str | BackendSpec) -> Callable[..., Backend]:
    parsed = spec if isinstance(spec, BackendSpec) else BackendSpec.parse(spec)
    if parsed.registered:
        try:
            return registered()[parsed.target].load()
        except (ImportError, AttributeError) as exc:
            raise BackendError(f"backend {parsed.target!r} is registered but cannot be loaded: {exc}") from None
    module_name, _, attr = parsed.target.partition(":")
    try:
        with _current_directory_importable():
            return getattr(importlib.import_module(module_name), attr)
    except (ImportError, AttributeError) as exc:
        raise BackendError(f"cannot load backend factory {parsed.target!r}: {exc}") from None


@contextlib.contextmanager
def _current_directory_importable():
    """While a `package.module:factory` spec is imported, the current directory is on
    sys.path, last: a project's own backends load without installing them, and a file
    there named like an installed module (`h5py.py`, `numpy.py`) never shadows it."""
    cwd = os.getcwd()
    if cwd in sys.path or "" in sys.path:
        yield
        return
    sys.path.append(cwd)
    try:
        yield
    finally:
        with contextlib.suppress(ValueError):
            sys.path.remove(cwd)


def _check_arity(factory: Callable, parsed: BackendSpec) -> None:
    """A spec's argument must fit the factory's signature: say so in one line, not a TypeError."""
    try:
        sig = inspect.signature(factory)
    except (TypeError, ValueError):
        return
    try:
        if parsed.arg is None:
            sig.bind(None)
        else:
            sig.bind(None, parsed.arg)
    except TypeError:
        if parsed.arg is None:
            usage = getattr(factory, "usage", f"{parsed.target}:ARG")
            raise BackendError(f"backend {parsed.target!r} needs an argument: {usage}") from None
        raise BackendError(f"backend {parsed.target!r} takes no argument (got {parsed.arg!r})") from None


def missing_requirements(factory) -> str | None:
    """What an installed factory needs and this environment lacks, in one line (None: all
    there): a factory may declare `requires = {module: what to pip install}`, the optional
    packages it imports ("parity[hf]" for the hf backend, "liger-kernel")."""
    import importlib.util

    for module, extra in dict(getattr(factory, "requires", None) or {}).items():
        try:
            found = importlib.util.find_spec(module) is not None
        except (ImportError, ValueError):
            found = False
        if not found:
            return f"needs the Python package {module}, which is not installed (pip install '{extra}')"
    return None


def check(spec: str, faults: tuple[str, ...] = ()) -> Callable[..., Backend]:
    """A spec and its faults checked without building anything (so a typo fails before the
    reference has run): the factory loads, takes the spec's ARG or not, has what it
    requires, and, when it declares a fault catalogue (`factory.faults`), offers each
    fault.  Returns the factory; BackendError with one line otherwise."""
    parsed = BackendSpec.parse(spec)
    factory = load_factory(parsed)
    _check_arity(factory, parsed)
    missing = missing_requirements(factory)
    if missing:
        raise BackendError(f"backend {spec!r}: {missing}")
    catalogue = getattr(factory, "faults", None)
    if faults and isinstance(catalogue, dict):
        unknown = [f for f in faults if f not in catalogue]
        if unknown:
            raise BackendError(f"backend {spec!r}: unknown fault {', '.join(unknown)}; known: {', '.join(catalogue)}")
    return factory


def resolve(spec: str, options: BackendOptions) -> Backend:
    parsed = BackendSpec.parse(spec)
    factory = check(spec, tuple(options.faults))
    try:
        backend = factory(options) if parsed.arg is None else factory(options, parsed.arg)
    except TypeError as exc:
        first = next((line.strip() for line in str(exc).splitlines() if line.strip()), "TypeError")
        if exc.__traceback__.tb_next is None:  # the call itself was refused (`os:system`, a class)
            raise BackendError(f"backend {spec!r}: {parsed.target} is not a backend factory "
                               f"(factory(options[, ARG]) -> Backend): {first}") from None
        # raised inside it: a factory's bug, or a function that is not one (`json:loads`)
        raise BackendError(f"backend {spec!r}: {parsed.target} raised TypeError: {first} (a backend factory is "
                           "factory(options[, ARG]) -> Backend)") from None
    except (ValueError, KeyError, FileNotFoundError) as exc:
        msg = str(exc.args[0] if isinstance(exc, KeyError) and exc.args else exc).strip()
        if not isinstance(exc, DetailedError):  # one line: the CLI's error contract
            msg = next((line.strip() for line in msg.splitlines() if line.strip()), type(exc).__name__)
        raise BackendError(f"backend {spec!r}: {msg or type(exc).__name__}") from None
    except ImportError as exc:  # an optional package the factory imports
        name = getattr(exc, "name", None) or str(exc)
        raise BackendError(f"backend {spec!r}: needs the Python package {name}, which is not installed") from None
    except Exception as exc:  # noqa: BLE001 - a user factory's own bug: one line, not a traceback
        text = next((line.strip() for line in str(exc).splitlines() if line.strip()), "")
        raise BackendError(f"backend {spec!r}: its factory {parsed.target} raised {type(exc).__name__}"
                           + (f": {text}" if text else "")) from None
    if not isinstance(backend, Backend):
        raise BackendError(f"backend {spec!r}: {parsed.target} returned {type(backend).__name__}, not a Backend: "
                           "not a backend factory")
    backend.meta.setdefault("backend", spec)
    return backend
