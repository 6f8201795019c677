"""Per-tap summaries computed on the device where the tap lives (torch).

Why on the device: a stats scan exists to avoid moving tensors.  Each tap is reduced where
it was produced to a float64 vector (`parity.taps.stats.FIELDS`) and an int64 checksum of its
exact bits.  Taps are laid end to end, as they are, in a device batch of their dtype (one
copy, or one gather of the valid tokens, per tap) and a batch is reduced by a fixed number
of kernels, however many taps it holds: a model of thousands of small taps would
otherwise spend its time launching ~75 kernels per tap (an eager forward is bound by its
launches, so every kernel per tap shows in the run's time).  The per-tap partial sums stay
on the device, are turned into summaries for a few hundred taps at once and copied to the host
(asynchronously, into pinned memory on CUDA), so a run has no per-tap host sync and no
full tensor ever leaves the device.

The checksum: the tap's raw bits read as a signed integer of its element width (bf16 ->
int16, fp8 -> int8, fp32 -> int32, ...), sign-extended to int64, times an odd
position weight `w_i = (i * 0x9E3779B97F4A7C15) | 1` (mod 2**64), summed mod 2**64.
Equal bits give equal checksums; a change confined to one element always changes it
(the element's change d is non-zero and below 2**64 in size, and d * w_i with w_i odd is
never 0 mod 2**64); moving values between positions almost always changes it.
"""

from __future__ import annotations

import math
import zlib

import numpy as np
import torch

from parity.capture.staging import batch_elements, graph_capturing
from parity.comparison.align import fits, token_order
from parity.taps.records import CaptureError, Layout, TapInfo
from parity.taps.stats import FIELDS, TOKENS_ALL, TOKENS_VALID, StatsCapture, TapStats

BATCH_ELEMENTS = 1 << 23  # elements summarised together (~0.5 GB while reduced); a bigger tap goes alone


MOST_ELEMENTS = 1 << 25  # on a GPU with the memory free for it, batches up to this size


WORK_BYTES = 64  # working memory per batch element while a batch is reduced (float64 and int64 copies)


FETCH_EVERY = 256  # taps whose results are copied to the host at once


_GOLDEN = -7046029254386353131  # 0x9E3779B97F4A7C15 as a signed int64


_INT_VIEWS = {1: torch.int8, 2: torch.int16, 4: torch.int32, 8: torch.int64}


def _flat(t: torch.Tensor) -> torch.Tensor:
    t = t.detach()
    if t.is_complex():
        t = torch.view_as_real(t)
    return t.contiguous().reshape(-1)


def _raw_bits(flat: torch.Tensor) -> torch.Tensor:
    """The elements' raw bits as a signed integer of their width (uint8/bool: unsigned),
    a view: no copy."""
    if flat.dtype == torch.bool:
        return flat.view(torch.uint8)
    if flat.dtype == torch.uint8:
        return flat
    return flat.view(_INT_VIEWS[flat.element_size()])


BLOCK = 1024  # elements per block: every tap starts on a block, so a block belongs to one tap


