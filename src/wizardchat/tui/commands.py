"""The REPL's slash commands as a table: name, aliases, usage, help, handler. /help reads it.

A handler sees the chat only through `ChatContext`: what a command may read (the conversation,
the settings, the last reply's figures, the saved sessions) and do (send, undo, start over,
save, load, change a setting, write output). The REPL implements it.
"""

from __future__ import annotations

import difflib
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Protocol

from wizardchat.errors import WizardchatError
from wizardchat.settings import RANGES
from wizardchat.tui.editor import compose_in_editor

if TYPE_CHECKING:
    from wizardchat.chat.conversation import Turn
    from wizardchat.chat.reply import TurnResult
    from wizardchat.chat.store import SessionSummary
    from wizardchat.tui.output import Output


class CommandError(WizardchatError):
    """A command could not do what was asked; the REPL shows the message and goes on."""


class LeaveRepl(Exception):
    """Raised by /exit to end the REPL."""


class ConversationView(Protocol):
    """The conversation as a command may read it (never change it)."""

    @property
    def system(self) -> str: ...

    @property
    def turns(self) -> Sequence[Turn]: ...

    @property
    def evicted(self) -> int: ...

    @property
    def n_ctx(self) -> int: ...

    def window(self) -> Sequence[Turn]: ...

    def tokens(self) -> Sequence[int]: ...

    def text(self) -> str: ...


class ChatContext(Protocol):
    """What a slash command may read and do in a chat."""

    @property
    def out(self) -> Output: ...

    @property
    def name(self) -> str:
        """The conversation's session name (an automatic one is picked when first asked)."""
        ...

    @property
    def conversation(self) -> ConversationView: ...

    @property
    def last_result(self) -> TurnResult | None:
        """The figures of the last reply in this chat (None before the first)."""
        ...

    def setting(self, name: str) -> Any:
        """The value of a `/set` setting (PARAMS)."""
        ...

    def change_setting(self, name: str, value: Any) -> None: ...

    def describe(self) -> list[tuple[str, str]]:
        """The loaded model and how it runs, as (label, value) rows for /show."""
        ...

    def saved_sessions(self) -> list[SessionSummary]: ...

    def saved_kv_sizes(self) -> Mapping[str, int]:
        """Bytes of each session's saved KV state, by name (the KV STATE column)."""
        ...

    def reply_to(self, message: str) -> None:
        """Send `message` and show the reply, as if it had been typed."""
        ...

    def drop_last(self) -> Turn | None:
        """Remove the last exchange from the conversation (None when there is none)."""
        ...

    def new_conversation(self, system: str | None = None) -> None: ...

    def autosave(self, force: bool = False) -> Path | None: ...

    def save_as(self, name: str) -> Path | None: ...

    def open_session(self, name: str) -> None: ...


Handler = Callable[[ChatContext, str], None]


@dataclass(frozen=True)
class Command:
    """One slash command."""

    name: str
    usage: str  # the argument part, e.g. "[NAME]"
    help: str
    handler: Handler
    aliases: tuple[str, ...] = ()
    completes: str = ""  # what the argument completes to: "path", "setting", "session"


# --- /set: the sampler settings a chat can change, each with its parser ---------------------


@dataclass(frozen=True)
class Param:
    """A setting `/set` changes, with its parser (which explains bad values)."""

    name: str
    help: str
    parse: Callable[[str], Any]


def _number(kind: type[int] | type[float], name: str) -> Any:
    """A parser for the setting `name`, allowing what flags and config allow (settings.RANGES)."""
    bounds = RANGES[name]

    def parse(text: str) -> Any:
        try:
            value = kind(text)
        except (ValueError, OverflowError):
            what = "an integer" if kind is int else "a number"
            raise CommandError(f"{text[:40]!r} is not {what}") from None
        if not bounds.allows(value):
            raise CommandError(f"{text[:40]} is out of range ({bounds.rule})")
        return value

    return parse


