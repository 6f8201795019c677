"""Metrics agree with a plain float64 formula, chunking changes nothing, edge cases are defined."""
from __future__ import annotations

import dataclasses
import math

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from parity.comparison.metrics import MetricAccumulator, Metrics, compare


def reference_metrics(ref: np.ndarray, cand: np.ndarray) -> dict:
    """The textbook formulas, in float64, over elements finite on both sides."""
    r = ref.astype(np.float64).ravel()
    c = cand.astype(np.float64).ravel()
    ok = np.isfinite(r) & np.isfinite(c)
    r, c = r[ok], c[ok]
    d = np.abs(c - r)
    with np.errstate(divide="ignore", invalid="ignore"):
        return _formulas(r, c, d, ok)


def _formulas(r, c, d, ok) -> dict:
    return {
        "cos": float(np.dot(r, c) / (np.linalg.norm(r) * np.linalg.norm(c))),
        "max_abs": float(d.max()),
        "mean_abs": float(d.mean()),
        "rel_l2": float(np.linalg.norm(c - r) / np.linalg.norm(r)),
        "max_abs_index": int(np.flatnonzero(ok)[np.argmax(d)]),
    }


def chunked(ref: np.ndarray, cand: np.ndarray, rows: int) -> Metrics:
    acc = MetricAccumulator()
    for start in range(0, ref.shape[0], rows):
        acc.update(ref[start : start + rows], cand[start : start + rows])
    return acc.result()


def assert_close(a: float, b: float, rtol: float = 1e-12) -> None:
    assert math.isclose(a, b, rel_tol=rtol, abs_tol=1e-300), (a, b)


@pytest.mark.parametrize("shape", [(1,), (7,), (64, 33), (5, 3, 17), (300, 8)])
@pytest.mark.parametrize("dtype", [np.float16, np.float32, np.float64])
def test_matches_reference_formula(shape, dtype):
    rng = np.random.default_rng(hash((shape, np.dtype(dtype).name)) % 2**32)
    ref = rng.standard_normal(shape).astype(dtype)
    cand = (ref + 0.05 * rng.standard_normal(shape)).astype(dtype)
    m = compare(ref, cand)
    want = reference_metrics(ref, cand)
    assert m.n == ref.size
    for k in ("cos", "max_abs", "mean_abs", "rel_l2"):
        assert_close(getattr(m, k), want[k])
    assert m.max_abs_index == want["max_abs_index"]
    assert m.finite and m.first_nonfinite is None


@pytest.mark.parametrize("rows", [1, 2, 3, 7, 50, 1000])
def test_chunked_equals_unchunked(rows):
    rng = np.random.default_rng(rows)
    ref = rng.standard_normal((97, 13)) * 10.0 ** rng.integers(-5, 5, size=(97, 1))
    cand = ref * (1 + 1e-3 * rng.standard_normal(ref.shape))
    cand[40, 3] = np.nan
    ref[60, 0] = np.inf
    whole, parts = compare(ref, cand), chunked(ref, cand, rows)
    for k in ("cos", "max_abs", "mean_abs", "rel_l2"):
        assert_close(getattr(parts, k), getattr(whole, k))
    for k in ("n", "nan_ref", "inf_ref", "nan_cand", "inf_cand", "first_nonfinite", "max_abs_index"):
        assert getattr(parts, k) == getattr(whole, k)
    want = reference_metrics(ref, cand)
    for k in ("cos", "max_abs", "mean_abs", "rel_l2"):
        assert_close(getattr(whole, k), want[k])


@settings(max_examples=200, deadline=None)
@given(
    st.lists(
        st.tuples(st.floats(-1e6, 1e6, width=32), st.floats(-1e6, 1e6, width=32)),
        min_size=1,
        max_size=60,
    ),
    st.integers(1, 10),
)
def test_property_chunked_matches_reference(pairs, rows):
    ref = np.array([p[0] for p in pairs], dtype=np.float32)
    cand = np.array([p[1] for p in pairs], dtype=np.float32)
    m = chunked(ref, cand, rows)
    assert -1.0 <= m.cos <= 1.0
    r64, c64 = ref.astype(np.float64), cand.astype(np.float64)
    assert m.max_abs == np.abs(c64 - r64).max()
    if np.any(r64) and np.any(c64):
        assert_close(m.cos, reference_metrics(ref, cand)["cos"], rtol=1e-9)
    if np.any(r64):
        assert_close(m.rel_l2, reference_metrics(ref, cand)["rel_l2"], rtol=1e-9)


def test_identical_is_exact():
    x = np.random.default_rng(0).standard_normal(1000).astype(np.float32)
    m = compare(x, x.copy())
    assert m.cos == 1.0 and m.max_abs == 0.0 and m.mean_abs == 0.0 and m.rel_l2 == 0.0
    assert m.max_abs_index == 0


def test_both_zero():
    m = compare(np.zeros(5), np.zeros(5))
    assert m.cos == 1.0 and m.rel_l2 == 0.0 and m.max_abs == 0.0 and m.mean_abs == 0.0


def test_one_side_zero():
    x = np.arange(1.0, 6.0)
    m = compare(np.zeros(5), x)
    assert m.cos == 0.0 and m.rel_l2 == math.inf and m.max_abs == 5.0 and m.max_abs_index == 4
    m = compare(x, np.zeros(5))
    assert m.cos == 0.0 and m.rel_l2 == 1.0


def test_cos_is_clamped_and_signed():
    rng = np.random.default_rng(5)
    for _ in range(50):  # rounding could push |cos| a hair above 1
        x = rng.standard_normal(rng.integers(1, 5000))
        y = x * rng.uniform(0.1, 10)
        assert -1.0 <= compare(x, y).cos <= 1.0 and math.isclose(compare(x, y).cos, 1.0)
        assert compare(x, -y).cos >= -1.0
    x = np.full(10_000, 0.1)
    assert compare(x, -x).cos == -1.0


