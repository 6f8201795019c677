"""The staging ring's bookkeeping, run on CPU (the same code ships slots to pinned host
memory on CUDA): every staged tap reads back bit-exact, whatever its dtype, shape or
layout, after later in-place changes to the original, across slot changes and ring wraps."""
from __future__ import annotations

import numpy as np
import pytest
import torch
from test_capture import EXPECTED_KEYS, make_backend

from parity.capture import recorder as capture_mod
from parity.capture.staging import SLOTS, Stager
from parity.taps.records import Capture


def tensors():
    g = torch.Generator().manual_seed(0)
    yield torch.randn(3, 5, generator=g).to(torch.bfloat16)
    yield torch.randn(7, generator=g).to(torch.float8_e4m3fn)
    yield torch.randn(4, 6, generator=g).t()  # not contiguous
    yield torch.tensor(3.5)  # 0-dim
    yield torch.empty(0, 4)  # no bytes: cloned on its own
    yield torch.arange(11, dtype=torch.int64)
    yield torch.randn(2, 3, 4, generator=g, dtype=torch.float64)[:, 1]  # a strided view
    yield torch.randn(40, generator=g)  # 160 bytes
    yield torch.randn(100, generator=g)  # 400 bytes: bigger than a slot, on its own


@pytest.mark.parametrize("rounds", [1, 2 * SLOTS + 1])  # many rounds wrap the ring several times
def test_every_staged_tap_reads_back_bit_exact_after_later_changes(rounds):
    stager = Stager(slot_bytes=256, ring_on_cpu=True)
    staged, originals = [], []
    for _ in range(rounds):
        for t in tensors():
            originals.append(t.clone())
            staged.append(stager.stage(t))
            if t.numel():
                t[(0,) * t.dim()] = 0  # the model goes on changing its tensors in place
    for s, want in zip(staged, originals):
        got = s.ready()
        assert got.dtype == want.dtype and got.shape == want.shape
        assert torch.equal(got.contiguous().view(-1).view(torch.uint8), want.contiguous().view(-1).view(torch.uint8))


def test_a_tap_is_not_done_until_its_slot_has_left_and_then_is():
    stager = Stager(slot_bytes=1024, ring_on_cpu=True)
    a = stager.stage(torch.ones(4))
    assert not a.done()  # its slot is still open
    b = stager.stage(torch.ones(200))  # does not fit: a's slot leaves, b opens the next
    assert a.done() and not b.done()
    assert torch.equal(b.ready(), torch.ones(200)) and b.done()


def test_capture_through_the_ring_equals_the_default_path(monkeypatch):
    want = capture_mod.capture(make_backend())
    monkeypatch.setattr(capture_mod, "Stager", lambda: Stager(slot_bytes=64, ring_on_cpu=True))
    got = capture_mod.capture(make_backend(), Capture())
    assert [t.key for t in got.taps] == EXPECTED_KEYS
    for a, b in zip(want.taps, got.taps):
        assert a.key == b.key and a.dtype == b.dtype and np.array_equal(a.array, b.array)


def test_staged_copies_are_freed_as_soon_as_their_taps_are_dropped():
    """The stager and its ring keep no shipped batch: pinned host buffers go back to the
    caching allocator as soon as the capture's arrays are dropped, while the stager still
    exists and without a GC pass (a stager remembering its shipped batches, planted,
    makes this fail)."""
    import gc
    import weakref

    gc.disable()
    try:
        stager = Stager(slot_bytes=1024, ring_on_cpu=True)
        staged = [stager.stage(torch.ones(50)) for _ in range(10)]
        for s in staged:
            s.ready()
        hosts = [weakref.ref(s.batch.host) for s in staged]
        assert len({id(h()) for h in hosts}) == 3  # three batches were shipped
        del staged, s
        assert all(h() is None for h in hosts)
    finally:
        gc.enable()
