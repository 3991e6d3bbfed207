"""Streaming markdown: each finished block is printed once, only the open block is redrawn.

Why not `Live.update(Markdown(reply_so_far))` on every token, as most chat clients do? Two
reasons:

- Cost. Parsing and rendering the whole reply again for every token is O(n²): a 10 KB reply
  (~2500 tokens) takes ~45 s of CPU on a 2-core machine that way, more than the model needs to
  write it, against ~0.6 s here, redrawing at 15 Hz (see benchmarks/render.py).
- Scrollback. A `Live` region can only redraw what is on the screen. Once a reply is taller than
  the terminal, its top has scrolled away and every redraw leaves a copy of the screenful behind,
  so scrollback fills with duplicated or truncated lines.

So `MarkdownStream` (after aider's `mdstream.py` and Textual's `MarkdownStream`) cuts the reply into
top-level blocks with markdown-it, configured exactly as `rich.markdown.Markdown` configures it. A
block that no later text can change is printed into normal scrollback, once, with the blank line
rich would put before it; only the last, still growing block lives in a small transient
`rich.live.Live` region, redrawn at most `max_refresh_hz` times a second (and when a block is
printed above it), and never taller than the screen (a taller block shows its last lines). The
first redraw waits a frame, so a reply that arrives within one is simply printed. The live region
exists only on an interactive terminal; elsewhere finished blocks are printed as they come.
The printed output equals what `console.print(Markdown(whole_reply))` prints, however the reply
is chunked.

When a block is finished: only complete lines (up to the last newline) are parsed, and only from
the start of the open block, so the total work stays linear. A block is finished when another
top-level block starts after it: markdown-it decides a block's extent line by line, so text
added later cannot reach back past the start of a later block. That covers the cases where new
text does change earlier lines (`foo` becoming a setext heading when `---` follows, `| a |`
becoming a table header when `|---|` follows, lazy continuation lines, list items separated by
blank lines): those lines still belong to the last block, which stays open. A heading, a rule and
a closed code fence are finished as soon as their last line is complete, since nothing can
continue them. An unclosed code fence is an open block; while one is open, new lines are only
scanned for its closing fence (same character, at least as long, indented at most 3 spaces)
instead of parsing the fence again, and the live region renders only its last screenful (and
only the last items or rows of a long list, quote or table). Other blocks are parsed again at
each new line, which costs O(block) a line: fine for the blocks a reply is made of.

Finished blocks are rendered from the tokens already parsed, after a token that puts rich's
`new_line` state where the whole reply's rendering would have it, so the blank lines between
blocks come out as rich puts them (rich's own quirks included: a list or a quote gets its blank
line from the last element inside it).

The reply is untrusted text: control characters other than line endings and tabs are written
visibly (`\\x1b`, see safe_text) before markdown parsing, so the printed output is the one of
`Markdown(whole_reply)` with those characters made visible, and the only escapes on the terminal
are rich's own styling.

Known exception: a link reference definition (`[x]: https://...`) that comes after the link
using it cannot be applied to a block printed before it arrived, so such a link renders as plain
text, where a one-shot render would show the link. Definitions before their use work.
"""

from __future__ import annotations

import copy
import time
from collections.abc import Callable, Iterable
from types import TracebackType
from typing import Any

from markdown_it import MarkdownIt
from markdown_it.token import Token
from rich.console import Console, ConsoleOptions, RenderResult
from rich.live import Live
from rich.markdown import Markdown, UnknownElement
from rich.segment import Segment

from wizardchat.safe_text import terminal_safe

# The parser rich.markdown.Markdown builds (rich 15): block boundaries must be the ones it sees.
_PARSER = MarkdownIt().enable("strikethrough").enable("table")

# Last blocks that no later text can extend.
_FINAL_WHEN_LAST = {"fence", "hr", "heading_open"}

_Rendered = list[list[Segment]]


class _Lines:
    """Lines rendered earlier, shown as they are (the live region's content)."""

    def __init__(self, lines: _Rendered) -> None:
        self.lines = lines

    def __rich_console__(self, console: Console, options: ConsoleOptions) -> RenderResult:
        new_line = Segment.line()
        for i, line in enumerate(self.lines):
            if i:
                yield new_line
            yield from line


