"""Live capture on a toy model: hooks live only inside `capture`, taps are cloned, named,
stepped, selected, and a crash inside the model becomes a CaptureError at the right tap."""
from __future__ import annotations

import numpy as np
import pytest
import torch
from torch import nn

from parity.capture.recorder import Recorder, capture
from parity.capture.staging import to_storage
from parity.taps.backends import Backend
from parity.taps.probe import Probe, TapRule, tap_filter
from parity.taps.records import Capture, Layout

F = 4  # feature width


# --------------------------------------------------------------------------- toy model

class TapPoint(nn.Identity):
    """A no-op module that exists only to be tapped."""


class Act(nn.Module):
    """relu, or an exception when `fail` holds one."""

    def __init__(self):
        super().__init__()
        self.fail: BaseException | None = None

    def forward(self, h):
        if self.fail is not None:
            raise self.fail
        return torch.relu(h)


class Block(nn.Module):
    def __init__(self):
        super().__init__()
        self.mlp = nn.Linear(F, F)
        self.act = Act()
        self.out = TapPoint()
        self.fail: BaseException | None = None  # raised between act and out

    def forward(self, h):
        h = self.act(self.mlp(h))
        if self.fail is not None:
            raise self.fail
        return self.out(h)


class Split(nn.Module):
    def forward(self, h):
        return h, 2 * h


class Toy(nn.Module):
    def __init__(self, steps: int = 3):
        super().__init__()
        torch.manual_seed(0)
        self.embed = nn.Linear(F, F)
        self.blocks = nn.ModuleList([Block(), Block()])
        self.denoise = TapPoint()  # called once per step
        self.split = Split()
        self.final = TapPoint()
        self.steps = steps
        self.fail: BaseException | None = None  # raised outside every tap

    def forward(self, x):
        h = self.embed(x)
        for blk in self.blocks:
            h = blk(h)
        for i in range(self.steps):
            h = self.denoise(h) + i
        if self.fail is not None:
            raise self.fail
        h, _ = self.split(h)
        h = self.final(h)
        h.add_(100.0)  # in place, after the tap point has produced it
        return h


RULES = (
    TapRule(r"embed", stack="embed", component="out"),
    TapRule(r"blocks\.(?P<layer>\d+)\.(?P<component>mlp|act|out)", stack="blk"),
    TapRule(r"blocks\.(?P<layer>\d+)", stack="blk", component="block"),
    TapRule(r"denoise", stack="denoise", component="x", stepped=True),
    TapRule(r"split", stack="split", component="first", select=0),
    TapRule(r"final", stack="final", component="out"),
)
PROBE = Probe("toy", RULES)

EXPECTED_KEYS = [
    "embed.out",
    "blk.0.mlp", "blk.0.act", "blk.0.out", "blk.0.block",
    "blk.1.mlp", "blk.1.act", "blk.1.out", "blk.1.block",
    "denoise.x@0", "denoise.x@1", "denoise.x@2",
    "split.first", "final.out",
]

LAYOUTS = {"tokens": Layout(np.arange(3)[None], length=3)}


def make_backend(model: nn.Module | None = None, probe: Probe = PROBE) -> Backend:
    """A backend running `model` on fixed input; `backend.outputs` keeps each run's output and
    `backend.hooks_seen` the number of hooks installed while it ran."""
    model = model if model is not None else Toy()
    x = torch.randn(1, 3, F, generator=torch.Generator().manual_seed(1))
    backend = Backend("toy", model, probe, run=None, layouts=lambda: dict(LAYOUTS), meta={"arch": "toy"})
    backend.outputs, backend.hooks_seen = [], []

    def run():
        backend.hooks_seen.append(hook_count(model))
        with torch.no_grad():
            backend.outputs.append(model(x))

    backend.run = run
    return backend


def hook_count(model: nn.Module) -> int:
    return sum(len(m._forward_hooks) + len(m._forward_pre_hooks) for m in model.modules())


def assert_no_hooks(model: nn.Module) -> None:
    for name, m in model.named_modules():
        assert not m._forward_hooks, f"forward hook left on {name!r}"
        assert not m._forward_pre_hooks, f"forward pre-hook left on {name!r}"