def test_empty_gives_nan():
    m = compare(np.zeros((0, 4)), np.zeros((0, 4)))
    assert m.n == 0 and math.isnan(m.cos) and math.isnan(m.rel_l2) and math.isnan(m.max_abs)
    assert m.max_abs_index is None and m.first_nonfinite is None and m.finite
    assert math.isnan(MetricAccumulator().result().cos)


def test_nothing_finite_on_both_sides_gives_nan():
    m = compare(np.array([np.nan, 1.0]), np.array([1.0, np.inf]))
    assert m.n == 2 and math.isnan(m.cos) and m.max_abs_index is None and not m.finite
    assert (m.nan_ref, m.inf_ref, m.nan_cand, m.inf_cand) == (1, 0, 0, 1)
    assert m.first_nonfinite == 0


def test_nonfinite_counted_per_side_and_excluded_from_stats():
    ref = np.array([1.0, 2.0, np.nan, 4.0, -np.inf, 6.0])
    cand = np.array([1.0, 2.5, 3.0, np.inf, -np.inf, np.nan])
    m = compare(ref, cand)
    assert (m.nan_ref, m.inf_ref, m.nan_cand, m.inf_cand) == (1, 1, 1, 2)
    assert m.first_nonfinite == 2 and not m.finite
    assert m.max_abs == 0.5 and m.max_abs_index == 1 and m.mean_abs == 0.25


def test_first_nonfinite_across_chunks():
    ref = np.ones((4, 3))
    cand = np.ones((4, 3))
    cand[2, 1] = np.nan
    cand[3, 0] = np.inf
    m = chunked(ref, cand, 1)
    assert m.first_nonfinite == 7 and m.nan_cand == 1 and m.inf_cand == 1


def test_max_abs_index_first_occurrence_across_chunks():
    ref = np.zeros((3, 2))
    cand = np.array([[0.0, 1.0], [0.0, 2.0], [2.0, 0.0]])
    assert chunked(ref, cand, 1).max_abs_index == 3
    assert compare(ref, cand).max_abs_index == 3


@pytest.mark.parametrize("scale", [1e38, 65504.0 * 1e3, 1e150, 1e300, 1.7e308])
def test_huge_values_do_not_overflow(scale):
    rng = np.random.default_rng(1)
    x = rng.standard_normal(10_000)
    noise = 1e-3 * rng.standard_normal(x.shape)
    with np.errstate(over="ignore"):
        ref, cand = x * scale, (x + noise) * scale
        ref = np.clip(ref, -1.7e308, 1.7e308)
        cand = np.clip(cand, -1.7e308, 1.7e308)
    m = compare(ref, cand)
    assert m.finite and math.isfinite(m.cos) and math.isfinite(m.rel_l2) and math.isfinite(m.mean_abs)
    assert 0.999 < m.cos <= 1.0
    assert 5e-4 < m.rel_l2 < 2e-3
    # and chunking over very different magnitudes gives the same answer
    parts = chunked(np.concatenate([ref, x]), np.concatenate([cand, x]), 333)
    assert_close(parts.cos, compare(np.concatenate([ref, x]), np.concatenate([cand, x])).cos)


def test_difference_beyond_float64_range():
    m = compare(np.array([-1.5e308, 1.0]), np.array([1.5e308, 1.0]))
    assert m.max_abs == math.inf and m.max_abs_index == 0  # the true difference is 3e308
    assert m.cos == -1.0 or math.isclose(m.cos, -1.0)
    assert_close(m.rel_l2, 2.0)


def test_denormals():
    tiny = np.array([5e-324, 1e-310, -2e-315, 3e-320])
    m = compare(tiny, tiny * 2)
    assert m.cos == 1.0 and m.finite
    assert_close(m.rel_l2, 1.0, rtol=1e-6)  # subnormals carry few significant bits
    assert m.max_abs == 1e-310
    m = compare(np.array([5e-324]), np.array([0.0]))
    assert m.max_abs == 5e-324 and m.cos == 0.0 and m.rel_l2 == 1.0


def test_mixed_magnitudes_in_separate_chunks():
    ref = np.array([1e-300, 2e-300, 1e10, -1e10])
    cand = np.array([1e-300, 3e-300, 1e10, -1e10])
    m = chunked(ref, cand, 2)
    assert m.cos == 1.0 and math.isclose(m.max_abs, 1e-300) and m.max_abs_index == 1
    assert_close(m.rel_l2, float(np.float64(1e-300) / np.sqrt(2e20)), rtol=1e-6)  # tiny, not lost


def test_bad_arguments():
    with pytest.raises(ValueError, match="shape"):
        compare(np.zeros(3), np.zeros(4))
    with pytest.raises(ValueError, match="numeric"):
        compare(np.zeros(2, np.complex64), np.zeros(2, np.complex64))


def test_integer_and_bool_inputs_upcast():
    m = compare(np.array([1, 2, 3], np.int8), np.array([1, 2, 4], np.int64))
    assert m.max_abs == 1.0
    assert compare(np.array([True, False]), np.array([True, False])).cos == 1.0


def test_to_dict_and_finite():
    m = compare(np.array([1.0, 2.0]), np.array([1.0, 2.0]))
    d = m.to_dict()
    assert d["n"] == 2 and d["cos"] == 1.0 and d["finite"] is True
    assert set(d) >= {"n", "cos", "max_abs", "mean_abs", "rel_l2", "nan_ref", "inf_ref", "nan_cand",
                      "inf_cand", "first_nonfinite", "max_abs_index"}
    with pytest.raises(dataclasses.FrozenInstanceError):
        m.n = 3  # frozen