def _top_level(tokens: list[Token]) -> list[tuple[int, int]]:
    """(first, end) token indexes of each top-level block."""
    blocks: list[tuple[int, int]] = []
    start = -1
    for i, token in enumerate(tokens):
        if token.level != 0:
            continue
        if token.nesting == 0:
            blocks.append((i, i + 1))
        elif token.nesting == 1:
            start = i
        else:
            blocks.append((start, i + 1))
    return blocks


def _line_offset(text: str, line: int) -> int:
    """Index in `text` where line number `line` (0-based) starts."""
    pos = 0
    for _ in range(line):
        pos = text.index("\n", pos) + 1
    return pos


def _line_offsets(text: str, lines: list[int]) -> list[int]:
    """Indexes in `text` where each of the ascending line numbers `lines` starts."""
    out, pos, line = [], 0, 0
    for target in lines:
        while line < target:
            pos = text.index("\n", pos) + 1
            line += 1
        out.append(pos)
    return out


def _indent(line: str) -> int:
    """Columns of leading whitespace (tabs to the next multiple of 4, as CommonMark counts)."""
    col = 0
    for ch in line:
        if ch == " ":
            col += 1
        elif ch == "\t":
            col += 4 - col % 4
        else:
            break
    return col


def _closes_fence(line: str, char: str, length: int) -> bool:
    """Whether `line` (without its newline) is a closing fence for a `char` * `length` opener."""
    if _indent(line) > 3:
        return False
    rest = line.lstrip(" \t")
    run = len(rest) - len(rest.lstrip(char))
    return run >= length and not rest[run:].strip(" ")  # markdown-it allows only spaces after


def _new_line_after(token: Token) -> bool:
    """rich's `new_line` after the top-level block opened by `token`: the element's own."""
    return (Markdown.elements.get(token.type) or UnknownElement).new_line


def _new_line_token() -> Token:
    """A token that renders nothing and leaves rich's `new_line` set, as an HTML block does.

    rich puts a blank line before a top-level block when `new_line`, which the last element it
    closed set, is true: usually the block before, but for a list or a quote the last element
    inside it. Rendering finished blocks after this token starts them in the state in which the
    whole reply's rendering would reach them.
    """
    return Token("html_block", "", 0)