def keys(c: Capture) -> list[str]:
    return [t.key for t in c.taps]


# --------------------------------------------------------------------------- a clean run

def test_capture_records_every_tap_in_execution_order():
    backend = make_backend()
    c = capture(backend)
    assert c.error is None
    assert keys(c) == EXPECTED_KEYS
    assert [t.order for t in c.taps] == list(range(len(EXPECTED_KEYS)))
    assert c.meta == {"arch": "toy"} and set(c.layouts) == {"tokens"}
    blk = c.by_key()["blk.1.act"]
    assert (blk.info.stack, blk.info.layer, blk.info.component) == ("blk", 1, "act")
    assert blk.dtype == "float32" and blk.array.dtype == np.float32 and blk.shape == (1, 3, F)
    assert (blk.array >= 0).all()  # it is the relu's output


# --------------------------------------------------------------------------- hooks never outlive capture

@pytest.mark.parametrize("fault", [None, "act", "top"])
def test_no_hooks_remain_after_capture(fault):
    model = Toy()
    if fault == "act":
        model.blocks[1].act.fail = RuntimeError("boom")
    elif fault == "top":
        model.fail = ValueError("boom")
    backend = make_backend(model)
    assert_no_hooks(model)
    c = capture(backend)
    assert backend.hooks_seen[0] == 12  # one post hook per probed module (no input taps here), during the run
    assert (c.error is None) == (fault is None)
    assert_no_hooks(model)


def test_no_hooks_remain_after_keyboard_interrupt():
    model = Toy()
    model.blocks[0].act.fail = KeyboardInterrupt()
    backend = make_backend(model)
    with pytest.raises(KeyboardInterrupt):
        capture(backend)
    assert backend.hooks_seen[0] > 0
    assert_no_hooks(model)


def test_hooks_installed_before_a_failing_registration_are_removed(monkeypatch):
    model = Toy()
    seen_on_embed = []

    def boom(*args, **kwargs):
        seen_on_embed.append(len(model.embed._forward_pre_hooks) + len(model.embed._forward_hooks))
        raise RuntimeError("cannot register")

    # Probed modules in named_modules() order: embed, blocks.0, ...: fail on the 2nd.
    monkeypatch.setattr(model.blocks[0], "register_forward_hook", boom)
    with pytest.raises(RuntimeError, match="cannot register"):
        capture(make_backend(model))
    assert seen_on_embed == [1]  # the first module was hooked when the second failed
    monkeypatch.undo()
    assert_no_hooks(model)


def test_recorder_removes_hooks_on_exit():
    model = Toy()
    with Recorder(model, PROBE, Capture()) as rec:
        assert len(rec.handles) == hook_count(model) == 12
    assert rec.handles == []
    assert_no_hooks(model)


# --------------------------------------------------------------------------- what is recorded

def test_taps_are_cloned_before_later_in_place_updates():
    backend = make_backend()
    c = capture(backend)
    output = backend.outputs[0].numpy()
    final = c.by_key()["final.out"].array
    np.testing.assert_allclose(final, output - 100.0, rtol=0, atol=1e-5)
    assert not np.allclose(final, output)
    # split's first output is the very tensor final passed through and the model then modified
    np.testing.assert_array_equal(c.by_key()["split.first"].array, final)


def test_stepped_rule_counts_calls():
    c = capture(make_backend())
    steps = [t for t in c.taps if t.info.name == "denoise.x"]
    assert [t.key for t in steps] == ["denoise.x@0", "denoise.x@1", "denoise.x@2"]
    assert [t.info.step for t in steps] == [0, 1, 2]
    orders = [t.order for t in steps]
    assert orders == sorted(orders) and len(set(orders)) == 3
    np.testing.assert_allclose(steps[1].array, steps[0].array + 0, atol=1e-6)  # denoise(h) + 0
    np.testing.assert_allclose(steps[2].array, steps[1].array + 1, atol=1e-6)  # denoise(h) + 1
    assert all(t.info.step is None for t in c.taps if t.info.name != "denoise.x")


def test_steps_restart_for_each_capture():
    backend = make_backend()
    capture(backend)
    assert [k for k in keys(capture(backend)) if k.startswith("denoise")] == EXPECTED_KEYS[9:12]


