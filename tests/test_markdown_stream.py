"""MarkdownStream prints what a one-shot `console.print(Markdown(text))` prints, however chunked."""

from __future__ import annotations

import io
import random
import re
from collections.abc import Iterator

import pyte
import pytest
from rich.console import Console
from rich.live import Live
from rich.markdown import Markdown

from wizardchat.tui.markdown_stream import MarkdownStream, stream_markdown


@pytest.fixture(autouse=True)
def ordinary_terminal(monkeypatch: pytest.MonkeyPatch) -> None:
    """Consoles see an ordinary interactive terminal, whatever environment runs the tests."""
    monkeypatch.setenv("TERM", "xterm-256color")
    for name in ("TTY_INTERACTIVE", "TTY_COMPATIBLE", "NO_COLOR", "FORCE_COLOR"):
        monkeypatch.delenv(name, raising=False)


CORPUS: dict[str, str] = {
    "paragraphs": (
        "Sure! Here is a short answer.\n\n"
        "Python's `asyncio` module runs **one** event loop per thread; see the "
        "[docs](https://docs.python.org/3/library/asyncio.html) for *details*. Use ~~threads~~ "
        "tasks instead.\nA second line of the same paragraph.  \nAfter a hard break.\n\n"
        "Last paragraph without a final newline"
    ),
    "lists": (
        "You can do it in three ways:\n\n"
        "- **Tight** list item one\n"
        "- item two with `code`\n"
        "  - nested item\n"
        "  - another nested item\n"
        "    1. deeper ordered\n"
        "    2. deeper again\n"
        "- item three\n\n"
        "Loose list:\n\n"
        "1. First step.\n\n"
        "   A continuation paragraph of the first step, indented under it.\n\n"
        "2. Second step.\n"
        "3. Third step,\n"
        "lazily continued.\n\n"
        "* star bullets\n"
        "+ plus bullets start a new list\n\n"
        "Done.\n"
    ),
    "ordered_from_3": (
        "Continuing from before:\n\n3. third\n4. fourth\n5. fifth\n\n10) ten\n11) eleven\n"
    ),
    "headings": (
        "# Title\n\nIntro text.\n\n## Section *two*\n\nSetext heading\n==============\n\n"
        "Another one\nover two lines\n---\n\n### Third level\n#### Fourth\n##### Fifth\n"
        "###### Sixth\ntext right after\n"
    ),
    "tables": (
        "| Name | Size | Notes |\n|:-----|-----:|:-----:|\n| a | 1 | **bold** |\n"
        "| b | 22 | `code` |\n\n"
        "Text right under a table becomes a row:\n\n"
        "| x | y |\n|---|---|\n| 1 | 2 |\nfollowing text\n\n"
        "A paragraph\n| h1 | h2 |\n| --- | --- |\n| c1 | c2 |\n\nend\n"
    ),
    "code": (
        "Here is the code:\n\n```python\ndef greet(name: str) -> str:\n"
        '    """Say hello."""\n    return f"Hello, {name}!"\n```\n'
        "And the shell:\n\n```bash\n$ pip install rich\n```\n\n"
        "~~~\nplain ~~~ fence with ``` inside\n```\n~~~\n\n"
        "````md\n# not a heading\n\n- not a list\n\n```\nstill inside\n```\n\n"
        "| not | a table |\n|---|---|\n````\n\n"
        "Indented code:\n\n    x = 1\n\n    y = 2\n\nafter\n"
    ),
    "fence_not_closed": (
        "Start:\n\n```js\nconst a = 1;\n\n// # comment\n    ``` indented four: not a closer\n"
        "``` not a closer either\nconsole.log(a);\n"
    ),
    "fence_closer_longer": "```\na\n`````\n\nafter\n\n  ```\n  indented opener\n   ```\nend\n",
    "quotes_and_rules": (
        "> A block quote\nwith a lazy line.\n>\n> > nested quote\n\n---\n\n***\n"
        "Text\n\n> - list in a quote\n> - second\n\n___\n"
    ),
    "long_lines": (
        "This is a very long line that keeps going and going well beyond the width of any "
        "reasonable terminal so that rich has to wrap it across several lines, and it still "
        "goes on with more words, `inline code`, **bold text** and a "
        "[link](https://example.com/a/very/long/path/that/might/also/wrap/somewhere) too.\n\n"
        "- a list item that is also very long and has to wrap because it keeps going and going "
        "and going and going and going\n"
    ),
    "unicode": (
        "# 标题 🎉\n\n中文段落，包含一些文字和标点符号。日本語のテキストもあります。"  # noqa: RUF001
        "价格是 €5 或 ¥30。\n\n- 列表项 ✅\n- émojis 🚀 and ümlauts\n\n"
        "| 名前 | 値 |\n|---|---|\n| 東京 | €1 |\n"
    ),
    "html_and_refs": (
        "<div>\nraw html block\n</div>\n\n[ref]: https://example.com\n\n"
        "See [ref] and [the docs][ref].\n\n<!-- a comment -->\n\ntail\n"
    ),
    "setext_and_table_changes": (
        "foo\nbar\n---\nbaz\n\n| a |\n|---|\n\n| b |\nnot a delimiter\n\n"
        "para\n    not indented code (continuation)\n\n- item\n---\n"
    ),
    "whitespace": "\n\n   \n  Leading blank lines.\n\n\n\nTrailing blanks.   \n\n \n",
    "crlf": "Windows line\r\nendings here.\r\n\r\n- a\r\n- b\r\n\r\nold mac\rline\r",
    "empty": "",
    "blank_only": "\n \n\t\n",
}


