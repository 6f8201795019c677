"""The diff engine on hand-built captures: pairing, token alignment, judging, first divergence.

numpy only: the diff engine must work offline, without torch.
"""
from __future__ import annotations

import math

import numpy as np
import pytest

from parity.comparison.loop import diff
from parity.comparison.rules import Thresholds
from parity.taps.records import Capture, CaptureError, Layout, Tap, TapInfo

# --------------------------------------------------------------------------- helpers

def info(name: str, step: int | None = None) -> TapInfo:
    """TapInfo from a dotted name: 'stack.layer.component' or 'stack.component'."""
    parts = name.split(".")
    layer = int(parts[1]) if len(parts) == 3 else None
    return TapInfo(name=name, stack=parts[0], layer=layer, component=parts[-1], step=step)


def tap(name: str, order: int, array, *, dtype: str | None = None, layout: str | None = None,
        step: int | None = None) -> Tap:
    array = np.asarray(array)
    return Tap(info=info(name, step), order=order, array=array, dtype=dtype or array.dtype.name, layout=layout)


def cap(*taps: Tap, layouts: dict | None = None, error: CaptureError | None = None) -> Capture:
    return Capture(taps=list(taps), layouts=dict(layouts or {}), error=error)


def rand(*shape: int, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).standard_normal(shape).astype(np.float32)


def copy_capture(c: Capture) -> Capture:
    """An independent copy (fresh arrays) so that editing one side cannot touch the other."""
    taps = [Tap(t.info, t.order, t.array.copy(), t.dtype, t.layout) for t in c.taps]
    return Capture(taps=taps, layouts=dict(c.layouts), meta=dict(c.meta), error=c.error)


def with_array(c: Capture, key: str, array: np.ndarray, dtype: str | None = None) -> Capture:
    """A copy of `c` whose tap `key` holds `array` instead."""
    out = copy_capture(c)
    for i, t in enumerate(out.taps):
        if t.key == key:
            out.taps[i] = Tap(t.info, t.order, np.asarray(array), dtype or np.asarray(array).dtype.name, t.layout)
            return out
    raise KeyError(key)


def rows_by_key(report) -> dict:
    return {r.key: r for r in report.rows}


def status_of(report, key: str) -> str:
    return rows_by_key(report)[key].status


EXEC_NAMES = ["embed", "blk.0.attn", "blk.0.mlp", "blk.1.attn", "head"]  # execution order


def five_taps() -> Capture:
    return cap(*(tap(n, i, rand(2, 3, seed=i)) for i, n in enumerate(EXEC_NAMES)))


# --------------------------------------------------------------------------- basics

def test_identical_captures_pass():
    ref = cap(tap("embed", 0, rand(2, 3)), tap("blk.0.attn", 1, rand(4, seed=1)),
              tap("expert.0.mlp", 2, rand(3, seed=2), step=0), tap("expert.0.mlp", 3, rand(3, seed=3), step=1))
    report = diff(ref, copy_capture(ref))

    assert bool(report) is True
    assert report.passed
    assert report.first_divergence is None
    assert [r.status for r in report.rows] == ["pass"] * 4
    assert all(r.cos == 1.0 and r.metrics.max_abs == 0.0 for r in report.rows)

    d = report.to_dict()
    assert d["passed"] is True
    assert d["first_divergence"] is None
    assert [t["tap"] for t in d["taps"]] == ["embed", "blk.0.attn", "expert.0.mlp@0", "expert.0.mlp@1"]
    want = {"tap", "stack", "layer", "component", "step", "cos", "max_abs", "mean_abs", "rel_l2",
            "nan_ref", "nan_cand", "status"}
    for row in d["taps"]:
        assert want <= set(row)
        assert row["status"] == "pass" and row["cos"] == 1.0 and row["max_abs"] == 0.0
    blk = d["taps"][1]
    assert (blk["stack"], blk["layer"], blk["component"], blk["step"]) == ("blk", 0, "attn", None)
    assert d["taps"][3]["step"] == 1


