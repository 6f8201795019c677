"""Showing untrusted text (tap names, paths, messages from dumps) on a terminal, and in
the HTML, XML and Markdown reports.

No heavy imports: the CLI uses it before any library module is loaded."""

from __future__ import annotations

import re
import unicodedata
from html import escape

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


def html_text(value: object) -> str:
    """`value` as HTML or XML character data (also inside a quoted attribute): `shown`
    first, so control, bidi and ESC characters, lone surrogates and newlines are escaped
    (XML 1.0 cannot hold most of them at all), then `& < > " '` as entities."""
    return escape(shown(value))


# Markdown that can begin anywhere in a line: code spans, emphasis, links and images,
# entities, strikethrough, math (GitHub), table cells; raw HTML and autolinks (`<` before a
# letter, `/`, `!` or `?`); emphasis by `_` (unless between two letters or digits); and at
# a line's start a heading, quote, list or setext underline.
_MD_MARKUP = re.compile(r"[\\`*\[\]&~$|]|<(?=[A-Za-z/!?])|(?<![^\W_])_|_(?![^\W_])|^[#>+=-]")


def md_text(value: object) -> str:
    """`value` as Markdown text that renders as exactly those characters: `shown` first
    (no newline, control or bidi character survives, so no line of markup can be
    started), then every character that could begin markup where it stands
    backslash-escaped (`_MD_MARKUP`): `cos 0.87 < 0.999` and `max_diff` stay as written."""
    text = _MD_MARKUP.sub(lambda m: "\\" + m.group(), shown(value))
    digits = len(text) - len(text.lstrip("0123456789"))
    if digits and text[digits:digits + 1] in (".", ")"):  # `1.` would start an ordered list
        text = text[:digits] + "\\" + text[digits:]
    return text


def md_code(value: object, in_table: bool = True) -> str:
    """`value` as a Markdown code span: `shown` first, fenced by one backtick more than
    the longest run inside it (so it cannot close early); in a table cell `|` escaped
    (GFM splits cells on it even inside code)."""
    text = shown(value)
    if not text:
        return ""
    if in_table:
        text = text.replace("|", "\\|")
    longest = run = 0
    for ch in text:
        run = run + 1 if ch == "`" else 0
        longest = max(longest, run)
    fence = "`" * (longest + 1)
    pad = " " if text[0] in "` " or text[-1] in "` " else ""
    return f"{fence}{pad}{text}{pad}{fence}"
