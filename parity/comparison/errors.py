"""What the comparison side raises when it cannot do what it was asked."""

from __future__ import annotations


class IsolationError(Exception):
    """The component cannot be isolated as asked (no such layer, part or adapter)."""
