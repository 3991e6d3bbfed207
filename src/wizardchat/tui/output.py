"""Where the chat writes: replies streamed as plain text or markdown, notes, errors, tables.

The REPL writes through an `Output`; commands that are not chats (`wizardchat sessions`,
`models`, `bench`) print their tables through `PlainOutput` too, so both look the same.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from typing import TYPE_CHECKING, Protocol, TextIO

from wizardchat.safe_text import is_terminal, terminal_safe
from wizardchat.tui.reader import PROMPT, as_typed

if TYPE_CHECKING:
    from rich.console import Console

    from wizardchat.chat.reply import TurnResult


class Output(Protocol):
    """Where the REPL writes: replies, notes, errors, tables."""

    def reply(self, chunks: Iterable[str]) -> str: ...

    def note(self, text: str) -> None: ...

    def error(self, text: str) -> None: ...

    def text(self, text: str) -> None: ...

    def rows(self, rows: Sequence[tuple[str, ...]], header: bool = False) -> None: ...

    def past_turn(self, user: str, reply: str) -> None: ...

    def message(self, text: str) -> None: ...


def _table_lines(rows: Sequence[tuple[str, ...]]) -> list[str]:
    """The rows as lines of left-aligned columns two spaces apart."""
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

    def reply(self, chunks: Iterable[str]) -> str:
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

    def reply(self, chunks: Iterable[str]) -> str:
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


def plural(n: int, word: str) -> str:
    """`n` and `word`, plural unless n is 1 ("1 turn", "3 tokens")."""
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
    return f"{plural(tokens, 'token')}{speed} · first token {t.get('prompt_seconds', 0.0):.2f} s"
