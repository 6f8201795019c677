"""Showing untrusted text (tap names, paths, messages from dumps) on a terminal.

No heavy imports: the CLI uses it before any library module is loaded."""

from __future__ import annotations

import unicodedata

# Unicode categories never shown raw: controls (ESC can rewrite the terminal), format
# characters (bidi overrides reorder what is shown), line/paragraph separators, surrogates.
_HIDDEN_CATEGORIES = frozenset({"Cc", "Cf", "Zl", "Zp", "Cs", "Co", "Cn"})


def shown(value: object) -> str:
    """`value` as text that is safe on a terminal: control and format characters escaped.

    Tap names, paths and messages come from dumps, which may come from anywhere; they are
    shown as data (callers wrap them in `Text`, never in console markup) and a name like
    "\\x1b[2J" must not clear the screen."""
    text = str(value)
    if text.isprintable():
        return text
    out = []
    for ch in text:
        if unicodedata.category(ch) in _HIDDEN_CATEGORIES:
            code = ord(ch)
            out.append(f"\\x{code:02x}" if code < 0x100 else f"\\u{code:04x}" if code < 0x10000 else f"\\U{code:08x}")
        else:
            out.append(ch)
    return "".join(out)
