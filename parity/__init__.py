"""parity: a layer-by-layer numerical parity debugger for PyTorch models.

Library first: compare, capture, diff and gate are functions returning result objects
(`parity.api`; `parity.compare(ref, cand)` is the one-call entry); the `parity` command
is a thin shell over them, `parity.testing` / the pytest plugin turn a Report into an
assertion.  Importing parity never
imports torch: only live capture does.
"""
from .api import InputError, capture_live, capture_to_dump, compare, diff_dumps, diff_live, weights_live
from .diff import Thresholds
from .report import Report, TapResult

__version__ = "0.1.0"
__all__ = ["InputError", "Report", "TapResult", "Thresholds", "capture_live", "capture_to_dump", "compare",
           "diff_dumps", "diff_live", "weights_live", "__version__"]
