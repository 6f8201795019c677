"""Stats-only mode: on-device summaries against float64 numpy references, the bit
checksum's sensitivity, the stats dump (round trip, corruption, refusal by tensor
readers), the stats diff on planted faults, and the CLI end to end on pi0.5 tiny."""
from __future__ import annotations

import json
import subprocess
import sys

import h5py
import numpy as np
import pytest
import torch
from typer.testing import CliRunner

from parity.capture.recorder import capture
from parity.capture.staging import to_storage
from parity.capture.stats import BLOCK, StatsSink, checksum, summarise
from parity.cli import app
from parity.comparison.stats import diff_stats, tolerances
from parity.dump.format import DumpError
from parity.dump.stats import is_stats_dump, read_stats, write_stats
from parity.taps.codec import to_float64
from parity.taps.records import CaptureError, Layout, TapInfo
from parity.taps.stats import FIELDS, StatsCapture

MASK64 = (1 << 64) - 1


def cli(*args) -> tuple[int, str]:
    result = CliRunner().invoke(app, [str(a) for a in args], env={"COLUMNS": "400"}, catch_exceptions=False)
    return result.exit_code, result.output


def one_line_error(out: str) -> str:
    lines = [line for line in out.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("error: ") and "Traceback" not in out, out
    return lines[0]


# --------------------------------------------------------------------------- float64 references

def reference_summary(t: torch.Tensor) -> dict[str, float]:
    """The summary from the stored bits, decoded by the codec and reduced by numpy."""
    array, dtype = to_storage(t)
    x = to_float64(array, dtype).reshape(-1)
    f = x[np.isfinite(x)]
    out = {"count": x.size, "finite": f.size, "nan": int(np.isnan(x).sum()), "posinf": int((x == np.inf).sum()),
           "neginf": int((x == -np.inf).sum()), "zeros": int((x == 0).sum()), "sum": float(f.sum()) if f.size else 0.0}
    if not f.size:
        return {**out, "mean": np.nan, "l2": 0.0, "mean_abs": 0.0, "var": np.nan, "std": np.nan, "skew": np.nan,
                "kurtosis": np.nan, "min": np.nan, "max": np.nan, "max_abs": np.nan}
    s = np.abs(f).max() or 1.0
    fs = f / s  # scaled, so that huge values do not overflow the reference either
    d = fs - fs.mean()
    m2, m3, m4 = (d ** 2).mean(), (d ** 3).mean(), (d ** 4).mean()
    return {**out, "mean": float(f.mean()), "l2": float(s * np.sqrt((fs ** 2).sum())),
            "mean_abs": float(np.abs(f).mean()), "var": _times(_times(m2, s), s), "std": float(np.sqrt(m2) * s),
            "skew": float(m3 / m2 ** 1.5) if m2 > 0 else np.nan,
            "kurtosis": float(m4 / m2 ** 2 - 3) if m2 > 0 else np.nan,
            "min": float(f.min()), "max": float(f.max()), "max_abs": float(np.abs(f).max())}


def _times(a: float, b: float) -> float:
    with np.errstate(over="ignore"):  # a variance of 1e300-sized values is Inf: the expected answer
        return float(np.float64(a) * np.float64(b))


def reference_checksum(t: torch.Tensor) -> int:
    """sum_i bits_i * ((i * 0x9E3779B97F4A7C15) | 1) mod 2**64, in Python integers."""
    array, _ = to_storage(t)
    raw = array.reshape(-1)
    unsigned = t.dtype in (torch.uint8, torch.bool)  # every other dtype: its bits as a signed integer
    ints = {1: np.int8, 2: np.int16, 4: np.int32, 8: np.int64}
    signed = raw.astype(np.int64) if unsigned else raw.view(ints[raw.itemsize])
    total = 0
    for i, v in enumerate(signed.astype(np.int64).tolist()):
        total = (total + (v & MASK64) * (((i * 0x9E3779B97F4A7C15) & MASK64) | 1)) & MASK64
    return total


def assert_summary(t: torch.Tensor, got_values=None, got_check=None) -> None:
    values, check = summarise(t) if got_values is None else (got_values, got_check)
    got = dict(zip(FIELDS, np.asarray(values).tolist()))
    want = reference_summary(t)
    for name in FIELDS:
        np.testing.assert_allclose(got[name], want[name], rtol=1e-9, atol=0, equal_nan=True, err_msg=name)
    assert int(check) & MASK64 == reference_checksum(t)


def sample(dtype: torch.dtype, shape=(3, 5, 7), seed: int = 0, scale: float = 3.0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return (torch.randn(*shape, generator=g, dtype=torch.float64) * scale + 0.5).to(dtype)


DTYPES = [torch.float32, torch.float64, torch.float16, torch.bfloat16, torch.float8_e4m3fn, torch.float8_e5m2]


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("pieces", [None, 16], ids=["whole", "in_pieces"])
def test_summaries_equal_float64_numpy_references(dtype, pieces):
    """`in_pieces`: a tap bigger than a batch is summarised piece by piece (first passes
    added up, then moments about the whole tap's mean): the same numbers."""
    t = sample(dtype)
    assert_summary(t, *(summarise(t, pieces) if pieces else summarise(t)))


def test_taps_summarised_together_in_batches_equal_their_references():
    """The sink lays taps end to end and reduces a batch at once: each tap's row must be its
    own summary, whatever else shares its batch (small batches here, so taps straddle
    batch boundaries, and one tap is bigger than a batch)."""
    tensors = [sample(dtype, (5, 3), seed=i) for i, dtype in enumerate(DTYPES)]
    tensors[2][1, 1] = float("nan")
    tensors += [torch.zeros(0), torch.full((4,), float("inf")), sample(torch.float32, (50,), seed=9)]
    sink = StatsSink(fetch_every=4, batch_elements=32)
    for i, t in enumerate(tensors):
        sink.add_device_tap(TapInfo(f"t.{i}", "t", i, "x"), i, t, None)
    stats = sink.finish()
    assert 1 <= sink.fetches < len(tensors)  # fetched in batches, not per tap
    for t, row in zip(tensors, stats.taps):
        assert_summary(t, row.values, row.checksum)


def test_taps_sharing_a_batch_of_their_dtype_keep_their_own_summaries():
    """Taps of two dtypes interleaved, several to a batch of each dtype (one copy per tap,
    widened together when the batch is reduced), one a non-contiguous view, sizes that
    end mid-block: each row is its own tap's summary and checksum."""
    tensors = []
    for i in range(8):
        dtype = torch.float32 if i % 2 else torch.bfloat16
        t = sample(dtype, (3, 7 + 300 * i), seed=20 + i)
        tensors.append(t.t() if i == 3 else t)
    tensors[4][0, 5] = float("nan")
    sink = StatsSink(fetch_every=100, batch_elements=4 * BLOCK)
    for i, t in enumerate(tensors):
        sink.add_device_tap(TapInfo(f"t.{i}", "t", i, "x"), i, t, None)
    stats = sink.finish()
    for t, row in zip(tensors, stats.taps):
        assert_summary(t, row.values, row.checksum)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16, torch.float64], ids=str)
