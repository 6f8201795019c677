"""The on-device live compare (parity.live): the same report as the host path, no tap
copied to the host, and a candidate run that can stop at the first divergence."""
from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from torch import nn
from typer.testing import CliRunner

from parity.api import diff_live
from parity.cli import app
from parity.comparison import device_sums
from parity.comparison.rules import Thresholds
from parity.taps.backends import Backend, BackendOptions
from parity.taps.probe import Probe, TapRule
from parity.taps.records import Layout, Region

CPU = BackendOptions(config="tiny", device="cpu")


# --------------------------------------------------------------------------- helpers

def _same_float(a: float, b: float) -> bool:
    if math.isnan(a) or math.isnan(b):
        return math.isnan(a) and math.isnan(b)
    return a == b or abs(a - b) <= 1e-12 * max(1.0, abs(a), abs(b))


def _same_metrics(a, b, where: str) -> None:
    assert (a is None) == (b is None), where
    if a is None:
        return
    for name, x in a.__dict__.items():
        y = getattr(b, name)
        if isinstance(x, float):
            assert _same_float(x, y), f"{where}: {name} host {x!r} vs device {y!r}"
        else:
            assert x == y, f"{where}: {name} host {x!r} vs device {y!r}"


def assert_same_report(host, device) -> None:
    """Same rows, verdicts, reasons and problems; every metric equal to float64 rounding."""
    assert bool(host) == bool(device)
    assert host.problems == device.problems
    assert host.thresholds == device.thresholds
    assert [(r.key, r.order, r.status, r.reason, r.ref_shape, r.cand_shape, r.ref_dtype, r.cand_dtype)
            for r in host.rows] == \
           [(r.key, r.order, r.status, r.reason, r.ref_shape, r.cand_shape, r.ref_dtype, r.cand_dtype)
            for r in device.rows]
    for h, d in zip(host.rows, device.rows):
        _same_metrics(h.metrics, d.metrics, h.key)
        assert list(h.regions) == list(d.regions) and list(h.chunks) == list(d.chunks), h.key
        assert len(h.heads) == len(d.heads), h.key
        for group, name, a, b in ([("region", k, h.regions[k], d.regions[k]) for k in h.regions]
                                  + [("chunk", k, h.chunks[k], d.chunks[k]) for k in h.chunks]
                                  + [("head", i, a, b) for i, (a, b) in enumerate(zip(h.heads, d.heads))]):
            _same_metrics(a, b, f"{h.key} {group} {name}")
    fh, fd = host.first_divergence, device.first_divergence
    assert (fh and fh.key) == (fd and fd.key)


def both(ref, cand, options=CPU, faults=(), **kw):
    host = diff_live(ref, cand, options, faults, on_device=False, **kw)
    device = diff_live(ref, cand, options, faults, **kw)
    return host, device


# --------------------------------------------------------------------------- scripted toy backends

class Emit(nn.Module):
    """Produces one fixed tensor: a tap whose value the test chooses."""

    def __init__(self, value: torch.Tensor):
        super().__init__()
        self.value, self.fail = value, False

    def forward(self, x):
        if self.fail:
            raise RuntimeError("exploded inside a tap")
        return self.value.clone()


class Script(nn.Module):
    def __init__(self, taps: dict, raise_at: str | None = None):
        super().__init__()
        self.emit = nn.ModuleDict({name: Emit(value) for name, (value, _) in taps.items()})
        if raise_at is not None:
            self.emit[raise_at].fail = True
        self.ran: list[str] = []

    def forward(self, x):
        for name, module in self.emit.items():
            module(x)
            self.ran.append(name)


def scripted(taps: dict, layouts: dict | None = None, dtype: str = "float32", raise_at: str | None = None) -> Backend:
    """A backend whose taps `name -> (tensor, layout name or None)` come out in order."""
    model = Script(taps, raise_at)
    probe = Probe("script", tuple(TapRule(rf"emit\.{name}", stack="s", component=name, layout=layout)
                                  for name, (_, layout) in taps.items()))
    return Backend("script", model, probe, run=lambda: model(None), layouts=lambda: dict(layouts or {}),
                   meta={"dtype": dtype, "backend": "script"})


