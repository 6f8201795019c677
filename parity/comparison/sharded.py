"""The offline diff of a reference dump against a sharded candidate: one dump per rank.

A tensor-parallel candidate writes one dump per rank; each rank's meta says where it sits
(`rank`, `world_size`) and how its taps are split (`sharding`: {GLOB: SPEC}, a GLOB
matching a tap name or key, fnmatch, the last match wins; a tap no glob matches is
replicated).  SPEC kinds:

  column      split along the last axis in rank order; `groups`: G makes the last axis G
              equal groups, each split across the ranks (heads-major layouts)
  heads       split along the last axis by whole heads (`heads`: the head count)
  sequence    split along the token axis 1 in rank order; each rank's layout covers its
              slice: the slots of the ranks' layouts are concatenated along the token
              axis in rank order (the unsharded layout), like their taps
  partial     row-parallel partial sums: the full tap is the sum over the ranks
  replicated  every rank holds the whole tap: rank 0's is compared, and every rank must
              agree with rank 0 within the tap's bound (a rank that does not is a problem)

Each reference tap is unsharded from the ranks' shards, read one tap at a time, and judged
with peak memory a few times the largest tap whatever the world size (a split tap's
shards add up to one tap; partial sums are added and replicas compared one rank at a
time; plus the reference tap and the float64 copies the host comparison makes; never the
dump), by the same comparer and verdict rule as the
two-dump diff (`host.compare_taps`, `loop.diff`).  Per rank: a split shard is compared
with its slice of the reference, a replicated tap with the reference and with rank 0;
the first tap where a rank diverges is one warning line.  No torch.
"""

from __future__ import annotations

import fnmatch
import glob as _glob
import os
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

from parity.comparison.dumps import check_comparable, open_checked, select_taps
from parity.comparison.host import compare_taps
from parity.comparison.loop import diff
from parity.comparison.rules import Thresholds
from parity.dump.format import DumpError
from parity.errors import InputError
from parity.report.results import OFFLINE_NOTE, Localisation, Report, TapResult
from parity.taps.codec import to_float64
from parity.taps.records import Capture, Layout, Tap, TapInfo

KINDS = ("column", "heads", "sequence", "partial", "replicated")
AGREED_META = ("backend", "config", "input_fingerprint", "dtype", "sharding")  # every rank must say the same
SEQ_SUFFIX = "|sequence"  # the name of an unsharded (concatenated) sequence layout


def has_magic(path) -> bool:
    return _glob.has_magic(os.fspath(path))


def rank_paths(cands: str | os.PathLike | Sequence) -> list[str]:
    """The candidate dumps: a glob (sorted matches) or a list of paths."""
    if isinstance(cands, (str, os.PathLike)):
        pattern = os.fspath(cands)
        paths = sorted(_glob.glob(pattern)) if has_magic(pattern) else [pattern]
        if not paths:
            raise InputError(f"{pattern}: no file matches: give the candidate's per-rank dumps, e.g. 'cand-rank*.h5'")
        return paths
    paths = [os.fspath(p) for p in cands]
    if not paths:
        raise InputError("no candidate dump given")
    return paths


def spec_for(sharding: dict, name: str, key: str) -> dict:
    """The declared SPEC of a tap (the last glob matching its name or key), replicated if none."""
    spec = {"kind": "replicated"}
    for pattern, value in sharding.items():
        if fnmatch.fnmatchcase(name, pattern) or fnmatch.fnmatchcase(key, pattern):
            spec = value
    return spec


def _check_sharding(path: str, sharding) -> dict:
    if sharding is None:
        return {}
    if not isinstance(sharding, dict):
        raise InputError(f"{path}: meta 'sharding' must be an object {{GLOB: SPEC}}, got {sharding!r}")
    for pattern, spec in sharding.items():
        kind = spec.get("kind") if isinstance(spec, dict) else None
        if kind not in KINDS:
            raise InputError(f"{path}: sharding {pattern!r}: kind must be one of {', '.join(KINDS)}, got {spec!r}")
        for field in ("groups", "heads"):
            value = spec.get(field)
            if (field in spec or (kind == "heads" and field == "heads")) and (
                    not isinstance(value, int) or isinstance(value, bool) or value < 1):
                raise InputError(f"{path}: sharding {pattern!r}: {field!r} must be a positive integer, got {value!r}")
    return sharding


