"""Reading the user's messages: prompt-toolkit on a real terminal, plain lines elsewhere.

Both readers return one message per call, raise EOFError on Ctrl-D, and raise KeyboardInterrupt
for Ctrl-C on an empty line (Ctrl-C on a line with text just clears it). prompt-toolkit is
imported only here and only when a terminal can use it, so batch mode and `--help` never pay
for it.
"""

from __future__ import annotations

import os
import sys
from collections.abc import Callable, Iterable, Iterator
from pathlib import Path
from typing import TYPE_CHECKING, Protocol, TextIO

if TYPE_CHECKING:
    from prompt_toolkit.completion import CompleteEvent, Completer, Completion
    from prompt_toolkit.document import Document
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


class LineReader(Protocol):
    """Where the REPL gets messages from."""

    def read(self, status: str) -> str:
        """One message (a \"\"\" block already unwrapped); `status` is the toolbar text."""
        ...


class PlainReader:
    """Line input for dumb terminals and redirected output: no escape codes at all."""

    def __init__(self, stdin: TextIO, prompt_out: TextIO) -> None:
        self.stdin = stdin
        self.prompt_out = prompt_out

    def _line(self, prompt: str) -> str:
        self.prompt_out.write(prompt)
        self.prompt_out.flush()
        line = self.stdin.readline()
        if not line:
            raise EOFError
        return line.rstrip("\r\n")

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

    def __init__(
        self,
        history_path: Path,
        command_names: Iterable[str],
        argument_kinds: dict[str, str],
        session_names: Callable[[], list[str]],
        setting_names: Iterable[str],
    ) -> None:
        from prompt_toolkit import PromptSession
        from prompt_toolkit.history import FileHistory, History, InMemoryHistory

        history: History
        try:
            history_path.parent.mkdir(parents=True, exist_ok=True)
            history_path.touch(exist_ok=True)
            history = FileHistory(str(history_path))
        except OSError:
            history = InMemoryHistory()  # a read-only data dir must not stop the chat
        self._status = ""
        self.session: PromptSession[str] = PromptSession(
            history=history,
            completer=_completer(command_names, argument_kinds, session_names, setting_names),
            complete_while_typing=False,
            key_bindings=_key_bindings(),
            bottom_toolbar=lambda: self._status,
            enable_open_in_editor=True,
            # "... " starts each new line of a message; a long line wraps under its own text.
            prompt_continuation=lambda width, line, wrap: " " * width if wrap else CONTINUATION,
        )

    def read(self, status: str) -> str:
        self._status = status
        return unwrap_block(self.session.prompt(PROMPT))


def _key_bindings() -> KeyBindings:
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
) -> LineReader:
    """The best reader this terminal supports."""
    if terminal_can_edit(sys.stdin, sys.stdout):
        try:
            return ToolkitReader(
                history_path, command_names, argument_kinds, session_names, setting_names
            )
        except Exception:  # an odd terminal prompt-toolkit cannot drive: fall back, not fail
            pass
    prompt_out = sys.stdout if sys.stdout.isatty() else sys.stderr
    return PlainReader(sys.stdin, prompt_out)