def test_nan_and_inf_are_counted_and_kept_out_of_the_moments(dtype):
    t = sample(dtype, (40,))
    t[3], t[7], t[8], t[20] = float("nan"), float("inf"), float("-inf"), 0.0
    assert_summary(t)
    values, _ = summarise(t)
    got = dict(zip(FIELDS, values.tolist()))
    assert (got["nan"], got["posinf"], got["neginf"], got["finite"]) == (1, 1, 1, 37)


def test_fp8_nan_patterns_and_e5m2_infinities():
    bits = torch.tensor([0x7F, 0xFF, 0x00, 0x80, 0x38, 0x7E], dtype=torch.uint8)  # e4m3fn: NaN, NaN, 0, -0, 1, 448
    t = bits.view(torch.float8_e4m3fn)
    assert_summary(t)
    assert dict(zip(FIELDS, summarise(t)[0].tolist()))["nan"] == 2
    t5 = torch.tensor([0x7C, 0xFC, 0x7E, 0x3C], dtype=torch.uint8).view(torch.float8_e5m2)  # +inf, -inf, NaN, 1
    assert_summary(t5)


@pytest.mark.parametrize("case", ["empty", "all_nan", "zeros", "constant", "huge_f32", "huge_f64", "denormal"])
def test_edge_cases_have_defined_summaries(case):
    t = {"empty": torch.zeros(0, 4), "all_nan": torch.full((5,), float("nan")), "zeros": torch.zeros(6),
         "constant": torch.full((6,), 2.5, dtype=torch.bfloat16),
         "huge_f32": torch.tensor([3.0e38, -3.3e38, 1e38, 2.9e38], dtype=torch.float32),
         "huge_f64": torch.tensor([1e300, -1.5e300, 3e299], dtype=torch.float64),
         "denormal": torch.tensor([1e-45, -3e-45, 0.0], dtype=torch.float32)}[case]
    assert_summary(t)
    assert_summary(t, *summarise(t, batch_elements=2))
    got = dict(zip(FIELDS, summarise(t)[0].tolist()))
    # no overflow where the value is representable (a variance of 1e300-sized values is not)
    assert not np.isinf([got[k] for k in ("l2", "std", "mean", "skew", "kurtosis")]).any(), got