def test_first_divergence_is_earliest_in_reference_execution_order():
    ref = five_taps()
    planted = EXEC_NAMES[2]
    a = ref.by_key()[planted].array
    cand = with_array(ref, planted, a + 0.2 * rand(*a.shape, seed=99))  # slightly off: cos ~0.98
    for later in EXEC_NAMES[3:]:  # later taps are much worse
        cand = with_array(cand, later, -ref.by_key()[later].array)
    # List order must not matter, nor the candidate's own execution order.
    perm = [3, 0, 4, 2, 1]
    ref.taps = [ref.taps[i] for i in perm]
    cand.taps = [Tap(t.info, 10 - t.order, t.array, t.dtype) for t in (cand.taps[i] for i in [1, 4, 0, 3, 2])]

    report = diff(ref, cand)

    assert not report
    assert [r.key for r in report.rows] == EXEC_NAMES
    first = report.first_divergence
    assert first.key == planted and first.status == "fail"
    assert 0.9 < first.cos < 0.999
    assert [r.status for r in report.rows] == ["pass", "pass", "fail", "fail", "fail"]
    assert report.rows[3].cos < first.cos and report.rows[4].cos < first.cos
    assert report.to_dict()["first_divergence"]["tap"] == planted


# --------------------------------------------------------------------------- token layouts

PADDED = Layout(np.array([[0, 1, -1, 3, 4, -1, 6, 7]]), length=8)
VALID_SLOTS = [0, 1, 3, 4, 6, 7]  # canonical positions that are real tokens
PACKED = Layout(np.array([VALID_SLOTS]), length=8)


def padded_vs_packed(cand_layout: Layout = PACKED):
    """Reference padded [1, 8, 4] (garbage, even NaN, on padding), candidate packed [1, 6, 4]."""
    ref_arr = rand(1, 8, 4)
    ref_arr[0, 2] = np.nan
    ref_arr[0, 5] = 1e6
    cand_arr = ref_arr[:, VALID_SLOTS].copy()
    ref = cap(tap("blk.0.k", 0, ref_arr, layout="tokens"), layouts={"tokens": PADDED})
    cand = cap(tap("blk.0.k", 0, cand_arr, layout="tokens"), layouts={"tokens": cand_layout})
    return ref, cand


def test_padded_and_packed_layouts_compare_valid_tokens_only():
    ref, cand = padded_vs_packed()
    report = diff(ref, cand)
    assert report, report.rows[0].reason
    row = report.rows[0]
    assert row.metrics.n == 6 * 4  # padding slots were not compared
    assert row.cos == 1.0 and row.metrics.max_abs == 0.0


def test_packed_layout_detects_a_perturbed_valid_token():
    ref, cand = padded_vs_packed()
    arr = cand.taps[0].array
    arr[0, 3] = -arr[0, 3]  # canonical position 4
    row = diff(ref, cand).rows[0]
    assert row.status == "fail"
    # The largest difference lies in packed slot 3 (flat index 12..15 of the gathered [6, 4]).
    assert 12 <= row.metrics.max_abs_index < 16


def test_layouts_with_different_valid_positions_are_a_layout_problem():
    ref, cand = padded_vs_packed(Layout(np.array([[0, 1, 2, 3, 6, 7]]), length=8))
    report = diff(ref, cand)
    assert not report
    assert report.rows[0].status == "layout"
    assert report.rows[0].metrics is None


def test_tensor_not_fitting_its_layout_is_a_layout_problem():
    ref, cand = padded_vs_packed()
    cand.taps[0] = tap("blk.0.k", 0, rand(1, 7, 4), layout="tokens")
    assert status_of(diff(ref, cand), "blk.0.k") == "layout"


def test_layout_against_whole_tensor_is_a_layout_problem():
    ref, cand = padded_vs_packed()
    cand.taps[0] = tap("blk.0.k", 0, cand.taps[0].array[0])  # no layout
    assert status_of(diff(ref, cand), "blk.0.k") == "layout"