@pytest.mark.parametrize("selection, want", [
    ("blk.0.*", ["blk.0.mlp", "blk.0.act", "blk.0.out", "blk.0.block"]),
    ("embed.*, final.*", ["embed.out", "final.out"]),
    (["embed.*", "final.*"], ["embed.out", "final.out"]),
    (lambda name: name.endswith(".out") and not name.startswith("blk"), ["embed.out", "final.out"]),
    ("denoise.x@1", ["denoise.x@1"]),
    ("denoise.x", ["denoise.x@0", "denoise.x@1", "denoise.x@2"]),
    ("blk.0.*,!blk.0.act,!*.block", ["blk.0.mlp", "blk.0.out"]),  # '!' leaves taps out
    ("!blk.*,!denoise.*,!split.*", ["embed.out", "final.out"]),  # exclusions only: every other tap
    ("denoise.x,!denoise.x@1", ["denoise.x@0", "denoise.x@2"]),
])
def test_selection(selection, want):
    c = capture(make_backend(), select=tap_filter(selection))
    assert keys(c) == want
    assert [t.order for t in c.taps] == list(range(len(want)))
    if want == ["denoise.x@1"]:
        assert c.taps[0].info.step == 1


@pytest.mark.parametrize("selection", ["", " , ", [], "blk.*,!", "! "])
def test_empty_selection_is_an_error(selection):
    with pytest.raises(ValueError):
        tap_filter(selection)


def test_select_picks_a_tuple_element():
    c = capture(make_backend())
    first = c.by_key()["split.first"]
    assert first.shape == (1, 3, F)
    np.testing.assert_allclose(first.array, c.by_key()["denoise.x@2"].array + 2, atol=1e-6)


def non_tensor_capture():
    """The split module returns a tuple, but this probe taps it as a whole."""
    rules = tuple(TapRule(r.pattern, r.stack, r.component, select=None) if r.stack == "split" else r
                  for r in RULES)
    return capture(make_backend(probe=Probe("toy", rules)))


def test_non_tensor_tap_is_recorded_as_an_error():
    c = non_tensor_capture()
    assert c.error is not None
    assert c.error.exc_type == "TypeError"
    assert "not a tensor" in c.error.message and "split.first" in c.error.message
    assert "split.first" not in keys(c) and "final.out" not in keys(c)


def test_non_tensor_tap_error_is_located_at_that_tap():
    assert non_tensor_capture().error.key == "split.first"


# --------------------------------------------------------------------------- crashes inside the model

@pytest.mark.parametrize("where, key", [
    ("act", "blk.1.act"),  # inside a tapped leaf, itself inside the tapped block: innermost wins
    ("block", "blk.1.block"),  # inside the block, after its inner taps finished
    ("top", None),  # outside every tap
])
def test_exception_is_recorded_at_the_innermost_running_tap(where, key):
    model = Toy()
    exc = RuntimeError("kernel exploded\nsecond line of detail")
    {"act": model.blocks[1].act, "block": model.blocks[1], "top": model}[where].fail = exc
    c = capture(make_backend(model))
    assert c.error is not None
    assert c.error.key == key
    assert (c.error.info.key if c.error.info else None) == key
    assert c.error.exc_type == "RuntimeError"
    assert c.error.message == "kernel exploded"
    assert "final.out" not in keys(c)
    assert "blk.1.mlp" in keys(c)  # taps before the crash are kept
    assert ("blk.1.out" in keys(c)) == (where == "top")


class Fallback(nn.Module):
    """Tries a fast path and falls back to a slow one when it raises (the model survives)."""

    def __init__(self):
        super().__init__()
        self.fast = Act()
        self.fast.fail = RuntimeError("no fast kernel here")
        self.slow = TapPoint()

    def forward(self, h):
        try:
            return self.fast(h)
        except RuntimeError:
            return self.slow(h)


def test_exception_caught_inside_the_model_does_not_mislabel_taps():
    model = nn.Sequential(Fallback())
    probe = Probe("toy", (TapRule(r"0", stack="attn", component="out"),
                          TapRule(r"0\.(?P<component>fast|slow)", stack="attn")))
    backend = Backend("toy", model, probe, run=lambda: model(torch.ones(2, F)), layouts=dict)
    c = capture(backend)
    assert c.error is None
    assert keys(c) == ["attn.slow", "attn.out"]