class _Batch:
    """Taps of one dtype laid end to end on one device, each starting on a block of BLOCK
    elements, as they are (one device copy per tap, or one gather for the valid tokens of
    a tap under a token layout); the tap (segment) each block belongs to and where each
    tap starts are kept on the host.  Reducing widens the whole batch to float64 and its
    bits to int64 once and costs a fixed number of kernels, however many taps it holds (a
    run of thousands of small taps is launch-bound otherwise).

    Why blocks: summed element by element into their segment (index_add_), every element
    of a tap is an atomic add to the same address, serialised on a GPU (~4 ms per tap at
    pi0.5's full size).  Here each block is reduced densely (one row of a [blocks, BLOCK]
    view) and only the few per-block partials are added into their segments."""

    def __init__(self, device: torch.device, capacity: int, dtype: torch.dtype) -> None:
        self.device, self.dtype = device, dtype
        self.capacity = -(-capacity // BLOCK) * BLOCK
        self.raw = torch.empty(self.capacity, dtype=dtype, device=device)
        self.used = 0  # always a whole number of blocks
        self.taps: list[int] = []  # the sink's tap indices, one per segment
        self.segments: list[tuple[int, int, int]] = []  # per segment: (first element, count, position offset)
        self._derived = None  # (x, bits, valid, pos, block_seg) of the batch as it is, for both passes

    def fits(self, n: int) -> bool:
        return self.used + -(-n // BLOCK) * BLOCK <= self.capacity

    def add(self, value: torch.Tensor, tap: int, offset: int = 0, rows: torch.Tensor | None = None) -> None:
        """Append a tap (or, from position `offset`, a piece of one) as the next segment;
        `rows`: only these rows of the [rows, slots] flattened tap (its valid tokens, in
        canonical order), gathered straight into the batch."""
        a = self.used
        if rows is None:
            n = value.numel()
            self.raw[a:a + n].view(value.shape).copy_(value)  # one kernel, whatever the strides
        else:
            flat_rows = value.reshape(-1, *value.shape[2:])
            n = rows.numel() * math.prod(flat_rows.shape[1:])
            torch.index_select(flat_rows, 0, rows, out=self.raw[a:a + n].view(rows.numel(), *flat_rows.shape[1:]))
        self.segments.append((a, n, offset))
        self.used = a + -(-n // BLOCK) * BLOCK
        self.taps.append(tap)
        self._derived = None

    def clear(self) -> None:
        self.used, self.taps, self.segments, self._derived = 0, [], [], None

    def reduce(self) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Per segment: first-pass partials [n, 10], second-pass powers [n, 4] and checksums
        [n] of what the batch holds (`_assemble` makes the summaries, for many batches at once)."""
        partial, checks = self.first_pass()
        powers = self.second_pass(partial)
        self._derived = None  # the widened copies go (the buffer stays, for the next taps)
        return partial, powers, checks

    def _blocks(self):
        """x (float64, 0 past each tap's end), its raw bits (int64, 0 there too), valid mask,
        positions within the taps, all [blocks, BLOCK]; each block's segment; segment count."""
        if self._derived is not None:
            return self._derived
        end, n = self.used, len(self.taps)
        blocks = end // BLOCK
        device = self.raw.device
        lanes = torch.arange(BLOCK, dtype=torch.int64, device=device)
        if n == 1:  # no host data needed (a tap summarised inside a CUDA graph capture comes here)
            start, count, offset = self.segments[0]
            block_seg = torch.zeros(blocks, dtype=torch.int64, device=device)
            rel = torch.arange(blocks, dtype=torch.int64, device=device)[:, None] * BLOCK + lanes - start
            valid = rel < count
            pos = rel + offset
        else:  # per block, from the host in one copy: its segment, first element's place, count, offset
            per = np.array([-(-c // BLOCK) for _, c, _ in self.segments], dtype=np.int64)
            seg = np.repeat(np.arange(n, dtype=np.int64), per)
            start, count, offset = np.asarray(self.segments, dtype=np.int64).T
            first = np.arange(blocks, dtype=np.int64) * BLOCK - start[seg]
            host = torch.from_numpy(np.concatenate([seg, first, count[seg], offset[seg]]))
            if device.type == "cuda":
                host = host.pin_memory()
            block_seg, first_d, count_d, offset_d = host.to(device, non_blocking=True).view(4, blocks)
            rel = lanes + first_d[:, None]
            valid = rel < count_d[:, None]
            pos = rel + offset_d[:, None]
        raw = self.raw[:end]
        x = torch.where(valid, raw.view(blocks, BLOCK).to(torch.float64), 0.0)  # exact: floats widen exactly
        bits = torch.where(valid, _raw_bits(raw).view(blocks, BLOCK).to(torch.int64), 0)
        pos = torch.where(valid, pos, -1)
        self._derived = (x, bits, valid, pos, block_seg, n)
        return self._derived

    def first_pass(self) -> tuple[torch.Tensor, torch.Tensor]:
        """Per segment: float64 [n, 10] (count, finite, nan, +inf, -inf, zeros, sum, sum |x|,
        min, max over finite x) and the int64 checksum; partials of pieces of one tap add
        up (min/max: take the extremes) to the tap's."""
        x, bits, valid, pos, block_seg, n = self._blocks()
        f64 = dict(dtype=torch.float64, device=x.device)
        finite = torch.isfinite(x) & valid

        def rows(v: torch.Tensor) -> torch.Tensor:  # per-block sums
            return v.sum(1, dtype=torch.float64)

        xf = torch.where(finite, x, 0.0)
        sums = torch.stack([rows(valid), rows(finite), rows(torch.isnan(x)), rows(torch.isposinf(x)),
                            rows(torch.isneginf(x)), rows((x == 0) & valid), rows(xf), rows(xf.abs())], dim=1)
        lo = torch.where(finite, x, float("inf")).amin(1)
        hi = torch.where(finite, x, float("-inf")).amax(1)
        partial = torch.cat([
            torch.zeros(n, 8, **f64).index_add_(0, block_seg, sums),
            torch.full((n,), float("inf"), **f64).scatter_reduce_(0, block_seg, lo, "amin")[:, None],
            torch.full((n,), float("-inf"), **f64).scatter_reduce_(0, block_seg, hi, "amax")[:, None],
        ], dim=1)
        weights = torch.bitwise_or(pos * _GOLDEN, 1)  # wraps mod 2**64: odd weights
        block_checks = (bits * weights).sum(1)  # padding: bits 0
        checks = torch.zeros(n, dtype=torch.int64, device=x.device).index_add_(0, block_seg, block_checks)
        return partial, checks

    def second_pass(self, partial: torch.Tensor) -> torch.Tensor:
        """Per segment: float64 [n, 4] sums of (x/s)^2 and ((x - mean)/s)^2, ^3, ^4 over finite
        x, s = the tap's max |x| (so fourth powers of huge values do not overflow); `partial`
        holds each segment's tap's whole first pass."""
        x, _, valid, _, block_seg, n = self._blocks()
        mean, scale = _centre(partial)
        finite = torch.isfinite(x) & valid
        xs = torch.where(finite, x, 0.0) / scale[block_seg][:, None]
        d = torch.where(finite, xs - (mean / scale)[block_seg][:, None], 0.0)
        d2 = d * d
        per_block = torch.stack([(xs * xs).sum(1), d2.sum(1), (d2 * d).sum(1), (d2 * d2).sum(1)], dim=1)
        return torch.zeros(n, 4, dtype=torch.float64, device=x.device).index_add_(0, block_seg, per_block)


def _centre(partial: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(mean, 0 where no finite element) and the scale (max |x|, 1 where that is 0 or undefined)."""
    n_finite, lo, hi = partial[:, 1], partial[:, 8], partial[:, 9]
    none = n_finite == 0
    max_abs = torch.maximum(lo.abs(), hi.abs())
    return (torch.where(none, 0.0, partial[:, 6] / torch.clamp(n_finite, min=1)),
            torch.where(none | (max_abs == 0), 1.0, max_abs))


def _assemble(partial: torch.Tensor, powers: torch.Tensor) -> torch.Tensor:
    """The FIELDS vector of each segment from its first-pass partial and second-pass powers."""
    n_finite, total, abs_total, lo, hi = partial[:, 1], partial[:, 6], partial[:, 7], partial[:, 8], partial[:, 9]
    _, scale = _centre(partial)
    none = n_finite == 0
    nan = torch.full_like(n_finite, float("nan"))
    m2, m3, m4 = (powers[:, k] / n_finite for k in (1, 2, 3))  # scaled central moments (NaN if none finite)
    spread = m2 > 0
    safe_m2 = torch.where(spread, m2, 1.0)
    max_abs = torch.maximum(lo.abs(), hi.abs())
    return torch.stack([
        partial[:, 0], n_finite, partial[:, 2], partial[:, 3], partial[:, 4], partial[:, 5],
        total, total / n_finite, scale * torch.sqrt(powers[:, 0]),
        torch.where(none, 0.0, abs_total / torch.clamp(n_finite, min=1)),
        m2 * scale * scale, torch.sqrt(m2) * scale,
        torch.where(spread, m3 / safe_m2 ** 1.5, nan), torch.where(spread, m4 / safe_m2 ** 2 - 3.0, nan),
        torch.where(none, nan, lo), torch.where(none, nan, hi), torch.where(none, nan, max_abs),
    ], dim=1)


def summarise(t: torch.Tensor, batch_elements: int = BATCH_ELEMENTS) -> tuple[torch.Tensor, torch.Tensor]:
    """(float64 [len(FIELDS)], int64 checksum) of one tensor, on its device, no host sync."""
    partial, powers, checks = _parts(t, batch_elements)
    return _assemble(partial, powers)[0], checks[0]


def _parts(t: torch.Tensor, batch_elements: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """One tensor's first-pass partial [1, 10], powers [1, 4] and checksum [1].

    A tensor above `batch_elements` is taken in pieces of that size (device memory stays
    bounded): first passes of all pieces, added up; then second passes about the tap's mean."""
    flat = _flat(t)
    total = flat.numel()
    size = max(BLOCK, min(-(-total // BLOCK) * BLOCK, -(-batch_elements // BLOCK) * BLOCK))
    batch = _Batch(flat.device, size, flat.dtype)
    pieces = range(0, total, size)
    partial = torch.zeros(1, 10, dtype=torch.float64, device=flat.device)
    partial[:, 8], partial[:, 9] = float("inf"), float("-inf")
    checks = torch.zeros(1, dtype=torch.int64, device=flat.device)
    for start in pieces:
        batch.clear()
        batch.add(flat[start:start + size], 0, offset=start)
        p, c = batch.first_pass()
        partial = torch.cat([partial[:, :8] + p[:, :8], torch.minimum(partial[:, 8:9], p[:, 8:9]),
                             torch.maximum(partial[:, 9:], p[:, 9:])], dim=1)
        checks = checks + c
    powers = torch.zeros(1, 4, dtype=torch.float64, device=flat.device)
    for start in pieces:
        if len(pieces) > 1:  # a single piece is still in the batch
            batch.clear()
            batch.add(flat[start:start + size], 0, offset=start)
        powers = powers + batch.second_pass(partial)
    batch.clear()
    return partial, powers, checks


def checksum(t: torch.Tensor) -> torch.Tensor:
    """0-d int64 checksum of `t`'s bits in C order, on its device (see the module doc)."""
    return summarise(t)[1]


class StatsSink:
    """A capture sink that keeps per-tap summaries instead of tensors.

    The Recorder hands it each tap as the live device tensor (`add_device_tap`); it
    gathers the valid token positions of a tap whose layout fits (on the device, index
    tensors cached per layout and device) and copies the values into a batch on the device;
    a batch is summarised when full (`batch_elements`; by default as large as the device's
    free memory affords, see `staging.batch_elements`), and the small results are copied to
    the host once `fetch_every` taps have been summarised (asynchronously into pinned memory
    on CUDA) and at `finish`.  A tap recorded inside a CUDA graph capture is summarised on its own by
    kernels recorded into the graph (its values exist only when the graph replays)."""

    def __init__(self, meta: dict | None = None, fetch_every: int = FETCH_EVERY,
                 batch_elements: int | None = None, progress=None) -> None:
        if fetch_every < 1 or (batch_elements is not None and batch_elements < 1):
            raise ValueError(f"fetch_every and batch_elements must be >= 1, got {fetch_every}, {batch_elements}")
        self.meta = dict(meta or {})
        self.fetch_every, self.progress = fetch_every, progress
        self.batch_elements = batch_elements  # None: per device, from its free memory (batch_elements())
        self._elements: dict[torch.device, int] = {}
        self.layouts: dict[str, Layout] = {}
        self.error: CaptureError | None = None
        self.fetches = 0  # host copies started (a run of N taps makes about N / fetch_every)
        self._gather: dict[tuple[str, torch.device], torch.Tensor] = {}
        self._keep: list = []  # index tensors made inside a CUDA graph capture, kept while it may replay
        self._positions: dict[str, tuple[torch.Tensor, str]] = {}  # per layout: valid slots, their CRC
        self._ids: list[tuple] = []  # per tap, host-side identity
        self._batches: dict[tuple[torch.device, torch.dtype], _Batch] = {}  # being filled, one per device and dtype
        self._unfetched = 0  # reduced taps whose results have not started to the host
        # (taps, partials, powers, checksums) on the device, not fetched
        self._results: list[tuple[list[int], torch.Tensor, torch.Tensor, torch.Tensor]] = []
        self._fetched: list[tuple[list[int], torch.Tensor, torch.Tensor, object]] = []  # (taps, values, checks, event)

    # -- sink protocol

    def add_layout(self, name: str, layout: Layout) -> None:
        """Also works out, before the run, which slots hold valid tokens in canonical order
        (on the host, pinned where CUDA is available: copied to a device later without a sync,
        even inside a CUDA graph capture, where no host memory may be allocated)."""
        self.layouts[name] = layout
        order, canonical = token_order(layout.slots.shape, layout)  # as the tensor diff gathers
        canonical = np.ascontiguousarray(canonical, dtype=np.int64)
        host = torch.as_tensor(order, dtype=torch.int64)
        if torch.cuda.is_available():
            host = host.pin_memory()
        self._positions[name] = (host, f"{zlib.crc32(canonical.tobytes()):08x}")

    def add_tap(self, tap) -> None:
        raise TypeError("StatsSink takes taps as device tensors (add_device_tap), never host copies")

    def set_error(self, error: CaptureError) -> None:
        self.error = error

    def set_observation(self, observation: dict) -> None:
        """How observing changed the run (capture.observation): kept in meta, as a dump does."""
        self.meta["observation"] = observation

    def add_device_tap(self, info: TapInfo, order: int, value: torch.Tensor, layout: str | None) -> None:
        shape = tuple(int(s) for s in value.shape)
        rows, tokens, positions = self._valid_rows(value, layout)
        summarised = shape if rows is None else (rows.numel(), *shape[2:])
        dtype = str(value.dtype).removeprefix("torch.")
        index = len(self._ids)
        self._ids.append((info, order, dtype, layout, shape, summarised, tokens, positions))
        value = value.detach()
        if value.is_complex():
            value = torch.view_as_real(value)
        n = value.numel() if rows is None else rows.numel() * math.prod(value.shape[2:])
        capturing = graph_capturing()
        most = self._batch_size(value.device)
        if capturing or n == 0 or n > most:  # on its own
            picked = value if rows is None else value.reshape(-1, *value.shape[2:]).index_select(0, rows)
            self._results.append(([index], *_parts(picked, most)))
            self._unfetched += 1
        else:
            key = (value.device, value.dtype)
            batch = self._batches.get(key)
            if batch is not None and not batch.fits(n):
                self._close(batch)
            if batch is None:
                batch = self._batches[key] = _Batch(value.device, most, value.dtype)
            batch.add(value, index, rows=rows)
        if not capturing and self._unfetched >= self.fetch_every:
            self._fetch()  # what is reduced; batches being filled go on filling
        if self.progress is not None:
            self.progress(len(self._ids))

    # -- internals

    def _batch_size(self, device: torch.device) -> int:
        if self.batch_elements is not None:
            return self.batch_elements
        size = self._elements.get(device)
        if size is None:
            size = batch_elements(device, BATCH_ELEMENTS, MOST_ELEMENTS, WORK_BYTES)
            if not graph_capturing():  # inside a capture it is the default: the memory is asked later
                self._elements[device] = size
        return size

    def _valid_rows(self, value: torch.Tensor, layout: str | None) -> tuple[torch.Tensor | None, str, str]:
        """The rows of the [rows * slots, *features] flattened tap holding valid tokens, in
        canonical order, under a fitting layout (on the tap's device); None: the whole tensor."""
        spec = self.layouts.get(layout) if layout else None
        if spec is None or not fits(tuple(value.shape), spec):
            return None, TOKENS_ALL, ""
        host, positions = self._positions[layout]
        key = (layout, value.device)
        index = self._gather.get(key)
        if index is None:
            index = host.to(value.device, non_blocking=True)
            if graph_capturing():  # valid only once the graph replays: used by this tap alone
                self._keep.append(index)
            else:
                self._gather[key] = index
        return index, TOKENS_VALID, positions

    def _close(self, batch: _Batch) -> None:
        """Summarise a batch being filled; its buffer is reused (in stream order)."""
        if not batch.taps:
            return
        self._results.append((list(batch.taps), *batch.reduce()))
        self._unfetched += len(batch.taps)
        batch.clear()

    def _close_batches(self) -> None:
        for batch in self._batches.values():
            self._close(batch)

    def _fetch(self) -> None:
        """Start copying the summarised results to the host (no wait on CUDA)."""
        by_device: dict[torch.device, list] = {}
        for entry in self._results:
            by_device.setdefault(entry[1].device, []).append(entry)
        self._results = []
        self._unfetched = 0
        for device, entries in by_device.items():  # summaries assembled for all of them at once
            taps = [i for t, _, _, _ in entries for i in t]
            values = _assemble(torch.cat([p for _, p, _, _ in entries]), torch.cat([w for _, _, w, _ in entries]))
            checks = torch.cat([c for _, _, _, c in entries])
            event = None
            if device.type == "cuda":
                host_v = torch.empty(values.shape, dtype=values.dtype, pin_memory=True)
                host_c = torch.empty(checks.shape, dtype=checks.dtype, pin_memory=True)
                host_v.copy_(values, non_blocking=True)
                host_c.copy_(checks, non_blocking=True)
                event = torch.cuda.Event()
                event.record()
                values, checks = host_v, host_c
            elif device.type != "cpu":
                values, checks = values.cpu(), checks.cpu()
            self._fetched.append((taps, values, checks, event))
            self.fetches += 1

    def finish(self, complete: bool = True) -> StatsCapture:
        """Summarise and fetch what is left, wait for the copies, return the run's summaries."""
        self._close_batches()
        self._fetch()
        all_v = np.full((len(self._ids), len(FIELDS)), np.nan)
        all_c = np.zeros(len(self._ids), dtype=np.int64)
        for taps, values, checks, event in self._fetched:
            if event is not None:
                event.synchronize()
            all_v[taps] = values.numpy()
            all_c[taps] = checks.numpy()
        taps = [TapStats(info, order, dtype, layout, shape, summarised, tokens, positions,
                         np.array(all_v[i], dtype=np.float64), int(all_c[i]))
                for i, (info, order, dtype, layout, shape, summarised, tokens, positions) in enumerate(self._ids)]
        return StatsCapture(taps=taps, meta=self.meta, error=self.error, complete=complete and self.error is None)
