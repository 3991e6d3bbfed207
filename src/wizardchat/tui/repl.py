"""The interactive chat: read a message or a slash command, stream the reply, autosave.

Ctrl-C while a reply streams does not raise: a SIGINT handler asks the session to stop after
the current token (or, while the prompt is still being evaluated, llama.cpp to abort it), so the
renderer finishes cleanly, the partial reply stays in the history and the next message works.
Keyboard echo is off while a reply streams, so keys pressed then (and the terminal's ^C) do not
scribble over it; typed-ahead text is kept for the next prompt.
"""

from __future__ import annotations

import contextlib
import signal
import sys
import time
from collections.abc import Callable, Generator, Iterator, Sequence
from pathlib import Path
from types import FrameType
from typing import TYPE_CHECKING, Any, Protocol, TextIO

from wizardchat.chat.recording import continue_command, saved_session
from wizardchat.chat.session import ChatSession, TurnResult
from wizardchat.chat.store import (
    SavedSession,
    SessionChanged,
    SessionClaim,
    SessionStore,
    auto_name,
    check_name,
)
from wizardchat.errors import WizardchatError
from wizardchat.safe_text import is_terminal, terminal_safe
from wizardchat.signals import Termination, undo_on_fatal_exit
from wizardchat.tui import commands
from wizardchat.tui.reader import PROMPT, LineReader, as_typed

if TYPE_CHECKING:
    from rich.console import Console

# How many past exchanges a resumed conversation shows.
SHOWN_ON_RESUME = 10


class ReplEngine(Protocol):
    """What the REPL asks of the loaded model beyond chatting (for /set and /show)."""

    model_name: str
    n_ctx: int
    seed: int

    @property
    def sampling(self) -> Any: ...

    def set_sampling(self, **changes: Any) -> None: ...

    def set_seed(self, seed: int) -> None: ...

    def describe(self) -> list[tuple[str, str]]: ...


class Output(Protocol):
    """Where the REPL writes: replies, notes, errors, tables."""

    def reply(self, chunks: Iterator[str]) -> str: ...

    def note(self, text: str) -> None: ...

    def error(self, text: str) -> None: ...

    def text(self, text: str) -> None: ...

    def rows(self, rows: Sequence[tuple[str, ...]], header: bool = False) -> None: ...

    def past_turn(self, user: str, reply: str) -> None: ...

    def message(self, text: str) -> None: ...


def _table_lines(rows: Sequence[tuple[str, ...]]) -> list[str]:
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    return ["  ".join(c.ljust(w) for c, w in zip(r, widths, strict=True)).rstrip() for r in rows]


class PlainOutput:
    """Plain text: replies and command output on stdout, notes and errors on stderr.

    Everything written may hold untrusted text (replies, past turns, names, paths), so control
    characters are made visible (safe_text): on stderr always, on stdout when it is a terminal.
    """

    def __init__(self, out: TextIO, err: TextIO) -> None:
        self.out, self.err = out, err
        self._safe_out = is_terminal(out)

    def _out_text(self, text: str) -> str:
        return terminal_safe(text) if self._safe_out else text

    def reply(self, chunks: Iterator[str]) -> str:
        from wizardchat.safe_text import stream_plain

        try:
            text = stream_plain(chunks, self.out, safe=self._safe_out)
        finally:
            self.out.write("\n")
            self.out.flush()
        return text

    def note(self, text: str) -> None:
        self.err.write(terminal_safe(text) + "\n")
        self.err.flush()

    def error(self, text: str) -> None:
        self.note(f"error: {text}")

    def text(self, text: str) -> None:
        self.out.write(self._out_text(text) + "\n")
        self.out.flush()

    def rows(self, rows: Sequence[tuple[str, ...]], header: bool = False) -> None:
        self.text("\n".join(_table_lines(rows)))  # a header row is upper case, as in `models`

    def past_turn(self, user: str, reply: str) -> None:
        self.text(f"{PROMPT}{user}\n{reply}\n")

    def message(self, text: str) -> None:
        """Show a sent message the terminal did not echo, where the prompt is (stdout on a
        terminal, else stderr: a transcript file gets the replies alone)."""
        where = self.out if self._safe_out else self.err
        where.write(terminal_safe(as_typed(text)) + "\n")
        where.flush()