def chunkings(text: str) -> Iterator[list[str]]:
    """The same text cut in different ways: whole, by line, by character, at random sizes."""
    yield [text]
    yield text.splitlines(keepends=True)
    yield list(text)
    for seed in range(4):
        rng = random.Random(seed)
        chunks, pos = [], 0
        while pos < len(text):
            n = rng.randint(1, 12)
            chunks.append(text[pos : pos + n])
            pos += n
        yield chunks


def make_console(**kw: object) -> Console:
    options: dict[str, object] = {"width": 80, "force_terminal": False, "color_system": None}
    options.update(kw)
    return Console(file=io.StringIO(), **options)  # type: ignore[arg-type]


def output(console: Console) -> str:
    file = console.file
    assert isinstance(file, io.StringIO)
    return file.getvalue()


def one_shot(text: str, **kw: object) -> str:
    console = make_console(**kw)
    console.print(Markdown(text))
    return output(console)


def streamed(chunks: list[str], **kw: object) -> str:
    console = make_console(**kw)
    assert stream_markdown(chunks, console) == "".join(chunks)
    return output(console)


@pytest.mark.parametrize("width", [80, 37])
@pytest.mark.parametrize("name", CORPUS)
def test_streamed_output_equals_one_shot(name: str, width: int) -> None:
    text = CORPUS[name]
    expected = one_shot(text, width=width)
    for chunks in chunkings(text):
        assert streamed(chunks, width=width) == expected, chunks


LINK_ID = re.compile(r"id=\d+")  # rich numbers hyperlinks at random


@pytest.mark.parametrize("name", CORPUS)
def test_styled_output_equals_one_shot(name: str) -> None:
    text = CORPUS[name]
    expected = LINK_ID.sub("id=0", one_shot(text, color_system="truecolor"))
    for chunks in list(chunkings(text))[3:5]:
        got = LINK_ID.sub("id=0", streamed(chunks, color_system="truecolor"))
        assert got == expected


def test_whole_corpus_in_one_reply() -> None:
    text = "\n\n".join(CORPUS.values())
    expected = one_shot(text, width=60)
    for chunks in list(chunkings(text))[2:4]:
        assert streamed(chunks, width=60) == expected