PARAMS = {
    p.name: p
    for p in (
        Param("temperature", "0 = greedy; higher is more random", _number(float, "temperature")),
        Param("top_p", "nucleus sampling; 1 disables", _number(float, "top_p")),
        Param("top_k", "sample from the K likeliest; 0 disables", _number(int, "top_k")),
        Param(
            "min_p",
            "drop tokens below this share of the likeliest; 0 disables",
            _number(float, "min_p"),
        ),
        Param(
            "repeat_penalty",
            "penalise repeated tokens; 1 disables",
            _number(float, "repeat_penalty"),
        ),
        Param(
            "max_tokens", "longest reply; -1 = until the model stops", _number(int, "max_tokens")
        ),
        Param("seed", "sampler seed; -1 = random each reply", _number(int, "seed")),
    )
}


# --- handlers ---------------------------------------------------------------------------------


def _help(ctx: ChatContext, arg: str) -> None:
    width = max(len(f"/{c.name} {c.usage}".strip()) for c in COMMANDS)
    lines = []
    for c in COMMANDS:
        aliases = f" (also {', '.join('/' + a for a in c.aliases)})" if c.aliases else ""
        lines.append(f"  {f'/{c.name} {c.usage}'.strip():<{width}}  {c.help}{aliases}")
    lines += [
        "",
        '  Multi-line: start with """ and end with """, or Alt-Enter / Ctrl-J for a newline.',
        "  Ctrl-G edits the message in $EDITOR. Ctrl-R searches history. Tab completes.",
        "  Ctrl-C stops a reply or clears the line; Ctrl-D (or Ctrl-C twice) exits.",
        "  Start a message with // to send text that begins with /.",
    ]
    ctx.out.text("\n".join(lines))


def _exit(ctx: ChatContext, arg: str) -> None:
    raise LeaveRepl


def _clear(ctx: ChatContext, arg: str) -> None:
    previous = ctx.name if ctx.conversation.turns else None
    ctx.new_conversation()
    saved = f" (the previous one is saved as '{previous}')" if previous else ""
    ctx.out.note(f"new conversation{saved}")


def _system(ctx: ChatContext, arg: str) -> None:
    if not arg:
        ctx.out.text(ctx.conversation.system or "(no system prompt)")
        return
    previous = ctx.name if ctx.conversation.turns else None
    ctx.new_conversation(system=arg)
    saved = f"; the previous one is saved as '{previous}'" if previous else ""
    ctx.out.note(f"system prompt set; new conversation{saved}")


def _regen(ctx: ChatContext, arg: str) -> None:
    turn = ctx.drop_last()
    if turn is None:
        raise CommandError("nothing to regenerate yet")
    ctx.reply_to(turn.user)


def _undo(ctx: ChatContext, arg: str) -> None:
    turn = ctx.drop_last()
    if turn is None:
        raise CommandError("nothing to undo")
    ctx.autosave()
    preview = turn.user if len(turn.user) <= 50 else turn.user[:47] + "..."
    ctx.out.note(f"removed the last exchange ({preview!r})")


def _save(ctx: ChatContext, arg: str) -> None:
    path = ctx.save_as(arg) if arg else ctx.autosave(force=True)
    ctx.out.note(f"saved as '{ctx.name}' ({path})")


def _load(ctx: ChatContext, arg: str) -> None:
    if not arg:
        raise CommandError("which session? /load NAME (/sessions lists them)")
    ctx.open_session(arg)


def _sessions(ctx: ChatContext, arg: str) -> None:
    if not show_sessions(ctx.out, ctx.saved_sessions(), ctx.saved_kv_sizes()):
        ctx.out.note("no saved conversations yet")