# --------------------------------------------------------------------------- storage representation

@pytest.mark.parametrize("dtype, bits_dtype, np_dtype", [
    (torch.bfloat16, torch.int16, np.uint16),
    (torch.float8_e4m3fn, torch.int8, np.uint8),
    (torch.float8_e5m2, torch.int8, np.uint8),
])
def test_to_storage_keeps_raw_bits(dtype, bits_dtype, np_dtype):
    t = torch.tensor([[1.0, -2.5, 0.0], [0.125, 3.0, -0.0]]).to(dtype)
    arr, name = to_storage(t)
    assert name == str(dtype).removeprefix("torch.")
    assert arr.dtype == np_dtype and arr.shape == (2, 3)
    np.testing.assert_array_equal(arr, t.view(bits_dtype).numpy().view(np_dtype))
    if dtype == torch.bfloat16:
        assert arr[0, 0] == 0x3F80  # 1.0
        assert arr[1, 2] == 0x8000  # -0.0
    # a non-contiguous view is stored in its logical (C) order
    arr_t, _ = to_storage(t.t())
    np.testing.assert_array_equal(arr_t, arr.T)


def test_to_storage_float32_stays_float32():
    t = torch.randn(3, 2, requires_grad=True)
    arr, name = to_storage(t)
    assert name == "float32" and arr.dtype == np.float32
    np.testing.assert_array_equal(arr, t.detach().numpy())


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float8_e4m3fn])
def test_to_storage_does_not_share_memory(dtype):
    t = torch.ones(4, 3).to(dtype)
    arr, _ = to_storage(t)
    before = arr.copy()
    bits = {torch.float32: torch.float32, torch.bfloat16: torch.int16, torch.float8_e4m3fn: torch.int8}[dtype]
    assert not np.shares_memory(arr, t.view(bits).numpy())
    t.view(bits).zero_()
    np.testing.assert_array_equal(arr, before)


def test_non_stepped_tap_running_twice_is_reported_not_silently_duplicated():
    probe = Probe("toy", tuple(TapRule(r.pattern, r.stack, r.component, r.layout, False, r.select) for r in RULES))
    c = capture(make_backend(probe=probe))
    assert c.error is not None and c.error.exc_type == "ProbeError"
    assert "denoise.x ran 2 times" in c.error.message and "stepped" in c.error.message
    assert len({t.key for t in c.taps}) == len(c.taps)


# --------------------------------------------------------------------------- input taps and split taps

class Fused(nn.Module):
    """A fused projection (q|k|v in one output) followed by an output projection."""

    def __init__(self):
        super().__init__()
        torch.manual_seed(1)
        self.qkv = nn.Linear(F, 2 + 3 + 3)
        self.o = nn.Linear(3, F)

    def forward(self, x):
        q, k, v = self.qkv(x).split([2, 3, 3], dim=-1)
        return self.o(v * 2)


def fused_backend(split=(("q", 2), ("k", 3), ("v", 3))):
    model = nn.Sequential(Fused())
    probe = Probe("toy", (TapRule(r"0\.qkv", "attn", split=split),
                          TapRule(r"0\.o", "attn", "core", on="input"),
                          TapRule(r"0\.o", "attn", "o_proj")))
    x = torch.randn(2, F)
    return Backend("toy", model, probe, run=lambda: model(x), layouts=dict), model, x


def test_input_tap_records_what_a_module_receives_before_its_output():
    backend, model, x = fused_backend()
    c = capture(backend)
    assert keys(c) == ["attn.q", "attn.k", "attn.v", "attn.core", "attn.o_proj"]
    fused = model[0].qkv(x).detach().numpy()
    np.testing.assert_allclose(c.by_key()["attn.core"].array, 2 * fused[:, 5:], rtol=1e-6)
    assert c.by_key()["attn.o_proj"].shape == (2, F)


