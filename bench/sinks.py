"""Capture sinks that isolate one part of what observing costs, shared by the bench scripts
(run as `python bench/NAME.py`, so this sits beside them)."""
from __future__ import annotations


class Dropped:
    """Keeps nothing: what is left is the cost of getting taps to a sink."""
    def add_layout(self, *a): pass
    def add_tap(self, *a): pass
    def set_error(self, *a): pass


class HooksOnly(Dropped):
    """Takes each tap as the live tensor and drops it: the cost of the hooks themselves."""
    def add_device_tap(self, info, order, value, layout): pass


class DeviceClone(Dropped):
    """Keeps a device-side clone of each tap: the floor of any exact capture (one copy per tap)."""
    def __init__(self): self.kept = []
    def add_device_tap(self, info, order, value, layout): self.kept.append(value.clone())