def _read(ctx: ChatContext, arg: str) -> None:
    if not arg:
        raise CommandError("which file? /read FILE")
    from wizardchat.inputs import (
        MAX_BYTES_PER_TOKEN,
        TooLongError,
        read_limited,
        regular_file_problem,
    )

    path = Path(arg).expanduser()
    problem = regular_file_problem(path)  # before open(): a FIFO would block, /dev/zero not end
    if problem:
        raise CommandError(f"cannot read {path}: {problem}")
    n_ctx = ctx.conversation.n_ctx
    try:
        with path.open("rb") as f:
            data = read_limited(f, n_ctx * MAX_BYTES_PER_TOKEN)
    except TooLongError:
        raise CommandError(
            f"{path} is too big for the context of {n_ctx} tokens (a larger --ctx-size holds more)"
        ) from None
    except OSError as e:
        raise CommandError(f"cannot read {path}: {e.strerror or e}") from None
    if b"\0" in data[:8192]:
        raise CommandError(f"{path} looks like a binary file, not text")
    text = data.decode("utf-8", errors="replace").rstrip()
    ctx.reply_to(f"--- File: {path.name} ---\n{text}\n--- End of {path.name} ---")


def _set(ctx: ChatContext, arg: str) -> None:
    if not arg:
        width = max(map(len, PARAMS))
        ctx.out.text(
            "\n".join(
                f"  {p.name:<{width}}  {ctx.setting(p.name)!s:<8}  {p.help}"
                for p in PARAMS.values()
            )
        )
        return
    key, _, value = arg.partition(" ")
    param = PARAMS.get(key.replace("-", "_"))
    if param is None:
        raise CommandError(f"unknown setting {key!r}{_did_you_mean(key, PARAMS)}; /set lists them")
    if not value.strip():
        raise CommandError(f"/set {param.name} needs a value ({param.help})")
    try:
        parsed = param.parse(value.strip())
    except CommandError as e:
        raise CommandError(f"/set {param.name}: {e}") from None
    ctx.change_setting(param.name, parsed)
    ctx.out.note(f"{param.name} = {parsed}")


def _show(ctx: ChatContext, arg: str) -> None:
    conv = ctx.conversation
    rows = [
        *ctx.describe(),
        (
            "session",
            f"{ctx.name} ({len(conv.turns)} turn{'' if len(conv.turns) == 1 else 's'}, "
            f"{len(conv.window())} in the model's context, {len(conv.tokens())} tokens)",
        ),
    ]
    ctx.out.rows(rows)


def _stats(ctx: ChatContext, arg: str) -> None:
    last = ctx.last_result
    if last is None:
        raise CommandError("no reply yet")
    t = last.timings
    ctx.out.rows(
        [
            ("prompt tokens", f"{last.prompt_tokens} ({last.evaluated_tokens} evaluated)"),
            ("prompt speed", f"{t.get('prompt_tokens_per_second', 0.0):.1f} tok/s"),
            ("time to first token", f"{t.get('prompt_seconds', 0.0):.3f} s"),
            ("generated tokens", str(last.completion_tokens)),
            ("generation speed", f"{t.get('decode_tokens_per_second', 0.0):.1f} tok/s"),
            ("finish", last.finish),
        ]
    )


def _prompt(ctx: ChatContext, arg: str) -> None:
    conv = ctx.conversation
    if conv.evicted:
        ctx.out.note(
            f"the model no longer sees the {conv.evicted} oldest of {len(conv.turns)} turns "
            "(they stay in the saved conversation); what it sees:"
        )
    ctx.out.text(
        f"--- prompt: {len(conv.tokens())} tokens ---\n{conv.text()}\n--- end of prompt ---"
    )


def _edit(ctx: ChatContext, arg: str) -> None:
    text = compose_in_editor(arg)
    if not text.strip():
        ctx.out.note("empty message: nothing sent")
        return
    ctx.out.message(text.strip())  # in the scrollback, as a typed message is
    ctx.reply_to(text.strip())