def test_split_tap_cuts_the_last_dimension_into_named_chunks():
    backend, model, x = fused_backend()
    c = capture(backend)
    fused = model[0].qkv(x).detach().numpy()
    np.testing.assert_array_equal(c.by_key()["attn.q"].array, fused[:, :2])
    np.testing.assert_array_equal(c.by_key()["attn.k"].array, fused[:, 2:5])
    np.testing.assert_array_equal(c.by_key()["attn.v"].array, fused[:, 5:])


def test_split_that_does_not_fit_is_a_probe_error_at_that_tap():
    backend, _, _ = fused_backend(split=(("q", 4), ("k", 4), ("v", 4)))
    c = capture(backend)
    assert c.error is not None and c.error.exc_type == "ProbeError"
    assert "does not match its split" in c.error.message and c.error.key == "attn.q"


class FusedInPlace(Fused):
    """Overwrites its fused projection output and the o-projection's input in place after use."""

    def forward(self, x):
        y = self.qkv(x)
        v = y[..., 5:] * 2
        out = self.o(v)
        y.zero_()
        v.zero_()
        return out


def test_split_and_input_taps_are_copies_taken_when_produced():
    """Split chunks and input taps are copies taken when produced: in-place kernels after
    the tap cannot change what was recorded.  On CPU the sink gets each one as it is
    produced (failclosed: a killed capture keeps what it had), so all four are there
    when the forward returns."""
    model = nn.Sequential(FusedInPlace())
    probe = Probe("toy", (TapRule(r"0\.qkv", "attn", split=(("q", 2), ("k", 3), ("v", 3))),
                          TapRule(r"0\.o", "attn", "core", on="input")))
    x = torch.randn(2, F)
    in_sink_after_forward = []
    sink = Capture()

    def run():
        out = model(x)
        in_sink_after_forward.append(len(sink.taps))
        return out

    capture(Backend("toy", model, probe, run=run, layouts=dict), sink)
    assert in_sink_after_forward == [4] and keys(sink) == ["attn.q", "attn.k", "attn.v", "attn.core"]
    fused = model[0].qkv(x).detach().numpy()
    np.testing.assert_array_equal(sink.by_key()["attn.q"].array, fused[:, :2])
    np.testing.assert_allclose(sink.by_key()["attn.core"].array, 2 * fused[:, 5:], rtol=1e-6)


def test_probe_modules_maps_taps_to_modules():
    backend, model, _ = fused_backend()
    assert backend.probe.modules(model) == {"attn.q": "0.qkv", "attn.k": "0.qkv", "attn.v": "0.qkv",
                                            "attn.core": "0.o:input", "attn.o_proj": "0.o"}


@pytest.mark.parametrize("kwargs, needle", [
    (dict(pattern="x", stack="s", component="c", on="middle"), "on must be"),
    (dict(pattern="x", stack="s", split=(("q", 0),)), "split sizes"),
    (dict(pattern="x", stack="s"), "names no component"),
])
def test_bad_tap_rules_are_refused(kwargs, needle):
    with pytest.raises(ValueError, match=needle):
        TapRule(**kwargs)


def test_hooks_are_opaque_to_torch_compile():
    """Under torch.compile each hook runs eagerly (a graph break), and the values match."""
    backend, model, x = fused_backend()
    compiled = torch.compile(model, backend="eager")
    eager = capture(backend)
    compiled_backend = Backend("toy", model, backend.probe, run=lambda: compiled(x), layouts=dict)
    c = capture(compiled_backend)
    assert keys(c) == keys(eager)
    for a, b in zip(eager.taps, c.taps, strict=True):
        np.testing.assert_allclose(a.array, b.array, rtol=1e-6)


class Instrumentable(Toy):
    """A model that caches captured execution and wants to know when taps come and go."""

    def __init__(self):
        super().__init__()
        self.calls: list[tuple[bool, int]] = []

    def parity_instrumented(self, active: bool) -> None:
        self.calls.append((active, hook_count(self)))


def test_models_are_told_when_taps_are_installed_and_removed():
    model = Instrumentable()
    capture(make_backend(model))
    (on, hooks_on), (off, hooks_off) = model.calls
    assert on is True and hooks_on > 0  # told after the hooks are in place
    assert off is False and hooks_off == 0  # and after they are gone