# A padded reference layout (2 rows x 6 slots, 3 regions) and a packed candidate one.
REF_SLOTS = np.array([[0, 1, 2, 3, -1, -1], [8, 9, 10, 11, 12, -1]])
CAND_SLOTS = np.array([[8, 9, 10, 11, 12, 0], [1, 2, 3, -1, -1, -1]])
REGIONS = (Region("img", 0, 2), Region("text", 2, 4), Region("act", 4, 8))
LAYOUTS_REF = {"tok": Layout(REF_SLOTS, 8, REGIONS)}
LAYOUTS_CAND = {"tok": Layout(CAND_SLOTS, 8, REGIONS)}


def _repack(x: torch.Tensor) -> torch.Tensor:
    """The same tokens as a REF_SLOTS tensor, in CAND_SLOTS order (don't-care slots: junk)."""
    out = torch.full_like(x, 7.0) if x.is_floating_point() else torch.zeros_like(x)
    ref_pos = {int(c): (r, t) for (r, t), c in np.ndenumerate(REF_SLOTS) if c >= 0}
    for (r, t), c in np.ndenumerate(CAND_SLOTS):
        if c >= 0:
            out[r, t] = x[ref_pos[int(c)]]
    return out


def _pair(gen: torch.Generator):
    """(ref taps, cand taps) covering every dtype rule and edge the diff knows."""
    def rnd(*shape, dtype=torch.float32):
        return torch.randn(*shape, generator=gen).to(dtype)

    ref, cand = {}, {}

    def tap(name, r, c, layout=None):
        ref[name] = (r, layout)
        cand[name] = (c, layout)

    heads = rnd(2, 6, 3, 4)  # [rows, slots, heads, dim]: per-head metrics
    noisy = heads + 1e-3 * rnd(2, 6, 3, 4)
    noisy[1, 2, 1, 3] = float("nan")  # a NaN in a valid slot of head 1
    tap("heads", heads, _repack(noisy), "tok")
    feats = rnd(2, 6, 5)
    tap("tokens", feats, _repack(feats + 0.3 * rnd(2, 6, 5)), "tok")
    tap("same_tokens", feats, _repack(feats), "tok")  # identical: cos exactly 1.0
    inf = rnd(4, 3)
    inf[2, 1] = float("inf")
    tap("inf_ref", inf, rnd(4, 3))
    tap("bf16", rnd(3, 8, dtype=torch.bfloat16), rnd(3, 8, dtype=torch.bfloat16))
    half = torch.tensor([60000.0, -60000.0, 1.0], dtype=torch.float16)
    tap("fp16_overflow", half, half * 2)  # inf in the candidate after overflow
    tap("fp8", rnd(16).to(torch.float8_e4m3fn), rnd(16).to(torch.float8_e4m3fn))
    tap("fp8_e5m2", rnd(16).to(torch.float8_e5m2), rnd(16).to(torch.float8_e5m2))
    wide = torch.tensor([1e300, -3e299, 1e-300, 5e-324, 0.0], dtype=torch.float64)
    tap("f64_wide", wide, wide * (1 + 1e-9))
    tap("f64_overflow", torch.tensor([1.5e308, 1.0], dtype=torch.float64),
        torch.tensor([-1.5e308, 1.0], dtype=torch.float64))  # c - r overflows: max_abs inf
    tap("f64_tiny", torch.tensor([1e-310, 3e-320], dtype=torch.float64),
        torch.tensor([2e-310, 3e-320], dtype=torch.float64))
    ints = torch.arange(12, dtype=torch.int32).reshape(3, 4)
    tap("ints", ints, ints + 1)
    tap("bools", torch.tensor([True, False, True]), torch.tensor([True, True, True]))
    tap("zeros_vs_ones", torch.zeros(5), torch.ones(5))
    tap("both_zero", torch.zeros(5), torch.zeros(5))
    tap("scalar", torch.tensor(2.0), torch.tensor(2.5))
    tap("empty", torch.zeros(0, 4), torch.zeros(0, 4))
    tap("all_nan", torch.full((3,), float("nan")), torch.ones(3))
    tap("ties", torch.tensor([0.0, 1.0, 0.0, 1.0]), torch.tensor([1.0, 0.0, 1.0, 0.0]))  # first max wins
    tap("dtype", rnd(4), rnd(4).double())
    tap("shape", rnd(4, 2), rnd(2, 4))
    tap("complex", torch.ones(2, dtype=torch.complex64), torch.ones(2, dtype=torch.complex64))
    ref["bad_layout"] = (rnd(3, 6), "tok")  # does not fit [2, 6]
    cand["bad_layout"] = (rnd(3, 6), "tok")
    ref["only_ref"] = (rnd(2), None)
    cand["only_cand"] = (rnd(2), None)
    return ref, cand


