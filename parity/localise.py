"""Introduced or inherited: from the first divergence, walk upstream until a component
fails on the reference's own inputs.

The first failing tap is only where the error became visible; the component that
introduces it is the latest one (at or before it, in execution order) whose isolated
re-run still fails.  The verdict is a plain result object (JSON-ready); no torch here,
the isolator does the re-runs.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

OFFLINE_NOTE = "isolation needs live backends (re-run with --ref/--cand)"


@dataclass
class Localisation:
    """The verdict of the upstream walk.

    start: the component isolated first (the one producing the first divergence).
    introduced: the component that introduces the error, or None when none failed on its
        own (then the error comes from outside every isolatable component: embeddings,
        inputs, or small errors that only add up).
    steps: each isolated component, latest first, as `PartResult.to_dict()`s.
    note: why no isolation was done (offline dumps, no adapter, ...)."""

    start: str | None = None
    introduced: str | None = None
    hint: str | None = None
    narrowed: str | None = None
    steps: list[dict[str, Any]] = field(default_factory=list)
    note: str | None = None

    @property
    def inherited(self) -> bool:
        return self.start is not None and self.introduced != self.start

    def to_dict(self) -> dict[str, Any]:
        return {"start": self.start, "introduced": self.introduced, "inherited": self.inherited if self.start else None,
                "hint": self.hint, "narrowed": self.narrowed, "note": self.note, "steps": self.steps}

    @classmethod
    def from_dict(cls, d: dict[str, Any] | None) -> "Localisation | None":
        if not d:
            return None
        return cls(start=d.get("start"), introduced=d.get("introduced"), hint=d.get("hint"),
                   narrowed=d.get("narrowed"), steps=list(d.get("steps") or []), note=d.get("note"))

    def line(self) -> str:
        """The banner's words."""
        if self.note:
            return self.note
        if self.start is None:
            return "no component to isolate"
        first = self.steps[0] if self.steps else {}
        if self.introduced == self.start:
            return f"introduced at {self.start}: fails on the reference's own inputs ({_why(first)})"
        walked = len(self.steps) - 1
        if self.introduced is None:
            return (f"inherited: {self.start} passes on the reference's inputs; no component up to the first "
                    f"layer fails on its own ({walked} checked): the error enters before them")
        last = self.steps[-1]
        return (f"inherited: {self.start} passes on the reference's inputs; walked {walked} component(s) upstream: "
                f"introduced at {self.introduced} ({_why(last)})")


def _why(step: dict) -> str:
    if step.get("error"):
        return f"raised {step['error']}"
    bad = [o for o in step.get("outputs", []) if o.get("status") != "pass"]
    o = bad[0] if bad else (step.get("outputs") or [{}])[0]
    cos = o.get("cos")
    return f"{o.get('component')} cos {cos:.6f} < {o.get('threshold')}" if cos is not None else str(o.get("reason"))


def localise(report, isolator, max_steps: int | None = None) -> Localisation:
    """Isolate the first divergence's component; while it passes, the one before it."""
    from .isolate import IsolationError, unit_for

    first = report.first_divergence
    if first is None:
        return Localisation(note="nothing diverged")
    start = unit_for(first, report.rows, isolator.ref_adapter)
    if start is None:
        return Localisation(note=f"{first.key} is not inside an isolatable layer")
    units = isolator.units()
    if start not in units:
        return Localisation(note=f"{start.name} was not run by the reference")
    out = Localisation(start=start.name)
    for unit in reversed(units[: units.index(start) + 1]):
        if max_steps is not None and len(out.steps) >= max_steps:
            out.note = f"stopped after {max_steps} components without finding one that fails on its own"
            break
        try:
            res = isolator.isolate(unit)
        except IsolationError as exc:
            out.note = f"cannot isolate {unit.name}: {exc}"
            break
        out.steps.append(res.to_dict())
        if not res.passed:
            out.introduced, out.hint, out.narrowed = unit.name, res.hint, res.narrowed
            break
    return out
