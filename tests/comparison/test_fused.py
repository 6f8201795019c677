"""The fused kernel (parity/fused.py) and the numpy path give the same metrics, and both
agree with a float64 reference computed here from torch's own decoding of the stored bits:
NaN/Inf on either side, all-zero and one-side-zero taps, bf16/fp16/fp8/fp32/fp64, a
padded reference against a packed candidate, regions, per-token chunks and heads, and
float64 data beyond the kernel's exact range (recomputed through numpy)."""
from __future__ import annotations

import math
import os
import subprocess
import sys

import numpy as np
import pytest
import torch

import parity.comparison.stream
from parity.comparison.stream import diff_readers
from parity.dump.reader import open_dump
from parity.dump.writer import write_dump
from parity.taps.records import Capture, Layout, Region, Tap, TapInfo

numba = pytest.importorskip("numba")
fused = pytest.importorskip("parity.comparison.fused")

R, T, VALID, LENGTH = 2, 40, 34, 40
TORCH_DTYPES = {"bfloat16": (torch.int16, torch.bfloat16), "float16": (torch.float16, torch.float16),
                "float8_e4m3fn": (torch.uint8, torch.float8_e4m3fn), "float8_e5m2": (torch.uint8, torch.float8_e5m2),
                "float32": (torch.float32, torch.float32), "float64": (torch.float64, torch.float64)}


def _layouts() -> dict[str, Layout]:
    regions = (Region("image", 0, 16), Region("text", 16, 30))  # tokens 30..33 in no region
    padded = np.full((R, T), -1, np.int64)
    padded[:, :VALID] = np.arange(R)[:, None] * LENGTH + np.arange(VALID)
    # the candidate packs both samples into one row, sample 1 first, with holes
    canon = np.concatenate([LENGTH + np.arange(VALID), np.arange(VALID)])
    packed = np.full((1, 2 * T), -1, np.int64)
    packed[0, np.r_[0:VALID, VALID + 3:2 * VALID + 3]] = canon
    return {"padded": Layout(padded, LENGTH, regions), "packed": Layout(packed, LENGTH, regions)}


def _bits(x: np.ndarray, dtype: str) -> np.ndarray:
    """Values -> stored bits of `dtype` (torch rounds)."""
    store, tdtype = TORCH_DTYPES[dtype]
    t = torch.from_numpy(np.ascontiguousarray(x, np.float32)).to(tdtype)
    out = t.view(store).numpy() if store != tdtype else t.numpy()
    return out.view(np.uint16) if dtype == "bfloat16" else out


def _repack(x: np.ndarray, src: Layout, dst: Layout) -> np.ndarray:
    """A [R, T, ...] tensor of layout src moved into the slots of layout dst."""
    out = np.zeros((*dst.slots.shape, *x.shape[2:]), x.dtype)
    where = {int(c): i for i, c in enumerate(src.slots.reshape(-1)) if c >= 0}
    flat_x = x.reshape(-1, *x.shape[2:])
    flat_o = out.reshape(-1, *x.shape[2:])
    for j, c in enumerate(dst.slots.reshape(-1)):
        if c >= 0:
            flat_o[j] = flat_x[where[int(c)]]
    return out


