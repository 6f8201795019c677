"""Storage codec: how captured tensors of every dtype are held as plain numpy arrays.

numpy has no bfloat16 or float8 types, and the dump reader and diff engine must work
without torch.  So those dtypes travel as their raw bit patterns (bfloat16 in uint16,
float8 in uint8) and are decoded here, exactly, from the format definitions.  Every
other dtype is stored natively.  Keeping the raw bits (rather than converting to float32
at capture time) makes a dump bit-exact: two captures can be told to be identical, not
merely close.
"""

from __future__ import annotations

from collections.abc import Mapping
from types import MappingProxyType

import numpy as np

# Original dtype name (torch name without "torch.") -> numpy storage dtype.
# A read-only mapping: nothing may register dtypes at run time.
STORAGE_DTYPES: Mapping[str, np.dtype] = MappingProxyType(
    {
        "float32": np.dtype(np.float32),
        "float64": np.dtype(np.float64),
        "float16": np.dtype(np.float16),
        "bfloat16": np.dtype(np.uint16),
        "float8_e4m3fn": np.dtype(np.uint8),
        "float8_e5m2": np.dtype(np.uint8),
        "int64": np.dtype(np.int64),
        "int32": np.dtype(np.int32),
        "int16": np.dtype(np.int16),
        "int8": np.dtype(np.int8),
        "uint8": np.dtype(np.uint8),
        "uint16": np.dtype(np.uint16),
        "uint32": np.dtype(np.uint32),
        "uint64": np.dtype(np.uint64),
        "bool": np.dtype(np.bool_),
    }
)


FLOAT_DTYPES = frozenset({"float32", "float64", "float16", "bfloat16", "float8_e4m3fn", "float8_e5m2"})


def _fp8_table(exp_bits: int, man_bits: int, bias: int, ieee_specials: bool) -> np.ndarray:
    """Exact float64 value of each of the 256 bit patterns of an 8-bit float format.

    ieee_specials=True (e5m2): an all-ones exponent means inf (mantissa 0) or NaN.
    ieee_specials=False (e4m3fn, "finite"): there is no inf; only exponent and mantissa
    all ones (0x7F, 0xFF) is NaN, every other pattern is a finite number.
    """
    table = np.empty(256, dtype=np.float64)
    exp_max = (1 << exp_bits) - 1
    man_max = (1 << man_bits) - 1
    for bits in range(256):
        sign = -1.0 if bits & 0x80 else 1.0
        exp = (bits >> man_bits) & exp_max
        man = bits & man_max
        if ieee_specials and exp == exp_max:
            value = sign * np.inf if man == 0 else np.nan
        elif not ieee_specials and exp == exp_max and man == man_max:
            value = np.nan
        elif exp == 0:  # subnormal (and signed zero)
            value = sign * np.ldexp(float(man), 1 - bias - man_bits)
        else:
            value = sign * np.ldexp(float((1 << man_bits) | man), exp - bias - man_bits)
        table[bits] = value
    table.setflags(write=False)
    return table


_E4M3FN = _fp8_table(exp_bits=4, man_bits=3, bias=7, ieee_specials=False)


_E5M2 = _fp8_table(exp_bits=5, man_bits=2, bias=15, ieee_specials=True)


def fp8_table(dtype: str) -> np.ndarray:
    """The read-only float64 value of each of the 256 bit patterns of a float8 dtype."""
    return {"float8_e4m3fn": _E4M3FN, "float8_e5m2": _E5M2}[dtype]


def storage_dtype(dtype: str) -> np.dtype:
    """The numpy storage dtype of an original dtype name; ValueError if unknown."""
    try:
        return STORAGE_DTYPES[dtype]
    except (KeyError, TypeError):
        known = ", ".join(STORAGE_DTYPES)
        raise ValueError(f"unknown dtype {dtype!r} (known: {known})") from None


def check_storage(array: np.ndarray, dtype: str) -> None:
    """ValueError unless `array` is held in the storage dtype of `dtype`.

    Byte order must be native too: a big-endian float32 is a different representation
    and would silently break bit-exact comparison of raw buffers.
    """
    want = storage_dtype(dtype)
    if not isinstance(array, np.ndarray):
        raise ValueError(f"expected a numpy array for dtype {dtype!r}, got {type(array).__name__}")
    if array.dtype != want:
        raise ValueError(
            f"dtype {dtype!r} is stored as numpy {want}, but the array is numpy {array.dtype}"
        )


def to_float64(array: np.ndarray, dtype: str) -> np.ndarray:
    """Decode a storage array of original dtype `dtype` to float64, exactly.

    Every value of every supported float format is representable in float64, so this is
    lossless for floats (NaN payloads aside).  Integers above 2**53 round, bool -> 0/1.
    Raises ValueError for an unknown dtype name or an array not in its storage dtype.
    """
    check_storage(array, dtype)
    if dtype == "bfloat16":
        # bfloat16 is the top half of a float32: shift the bits back into place.
        as_f32 = (array.astype(np.uint32) << np.uint32(16)).view(np.float32)
        with np.errstate(invalid="ignore"):  # signalling-NaN patterns warn on the cast
            return as_f32.astype(np.float64)
    if dtype in ("float8_e4m3fn", "float8_e5m2"):
        table = _E4M3FN if dtype == "float8_e4m3fn" else _E5M2
        # reshape: indexing with a 0-d array would give a numpy scalar, not an array
        return table[array.reshape(-1)].reshape(array.shape)
    with np.errstate(invalid="ignore"):  # signalling NaNs of float16/32 warn on the cast, as above
        return array.astype(np.float64)
