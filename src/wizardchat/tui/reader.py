"""Reading the user's messages: prompt-toolkit on a real terminal, plain lines elsewhere.

Both readers return one message per call, raise EOFError on Ctrl-D, and raise KeyboardInterrupt
for Ctrl-C on an empty line (prompt-toolkit's Ctrl-C on a line with text just clears it; with
plain line input the terminal drops the line itself, so every Ctrl-C counts as on an empty
line). prompt-toolkit is imported only here and only when a terminal can use it, so batch mode
and `--help` never pay for it.
"""

from __future__ import annotations

import contextlib
import errno
import os
import stat
import sys
from collections.abc import Callable, Iterable, Iterator
from pathlib import Path
from typing import TYPE_CHECKING, Protocol, TextIO

if TYPE_CHECKING:
    from prompt_toolkit.completion import CompleteEvent, Completer, Completion
    from prompt_toolkit.document import Document
    from prompt_toolkit.history import History
    from prompt_toolkit.key_binding import KeyBindings

PROMPT = ">>> "
CONTINUATION = "... "
FENCE = '"""'


def opens_block(text: str) -> bool:
    """Whether `text` starts a \"\"\" block that is not closed yet."""
    stripped = text.strip()
    return stripped.startswith(FENCE) and (len(stripped) < 6 or not stripped.endswith(FENCE))


def unwrap_block(text: str) -> str:
    """The message inside a \"\"\" ... \"\"\" block (other text is returned as it is)."""
    stripped = text.strip()
    if stripped.startswith(FENCE):
        inner = stripped[len(FENCE) :]
        if inner.endswith(FENCE):
            inner = inner[: -len(FENCE)]
        return inner.strip("\n").strip()
    return text


def as_typed(message: str) -> str:
    """`message` as it looks typed at the prompt: `>>> ` before the first line, `... ` before
    the others (for a message the terminal did not echo, one composed in $EDITOR)."""
    first, *rest = message.split("\n")
    return "\n".join([PROMPT + first, *(CONTINUATION + line for line in rest)])


class LineReader(Protocol):
    """Where the REPL gets messages from."""

    # The terminal edits the lines (plain input), so its line editing stays on while a reply
    # streams: a Ctrl-D typed ahead is still end-of-input.
    line_mode: bool
    # Ctrl-C cleared a line with text during the last `read`: not a step toward exiting.
    cleared_a_line: bool

    def read(self, status: str) -> str:
        """One message (a \"\"\" block already unwrapped); `status` is the toolbar text."""
        ...

    def stop(self, reason: BaseException) -> None:
        """End the `read` in progress by raising `reason` from it (a signal's way out)."""
        ...


class PlainReader:
    """Line input for dumb terminals and redirected output: no escape codes at all."""

    line_mode = True  # the terminal edits the lines (Ctrl-D, backspace), not this program
    cleared_a_line = False  # the terminal drops the line on Ctrl-C: each one counts to exit

    def __init__(self, stdin: TextIO, prompt_out: TextIO) -> None:
        self.stdin = stdin
        self.prompt_out = prompt_out

    def stop(self, reason: BaseException) -> None:
        """Raise `reason`: from the signal handler, it ends the `readline` in progress."""
        raise reason

    def _line(self, prompt: str) -> str:
        self.prompt_out.write(prompt)
        self.prompt_out.flush()
        try:
            line = self.stdin.readline()
        except BaseException:
            self._end_line()  # Ctrl-C (the terminal echoed ^C), SIGTERM: no Enter ended it
            raise
        if not line.endswith("\n"):
            self._end_line()  # Ctrl-D: the terminal echoes nothing, the cursor stays put
        if not line:
            raise EOFError
        return line.rstrip("\r\n")

    def _end_line(self) -> None:
        """Move off the prompt line, so what is printed next (a note, the goodbye, the shell's
        prompt) starts on its own line."""
        with contextlib.suppress(OSError, ValueError):  # the terminal may have hung up
            self.prompt_out.write("\n")
            self.prompt_out.flush()

    def read(self, status: str) -> str:
        first = self._line(PROMPT)
        if not opens_block(first):
            return first
        lines = [first]
        while not lines[-1].rstrip().endswith(FENCE) or len(lines) == 1:
            try:
                lines.append(self._line(CONTINUATION))
            except EOFError:
                break  # the block ends with the input
        return unwrap_block("\n".join(lines))