def _pair(rng) -> tuple[Capture, Capture]:
    """Reference and candidate captures exercising every case the kernel must get right."""
    lay = _layouts()
    ref, cand = [], []

    def add(name, r, c, dtype, layout=None, raw=False):
        info = TapInfo(name, "s", len(ref), "c")
        rb, cb = (r, c) if raw else (_bits(r, dtype), _bits(c, dtype))
        if layout:
            cb = _repack(cb, lay["padded"], lay["packed"])
        ref.append(Tap(info, len(ref), rb, dtype, "padded" if layout else None))
        cand.append(Tap(info, len(cand), cb, dtype, "packed" if layout else None))

    def noisy(shape, scale=0.01):
        x = rng.standard_normal(shape).astype(np.float32)
        return x, x + scale * rng.standard_normal(shape).astype(np.float32)

    x, y = noisy((R, T, 4, 8))  # attention heads
    y[1, 3, 2, 5] = np.nan
    x[0, 20, 1, 1] = np.inf
    x[0, 36, 0, 0] = np.nan  # in padding: never compared
    add("q_bf16_heads", x, y, "bfloat16", layout=True)
    x, y = noisy((R, T, 24), 0.1)
    add("mlp_fp16", x * 100, y * 100, "float16", layout=True)
    y = y.copy()
    y[0, 5, 3] = 1e6  # fp16 overflow -> inf on the candidate
    add("mlp_fp16_overflow", x * 100, y * 100, "float16", layout=True)
    add("e4m3_all_patterns", rng.integers(0, 256, (R, T, 16), dtype=np.uint8),
        rng.integers(0, 256, (R, T, 16), dtype=np.uint8), "float8_e4m3fn", layout=True, raw=True)
    e5 = rng.integers(0, 256, (R, T, 16), dtype=np.uint8)
    e5_c = e5.copy()
    e5_c[:, :, ::3] = rng.integers(0, 256, e5_c[:, :, ::3].shape, dtype=np.uint8)
    add("e5m2_mostly_equal", e5, e5_c, "float8_e5m2", layout=True, raw=True)
    x, _ = noisy((R, T, 8))
    add("zeros_both", np.zeros_like(x), np.zeros_like(x), "bfloat16", layout=True)
    add("zeros_cand", x, np.zeros_like(x), "bfloat16", layout=True)
    add("identical", x, x, "bfloat16", layout=True)
    x, y = noisy((37, 5))
    add("f32_rows", x, y, "float32")
    x, y = noisy((100_003,))
    add("f32_flat", x, y, "float32")
    x, y = noisy((300,))
    add("f64_huge", x.astype(np.float64) * 1e300, -y.astype(np.float64) * 1e300, "float64", raw=True)
    add("f64_tiny", x.astype(np.float64) * 1e-310, y.astype(np.float64) * 1e-310, "float64", raw=True)
    add("f64_plain", x.astype(np.float64), y.astype(np.float64), "float64", raw=True)
    add("int32", rng.integers(-5, 5, (50,), dtype=np.int32), rng.integers(-5, 5, (50,), dtype=np.int32), "int32",
        raw=True)
    layouts = {"padded": lay["padded"], "packed": lay["packed"]}
    return (Capture(taps=ref, layouts=layouts, meta={}), Capture(taps=cand, layouts=layouts, meta={}))


