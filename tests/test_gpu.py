"""GPU-only checks (skipped without CUDA): real FP8 kernels, and taps recorded inside
the `fast` candidate's CUDA graph equal the eager run's."""
from __future__ import annotations

import pytest
import torch

from parity.api import capture_live, compare_captures
from parity.comparison.rules import Thresholds
from parity.taps.backends import BackendOptions

pytestmark = [pytest.mark.gpu,
              pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")]

CUDA = BackendOptions(device="cuda")


def test_scaled_mm_matches_emulation():
    from parity.probes.pi05.fp8 import Fp8Weight, fp8_linear, has_fp8_units

    if not has_fp8_units(torch.device("cuda")):
        pytest.skip("GPU has no FP8 units (sm89+)")
    gen = torch.Generator(device="cuda").manual_seed(0)
    w = Fp8Weight.quantize(torch.randn(256, 128, device="cuda", generator=gen))
    x = torch.randn(64, 128, device="cuda", generator=gen, dtype=torch.bfloat16)
    real = fp8_linear(x, w, torch.float32)
    emulated = fp8_linear(x.cpu(), Fp8Weight(w.data.cpu(), w.scale.cpu()), torch.float32)
    # Hopper's FP8 tensor cores accumulate with fewer mantissa bits than fp32: close, not equal
    rel = (real.cpu() - emulated).norm() / emulated.norm()
    assert rel < 2e-3, rel


def test_fast_graph_taps_are_all_there_and_pass_the_fp8_gate():
    ref = capture_live("pytorch", CUDA)
    eager = capture_live("flash_fp8", CUDA)
    graphed = capture_live("fast", CUDA)
    assert graphed.meta["execution"].startswith("cuda graph")
    assert [t.key for t in graphed.taps] == [t.key for t in eager.taps]
    # compiled kernels quantise activations to e4m3 with different roundings than eager
    # ones, so fast and flash_fp8 differ like two FP8 implementations: both pass the gate
    for cand in (eager, graphed):
        report = compare_captures(ref, cand, Thresholds.parse(0.995, ["*.mlp=0.99"]))
        assert report, report.first_divergence


def test_fast_after_instrumentation_still_replays_plain_graph():
    from parity.capture.recorder import capture
    from parity.taps.backends import resolve

    backend = resolve("fast", CUDA)
    before = backend.run().clone()
    capture(backend)
    assert torch.equal(backend.run(), before)


def test_fault_localised_on_gpu():
    report = compare_captures(capture_live("pytorch", CUDA), capture_live("fast", BackendOptions(
        device="cuda", faults=("nomask",))), Thresholds.parse(0.995, ["*.mlp=0.99"]))
    assert report.first_divergence.key == "prefix.0.attn"


def test_ring_staging_on_cuda_is_bit_exact_across_wraps_and_in_place_changes():
    """Small slots force many slot changes and ring wraps: the compute stream must wait
    for a slot's previous copy before writing it again, or these reads would be wrong."""
    from parity.capture.staging import SLOTS, Stager

    stager = Stager(slot_bytes=1 << 16)
    g = torch.Generator(device="cuda").manual_seed(0)
    staged, want = [], []
    for i in range(40 * SLOTS):
        t = torch.randn(97 + 13 * (i % 50), device="cuda", generator=g).to(
            (torch.bfloat16, torch.float32, torch.float8_e4m3fn)[i % 3])
        if i % 7 == 0:
            t = torch.randn(64, 40, device="cuda", generator=g).t()  # not contiguous
        staged.append(stager.stage(t))
        want.append(t.clone())
        if t.is_contiguous():  # the model changes it in place after the tap
            t.view(-1)[:8] = 0
        else:
            t[0, :4] = 0
    for s, w in zip(staged, want):
        got = s.ready()
        assert got.device.type == "cpu" and got.is_pinned()
        assert torch.equal(got.view(torch.uint8), w.cpu().contiguous().view(torch.uint8))


def test_eager_capture_through_the_ring_equals_the_per_tap_path_bit_for_bit(monkeypatch):
    from parity.capture import recorder as capture_mod
    from parity.capture.staging import Stager
    from parity.taps.backends import resolve
    from parity.taps.records import Capture

    ring = capture_mod.capture(resolve("pytorch", CUDA), Capture())
    monkeypatch.setattr(capture_mod, "Stager", lambda: Stager(slot_bytes=0))  # every tap on its own
    alone = capture_mod.capture(resolve("pytorch", CUDA), Capture())
    assert [t.key for t in ring.taps] == [t.key for t in alone.taps] and len(ring.taps) > 100
    for a, b in zip(ring.taps, alone.taps):
        assert a.dtype == b.dtype and a.array.shape == b.array.shape and (a.array == b.array).all(), a.key


# --------------------------------------------------------------------------- live compare on the device

def test_live_compare_on_gpu_equals_the_host_diff():
    from test_live import assert_same_report

    from parity.api import diff_live

    for cand, faults in (("flash_fp8", ()), ("flash", ("nomask",))):
        host = diff_live("pytorch", cand, CUDA, faults, on_device=False, chunk=16)
        live = diff_live("pytorch", cand, CUDA, faults, chunk=16)
        assert_same_report(host, live)


def test_live_compare_spills_the_reference_to_pinned_memory_past_its_budget():
    from test_live import assert_same_report

    from parity.api import diff_live

    host = diff_live("pytorch", "flash", CUDA, ("silu",), on_device=False, isolate=False)
    spilled = diff_live("pytorch", "flash", CUDA, ("silu",), ref_device_mb=0, isolate=False)
    assert_same_report(host, spilled)


def test_live_stop_at_first_on_gpu_stops_within_a_few_taps_and_localises():
    from parity.api import diff_live

    report = diff_live("pytorch", "flash", CUDA, ("nomask",), stop_at_first=True)
    assert report.first_divergence.key == "prefix.0.attn" and not report
    assert report.counts()["not_reached"] > 300
    assert report.localisation.introduced == "prefix.0.attn"


def test_live_compare_of_a_cuda_graph_candidate():
    """`fast` records its taps inside CUDA graph captures: those are compared after the run."""
    from parity.api import diff_live

    report = diff_live("pytorch", "fast", CUDA, thresholds=Thresholds.parse(0.995, ["*.mlp=0.99"]), isolate=False)
    host = diff_live("pytorch", "fast", CUDA, thresholds=Thresholds.parse(0.995, ["*.mlp=0.99"]), isolate=False,
                     on_device=False)
    assert [(r.key, r.status) for r in report.rows] == [(r.key, r.status) for r in host.rows]
    assert report, report.first_divergence
def _host_stats(cap):
    """The CPU summaries of a capture's host copies (the reference for GPU-side summaries)."""
    import numpy as np

    from parity.capture.stats import StatsSink

    views = {"bfloat16": (np.int16, torch.bfloat16), "float8_e4m3fn": (np.int8, torch.float8_e4m3fn),
             "float8_e5m2": (np.int8, torch.float8_e5m2)}
    sink = StatsSink()
    for name, layout in cap.layouts.items():
        sink.add_layout(name, layout)
    for t in cap.taps:
        if t.dtype in views:
            value = torch.from_numpy(t.array.view(views[t.dtype][0])).view(views[t.dtype][1])
        else:
            value = torch.from_numpy(t.array)
        sink.add_device_tap(t.info, t.order, value, t.layout)
    return sink.finish()


@pytest.mark.parametrize("backend", ["pytorch", "fast"])
def test_stats_on_the_gpu_equal_the_host_copies_summarised_on_the_cpu(backend):
    """Batched GPU summaries (and, for `fast`, summaries recorded inside its CUDA graphs)
    equal the CPU's summaries of the same run's host copies: checksums bit for bit, the
    float64 summaries to rounding (the GPU sums with atomics)."""
    import numpy as np

    from parity.capture.recorder import capture
    from parity.capture.stats import StatsSink
    from parity.taps.backends import resolve
    from parity.taps.records import Capture

    b = resolve(backend, CUDA)
    full = capture(b, Capture())
    sink = StatsSink()
    capture(b, sink)
    gpu = sink.finish()
    cpu = _host_stats(full)
    assert [t.key for t in gpu.taps] == [t.key for t in cpu.taps] == [t.key for t in full.taps]
    for g, c in zip(gpu.taps, cpu.taps):
        assert g.checksum == c.checksum, g.key
        np.testing.assert_allclose(g.values, c.values, rtol=1e-9, atol=1e-12, equal_nan=True, err_msg=g.key)
    assert sink.fetches <= len(gpu.taps) // 256 + 2  # batched, not per tap


def test_stats_diff_on_the_gpu_flags_nomask_at_prefix_0_attn():
    from parity.api import diff_stats_live

    report = diff_stats_live("pytorch", "flash_fp8", CUDA, ("nomask",))
    assert report.first_divergence.key == "prefix.0.attn"