class RichOutput:
    """Markdown replies streamed with rich; dim notes; errors in red on stderr.

    All text is made terminal-safe (safe_text) before rich sees it: rich's `Text` drops a few
    controls (BEL, CR...) but passes ESC through, and only rich's own styling may emit escapes.
    """

    def __init__(self, console: Console, err_console: Console) -> None:
        self.console, self.err_console = console, err_console

    def reply(self, chunks: Iterator[str]) -> str:
        from wizardchat.tui.markdown_stream import stream_markdown

        return stream_markdown(chunks, self.console)  # it makes the text safe itself

    def note(self, text: str) -> None:
        from rich.text import Text

        self.console.print(Text(terminal_safe(text), style="dim"))

    def error(self, text: str) -> None:
        from rich.text import Text

        self.err_console.print(Text(f"error: {terminal_safe(text)}", style="red"))

    def text(self, text: str) -> None:
        from rich.text import Text

        # exact text: the terminal wraps it
        self.console.print(Text(terminal_safe(text)), soft_wrap=True)

    def rows(self, rows: Sequence[tuple[str, ...]], header: bool = False) -> None:
        from rich.table import Table

        table = Table(box=None, show_header=header, header_style="bold", pad_edge=False)
        for i, title in enumerate(rows[0]):
            table.add_column(title if header else "", style="bold" if i == 0 and not header else "")
        for row in rows[1:] if header else rows:
            table.add_row(*(terminal_safe(cell) for cell in row))
        self.console.print(table)

    def past_turn(self, user: str, reply: str) -> None:
        from rich.markdown import Markdown
        from rich.text import Text

        self.console.print(Text(PROMPT + terminal_safe(user), style="bold"))
        # Line endings as the streamed reply has them (markdown_stream), the rest made visible.
        reply = reply.replace("\r\n", "\n").replace("\r", "\n")
        self.console.print(Markdown(terminal_safe(reply)))
        self.console.print()

    def message(self, text: str) -> None:
        """Show a sent message the terminal did not echo, as a typed one looks."""
        from rich.text import Text

        self.console.print(Text(terminal_safe(as_typed(text))), soft_wrap=True)


def _plural(n: int, word: str) -> str:
    return f"{n} {word}{'' if n == 1 else 's'}"


def stats_line(last: TurnResult) -> str:
    """The dim line after a reply: tokens, speed, time to first token; or, when no token came,
    what happened instead (a "0.0 tok/s" would say nothing)."""
    t = last.timings
    tokens = last.completion_tokens
    if tokens == 0 and last.finish == "interrupted":
        return (
            f"interrupted before the first token · {last.seconds:.2f} s into a "
            f"{last.prompt_tokens:,}-token prompt"
        )
    if tokens == 0:
        return f"0 tokens · end of turn after {t.get('prompt_seconds', 0.0):.2f} s"
    # One token has no speed: the rate is measured from the first token to the last.
    speed = f" · {t.get('decode_tokens_per_second', 0.0):.1f} tok/s" if tokens > 1 else ""
    return f"{_plural(tokens, 'token')}{speed} · first token {t.get('prompt_seconds', 0.0):.2f} s"


@contextlib.contextmanager
def ctrl_c_cancels(cancel: Callable[[], None]) -> Iterator[None]:
    """While active, Ctrl-C calls `cancel` instead of raising KeyboardInterrupt.

    Never raising matters: the handler may run inside llama.cpp's abort callback, and an
    exception there would be lost, not stop anything.
    """

    def handler(signum: int, frame: FrameType | None) -> None:
        cancel()

    previous = signal.signal(signal.SIGINT, handler)
    try:
        yield
    finally:
        signal.signal(signal.SIGINT, previous)


@contextlib.contextmanager
def keyboard_echo_off(stream: TextIO, line_mode: bool = False) -> Iterator[None]:
    """Stop the terminal echoing keys (and ^C) into a streaming reply; keep what is typed.

    Keys typed meanwhile wait for the next prompt as they were pressed: no line editing and no
    CR-to-NL mapping by the terminal, or an Enter typed ahead would arrive as Ctrl-J (a newline
    in the message) instead of sending it. Ctrl-C still raises SIGINT, without the terminal's
    usual flush of what was typed before it (NOFLSH). With `line_mode` (the plain reader, which
    reads lines the terminal edits) the terminal keeps its line editing, so a Ctrl-D typed
    ahead is still end-of-input rather than a literal character in the next message.
    """
    try:
        import termios

        fd = stream.fileno()
        saved = termios.tcgetattr(fd)
    except (ImportError, OSError, ValueError, AttributeError):
        yield  # not a terminal (or not POSIX): nothing to silence
        return
    quiet = list(saved)
    if not line_mode:
        quiet[0] &= ~termios.ICRNL
        quiet[3] &= ~termios.ICANON
    quiet[3] &= ~(termios.ECHO | getattr(termios, "ECHOCTL", 0))
    quiet[3] |= termios.NOFLSH

    def restore() -> None:
        with contextlib.suppress(termios.error, OSError):  # the terminal may have hung up
            termios.tcsetattr(fd, termios.TCSANOW, saved)

    termios.tcsetattr(fd, termios.TCSANOW, quiet)
    try:
        with undo_on_fatal_exit(restore):  # even if llama.cpp aborts mid-reply
            yield
    finally:
        restore()


