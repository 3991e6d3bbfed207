"""The REPL shows a long prompt's evaluation on the terminal and erases it before the reply."""

from __future__ import annotations

import re
from pathlib import Path

from conftest import Models
from test_repl import Chat

PROGRESS = r"evaluating 2,\d{3} tokens… \d{1,2}%"  # a percentage: after a batch of 256
# The last progress line, then spaces over it, back to its start: the reply writes there.
ERASED = re.compile(r"evaluating [\d,]+ tokens…(?: \d{1,3}%)? *\r +\r")


def assert_erased(raw: str) -> None:
    """Any progress in `raw` (terminal output) ends with its line erased."""
    if "evaluating" in raw:
        last = raw[raw.rindex("evaluating") :]
        assert ERASED.match(last), repr(last)


def test_repl_shows_the_prompt_progress_then_erases_it(models: Models, tmp_path: Path) -> None:
    (tmp_path / "big.txt").write_text("word " * 1200, encoding="utf-8")  # 2,400 tokens
    chat = Chat("-m", str(models.slow), "-c", "4096", "-b", "256", "-n", "5", cwd=tmp_path)
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
