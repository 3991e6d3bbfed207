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
from collections.abc import Callable, Iterator
from pathlib import Path
from types import FrameType
from typing import TYPE_CHECKING, Any, Protocol, TextIO

from wizardchat.chat.recording import continue_command, saved_session
from wizardchat.chat.store import (
    SavedSession,
    SessionChanged,
    SessionClaim,
    SessionStore,
    auto_name,
    check_name,
)
from wizardchat.errors import ServerError, WizardchatError
from wizardchat.signals import Termination, undo_on_fatal_exit
from wizardchat.tui import commands
from wizardchat.tui.output import Output, plural, stats_line
from wizardchat.tui.reader import LineReader

if TYPE_CHECKING:
    from wizardchat.chat.conversation import Conversation, Turn
    from wizardchat.chat.kv_cache import KvCache
    from wizardchat.chat.reply import TurnResult
    from wizardchat.chat.session import ChatSession
    from wizardchat.chat.store import SessionSummary

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
    except ImportError:
        yield  # not POSIX: no terminal modes to change
        return
    try:
        fd = stream.fileno()
        saved = termios.tcgetattr(fd)
    except (OSError, ValueError, termios.error):
        yield  # not a terminal, or closed: nothing to silence
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
        kv: KvCache | None = None,
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
        self.termination = Termination(session.cancel, idle=reader.stop)
        self.last_result: TurnResult | None = None  # the last reply's figures, for /stats
        self.terminated_by = 0  # exit status after a SIGTERM/SIGHUP ended the chat mid-reply
        self.kv = kv  # the KV state saved with the session (None: not kept)

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
            path = self.store.save(saved)
        except SessionChanged as e:
            saved.name = self._name = self._free_name(saved.name)
            path = self.store.save(saved)
            self.out.error(f"{e}: this conversation is saved as '{saved.name}' from now on")
        if self.kv is not None:  # /save (force) writes it now; a reply when it grew enough
            self.kv.checkpoint(saved.name, conv.tokens(), leaving=force)
        return path

    def leave_conversation(self) -> None:
        """The conversation is being left (exit, a signal, /load, /new, /system): its KV state
        is saved with whatever it holds beyond the saved one."""
        if self.kv is not None and self._name is not None and self.store.exists(self._name):
            self.kv.checkpoint(self._name, self.session.conversation.tokens(), leaving=True)

    def save_as(self, name: str) -> Path | None:
        """/save NAME: this conversation is NAME from now on (an automatic file is renamed)."""
        check_name(name)
        if name != self._name and self.store.exists(name):
            raise commands.CommandError(
                f"a session named '{name}' exists already: /load it, or pick another name"
            )
        old = self._name if self._auto_named else None
        self.name_session(name)
        if old is not None and old != name and self.kv is not None:
            self.kv.rename(old, name)  # its KV state goes with it, not written again
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
        self.leave_conversation()
        self.continue_session(saved)

    def continue_session(self, saved: SavedSession) -> None:
        """Make `saved` the conversation, and show its last exchanges."""
        self.name_session(saved.name)
        self.session.restore(saved.system, saved.turns)
        self.created = saved.created or time.time()
        self.show_history(saved)
        if self.kv is not None:
            self.kv.restore(saved.name, self.session.conversation.tokens())

    def new_conversation(self, system: str | None = None) -> None:
        """A fresh conversation under a new automatic name (the old one is saved and let go)."""
        self.leave_conversation()
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
            f"continuing '{saved.name}': {plural(len(turns), 'turn')}"
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

    # --- what a slash command may read and do (commands.ChatContext) ---------------------

    @property
    def conversation(self) -> Conversation:
        """The conversation (commands read it; only the session changes it)."""
        return self.session.conversation

    def setting(self, name: str) -> Any:
        """The value of the /set setting `name`: the reply limit, the seed, or a sampler's."""
        if name == "max_tokens":
            return self.session.max_tokens
        if name == "seed":
            return self.engine.seed
        return getattr(self.engine.sampling, name)

    def change_setting(self, name: str, value: Any) -> None:
        """Set the /set setting `name` (its value already checked) for the next replies."""
        if name == "max_tokens":
            self.session.max_tokens = value
        elif name == "seed":
            self.engine.set_seed(value)
        else:
            self.engine.set_sampling(**{name: value})

    def describe(self) -> list[tuple[str, str]]:
        """The loaded model and how it runs, as rows for /show."""
        return self.engine.describe()

    def saved_sessions(self) -> list[SessionSummary]:
        """The saved conversations, newest first, for /sessions."""
        return self.store.list()

    def saved_kv_sizes(self) -> dict[str, int]:
        """The saved KV states' sizes, as `wizardchat sessions` shows them: read from the data
        dir even when this chat keeps none (--kv-cache-max-gb 0), as the states stay there."""
        if self.kv is not None:
            return self.kv.store.sizes()
        from wizardchat import paths
        from wizardchat.chat.kv_store import KvStore

        return KvStore(paths.kv_cache_dir(), 0).sizes()

    def drop_last(self) -> Turn | None:
        """Remove the last exchange (/undo, /regen) and return it; None when there is none."""
        return self.session.drop_last()

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
        self.leave_conversation()  # exit, Ctrl-D, SIGTERM or SIGHUP: the KV state is saved too
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
                if self.reader.cleared_a_line:
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
            except ServerError:
                raise  # the server that held the model is gone: no reply can come any more
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
        reply = self.session.send(message)
        term = self.termination
        with (
            keyboard_echo_off(self.stdin, self.reader.line_mode),
            ctrl_c_cancels(self.session.cancel),
            term.replying(),
        ):
            try:
                self.out.reply(reply)
            except OSError:
                if not term.received:
                    raise  # else the terminal went away with a hangup; the turn is saved below
            finally:
                reply.close()  # records the turn now, however the reply ended
                self.last_result = reply.result
                self.autosave()  # before any more output, which a closed terminal may refuse
        if term.received:  # SIGTERM or SIGHUP mid-reply: the partial reply is saved; leave
            self.terminated_by = term.exit_code
            raise commands.LeaveRepl
        mark = reply.result.end_mark()
        if mark:
            self.out.note(mark)
        if self.show_stats:
            self.out.note(stats_line(reply.result))
        self.out.text("")
