"""Untrusted text made harmless for where it is shown: a terminal, a spreadsheet."""

from __future__ import annotations

import re
from typing import Any

# C0 and C1 controls, DEL, and the Unicode marks that reorder or break lines on screen:
# ESC alone lets an HTTP body or a comment set the window title, write the clipboard
# (OSC 52) or redraw lines; a newline in a comment would forge an "approved by" line.
_UNSAFE = re.compile("[\x00-\x1f\x7f-\x9f\u200e\u200f\u2028\u2029\u202a-\u202e\u2066-\u2069]")
_UNSAFE_IN_BLOCK = re.compile(
    "[\x00-\x08\x0b-\x1f\x7f-\x9f\u200e\u200f\u2028\u2029\u202a-\u202e\u2066-\u2069]"
)


def _escaped(match: re.Match[str]) -> str:
    char = match.group()
    named = {"\n": "\\n", "\r": "\\r", "\t": "\\t"}
    if char in named:
        return named[char]
    code = ord(char)
    return f"\\x{code:02x}" if code < 0x100 else f"\\u{code:04x}"


def shown(text: object) -> str:
    """One line of untrusted text for a terminal: every control character is shown
    escaped (`\\x1b`, `\\n`), never interpreted."""
    return _UNSAFE.sub(_escaped, str(text))


def shown_block(text: str) -> str:
    """Untrusted multi-line output (a step's stdout): lines and tabs kept, every other
    control character escaped."""
    return _UNSAFE_IN_BLOCK.sub(_escaped, text.replace("\r\n", "\n"))


# A spreadsheet runs a cell that starts with one of these as a formula (DDE, HYPERLINK).
_FORMULA_START = ("=", "+", "-", "@", "\t", "\r", "\uff1d", "\uff0b", "\uff0d", "\uff20")


def csv_cell(value: Any) -> Any:
    """A CSV cell that a spreadsheet shows as text: numbers stay numbers, a string that
    would start a formula gets a leading apostrophe (OWASP's advice)."""
    if isinstance(value, str) and value.startswith(_FORMULA_START):
        return "'" + value
    return value
