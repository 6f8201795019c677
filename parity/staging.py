"""Getting a tap off the device without stalling the forward.

On CUDA each tap is cloned on the compute stream (an exact snapshot: later in-place
kernels cannot touch it), then copied to a pinned host buffer on a side stream, so the
device-to-host copy overlaps the rest of the forward and no tap costs a host sync.  The
clone is handed to the side stream (`record_stream`), so its memory returns to the
allocator only after the copy.  Pinned buffers come from torch's caching host
allocator: after the first capture they are reused, not allocated again.

Elsewhere (CPU), and while a CUDA graph is being captured (no host work may be
recorded into it), the clone itself is the staged copy, as before.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch


def graph_capturing() -> bool:
    """Whether a CUDA graph is being captured on the current stream (never on CPU builds)."""
    return torch.cuda.is_available() and torch.cuda.is_current_stream_capturing()


@dataclass
class Staged:
    """A tap copy on its way to the host; `ready()` is the host tensor, once it is there."""

    tensor: torch.Tensor  # pinned host buffer (CUDA path) or the device-side clone
    event: "torch.cuda.Event | None" = None  # completes when the host buffer holds the tap

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


class Stager:
    """Takes snapshots of taps; one per capture (it owns the side stream)."""

    def __init__(self) -> None:
        self._side: dict[torch.device, torch.cuda.Stream] = {}

    def stage(self, value: torch.Tensor) -> Staged:
        value = value.detach()
        clone = value.clone()
        if value.device.type != "cuda" or graph_capturing():
            return Staged(clone)
        main = torch.cuda.current_stream(value.device)
        side = self._side.get(value.device)
        if side is None:
            side = self._side[value.device] = torch.cuda.Stream(value.device)
        host = torch.empty(clone.shape, dtype=clone.dtype, pin_memory=True)
        side.wait_stream(main)  # the clone is written on the main stream
        with torch.cuda.stream(side):
            host.copy_(clone, non_blocking=True)
            event = torch.cuda.Event()
            event.record(side)
        clone.record_stream(side)  # keep the clone's memory until the copy has run
        return Staged(host, event)