def test_toy_report_equals_the_host_paths_for_every_dtype_edge_and_layout():
    ref, cand = _pair(torch.Generator().manual_seed(0))
    host, device = both(scripted(ref, LAYOUTS_REF), scripted(cand, LAYOUTS_CAND), isolate=False, chunk=3)
    assert_same_report(host, device)
    rows = {r.key: r for r in device.rows}
    # the cases are what they claim to be, so the equality above means something
    assert rows["s.heads"].status == "nonfinite" and len(rows["s.heads"].heads) == 3
    assert "canonical token position 10" in rows["s.heads"].reason
    assert set(rows["s.tokens"].regions) == {"img", "text", "act"} and rows["s.tokens"].chunks
    assert rows["s.same_tokens"].metrics.cos == 1.0 and rows["s.same_tokens"].passed
    assert rows["s.f64_overflow"].metrics.max_abs == math.inf
    assert rows["s.f64_wide"].passed and rows["s.f64_tiny"].metrics.n == 2
    assert rows["s.ties"].metrics.max_abs_index == 0
    assert rows["s.empty"].status == "empty" and rows["s.scalar"].metrics.n == 1
    assert rows["s.dtype"].status == "dtype" and rows["s.shape"].status == "shape"
    assert rows["s.complex"].status == "dtype" and rows["s.bad_layout"].status == "layout"
    assert {r.status for r in device.rows if r.key in ("s.only_ref", "s.only_cand")} == {"missing", "extra"}


@pytest.mark.parametrize("seed", [1, 2])
def test_batches_of_many_taps_of_one_shape_give_the_same_numbers(monkeypatch, seed):
    """Taps of one signature are reduced together, in batches (here of 3, so full and part
    batches both occur); each tap still gets its own numbers."""
    monkeypatch.setattr(device_sums, "DEFAULT_MAX_TAPS", 3)
    gen = torch.Generator().manual_seed(seed)
    base = {f"t{i}": (torch.randn(2, 6, 3, 4, generator=gen), "tok") for i in range(8)}
    cand = {k: (_repack(v + 0.05 * i * torch.randn(v.shape, generator=gen)), "tok")
            for i, (k, (v, _)) in enumerate(base.items())}
    host, device = both(scripted(base, LAYOUTS_REF), scripted(cand, LAYOUTS_CAND), isolate=False, chunk=2)
    assert_same_report(host, device)
    assert len({r.metrics.cos for r in device.rows}) == 8


def test_a_candidate_that_raises_is_reported_as_on_the_host():
    ref, cand = _pair(torch.Generator().manual_seed(3))
    host, device = both(scripted(ref, LAYOUTS_REF), scripted(cand, LAYOUTS_CAND, raise_at="bf16"), isolate=False)
    assert_same_report(host, device)
    assert device.cand_error is not None and any(r.status == "raised" for r in device.rows)


@pytest.mark.parametrize("cand,faults", [("flash", ()), ("flash_fp8", ()), ("flash", ("nomask",)),
                                         ("flash_fp8", ("silu",))])
def test_pi05_tiny_live_compare_equals_the_host_diff(cand, faults):
    host, device = both("pytorch", cand, CPU, faults, thresholds=Thresholds(), chunk=16)
    assert_same_report(host, device)
    assert bool(device) == (cand == "flash" and not faults)
    if faults:
        assert device.localisation.to_dict() == host.localisation.to_dict()
        assert device.localisation.introduced == {"nomask": "prefix.0.attn", "silu": "prefix.0.mlp"}[faults[0]]


def test_no_tap_is_copied_to_the_host(monkeypatch):
    """The live compare never stages a tap for the host: the host path's only ways there
    (`to_storage`, the Stager) are booby-trapped, and the diff still runs (the host path
    with the same traps fails, so the traps are the real way out)."""
    import parity.capture.recorder as capture_mod
    from parity.capture.staging import Stager

    class Staged(BaseException):  # not an Exception: a model's failure must not absorb it
        pass

    def trap(*a, **k):
        raise Staged("a tap was staged for the host")

    monkeypatch.setattr(capture_mod, "to_storage", trap)
    monkeypatch.setattr(Stager, "stage", trap)
    report = diff_live("pytorch", "flash", CPU, ("silu",), Thresholds())
    assert report.first_divergence.key == "prefix.0.mlp" and report.localisation.introduced == "prefix.0.mlp"
    with pytest.raises(Staged, match="staged for the host"):
        diff_live("pytorch", "flash", CPU, on_device=False)