def _int_meta(path: str, meta: dict, field: str) -> int:
    value = meta.get(field)
    if not isinstance(value, int) or isinstance(value, bool):
        raise InputError(f"{path}: meta has no integer {field!r} (got {value!r}): not a per-rank dump")
    return value


def _ranges(ranks: list[int]) -> str:
    """0,1,2,5 -> '0-2, 5'."""
    out, start = [], None
    for i, r in enumerate(ranks):
        if start is None:
            start = r
        if i + 1 == len(ranks) or ranks[i + 1] != r + 1:
            out.append(str(start) if start == r else f"{start}-{r}")
            start = None
    return ", ".join(out)


def _plural(ranks: list[int]) -> str:
    return f"rank{'s' if len(ranks) > 1 else ''} {_ranges(ranks)}"


@dataclass(frozen=True)
class ShardedTap:
    """The header of an unsharded candidate tap (its data stays in the ranks' dumps)."""

    info: TapInfo
    order: int
    dtype: str
    layout: str | None
    shape: tuple[int, ...]
    spec: dict

    @property
    def key(self) -> str:
        return self.info.key


class Ranks:
    """The per-rank dumps, open and checked against each other (headers only)."""

    def __init__(self, readers: list, paths: list[str], allow_incomplete: bool) -> None:
        self.readers, self.paths = readers, paths
        metas = [r.meta for r in readers]
        worlds = {p: _int_meta(p, m, "world_size") for p, m in zip(paths, metas)}
        ranks = {p: _int_meta(p, m, "rank") for p, m in zip(paths, metas)}
        if len(set(worlds.values())) > 1:
            raise InputError("the rank dumps disagree on world_size: "
                             + ", ".join(f"{p} says {w}" for p, w in worlds.items()))
        self.world = next(iter(worlds.values()))
        for p, r in ranks.items():
            if not 0 <= r < self.world:
                raise InputError(f"{p}: rank {r} is outside [0, {self.world}) (world_size {self.world})")
        seen: dict[int, str] = {}
        for p, r in ranks.items():
            if r in seen:
                raise InputError(f"rank {r} appears twice: {seen[r]} and {p}")
            seen[r] = p
        missing = [r for r in range(self.world) if r not in seen]
        if missing:
            raise InputError(f"world_size {self.world} but {_plural(missing)} missing: "
                             f"{len(paths)} dump{'s' if len(paths) != 1 else ''} given")
        order = sorted(range(len(paths)), key=lambda i: ranks[paths[i]])
        self.readers, self.paths = [readers[i] for i in order], [paths[i] for i in order]
        first = self.readers[0].meta
        for p, r in zip(self.paths[1:], self.readers[1:]):
            for field in AGREED_META:
                if r.meta.get(field) != first.get(field):
                    raise InputError(f"the rank dumps disagree on {field}: {self.paths[0]} says "
                                     f"{first.get(field)!r}, {p} says {r.meta.get(field)!r}")
        self.sharding = _check_sharding(self.paths[0], first.get("sharding"))
        self.complete = all(r.complete for r in self.readers)
        self.error = next((r.error for r in self.readers if r.error is not None), None)
        self.layouts: dict[str, Layout] = dict(self.readers[0].layouts)
        self.taps = self._headers(allow_incomplete and not self.complete)

    def _headers(self, incomplete: bool) -> list[ShardedTap]:
        by_rank = self.by_rank = [{h.key: h for h in r.headers} for r in self.readers]
        keys = [h.key for h in self.readers[0].headers]
        everywhere = set.intersection(*(set(b) for b in by_rank))
        if not incomplete:
            for rank, b in enumerate(by_rank):
                odd = sorted(set(b) - everywhere)
                if odd:
                    lacking = [r for r, other in enumerate(by_rank) if odd[0] not in other]
                    raise InputError(f"tap {odd[0]} is on rank {rank} but not on {_plural(lacking)} "
                                     f"({self.paths[rank]}; {len(odd)} such tap{'s' if len(odd) > 1 else ''})")
        out = []
        for key in keys:
            if key in everywhere:
                shards = [b[key] for b in by_rank]
                out.append(self._unsharded(shards))
        return out

    def _unsharded(self, shards: list) -> ShardedTap:
        h0 = shards[0]
        spec = spec_for(self.sharding, h0.info.name, h0.key)
        kind = spec["kind"]
        shapes = [tuple(h.shape) for h in shards]
        what = f"tap {h0.key} ({kind}): shard shapes {', '.join(map(str, shapes))}"
        if len({h.dtype for h in shards}) > 1:
            raise InputError(f"tap {h0.key}: the ranks hold different dtypes ({', '.join(h.dtype for h in shards)})")
        if len({h.layout for h in shards}) > 1:
            names = ", ".join(str(h.layout) for h in shards)
            raise InputError(f"tap {h0.key}: the ranks use different layouts ({names})")
        layout = h0.layout
        if kind in ("column", "heads"):
            if any(len(s) == 0 or s[:-1] != shapes[0][:-1] for s in shapes):
                raise InputError(f"{what} do not add up: all but the last axis must agree")
            full = sum(s[-1] for s in shapes)
            parts = spec.get("groups", 1) if kind == "column" else 1
            if any(s[-1] % parts for s in shapes):
                raise InputError(f"{what} do not add up: a shard's last axis is not {parts} equal groups")
            if kind == "heads":
                heads = spec["heads"]
                if full % heads or any(s[-1] % (full // heads) for s in shapes):
                    raise InputError(f"{what} do not add up: {full} features are not split by whole heads "
                                     f"({heads} heads)")
            shape = (*shapes[0][:-1], full)
        elif kind == "sequence":
            if any(len(s) < 2 or s[0] != shapes[0][0] or s[2:] != shapes[0][2:] for s in shapes):
                raise InputError(f"{what} do not add up: all but the token axis 1 must agree")
            shape = (shapes[0][0], sum(s[1] for s in shapes), *shapes[0][2:])
            if layout is not None:
                layout = self._sequence_layout(h0.key, layout)
        else:
            if len(set(shapes)) > 1:
                raise InputError(f"{what} do not add up: a {kind} tap has the same shape on every rank")
            shape = shapes[0]
        if kind != "sequence" and layout is not None:
            slots = [r.layouts[layout].slots for r in self.readers if layout in r.layouts]
            if len(slots) == self.world and any(not np.array_equal(s, slots[0]) for s in slots):
                raise InputError(f"tap {h0.key} ({kind}): layout {layout!r} differs between ranks "
                                 "(only a sequence-split tap has a layout per rank)")
        return ShardedTap(h0.info, h0.order, h0.dtype, layout, shape, dict(spec))

    def _sequence_layout(self, key: str, name: str) -> str:
        joined = name + SEQ_SUFFIX
        if joined in self.layouts:
            return joined
        parts = [r.layouts.get(name) for r in self.readers]
        if any(p is None for p in parts):
            raise InputError(f"tap {key}: layout {name!r} is missing on some rank")
        if len({(p.length, p.slots.shape[0], p.regions) for p in parts}) > 1:
            raise InputError(f"tap {key}: the ranks' layouts {name!r} disagree on rows, length or regions")
        try:
            self.layouts[joined] = Layout(np.concatenate([p.slots for p in parts], axis=1), parts[0].length,
                                          parts[0].regions)
        except ValueError as exc:
            raise InputError(f"tap {key}: the ranks' slices of layout {name!r} do not add up: {exc}") from None
        return joined

    def capture(self, keep) -> Capture:
        taps = [t for t in self.taps if keep is None or keep(t.info.name, t.key)]
        meta = {**self.readers[0].meta, "ranks": [os.fspath(p) for p in self.paths]}
        meta.pop("rank", None)
        return Capture(taps=taps, layouts=self.layouts, meta=meta, error=self.error, complete=self.complete)

    def shard(self, tap: ShardedTap, rank: int) -> Tap:
        """Rank `rank`'s shard of `tap`, read from its dump."""
        h = self.by_rank[rank][tap.key]
        return Tap(h.info, h.order, self.readers[rank].load(tap.key), h.dtype, h.layout)

    def shards(self, tap: ShardedTap) -> list[Tap]:
        return [self.shard(tap, r) for r in range(len(self.readers))]


def _same_layout(a_name: str | None, a_layouts: dict, b_name: str | None, b_layouts: dict) -> bool:
    """Whether two taps' layouts (by name, in their layout dicts) lay tokens out alike."""
    la = a_layouts.get(a_name) if a_name is not None else None
    lb = b_layouts.get(b_name) if b_name is not None else None
    if la is None or lb is None:
        return la is lb
    return la.length == lb.length and la.regions == lb.regions and np.array_equal(la.slots, lb.slots)


def _same_copy(a: Tap, a_layouts: dict, b: Tap, b_layouts: dict) -> bool:
    """Whether two ranks hold one replicated tap bit for bit, under equal layouts."""
    if a.dtype != b.dtype or a.array.shape != b.array.shape or a.array.dtype != b.array.dtype:
        return False
    if not _same_layout(a.layout, a_layouts, b.layout, b_layouts):
        return False
    return bool(np.array_equal(np.ascontiguousarray(a.array).reshape(-1).view(np.uint8),
                               np.ascontiguousarray(b.array).reshape(-1).view(np.uint8)))


def _last_axis_pieces(spec: dict, widths: list[int]) -> list[list[slice]]:
    """Per rank, the slices of the full last axis its shard holds (in its shard's order)."""
    groups = spec.get("groups", 1) if spec["kind"] == "column" else 1
    full = sum(widths)
    group = full // groups
    out, start = [], 0
    for w in widths:
        per = w // groups
        out.append([slice(g * group + start, g * group + start + per) for g in range(groups)])
        start += per
    return out


def _encode(x64: np.ndarray, dtype: str, like: np.ndarray) -> tuple[np.ndarray, str]:
    """A float64 sum stored as the shards' dtype (bfloat16 rounded to nearest even), else float64."""
    if dtype in ("float32", "float64", "float16"):
        return x64.astype(dtype), dtype
    if dtype == "bfloat16" and like.dtype == np.uint16:
        u = x64.astype(np.float32).view(np.uint32).astype(np.uint64)
        rounded = (u + 0x7FFF + ((u >> 16) & 1)) >> 16
        bits = np.where(np.isnan(x64), 0x7FC0, rounded).astype(np.uint16)
        return bits, dtype
    return x64, "float64"


def unshard(tap: ShardedTap, shards: list[Tap]) -> np.ndarray:
    """The full candidate tap of a split kind (column, heads, sequence) from the ranks'
    shards, in rank order (partial sums and replicas are read rank by rank instead)."""
    kind = tap.spec["kind"]
    arrays = [s.array for s in shards]
    if kind in ("column", "heads"):
        pieces = _last_axis_pieces(tap.spec, [a.shape[-1] for a in arrays])
        out = np.empty(tap.shape, dtype=arrays[0].dtype)
        for a, slices in zip(arrays, pieces):
            at = 0
            for sl in slices:
                n = sl.stop - sl.start
                out[..., sl] = a[..., at:at + n]
                at += n
        return out
    if kind == "sequence":
        return np.concatenate(arrays, axis=1)
    raise ValueError(f"{kind} taps are not split: read them rank by rank")


@dataclass
class RankFinding:
    key: str
    failed: list[int]
    cos: float


class ShardedComparer:
    """`loop.diff`'s comparer: unshard each candidate tap, compare it with `compare_taps`,
    and compare each rank on its own (findings kept for the report)."""

    def __init__(self, ref, ranks: Ranks) -> None:
        self.ref, self.ranks = ref, ranks
        self.first: RankFinding | None = None
        self.partial: list[str] = []
        self.disagree: list[str] = []

    def __call__(self, ref_h, cand_h: ShardedTap, ref_layouts: dict, cand_layouts: dict, threshold,
                 exact_dtypes: bool, chunk: int | None) -> TapResult:
        kind = cand_h.spec["kind"]
        try:
            ref_tap = Tap(ref_h.info, ref_h.order, self.ref.load(ref_h.key), ref_h.dtype, ref_h.layout)
            if kind == "partial":
                return self._partial(ref_tap, cand_h, ref_layouts, cand_layouts, threshold, exact_dtypes, chunk)
            if kind == "replicated":
                return self._replicas(ref_tap, cand_h, ref_layouts, cand_layouts, threshold, exact_dtypes, chunk)
            shards = self.ranks.shards(cand_h)  # split: together, one tap's worth
        except DumpError as exc:
            raise InputError(str(exc)) from None
        cand_tap = Tap(cand_h.info, cand_h.order, unshard(cand_h, shards), cand_h.dtype, cand_h.layout)
        result = compare_taps(ref_tap, cand_tap, ref_layouts, cand_layouts, threshold, exact_dtypes, chunk)
        self._per_rank(ref_tap, cand_h, shards, ref_layouts, threshold, exact_dtypes)
        return result

    def _partial(self, ref_tap: Tap, tap: ShardedTap, ref_layouts, cand_layouts, threshold, exact_dtypes,
                 chunk) -> TapResult:
        """A row-parallel tap: the ranks' partial sums added up one rank at a time (memory:
        the float64 sum and one shard, whatever the world size)."""
        total, like = None, None
        for r in range(self.ranks.world):
            shard = self.ranks.shard(tap, r).array
            like = shard[:0]
            x = to_float64(shard, tap.dtype)
            if total is None:
                total = np.array(x, dtype=np.float64, copy=True)
            else:
                total += x
        full, dtype = _encode(total, tap.dtype, like)
        self.partial.append(tap.key)
        cand_tap = Tap(tap.info, tap.order, full, dtype, tap.layout)
        return compare_taps(ref_tap, cand_tap, ref_layouts, cand_layouts, threshold, exact_dtypes, chunk)

    def _replicas(self, ref_tap: Tap, tap: ShardedTap, ref_layouts, cand_layouts, threshold, exact_dtypes,
                  chunk) -> TapResult:
        """A replicated tap: rank 0's copy is the candidate's; every rank is compared with the
        reference and with rank 0, one rank read at a time (memory: three copies of the tap).
        A rank whose copy is rank 0's bit for bit (laid out alike) agrees with it and with
        the reference exactly as rank 0 does: nothing to compute."""
        layouts = [r.layouts for r in self.ranks.readers]
        first = self.ranks.shard(tap, 0)
        cand_tap = Tap(tap.info, tap.order, first.array, tap.dtype, tap.layout)
        result = compare_taps(ref_tap, cand_tap, ref_layouts, cand_layouts, threshold, exact_dtypes, chunk)
        # rank 0 against the reference is that very comparison where its layouts are the run's
        alike = _same_layout(tap.layout, cand_layouts, first.layout, layouts[0])
        rows = [result if alike else compare_taps(ref_tap, first, ref_layouts, layouts[0], threshold, exact_dtypes)]
        peers: list[TapResult | None] = []  # None: bit-identical to rank 0
        for r in range(1, self.ranks.world):
            shard = self.ranks.shard(tap, r)
            if _same_copy(first, layouts[0], shard, layouts[r]):
                rows.append(rows[0])
                peers.append(None)
                continue
            rows.append(compare_taps(ref_tap, shard, ref_layouts, layouts[r], threshold, exact_dtypes))
            peers.append(compare_taps(first, shard, layouts[0], layouts[r], threshold, exact_dtypes))
        self._replicated(tap.key, [row.passed for row in rows], peers)
        self._note_first(tap.key, rows)
        return result

    def _per_rank(self, ref_tap: Tap, tap: ShardedTap, shards: list[Tap], ref_layouts: dict, threshold,
                  exact_dtypes: bool) -> None:
        """A split tap: each rank's shard against its slice of the reference."""
        layouts = [r.layouts for r in self.ranks.readers]
        rows = []
        for r, s in enumerate(shards):
            piece = self._reference_piece(ref_tap, tap, shards, r, ref_layouts)
            if piece is None:
                return
            ref_piece, piece_layouts = piece
            rows.append(compare_taps(ref_piece, s, piece_layouts, layouts[r], threshold, exact_dtypes))
        self._note_first(tap.key, rows)

    def _note_first(self, key: str, rows: list[TapResult]) -> None:
        """Keep the first tap where some rank fails (rows: one per rank)."""
        failed = [r for r, row in enumerate(rows) if not row.passed]
        if failed and self.first is None:
            worst = min((rows[r].metrics.cos for r in failed if rows[r].metrics is not None), default=float("nan"))
            self.first = RankFinding(key, failed, worst)

    def _replicated(self, key: str, ref_ok: list[bool], peers: list[TapResult | None]) -> None:
        """A problem line when the ranks do not all agree with rank 0 on a replicated tap
        (`peers`: rank 1 on, None where bit-identical to rank 0), naming the odd ranks: those
        the reference disagrees with when it agrees with some rank, else those that
        disagree with rank 0."""
        failed = [p for p in peers if p is not None and not p.passed]
        if not failed:
            return
        world = self.ranks.world
        odd = [r for r in range(world) if not ref_ok[r]] if any(ref_ok) and not all(ref_ok) else \
            [r for r, p in enumerate(peers, 1) if p is not None and not p.passed]
        rest = [r for r in range(world) if r not in odd]
        coses = [p.metrics.cos for p in failed if p.metrics is not None]
        cos = f" (cos {min(coses):.6g})" if coses else ""
        verb = "disagrees" if len(odd) == 1 else "disagree"
        self.disagree.append(f"replicated tap {key}: {_plural(odd)} of {world} {verb} with {_plural(rest)}{cos}")

    def _reference_piece(self, ref_tap: Tap, tap: ShardedTap, shards: list[Tap], r: int, ref_layouts: dict):
        """The reference's slice rank r should hold and the layouts to compare it under, or
        None where it cannot be cut (the unsharded row then says what is wrong)."""
        kind = tap.spec["kind"]
        if kind in ("column", "heads"):
            if ref_tap.shape != tap.shape:
                return None
            pieces = _last_axis_pieces(tap.spec, [s.array.shape[-1] for s in shards])[r]
            part = np.concatenate([ref_tap.array[..., sl] for sl in pieces], axis=-1)
            return Tap(ref_tap.info, ref_tap.order, part, ref_tap.dtype, ref_tap.layout), ref_layouts
        shard = shards[r]  # sequence
        if ref_tap.layout is None and shard.layout is None:
            if ref_tap.shape != tap.shape:
                return None
            start = sum(s.array.shape[1] for s in shards[:r])
            part = ref_tap.array[:, start:start + shard.array.shape[1]]
            return Tap(ref_tap.info, ref_tap.order, part, ref_tap.dtype, None), ref_layouts
        ref_layout = ref_layouts.get(ref_tap.layout) if ref_tap.layout is not None else None
        mine = self.ranks.readers[r].layouts.get(shard.layout) if shard.layout is not None else None
        if ref_layout is None or mine is None:
            return None
        # the reference with every position outside this rank's slice made don't-care
        held = np.isin(ref_layout.slots, mine.slots[mine.slots >= 0])
        cut = Layout(np.where(held, ref_layout.slots, -1), ref_layout.length, ref_layout.regions)
        name = f"{ref_tap.layout}|rank{r}"
        return Tap(ref_tap.info, ref_tap.order, ref_tap.array, ref_tap.dtype, name), {**ref_layouts, name: cut}


def diff_sharded(ref_path, cands, thresholds: Thresholds | None = None, taps: str | None = None,
                 allow_incomplete: bool = False, progress=None, chunk: int | None = None) -> Report:
    """Offline diff of a reference dump against a candidate written one dump per rank
    (`cands`: a glob such as 'cand-rank*.h5', or a list of paths).  InputError (one line)
    for rank dumps that do not make one run; otherwise a normal Report, with the per-rank
    findings in its warnings (and a replicated tap a rank disagrees on in its problems)."""
    paths = rank_paths(cands)
    keep = select_taps(taps) if taps else None
    readers = []
    try:
        ref = open_checked(ref_path, allow_incomplete)
        readers.append(ref)
        for p in paths:
            readers.append(open_checked(p, allow_incomplete))
        ranks = Ranks(readers[1:], paths, allow_incomplete)
        ref_cap = Capture(taps=[h for h in ref.headers if keep is None or keep(h.info.name, h.key)],
                          layouts=dict(ref.layouts), meta=ref.meta, error=ref.error, complete=ref.complete)
        cand_cap = ranks.capture(keep)
        check_comparable(ref_cap, cand_cap)
        check_shapes(ref_cap, cand_cap)
        comparer = ShardedComparer(ref, ranks)
        tick = None if progress is None else (lambda done, total: progress("diff", done, total))
        report = diff(ref_cap, cand_cap, thresholds, progress=tick, compare=comparer, chunk=chunk,
                      labels=(f"reference {ref_path}", f"candidate {_label(cands, paths)} ({ranks.world} ranks)"))
    except DumpError as exc:
        raise InputError(str(exc)) from None
    finally:
        for r in readers:
            r.close()
    report.warnings.extend(rank_lines(comparer, ranks.world))
    if comparer.disagree:
        report.problems.extend(comparer.disagree[:5])
        if len(comparer.disagree) > 5:
            report.problems.append(f"... and {len(comparer.disagree) - 5} more replicated taps a rank disagrees on")
    if report.first_divergence is not None:
        report.localisation = Localisation(note=OFFLINE_NOTE)
    return report


def _label(cands, paths: list[str]) -> str:
    return os.fspath(cands) if isinstance(cands, (str, os.PathLike)) else f"{paths[0]}, ..."


def check_shapes(ref: Capture, cand: Capture) -> None:
    """InputError where the shards of a tap do not add up to the reference's shape (a
    sequence-split tap with a token layout is laid over the reference by its layouts)."""
    ref_shapes = {h.key: tuple(h.shape) for h in ref.taps}
    for tap in cand.taps:
        want = ref_shapes.get(tap.key)
        if want is None or tap.shape == want or (tap.spec["kind"] == "sequence" and tap.layout is not None):
            continue
        raise InputError(f"tap {tap.key} ({tap.spec['kind']}): the shards do not add up to the reference's shape: "
                         f"{tap.shape} vs {want}")


def rank_lines(comparer: ShardedComparer, world: int) -> list[str]:
    """The per-rank warnings: where a rank first diverges, and the taps per-rank is not defined for."""
    out = []
    first = comparer.first
    if first is not None:
        ok = [r for r in range(world) if r not in first.failed]
        cos = f"cos {first.cos:.6g}" if len(first.failed) == 1 else f"worst cos {first.cos:.6g}"
        who = f"all {world} ranks diverge" if not ok else \
            f"{_plural(first.failed)} of {world} diverge{'s' if len(first.failed) == 1 else ''}"
        line = f"{who} at {first.key} ({cos})"
        if ok:
            line += f"; {_plural(ok)} match{'' if len(ok) > 1 else 'es'}"
        out.append(line)
    if comparer.partial:
        n = len(comparer.partial)
        out.append(f"per-rank comparison is not defined for {n} partial-sum tap{'s' if n > 1 else ''} "
                   f"({comparer.partial[0]}{', ...' if n > 1 else ''}): only their sum over the ranks is compared")
    return out
