"""parity: a layer-by-layer numerical parity debugger for PyTorch models.

Library first: compare, capture, diff and gate are functions returning result objects
(`parity.api`; `parity.compare(ref, cand)` is the one-call entry); the `parity` command
is a thin shell over them, `parity.testing` / the pytest plugin turn a Report into an
assertion.  Importing parity never
imports torch: only live capture does.
"""

import importlib

__version__ = "0.1.0"


_EXPORTS = {"InputError": "errors", "capture_live": "api", "capture_to_dump": "api", "compare": "api",
            "diff_dumps": "api", "diff_live": "api", "weights_live": "api", "Thresholds": "comparison.rules",
            "Report": "report.results", "TapResult": "report.results"}


def __getattr__(name: str):
    """The public names, imported on first use so that `import parity` (and the CLI's
    start-up) does not pay for numpy and h5py until they are needed."""
    if name in _EXPORTS:
        return getattr(importlib.import_module(f".{_EXPORTS[name]}", __name__), name)
    raise AttributeError(f"module 'parity' has no attribute {name!r}")


__all__ = ["InputError", "Report", "TapResult", "Thresholds", "capture_live", "capture_to_dump", "compare",
           "diff_dumps", "diff_live", "weights_live", "__version__"]
