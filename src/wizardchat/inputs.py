"""Reading what the user hands in: text repaired to valid Unicode, bounded reads, regular files.

Everything that arrives as text (argv, the environment, piped stdin, JSON lines, files) goes
through here, so invalid UTF-8 is replaced the same way everywhere and no read can grow without
end (`yes |`, `/dev/zero`) or block forever (a FIFO nobody writes).
"""

from __future__ import annotations

import os
import re
import stat
from collections.abc import Iterator
from pathlib import Path
from typing import BinaryIO

from wizardchat.errors import ContextError

# A token of any vocabulary wizardchat loads covers far fewer bytes than this; text longer than
# n_ctx * MAX_BYTES_PER_TOKEN bytes therefore cannot fit the context, whatever it says.
MAX_BYTES_PER_TOKEN = 64
# Piped stdin is read before the model (and its context) is known: this much, and no more.
STDIN_LIMIT = 16 * 1024 * 1024
_CHUNK = 1 << 16
_SURROGATES = re.compile("[\ud800-\udfff]+")


def _replace_surrogates(match: re.Match[str]) -> str:
    out = []
    for ch in match.group():
        code = ord(ch)
        # 0xDC80-0xDCFF is how Python smuggles an undecodable byte through argv and os.environ
        # (surrogateescape); turn those back into bytes so they get U+FFFD as stdin's would.
        out.append(bytes([code - 0xDC00]) if 0xDC80 <= code <= 0xDCFF else b"\xff")
    return b"".join(out).decode("utf-8", errors="replace")


def repair_text(text: str) -> str:
    """`text` with undecodable argv/env bytes and lone surrogates replaced by U+FFFD."""
    if text.isascii():
        return text
    return _SURROGATES.sub(_replace_surrogates, text)


class TooLongError(Exception):
    """A read went over its limit."""


def read_limited(stream: BinaryIO, limit: int) -> bytes:
    """All of `stream`, or TooLongError as soon as it passes `limit` bytes."""
    chunks: list[bytes] = []
    size = 0
    while True:
        chunk = stream.read(min(_CHUNK, limit + 1 - size))
        if not chunk:
            return b"".join(chunks)
        chunks.append(chunk)
        size += len(chunk)
        if size > limit:
            raise TooLongError


def read_lines(stream: BinaryIO, limit: int) -> Iterator[str]:
    """The lines of `stream`, decoded with U+FFFD for invalid UTF-8; TooLongError at a line
    over `limit` bytes (`cat /dev/zero |` has no end to skip to, so the reading stops there)."""
    while True:
        raw = stream.readline(limit + 1)
        if not raw:
            return
        if len(raw) > limit and not raw.endswith(b"\n"):
            raise TooLongError
        yield raw.decode("utf-8", errors="replace")


def regular_file_problem(path: Path) -> str | None:
    """Why `path` is not a regular file one can read to the end (None when it is one).

    Checked before opening: opening a FIFO blocks until a writer comes, and a device such as
    /dev/zero never ends.
    """
    try:
        mode = os.stat(path).st_mode
    except OSError as e:
        return e.strerror or str(e)
    if stat.S_ISREG(mode):
        return None
    if stat.S_ISDIR(mode):
        return "is a directory"
    if stat.S_ISFIFO(mode):
        return "is a FIFO (named pipe), not a file"
    if stat.S_ISCHR(mode) or stat.S_ISBLK(mode):
        return "is a device, not a file"
    if stat.S_ISSOCK(mode):
        return "is a socket, not a file"
    return "is not a regular file"


def check_fits(text: str, n_ctx: int, what: str) -> None:
    """Refuse text that cannot fit an `n_ctx`-token context before tokenizing it all (megabytes
    take a while); `what` starts the message, e.g. "message too long"."""
    if len(text) > n_ctx * MAX_BYTES_PER_TOKEN:  # len in characters <= bytes
        raise ContextError(
            f"{what}: {len(text)} characters cannot fit in the {n_ctx}-token context "
            "(use a larger --ctx-size or shorter text)"
        )