class Repl:
    """One interactive chat on a loaded model."""

    session: ChatSession
    engine: ReplEngine
    store: SessionStore
    reader: LineReader
    out: Output

    def __init__(
        self,
        session: ChatSession,
        engine: ReplEngine,
        store: SessionStore,
        reader: LineReader,
        out: Output,
        *,
        show_stats: bool = True,
        stdin: TextIO | None = None,
        model_ref: str = "",
    ) -> None:
        self.session = session
        self.model_ref = model_ref  # saved with the conversation: what --resume loads again
        self.engine = engine
        self.store = store
        self.reader = reader
        self.out = out
        self.show_stats = show_stats
        self.stdin = stdin or sys.stdin
        self._name: str | None = None  # chosen at the first save unless the user names it
        self._auto_named = False  # the name is a chat-... one wizardchat picked
        self._claim: SessionClaim | None = None  # this process's hold on the name
        self.created = time.time()
        self.termination = Termination(session.cancel, idle=getattr(reader, "stop", None))
        self.terminated_by = 0  # exit status after a SIGTERM/SIGHUP ended the chat mid-reply

    # --- the conversation and its file ---------------------------------------------------
    #
    # Whenever the conversation has a name this process holds a claim on it (SessionStore.claim),
    # so a second wizardchat cannot open it and overwrite its turns; switching names takes the
    # new claim before the old one is given up, so a refused switch leaves everything as it was.

    @property
    def name(self) -> str:
        """The session's name (an automatic one is picked the first time it is needed)."""
        if self._name is None:
            self._name, self._auto_named = self._free_name(auto_name()), True
        return self._name

    def _hold(self, name: str) -> None:
        """Claim `name` (SessionError if another process has it), then let the old claim go."""
        claim = self.store.claim(name)
        if self._claim is not None and self._claim is not claim:
            self._claim.release()
        self._claim = claim

    def _free_name(self, base: str) -> str:
        """`base`, else `base-2`, `base-3`, ...: the first name with no file, now claimed."""
        name = self.store.claim_free_name(base).name
        self._hold(name)  # the same claim again: this lets the old one go
        return name

    def name_session(self, name: str) -> None:
        """Use `name` for this conversation from now on (it need not exist yet)."""
        self._hold(check_name(name))
        self._name, self._auto_named = name, False

    def autosave(self, force: bool = False) -> Path | None:
        """Write the conversation to its session file (after every turn; atomic).

        If the file changed on disk since this chat read or wrote it, it is left alone and the
        conversation goes to a new name instead: nobody's turns are lost.
        """
        conv = self.session.conversation
        on_disk = self._name is not None and self.store.exists(self._name)
        if not conv.turns and not force and not on_disk:
            return None  # nothing said yet: leave no empty sessions behind
        saved = saved_session(conv, self.name, self.engine.model_name, self.created, self.model_ref)
        try:
            return self.store.save(saved)
        except SessionChanged as e:
            saved.name = self._name = self._free_name(saved.name)
            path = self.store.save(saved)
            self.out.error(f"{e}: this conversation is saved as '{saved.name}' from now on")
            return path

    def save_as(self, name: str) -> Path | None:
        """/save NAME: this conversation is NAME from now on (an automatic file is renamed)."""
        check_name(name)
        if name != self._name and self.store.exists(name):
            raise commands.CommandError(
                f"a session named '{name}' exists already: /load it, or pick another name"
            )
        old = self._name if self._auto_named else None
        self.name_session(name)
        path = self.autosave(force=True)
        if old is not None and old != self._name and self.store.exists(old):
            self.store.remove(old)  # the automatically named copy is now the named one
        return path

    def open_session(self, name: str) -> None:
        """Continue a saved conversation (the current one stays saved).

        A session open in another wizardchat, or a file that cannot be read, is a SessionError
        and the current conversation goes on as it was.
        """
        held_before = self.store.holds(name)
        claim = self.store.claim(name)
        try:
            saved = self.store.load(name)
        except BaseException:
            if not held_before:
                claim.release()
            raise
        self.continue_session(saved)

    def continue_session(self, saved: SavedSession) -> None:
        """Make `saved` the conversation, and show its last exchanges."""
        self.name_session(saved.name)
        self.session.restore(saved.system, [(t.user, t.reply, t.interrupted) for t in saved.turns])
        self.created = saved.created or time.time()
        self.show_history(saved)

    def new_conversation(self, system: str | None = None) -> None:
        """A fresh conversation under a new automatic name (the old one is saved and let go)."""
        self.session.reset(system=system)
        self._name, self.created = None, time.time()
        if self._claim is not None:
            self._claim.release()
            self._claim = None

    def show_history(self, saved: SavedSession) -> None:
        """Print the last exchanges of a conversation being continued."""
        turns = saved.turns
        skipped = max(0, len(turns) - SHOWN_ON_RESUME)
        self.out.note(
            f"continuing '{saved.name}': {_plural(len(turns), 'turn')}"
            + (f" ({skipped} earlier not shown)" if skipped else "")
        )
        if saved.model_ref and self.model_ref and saved.model_ref != self.model_ref:
            # The model stays loaded; its own model is one command away.
            self.out.note(
                f"(it was held with {saved.model_ref}; wizardchat run --session {saved.name} "
                "reopens it with that model)"
            )
        elif saved.model and saved.model != self.engine.model_name:
            self.out.note(f"(it was held with {saved.model})")
        for t in turns[skipped:]:
            self.out.past_turn(t.user, t.reply + (" [interrupted]" if t.interrupted else ""))

    # --- the loop ------------------------------------------------------------------------

    def status(self) -> str:
        """The toolbar: model, context use, session."""
        used = len(self.session.conversation.tokens())
        name = self._name or "new conversation"
        return f" {self.engine.model_name} · {used}/{self.engine.n_ctx} tokens · {name} "

    def run(self, resume: SavedSession | None = None) -> None:
        """Chat (continuing session `resume`) until /exit, Ctrl-D, or Ctrl-C twice."""
        self.out.note(
            f"{self.engine.model_name} · context {self.engine.n_ctx} tokens · "
            "/help for commands · Ctrl-D to exit"
        )
        with self.termination:
            if resume is not None:
                self.continue_session(resume)
            self._loop()
        if self.terminated_by:
            return  # the terminal may be gone: no goodbye line
        if self._name is not None and self.store.exists(self._name):
            how = continue_command(self.store, self._name, self.model_ref)
            self.out.note(f"saved as '{self._name}' · {how} continues it")

    def _loop(self) -> None:
        armed = False  # a Ctrl-C on an empty line was just pressed
        while True:
            try:
                text = self.reader.read(self.status())
            except EOFError:
                break
            except KeyboardInterrupt:
                if getattr(self.reader, "cleared_a_line", False):
                    armed = False  # a Ctrl-C that cleared text was no step toward exiting
                if armed:
                    break
                armed = True
                try:
                    self.out.note("(Ctrl-C again or Ctrl-D to exit)")
                except KeyboardInterrupt:
                    break  # the second Ctrl-C came before the next prompt was up
                continue
            armed = False
            try:
                self.handle(text)
            except commands.LeaveRepl:
                break
            except WizardchatError as e:
                self.out.error(str(e))
            except KeyboardInterrupt:  # a command (not a reply: that Ctrl-C only cancels)
                self.out.note("[interrupted]")

    def handle(self, text: str) -> None:
        """One line from the user: a command, or a message to answer."""
        message = text.strip()
        if not message:
            return
        if message.startswith("//"):
            self.reply_to(message[1:])
        elif message.startswith("/"):
            name, _, arg = message[1:].partition(" ")
            if not name:
                name = "help"
            commands.find(name).handler(self, arg.strip())
        else:
            self.reply_to(message)

    def reply_to(self, message: str) -> None:
        """Send a message, stream the reply, report, autosave."""
        chunks: Generator[str, None, None] = self.session.send(message)
        term = self.termination
        line_mode = getattr(self.reader, "line_mode", False)
        with (
            keyboard_echo_off(self.stdin, line_mode),
            ctrl_c_cancels(self.session.cancel),
            term.replying(),
        ):
            try:
                self.out.reply(chunks)
            except OSError:
                if not term.received:
                    raise  # else the terminal went away with a hangup; the turn is saved below
            finally:
                chunks.close()  # records the turn now, however the reply ended
                self.autosave()  # before any more output, which a closed terminal may refuse
        if term.received:  # SIGTERM or SIGHUP mid-reply: the partial reply is saved; leave
            self.terminated_by = term.exit_code
            raise commands.LeaveRepl
        last = self.session.last
        if last is not None:
            mark = last.end_mark()
            if mark:
                self.out.note(mark)
            if self.show_stats:
                self.out.note(stats_line(last))
        self.out.text("")