# Lines whose meaning depends on their neighbours; random sequences of them find the cases where
# a block would be declared finished too early.
TRICKY_LINES = (
    *["", "", "", "text words here", "more text", "  continuation", "   more", "a long line " * 6],
    *["- item", "  - nested", "    - deeper", "1. item", "3) item", "2. two", "1.", "-"],
    *["* star", "+ plus", "- [ ] task", "  code in item", "- ```", "1. ```py"],
    *["# h", "## h2 *em*", "  # hh", "---", "===", "***", "\\# escaped", "&amp; entity"],
    *["| a | b |", "|---|---|", "| 1 | 2 |", "a | b", "| x |", "|:-:|"],
    *["```", "```py", "````", "~~~", "   ```", "  ```", "    indented", "     code5", "\t tab"],
    *["> quote", ">", "> > deep", "> - q item", "<div>", "</div>", "<!-- x", "-->"],
    *["see [ref]", "![img](x.png) pic", "text ![i](y)", "<kbd>x</kbd>", "~~strike~~"],
    *["**bold", "`code`", "foo  ", "中文，标点。", "- 列表 ✅ 🚀"],  # noqa: RUF001
)


def test_random_line_sequences_stream_like_one_shot() -> None:
    rng = random.Random(0)
    for _ in range(150):
        lines = [rng.choice(TRICKY_LINES) for _ in range(rng.randint(1, 25))]
        if rng.random() < 0.2:
            lines.insert(0, "[ref]: /url")  # definitions before their use only
        text = "\n".join(lines) + rng.choice(["", "\n", "\n\n", " tail"])
        expected = one_shot(text, width=40)
        assert streamed(list(text), width=40) == expected, text
        pos, chunks = 0, []
        while pos < len(text):
            n = rng.randint(1, 10)
            chunks.append(text[pos : pos + n])
            pos += n
        assert streamed(chunks, width=40) == expected, text


# --- blocks are printed as soon as they are finished ----------------------------------------


def printed_after(chunks: list[str]) -> str:
    """What a non-terminal console shows before finish()."""
    console = make_console()
    stream = MarkdownStream(console)
    for chunk in chunks:
        stream.feed(chunk)
    return output(console)


def test_block_printed_when_the_next_one_starts() -> None:
    assert printed_after(["First para", "graph.\n"]) == ""
    assert printed_after(["First paragraph.\n\n"]) == ""
    assert printed_after(["First paragraph.\n\nSec"]) == ""  # the next line is not complete
    assert printed_after(["First paragraph.\n\nSecond\n"]) == one_shot("First paragraph.")


def test_heading_rule_and_closed_fence_are_final_at_once() -> None:
    assert printed_after(["# Title\n"]) == one_shot("# Title")
    assert printed_after(["***\n"]) == one_shot("***")
    assert printed_after(["```py\nx = 1\n", "```\n"]) == one_shot("```py\nx = 1\n```")


def test_unclosed_fence_stays_open() -> None:
    not_closers = ["    ```\n", "``` x\n", "~~~\n"]  # indented 4, info string, other char
    assert printed_after(["```py\n", "x = 1\n\n", "# not a heading\n", *not_closers]) == ""
    assert printed_after(["````\n", "```\n", "~~~~\n"]) == ""


def test_text_that_changes_earlier_lines_keeps_them_open() -> None:
    assert printed_after(["foo\n"]) == ""  # may become a setext heading
    assert printed_after(["| a |\n"]) == ""  # may become a table header
    assert printed_after(["- a\n\n"]) == ""  # the list may go on
    assert printed_after(["> quote\n"]) == ""


def test_definition_before_use_applies_to_later_blocks() -> None:
    text = "[x]: https://example.com\n\nfirst block\n\nsee [x]\n\nlast\n"
    for chunks in chunkings(text):
        assert streamed(chunks) == one_shot(text)
    assert "[x]" not in one_shot(text)


def test_definition_after_use_is_the_documented_exception() -> None:
    text = "see [x]\n\nmore text\n\n[x]: https://example.com\n"
    assert "[x]" not in one_shot(text)
    assert "see [x]" in streamed(list(text))


def test_leading_blank_lines_produce_nothing() -> None:
    for kw in ({}, {"force_terminal": True, "height": 12}):
        console = make_console(**kw)
        stream = MarkdownStream(console, clock=lambda: 0.0)
        for chunk in ["\n", "\n", "   ", "\n", " "]:
            stream.feed(chunk)
        assert output(console) == ""
        assert stream.finish() == "\n\n   \n "
        assert output(console) == ""


