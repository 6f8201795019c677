"""What observing did to the run: the ways taps can change how a candidate executes.

Under torch.compile every hook is a graph break (the compiled pieces between taps are
smaller and fuse less); a model that caches captured execution (CUDA graphs) may
re-capture it with the taps inside and say how that run differs (`parity_instrumented`
returns a note); hooks on modules that never ran mean cached or compiled code ran without
them, or the model skipped those modules.  Kept in the capture's metadata under
"observation", so a report can say that a side was not observed as it runs unobserved.
"""

from __future__ import annotations

import re
import sys

_REASONS = 5  # graph-break reasons kept, most frequent first
TAP_HOOK = "a parity tap hook: each tapped module is a graph break, its output copied out"
INPUT_HOOK = "a parity input hook: the inputs of each tapped module are kept for isolation re-runs"


def opaque(fn, reason: str):
    """`fn` wrapped so torch.compile never traces it (a graph break), the break recorded
    with `reason` (dynamo's own reason is a bare "<lambda> ... was wrapped")."""
    import torch

    try:
        return torch.compiler.disable(fn, recursive=True, reason=reason)
    except TypeError:  # a torch without `reason`
        return torch.compiler.disable(fn, recursive=True)


def _label(reason: str) -> str:
    """A graph-break reason in a few words: the `reason:` it was given, else its first line."""
    found = re.search(r"\(reason: (.+?)\)", reason)
    if found and found.group(1) != "None":
        return found.group(1)
    return next((line.strip() for line in reason.splitlines() if line.strip()), reason)[:200]


def _dynamo_counts() -> tuple[dict, int]:
    """(graph-break reason -> count, graphs compiled) so far in this process; dynamo's own
    counters, read only if something already imported dynamo (never imported here)."""
    utils = sys.modules.get("torch._dynamo.utils")
    if utils is None:
        return {}, 0
    counters = utils.counters
    return dict(counters["graph_break"]), int(counters["stats"].get("unique_graphs", 0))


class Observation:
    """Started before a run, finished after it: the difference is what observing did."""

    def __init__(self) -> None:
        self._breaks, self._graphs = _dynamo_counts()

    def finish(self, model_note, installed: set[str], ran: set[str]) -> dict:
        breaks, graphs = _dynamo_counts()
        new: dict[str, int] = {}
        for k, v in breaks.items():
            if v > self._breaks.get(k, 0):
                label = _label(str(k))
                new[label] = new.get(label, 0) + v - self._breaks.get(k, 0)
        out: dict = {}
        if new:
            out["graph_breaks"] = sum(new.values())
            by_count = sorted(new.items(), key=lambda kv: -kv[1])
            out["graph_break_reasons"] = [f"{k} (x{n})" for k, n in by_count][:_REASONS]
        if graphs > self._graphs:
            out["graphs_compiled"] = graphs - self._graphs
        if model_note:
            out["model"] = str(model_note)
        not_run = sorted(installed - ran)
        if not_run:
            out["tapped_modules_not_run"] = len(not_run)
            out["tapped_modules_not_run_first"] = not_run[:_REASONS]
        return out


def describe(observation: dict | None) -> str | None:
    """One line for a report header, None when observing changed nothing we can tell."""
    if not observation:
        return None
    parts = []
    if observation.get("graph_breaks"):
        parts.append(f"{observation['graph_breaks']} graph breaks while taps were installed")
    if observation.get("model"):
        parts.append(str(observation["model"]))
    if observation.get("tapped_modules_not_run"):
        parts.append(f"{observation['tapped_modules_not_run']} tapped modules never ran "
                     f"(e.g. {', '.join(observation.get('tapped_modules_not_run_first', [])[:2])})")
    return "; ".join(parts) or None
