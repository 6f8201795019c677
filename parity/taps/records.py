"""The data that flows from capture to diff: taps, token layouts and run metadata.

Plain numpy + dataclasses so that the dump reader and the diff engine never need torch.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import numpy as np


@dataclass(frozen=True)
class Region:
    """A named span [start, stop) of canonical token positions (per batch element)."""

    name: str
    start: int
    stop: int

    def __post_init__(self) -> None:
        if not (0 <= self.start <= self.stop):
            raise ValueError(f"region {self.name!r}: bad span [{self.start}, {self.stop})")


@dataclass(frozen=True)
class Layout:
    """Where each token slot of a tensor lives in the canonical (reference) token space.

    Tensors that use a layout have shape [rows, slots, *features].  `slots[r, t]` is the
    canonical flat index (batch_element * length + position) of that slot, or -1 when
    the slot is don't-care (padding, a masked camera, packing filler).  Two backends
    that lay tokens out differently (padded vs packed) are compared position by position
    through their layouts; don't-care slots are never compared.
    """

    slots: np.ndarray  # [R, T] int64
    length: int  # canonical positions per batch element
    regions: tuple[Region, ...] = ()

    def __post_init__(self) -> None:
        if self.slots.ndim != 2:
            raise ValueError(f"layout slots must be 2-D [rows, slots], got shape {self.slots.shape}")
        if self.length <= 0:
            raise ValueError("layout length must be positive")
        valid = self.slots[self.slots >= 0]
        if np.unique(valid).size != valid.size:
            raise ValueError("layout maps two slots to the same canonical position")

    def region_of(self, canonical: np.ndarray) -> np.ndarray:
        """Region index (into `regions`, -1 for none) of each canonical flat index."""
        pos = canonical % self.length
        out = np.full(canonical.shape, -1, dtype=np.int64)
        for i, reg in enumerate(self.regions):
            out[(pos >= reg.start) & (pos < reg.stop)] = i
        return out


@dataclass(frozen=True)
class TapInfo:
    """Where a tap sits in the model: the canonical name and what it means."""

    name: str  # canonical dotted name, e.g. "prefix.0.k"
    stack: str
    layer: int | None
    component: str
    step: int | None = None

    @property
    def key(self) -> str:
        """Unique key of one captured value: the name plus the step, if any."""
        return self.name if self.step is None else f"{self.name}@{self.step}"


@dataclass
class Tap:
    """One captured tensor, as numpy, with what is needed to compare it."""

    info: TapInfo
    order: int  # execution order within its capture
    array: np.ndarray  # stored representation (bf16/fp8 kept as raw bits)
    dtype: str  # original dtype name ("float32", "bfloat16", "float8_e4m3fn", ...)
    layout: str | None = None  # name of the Layout it uses, None = compare whole tensor

    @property
    def key(self) -> str:
        return self.info.key

    @property
    def shape(self) -> tuple[int, ...]:
        return tuple(self.array.shape)


@dataclass(frozen=True)
class CaptureError:
    """The candidate raised: where (the innermost tap component running) and what."""

    key: str | None  # tap key where it raised, None if outside every tap
    info: TapInfo | None
    exc_type: str
    message: str


@dataclass
class Capture:
    """Everything one backend run produced: taps in execution order, layouts, metadata.

    `complete` is False when the run stopped early: interrupted, or the backend raised.
    A run that raised never counts as complete, so `error` forces `complete` to False.
    """

    taps: list[Tap] = field(default_factory=list)
    layouts: dict[str, Layout] = field(default_factory=dict)
    meta: dict[str, Any] = field(default_factory=dict)
    error: CaptureError | None = None
    complete: bool = True

    def __post_init__(self) -> None:
        if self.error is not None:
            self.complete = False

    def only(self, keep) -> Capture:
        """The same capture with only the taps `keep(name, key)` accepts."""
        return Capture([t for t in self.taps if keep(t.info.name, t.key)], self.layouts, self.meta, self.error,
                       self.complete)

    def by_key(self) -> dict[str, Tap]:
        return {t.key: t for t in self.taps}

    # A Capture is a sink for `parity.capture.capture`, like `parity.dump.DumpWriter`.
    def add_layout(self, name: str, layout: Layout) -> None:
        self.layouts[name] = layout

    def set_observation(self, observation: dict) -> None:
        """How observing changed the run (see capture.observation); kept in meta."""
        self.meta["observation"] = observation

    def add_tap(self, tap: Tap) -> None:
        self.taps.append(tap)

    def set_error(self, error: CaptureError) -> None:
        self.error = error
        self.complete = False