def test_finish_is_idempotent_and_returns_the_raw_text() -> None:
    console = make_console()
    with MarkdownStream(console) as stream:
        stream.feed("a\r\n")
        stream.feed("\r\nb")
    assert stream.finish() == "a\r\n\r\nb"
    assert output(console) == one_shot("a\n\nb")
    with pytest.raises(RuntimeError):
        stream.feed("more")


def test_interrupted_stream_prints_what_arrived_then_raises() -> None:
    def chunks() -> Iterator[str]:
        yield "# Head\n\nSome **bold"
        yield " text"
        raise KeyboardInterrupt

    console = make_console()
    with pytest.raises(KeyboardInterrupt):
        stream_markdown(chunks(), console)
    assert output(console) == one_shot("# Head\n\nSome **bold text")


# --- the live region on a terminal ------------------------------------------------------------


class Clock:
    """A clock that moves only when told to."""

    def __init__(self, step: float) -> None:
        self.now = 0.0
        self.step = step

    def __call__(self) -> float:
        return self.now

    def tick(self) -> None:
        self.now += self.step


COLUMNS, ROWS = 60, 12

Cell = tuple[str, str, str, bool, bool, bool]


def terminal_cells(written: str) -> list[list[Cell]]:
    """Scrollback and screen of a 60x12 terminal after `written`, without trailing blank rows."""
    screen = pyte.HistoryScreen(COLUMNS, ROWS, history=100_000)
    stream = pyte.Stream(screen)
    stream.feed(written.replace("\n", "\r\n"))  # what the tty's onlcr does
    rows = [*screen.history.top, *(screen.buffer[y] for y in range(ROWS))]
    cells = [
        [
            (c.data, c.fg, c.bg, c.bold, c.italics, c.underscore)
            for c in (r[x] for x in range(COLUMNS))
        ]
        for r in rows
    ]
    blank = (" ", "default", "default", False, False, False)
    while cells and all(c == blank for c in cells[-1]):
        cells.pop()
    return cells


def terminal_console(color_system: str | None) -> Console:
    return make_console(width=COLUMNS, height=ROWS, force_terminal=True, color_system=color_system)


def text_of(cells: list[list[Cell]]) -> list[str]:
    return ["".join(c[0] for c in row).rstrip() for row in cells]


TALL = (
    "\n\n".join(
        CORPUS[name]
        for name in ("lists", "headings", "code", "tables", "quotes_and_rules", "long_lines")
    )
    + "\n\n```python\n"
    + "".join(f"print({i})  # line {i}\n" for i in range(40))
    + "```\n\nBye."
)


@pytest.mark.parametrize(
    ("color_system", "step", "seed"),
    [(None, 0.02, 0), ("standard", 0.02, 1), (None, 1.0, 2), ("standard", 1.0, 3)],
)
def test_scrollback_holds_each_line_once(color_system: str | None, step: float, seed: int) -> None:
    """Streamed with the live region in use, a reply 10 screens tall leaves the one-shot render
    in scrollback: every line once, in order, with its colours (step 1.0: a redraw per chunk)."""
    reference = terminal_console(color_system)
    reference.print(Markdown(TALL))
    expected = terminal_cells(output(reference))
    assert len(expected) > 10 * ROWS

    console = terminal_console(color_system)
    clock = Clock(step)
    stream = MarkdownStream(console, clock=clock)
    rng = random.Random(seed)
    pos = 0
    while pos < len(TALL):
        n = rng.randint(1, 8)
        stream.feed(TALL[pos : pos + n])
        clock.tick()
        pos += n
    stream.finish()
    assert stream.refreshes > 100  # the live region was in use
    got = terminal_cells(output(console))
    assert text_of(got) == text_of(expected)
    assert got == expected


def test_scrollback_check_catches_a_naive_live_region() -> None:
    """The check above fails for the usual `Live.update(Markdown(text))` on a tall reply."""
    reply = CORPUS["lists"] + "\n" + CORPUS["headings"]
    reference = terminal_console(None)
    reference.print(Markdown(reply))
    console = terminal_console(None)
    text = ""
    with Live(console=console, auto_refresh=False, vertical_overflow="visible") as live:
        for line in reply.splitlines(keepends=True):
            text += line
            live.update(Markdown(text), refresh=True)
    assert text_of(terminal_cells(output(console))) != text_of(terminal_cells(output(reference)))


