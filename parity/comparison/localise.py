"""Introduced or inherited: from the first divergence, walk upstream until a component
fails on the reference's own inputs.

The first failing tap is only where the error became visible; the component that
introduces it is the latest one (at or before it, in execution order) whose isolated
re-run still fails.  The verdict is a plain result object (JSON-ready); no torch here,
the isolator does the re-runs.
"""

from __future__ import annotations

from parity.report.results import Localisation


def localise(report, isolator, max_steps: int | None = None) -> Localisation:
    """Isolate the first divergence's component; while it passes, the one before it."""
    from parity.comparison.isolate import IsolationError, unit_for

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