def multi_row_case():
    """batch 2 x cameras 2 rows of 3 tokens each (6 canonical positions per batch element);
    the reference pads, with camera 1 of batch element 1 masked (a row of -1).  The candidate
    packs the 9 valid tokens into one row, in scrambled order."""
    B, C, T, F = 2, 2, 3, 5
    slots = np.array([[b * C * T + c * T + t for t in range(T)] for b in range(B) for c in range(C)])
    slots[3] = -1
    ref_arr = rand(B * C, T, F)
    ref_arr[3] = np.inf  # masked camera: garbage
    valid = np.flatnonzero(slots.reshape(-1) >= 0)
    scrambled = valid[np.random.default_rng(1).permutation(valid.size)]
    cand_arr = ref_arr.reshape(B * C * T, F)[scrambled][None].copy()
    cand_slots = slots.reshape(-1)[scrambled][None]
    ref = cap(tap("vision.0.out", 0, ref_arr, layout="img"), layouts={"img": Layout(slots, length=C * T)})
    cand = cap(tap("vision.0.out", 0, cand_arr, layout="img"), layouts={"img": Layout(cand_slots, length=C * T)})
    return ref, cand


def test_multi_row_layout_with_a_masked_row():
    ref, cand = multi_row_case()
    report = diff(ref, cand)
    assert report, report.rows[0].reason
    assert report.rows[0].metrics.n == 9 * 5


def test_multi_row_layout_detects_a_perturbed_token():
    ref, cand = multi_row_case()
    cand.taps[0].array[0, 4] *= -1
    assert status_of(diff(ref, cand), "vision.0.out") == "fail"


# --------------------------------------------------------------------------- per-tap problems

def test_shape_mismatch_does_not_stop_the_run():
    ref = cap(tap("a.x", 0, rand(2, 3)), tap("b.x", 1, rand(2, 3, seed=1)), tap("c.x", 2, rand(4, seed=2)))
    cand = with_array(ref, "b.x", rand(3, 2, seed=1))
    cand = with_array(cand, "c.x", ref.by_key()["c.x"].array + 1.0)
    report = diff(ref, cand)
    rows = rows_by_key(report)
    assert rows["b.x"].status == "shape"
    assert rows["b.x"].ref_shape == (2, 3) and rows["b.x"].cand_shape == (3, 2)
    assert report.first_divergence.key == "b.x"
    # later taps are still compared
    assert rows["a.x"].status == "pass"
    assert rows["c.x"].metrics is not None and rows["c.x"].metrics.max_abs == pytest.approx(1.0)


def test_dtype_mismatch_with_equal_values():
    values = np.arange(12, dtype=np.float32).reshape(3, 4) / 4  # exact in float16 too
    ref = cap(tap("a.x", 0, values))
    cand = cap(tap("a.x", 0, values.astype(np.float16)))
    report = diff(ref, cand)
    row = report.rows[0]
    assert not report
    assert row.status == "dtype"
    assert row.cos == 1.0  # the values do agree; the dtype alone fails it
    assert (row.ref_dtype, row.cand_dtype) == ("float32", "float16")


@pytest.mark.parametrize("side, kind, want", [
    ("cand", np.nan, "cand nan=3 inf=0"),
    ("ref", np.inf, "ref nan=0 inf=3"),
])
def test_nonfinite_values(side, kind, want):
    clean = rand(4, 4)
    dirty = clean.copy()
    dirty.reshape(-1)[[1, 5, 9]] = kind
    ref = cap(tap("a.x", 0, dirty if side == "ref" else clean))
    cand = cap(tap("a.x", 0, dirty if side == "cand" else clean))
    row = diff(ref, cand).rows[0]
    assert row.status == "nonfinite"
    assert want in row.reason
    assert "first at flat index 1" in row.reason