def test_live_region_shows_the_end_of_a_tall_open_block() -> None:
    """A tall open block shows its last lines only: the region never scrolls the screen."""
    console = terminal_console(None)
    clock = Clock(1.0)
    stream = MarkdownStream(console, clock=clock)
    fence = "[ref]: https://example.com\n\n```\n" + "".join(f"line {i}\n" for i in range(40))
    items = "".join(f"- item {i}\n" for i in range(40))
    rows = "| a | b |\n|---|---|\n" + "".join(f"| {i} | row {i} |\n" for i in range(40))
    quote = "".join(f"> quoted {i}\n>\n" for i in range(40))
    checked = 0
    for text in (fence, "```\n\n" + items, "\n" + rows, "\n" + quote):
        for line in text.splitlines(keepends=True):
            stream.feed(line)
            clock.tick()
            live = stream._live
            if live is None:
                assert line in ("[ref]: https://example.com\n", "\n")  # nothing to show yet
                continue
            checked += 1
            shown = [
                "".join(s.text for s in row).strip()
                for row in console.render_lines(live.renderable, pad=False)
            ]
            assert len(shown) < ROWS
            fed = re.search(r"(line|item|row|quoted) \d+", line)
            if fed:
                bottom = [row for row in shown if row][-1]  # code and tables end with padding
                assert fed[0] in bottom, (shown, line)
    assert checked > 150
    stream.finish()


# --- throttling -------------------------------------------------------------------------------


def test_refresh_is_throttled() -> None:
    console = terminal_console(None)
    clock = Clock(1.0)
    stream = MarkdownStream(console, clock=clock)
    stream.feed("w ")
    clock.tick()  # a frame later: the next chunk is drawn, then time stands still
    for i in range(1000):
        stream.feed(f"w{i} ")
    assert stream.refreshes == 1
    stream.finish()


def test_reply_shorter_than_a_frame_needs_no_live_region() -> None:
    console = terminal_console("standard")
    text = "Hello **world**, this is `short`.\n\n- one\n- two"
    stream_markdown(list(text), console, clock=lambda: 5.0)
    reference = terminal_console("standard")
    reference.print(Markdown(text))
    assert output(console) == output(reference)  # no cursor hiding, no redraws


def test_refresh_rate_follows_the_clock() -> None:
    console = terminal_console(None)
    clock = Clock(0.01)  # 100 chunks a second, 10 seconds
    stream = MarkdownStream(console, clock=clock, max_refresh_hz=15)
    for i in range(1000):
        stream.feed(f"w{i} ")
        clock.tick()
    assert 140 <= stream.refreshes <= 160
    stream.finish()