class ToolkitReader:
    """prompt-toolkit input: history file, completion, multi-line, $EDITOR, toolbar."""

    line_mode = False  # prompt-toolkit edits the line: the terminal is raw meanwhile

    def __init__(
        self,
        history_path: Path,
        command_names: Iterable[str],
        argument_kinds: dict[str, str],
        session_names: Callable[[], list[str]],
        setting_names: Iterable[str],
        warn: Callable[[str], None] = lambda text: None,
    ) -> None:
        from prompt_toolkit import PromptSession

        self._history = _input_history(history_path)
        self._warn = warn
        self._warned = False
        self._status = ""
        self.cleared_a_line = False
        self.session: PromptSession[str] = PromptSession(
            history=self._history,
            completer=_completer(command_names, argument_kinds, session_names, setting_names),
            complete_while_typing=False,
            key_bindings=_key_bindings(on_clear=self._cleared),
            bottom_toolbar=lambda: self._status,
            enable_open_in_editor=True,
            enable_suspend=True,  # Ctrl-Z stops the process as in any shell program; fg resumes
            # "... " starts each new line of a message; a long line wraps under its own text.
            prompt_continuation=lambda width, line, wrap: " " * width if wrap else CONTINUATION,
        )

    def read(self, status: str) -> str:
        self._report_history_problem()
        self._status = status
        self.cleared_a_line = False
        try:
            return unwrap_block(self.session.prompt(PROMPT))
        finally:
            self._report_history_problem()

    def _cleared(self) -> None:
        self.cleared_a_line = True

    def stop(self, reason: BaseException) -> None:
        """End the prompt being read by raising `reason` from `read` (a signal's way out).

        Raised straight from a signal handler, an exception lands inside prompt-toolkit's event
        loop, which catches it and waits for Enter; exiting the application restores the
        terminal and raises it from `prompt()`.
        """
        app = self.session.app
        if app.is_running and app.future is not None and not app.future.done():
            app.exit(exception=reason)
        else:
            raise reason

    def _report_history_problem(self) -> None:
        """Say once, between prompts, that the history file is not used (never mid-prompt)."""
        problem = getattr(self._history, "problem", "")
        if problem and not self._warned:
            self._warned = True
            self._warn(
                f"wizardchat: warning: input history not kept: {problem}; "
                "this chat's history is in memory only"
            )


def _input_history(path: Path) -> History:
    """A FileHistory kept private (0600 in a 0700 directory, whatever the umask) that falls
    back to memory, with `problem` set, when the file cannot be read or written."""
    from prompt_toolkit.history import FileHistory

    class SafeFileHistory(FileHistory):
        """prompt-toolkit reads the file in a background thread and appends after each
        message; an error there would print a traceback every time."""

        problem = ""

        def load_history_strings(self) -> Iterable[str]:
            if self.problem:
                return []
            try:
                return list(super().load_history_strings())
            except (OSError, ValueError) as e:
                self._fail(e)
                return []

        def store_string(self, string: str) -> None:
            if self.problem:
                return
            try:
                super().store_string(string)
            except (OSError, ValueError) as e:
                self._fail(e)

        def _fail(self, error: Exception) -> None:
            reason = error.strerror if isinstance(error, OSError) and error.strerror else error
            self.problem = f"cannot use {path} ({reason})"

    history = SafeFileHistory(str(path))
    try:
        _private_file(path)
    except OSError as e:
        history._fail(e)
    return history


def _private_file(path: Path) -> None:
    """Create `path` 0600 (and its directory 0700) if missing; tighten looser modes; check that
    it is a regular file we can read and append to."""
    from wizardchat.paths import make_private_dir

    make_private_dir(path.parent)
    flags = os.O_RDWR | os.O_APPEND | os.O_CREAT | getattr(os, "O_CLOEXEC", 0)
    fd = os.open(path, flags | getattr(os, "O_NONBLOCK", 0), 0o600)
    try:
        info = os.fstat(fd)
        if not stat.S_ISREG(info.st_mode):
            raise OSError(errno.EINVAL, "not a regular file")
        if stat.S_IMODE(info.st_mode) & 0o077:
            with contextlib.suppress(OSError):  # not ours to change: use it as it is
                os.fchmod(fd, 0o600)  # it holds every message typed
    finally:
        os.close(fd)


