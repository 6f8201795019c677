"""Per-tap summaries computed on the device where the tap lives (torch).

Why on the device: a stats scan exists to avoid moving tensors.  Each tap is reduced where
it was produced to a float64 vector (`parity.stats.FIELDS`) and an int64 checksum of its
exact bits; the small results stay on the device and are stacked and copied to the host
in batches (asynchronously, into pinned memory on CUDA), so a run has no per-tap host
sync and no full tensor ever leaves the device.

The checksum: the tap's raw bits read as a signed integer of its element width (bf16 ->
int16, fp8 -> int8, fp32 -> int32, ...), sign-extended to int64, times an odd
position weight `w_i = (i * 0x9E3779B97F4A7C15) | 1` (mod 2**64), summed mod 2**64.
Equal bits give equal checksums; a change confined to one element always changes it
(the element's change d is non-zero and below 2**64 in size, and d * w_i with w_i odd is
never 0 mod 2**64); moving values between positions almost always changes it.
"""
from __future__ import annotations

import zlib

import numpy as np
import torch

from .records import CaptureError, Layout, TapInfo
from .stats import FIELD_INDEX, FIELDS, TOKENS_ALL, TOKENS_VALID, StatsCapture, TapStats

CHUNK_ELEMENTS = 1 << 24  # elements reduced at a time: bounds the float64 temporaries (~128 MB each)
FETCH_EVERY = 256  # taps whose results are stacked and copied to the host at once
_GOLDEN = -7046029254386353131  # 0x9E3779B97F4A7C15 as a signed int64
_INT_VIEWS = {1: torch.int8, 2: torch.int16, 4: torch.int32, 8: torch.int64}


def _raw_bits(flat: torch.Tensor) -> torch.Tensor:
    """The elements' raw bits as int64 (signed view of their width, sign-extended)."""
    if flat.dtype == torch.bool:
        return flat.view(torch.uint8).to(torch.int64)
    if flat.dtype == torch.uint8:
        return flat.to(torch.int64)
    return flat.view(_INT_VIEWS[flat.element_size()]).to(torch.int64)


def checksum(t: torch.Tensor, chunk: int = CHUNK_ELEMENTS) -> torch.Tensor:
    """0-d int64 checksum of `t`'s bits in C order, on its device (see the module doc)."""
    flat = _flat(t)
    total = torch.zeros((), dtype=torch.int64, device=flat.device)
    for start in range(0, flat.numel(), chunk):
        part = flat[start:start + chunk]
        weights = torch.arange(start, start + part.numel(), dtype=torch.int64, device=flat.device)
        weights = torch.bitwise_or(weights * _GOLDEN, 1)  # wraps mod 2**64: odd weights
        total = total + (_raw_bits(part) * weights).sum()
    return total


def _flat(t: torch.Tensor) -> torch.Tensor:
    t = t.detach()
    if t.is_complex():
        t = torch.view_as_real(t)
    return t.contiguous().reshape(-1)


