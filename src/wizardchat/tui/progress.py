"""Progress on stderr: the load bar and the prompt-evaluation line."""

from __future__ import annotations

import threading
from typing import TextIO

from wizardchat.safe_text import terminal_safe


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


class PromptProgressLine:
    """`⠹ evaluating 4,537 tokens… 35%` on one terminal line while a prompt is evaluated.

    The engine reports after each batch of the prompt, which for a short prompt is once at the
    end, so a thread redraws the line (a spinner) in between. Nothing shows for a prompt done
    within `delay`; `end` (the reply comes next) erases the line before any of the reply is
    written. Spaces erase it, so a dumb terminal is fine too.
    """

    SPINNER = "⠋⠙⠹⠸⠼⠴⠦⠧⠇⠏"
    FRAME_SECONDS = 0.1

    def __init__(self, out: TextIO, *, delay: float = 0.3) -> None:
        self.out = out
        self.delay = delay
        self._done = self._total = 0
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._width = 0  # columns of the line on screen; 0 when none is shown

    def update(self, done: int, total: int) -> None:
        """`done` of `total` prompt tokens are evaluated (called on the engine's thread)."""
        with self._lock:
            self._done, self._total = done, total
        if self._thread is None:
            self._stop.clear()
            self._thread = threading.Thread(target=self._run, name="prompt-progress", daemon=True)
            self._thread.start()

    def end(self) -> None:
        """Stop redrawing and erase the line; idempotent."""
        thread, self._thread = self._thread, None
        if thread is not None:
            self._stop.set()
            thread.join()
        if self._width:
            self._write("\r" + " " * self._width + "\r")
            self._width = 0

    def text(self, frame: int) -> str:
        """The line for spinner frame `frame`."""
        with self._lock:
            done, total = self._done, self._total
        line = f"{self.SPINNER[frame % len(self.SPINNER)]} evaluating {total:,} tokens…"
        return f"{line} {100 * done // total}%" if 0 < done < total else line

    def _run(self) -> None:
        frame = 0
        wait = self.delay
        while not self._stop.wait(wait):
            line = self.text(frame)
            if not self._write("\r" + line.ljust(self._width)):
                return
            self._width = max(self._width, len(line))
            frame += 1
            wait = self.FRAME_SECONDS

    def _write(self, text: str) -> bool:
        try:
            self.out.write(text)
            self.out.flush()
        except (OSError, ValueError):  # the terminal went away, or cannot show these characters
            return False
        return True
