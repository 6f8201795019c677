"""Per-layer curves of a report: for each stack, each component's metric across layers.

The shared shape behind the HTML plots, the Markdown table and the terminal table; a tap
seen at several steps is represented by its worst step."""

from __future__ import annotations

import math
from dataclasses import dataclass
from functools import cached_property

from parity.report.results import Report, TapResult


def worst(rows: list[TapResult]) -> TapResult:
    """The row to show for a (layer, component) seen at several steps: the first failure,
    else the lowest cosine."""
    failing = [r for r in rows if not r.passed]
    if failing:
        return failing[0]
    return min(rows, key=lambda r: r.cos if r.cos is not None and not math.isnan(r.cos) else -2.0)


@dataclass(frozen=True)
class Point:
    layer: int
    row: TapResult  # the (worst) tap at this layer

    @property
    def cos(self) -> float | None:
        return self.row.cos

    @property
    def rel_l2(self) -> float | None:
        return self.row.metrics.rel_l2 if self.row.metrics else None


@dataclass(frozen=True)
class StackSeries:
    stack: str
    components: tuple[str, ...]  # in execution order
    layers: tuple[int, ...]
    points: dict[str, tuple[Point, ...]]  # component -> points by layer
    steps: int  # how many steps the stack's taps were recorded at (0 = not stepped)

    def cell(self, layer: int, component: str) -> TapResult | None:
        return self._cells.get((layer, component))

    @cached_property
    def _cells(self) -> dict[tuple[int, str], TapResult]:
        """(layer, component) -> row: a table of L layers asks L * components cells."""
        return {(p.layer, c): p.row for c, points in self.points.items() for p in points}


def stack_series(report: Report) -> list[StackSeries]:
    """One StackSeries per stack with per-layer taps, in the order stacks first ran."""
    grouped: dict[str, dict[tuple[int, str], list[TapResult]]] = {}
    components: dict[str, list[str]] = {}
    steps: dict[str, set[int]] = {}
    for r in report.rows:
        if r.info.layer is None:
            continue
        st = r.info.stack
        grouped.setdefault(st, {}).setdefault((r.info.layer, r.info.component), []).append(r)
        comps = components.setdefault(st, [])
        if r.info.component not in comps:
            comps.append(r.info.component)
        if r.info.step is not None:
            steps.setdefault(st, set()).add(r.info.step)
    out = []
    for st, cells in grouped.items():
        layers = tuple(sorted({layer for layer, _ in cells}))
        points = {c: tuple(Point(layer, worst(cells[(layer, c)])) for layer in layers if (layer, c) in cells)
                  for c in components[st]}
        out.append(StackSeries(st, tuple(components[st]), layers, points, len(steps.get(st, ()))))
    return out


def stack_level(report: Report) -> list[TapResult]:
    """Taps with no layer (embeddings, final norms, logits), worst step each, in order."""
    groups: dict[str, list[TapResult]] = {}
    for r in report.rows:
        if r.info.layer is None:
            groups.setdefault(r.info.name, []).append(r)
    return [worst(rows) for rows in groups.values()]
