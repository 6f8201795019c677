"""parity: a layer-by-layer numerical parity debugger for PyTorch models.

Library first: capture, diff and gate are functions returning result objects
(`parity.api`); the `parity` command is a thin shell over them.  Importing parity never
imports torch: only live capture does.
"""
from .api import InputError, capture_live, capture_to_dump, compare, diff_dumps, diff_live
from .diff import Thresholds
from .report import Report, TapResult

__version__ = "0.1.0"
__all__ = ["InputError", "Report", "TapResult", "Thresholds", "capture_live", "capture_to_dump", "compare",
           "diff_dumps", "diff_live", "__version__"]