def test_stop_at_first_ends_the_candidate_run_there():
    ref, cand = {}, {}
    for i in range(6):
        x = torch.randn(4, 4, generator=torch.Generator().manual_seed(i))
        ref[f"t{i}"] = (x, None)
        cand[f"t{i}"] = (x if i != 2 else -x, None)
    cand_backend = scripted(cand)
    report = diff_live(scripted(ref), cand_backend, CPU, stop_at_first=True, isolate=False)
    assert cand_backend.model.ran == ["t0", "t1"]  # the run ended in t2's tap hook
    assert [r.status for r in report.rows] == ["pass", "pass", "fail"] + ["not_reached"] * 3
    assert report.first_divergence.key == "s.t2" and not report
    assert report.problems == ["candidate stopped early at the first divergence, s.t2 (--stop-at-first): "
                               "3 reference taps never compared"]
    full = diff_live(scripted(ref), scripted(cand), CPU, isolate=False)
    assert full.rows[2].metrics == report.rows[2].metrics


def test_stop_at_first_still_localises_on_pi05():
    report = diff_live("pytorch", "flash", CPU, ("nomask",), stop_at_first=True)
    assert report.first_divergence.key == "prefix.0.attn" and not report
    assert report.counts()["not_reached"] > 300
    assert report.localisation.introduced == "prefix.0.attn" and "mask" in report.localisation.hint


def test_stop_at_first_on_a_passing_pair_compares_everything():
    x = {f"t{i}": (torch.full((3,), float(i)), None) for i in range(4)}
    report = diff_live(scripted(x), scripted(x), CPU, stop_at_first=True, isolate=False)
    assert report and report.counts() == {"pass": 4}


runner = CliRunner()


def test_cli_stop_at_first_exits_1_and_says_it_stopped():
    result = runner.invoke(app, ["diff", "--ref", "pytorch", "--cand", "flash", "--inject", "silu", "--device",
                                 "cpu", "--stop-at-first", "--quiet"])
    assert result.exit_code == 1, result.output
    assert "stopped early at the first divergence, prefix.0.mlp" in result.output
    assert "INTRODUCED AT: prefix.0.mlp" in result.output


@pytest.mark.parametrize("args,message", [
    (["a.h5", "b.h5", "--stop-at-first"], "--stop-at-first applies to a live diff"),
    (["a.h5", "b.h5", "--host-compare"], "--host-compare applies to a live diff"),
    (["--ref", "pytorch", "--cand", "flash", "--host-compare", "--stop-at-first"], "needs the on-device compare"),
    (["--ref", "pytorch", "--cand", "flash", "--ref-device-mb", "-1"], "--ref-device-mb must be 0 or more"),
])
def test_cli_bad_live_flags_are_one_line_errors(args, message):
    result = runner.invoke(app, ["diff", *args, "--device", "cpu", "--quiet"])
    assert result.exit_code == 2 and message in result.output and "Traceback" not in result.output


def test_cli_host_compare_is_still_there():
    result = runner.invoke(app, ["diff", "--ref", "pytorch", "--cand", "flash", "--device", "cpu",
                                 "--host-compare", "--quiet"])
    assert result.exit_code == 0, result.output


def test_identical_tensors_give_cos_exactly_one_whatever_the_kernels_summed():
    """A GPU may sum r*c and r*r in different orders; when every difference is zero the
    finishing step knows they are the same sum (the host gives exactly 1.0 there)."""
    row = np.zeros(device_sums.WIDTH)
    row[device_sums.N_VALID] = 3
    row[device_sums.DOT], row[device_sums.RR], row[device_sums.CC] = 1.9999999999999998, 2.0, 2.0
    m = device_sums.row_metrics(row, 3)
    assert m.cos == 1.0 and m.rel_l2 == 0.0 and m.max_abs == 0.0 and m.max_abs_index == 0
    row[device_sums.DD], row[device_sums.SAD] = 1e-30, 1e-15  # not identical: no such shortcut
    assert device_sums.row_metrics(row, 3).cos == 0.9999999999999999
