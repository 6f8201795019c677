"""The fused diff kernel: one pass over a chunk pair, every sum the metrics need.

Why: `MetricAccumulator.update` makes ~15 numpy passes per element in float64 (decode,
isfinite, subtract, abs, argmax, max, scalings, four dots, a sum) and per-region metrics
run it again, so the streamed diff ran at ~40 MB/s, 2% of the disk.  This kernel reads
each stored element once (bf16 as its uint16 bits, fp8 as uint8 through the exact decode
table, float32/64 as is; float16 arrives as float32, an exact cast), decodes it to
float64 in registers and adds it to the token's sums, which then feed every accumulator
("slot") the token belongs to: the total, its region, its `--by-token` chunk, and per
attention head.  It releases the GIL, so the reader thread's I/O overlaps it.

It yields *raw* (unscaled) float64 sums per slot; `MetricAccumulator.add_sums` folds
them into its power-of-two-scaled representation, and `sums_are_exact` tells when the raw
sums may have overflowed or lost tiny values (possible only for float64 taps), in which
case the caller recomputes that chunk with the numpy path.  fastmath is limited to
reassociation (vectorised float64 sums, any order) and contraction (FMA): NaN/Inf tests
stay exact, and non-finite elements are excluded exactly as the numpy path excludes them.

This module imports numba at import time: import it only through `engine.load_kernel`.
"""

from __future__ import annotations

import numpy as np
from llvmlite import ir
from numba import njit, types
from numba.extending import intrinsic, overload

# fsum columns (float64 per slot)
DOT, RR, CC, DD, SAD, MAX_R, MAX_C, MAX_D = range(8)


# isum columns (int64 per slot)
N, N_VALID, NAN_R, INF_R, NAN_C, INF_C, FIRST_NONFINITE, MAX_INDEX = range(8)


_FASTMATH = {"reassoc", "contract"}


def new_sums(slots: int) -> tuple[np.ndarray, np.ndarray]:
    """Empty per-slot sums: ([slots, 8] float64, [slots, 8] int64), maxima and indices unset."""
    fsum = np.zeros((slots, 8), np.float64)
    fsum[:, MAX_D] = -1.0
    isum = np.zeros((slots, 8), np.int64)
    isum[:, FIRST_NONFINITE] = -1
    isum[:, MAX_INDEX] = -1
    return fsum, isum


@intrinsic
def _u32_as_f32(typingctx, x):
    def codegen(context, builder, signature, args):
        return builder.bitcast(args[0], ir.FloatType())
    return types.float32(types.uint32), codegen


@intrinsic
def _f64_bits(typingctx, x):
    def codegen(context, builder, signature, args):
        return builder.bitcast(args[0], ir.IntType(64))
    return types.uint64(types.float64), codegen


@intrinsic
def _bits_f64(typingctx, x):
    def codegen(context, builder, signature, args):
        return builder.bitcast(args[0], ir.DoubleType())
    return types.float64(types.uint64), codegen


def _decode(v, table):
    """Stored element -> exact float64 (overloaded per storage type below)."""


@overload(_decode, inline="always")
def _decode_impl(v, table):
    if isinstance(v, types.Integer) and v.bitwidth == 8:  # float8: the exact table
        return lambda v, table: table[v]
    if isinstance(v, types.Integer) and v.bitwidth == 16:  # bfloat16: the top half of a float32
        return lambda v, table: np.float64(_u32_as_f32(np.uint32(v) << np.uint32(16)))
    if isinstance(v, types.Float):
        return lambda v, table: np.float64(v)
    return None


@njit(inline="always", fastmath=_FASTMATH)
def _span(a, ta, pa, b, tb, pb, n):
    """Sums over n elements from a[pa:], b[pb:], non-finite pairs excluded.

    Maxima are taken on the bit patterns of non-negative doubles (monotone as unsigned
    integers), which vectorises where a float max with NaN semantics does not."""
    ra = a[pa:pa + n]
    rb = b[pb:pb + n]
    dot = rr = cc = dd = sad = 0.0
    mr = mc = md = np.uint64(0)
    nv = 0
    for j in range(n):
        x = _decode(ra[j], ta)
        y = _decode(rb[j], tb)
        ok = (abs(x) < np.inf) & (abs(y) < np.inf)
        x = x if ok else 0.0
        y = y if ok else 0.0
        nv += np.int64(ok)
        d = y - x
        ad = abs(d)
        dot += x * y
        rr += x * x
        cc += y * y
        dd += d * d
        sad += ad
        mr = max(mr, _f64_bits(abs(x)))
        mc = max(mc, _f64_bits(abs(y)))
        md = max(md, _f64_bits(ad))
    return dot, rr, cc, dd, sad, _bits_f64(mr), _bits_f64(mc), _bits_f64(md), nv


