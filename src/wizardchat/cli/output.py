"""Where command output goes: replies to stdout (a failed write is exit 9, a cut pipe is not a
failure), plain or rich, and the quiet end of a stdout whose reader went away."""

from __future__ import annotations

import contextlib
import os
import sys
import typing
from typing import IO

from wizardchat.cli.environment import Environment
from wizardchat.errors import ExitCode, OutputError


class ReplyOutput:
    """stdout for replies: a failed write (disk full, I/O error) is an OutputError, exit 9.

    A cut pipe stays a BrokenPipeError: the reader went away, which is not a failure.
    """

    def __init__(self, stream: IO[str]) -> None:
        self.stream = stream

    def write(self, text: str) -> int:
        """Write, or raise what the failure means (see the class)."""
        try:
            return self.stream.write(text)
        except OSError as e:
            raise self._failed(e) from None

    def flush(self) -> None:
        """Flush, or raise what the failure means (see the class)."""
        try:
            self.stream.flush()
        except OSError as e:
            raise self._failed(e) from None

    def isatty(self) -> bool:
        """Whether the stream is a terminal."""
        return self.stream.isatty()

    def _failed(self, error: OSError) -> OSError | OutputError:
        if isinstance(error, BrokenPipeError):
            return error
        quiet_broken_pipe(self.stream)  # the unwritten rest must not fail again at exit
        return OutputError(f"cannot write output: {error.strerror or error}")


def reply_output(env: Environment) -> typing.TextIO:
    """stdout as ReplyOutput, typed as the text stream the writers of replies take."""
    return typing.cast(typing.TextIO, ReplyOutput(env.stdout))


def closed_at_start(stdout: IO[str]) -> bool:
    """Whether stdout was closed when wizardchat started (entry.ClosedOutput)."""
    return bool(getattr(stdout, "closed_at_start", False))


def stdout_failed(stdout: IO[str]) -> bool:
    """Whether stdout is what failed: closed from the start, or still unable to flush."""
    if closed_at_start(stdout):
        return True
    try:
        stdout.flush()
    except (OSError, ValueError):
        return True
    return False


def quiet_broken_pipe(stdout: IO[str]) -> None:
    """The reader went away (`| head`): point stdout at /dev/null so exit does not complain."""
    try:
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, stdout.fileno())
    except (OSError, ValueError):
        pass


def plain_output_wanted(env: Environment, plain: bool) -> bool:
    """--plain, NO_COLOR, TERM=dumb or output that is not a terminal all mean plain text."""
    return (
        plain
        or bool(env.environ.get("NO_COLOR"))
        or env.environ.get("TERM", "") in ("dumb", "unknown")
        or not env.stdout_is_terminal
    )


def write_untrusted(env: Environment, text: str) -> None:
    """Text with file names or metadata in it (any bytes): made safe when stdout is a terminal."""
    from wizardchat.safe_text import terminal_safe

    env.stdout.write((terminal_safe(text) if env.stdout_is_terminal else text) + "\n")


def output_failed(error: OSError) -> None:
    """Stdout failed outside the commands' error boundary: one line, exit 9 (ExitCode.OUTPUT)."""
    with contextlib.suppress(OSError):  # the unwritten rest goes to /dev/null, not to a 2nd error
        os.dup2(os.open(os.devnull, os.O_WRONLY), 1)
    sys.stderr.write(f"wizardchat: error: cannot write output: {error.strerror or error}\n")
    raise SystemExit(ExitCode.OUTPUT)
