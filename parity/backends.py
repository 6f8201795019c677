"""The backend interface and the registry that turns a spec string into a Backend.

Specs: a registered name (entry-point group `parity.backends`; the bundled pi0.5
backends register there) or `package.module:factory`.  A factory takes BackendOptions
and returns a Backend.  torch is imported only by the factories, never here.
"""
from __future__ import annotations

import importlib
from dataclasses import dataclass, field
from importlib.metadata import entry_points
from typing import Any, Callable

from .probe import Probe
from .records import Layout

ENTRY_POINT_GROUP = "parity.backends"


class BackendError(Exception):
    """A backend cannot be resolved or built (unknown name, bad option, bad fault)."""


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

    def __post_init__(self) -> None:
        if self.batch < 1:
            raise ValueError("batch must be >= 1")
        if self.weights is not None and not str(self.weights).strip():
            raise ValueError("weights path is empty")


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


def registered() -> dict[str, Any]:
    """Registered backend names -> entry points (not loaded)."""
    return {ep.name: ep for ep in entry_points(group=ENTRY_POINT_GROUP)}


def load_factory(spec: str) -> Callable[[BackendOptions], Backend]:
    if ":" in spec:
        module_name, _, attr = spec.partition(":")
        try:
            return getattr(importlib.import_module(module_name), attr)
        except (ImportError, AttributeError) as exc:
            raise BackendError(f"cannot load backend factory {spec!r}: {exc}") from None
    known = registered()
    if spec not in known:
        names = ", ".join(sorted(known)) or "none registered"
        raise BackendError(f"unknown backend {spec!r}; known: {names} (or give package.module:factory)")
    return known[spec].load()


def resolve(spec: str, options: BackendOptions) -> Backend:
    factory = load_factory(spec)
    try:
        backend = factory(options)
    except (ValueError, KeyError) as exc:
        raise BackendError(f"backend {spec!r}: {exc}") from None
    backend.meta.setdefault("backend", spec)
    return backend
