"""The REPL shows a long prompt's evaluation on the terminal and erases it before the reply."""

from __future__ import annotations

import io
import re
import time
from pathlib import Path

from test_repl import Chat

from wizardchat.tui.progress import PromptProgressLine

PROGRESS = r"evaluating 2,\d{3} tokens… \d{1,2}%"  # a percentage: after a batch of 256
# The last progress line, then spaces over it, back to its start: the reply writes there.
ERASED = re.compile(r"evaluating [\d,]+ tokens…(?: \d{1,3}%)? *\r +\r")


def assert_erased(raw: str) -> None:
    """Any progress in `raw` (terminal output) ends with its line erased."""
    if "evaluating" in raw:
        last = raw[raw.rindex("evaluating") :]
        assert ERASED.match(last), repr(last)


def test_repl_shows_the_prompt_progress_then_erases_it(
    slow_prompt_model: Path, tmp_path: Path
) -> None:
    (tmp_path / "big.txt").write_text("word " * 1200, encoding="utf-8")  # 2,400 tokens
    chat = Chat("-m", str(slow_prompt_model), "-c", "4096", "-b", "256", "-n", "5", cwd=tmp_path)
    try:
        chat.child.timeout = 300  # a loaded machine
        chat.child.send("/read big.txt\r")
        chat.expect("big.txt")
        shown = chat.expect(PROGRESS)
        shown += str(chat.child.after) + chat.expect(r"5 tokens · ")  # the reply's stats line
        assert_erased(shown)
        chat.wait_prompt()
        # A short message: on this loaded machine it may take long enough to show a spinner.
        chat.child.send("hi\r")
        chat.expect("hi")
        assert_erased(chat.expect(r"5 tokens · "))
        chat.wait_prompt()
        assert chat.exit() == 0
    finally:
        chat.kill()


class Screen(io.StringIO):
    def wait_for(self, text: str) -> str:
        """The output once `text` is in it (bounded)."""
        deadline = time.monotonic() + 10
        while text not in self.getvalue():
            assert time.monotonic() < deadline, self.getvalue()
            time.sleep(0.01)
        return self.getvalue()


def test_progress_line_counts_spins_and_erases_itself() -> None:
    out = Screen()
    line = PromptProgressLine(out, delay=0)
    line.update(0, 4537)
    out.wait_for("evaluating 4,537 tokens…")
    line.update(1600, 4537)
    out.wait_for("evaluating 4,537 tokens… 35%")
    line.end()
    written = out.getvalue()
    last = written[written.rindex("\r", 0, len(written) - 1) :]
    assert re.fullmatch(r"\r {20,}\r", last)  # blanked over its full width, cursor back
    assert len({c for c in written if c in PromptProgressLine.SPINNER}) >= 1
    time.sleep(0.3)
    assert out.getvalue() == written  # nothing after the end
    line.end()  # idempotent
    assert out.getvalue() == written


def test_progress_line_shows_nothing_for_a_quick_prompt() -> None:
    out = Screen()
    line = PromptProgressLine(out, delay=5)
    line.update(0, 40)
    line.update(40, 40)
    line.end()
    assert out.getvalue() == ""