def test_summary_of_a_non_contiguous_view_is_that_of_its_values():
    t = sample(torch.float32, (6, 8))
    assert_summary(t.t())
    assert int(checksum(t.t())) == int(checksum(t.t().contiguous()))


# --------------------------------------------------------------------------- the checksum

@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_every_single_bit_flip_changes_the_checksum(dtype):
    t = sample(dtype, (13,))
    base = int(checksum(t))
    assert base == int(checksum(t.clone()))  # equal bits, equal checksum
    width = t.element_size() * 8
    raw = t.view({1: torch.uint8, 2: torch.int16, 4: torch.int32, 8: torch.int64}[t.element_size()])
    for i in range(t.numel()):
        for bit in range(width):
            flipped = raw.clone()
            flipped[i] ^= (1 << bit) if bit < width - 1 or width == 8 else -(1 << bit)
            assert int(checksum(flipped.view(dtype))) != base, (i, bit)


def test_checksum_sees_moved_values_and_signed_zero():
    t = sample(torch.bfloat16, (10,))
    swapped = t.clone()
    swapped[[2, 7]] = t[[7, 2]]
    assert int(checksum(swapped)) != int(checksum(t))
    assert int(checksum(torch.tensor([0.0]))) != int(checksum(torch.tensor([-0.0])))


def test_checksum_of_many_elements_equals_the_reference():
    t = sample(torch.float32, (1000,))
    assert int(checksum(t)) & MASK64 == reference_checksum(t)


# --------------------------------------------------------------------------- the sink

class ToyBackend:
    """Two 'layers' whose taps use a token layout: padded (reference) or packed (candidate)."""

    def __init__(self, packed: bool, scale_layer1: float = 1.0, nan_at: int | None = None):
        from parity.taps.backends import Backend
        from parity.taps.probe import Probe, TapRule

        self.packed = packed
        values = torch.randn(2, 3, 4, generator=torch.Generator().manual_seed(0))  # [rows, valid tokens, features]
        model = torch.nn.Sequential(*[Scale(1.0) for _ in range(3)])
        model[1].factor = scale_layer1
        probe = Probe("toy", (TapRule(r"(?P<layer>\d+)", stack="blk", component="out", layout="tok"),))
        if packed:  # [1, 6, 4]: the valid tokens only
            slots = np.arange(6, dtype=np.int64).reshape(1, 6)
            x = values.reshape(1, 6, 4)
        else:  # [2, 4, 4]: each row padded with one junk token in front
            slots = np.array([[-1, 0, 1, 2], [-1, 3, 4, 5]], dtype=np.int64)
            x = torch.cat([torch.full((2, 1, 4), 99.0), values], dim=1)
        if nan_at is not None:
            model[nan_at].nan = True
        self.layout = Layout(slots=slots, length=3)
        self.backend = Backend("toy", model, probe, run=lambda: model(x), layouts=lambda: {"tok": self.layout},
                               meta={"backend": "toy_packed" if packed else "toy", "dtype": "float32"})