def test_no_live_region_on_a_dumb_terminal(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("TERM", "dumb")
    console = terminal_console(None)
    text = CORPUS["lists"]
    stream = MarkdownStream(console, clock=Clock(1.0))
    for chunk in text:
        stream.feed(chunk)
    stream.finish()
    assert stream.refreshes == 0
    reference = terminal_console(None)
    reference.print(Markdown(text))
    assert output(console) == output(reference)


def test_no_live_region_on_a_plain_file() -> None:
    console = make_console()
    stream = MarkdownStream(console, clock=lambda: 0.0)
    for i in range(100):
        stream.feed(f"w{i} ")
    assert stream.refreshes == 0
    assert output(console) == ""
    stream.finish()
    assert output(console) == one_shot("".join(f"w{i} " for i in range(100)))


# --- every frame the terminal shows -----------------------------------------------------------


class WriteLog(io.StringIO):
    """A console file that remembers each write: the terminal shows the screen after each."""

    def __init__(self) -> None:
        super().__init__()
        self.writes: list[str] = []

    def write(self, text: str) -> int:
        self.writes.append(text)
        return super().write(text)


def screen_rows(screen: pyte.HistoryScreen) -> list[str]:
    """The non-blank rows of scrollback and screen, top to bottom."""
    rows = [*screen.history.top, *(screen.buffer[y] for y in range(screen.lines))]
    text = ["".join(row[x].data for x in range(screen.columns)).rstrip() for row in rows]
    return [row for row in text if row]


PARAGRAPHS = [f"Paragraph {i} says {' '.join(['word'] * (i % 4 + 1))} {i}." for i in range(12)]


def check_frame(rows: list[str], finished: int) -> None:
    """Rows show paragraphs 0..k-1 once each, in order, then maybe a part of paragraph k; and
    at least the `finished` first ones in full."""
    complete = 0
    while complete < len(rows) and rows[complete] == PARAGRAPHS[complete]:
        complete += 1
    rest = rows[complete:]
    assert len(rest) <= 1, rows  # a doubled or misplaced row
    if rest:
        partial = rest[0]
        assert complete < len(PARAGRAPHS) and PARAGRAPHS[complete].startswith(partial), rows
    assert complete >= finished, rows


@pytest.mark.parametrize("step", [0.02, 0.07, 1.0])
def test_every_frame_shows_each_finished_block_once(step: float) -> None:
    """The screen after each write the terminal gets, not only at the end: a finished block is
    never shown twice (once printed, once still in the live region) nor missing."""
    file = WriteLog()
    console = Console(file=file, width=COLUMNS, height=ROWS, force_terminal=True, color_system=None)
    screen = pyte.HistoryScreen(COLUMNS, ROWS, history=10_000)
    terminal = pyte.Stream(screen)
    seen = 0
    frames = 0

    def show_writes(finished: int) -> None:
        nonlocal seen, frames
        for text in file.writes[seen:]:
            terminal.feed(text.replace("\n", "\r\n"))
            check_frame(screen_rows(screen), finished)
            frames += 1
        seen = len(file.writes)

    clock = Clock(step)
    stream = MarkdownStream(console, clock=clock)
    text = "\n\n".join(PARAGRAPHS) + "\n"
    tokens = re.findall(r"\S+\s*", text)
    fed = ""
    for token in tokens:
        stream.feed(token)
        fed += token
        clock.tick()
        # A paragraph is finished once the next one's first line is complete.
        finished = max(0, sum(1 for p in PARAGRAPHS if p + "\n" in fed) - 1)
        show_writes(min(finished, len(PARAGRAPHS)))
    stream.finish()
    show_writes(len(PARAGRAPHS))
    assert screen_rows(screen) == PARAGRAPHS
    assert stream.refreshes > 10 and frames > 20


@pytest.mark.parametrize(("step", "seed"), [(0.02, 0), (1.0, 1)])
def test_no_frame_of_a_tall_reply_shows_a_line_twice(step: float, seed: int) -> None:
    """Headings, lists, code, tables and quotes too: a line the whole reply shows once is on the
    screen (and the scrollback just above it) at most once after every write."""
    reference = terminal_console(None)
    reference.print(Markdown(TALL))
    final = [row.strip() for row in text_of(terminal_cells(output(reference)))]
    unique = {row for row in final if len(row) > 8 and final.count(row) == 1}

    file = WriteLog()
    console = Console(file=file, width=COLUMNS, height=ROWS, force_terminal=True, color_system=None)
    screen = pyte.HistoryScreen(COLUMNS, ROWS, history=10_000)
    terminal = pyte.Stream(screen)
    clock = Clock(step)
    stream = MarkdownStream(console, clock=clock)
    rng = random.Random(seed)
    seen = pos = 0
    while pos <= len(TALL):
        if pos < len(TALL):
            n = rng.randint(1, 8)
            stream.feed(TALL[pos : pos + n])
            clock.tick()
            pos += n
        else:
            stream.finish()
            pos += 1
        for text in file.writes[seen:]:
            terminal.feed(text.replace("\n", "\r\n"))
            near = [*list(screen.history.top)[-ROWS:], *(screen.buffer[y] for y in range(ROWS))]
            rows = ["".join(r[x].data for x in range(COLUMNS)).strip() for r in near]
            doubled = [row for row in unique if rows.count(row) > 1]
            assert not doubled, rows
        seen = len(file.writes)
    assert stream.refreshes > 50