def test_progress_advances_as_taps_are_produced_and_stored():
    """On CPU each tap reaches the sink as soon as it is produced (a killed capture keeps
    it): a progress callback advances once as the model produces a tap, then once as it
    is stored, both while the model runs."""
    from parity.api import capture_live
    from parity.taps.backends import BackendOptions

    calls: list[tuple[str, int, int | None]] = []
    backend = make_backend()
    inner_run = backend.run

    def run():
        inner_run()
        calls.append(("run ended", 0, None))

    backend.run = run
    cap = capture_live(backend, BackendOptions(), progress=lambda what, done, total: calls.append((what, done, total)))
    n = len(EXPECTED_KEYS)
    assert keys(cap) == EXPECTED_KEYS
    assert calls == ([c for i in range(1, n + 1) for c in (("capture toy", i, None), ("capture toy (store)", i, i))]
                     + [("run ended", 0, None)])


# --------------------------------------------------------------------------- device sinks

class DeviceSink:
    """Takes taps as live tensors (what an on-device compare or stats sink does); stops the
    run once it has seen `stop_after` taps."""

    def __init__(self, stop_after: int | None = None, fail_at: str | None = None):
        self.seen, self.layouts, self.error = [], {}, None
        self.stop_after, self.fail_at = stop_after, fail_at

    def add_layout(self, name, layout):
        self.layouts[name] = layout

    def add_tap(self, tap):
        raise AssertionError("a device sink never gets host copies")

    def set_error(self, error):
        self.error = error

    def add_device_tap(self, info, order, value, layout):
        from parity.capture.recorder import StopRun

        if info.key == self.fail_at:
            raise OSError("device sink broke")
        self.seen.append((info.key, order, value.clone(), layout))
        if self.stop_after is not None and len(self.seen) >= self.stop_after:
            raise StopRun()


def test_device_sink_gets_every_tap_as_a_tensor_in_order_and_equal_to_the_host_path():
    host = capture(make_backend())
    sink = capture(make_backend(), DeviceSink())
    assert [k for k, *_ in sink.seen] == EXPECTED_KEYS
    assert [o for _, o, *_ in sink.seen] == list(range(len(EXPECTED_KEYS)))
    for (key, _, value, _), tap in zip(sink.seen, host.taps):
        assert isinstance(value, torch.Tensor) and not value.requires_grad
        assert np.array_equal(value.numpy(), tap.array), key


def test_device_sink_can_stop_the_run_early_without_an_error():
    model = Toy()
    backend = make_backend(model)
    sink = capture(backend, DeviceSink(stop_after=3))
    assert [k for k, *_ in sink.seen] == EXPECTED_KEYS[:3]
    assert sink.error is None and backend.outputs == []  # the model never finished
    assert_no_hooks(model)


def test_stop_survives_a_model_that_catches_exceptions():
    model = nn.Sequential(Fallback())
    probe = Probe("toy", (TapRule(r"0", stack="attn", component="out"),
                          TapRule(r"0\.(?P<component>fast|slow)", stack="attn")))
    backend = Backend("toy", model, probe, run=lambda: model(torch.ones(2, F)), layouts=dict)
    sink = capture(backend, DeviceSink(stop_after=1))
    assert [k for k, *_ in sink.seen] == ["attn.slow"] and sink.error is None


def test_a_failing_device_sink_propagates_its_error_not_a_model_error():
    sink = DeviceSink(fail_at="blk.0.out")
    with pytest.raises(OSError, match="device sink broke"):
        capture(make_backend(), sink)
    assert sink.error is None
    assert [k for k, *_ in sink.seen] == EXPECTED_KEYS[:3]


# --------------------------------------------------------------------------- what observing changed

def test_graph_breaks_forced_by_the_taps_are_recorded_with_the_capture():
    torch._dynamo.reset()
    backend, model, x = fused_backend()
    compiled = torch.compile(model, backend="eager")
    c = capture(Backend("toy", model, backend.probe, run=lambda: compiled(x), layouts=dict))
    obs = c.meta["observation"]
    assert obs["graph_breaks"] >= 1 and obs["graph_break_reasons"]
    assert obs["graph_break_reasons"][0].startswith("a parity tap hook")  # the real reason, not "<lambda>"
    assert obs["graphs_compiled"] >= 2  # the model's code, cut at the taps
    assert "observation" not in capture(fused_backend()[0]).meta  # eager: observing changed nothing


