"""Getting a tap off the device without stalling the forward.

On CUDA each tap is copied, on the compute stream, into the open slot of a small device
ring (one kernel: an exact snapshot, later in-place kernels cannot touch it; no
allocation, no event, no stream switch per tap).  A full slot travels to pinned host
memory in one copy on a side stream, so the device-to-host traffic overlaps the rest of
the forward and no tap costs a host sync.  A slot is written again only after its
previous copy has left: the compute stream waits for that copy's event, on the device.
Host tensors are views into the slot's pinned buffer, which comes from torch's caching
host allocator: after the first capture they are reused, not allocated again.

Taps larger than a slot are cloned and copied on their own (the earlier per-tap path).
While a CUDA graph is being captured, taps go into slots allocated inside the graph's
memory pool and are shipped when the run is flushed, after the graph has replayed (no
host work may be recorded into a graph).  On CPU the clone is the staged copy.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass

import numpy as np
import torch

SLOT_BYTES = 32 << 20  # one device-to-host copy per this many bytes of taps


SLOTS = 4  # device ring: SLOTS x SLOT_BYTES held while a capture runs


_ALIGN = 256  # every tap starts on this boundary (any dtype may view it)


_BIT_VIEWS = {  # dtypes numpy cannot hold: stored as their raw bits
    torch.bfloat16: (torch.int16, np.uint16),
    torch.float8_e4m3fn: (torch.int8, np.uint8),
    torch.float8_e5m2: (torch.int8, np.uint8),
}


_NUMPY = {torch.float64: np.float64, torch.float32: np.float32, torch.float16: np.float16,
          torch.int64: np.int64, torch.int32: np.int32, torch.int16: np.int16,
          torch.int8: np.int8, torch.uint8: np.uint8, torch.bool: np.bool_}


_NUMPY.update({t: n for t, (_, n) in _BIT_VIEWS.items()})


def to_storage(t: torch.Tensor, private: bool = False) -> tuple[np.ndarray, str]:
    """A detached host copy of `t` in the dump's storage representation, and its dtype name.

    `private`: `t` is already a copy nobody else holds, so a host tensor need not be copied again."""
    t = t.detach()
    name = str(t.dtype).removeprefix("torch.")
    src_is_host = t.device.type == "cpu" and not private
    if t.dtype in _BIT_VIEWS:
        view, np_dtype = _BIT_VIEWS[t.dtype]
        arr = t.contiguous().view(view).cpu().numpy().view(np_dtype)
    else:
        arr = t.cpu().numpy()
    return (arr.copy() if src_is_host else arr), name


def batch_elements(device: torch.device, default: int, most: int, bytes_per_element: int) -> int:
    """How many elements a reduction batch on `device` holds: on CUDA as many as free
    memory affords (`bytes_per_element` of working memory each, from a quarter of what is
    free), between `default` and `most`; elsewhere `default`.  Fewer, larger batches mean
    fewer kernel launches, which an eager forward pays for on the host.  `default` while a
    CUDA graph is being captured (no memory query may run inside one)."""
    if device.type != "cuda" or graph_capturing():
        return default
    free = torch.cuda.mem_get_info(device)[0]
    return max(default, min(most, free // 4 // bytes_per_element))


def graph_capturing() -> bool:
    """Whether a CUDA graph is being captured on the current stream (never on CPU builds)."""
    return torch.cuda.is_available() and torch.cuda.is_current_stream_capturing()


@dataclass
class Staged:
    """A tap copy of its own on its way to the host; `ready()` is the host tensor, once there."""

    tensor: torch.Tensor  # pinned host buffer (CUDA path) or the device-side clone
    event: torch.cuda.Event | None = None  # completes when the host buffer holds the tap

    @property
    def nbytes(self) -> int:
        return self.tensor.numel() * self.tensor.element_size()

    def done(self) -> bool:
        """Whether the host copy is there already (never waits)."""
        return self.event is None or self.event.query()

    def ready(self) -> torch.Tensor:
        if self.event is not None:
            self.event.synchronize()
            self.event = None
        return self.tensor

    def storage(self) -> tuple[np.ndarray, str]:
        """The host copy in the dump's storage representation (see to_storage)."""
        return to_storage(self.ready(), private=True)