class Scale(torch.nn.Module):
    def __init__(self, factor):
        super().__init__()
        self.factor, self.nan = factor, False

    def forward(self, h):
        out = h * self.factor
        if self.nan:
            out = out.clone()
            out[0, -1, 0] = float("nan")
        return out


def stats_of(toy: ToyBackend, **kw) -> StatsCapture:
    sink = StatsSink(meta=dict(toy.backend.meta), **kw)
    capture(toy.backend, sink)
    return sink.finish()


def test_padded_and_packed_runs_of_equal_values_have_equal_summaries_and_checksums():
    ref, cand = stats_of(ToyBackend(packed=False)), stats_of(ToyBackend(packed=True))
    assert [t.key for t in ref.taps] == ["blk.0.out", "blk.1.out", "blk.2.out"]
    for a, b in zip(ref.taps, cand.taps):
        assert a.shape == (2, 4, 4) and b.shape == (1, 6, 4)
        assert a.summarised_shape == b.summarised_shape == (6, 4) and a.tokens == b.tokens == "valid"
        assert a.checksum == b.checksum and np.array_equal(a.values, b.values)
        assert a["max"] < 99  # the padding junk was never summarised
    report = diff_stats(ref, cand)
    assert report and report.identical_count() == 3 and report.first_bit_difference is None


def test_results_are_fetched_in_batches_not_per_tap():
    batched_sink = StatsSink(fetch_every=2, batch_elements=BLOCK)  # one tap per batch
    capture(ToyBackend(packed=False).backend, batched_sink)
    batched = batched_sink.finish()
    assert batched_sink.fetches == 2  # 3 taps: the first 2 summarised during the run, the last at the end
    whole_sink = StatsSink(fetch_every=1000)
    capture(ToyBackend(packed=False).backend, whole_sink)
    whole = whole_sink.finish()
    assert whole_sink.fetches == 1
    assert [t.checksum for t in batched.taps] == [t.checksum for t in whole.taps]


def test_the_sink_never_takes_host_copies():
    with pytest.raises(TypeError, match="device tensors"):
        StatsSink().add_tap(object())


# --------------------------------------------------------------------------- the stats diff

def test_stats_diff_localises_a_planted_scale_and_names_the_taps_to_capture():
    ref, cand = stats_of(ToyBackend(packed=False)), stats_of(ToyBackend(packed=True, scale_layer1=1.2))
    report = diff_stats(ref, cand)
    assert not report
    first = report.first_divergence
    assert first.key == "blk.1.out" and first.status == "fail" and "rel_norm +0.2" in first.reason
    assert report.first_bit_difference.key == "blk.1.out"
    assert report.rows[0].identical and report.rows[0].passed
    assert report.suggested_taps() == ["blk.1.*", "blk.0.*"]
    d = report.to_dict()
    assert d["format"] == "parity-stats-report" and d["first_divergence"]["tap"] == "blk.1.out"
    assert d["suggested"]["taps"] == "blk.1.*,blk.0.*"
    assert any("--taps 'blk.1.*,blk.0.*'" in c and "--ref toy " in c for c in d["suggested"]["commands"])
    json.dumps(d, allow_nan=False)  # strict JSON
    # a small drift within tolerance passes, but is not bit-identical
    near = diff_stats(ref, stats_of(ToyBackend(packed=True, scale_layer1=1.01)))
    assert near and near.identical_count() == 1 and near.first_bit_difference.key == "blk.1.out"
    # a tolerance per tap pattern
    assert diff_stats(ref, cand, tolerances(0.05, ["blk.*=0.5"]))


