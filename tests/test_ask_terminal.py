"""`wizardchat ask` on a terminal, in a real pty: rendered as the REPL renders; raw when piped."""

from __future__ import annotations

import os
import shlex
from pathlib import Path

import pexpect
import pyte
import pytest
from conftest import WIZARDCHAT, run_cli
from gguf_models import write_model

# A reply that starts with blank lines and is wider than the 12-column terminal below.
WIDE_PIECES = ("<0x0A>", "Hello", ",", "▁world", "!", "▁I", "▁am", "▁WizardLM")
WIDE_REPLY = "\nHello, world! I am WizardLM"
COLUMNS = 12


@pytest.fixture(scope="module")
def wide_model(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return write_model(tmp_path_factory.mktemp("wide") / "wide.gguf", script=WIDE_PIECES)


def ask_in_pty(model: Path, *flags: str, stderr_to: Path) -> tuple[str, int]:
    """`wizardchat ask` with stdout on a 12-column terminal (stderr to a file); the raw output
    and the exit status."""
    command = shlex.join([WIZARDCHAT, "ask", "Hi", "-m", str(model), *flags])
    env = {**os.environ, "TERM": "xterm-256color"}
    env.pop("NO_COLOR", None)
    child = pexpect.spawn(
        "/bin/sh",
        ["-c", f"{command} 2>{shlex.quote(str(stderr_to))}"],
        env=env,
        encoding="utf-8",
        dimensions=(24, COLUMNS),
        timeout=60,
    )
    child.expect(pexpect.EOF)
    child.close()
    return str(child.before), int(child.exitstatus if child.exitstatus is not None else -1)


def screen_rows(raw: str) -> list[str]:
    """The terminal's rows after `raw`, trailing blank rows dropped."""
    screen = pyte.Screen(COLUMNS, 24)
    pyte.Stream(screen).feed(raw)
    rows = [line.rstrip() for line in screen.display]
    while rows and not rows[-1]:
        rows.pop()
    return rows


def test_ask_on_a_terminal_wraps_words_and_drops_leading_blank_lines(
    wide_model: Path, tmp_path: Path
) -> None:
    raw, status = ask_in_pty(wide_model, stderr_to=tmp_path / "err")
    assert status == 0
    assert screen_rows(raw) == ["Hello,", "world! I am", "WizardLM"]


def test_ask_plain_on_a_terminal_is_the_raw_text(wide_model: Path, tmp_path: Path) -> None:
    raw, status = ask_in_pty(wide_model, "--plain", stderr_to=tmp_path / "err")
    assert status == 0
    assert "\x1b" not in raw
    assert raw == WIDE_REPLY.replace("\n", "\r\n") + "\r\n"  # the tty turns \n into \r\n


def test_ask_into_a_pipe_stays_the_raw_reply(wide_model: Path) -> None:
    r = run_cli("ask", "Hi", "-m", str(wide_model))
    assert r.code == 0
    assert r.stdout == WIDE_REPLY + "\n"


# --- the prompt's evaluation shows on stderr -----------------------------------------------------

LONG_PROMPT = "word " * 1200  # 2,400 tokens: a second or more to evaluate (slow_prompt_model)
PROGRESS = r"evaluating 2,\d{3} tokens… \d{1,2}%"  # a percentage: after a batch of 256


def test_ask_shows_the_prompt_progress_on_a_terminal_then_erases_it(
    slow_prompt_model: Path,
) -> None:
    env = {**os.environ, "TERM": "xterm-256color"}
    env.pop("NO_COLOR", None)
    child = pexpect.spawn(
        WIZARDCHAT,
        ["ask", LONG_PROMPT, "-m", str(slow_prompt_model), "-c", "4096", "-b", "256", "-n", "5"],
        env=env,
        encoding="utf-8",
        dimensions=(24, 80),
        timeout=300,  # a loaded machine
    )
    child.expect(PROGRESS)
    before = str(child.before) + str(child.after)
    child.expect(pexpect.EOF)
    child.close()
    assert child.exitstatus == 0
    raw = before + str(child.before)
    screen = pyte.Screen(80, 24)
    pyte.Stream(screen).feed(raw)
    shown = "\n".join(screen.display)
    assert "evaluating" not in shown and "tokens…" not in shown  # erased before the reply
    assert shown.strip()  # the reply


def test_ask_shows_no_progress_when_stderr_is_not_a_terminal(slow_prompt_model: Path) -> None:
    flags = ("-m", str(slow_prompt_model), "-c", "4096", "-b", "256", "-n", "1")
    r = run_cli("ask", LONG_PROMPT, *flags, timeout=300)
    assert r.code == 0
    assert r.stderr == "[max tokens reached]\n"  # -n 1's mark, and no progress line


def test_batch_mode_shows_the_prompt_progress_on_a_terminal_then_erases_it(
    slow_prompt_model: Path, tmp_path: Path
) -> None:
    """`run` with piped lines and stderr on a terminal: the same line, erased the same way."""
    (tmp_path / "lines.txt").write_text(LONG_PROMPT + "\n", encoding="utf-8")
    flags = ["-m", str(slow_prompt_model), "-c", "4096", "-b", "256", "-n", "5"]
    command = shlex.join([WIZARDCHAT, "run", *flags]) + " < lines.txt"
    env = {**os.environ, "TERM": "xterm-256color"}
    child = pexpect.spawn(
        "/bin/sh", ["-c", command], env=env, encoding="utf-8", dimensions=(24, 80),
        timeout=300, cwd=str(tmp_path),
    )  # fmt: skip
    child.expect(PROGRESS)
    raw = str(child.before) + str(child.after)
    child.expect(pexpect.EOF)
    child.close()
    assert child.exitstatus == 0
    screen = pyte.Screen(80, 24)
    pyte.Stream(screen).feed(raw + str(child.before))
    shown = "\n".join(screen.display)
    assert "evaluating" not in shown and shown.strip()