def _key_bindings(on_clear: Callable[[], None]) -> KeyBindings:
    from prompt_toolkit.filters import Condition
    from prompt_toolkit.key_binding import KeyBindings, KeyPressEvent

    kb = KeyBindings()

    @Condition
    def in_block() -> bool:
        from prompt_toolkit.application.current import get_app

        return opens_block(get_app().current_buffer.text)

    @kb.add("enter", filter=in_block)
    def _(event: KeyPressEvent) -> None:
        """Inside a \"\"\" block Enter starts a new line."""
        event.current_buffer.insert_text("\n")

    @kb.add("escape", "enter")
    @kb.add("c-j")
    def _(event: KeyPressEvent) -> None:
        """Alt-Enter or Ctrl-J: a newline in the message."""
        event.current_buffer.insert_text("\n")

    @kb.add("c-g")
    def _(event: KeyPressEvent) -> None:
        """Ctrl-G: edit the message in $EDITOR; it comes back to the line to send or change."""
        event.current_buffer.open_in_editor(validate_and_handle=False)

    @kb.add("c-c")
    def _(event: KeyPressEvent) -> None:
        """Ctrl-C clears a line with text; on an empty line it tells the REPL (twice exits)."""
        buffer = event.current_buffer
        if buffer.text:
            buffer.reset()
            on_clear()
        else:
            event.app.exit(exception=KeyboardInterrupt, style="class:aborting")

    return kb


def _completer(
    command_names: Iterable[str],
    argument_kinds: dict[str, str],
    session_names: Callable[[], list[str]],
    setting_names: Iterable[str],
) -> Completer:
    from prompt_toolkit.completion import Completer, PathCompleter, WordCompleter
    from prompt_toolkit.document import Document

    names = sorted("/" + n for n in command_names)
    settings = sorted(setting_names)
    paths = PathCompleter(expanduser=True)

    class SlashCompleter(Completer):
        """Command names after `/`, then file paths, settings or session names as arguments."""

        def get_completions(
            self, document: Document, complete_event: CompleteEvent
        ) -> Iterator[Completion]:
            text = document.text_before_cursor
            if not text.startswith("/") or "\n" in text:
                return
            if " " not in text:
                yield from WordCompleter(names, sentence=True).get_completions(
                    document, complete_event
                )
                return
            name, _, rest = text[1:].partition(" ")
            kind = argument_kinds.get(name, "")
            sub = Document(rest, len(rest))
            if kind == "path":
                yield from paths.get_completions(sub, complete_event)
            elif kind in ("session", "setting") and " " not in rest:
                words = session_names() if kind == "session" else settings
                yield from WordCompleter(words, sentence=True).get_completions(sub, complete_event)

    return SlashCompleter()


def terminal_can_edit(stdin: TextIO, stdout: TextIO) -> bool:
    """Whether prompt-toolkit can run: both ends are terminals and TERM is not dumb."""
    if os.environ.get("TERM", "") in ("dumb", "unknown"):
        return False
    try:
        return stdin.isatty() and stdout.isatty()
    except ValueError:  # closed stream
        return False


def make_reader(
    history_path: Path,
    command_names: Iterable[str],
    argument_kinds: dict[str, str],
    session_names: Callable[[], list[str]],
    setting_names: Iterable[str],
    warn: Callable[[str], None] = lambda text: None,
    debug: bool = False,
) -> LineReader:
    """The best reader this terminal supports; `warn` gets a one-line warning (history).

    A terminal prompt-toolkit cannot drive (it fails with OSError or ValueError) gets plain line
    input; `debug` says why, with the traceback. Any other error is a bug and propagates.
    """
    if terminal_can_edit(sys.stdin, sys.stdout):
        try:
            return ToolkitReader(
                history_path, command_names, argument_kinds, session_names, setting_names, warn
            )
        except (OSError, ValueError):
            if debug:
                import traceback

                warn(
                    "wizardchat: debug: no line editing on this terminal:\n"
                    + traceback.format_exc()
                )
    prompt_out = sys.stdout if sys.stdout.isatty() else sys.stderr
    return PlainReader(sys.stdin, prompt_out)
