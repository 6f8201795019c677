"""Per-architecture probes: which modules are which taps, and the bundled backends."""
