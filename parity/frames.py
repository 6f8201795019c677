"""Sequences of observations: a candidate against the reference frame by frame, and one
backend's own drift from frame to frame by token region.

The seed's K/V-reuse failure lives here: reusing the prefix K/V across frames is only
safe for tokens that do not change, and from layer 1 on every token depends on the
images through attention.  The drift table shows which regions change between frames
at which layer; the per-frame diffs show where a stale candidate goes wrong."""
from __future__ import annotations

from dataclasses import dataclass, replace

from .api import capture_live, compare_captures
from .backends import BackendOptions
from .diff import Thresholds, diff
from .probe import tap_filter
from .report import Report


@dataclass
class FramesResult:
    frames: list[Report]  # candidate vs reference at frame 0, 1, ...
    drift: list[Report]  # the reference at frame f vs itself at frame f-1, for f >= 1 (not a verdict)

    @property
    def passed(self) -> bool:
        return bool(self.frames) and all(self.frames)

    def __bool__(self) -> bool:
        return self.passed

    def to_dict(self) -> dict:
        return {
            "passed": self.passed,
            "frames": [{"frame": f, "passed": r.passed,
                        "first_divergence": r.to_dict()["first_divergence"]} for f, r in enumerate(self.frames)],
            "drift": [{"frame": f + 1, "taps": [t.to_dict() for t in r.rows]} for f, r in enumerate(self.drift)],
        }


def compare_frames(ref: str, cand: str, options: BackendOptions, n_frames: int, faults: tuple[str, ...] = (),
                   thresholds: Thresholds | None = None, taps: str | None = None,
                   drift_taps: str | None = "prefix.*.k") -> FramesResult:
    """Frame f of both backends sees observation f (same prompt, new images and state);
    faults go to the candidate only.  Drift compares the reference's consecutive frames."""
    if n_frames < 1:
        raise ValueError("need at least one frame")
    reports, drift, previous = [], [], None
    for frame in range(n_frames):
        opts = replace(options, frame=frame)
        ref_cap = capture_live(ref, replace(opts, faults=()), taps)
        cand_cap = capture_live(cand, replace(opts, faults=tuple(faults)), taps)
        reports.append(compare_captures(ref_cap, cand_cap, thresholds))
        current = ref_cap.only(tap_filter(drift_taps)) if drift_taps else ref_cap
        if previous is not None:  # different inputs by design: no fingerprint check here
            drift.append(diff(previous, current, Thresholds(1.0)))
        previous = current
    return FramesResult(reports, drift)