COMMANDS: tuple[Command, ...] = (
    Command("help", "", "show this help", _help, aliases=("?",)),
    Command("exit", "", "leave (Ctrl-D works too)", _exit, aliases=("quit", "bye")),
    Command("clear", "", "start a new conversation", _clear),
    Command("system", "[TEXT]", "show the system prompt, or set it (new conversation)", _system),
    Command("regen", "", "drop the last reply and generate it again", _regen),
    Command("undo", "", "drop the last exchange", _undo),
    Command("save", "[NAME]", "save the conversation (as NAME from now on)", _save),
    Command("load", "NAME", "continue a saved conversation", _load, completes="session"),
    Command("sessions", "", "list saved conversations", _sessions),
    Command("read", "FILE", "send a text file as the next message", _read, completes="path"),
    Command("edit", "", "compose the next message in $EDITOR", _edit),
    Command("set", "[KEY VALUE]", "show or change sampling settings", _set, completes="setting"),
    Command("show", "", "model, quant, context, threads and offload", _show),
    Command("stats", "", "speed and token counts of the last reply", _stats),
    Command("prompt", "", "the exact prompt text of the conversation so far", _prompt),
)

BY_NAME = {n: c for c in COMMANDS for n in (c.name, *c.aliases)}


def _did_you_mean(word: str, known: Any) -> str:
    close = difflib.get_close_matches(word, list(known), n=1, cutoff=0.5)
    return f" (did you mean {close[0]!r}?)" if close else ""


def find(name: str) -> Command:
    """The command called `name` (no slash), or a CommandError suggesting the nearest."""
    command = BY_NAME.get(name.lower())
    if command is None:
        close = difflib.get_close_matches(name.lower(), list(BY_NAME), n=1, cutoff=0.5)
        hint = f"; did you mean /{close[0]}?" if close else ""
        raise CommandError(f"unknown command /{name}{hint} (/help lists the commands)")
    return command


def session_row(s: Any) -> tuple[str, str, str, str]:
    """A (name, turns, last used, problem) row for a SessionSummary; an unreadable file says
    what is wrong with it."""
    import time

    turns = "unreadable" if s.turns is None else str(s.turns)
    try:
        used = time.strftime("%Y-%m-%d %H:%M", time.localtime(s.updated))
    except (OverflowError, OSError, ValueError):
        used = "?"
    problem = "".join(c if c.isprintable() else "?" for c in s.problem[:120])
    return s.name, turns, used, f"({problem})" if problem else ""


def size_text(n: int) -> str:
    """A file size in decimal units, as disks are sold: 18.3 kB, 1.8 GB."""
    for unit, scale in (("GB", 1e9), ("MB", 1e6)):
        if n >= scale:
            return f"{n / scale:.1f} {unit}"
    return f"{n / 1e3:.1f} kB"


def show_sessions(
    out: Output, found: list[SessionSummary], kv_sizes: Mapping[str, int] | None = None
) -> bool:
    """Print the table of saved sessions (SessionSummary) that `wizardchat sessions` and
    `/sessions` both show, and how to delete an unreadable one; False if there is none.

    With `kv_sizes` (session name -> bytes) a KV STATE column says which sessions resume
    without re-evaluating, and what their saved state takes on disk. The PROBLEM column is
    there only when a file cannot be read.
    """
    if not found:
        return False
    header: tuple[str, ...] = ("NAME", "TURNS", "LAST USED")
    rows: list[tuple[str, ...]] = []
    for s in found:
        name, turns, used, problem = session_row(s)
        row: tuple[str, ...] = (name, turns, used)
        if kv_sizes is not None:
            size = kv_sizes.get(s.name)
            row += (size_text(size) if size is not None else "-",)
        rows.append((*row, problem))
    if kv_sizes is not None:
        header += ("KV STATE",)
    if any(r[-1] for r in rows):
        out.rows([(*header, "PROBLEM"), *rows], header=True)
        broken = " ".join(s.name for s in found if s.turns is None)
        out.note(
            f"unreadable sessions are kept as they are; to delete: wizardchat sessions rm {broken}"
        )
    else:
        out.rows([header, *(row[:-1] for row in rows)], header=True)
    return True