@njit
def _nonfinite(a, ta, pa, b, tb, pb, n):
    """(nan_ref, inf_ref, nan_cand, inf_cand, first k where either side is non-finite)."""
    nan_r = inf_r = nan_c = inf_c = 0
    first = -1
    for k in range(n):
        x = _decode(a[pa + k], ta)
        y = _decode(b[pb + k], tb)
        if np.isnan(x):
            nan_r += 1
        elif np.isinf(x):
            inf_r += 1
        if np.isnan(y):
            nan_c += 1
        elif np.isinf(y):
            inf_c += 1
        if first < 0 and not (np.isfinite(x) and np.isfinite(y)):
            first = k
    return nan_r, inf_r, nan_c, inf_c, first


@njit
def _first_max(a, ta, pa, b, tb, pb, n, md):
    """First k whose pair is finite and |b - a| == md (md came from _span: it exists)."""
    for k in range(n):
        x = _decode(a[pa + k], ta)
        y = _decode(b[pb + k], tb)
        if np.isfinite(x) and np.isfinite(y) and abs(y - x) == md:
            return k
    return -1


@njit(inline="always")
def _feed(fsum, isum, s, a, ta, pa, b, tb, pb, n, dot, rr, cc, dd, sad, mr, mc, md, nv):
    """Add a span's sums to slot s, whose element numbering continues from isum[s, N]."""
    base = isum[s, N]
    isum[s, N] += n
    isum[s, N_VALID] += nv
    if nv < n:
        nan_r, inf_r, nan_c, inf_c, first = _nonfinite(a, ta, pa, b, tb, pb, n)
        isum[s, NAN_R] += nan_r
        isum[s, INF_R] += inf_r
        isum[s, NAN_C] += nan_c
        isum[s, INF_C] += inf_c
        if isum[s, FIRST_NONFINITE] < 0:
            isum[s, FIRST_NONFINITE] = base + first
    fsum[s, DOT] += dot
    fsum[s, RR] += rr
    fsum[s, CC] += cc
    fsum[s, DD] += dd
    fsum[s, SAD] += sad
    fsum[s, MAX_R] = max(fsum[s, MAX_R], mr)
    fsum[s, MAX_C] = max(fsum[s, MAX_C], mc)
    if nv > 0 and md > fsum[s, MAX_D]:  # strictly greater: the first occurrence wins
        fsum[s, MAX_D] = md
        isum[s, MAX_INDEX] = base + _first_max(a, ta, pa, b, tb, pb, n, md)


def _fused_sums(a, ta, a_off, b, tb, b_off, lens, heads, tok_slots, head0, fsum, isum):
    """Feed tokens t = 0.. of a chunk pair into their slots.

    a, b: stored elements (a window of the tap); token t is a[a_off[t]:a_off[t] + lens[t]]
    and likewise in b.  ta, tb: float8 decode tables (unused for other dtypes).
    tok_slots[t, :]: the slots token t feeds as a whole (-1: none).  heads > 1: a token is
    `heads` runs of lens[t] // heads elements; run h feeds slot head0 + h (head0 >= 0)."""
    for t in range(a_off.size):
        L = lens[t]
        D = L // heads
        dot = rr = cc = dd = sad = mr = mc = md = 0.0
        nv = 0
        for h in range(heads):
            pa = a_off[t] + h * D
            pb = b_off[t] + h * D
            s_dot, s_rr, s_cc, s_dd, s_sad, s_mr, s_mc, s_md, s_nv = _span(a, ta, pa, b, tb, pb, D)
            if head0 >= 0:
                _feed(fsum, isum, head0 + h, a, ta, pa, b, tb, pb, D,
                      s_dot, s_rr, s_cc, s_dd, s_sad, s_mr, s_mc, s_md, s_nv)
            dot += s_dot
            rr += s_rr
            cc += s_cc
            dd += s_dd
            sad += s_sad
            mr = max(mr, s_mr)
            mc = max(mc, s_mc)
            md = max(md, s_md)
            nv += s_nv
        for j in range(tok_slots.shape[1]):
            s = tok_slots[t, j]
            if s >= 0:
                _feed(fsum, isum, s, a, ta, a_off[t], b, tb, b_off[t], L, dot, rr, cc, dd, sad, mr, mc, md, nv)


def _compile(fn):
    """njit with an on-disk cache; where no cache directory is writable (a read-only
    install and no user cache), numba refuses cache=True: compile uncached instead."""
    try:
        return njit(nogil=True, cache=True, fastmath=_FASTMATH)(fn)
    except RuntimeError:
        return njit(nogil=True, cache=False, fastmath=_FASTMATH)(fn)


fused_sums = _compile(_fused_sums)