@pytest.fixture(scope="module")
def dumps(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("fused")
    ref, cand = _pair(np.random.default_rng(7))
    write_dump(tmp / "r.h5", ref)
    write_dump(tmp / "c.h5", cand)
    return tmp / "r.h5", tmp / "c.h5", ref


def _diff(paths, engine, chunk=8):
    with open_dump(paths[0]) as a, open_dump(paths[1]) as b:
        return diff_readers(a, b, engine=engine, chunk=chunk)


def _close(a, b, rel=1e-12) -> bool:
    if isinstance(a, float) and isinstance(b, float):
        return (math.isnan(a) and math.isnan(b)) or math.isclose(a, b, rel_tol=rel, abs_tol=1e-300)
    return a == b


def _assert_same(m1, m2, where, rel=1e-12):
    d1, d2 = m1.to_dict(), m2.to_dict()
    for field in d1:
        tol = 0.0 if field == "max_abs" else rel  # a maximum is exact, not a sum
        ok = d1[field] == d2[field] or (tol and _close(d1[field], d2[field], tol)) or (
            isinstance(d1[field], float) and math.isnan(d1[field]) and math.isnan(d2[field]))
        assert ok, f"{where} {field}: {d1[field]} vs {d2[field]}"


@pytest.mark.parametrize("chunk_elements", [53, 1 << 22])
def test_fused_equals_numpy_everywhere(dumps, monkeypatch, chunk_elements):
    monkeypatch.setattr(parity.comparison.stream, "FUSED_CHUNK_ELEMENTS", chunk_elements)
    monkeypatch.setattr(parity.comparison.stream, "CHUNK_ELEMENTS", chunk_elements)
    want, got = _diff(dumps, "numpy"), _diff(dumps, "fused")
    assert [r.key for r in got.rows] == [r.key for r in want.rows]
    for a, b in zip(want.rows, got.rows):
        assert (a.status, a.reason) == (b.status, b.reason), a.key
        _assert_same(a.metrics, b.metrics, a.key)
        for group in ("regions", "chunks"):
            assert list(getattr(a, group)) == list(getattr(b, group)), (a.key, group)
            for name in getattr(a, group):
                _assert_same(getattr(a, group)[name], getattr(b, group)[name], f"{a.key} {group} {name}")
        assert len(a.heads) == len(b.heads)
        for h, (ha, hb) in enumerate(zip(a.heads, b.heads)):
            _assert_same(ha, hb, f"{a.key} head {h}")
    assert sum(bool(r.heads) for r in got.rows) == 1 and sum(bool(r.regions) for r in got.rows) >= 8


def _decoded(tap: Tap) -> np.ndarray:
    """float64 values of a tap, decoded by torch from the stored bits (not by parity)."""
    if tap.dtype not in TORCH_DTYPES:
        return tap.array.astype(np.float64)
    store, tdtype = TORCH_DTYPES[tap.dtype]
    arr = tap.array.view(np.int16) if tap.dtype == "bfloat16" else tap.array
    return torch.from_numpy(np.ascontiguousarray(arr)).view(tdtype).to(torch.float64).numpy()


def _tokens(x: np.ndarray, layout: Layout | None, positions: range | None = None) -> np.ndarray:
    """Valid tokens of x in canonical order (optionally only canonical positions in a range)."""
    if layout is None:
        return x.reshape(-1)
    canon = layout.slots.reshape(-1)
    slots = [int(s) for s in np.argsort(np.where(canon >= 0, canon, np.iinfo(np.int64).max), kind="stable")
             if canon[s] >= 0 and (positions is None or canon[s] % layout.length in positions)]
    return x.reshape(-1, *x.shape[2:])[slots].reshape(-1)


def _reference(r: np.ndarray, c: np.ndarray) -> dict:
    """The metrics by their definitions, in plain float64 numpy (one pass each, no scaling)."""
    ok = np.isfinite(r) & np.isfinite(c)
    rv, cv = r[ok], c[ok]
    out = dict(n=r.size, nan_ref=int(np.isnan(r).sum()), inf_ref=int(np.isinf(r).sum()),
               nan_cand=int(np.isnan(c).sum()), inf_cand=int(np.isinf(c).sum()),
               first_nonfinite=None if ok.all() else int(np.argmin(ok)))
    if not rv.size:
        return out
    with np.errstate(over="ignore"):
        d = np.abs(cv - rv)
    out["max_abs"] = float(d.max())
    out["max_abs_index"] = int(np.flatnonzero(ok)[np.argmax(d)])
    if np.isfinite(d).all() and np.abs(rv).max() < 1e150 and np.abs(rv).max() > 1e-150:
        nr, nc = np.linalg.norm(rv), np.linalg.norm(cv)
        out["cos"] = 1.0 if nr == nc == 0 else 0.0 if nr == 0 or nc == 0 else float(np.dot(rv, cv) / (nr * nc))
        out["mean_abs"] = float(d.mean())
        out["rel_l2"] = float(np.linalg.norm(cv - rv) / nr) if nr else (0.0 if not d.any() else math.inf)
    return out


def test_fused_agrees_with_a_float64_reference(dumps):
    report = _diff(dumps, "fused")
    ref_cap, cand_cap = _pair(np.random.default_rng(7))
    layouts = _layouts()
    rows = {r.key: r for r in report.rows}
    checked = 0
    for rt, ct in zip(ref_cap.taps, cand_cap.taps):
        row = rows[rt.key]
        lay_r = layouts["padded"] if rt.layout else None
        lay_c = layouts["packed"] if ct.layout else None
        r, c = _tokens(_decoded(rt), lay_r), _tokens(_decoded(ct), lay_c)
        cases = [(row.metrics, r, c)]
        for region in (lay_r.regions if lay_r else ()):
            span = range(region.start, region.stop)
            cases.append((row.regions[region.name], _tokens(_decoded(rt), lay_r, span),
                          _tokens(_decoded(ct), lay_c, span)))
        for h, head in enumerate(row.heads):
            feat = rt.array.shape[2:]
            rh = _tokens(_decoded(rt), lay_r).reshape(-1, *feat)[:, h].reshape(-1)
            ch = _tokens(_decoded(ct), lay_c).reshape(-1, *feat)[:, h].reshape(-1)
            cases.append((head, rh, ch))
        for got, rr, cc in cases:
            want = _reference(rr, cc)
            d = got.to_dict()
            for field, value in want.items():
                assert _close(d[field], value, 1e-9), f"{rt.key} {field}: {d[field]} vs {value}"
            checked += 1
    assert checked > 30
    assert rows["identical"].metrics.cos == 1.0 and rows["identical"].metrics.max_abs == 0.0
    assert rows["zeros_both"].metrics.cos == 1.0 and rows["zeros_cand"].metrics.cos == 0.0
    assert rows["f64_huge"].metrics.cos == pytest.approx(-1.0, abs=1e-3)
    assert rows["q_bf16_heads"].status == "nonfinite"


def test_auto_engine_picks_numpy_for_small_data_and_the_kernel_for_large(dumps, monkeypatch):
    from parity.comparison import engine

    assert engine.load_kernel("auto", engine.FUSED_MIN_BYTES - 1) is None
    assert engine.load_kernel("auto", engine.FUSED_MIN_BYTES) is fused
    assert engine.load_kernel("numpy", 1 << 40) is None
    with pytest.raises(ValueError):
        engine.load_kernel("gpu", 0)
    calls = []
    real = fused.fused_sums
    monkeypatch.setattr(fused, "fused_sums", lambda *a: (calls.append(1), real(*a)))
    monkeypatch.setattr(engine, "FUSED_MIN_BYTES", 0)
    _diff(dumps, "auto")
    assert calls, "the kernel was not used for data above FUSED_MIN_BYTES"


def test_tiny_diff_never_imports_numba(dumps):
    code = ("import sys; from parity.api import diff_dumps; "
            f"diff_dumps({str(dumps[0])!r}, {str(dumps[1])!r}); print('numba' in sys.modules, 'torch' in sys.modules)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.split() == ["False", "False"]


def test_kernel_compiles_uncached_where_no_cache_directory_is_writable(monkeypatch):
    def njit(**kwargs):
        if kwargs.get("cache"):
            raise RuntimeError("cannot cache function: no locator available")
        return numba.njit(**kwargs)

    monkeypatch.setattr(fused, "njit", njit)
    kernel = fused._compile(fused._fused_sums)
    a = np.array([1.0, 2.0, np.nan]), np.array([1.0, 4.0, 0.0])
    fsum, isum = fused.new_sums(1)
    tab = np.zeros(1)
    kernel(a[0], tab, np.array([0]), a[1], tab, np.array([0]), np.array([3]), 1, np.zeros((1, 1), np.int64), -1,
           fsum, isum)
    assert isum[0, fused.N] == 3 and isum[0, fused.N_VALID] == 2 and isum[0, fused.NAN_R] == 1
    assert fsum[0, fused.MAX_D] == 2.0 and isum[0, fused.MAX_INDEX] == 1 and isum[0, fused.FIRST_NONFINITE] == 2


def test_reading_with_preadv_leaves_no_file_descriptor_open(dumps):
    before = len(os.listdir("/proc/self/fd"))
    for _ in range(3):
        _diff(dumps, "fused")
    assert len(os.listdir("/proc/self/fd")) == before


@pytest.mark.parametrize("member", ["000000", "000008"])  # a padded token layout; a tap without one
def test_fused_path_catches_a_flipped_data_byte(dumps, tmp_path, member):
    import h5py

    from parity.dump.format import DumpError

    bad = tmp_path / "bad.h5"
    bad.write_bytes(dumps[0].read_bytes())
    with h5py.File(bad, "r") as f:
        ds = f["taps"][member]
        info = ds.id.get_chunk_info(ds.id.get_num_chunks() - 1)
        where = info.byte_offset + 3
    data = bytearray(bad.read_bytes())
    data[where] ^= 0x10
    bad.write_bytes(bytes(data))
    with pytest.raises(DumpError, match="checksum"):
        _diff((bad, dumps[1]), "fused")
