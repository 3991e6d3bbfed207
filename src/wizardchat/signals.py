"""SIGTERM and SIGHUP (a kill, a closed terminal) end a chat the way Ctrl-C ends a reply.

While a reply streams, the signal only asks the session to stop after the current token, so the
partial reply is closed, marked interrupted and saved before the process exits. Between replies
(waiting for input) there is nothing unsaved, and the signal ends the chat at once by raising
`Terminated`. Either way the exit status is 128 + the signal number, as a shell reports it.
"""

from __future__ import annotations

import contextlib
import signal
from collections.abc import Callable, Iterator
from types import FrameType
from typing import Any

# SIGHUP does not exist on Windows.
SIGNALS = tuple(s for s in (getattr(signal, "SIGTERM", None), getattr(signal, "SIGHUP", None)) if s)


class Terminated(BaseException):
    """SIGTERM or SIGHUP arrived while no reply was streaming (BaseException: not an error to
    catch and carry on from)."""

    def __init__(self, signum: int) -> None:
        super().__init__(f"terminated by signal {signum}")
        self.signum = signum


class Termination:
    """Handles SIGTERM/SIGHUP for one chat; use as a context manager around it."""

    def __init__(
        self, cancel: Callable[[], None], idle: Callable[[BaseException], None] | None = None
    ) -> None:
        self.cancel = cancel
        # Ends whatever waits for input between replies; raising is the default way.
        self.idle = idle
        self.received: int | None = None  # the signal that arrived, if any
        self._replying = False
        self._previous: dict[int, Any] = {}

    @property
    def exit_code(self) -> int:
        """128 + the signal number (0 when none arrived)."""
        return 128 + self.received if self.received else 0

    def _handle(self, signum: int, frame: FrameType | None) -> None:
        self.received = signum
        if self._replying:
            self.cancel()  # the reply ends after this token; the caller saves, then exits
        elif self.idle is not None:
            self.idle(Terminated(signum))
        else:
            raise Terminated(signum)

    @contextlib.contextmanager
    def replying(self) -> Iterator[None]:
        """While active, a signal stops the reply instead of raising."""
        self._replying = True
        try:
            yield
        finally:
            self._replying = False

    def __enter__(self) -> Termination:
        for signum in SIGNALS:
            self._previous[signum] = signal.signal(signum, self._handle)
        return self

    def __exit__(self, *exc: object) -> None:
        for signum, previous in self._previous.items():
            signal.signal(signum, previous)
        self._previous.clear()


# Undo functions for state the process must not leave behind (the terminal's modes) when it
# ends without unwinding: ggml's abort handler calls `before_fatal_exit` before os._exit.
_fatal_hooks: list[Callable[[], None]] = []


@contextlib.contextmanager
def undo_on_fatal_exit(undo: Callable[[], None]) -> Iterator[None]:
    """While active, `before_fatal_exit` runs `undo`."""
    _fatal_hooks.append(undo)
    try:
        yield
    finally:
        _fatal_hooks.remove(undo)


def before_fatal_exit() -> None:
    """Run the registered undo functions, newest first, ignoring their failures."""
    for undo in reversed(_fatal_hooks):
        with contextlib.suppress(Exception):
            undo()