class _Batch:
    """The taps written into one slot, until they leave for the host together."""

    __slots__ = ("device", "typed", "used", "slot", "host", "host_np", "event")

    def __init__(self, device: torch.Tensor, slot: int | None) -> None:
        self.device, self.slot = device, slot  # slot None: a buffer of a graph's own
        self.typed: dict[torch.dtype, torch.Tensor] = {}  # the slot viewed as each dtype written so far
        self.used = 0
        self.host: torch.Tensor | None = None
        self.host_np: np.ndarray | None = None  # the same bytes, for numpy-side views
        self.event = None

    def arrived(self) -> bool:
        """Whether the host buffer holds the batch (never waits)."""
        if self.host is None:
            return False
        if self.event is not None and self.event.query():
            self.event = None
        return self.event is None


class SlotStaged:
    """A tap inside a batch: `ready()` ships the batch if it has not left yet, waits for
    it, and returns the tap's view of the batch's host buffer.

    It holds the stager, and batches hold no reference back to it: no reference cycle
    can keep a shipped batch alive, so its pinned buffer goes back to the caching
    allocator as soon as the last array viewing it is dropped, not at a GC pass."""

    __slots__ = ("stager", "batch", "offset", "nbytes", "dtype", "shape")

    def __init__(self, stager: Stager, batch: _Batch, offset: int, nbytes: int, dtype: torch.dtype,
                 shape: torch.Size) -> None:
        self.stager, self.batch, self.offset, self.nbytes = stager, batch, offset, nbytes
        self.dtype, self.shape = dtype, shape

    def done(self) -> bool:
        return self.batch.arrived()

    def _arrive(self) -> _Batch:
        b = self.batch
        if b.host is None:
            self.stager.ship(b)
        if b.event is not None:
            b.event.synchronize()
            b.event = None
        return b

    def ready(self) -> torch.Tensor:
        b = self._arrive()
        return b.host[self.offset:self.offset + self.nbytes].view(self.dtype).view(self.shape)

    def storage(self) -> tuple[np.ndarray, str]:
        """The host copy in the dump's storage representation, viewed through numpy (a
        few numpy slices per tap instead of a chain of torch calls)."""
        np_dtype = _NUMPY.get(self.dtype)
        if np_dtype is None:
            return to_storage(self.ready(), private=True)
        b = self._arrive()
        if b.host_np is None:
            b.host_np = b.host.numpy()
        array = b.host_np[self.offset:self.offset + self.nbytes].view(np_dtype).reshape(self.shape)
        return array, str(self.dtype).removeprefix("torch.")


class _Ring:
    """One device's slots: the open batch, and for each slot the event its last copy
    to the host records (the slot may be written again once that has happened)."""

    def __init__(self) -> None:
        self.buffers: list[torch.Tensor | None] = [None] * SLOTS
        self.left: list = [None] * SLOTS
        self.next = 0
        self.open: _Batch | None = None  # filled between graph captures
        self.graph_open: _Batch | None = None  # filled inside a graph capture


