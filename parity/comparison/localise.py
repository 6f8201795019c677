"""Introduced or inherited: from the first divergence, walk upstream until a component
fails on the reference's own inputs.

The first failing tap is only where the error became visible.  It is bracketed by the
last tap before it (in execution order) that passed; the components recorded between
the two taps (layer parts, and the probe's stages: code outside layers) are where the
error can enter.  The walk re-runs, on the reference's inputs:

1. the components between the two taps that lie in the first divergence's own stream
   (same stack and step), latest first;
2. for each one that passes, the values it really read that differ from what the
   reference's read (`PartResult.reads`) are followed to where the probe says they come
   from (`Origin`): another component is re-run the same way (the previous Euler step,
   the cache handoff), code parity cannot re-run is named (the sampler's noise);
3. only when neither finds it: the rest of that stream upstream of the bracket, layer by
   layer, down to the first layer whose input the candidate read bit-identically (no
   earlier component of the stream reaches past it);
4. only when that finds nothing either: the values read differently but within the
   thresholds (an error too small to fail where it enters), followed as in 2.

A component whose every output passed bit-exactly in the diff is never re-run: its
outputs were the reference's exactly, so no error reaches the first divergence through
it (whatever it would do on other inputs).  A bit-exact tap does not clear what runs
before it: a residual bypasses a norm, a norm hides a scale, a branch (the time
embedding, the cache) may not feed it.  Only an input read bit-identically is a cut.

An attention that fails on the candidate's own K/V cache but passes on the reference's
is not where the error enters: the walk goes on to where its cache comes from.  The
verdict is a plain result object (JSON-ready); no torch here, the isolator re-runs.
"""

from __future__ import annotations

from parity.report.results import Localisation, TapResult, Unit

MAX_BETWEEN = 50  # components listed between the two taps of the bracket, at most


class _Stop(Exception):
    """The walk ran out of re-runs (`max_steps`)."""


def localise(report, isolator, max_steps: int | None = None) -> Localisation:
    """Bracket the first divergence and walk upstream to the component introducing it."""
    from parity.comparison.isolate import IsolationError

    first = report.first_divergence
    if first is None:
        return Localisation(note="nothing diverged")
    walk = _Walk(report, isolator, max_steps)
    try:
        walk.run(first)
    except _Stop:
        walk.loc.note = f"stopped after {max_steps} components without finding one that fails on its own"
    except IsolationError as exc:
        walk.loc.note = f"cannot isolate {walk.current}: {exc}"
    return walk.loc


def _stream(unit: Unit) -> tuple[str, int | None]:
    return unit.stack, unit.step