def summarise(t: torch.Tensor, chunk: int = CHUNK_ELEMENTS) -> tuple[torch.Tensor, torch.Tensor]:
    """(float64 [len(FIELDS)], int64 checksum) of `t`, both on its device, no host sync.

    Two passes over float64 chunks: counts, sum, extrema; then moments about the mean,
    scaled by max |x| so that fourth powers of huge values do not overflow."""
    flat = _flat(t)
    device, n = flat.device, flat.numel()
    f64 = dict(dtype=torch.float64, device=device)
    if n == 0:
        values = np.full(len(FIELDS), np.nan)
        values[[FIELD_INDEX[k] for k in ("count", "finite", "nan", "posinf", "neginf", "zeros", "sum", "l2",
                                         "mean_abs")]] = 0.0
        return torch.from_numpy(values).to(device), torch.zeros((), dtype=torch.int64, device=device)
    zero = torch.zeros((), **f64)
    counts = torch.zeros(5, **f64)  # finite, nan, posinf, neginf, zeros
    total, abs_total = zero, zero
    lo = torch.full((), float("inf"), **f64)
    hi = torch.full((), float("-inf"), **f64)
    for start in range(0, n, chunk):
        x = flat[start:start + chunk].to(torch.float64)
        finite = torch.isfinite(x)
        counts = counts + torch.stack([finite.sum(), torch.isnan(x).sum(), (x == float("inf")).sum(),
                                       (x == float("-inf")).sum(), (x == 0).sum()]).to(torch.float64)
        xf = torch.where(finite, x, 0.0)
        total = total + xf.sum()
        abs_total = abs_total + xf.abs().sum()
        lo = torch.minimum(lo, torch.where(finite, x, float("inf")).min())
        hi = torch.maximum(hi, torch.where(finite, x, float("-inf")).max())
    n_finite = counts[0]
    max_abs = torch.maximum(lo.abs(), hi.abs())
    scale = torch.where(n_finite > 0, torch.where(max_abs > 0, max_abs, 1.0), 1.0)
    mean = total / n_finite  # NaN without finite elements
    centre = torch.where(n_finite > 0, mean, 0.0) / scale
    powers = torch.zeros(4, **f64)  # sums of (x/s)^2 and ((x - mean)/s)^2, ^3, ^4 over finite x
    for start in range(0, n, chunk):
        x = flat[start:start + chunk].to(torch.float64)
        finite = torch.isfinite(x)
        xs = torch.where(finite, x, 0.0) / scale
        d = torch.where(finite, xs - centre, 0.0)
        d2 = d * d
        powers = powers + torch.stack([(xs * xs).sum(), d2.sum(), (d2 * d).sum(), (d2 * d2).sum()])
    m2, m3, m4 = powers[1] / n_finite, powers[2] / n_finite, powers[3] / n_finite  # scaled central moments
    spread = m2 > 0
    nan = torch.full((), float("nan"), **f64)
    none_finite = n_finite == 0
    values = torch.stack([
        torch.full((), float(n), **f64), n_finite, counts[1], counts[2], counts[3], counts[4],
        total, mean, scale * torch.sqrt(powers[0]), torch.where(none_finite, zero, abs_total / torch.clamp(n_finite, min=1)),
        m2 * scale * scale, torch.sqrt(m2) * scale,
        torch.where(spread, m3 / torch.where(spread, m2, 1.0) ** 1.5, nan),
        torch.where(spread, m4 / torch.where(spread, m2, 1.0) ** 2 - 3.0, nan),
        torch.where(none_finite, nan, lo), torch.where(none_finite, nan, hi), torch.where(none_finite, nan, max_abs),
    ])
    return values, checksum(flat, chunk)