def test_missing_and_extra_taps():
    a, b, c = tap("a.x", 0, rand(3)), tap("b.x", 1, rand(3, seed=1)), tap("c.x", 1, rand(3, seed=2))
    report = diff(cap(a, b), cap(a, c))
    assert not report
    assert status_of(report, "b.x") == "missing"
    extra = rows_by_key(report)["c.x"]
    assert extra.status == "extra" and extra.order is None


@pytest.mark.parametrize("case", ["missing", "extra"])
def test_missing_or_extra_alone_fails_the_report(case):
    a, b = tap("a.x", 0, rand(3)), tap("b.x", 1, rand(3, seed=1))
    ref, cand = (cap(a, b), cap(a)) if case == "missing" else (cap(a), cap(a, b))
    report = diff(ref, cand)
    assert not report
    assert report.first_divergence.key == "b.x" and report.first_divergence.status == case


def test_candidate_error_marks_raised_and_not_reached():
    ref = five_taps()
    error = CaptureError(key=EXEC_NAMES[1], info=info(EXEC_NAMES[1]), exc_type="RuntimeError",
                         message="CUDA error: illegal memory access")
    cand = cap(copy_capture(ref).taps[0], error=error)
    report = diff(ref, cand)

    assert not report
    assert [r.status for r in report.rows] == ["pass", "raised", "not_reached", "not_reached", "not_reached"]
    first = report.first_divergence
    assert first.key == EXEC_NAMES[1] and first.status == "raised"
    assert "RuntimeError" in first.reason and "illegal memory access" in first.reason
    assert report.to_dict()["candidate_error"]["tap"] == EXEC_NAMES[1]


def test_empty_reference_fails():
    report = diff(Capture(), Capture())
    assert not report
    assert report.passed is False
    assert any("nothing was compared" in p for p in report.problems)
    assert report.to_dict()["passed"] is False


# --------------------------------------------------------------------------- thresholds

def test_threshold_glob_matches_name_or_key():
    t = Thresholds.parse(0.999, ["expert.*.mlp=0.995", "expert.*.attn@2=0.9"])
    assert t.for_tap("expert.3.mlp", "expert.3.mlp") == 0.995
    assert t.for_tap("expert.3.mlp", "expert.3.mlp@2") == 0.995
    assert t.for_tap("prefix.3.mlp", "prefix.3.mlp") == 0.999
    assert t.for_tap("expert.3.attn", "expert.3.attn@2") == 0.9
    assert t.for_tap("expert.3.attn", "expert.3.attn@1") == 0.999


def test_threshold_last_matching_pattern_wins():
    a = Thresholds.parse(0.999, ["*.mlp=0.99", "expert.*=0.98"])
    b = Thresholds.parse(0.999, ["expert.*=0.98", "*.mlp=0.99"])
    assert a.for_tap("expert.1.mlp", "expert.1.mlp") == 0.98
    assert b.for_tap("expert.1.mlp", "expert.1.mlp") == 0.99
    assert a.for_tap("prefix.1.mlp", "prefix.1.mlp") == 0.99


@pytest.mark.parametrize("spec", ["abc", "=0.9", "x=abc", "x=1.5", "0.9", "x="])
def test_bad_threshold_specs(spec):
    with pytest.raises(ValueError):
        Thresholds.parse(0.999, [spec])


def test_threshold_decides_pass_or_fail():
    theta = math.acos(0.996)
    ref = cap(tap("expert.3.mlp", 0, np.array([1.0, 0.0])))
    cand = cap(tap("expert.3.mlp", 0, np.array([math.cos(theta), math.sin(theta)])))
    loose = diff(ref, cand, Thresholds.parse(0.999, ["expert.*.mlp=0.995"]))
    strict = diff(ref, cand)
    assert loose.rows[0].cos == pytest.approx(0.996)
    assert loose and loose.rows[0].threshold == 0.995
    assert not strict and strict.rows[0].status == "fail" and strict.rows[0].threshold == 0.999


# --------------------------------------------------------------------------- storage and edge values

