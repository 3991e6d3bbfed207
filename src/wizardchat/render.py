"""Writing replies and status to a terminal or a pipe (plain text; markdown comes with the REPL)."""

from __future__ import annotations

from collections.abc import Iterable
from typing import TextIO

from wizardchat.safe_text import is_terminal, terminal_safe


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


class LoadProgress:
    """A one-line load progress bar on a terminal (llama.cpp reports fractions 0..1)."""

    WIDTH = 30

    def __init__(self, out: TextIO, label: str) -> None:
        self.out = out
        self.label = terminal_safe(label)  # a file name: whatever the user or a download chose
        self._shown = -1

    def __call__(self, fraction: float) -> None:
        percent = int(fraction * 100)
        if percent == self._shown:
            return  # llama.cpp calls back per tensor; redraw only when the number changes
        self._shown = percent
        filled = self.WIDTH * percent // 100
        bar = "█" * filled + "░" * (self.WIDTH - filled)
        self.out.write(f"\rloading {self.label} {bar} {percent:3d}%")
        self.out.flush()

    def done(self) -> None:
        """Erase the bar."""
        if self._shown >= 0:
            self.out.write("\r\x1b[2K")
            self.out.flush()