class _Walk:
    def __init__(self, report, isolator, max_steps: int | None):
        self.iso = isolator
        self.units = isolator.units()
        self.index = {u: i for i, u in enumerate(self.units)}
        self.rows = {r.key: r for r in report.rows}
        self.ordered = sorted((r for r in report.rows if r.order is not None), key=lambda r: r.order)
        self.max_steps = max_steps
        self.loc = Localisation()
        self.seen: set[Unit] = set()
        self.current = ""
        self.start: Unit | None = None
        self.leads: list[tuple[Unit, TapResult | None, str]] = []
        self.weak: list[tuple[Unit, str, TapResult]] = []  # read differently, within the thresholds
        self._stage_taps()

    # ---- where taps sit among the components
    def _stage_taps(self) -> None:
        """The tap keys each stage call produces, and the stage call producing each."""
        self.produced: dict[str, Unit] = {}
        self.outputs: dict[Unit, list[str]] = {}
        for u in self.units:
            stage = self.iso.stage(u)
            if stage is None:
                continue
            every = set(stage.taps.values())
            keys = [tap + (f"@{u.step}" if u.step is not None and tap in every else "")
                    for tap in self.iso.stage_taps(u).values()]
            self.outputs[u] = keys
            self.produced.update(dict.fromkeys(keys, u))

    def producer(self, row: TapResult) -> Unit | None:
        """The component whose output the tap is (None: code no component covers)."""
        info = row.info
        if info.layer is None:
            return self.produced.get(row.key)
        part = self.iso.ref_adapter.part_of(info.component)
        unit = None if part is None else Unit(info.stack, info.layer, info.step, part)
        return unit if unit in self.index else None

    def positions(self) -> dict[str, int]:
        """Each tap's place among the components: its producer's, else the latest one
        before it (-1: none)."""
        out, last = {}, -1
        for row in self.ordered:
            unit = self.producer(row)
            if unit is not None:
                last = max(last, self.index[unit])
                out[row.key] = self.index[unit]
            else:
                out[row.key] = last
        return out

    def exact_outputs(self, unit: Unit) -> bool:
        """Every output of the component is a tap that passed bit-exactly in the diff."""
        from parity.comparison.isolate import exact

        if self.iso.stage(unit) is not None:
            keys = self.outputs.get(unit, [])
        else:
            step = f"@{unit.step}" if unit.step is not None else ""
            keys = [f"{unit.stack}.{unit.layer}.{c}{step}" for c in self.iso.ref_adapter.outputs(unit.part).values()]
        return bool(keys) and all(k in self.rows and exact(self.rows[k]) for k in keys)

    # ---- the walk
    def run(self, first: TapResult) -> None:
        from parity.comparison.isolate import exact

        pos = self.positions()
        before = [r for r in self.ordered if first.order is not None and r.order < first.order and r.passed]
        after = before[-1] if before else None
        self.start = self.producer(first)
        hi = pos.get(first.key, self.index[self.start] if self.start is not None else len(self.units) - 1)
        lo = pos[after.key] if after is not None else -1
        between = self.units[lo + 1: hi + 1]
        self.loc.start = None if self.start is None else self.start.name
        self.loc.bracket = {"after": None if after is None else after.key, "before": first.key,
                            "after_exact": None if after is None else exact(after)}
        self.loc.between = [{"unit": u.name, "about": self._about(u)} for u in between[-MAX_BETWEEN:]]
        anchor = self.start or (self.units[hi] if hi >= 0 else None)
        if anchor is None:
            return
        for unit in reversed(between):
            if _stream(unit) == _stream(anchor):
                self.visit(unit)
                if self.done:
                    return
        if self.leads:
            self.loc.enters = self._enters(*self.leads[0])
            return
        upstream = [u for u in self.units[: lo + 1] if _stream(u) == _stream(anchor)]
        if upstream:
            self.stream(upstream[-1])
        for unit, name, read in list(self.weak):
            if self.done or self.leads:
                break
            self.follow(unit, name, read)
        if not self.done and self.leads:
            self.loc.enters = self._enters(*self.leads[0])

    @property
    def done(self) -> bool:
        return self.loc.introduced is not None

    def visit(self, unit: Unit):
        """Re-run one component; if it passes, follow what it read differently.  Its
        PartResult, None when it was not re-run."""
        from parity.comparison.isolate import exact

        if unit in self.seen:
            return None
        self.seen.add(unit)
        if self.exact_outputs(unit):
            self.loc.skipped.append(unit.name)
            return None
        if self.max_steps is not None and len(self.loc.steps) >= self.max_steps:
            raise _Stop
        self.current = unit.name
        res = self.iso.isolate(unit)
        self.loc.steps.append(res.to_dict())
        if not res.passed and not res.inherited_via:
            self.loc.introduced, self.loc.hint, self.loc.narrowed = unit.name, res.hint, res.narrowed
            self.loc.about = self._about(unit)
            return res
        reads = {r.info.component: r for r in res.reads}
        if res.inherited_via:  # only the kept inputs (its cache) make it fail: where do they come from?
            names = list(res.inherited_via)
        else:
            names = [n for n, r in reads.items() if not r.passed]
            if not names and unit == self.start:  # it passes on the reference's inputs: some read must differ
                names = [n for n, r in reads.items() if not exact(r)]
        self.weak += [(unit, n, r) for n, r in reads.items() if n not in names and not exact(r)]
        for name in names:
            self.follow(unit, name, reads.get(name))
            if self.done:
                break
        return res

    def follow(self, unit: Unit, value: str, read: TapResult | None) -> None:
        """Go to where a value `unit` read differently comes from."""
        from parity.comparison.isolate import exact, origin_of

        origin = origin_of(self.iso.ref_adapter, unit, value)
        if origin is None:
            return  # earlier in the unit's own stream: the walk there covers it
        if origin.words is not None:
            self.leads.append((unit, read, origin.words))
            return
        if origin.part is None:  # the end of another stream: walk it upstream
            target = next((u for u in reversed(self.units[: self.index[unit]])
                           if (u.stack, u.step) == (origin.stack, origin.step)), None)
            if target is not None:
                self.stream(target)
            return
        target = Unit(origin.stack, origin.layer, origin.step, origin.part)
        if target not in self.index:
            self.leads.append((unit, read, f"{target.name}, which the reference ran and the walk cannot re-run"))
            return
        res = self.visit(target)
        if self.done or read is None or read.passed:
            return
        keys = self.outputs.get(target, [])
        if keys and all(k in self.rows and self.rows[k].passed for k in keys):  # handed on right, read wrong
            self.leads.append((unit, read, f"what happens to it between {target.name}, whose output passes, "
                                           f"and {unit.name}"))
        elif res is not None and res.passed and all(exact(r) for r in res.reads):
            self.leads.append((unit, read, f"what happens to it between {target.name}, right on the same inputs "
                                           f"as the reference's, and {unit.name}"))

    def stream(self, last: Unit) -> None:
        """Re-run a stream's components from `last` upstream, stopping after the first
        layer whose input the candidate read bit-identically."""
        from parity.comparison.isolate import exact

        units = [u for u in self.units[: self.index[last] + 1] if _stream(u) == _stream(last)]
        for unit in reversed(units):
            self.visit(unit)
            if self.done:
                return
            first_part = unit.layer is not None and unit.part == self.iso.ref_adapter.walk_parts(unit.stack)[0]
            if first_part and all(exact(r) for r in self.iso.reads_of(unit)):
                return  # the layer's input is the reference's: nothing earlier reaches past it

    # ---- words
    def _about(self, unit: Unit) -> str | None:
        stage = self.iso.stage(unit)
        return None if stage is None else stage.about

    def _enters(self, unit: Unit, read: TapResult | None, words: str) -> str:
        if read is None:
            how = "differs from the reference's"
        elif not read.passed:
            how = f"differs from the reference's ({read.reason})"
        else:
            how = f"differs from the reference's (max |Δ| {read.metrics.max_abs:.4g}, within the thresholds)"
        value = "value" if read is None else read.info.component
        who = "it reads" if unit == self.start else f"{unit.name} reads"
        return f"the {value} {who} {how}: the error enters in {words}"