class Stager:
    """Takes snapshots of taps; one per capture (it owns the side stream and the ring).

    `slot_bytes` sizes the ring's slots (SLOTS of them); `ring_on_cpu` runs the ring on
    CPU too (the tests' way to exercise the same bookkeeping without a GPU)."""

    def __init__(self, slot_bytes: int = SLOT_BYTES, ring_on_cpu: bool = False) -> None:
        self.slot_bytes, self.ring_on_cpu = slot_bytes, ring_on_cpu
        self.capturing = False  # the last tap was staged inside a CUDA graph capture
        self._side: dict[torch.device, torch.cuda.Stream] = {}
        self._rings: dict[torch.device, _Ring] = {}

    def stage(self, value: torch.Tensor):
        value = value.detach()
        nbytes = value.numel() * value.element_size()
        cuda = value.is_cuda
        self.capturing = cuda and torch.cuda.is_current_stream_capturing()
        if (cuda or self.ring_on_cpu) and 0 < nbytes <= self.slot_bytes:
            return self._into_slot(value, nbytes)
        return self._alone(value, cuda)

    # ------------------------------------------------------------------ taps in slots

    def _into_slot(self, value: torch.Tensor, nbytes: int) -> SlotStaged:
        ring = self._rings.get(value.device)
        if ring is None:
            ring = self._rings[value.device] = _Ring()
        capturing = self.capturing
        batch = ring.graph_open if capturing else ring.open
        offset = 0 if batch is None else -(-batch.used // _ALIGN) * _ALIGN
        if batch is None or offset + nbytes > self.slot_bytes:
            if batch is not None and not capturing:
                self.ship(batch)  # full: on its way while the next slot fills
            batch = self._graph_batch(value.device, ring) if capturing else self._next_batch(value.device, ring)
            offset = 0
        typed = batch.typed.get(value.dtype)
        if typed is None:
            typed = batch.typed[value.dtype] = batch.device.view(value.dtype)
        # offsets are aligned, so the tap starts on an element of its own dtype
        typed.as_strided(value.shape, _contiguous(value.shape), offset // value.element_size()).copy_(value)
        batch.used = offset + nbytes
        return SlotStaged(self, batch, offset, nbytes, value.dtype, value.shape)

    def _next_batch(self, device: torch.device, ring: _Ring) -> _Batch:
        i = ring.next
        ring.next = (i + 1) % SLOTS
        if ring.buffers[i] is None:
            ring.buffers[i] = torch.empty(self.slot_bytes, dtype=torch.uint8, device=device)
        if ring.left[i] is not None:  # the slot's previous copy must have left before it is overwritten
            torch.cuda.current_stream(device).wait_event(ring.left[i])
            ring.left[i] = None
        ring.open = _Batch(ring.buffers[i], i)
        return ring.open

    def _graph_batch(self, device: torch.device, ring: _Ring) -> _Batch:
        """A buffer from the graph's own pool: replays write it, the flush ships it."""
        ring.graph_open = _Batch(torch.empty(self.slot_bytes, dtype=torch.uint8, device=device), None)
        return ring.graph_open

    def ship(self, batch: _Batch) -> None:
        """Start the batch's copy to the host (on CPU: make it)."""
        ring = self._rings[batch.device.device]
        if ring.open is batch:
            ring.open = None
        if ring.graph_open is batch:
            ring.graph_open = None
        src = batch.device[:batch.used]
        if src.device.type != "cuda":
            batch.host = src.clone()
        else:
            host = torch.empty(self.slot_bytes, dtype=torch.uint8, pin_memory=True)
            side = self._side_stream(src.device)
            side.wait_stream(torch.cuda.current_stream(src.device))
            with torch.cuda.stream(side):
                host[:batch.used].copy_(src, non_blocking=True)
                batch.event = torch.cuda.Event()
                batch.event.record(side)
            batch.device.record_stream(side)
            if batch.slot is not None:
                ring.left[batch.slot] = batch.event
            batch.host = host
        batch.device = None
        batch.typed = {}

    # ------------------------------------------------------------------ taps on their own

    def _side_stream(self, device: torch.device) -> torch.cuda.Stream:
        side = self._side.get(device)
        if side is None:
            side = self._side[device] = torch.cuda.Stream(device)
        return side

    def _alone(self, value: torch.Tensor, cuda: bool) -> Staged:
        clone = value.clone()
        if not cuda or self.capturing:
            return Staged(clone)
        side = self._side_stream(value.device)
        host = torch.empty(clone.shape, dtype=clone.dtype, pin_memory=True)
        side.wait_stream(torch.cuda.current_stream(value.device))  # the clone is written on the main stream
        with torch.cuda.stream(side):
            host.copy_(clone, non_blocking=True)
            event = torch.cuda.Event()
            event.record(side)
        clone.record_stream(side)  # keep the clone's memory until the copy has run
        return Staged(host, event)


@functools.lru_cache(maxsize=4096)
def _contiguous(shape: torch.Size) -> tuple[int, ...]:
    strides, step = [], 1
    for size in reversed(shape):
        strides.append(step)
        step *= max(size, 1)
    return tuple(reversed(strides))