class StatsSink:
    """A capture sink that keeps per-tap summaries instead of tensors.

    The Recorder hands it each tap as the live device tensor (`add_device_tap`); it
    gathers the valid token positions of a tap whose layout fits (on the device, index
    tensors cached per layout and device), summarises, and keeps the small results on the
    device, copying them to the host every `fetch_every` taps (and at `finish`)."""

    def __init__(self, meta: dict | None = None, fetch_every: int = FETCH_EVERY, chunk: int = CHUNK_ELEMENTS,
                 progress=None) -> None:
        if fetch_every < 1:
            raise ValueError(f"fetch_every must be >= 1, got {fetch_every}")
        self.meta = dict(meta or {})
        self.fetch_every, self.chunk, self.progress = fetch_every, chunk, progress
        self.layouts: dict[str, Layout] = {}
        self.error: CaptureError | None = None
        self._gather: dict[tuple[str, torch.device], torch.Tensor] = {}
        self._positions: dict[str, tuple[np.ndarray, str]] = {}
        self._ids: list[tuple] = []  # per tap, host-side identity
        self._batch: list[tuple[torch.Tensor, torch.Tensor]] = []  # device results not yet fetched
        self._fetched: list[tuple[torch.Tensor, torch.Tensor, object]] = []  # (values, checksums, event)

    # -- sink protocol

    def add_layout(self, name: str, layout: Layout) -> None:
        self.layouts[name] = layout

    def add_tap(self, tap) -> None:
        raise TypeError("StatsSink takes taps as device tensors (add_device_tap), never host copies")

    def set_error(self, error: CaptureError) -> None:
        self.error = error

    def add_device_tap(self, info: TapInfo, order: int, value: torch.Tensor, layout: str | None) -> None:
        shape = tuple(int(s) for s in value.shape)
        picked, tokens, positions = self._valid_tokens(value, layout)
        values, check = summarise(picked, self.chunk)
        dtype = str(value.dtype).removeprefix("torch.")
        self._ids.append((info, order, dtype, layout, shape, tuple(int(s) for s in picked.shape), tokens, positions))
        if self._batch and self._batch[-1][0].device != values.device:
            self._fetch()
        self._batch.append((values, check))
        if len(self._batch) >= self.fetch_every and not _graph_capturing():
            self._fetch()
        if self.progress is not None:
            self.progress(len(self._ids))

    # -- internals

    def _valid_tokens(self, value: torch.Tensor, layout: str | None) -> tuple[torch.Tensor, str, str]:
        """[valid tokens, *features] in canonical order under a fitting layout, else the tensor."""
        spec = self.layouts.get(layout) if layout else None
        if spec is None or value.dim() < 2 or tuple(value.shape[:2]) != spec.slots.shape:
            return value, TOKENS_ALL, ""
        if layout not in self._positions:
            idx = spec.slots.reshape(-1)
            keep = np.flatnonzero(idx >= 0)
            order = keep[np.argsort(idx[keep], kind="stable")]
            canonical = np.ascontiguousarray(idx[order], dtype=np.int64)
            self._positions[layout] = (order, f"{zlib.crc32(canonical.tobytes()):08x}")
        order, positions = self._positions[layout]
        key = (layout, value.device)
        if key not in self._gather:
            self._gather[key] = torch.as_tensor(order, dtype=torch.int64).to(value.device)
        rows = value.reshape(-1, *value.shape[2:])
        return rows.index_select(0, self._gather[key]), TOKENS_VALID, positions

    def _fetch(self) -> None:
        """Stack the pending device results and start their copy to the host (no wait on CUDA)."""
        if not self._batch:
            return
        values = torch.stack([v for v, _ in self._batch])
        checks = torch.stack([c for _, c in self._batch])
        self._batch = []
        event = None
        if values.device.type == "cuda":
            host_v = torch.empty(values.shape, dtype=values.dtype, pin_memory=True)
            host_c = torch.empty(checks.shape, dtype=checks.dtype, pin_memory=True)
            host_v.copy_(values, non_blocking=True)
            host_c.copy_(checks, non_blocking=True)
            event = torch.cuda.Event()
            event.record()
            values, checks = host_v, host_c
        elif values.device.type != "cpu":
            values, checks = values.cpu(), checks.cpu()
        self._fetched.append((values, checks, event))

    def finish(self, complete: bool = True) -> StatsCapture:
        """Fetch what is left, wait for the copies, and return the run's summaries."""
        self._fetch()
        rows_v, rows_c = [], []
        for values, checks, event in self._fetched:
            if event is not None:
                event.synchronize()
            rows_v.append(values.numpy())
            rows_c.append(checks.numpy())
        all_v = np.concatenate(rows_v) if rows_v else np.zeros((0, len(FIELDS)))
        all_c = np.concatenate(rows_c) if rows_c else np.zeros(0, dtype=np.int64)
        taps = [TapStats(info, order, dtype, layout, shape, summarised, tokens, positions,
                         np.array(all_v[i], dtype=np.float64), int(all_c[i]))
                for i, (info, order, dtype, layout, shape, summarised, tokens, positions) in enumerate(self._ids)]
        return StatsCapture(taps=taps, meta=self.meta, error=self.error, complete=complete and self.error is None)


def _graph_capturing() -> bool:
    from .staging import graph_capturing

    return graph_capturing()