def test_stats_diff_fails_nan_shape_dtype_and_missing_taps():
    ref = stats_of(ToyBackend(packed=False))
    nan = diff_stats(ref, stats_of(ToyBackend(packed=True, nan_at=2)))
    assert nan.first_divergence.key == "blk.2.out" and nan.first_divergence.status == "nonfinite"
    assert "cand NaN 1" in nan.first_divergence.reason
    from dataclasses import replace
    cand = stats_of(ToyBackend(packed=True))
    cand.taps[0] = replace(cand.taps[0], summarised_shape=(5, 4))
    cand.taps[1] = replace(cand.taps[1], dtype="bfloat16")
    del cand.taps[2]
    report = diff_stats(ref, cand)
    assert [r.status for r in report.rows] == ["shape", "dtype", "missing"] and not report
    assert report.problems


@pytest.mark.parametrize("specs, needle", [(["x=2"], "outside (0, 1]"), (["=0.1"], "GLOB=TOL")])
def test_bad_tolerances_are_refused(specs, needle):
    with pytest.raises(ValueError, match=needle.replace("(", r"\(").replace(")", r"\)")):
        tolerances(0.05, specs)


# --------------------------------------------------------------------------- the stats dump

def assert_same_stats(got: StatsCapture, want: StatsCapture) -> None:
    assert got.meta == want.meta and got.complete == want.complete and got.error == want.error
    assert len(got.taps) == len(want.taps)
    for a, b in zip(got.taps, want.taps):
        assert (a.info, a.order, a.dtype, a.layout, a.shape, a.summarised_shape, a.tokens, a.positions, a.checksum) \
            == (b.info, b.order, b.dtype, b.layout, b.shape, b.summarised_shape, b.tokens, b.positions, b.checksum)
        assert a.values.tobytes() == b.values.tobytes()


def test_stats_dump_round_trips_bit_exactly(tmp_path):
    stats = stats_of(ToyBackend(packed=False, nan_at=1))
    path = tmp_path / "s.h5"
    write_stats(path, stats)
    assert is_stats_dump(path) and not (tmp_path / "s.h5.partial").exists()
    assert_same_stats(read_stats(path), stats)
    raised = StatsCapture(taps=stats.taps[:1], meta=stats.meta,
                          error=CaptureError("blk.1.out", TapInfo("blk.1.out", "blk", 1, "out"), "RuntimeError",
                                             "boom"))
    write_stats(tmp_path / "r.h5", raised)
    back = read_stats(tmp_path / "r.h5")
    assert_same_stats(back, raised) and not back.complete


