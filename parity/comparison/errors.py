"""What the comparison side raises when it cannot do what it was asked."""

from __future__ import annotations


class IsolationError(Exception):
    """The component cannot be isolated as asked (no such layer, part or adapter)."""


def crash_line(exc: BaseException) -> str:
    """An exception in one line: `Type: first line of its message` (third-party messages
    can run for pages)."""
    text = str(exc).strip()
    return f"{type(exc).__name__}: {text.splitlines()[0] if text else ''}"
