"""Tap metrics computed where the taps are: torch reductions on the device, in float64.

The on-device compare (`on_device`) must give the report the host path gives, without
copying tensors to the host and without stalling the forward.  So this module reduces a
tap pair to exactly the sums `metrics.MetricAccumulator` finishes (counts, dot products,
squared and absolute differences, the largest difference and where it is, the first
NaN/Inf), for the whole tap and for each of its groups (token regions, token chunks,
attention heads), and hands back one small float64 row per group.  The formulas that
turn sums into cosines and relative errors stay in `metrics.py`, shared with the host.

Why batched: an eager forward is launch-bound, so what a compare costs is mostly kernel
launches.  Taps of the same signature (shapes, dtypes, layouts: each layer repeats them)
are copied, as float64, into one buffer, and every reduction below runs once per batch
of up to `max_taps` taps instead of once per tap; a tap itself costs one or two copies.
Per-tap results stay on the device until `collect()` fetches them all in one transfer
(or, for a stop at the first divergence, as soon as each is ready, without waiting).

Why sums need no scaling here for dtypes narrower than float64: their values are below
2**128 in magnitude and at least 2**-149, so squares and sums of squares of up to 2**50
of them neither overflow nor underflow float64.  Float64 taps are scaled by powers of two
(exact) as the host accumulator does, per tap; their groups share the tap's scale.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import numpy as np
import torch

from parity.capture.staging import batch_elements
from parity.comparison.align import Alignment
from parity.comparison.breakdown import Groups
from parity.comparison.metrics import MetricAccumulator, Metrics

# Columns of a group's row.
N_VALID, NAN_REF, INF_REF, NAN_CAND, INF_CAND, DOT, RR, CC, DD, SAD = range(10)


MAX_ABS, MAX_AT, ANY_NONFINITE, FIRST_NONFINITE, ER, EC, ED = range(10, 17)


WIDTH = 17


DEFAULT_MAX_TAPS = 32  # taps per batch


DEFAULT_MAX_ELEMENTS = 1 << 23  # elements per side in one batch (64 MB as float64; fewer batches, fewer launches)


MOST_ELEMENTS = 1 << 25  # on a GPU with the memory free for it, batches up to this size


WORK_BYTES = 96  # device memory per element of a batch side while it is reduced (float64 copies, masks)


def _scaled_dtype(dtype: str) -> bool:
    return dtype == "float64"


@dataclass(eq=False)
class Plan:
    """How taps of one signature are reduced: unit layout, group membership, gather order.

    A unit is the run of elements that belongs to one group of every kind: a (token, head)
    row for [tokens, heads, dim] taps, a token for other laid-out taps, the whole tensor
    otherwise.  Each group (total, regions, chunks, heads) is a set of units; `offsets`
    places a unit in its group's flat order, so a group's first NaN and largest
    difference are reported at the index the host computes on the group's own array."""

    shape: tuple[int, ...]  # compared (gathered) shape of one tap
    units: int
    unit_len: int
    scaled: bool
    names: list[tuple[str, object]]  # (kind, name) per group: ("total", None), ("region", name), ...
    sizes: np.ndarray  # elements per group [G]
    member: torch.Tensor  # [U, G] float64 0/1
    src: torch.Tensor  # unit of each (unit, group) pair [P]
    dst: torch.Tensor  # group of each pair [P]
    offset: torch.Tensor  # the unit's first element in its group's flat order, float64 [P]
    ref_order: torch.Tensor | None
    cand_order: torch.Tensor | None
    max_taps: int
    batch: Batch | None = None

    @property
    def capacity(self) -> int:
        """Elements per side of a full batch."""
        return self.max_taps * self.units * self.unit_len

    @classmethod
    def build(cls, a: Alignment, groups: Groups, ref_dtype: str, cand_dtype: str, device: torch.device,
              max_taps: int, max_elements: int) -> Plan:
        shape, idx = a.shape, a.canonical
        heads = groups.heads or 1
        if idx is None:
            tokens, unit_len = 1, int(np.prod(shape, dtype=np.int64))
        else:
            tokens, feats = shape[0], shape[1:]
            unit_len = int(np.prod(feats[1:] if heads > 1 else feats, dtype=np.int64))
        units = tokens * heads
        u_tok, u_head = np.arange(units) // heads, np.arange(units) % heads  # [U] token, head of each unit
        per_token = heads * unit_len
        names: list[tuple[str, object]] = [("total", None)]
        members = [(np.ones(units, bool), u_tok * per_token + u_head * unit_len)]  # ([U] in it, [U] offset)
        for kind, name, on in groups.token_groups():  # on: [tokens] bool
            rank = np.cumsum(on) - 1  # [tokens] the token's place among the group's tokens
            names.append((kind, name))
            members.append((on[u_tok], rank[u_tok] * per_token + u_head * unit_len))
        for h in range(groups.heads):
            names.append(("head", h))
            members.append((u_head == h, u_tok * unit_len))
        member = np.stack([m for m, _ in members], axis=1)  # [U, G]
        src, dst = np.nonzero(member)
        offset = np.stack([o for _, o in members], axis=1)[src, dst]

        def on_device(x, dtype):
            return torch.as_tensor(np.ascontiguousarray(x), dtype=dtype, device=device)

        return cls(shape=tuple(shape), units=units, unit_len=unit_len,
                   scaled=_scaled_dtype(ref_dtype) or _scaled_dtype(cand_dtype),
                   names=names, sizes=member.sum(axis=0) * unit_len,
                   member=on_device(member, torch.float64), src=on_device(src, torch.int64),
                   dst=on_device(dst, torch.int64), offset=on_device(offset, torch.float64),
                   ref_order=None if a.ref_order is None else on_device(a.ref_order, torch.int64),
                   cand_order=None if a.cand_order is None else on_device(a.cand_order, torch.int64),
                   max_taps=max(1, min(max_taps, max_elements // max(1, units * unit_len))))


_BITS = {1: torch.uint8, 2: torch.int16, 4: torch.int32, 8: torch.int64}


@dataclass
class Batch:
    """Up to `plan.max_taps` tap pairs of one plan, gathered, each side as its own dtype's
    raw bits (a copy is one kernel, whatever the dtype): [K, *compared shape] per side."""

    ref: torch.Tensor
    cand: torch.Tensor
    dtypes: tuple[torch.dtype, torch.dtype]
    tokens: list = field(default_factory=list)


def _put(slot: torch.Tensor, value: torch.Tensor, order: torch.Tensor | None) -> None:
    """Copy one side of a tap into its batch slot, bits unchanged (one kernel); a laid-out
    tap is gathered to its valid tokens in canonical order on the way."""
    bits = value.view(slot.dtype)
    if order is None:
        slot.copy_(bits)
    else:
        torch.index_select(bits.reshape(-1, *bits.shape[2:]), 0, order, out=slot)


class Reducer:
    """Collects tap pairs into per-plan batches, reduces each full batch on the device, and
    fetches the per-group rows.  `eager`: reduce each tap at once and start its transfer
    to the host, so `ready()` can report verdicts while the forward goes on."""

    def __init__(self, chunk: int | None = None, eager: bool = False, max_taps: int = DEFAULT_MAX_TAPS,
                 max_elements: int | None = None) -> None:
        """`max_elements`: per side of a batch; None: sized by the first device's free memory
        (`staging.batch_elements`)."""
        self.chunk, self.eager = chunk, eager
        self.max_taps, self.max_elements = (1, max_elements) if eager else (max_taps, max_elements)
        self.plans: dict[tuple, Plan] = {}
        self.open: list[Plan] = []  # plans with a partly filled batch
        self.open_elements = 0  # capacity of the part-filled batches, elements per side
        self.reduced: list[tuple[list, Plan, torch.Tensor]] = []  # (tokens, plan, rows on the device [K, G, W])
        self.in_flight: list[tuple[list, Plan, torch.Tensor, object]] = []  # eager: (.., host rows, event)

    def plan(self, a: Alignment, ref, cand, device: torch.device) -> Plan:
        key = (tuple(ref.shape), tuple(cand.shape), ref.layout, cand.layout, ref.dtype, cand.dtype, device)
        plan = self.plans.get(key)
        if plan is None:
            if self.max_elements is None:
                self.max_elements = batch_elements(device, DEFAULT_MAX_ELEMENTS, MOST_ELEMENTS, WORK_BYTES)
            plan = self.plans[key] = Plan.build(a, Groups.of(a, self.chunk), ref.dtype, cand.dtype, device,
                                                self.max_taps, self.max_elements)
        return plan

    @torch.inference_mode()
    def add(self, token, plan: Plan, ref: torch.Tensor, cand: torch.Tensor) -> None:
        """Queue one pair (`token` comes back with its rows).  `cand` is copied at once: the
        model may overwrite it after this returns."""
        if plan.batch is None:
            if self.open_elements + plan.capacity > 4 * self.max_elements:
                self.flush_all()  # many part-filled batches: bound the memory they hold
            plan.batch = Batch(*(torch.empty((plan.max_taps, *plan.shape), dtype=_BITS[t.element_size()],
                                             device=cand.device) for t in (ref, cand)), (ref.dtype, cand.dtype))
            self.open.append(plan)
            self.open_elements += plan.capacity
        batch = plan.batch
        k = len(batch.tokens)
        if ref.device != cand.device:  # waited in pinned host memory
            ref = ref.to(cand.device, non_blocking=True)
        _put(batch.ref[k], ref, plan.ref_order)
        _put(batch.cand[k], cand, plan.cand_order)
        batch.tokens.append(token)
        if len(batch.tokens) == plan.max_taps:
            self.flush(plan)

    def flush(self, plan: Plan) -> None:
        batch, plan.batch = plan.batch, None
        self.open.remove(plan)
        k = len(batch.tokens)
        self.open_elements -= plan.capacity
        x = torch.empty((3, k, plan.units, plan.unit_len), dtype=torch.float64, device=batch.ref.device)
        for i, (side, dtype) in enumerate(zip((batch.ref, batch.cand), batch.dtypes)):
            x[i].copy_(side[:k].view(dtype).reshape(k, plan.units, plan.unit_len))  # decoded exactly to float64
        rows = reduce_batch(x, plan)
        if self.eager:
            self.in_flight.append((batch.tokens, plan, *_to_host(rows)))
        else:
            self.reduced.append((batch.tokens, plan, rows))

    def flush_all(self) -> None:
        for plan in list(self.open):
            self.flush(plan)

    def ready(self):
        """Eager mode: (token, plan, rows [G, W]) of every reduced tap whose rows reached the
        host, in order, without waiting for the others."""
        while self.in_flight and (self.in_flight[0][3] is None or self.in_flight[0][3].query()):
            tokens, plan, host, _ = self.in_flight.pop(0)
            yield from ((t, plan, r) for t, r in zip(tokens, host.numpy()))

    def collect(self):
        """(token, plan, rows [G, W]) of every tap queued: what is still open is reduced
        now, and everything on the device comes to the host in one transfer."""
        self.flush_all()
        for tokens, plan, host, event in self.in_flight:
            if event is not None:
                event.synchronize()
            yield from ((t, plan, r) for t, r in zip(tokens, host.numpy()))
        self.in_flight.clear()
        if not self.reduced:
            return
        flat = torch.cat([rows.reshape(-1) for _, _, rows in self.reduced]).cpu().numpy()
        at = 0
        for tokens, plan, rows in self.reduced:
            n = rows.numel()
            block = flat[at:at + n].reshape(rows.shape)
            at += n
            yield from ((t, plan, r) for t, r in zip(tokens, block))
        self.reduced.clear()


def _to_host(rows: torch.Tensor):
    """Start copying `rows` to the host without waiting: (host tensor, event or None)."""
    if rows.device.type != "cuda":
        return rows, None
    host = torch.empty(rows.shape, dtype=rows.dtype, pin_memory=True)
    host.copy_(rows, non_blocking=True)
    event = torch.cuda.Event()
    event.record()
    return host, event


@torch.inference_mode()  # batches are made inside the forward, often in inference mode
def reduce_batch(x: torch.Tensor, plan: Plan) -> torch.Tensor:
    """[K, G, WIDTH] float64 rows (see the column names above) of a batch
    x = [3, K, U, L] (ref, cand, scratch), which it overwrites.  Few passes over the data:
    what is summed per unit is reduced where it is computed (matmuls, norms), never
    materialised as products first."""
    ref, cand, diff = x[0], x[1], x[2]  # [K, U, L]
    torch.sub(cand, ref, out=diff)
    nonfinite, nan = ~torch.isfinite(x[:2]), torch.isnan(x[:2])  # [2, K, U, L] per side
    invalid = nonfinite[0] | nonfinite[1]  # non-finite on either side: left out of every statistic
    absd = diff.abs().masked_fill_(invalid, -1.0)  # |c - r| over valid elements, unscaled (inf on overflow)
    x.masked_fill_(invalid, 0.0)
    k = x.shape[1]
    if plan.scaled:
        exps = torch.frexp(x[:2].abs().amax(dim=(2, 3))).exponent.to(torch.float64)  # [2, K]
        exps = torch.cat([exps, exps.amax(0, keepdim=True) + 1])  # er, ec, ed: [3, K]
        # x * 2**-e in two steps, each factor a normal float64: exact unless the result
        # itself is subnormal (as numpy's ldexp on the host)
        half = torch.floor(-exps / 2)
        s1, s2 = (torch.exp2(f)[:, :, None, None] for f in (half, -exps - half))
        torch.sub(cand * s1[2] * s2[2], ref * s1[2] * s2[2], out=diff)
        ref.mul_(s1[0]).mul_(s2[0])
        cand.mul_(s1[1]).mul_(s2[1])
    else:
        exps = torch.zeros((3, k), dtype=torch.float64, device=x.device)

    def dot(a, b):  # [K, U]: per-unit dot product, reduced inside the matmul
        return (a.unsqueeze(-2) @ b.unsqueeze(-1))[..., 0, 0]

    counts = torch.stack([(~invalid).sum(-1), nan[0].sum(-1), nonfinite[0].sum(-1), nan[1].sum(-1),
                          nonfinite[1].sum(-1)]).to(torch.float64)  # [5, K, U]
    counts[2] -= counts[1]  # non-finite minus NaN: Inf
    counts[4] -= counts[3]
    sums = torch.stack([dot(ref, cand), dot(ref, ref), dot(cand, cand), dot(diff, diff),
                        torch.linalg.vector_norm(diff, 1, dim=-1)])  # [5, K, U]
    per_unit = torch.cat([counts, sums]).reshape(10 * k, plan.units)
    per_group = (per_unit @ plan.member).reshape(10, k, -1)  # [10, K, G]
    # Largest |c - r| and first non-finite element: per unit, then the first unit holding
    # its group's extreme, in the group's own flat order.
    peak_abs, at_abs = absd.max(-1)
    peak_bad, at_bad = invalid.max(-1)
    peak, at = torch.stack([peak_abs, peak_bad.to(torch.float64)]), torch.stack([at_abs, at_bad])  # [2, K, U]
    vals = peak.index_select(-1, plan.src)  # [2, K, P]
    where = at.index_select(-1, plan.src).to(torch.float64) + plan.offset
    groups = per_group.shape[-1]
    dst = plan.dst.expand_as(vals)
    top = torch.full((2, k, groups), -math.inf, dtype=torch.float64, device=x.device)
    top.scatter_reduce_(-1, dst, vals, "amax")
    first = torch.full_like(top, math.inf)
    first.scatter_reduce_(-1, dst, torch.where(vals == top.gather(-1, dst), where, math.inf), "amin")
    extra = torch.stack([top[0], first[0], top[1], first[1]])  # [4, K, G]
    return torch.cat([per_group, extra, exps[:, :, None].expand(3, k, groups)]).permute(1, 2, 0)


def group_metrics(rows: np.ndarray, plan: Plan) -> tuple[Metrics, dict, dict, list]:
    """(total, regions, chunks, heads) Metrics of one tap from its rows [G, WIDTH]."""
    out: dict[str, list] = {"total": [], "region": [], "chunk": [], "head": []}
    for (kind, name), row, n in zip(plan.names, rows.tolist(), plan.sizes.tolist()):
        out[kind].append((name, row_metrics(row, n)))
    return (out["total"][0][1], dict(out["region"]), dict(out["chunk"]), [m for _, m in out["head"]])


def row_metrics(row, n: int) -> Metrics:
    """Metrics of one group row (a sequence of WIDTH floats), finished by the host
    accumulator's own code."""
    (n_valid, nan_r, inf_r, nan_c, inf_c, dot, rr, cc, dd, sad, max_abs, max_at, any_bad, first_bad,
     er, ec, ed) = row
    if dd == 0.0 and sad == 0.0:
        # Every valid c - r is zero, so c == r there and the three products are the same
        # sum; summed by different kernels they may differ in the last bit: make identical
        # tensors give cos exactly 1.0, as on the host.
        dot = cc = rr
    acc = MetricAccumulator.from_sums(n, int(n_valid), (int(nan_r), int(inf_r), int(nan_c), int(inf_c)),
                                      int(first_bad) if any_bad > 0 else None, max_abs,
                                      int(max_at) if n_valid else None, dot, rr, cc, dd, sad,
                                      (int(er), int(ec), int(ed)))
    return acc.result()