def test_graph_breaks_are_recorded_by_the_on_device_compare_too():
    """The default live diff (compared on the device as the candidate runs) keeps the
    candidate's observation in its report, as a host capture does."""
    from parity.api import diff_live
    from parity.taps.backends import BackendOptions

    torch._dynamo.reset()
    backend, model, x = fused_backend()
    compiled = torch.compile(model, backend="eager")
    cand = Backend("toy", model, backend.probe, run=lambda: compiled(x), layouts=dict, meta={"dtype": "float32"})
    ref = Backend("toy", model, backend.probe, run=lambda: model(x), layouts=dict, meta={"dtype": "float32"})
    report = diff_live(ref, cand, BackendOptions(), oracle=False, isolate=False)
    obs = report.cand_meta.get("observation")
    assert obs and obs["graph_breaks"] >= 1 and obs["graph_break_reasons"][0].startswith("a parity tap hook")


class Noted(Instrumentable):
    def parity_instrumented(self, active: bool):
        super().parity_instrumented(active)
        return "graph re-captured with taps" if active else None


def test_the_models_own_note_and_modules_that_never_ran_are_recorded():
    model = Noted()
    model.steps = 0  # the stepped denoise tap point never runs
    c = capture(make_backend(model))
    obs = c.meta["observation"]
    assert obs["model"] == "graph re-captured with taps"
    assert obs["tapped_modules_not_run"] == 1 and obs["tapped_modules_not_run_first"] == ["denoise"]


def test_the_observation_survives_a_dump_and_is_shown_in_the_diff_header(tmp_path):
    from parity.dump.reader import read_dump
    from parity.dump.writer import DumpWriter
    from parity.report.terminal.diff import run_header

    model = Noted()
    backend = make_backend(model)
    with DumpWriter(tmp_path / "c.h5", dict(backend.meta)) as w:
        capture(backend, w)
    meta = read_dump(tmp_path / "c.h5").meta
    assert meta["arch"] == "toy" and meta["observation"] == {"model": "graph re-captured with taps"}
    text = run_header({"backend": "ref"}, meta).plain
    assert "cand observed differently: graph re-captured with taps" in text
    assert "observed differently" not in run_header({"backend": "ref"}, {"backend": "c"}).plain


class _Flaky(nn.Module):
    """Raises on its calls listed in `fail`."""

    def __init__(self, fail: set[int]) -> None:
        super().__init__()
        self.fail, self.n = fail, 0

    def forward(self, x):
        self.n += 1
        if self.n - 1 in self.fail:
            raise RuntimeError(f"call {self.n - 1}")
        return x * 2


class _Retrying(nn.Module):
    """Calls its step module three times, catching what it raises (as a model's fallback would)."""

    def __init__(self, fail: set[int], catch: bool) -> None:
        super().__init__()
        self.step, self.catch = _Flaky(fail), catch

    def forward(self, x):
        for _ in range(3):
            try:
                x = self.step(x)
            except RuntimeError:
                if not self.catch:
                    raise
        return x


@pytest.mark.parametrize("on", ["input", "output"])
def test_stepped_taps_keep_their_steps_when_a_call_raises(on):
    """The call index of a stepped tap is its call's, whether the module has input taps
    (counted as the call starts) or not (counted once recorded): a call that raises and
    is caught inside the model leaves no duplicate step, and a call that raises out of
    the model is located at its own step."""
    probe = Probe("flaky", (TapRule(r"step", "s", "x", stepped=True, on=on),))
    caught = capture(make_backend(_Retrying({1}, catch=True), probe))
    assert caught.error is None
    steps = [t.key for t in caught.taps]
    assert len(steps) == len(set(steps)), steps  # no step recorded twice
    assert steps == (["s.x@0", "s.x@1", "s.x@2"] if on == "input" else ["s.x@0", "s.x@1"])
    raised = capture(make_backend(_Retrying({2}, catch=False), probe))
    assert raised.error is not None and raised.error.key == "s.x@2"
