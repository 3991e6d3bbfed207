"""Writing replies and status to a terminal or a pipe (plain text; markdown comes with the REPL)."""

from __future__ import annotations

from collections.abc import Iterable
from typing import TextIO


def stream_plain(chunks: Iterable[str], out: TextIO) -> str:
    """Write each chunk as it arrives, flushed so pipes see it at once; return the whole text."""
    parts = []
    for chunk in chunks:
        out.write(chunk)
        out.flush()
        parts.append(chunk)
    return "".join(parts)


class LoadProgress:
    """A one-line load progress bar on a terminal (llama.cpp reports fractions 0..1)."""

    WIDTH = 30

    def __init__(self, out: TextIO, label: str) -> None:
        self.out = out
        self.label = label
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
