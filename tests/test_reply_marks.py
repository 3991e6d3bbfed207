"""A reply cut by --max-tokens, or empty, is never silent in `ask` and batch mode: a mark on
stderr, while stdout keeps the reply's text alone."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from conftest import Models, run_cli
from gguf_models import write_model

MAX_TOKENS_MARK = "[max tokens reached]"
EMPTY_MARK = "[empty reply]"


@pytest.fixture(scope="module")
def silent_model(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A model that answers EOS at once: every reply is empty."""
    return write_model(tmp_path_factory.mktemp("silent") / "silent.gguf", script=("</s>",))


def test_ask_cut_by_max_tokens_says_so_on_stderr(models: Models) -> None:
    cut = run_cli("ask", "Hi", "-m", str(models.scripted), "-n", "3")
    assert cut.code == 0, cut.stderr
    assert cut.stdout == "Hello, world\n"  # the reply alone
    assert MAX_TOKENS_MARK in cut.stderr
    whole = run_cli("ask", "Hi", "-m", str(models.scripted))
    assert MAX_TOKENS_MARK not in whole.stderr and EMPTY_MARK not in whole.stderr


def test_ask_empty_reply_says_so_on_stderr(silent_model: Path) -> None:
    result = run_cli("ask", "Hi", "-m", str(silent_model))
    assert result.code == 0, result.stderr
    assert result.stdout == "\n"
    assert EMPTY_MARK in result.stderr


def test_batch_marks_go_to_stderr_and_stdout_keeps_the_replies(
    models: Models, silent_model: Path
) -> None:
    cut = run_cli("run", "-m", str(models.scripted), "-n", "3", stdin="Hi\nAgain\n")
    assert cut.code == 0, cut.stderr
    assert cut.stdout == "Hello, world\n\nHello, world\n\n"
    assert cut.stderr.count(MAX_TOKENS_MARK) == 2
    empty = run_cli("run", "-m", str(silent_model), stdin="Hi\n")
    assert empty.code == 0, empty.stderr
    assert empty.stdout == "\n\n"
    assert EMPTY_MARK in empty.stderr
    jsonl = run_cli(
        "run", "--jsonl", "-m", str(models.scripted), "-n", "3", stdin='{"prompt": "Hi"}\n'
    )
    assert jsonl.code == 0, jsonl.stderr
    record = json.loads(jsonl.stdout)
    assert record["reply"] == "Hello, world" and MAX_TOKENS_MARK not in jsonl.stdout
    assert record["finish"] == "length"  # a script can tell a cut reply from a whole one
    assert MAX_TOKENS_MARK in jsonl.stderr
