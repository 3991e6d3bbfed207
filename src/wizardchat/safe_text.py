"""Untrusted text made safe for a terminal: control characters shown, never obeyed.

A reply is untrusted text, and so is anything echoed back from outside (a saved conversation, a
file or session name, a path): an ESC, BEL or C1 control in it would otherwise reach the terminal
as a control sequence (clear the screen, set the title, reset the terminal, hide the text). Only
wizardchat's own styling may emit escapes.

The visible form is Python's escape notation, the one `ascii()` writes: `\\x1b` for ESC, `\\x07`
for BEL, `\\r` for a carriage return, `\\x7f` for DEL, `\\x9b` for a C1 CSI, `\\u202e` for a bidi
override. It reads as what it is, takes no special meaning in markdown (a backslash escapes only
punctuation, and a letter follows it here), and each character is handled alone, so streamed
chunks can be made safe one at a time whatever their boundaries. Text that already holds a
literal backslash-x sequence looks the same; `--json` output stays exact for whoever needs the
bytes.
"""

from __future__ import annotations

import re
from collections.abc import Iterable
from typing import TextIO

# Newline and tab are the only controls text needs; a terminal handles them without surprises.
_KEPT = {"\n", "\t"}
# CR too is escaped: alone, it moves the cursor back so later text overwrites the line.
_C0_AND_DEL = [c for c in range(0x20) if chr(c) not in _KEPT] + [0x7F]
# C1 controls: U+009B is CSI and U+009D is OSC to terminals that take 8-bit controls.
_C1 = list(range(0x80, 0xA0))
# Bidi embeddings, overrides and isolates (LRE RLE PDF LRO RLO, LRI RLI FSI PDI) are invisible
# and reorder how the text after them is shown ("Trojan Source"): a reply could display in an
# order other than the one it holds. Right-to-left text needs none of them (the terminal or the
# bidi algorithm orders it), so they are shown. The plain marks LRM/RLM and the zero-width
# joiners stay: emoji sequences, Indic and Persian text need them, and they reorder nothing.
_BIDI = [*range(0x202A, 0x202F), *range(0x2066, 0x206A)]

_UNSAFE_CODES = _C0_AND_DEL + _C1 + _BIDI
_UNSAFE = re.compile("[" + "".join(re.escape(chr(c)) for c in _UNSAFE_CODES) + "]")


def _visible(code: int) -> str:
    if code == 0x0D:
        return "\\r"
    return f"\\x{code:02x}" if code < 0x100 else f"\\u{code:04x}"


_TABLE = {c: _visible(c) for c in _UNSAFE_CODES}


def terminal_safe(text: str) -> str:
    """`text` with every control character but newline and tab written visibly (`\\x1b`)."""
    if _UNSAFE.search(text) is None:
        return text  # the common case: one scan, no copy
    return text.translate(_TABLE)


def is_terminal(stream: TextIO) -> bool:
    """Whether `stream` is a terminal, where untrusted text must be made safe.

    A pipe or a file gets the exact characters (`wizardchat ask ... > reply.txt`), as `--json`
    does in its own escaping; a closed or unusual stream counts as no terminal.
    """
    try:
        return stream.isatty()
    except (AttributeError, ValueError, OSError):
        return False


# JSON escapes C0 controls itself; these it would leave raw (with ensure_ascii=False).
_JSON_TABLE = {c: f"\\u{c:04x}" for c in [0x7F, *_C1, *_BIDI]}


def json_safe(json_text: str) -> str:
    """JSON text with DEL, C1 and bidi controls escaped as `\\u009b`: the same value to a parser.

    `json.dumps(..., ensure_ascii=False)` escapes only C0 controls; outside strings JSON text is
    ASCII, so every character replaced here sits in a string, where `\\uXXXX` means itself.
    """
    return json_text.translate(_JSON_TABLE)


def stream_plain(chunks: Iterable[str], out: TextIO, *, safe: bool | None = None) -> str:
    """Write each chunk as it arrives, flushed so pipes see it at once; return the whole text.

    With `safe` (by default: when `out` is a terminal) control characters are written visibly
    (safe_text); a pipe or file gets the exact text. The returned text is always the exact one.
    """
    if safe is None:
        safe = is_terminal(out)
    parts = []
    for chunk in chunks:
        out.write(terminal_safe(chunk) if safe else chunk)
        out.flush()
        parts.append(chunk)
    return "".join(parts)