class MarkdownStream:
    """Print a streamed markdown reply: finished blocks once into scrollback, the open one live."""

    def __init__(
        self,
        console: Console,
        *,
        code_theme: str = "monokai",
        max_refresh_hz: float = 15.0,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.console = console
        self.interval = 1.0 / max_refresh_hz
        self.clock = clock
        self.refreshes = 0  # redraws of the live region (tests and benchmarks read it)
        self._chunks: list[str] = []  # the reply as received
        self._buf = ""  # normalized text from the start of the open block
        self._pending: list[str] = []  # normalized text not yet added to _buf
        self._after_cr = False  # the last chunk ended with "\r" (a "\n" next is part of it)
        self._env: dict[str, Any] = {}  # link reference definitions seen so far
        self._new_line = False  # rich's `new_line` state after the blocks printed so far
        self._fence: tuple[str, int] | None = None  # (char, length) of the open block's fence
        self._scanned = 0  # _buf up to here holds no closing fence
        # Where the live region may start rendering a long open list, quote or table: its
        # head (a table's header and delimiter rows) ends at _head, its children start at _parts.
        self._head = 0
        self._parts: list[int] = []
        self._unprinted: list[Markdown] = []  # finished blocks not printed yet
        # Live redraws in place only on an interactive terminal (not TERM=dumb, say).
        self._live_enabled = console.is_terminal and console.is_interactive
        self._template = Markdown("", code_theme=code_theme)
        # The live region's content, changed in place: Live.update(x, refresh=False) does not
        # reach what a console.print redraws below the printed text (rich keeps the last
        # refreshed renderable there), so a block printed above the region would show again
        # in it until the next refresh.
        self._region = _Lines([])
        self._live: Live | None = None
        self._last_refresh = clock()  # the first redraw waits a frame: short replies need none
        self._dirty = False
        self._finished = False
        self._text = ""

    # --- public --------------------------------------------------------------------------------

    def feed(self, chunk: str) -> None:
        """Add text; print the blocks it finishes and redraw the live region when it is time."""
        if self._finished:
            raise RuntimeError("feed() after finish()")
        if not chunk:
            return
        self._chunks.append(chunk)
        # Line endings first (a CR is one in markdown, so it cannot overwrite a line), then
        # every other control character made visible: rich is never given a raw ESC.
        text = terminal_safe(self._normalize(chunk))
        if not text:
            return
        self._pending.append(text)
        self._dirty = True
        if "\n" in text:
            self._advance()
        if not self._live_enabled:
            self._print_finished()
            return
        now = self.clock()
        if now - self._last_refresh >= self.interval or (
            self._unprinted and self._live is not None
        ):
            self._refresh(now)  # the region must not keep showing blocks printed above it
        else:
            self._print_finished()

    def finish(self) -> str:
        """Print what is left, end the live region and return the whole reply; idempotent."""
        if self._finished:
            return self._text
        self._finished = True
        self._text = "".join(self._chunks)
        try:
            self._join()
            tokens = _PARSER.parse(self._buf, self._env)
            rest = self._blocks(tokens) if tokens else None
            self._buf = ""
            if rest is not None:
                self._unprinted.append(rest)
            self._region.lines = []
            if self._live is not None and not self._unprinted:
                self._live.refresh()
            self._print_finished()
        finally:
            if self._live is not None:
                self._live.stop()
                self._live = None
        return self._text

    def __enter__(self) -> MarkdownStream:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.finish()

    # --- finding finished blocks -------------------------------------------------------------

    def _normalize(self, chunk: str) -> str:
        """Line endings as markdown-it normalizes them, so its line numbers index our text."""
        if self._after_cr and chunk.startswith("\n"):
            chunk = chunk[1:]
        self._after_cr = chunk.endswith("\r")
        if "\r" in chunk:
            chunk = chunk.replace("\r\n", "\n").replace("\r", "\n")
        return chunk

    def _join(self) -> None:
        if self._pending:
            self._buf += "".join(self._pending)
            self._pending.clear()

    def _advance(self) -> None:
        """Queue the blocks that new complete lines finished for printing."""
        self._join()
        buf = self._buf
        end = buf.rfind("\n") + 1
        if self._fence is not None:
            char, length = self._fence
            pos = self._scanned
            while pos < end:
                nl = buf.index("\n", pos)
                if _closes_fence(buf[pos:nl], char, length):
                    break
                pos = nl + 1
            self._scanned = pos
            if pos >= end:
                return
            self._fence = None  # closed: parse again from its opening line
        complete = buf[:end]
        tokens = _PARSER.parse(complete, self._env)
        blocks = _top_level(tokens)
        self._head, self._parts = 0, []
        if not blocks:
            return
        done = len(blocks) - 1
        first, last = blocks[-1]
        opener = tokens[first]
        assert opener.map is not None
        if opener.type in _FINAL_WHEN_LAST and (
            opener.type != "fence" or self._fence_closed(complete, opener)
        ):
            done += 1
        elif opener.type == "fence":
            self._fence = (opener.markup[0], len(opener.markup))
        finished = self._blocks(tokens[: blocks[done - 1][1]]) if done else None
        # From here on _buf starts at the open block's first line: what came before it is
        # printed, or blank lines and link reference definitions (kept in _env).
        open_block = done < len(blocks)
        cut = _line_offset(complete, opener.map[0] if open_block else opener.map[1])
        self._buf = buf[cut:]
        if finished is not None:
            self._unprinted.append(finished)
        if self._fence is not None:
            self._scanned = end - cut
        elif open_block and self._live_enabled:
            self._find_parts(tokens[first:last])

    def _find_parts(self, tokens: list[Token]) -> None:
        """Note where the open block's children start (offsets in _buf), for `_view`."""
        opener = tokens[0]
        assert opener.map is not None
        if opener.type == "table_open":
            level, head = 2, 2  # rows; the header and delimiter rows are always shown
        elif opener.type in ("bullet_list_open", "ordered_list_open", "blockquote_open"):
            level, head = 1, 0
        else:
            return
        start = opener.map[0]
        lines = [
            t.map[0] - start
            for t in tokens
            if t.level == level and t.nesting >= 0 and t.map and t.map[0] - start >= head
        ]
        offsets = _line_offsets(self._buf, [head, *lines])
        self._head, self._parts = offsets[0], offsets[1:]

    @staticmethod
    def _fence_closed(text: str, fence: Token) -> bool:
        assert fence.map is not None
        start, stop = fence.map
        if stop - start < 2:
            return False
        pos = _line_offset(text, stop - 1)
        line = text[pos : text.index("\n", pos)]  # text ends with a newline
        return _closes_fence(line, fence.markup[0], len(fence.markup))

    def _blocks(self, tokens: list[Token]) -> Markdown | None:
        """Top-level blocks to print, counted as printed (None when there are none)."""
        blocks = _top_level(tokens)
        if not blocks:
            return None
        out = self._markdown(tokens)
        self._new_line = _new_line_after(tokens[blocks[-1][0]])
        return out

    def _markdown(self, tokens: list[Token]) -> Markdown:
        """`Markdown` for blocks parsed already, continuing from the blocks printed before."""
        md = copy.copy(self._template)  # Markdown() would build a parser each time
        md.parsed = [_new_line_token(), *tokens] if self._new_line else tokens
        return md

    # --- the live region ---------------------------------------------------------------------

    def _print_finished(self) -> None:
        """Print the queued blocks (each taken off the queue first: printed at most once)."""
        while self._unprinted:
            self.console.print(self._unprinted.pop(0))

    def _refresh(self, now: float) -> None:
        """Redraw the live region, and print finished blocks above it."""
        lines = self._view() if self._dirty else None
        self._dirty = False
        if self._live is None:
            if not lines:
                self._print_finished()
                return
            self._live = Live(
                self._region,
                console=self.console,
                transient=True,
                auto_refresh=False,
                # sys.stdout and sys.stderr stay as they are: swapping them while a reply streams
                # would surprise whoever holds them (the REPL, llama.cpp's log capture).
                redirect_stdout=False,
                redirect_stderr=False,
                vertical_overflow="crop",
            )
            self._live.start()
        if lines is not None:
            self._region.lines = lines
        if self._unprinted:
            self._print_finished()  # each print redraws the region, as it is now, below it
        elif lines is not None:
            self._live.refresh()
        self._last_refresh = now
        self.refreshes += 1

    def _view(self) -> _Rendered:
        """The open block's last screenful of lines (with the blank line rich puts before it)."""
        self._join()
        source = self._buf
        if not source.strip():
            return []
        height = max(1, self.console.height - 1)
        if self._fence is not None:
            lines = self._render(self._fence_tail(source, height))
        else:
            tail = self._container_tail(source, height)
            lines = self._render(tail)
            if len(lines) < height and tail != source:
                lines = self._render(source)  # the tail was too short after all
        return lines[-height:]

    def _render(self, source: str) -> _Rendered:
        env = {"references": dict(self._env.get("references", {}))}
        tokens = _PARSER.parse(source, env)  # a copy: partial lines must not define links
        if not tokens:
            return []
        return self.console.render_lines(self._markdown(tokens), self.console.options, pad=False)

    def _container_tail(self, source: str, height: int) -> str:
        """The head and last children of a long open list, quote or table: a screenful or more.

        Rendering a long block in full at every refresh would cost O(block) each time; its last
        children are all the live region shows (a list's numbering or a table's column widths
        may differ until the block is printed in full).
        """
        lines, stop = 0, len(source)
        for start in reversed(self._parts):
            lines += source.count("\n", start, stop)
            stop = start
            if lines >= height:
                return source[: self._head] + source[start:] if start > self._head else source
        return source

    @staticmethod
    def _fence_tail(source: str, height: int) -> str:
        """The fence's opening line and its last `height` lines: enough to fill the screen."""
        head = source.find("\n") + 1
        pos = len(source)
        for _ in range(height):
            pos = source.rfind("\n", head, pos)
            if pos < head:
                return source
        return source[:head] + source[pos + 1 :]


def stream_markdown(
    chunks: Iterable[str],
    console: Console,
    *,
    code_theme: str = "monokai",
    max_refresh_hz: float = 15.0,
    clock: Callable[[], float] = time.monotonic,
) -> str:
    """Show `chunks` as markdown while they arrive and return the whole text.

    What arrived is printed also when the chunks raise (KeyboardInterrupt included), and then
    the exception propagates.
    """
    with MarkdownStream(
        console, code_theme=code_theme, max_refresh_hz=max_refresh_hz, clock=clock
    ) as stream:
        for chunk in chunks:
            stream.feed(chunk)
    return stream.finish()