def test_truncated_or_corrupt_stats_dump_is_one_line_exit_2(tmp_path):
    path = tmp_path / "s.h5"
    write_stats(path, stats_of(ToyBackend(packed=False)))
    data = path.read_bytes()
    with h5py.File(path, "r") as f:
        offset = f["stats/values"].id.get_offset()
    flipped = bytearray(data)
    flipped[offset + 9] ^= 0x10
    cut = tmp_path / "cut.h5"
    cut.write_bytes(data[: len(data) // 2])
    bad = tmp_path / "bad.h5"
    bad.write_bytes(bytes(flipped))
    with pytest.raises(DumpError, match="does not match its checksum"):
        read_stats(bad)
    for broken in (bad, cut):
        for args in (("diff", broken, path), ("inspect", broken)):
            code, out = cli(*args)
            assert code == 2, out
            one_line_error(out)


def test_unknown_stats_version_is_refused(tmp_path):
    path = tmp_path / "s.h5"
    write_stats(path, stats_of(ToyBackend(packed=False)))
    with h5py.File(path, "r+") as f:
        f.attrs["format_version"] = 2
    with pytest.raises(DumpError, match="format_version 2 is not supported"):
        read_stats(path)


def test_tensor_readers_refuse_a_stats_dump_and_say_what_to_do(tmp_path):
    from parity.api import load_dump
    from parity.comparison.dumps import diff_dumps
    from parity.errors import InputError

    stats_path, tensor_path = tmp_path / "s.h5", tmp_path / "t.h5"
    write_stats(stats_path, stats_of(ToyBackend(packed=False)))
    assert cli("capture", "--backend", "pytorch", "--taps", "vision.embed", "-o", tensor_path)[0] == 0
    for call in (lambda: load_dump(stats_path), lambda: diff_dumps(stats_path, stats_path)):
        with pytest.raises(InputError, match=r"stats dump \(per-tap summaries, no tensors\).*parity diff"):
            call()
    with pytest.raises(DumpError, match="tensor dump, not a stats dump"):
        read_stats(tensor_path)
    code, out = cli("diff", tensor_path, stats_path)
    assert code == 2 and "a stats dump and" in one_line_error(out)
    code, out = cli("report", stats_path)
    assert code == 2 and "is a stats dump" in one_line_error(out)
    code, out = cli("inspect", stats_path)
    assert code == 0 and "stats dump (per-tap summaries, no tensors)" in out and "blk.1.out" in out


# --------------------------------------------------------------------------- end to end, pi0.5 tiny

def test_stats_diff_flags_nomask_where_the_tensor_diff_does(tmp_path):
    ref, cand, result = tmp_path / "ref.h5", tmp_path / "cand.h5", tmp_path / "sd.json"
    assert cli("capture", "--backend", "pytorch", "--stats", "-o", ref)[0] == 0
    code, out = cli("capture", "--backend", "flash_fp8", "--inject", "nomask", "--stats", "-o", cand)
    assert code == 0 and "wrote summaries of 413 taps" in out
    code, out = cli("diff", ref, cand, "--json", result)
    assert code == 1 and "FIRST DIVERGENCE (stats): prefix.0.attn" in out
    assert "CAPTURE IN FULL: --taps 'prefix.0.*,prefix.embed'" in out
    d = json.loads(result.read_text())
    assert d["first_divergence"]["tap"] == "prefix.0.attn" and d["first_bit_difference"]["tap"] == "prefix.0.attn"
    assert d["identical"] == 39  # vision and prefix.0's q/k/v are bit-identical
    command = d["suggested"]["commands"][0]
    assert command.startswith("parity diff --ref pytorch --cand flash_fp8 --inject nomask")
    # the suggested full diff runs as printed and finds the same first divergence
    args = command.split()[1:]
    args[args.index("--taps") + 1] = d["suggested"]["taps"]
    code, out = cli(*args, "--no-isolate")
    assert code == 1 and "FIRST DIVERGENCE: prefix.0.attn" in out and "still matching just before it" in out
    code, out = cli("diff", "--ref", "pytorch", "--cand", "flash_fp8", "--inject", "nomask", "--no-isolate")
    assert "FIRST DIVERGENCE: prefix.0.attn" in out
    # --taps-from: full captures of just the suggested taps, diffed offline
    focus_ref, focus_cand = tmp_path / "focus_ref.h5", tmp_path / "focus_cand.h5"
    code, out = cli("capture", "--backend", "pytorch", "--taps-from", result, "-o", focus_ref)
    assert code == 0 and "wrote 9 taps" in out  # prefix.embed and prefix.0's eight components
    code, _ = cli("capture", "--backend", "flash_fp8", "--inject", "nomask", "--taps-from", result, "-o", focus_cand)
    assert code == 0
    code, out = cli("diff", focus_ref, focus_cand)
    assert code == 1 and "FIRST DIVERGENCE: prefix.0.attn" in out


@pytest.mark.parametrize("fault", ["rope_base", "mid_norm"])
def test_the_tensor_diffs_first_divergence_lies_between_the_stats_bounds(fault):
    """first bit difference <= the tensor diff's first divergence <= the stats diff's, in
    execution order, and the suggested taps cover the tensor diff's first divergence."""
    from parity.api import diff_live, diff_stats_live
    from parity.taps.backends import BackendOptions
    from parity.taps.probe import tap_filter

    stats = diff_stats_live("pytorch", "flash", BackendOptions(), (fault,))
    full = diff_live("pytorch", "flash", BackendOptions(), (fault,), isolate=False)
    order = {r.key: r.order for r in full.rows}
    tensor_first = full.first_divergence
    assert order[stats.first_bit_difference.key] <= tensor_first.order <= order[stats.first_divergence.key]
    assert tap_filter(stats.suggested_taps())(tensor_first.info.name, tensor_first.key)


def test_live_stats_diff_of_flash_passes():
    code, out = cli("diff", "--ref", "pytorch", "--cand", "flash", "--stats")
    assert code == 0 and "PASS: all 413 taps' summaries within tolerance 0.05" in out


@pytest.mark.parametrize("args, needle", [
    (("diff", "--ref", "pytorch", "--cand", "flash", "--stats", "--min-cos", "0.9"), "--min-cos applies to tensor"),
    (("diff", "--ref", "pytorch", "--cand", "flash", "--stats", "--stats-tol", "2"), "outside (0, 1]"),
    (("diff", "--ref", "pytorch", "--stats"), "needs both --ref and --cand"),
    (("diff", "--ref", "pytorch", "--cand", "flash", "--stats", "--stop-at-first"), "--stop-at-first applies to"),
    (("diff", "a.h5", "b.h5", "--stats-tol", "abc"), "expected VALUE or GLOB=VALUE"),
    (("capture", "--backend", "pytorch", "--stats", "--compression", "gzip"), "--compression applies to tensor"),
    (("capture", "--backend", "pytorch", "--taps-from", "pyproject.toml"), "is not JSON"),
    (("capture", "--backend", "pytorch", "--taps-from", "x.json", "--taps", "a"), "--taps or --taps-from"),
])
def test_stats_usage_errors_exit_2_with_one_line(args, needle):
    code, out = cli(*args)
    assert code == 2 and needle in one_line_error(out)


def test_offline_stats_diff_needs_no_torch(tmp_path):
    path = tmp_path / "s.h5"
    write_stats(path, stats_of(ToyBackend(packed=False)))
    script = ("import sys; sys.modules['torch'] = None\n"
              "from typer.testing import CliRunner\nfrom parity.cli import app\n"
              f"r = CliRunner().invoke(app, ['diff', {str(path)!r}, {str(path)!r}])\n"
              "assert r.exit_code == 0, r.output\n"
              f"r = CliRunner().invoke(app, ['inspect', {str(path)!r}]); assert r.exit_code == 0, r.output\n")
    proc = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr + proc.stdout


def test_docs_stats_section_shows_the_measured_verdict():
    """The stats section shows the verdict the planted nomask bug gets (its commands are
    run, and every shown line checked against the real output, by tests/test_docs.py)."""
    from pathlib import Path

    text = (Path(__file__).resolve().parents[2] / "docs" / "commands.md").read_text()
    start = text.index("## Stats scans")
    section = text[start:text.index("\n## ", start + 1)]
    assert "$ parity diff --ref pytorch --cand flash_fp8 --inject nomask --stats" in section
    code, out = cli("diff", "--ref", "pytorch", "--cand", "flash_fp8", "--inject", "nomask", "--stats")
    assert code == 1
    for needle in ("FIRST DIVERGENCE (stats): prefix.0.attn", "bits first differ at prefix.0.attn",
                   "(39 of 413 taps in all)", "CAPTURE IN FULL: --taps 'prefix.0.*,prefix.embed'",
                   "fail: rel_norm +0.149, rel_std +0.145 beyond 0.05"):
        assert needle in section and needle in out, needle


def test_a_candidate_that_raised_fails_the_stats_diff_at_the_raising_tap(tmp_path):
    ref, cand = tmp_path / "ref.h5", tmp_path / "cand.h5"
    assert cli("capture", "--backend", "pytorch", "--stats", "-o", ref)[0] == 0
    code, out = cli("capture", "--backend", "flash", "--inject", "dtype", "--stats", "-o", cand)
    assert code == 1 and "backend raised at prefix.0.mlp" in out
    code, out = cli("diff", ref, cand)
    assert code == 2 and "capture is incomplete" in one_line_error(out)
    code, out = cli("diff", ref, cand, "--allow-incomplete", "--json", tmp_path / "r.json")
    assert code == 1 and "FIRST DIVERGENCE (stats): prefix.0.mlp" in out and "raised" in out
    d = json.loads((tmp_path / "r.json").read_text())
    assert d["counts"]["raised"] == 1 and d["counts"]["not_reached"] > 0 and d["taps"][-1]["ref"] is not None
