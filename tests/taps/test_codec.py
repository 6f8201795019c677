"""The storage codec decodes every bit pattern exactly (checked against torch when present)."""
from __future__ import annotations

import importlib.util

import numpy as np
import pytest

from parity.taps.codec import STORAGE_DTYPES, check_storage, storage_dtype, to_float64

HAVE_TORCH = importlib.util.find_spec("torch") is not None


def test_storage_dtypes_cover_the_documented_names():
    assert set(STORAGE_DTYPES) == {
        "float32", "float64", "float16", "bfloat16", "float8_e4m3fn", "float8_e5m2",
        "int64", "int32", "int16", "int8", "uint8", "uint16", "uint32", "uint64", "bool",
    }
    assert STORAGE_DTYPES["bfloat16"] == np.uint16
    assert STORAGE_DTYPES["float8_e4m3fn"] == np.uint8
    assert STORAGE_DTYPES["float8_e5m2"] == np.uint8
    assert STORAGE_DTYPES["bool"] == np.bool_
    with pytest.raises(TypeError):
        STORAGE_DTYPES["float4"] = np.dtype(np.uint8)  # read-only: no module-level mutable state


@pytest.mark.parametrize(
    "bits, value",
    [
        (0x00, 0.0), (0x80, -0.0), (0x38, 1.0), (0xB8, -1.0), (0x7E, 448.0), (0xFE, -448.0),
        (0x01, 2.0**-9), (0x07, 7 * 2.0**-9), (0x08, 2.0**-6), (0x40, 2.0), (0x3C, 1.5),
    ],
)
def test_e4m3fn_known_values(bits, value):
    out = to_float64(np.array([bits], dtype=np.uint8), "float8_e4m3fn")
    assert out.dtype == np.float64
    assert out[0] == value and np.signbit(out[0]) == np.signbit(value)


def test_e4m3fn_nan_and_no_inf():
    out = to_float64(np.arange(256, dtype=np.uint8), "float8_e4m3fn")
    assert np.flatnonzero(np.isnan(out)).tolist() == [0x7F, 0xFF]
    assert not np.isinf(out).any()
    assert np.nanmax(out) == 448.0


@pytest.mark.parametrize(
    "bits, value",
    [
        (0x00, 0.0), (0x3C, 1.0), (0xBC, -1.0), (0x7B, 57344.0), (0x01, 2.0**-16),
        (0x04, 2.0**-14), (0x7C, np.inf), (0xFC, -np.inf),
    ],
)
def test_e5m2_known_values(bits, value):
    assert to_float64(np.array([bits], dtype=np.uint8), "float8_e5m2")[0] == value


def test_e5m2_nans():
    out = to_float64(np.arange(256, dtype=np.uint8), "float8_e5m2")
    assert np.flatnonzero(np.isnan(out)).tolist() == [0x7D, 0x7E, 0x7F, 0xFD, 0xFE, 0xFF]


@pytest.mark.parametrize(
    "bits, value",
    [(0x3F80, 1.0), (0xBF80, -1.0), (0x4049, 3.140625), (0x7F80, np.inf), (0xFF80, -np.inf),
     (0x0001, 2.0**-133), (0x7F7F, 3.3895313892515355e38), (0x0000, 0.0)],
)
def test_bf16_known_values(bits, value):
    assert to_float64(np.array([bits], dtype=np.uint16), "bfloat16")[0] == value


def test_bf16_nan():
    assert np.isnan(to_float64(np.array([0x7FC0, 0x7F81, 0xFFC1], dtype=np.uint16), "bfloat16")).all()


def test_native_dtypes_decode_by_value():
    assert to_float64(np.array([1.5, -2.0], np.float16), "float16").tolist() == [1.5, -2.0]
    assert to_float64(np.array([True, False]), "bool").tolist() == [1.0, 0.0]
    assert to_float64(np.array([-3], np.int8), "int8").tolist() == [-3.0]
    x = np.float32(1) / np.float32(3)
    assert to_float64(np.array([x]), "float32")[0] == float(x)


def test_shape_is_kept_including_0d():
    a = np.arange(24, dtype=np.uint8).reshape(2, 3, 4)
    assert to_float64(a, "float8_e5m2").shape == (2, 3, 4)
    out = to_float64(np.array(0x38, dtype=np.uint8), "float8_e4m3fn")
    assert isinstance(out, np.ndarray) and out.shape == () and out == 1.0
    assert to_float64(np.array(0x3F80, dtype=np.uint16), "bfloat16").shape == ()


def test_bad_arguments_raise_value_error():
    with pytest.raises(ValueError, match="unknown dtype"):
        to_float64(np.zeros(2, np.float32), "torch.float32")
    with pytest.raises(ValueError, match="unknown dtype"):
        storage_dtype("complex64")
    with pytest.raises(ValueError, match="stored as"):
        to_float64(np.zeros(2, np.float32), "bfloat16")
    with pytest.raises(ValueError, match="stored as"):
        to_float64(np.zeros(2, np.uint16), "float8_e4m3fn")
    with pytest.raises(ValueError, match="stored as"):
        check_storage(np.zeros(2, ">f4"), "float32")  # non-native byte order
    with pytest.raises(ValueError):
        check_storage([1.0], "float64")


@pytest.mark.skipif(not HAVE_TORCH, reason="torch not installed")
@pytest.mark.parametrize("name", ["float8_e4m3fn", "float8_e5m2"])
def test_fp8_matches_torch_for_all_256_patterns(name):
    import torch

    bits = np.arange(256, dtype=np.uint8)
    ours = to_float64(bits, name)
    theirs = torch.from_numpy(bits).view(getattr(torch, name)).to(torch.float64).numpy()
    np.testing.assert_array_equal(ours, theirs)  # NaN == NaN here; signed zeros checked below
    num = ~np.isnan(ours)  # the sign of a NaN carries no meaning
    np.testing.assert_array_equal(np.signbit(ours[num]), np.signbit(theirs[num]))


@pytest.mark.skipif(not HAVE_TORCH, reason="torch not installed")
def test_bf16_matches_torch_for_all_65536_patterns():
    import torch

    bits = np.arange(1 << 16, dtype=np.uint32).astype(np.uint16)
    ours = to_float64(bits, "bfloat16")
    theirs = torch.from_numpy(bits.view(np.int16)).view(torch.bfloat16).to(torch.float64).numpy()
    np.testing.assert_array_equal(ours, theirs)
    num = ~np.isnan(ours)
    np.testing.assert_array_equal(np.signbit(ours[num]), np.signbit(theirs[num]))


@pytest.mark.filterwarnings("error")
@pytest.mark.parametrize("bits, dtype, view", [
    (0x7F800001, "float32", np.float32), (0xFFA00000, "float32", np.float32), (0x7C01, "float16", np.float16),
    (0x7F81, "bfloat16", None), (0x7FF0000000000001, "float64", np.float64),
])
def test_signalling_nans_decode_to_nan_without_a_warning(bits, dtype, view):
    """Found by the long fuzz run: a float32 signalling NaN warned on the cast to float64
    (an error wherever warnings are errors)."""
    from parity.taps.codec import storage_dtype

    raw = np.array([bits], dtype=np.uint64).astype(storage_dtype(dtype) if view is None else
                                                   np.dtype(f"u{np.dtype(view).itemsize}"))
    array = raw if view is None else raw.view(view)
    assert np.isnan(to_float64(array, dtype)).all()