def bf16(*bits: int) -> np.ndarray:
    return np.array(bits, dtype=np.uint16)


def test_bf16_bits_compare_by_decoded_value():
    # 0x3F80 = 1.0, 0x4000 = 2.0, 0xC040 = -3.0; 0x0000 = +0.0 and 0x8000 = -0.0 are equal values
    # though very different integers.
    ref = cap(tap("a.x", 0, bf16(0x3F80, 0x4000, 0xC040, 0x0000), dtype="bfloat16"))
    same = cap(tap("a.x", 0, bf16(0x3F80, 0x4000, 0xC040, 0x8000), dtype="bfloat16"))
    report = diff(ref, same)
    assert report, report.rows[0].reason
    assert report.rows[0].metrics.max_abs == 0.0

    off = cap(tap("a.x", 0, bf16(0x3F80, 0x4000, 0xC040, 0x3F80), dtype="bfloat16"))  # last: 0 -> 1.0
    row = diff(ref, off).rows[0]
    assert row.metrics.max_abs == 1.0  # decoded difference, not 0x3F80 - 0x0000
    assert row.metrics.rel_l2 == pytest.approx(1.0 / math.sqrt(1 + 4 + 9))


@pytest.mark.parametrize("ref_val, cand_val, status", [(0.0, 0.0, "pass"), (0.0, 1.0, "fail"), (1.0, 0.0, "fail")])
def test_all_zero(ref_val, cand_val, status):
    ref = cap(tap("a.x", 0, np.full(5, ref_val, dtype=np.float32)))
    cand = cap(tap("a.x", 0, np.full(5, cand_val, dtype=np.float32)))
    report = diff(ref, cand)
    assert report.rows[0].status == status
    assert bool(report) is (status == "pass")


def test_unknown_layout_name_is_a_layout_failure_not_a_whole_tensor_compare():
    a = rand(1, 3, 2)
    ref = cap(tap("blk.0.attn", 0, a, layout="tokens"), layouts={"tokens": Layout(np.arange(3)[None], 3)})
    cand = cap(tap("blk.0.attn", 0, a.copy(), layout="nosuch"))
    row = diff(ref, cand).rows[0]
    assert row.status == "layout" and "nosuch" in row.reason


def test_array_that_does_not_match_its_dtype_fails_that_tap_only():
    ref = cap(tap("embed", 0, rand(4)), tap("head", 1, rand(4, seed=1)))
    cand = with_array(ref, "embed", rand(4), dtype="bfloat16")  # float32 array claiming to be bf16 bits
    report = diff(ref, cand)
    assert status_of(report, "embed") == "dtype" and "cannot decode" in rows_by_key(report)["embed"].reason
    assert status_of(report, "head") == "pass"


@pytest.mark.parametrize("raised_at", [None, EXEC_NAMES[-1]], ids=["outside-every-tap", "at-a-recorded-tap"])
def test_candidate_that_raised_never_passes_even_with_every_tap_matching(raised_at):
    """Found by the fuzzer: a candidate that raised after its last tap (or at a tap it had
    recorded) used to pass, since no tap row showed the exception."""
    ref = five_taps()
    error = CaptureError(key=raised_at, info=None, exc_type="RuntimeError", message="after the last tap")
    cand = copy_capture(ref)
    cand.set_error(error)
    report = diff(ref, cand)
    assert all(r.status == "pass" for r in report.rows)
    assert not report
    assert any(f"raised at {raised_at or 'an untapped place'}: RuntimeError: after the last tap" in p
               for p in report.problems)


@pytest.mark.parametrize("side", ["ref", "cand"])
def test_an_incomplete_capture_never_passes(side):
    ref, cand = five_taps(), five_taps()
    (ref if side == "ref" else cand).complete = False
    report = diff(ref, cand)
    assert all(r.status == "pass" for r in report.rows) and not report
    label = "reference" if side == "ref" else "candidate"
    assert f"{label} capture is incomplete (interrupted): taps after the stop were never compared" in report.problems
