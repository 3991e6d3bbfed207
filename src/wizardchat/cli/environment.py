"""What a command may touch of the world outside it: the three streams, which of them are
terminals, and the environment variables, as one object built once (in main, from sys).

Commands take it as a parameter instead of reading sys.stdin/stdout/stderr, isatty() and
os.environ themselves, so a test can run them in process with streams of its own.
"""

from __future__ import annotations

import os
import sys
from collections.abc import Mapping
from dataclasses import dataclass
from typing import TextIO

from wizardchat.safe_text import is_terminal, terminal_safe


@dataclass(frozen=True)
class Environment:
    """The streams and environment variables of one run of wizardchat."""

    stdin: TextIO | None  # None: Python started without one
    stdout: TextIO
    stderr: TextIO
    environ: Mapping[str, str]
    stdin_is_terminal: bool
    stdout_is_terminal: bool
    stderr_is_terminal: bool

    @classmethod
    def from_sys(cls) -> Environment:
        """This process's streams (as entry.guard_standard_streams left them) and os.environ."""
        return cls(
            stdin=sys.stdin,
            stdout=sys.stdout,
            stderr=sys.stderr,
            environ=os.environ,
            stdin_is_terminal=sys.stdin is not None and is_terminal(sys.stdin),
            stdout_is_terminal=is_terminal(sys.stdout),
            stderr_is_terminal=is_terminal(sys.stderr),
        )

    @property
    def interactive(self) -> bool:
        """Whether a person can be asked a question: stdin and stderr are terminals."""
        return self.stdin_is_terminal and self.stderr_is_terminal

    def confirm(self, question: str) -> bool:
        """Ask a yes/no question on the terminal (stderr, then the answer from /dev/tty, else
        from stdin when it is one); anything but y/yes is no. The question names models and
        files from the hub and the disk: control characters are shown, not obeyed."""
        self.stderr.write(terminal_safe(question))
        self.stderr.flush()
        try:
            with open("/dev/tty", encoding="utf-8") as tty:
                answer = tty.readline()
        except OSError:
            answer = self.stdin.readline() if self.stdin and self.stdin_is_terminal else ""
        return answer.strip().lower() in ("y", "yes")

    def say(self, message: str) -> None:
        """One message on stderr, control characters made visible: messages echo untrusted text
        (paths, names, the prompt with past replies), and stderr is for people, pipe or not."""
        try:
            self.stderr.write(terminal_safe(message) + "\n")
            self.stderr.flush()
        except (OSError, ValueError):
            pass  # a full or closed stderr loses the message, never the reply or the exit code
