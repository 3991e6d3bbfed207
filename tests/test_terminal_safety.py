"""A reply is untrusted text: no control sequence in it reaches a terminal, on any output path.

The model here is scripted to answer with control characters (ESC [2J clears the screen, BEL
ends an OSC title, CR returns to the line start, a C1 OSC, BS, an RLO bidi override, DEL).
Each output path is driven for real: `ask` and batch mode with stdout on a pty or a pipe, the
REPL (markdown and --plain) in a pty, a saved conversation replayed by --resume and /load,
/prompt, --verbose-prompt, and an error line that echoes a path.
"""

from __future__ import annotations

import io
import json
import os
import pty
import select
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from conftest import WIZARDCHAT, run_cli
from gguf_models import write_model
from test_repl import Chat, clean

from wizardchat.safe_text import json_safe, terminal_safe

# ESC [ 2 J, BEL, CR, C1 OSC (U+009D) 0 ; X, BS, RLO (U+202E), !, DEL. A scripted model's
# pieces must all differ, hence one of each control.
EVIL_PIECES = (
    "▁Hi",
    "<0x1B>",
    "<0x5B>",
    "2",
    "J",
    "<0x07>",
    "<0x0D>",
    "<0xC2>",
    "<0x9D>",
    "0",
    ";",
    "X",
    "<0x08>",
    "<0xE2>",
    "<0x80>",
    "<0xAE>",
    "!",
    "<0x7F>",
)
EVIL_REPLY = "Hi\x1b[2J\x07\r\x9d0;X\x08\u202e!\x7f"
# What a terminal shows instead: each control in Python's escape notation.
SHOWN = r"Hi\x1b[2J\x07\r\x9d0;X\x08\u202e!\x7f"
# Markdown takes the CR as a line ending, as CommonMark says.
SHOWN_MARKDOWN = (r"Hi\x1b[2J\x07", r"\x9d0;X\x08\u202e!\x7f")
# Raw controls from the reply; none may reach the terminal. (BS and CR are not listed: the
# terminal's own line discipline and prompt-toolkit write those.)
RAW = ("\x1b[2J", "\x07", "\x9d", "\u202e", "\x7f")

# A saved conversation whose texts reset the terminal, set its title and clear the screen.
SAVED_USER = "what\x1bc is\x1b]0;pwned\x07 this"
SAVED_REPLY = "It\x1b[2J is\x1b]0;owned\x07 gone\x1bc"
SAVED_MODEL = "model\x1b]2;named\x07"
SAVED_SYSTEM = "Be kind.\x1b]1;icon\x07"
SAVED_RAW = ("\x1bc", "\x1b]0;", "\x1b]1;", "\x1b]2;", "\x1b[2J", "\x07")


@pytest.fixture(scope="session")
def evil_model(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A model whose every reply is EVIL_REPLY."""
    return write_model(tmp_path_factory.mktemp("evil") / "evil.gguf", script=EVIL_PIECES)


def run_on_terminal(*args: str, stdin: bytes | None = None, timeout: float = 120) -> str:
    """Run `wizardchat` with stdout and stderr on a pty; return what the terminal received.

    stdin is a pipe holding `stdin` (or /dev/null), so `run` is in batch mode and `ask` reads it.
    """
    master, slave = pty.openpty()
    proc = subprocess.Popen(
        [WIZARDCHAT, *args],
        stdin=subprocess.DEVNULL if stdin is None else subprocess.PIPE,
        stdout=slave,
        stderr=slave,
        env={**os.environ, "TERM": "xterm-256color"},
    )
    os.close(slave)
    try:
        if proc.stdin is not None:
            proc.stdin.write(stdin or b"")
            proc.stdin.close()
        received = bytearray()
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            ready, _, _ = select.select([master], [], [], 1.0)
            if not ready:
                continue
            try:
                data = os.read(master, 65536)
            except OSError:  # EIO: every writer closed the pty, the process is done
                break
            if not data:
                break
            received += data
        else:
            raise TimeoutError(f"wizardchat {' '.join(args)} still running after {timeout} s")
        assert proc.wait(timeout=30) == 0, received.decode("utf-8", "replace")
    finally:
        os.close(master)
        if proc.poll() is None:
            proc.kill()
            proc.wait(timeout=30)
    return received.decode("utf-8", errors="replace")


def assert_safe(received: str, raw: tuple[str, ...] = RAW) -> None:
    for control in raw:
        assert control not in received, f"raw {control!r} reached the terminal: {received!r}"


# --- the function --------------------------------------------------------------------------


def test_controls_are_shown_and_text_is_kept() -> None:
    assert terminal_safe(EVIL_REPLY) == SHOWN
    assert terminal_safe("\x00\x1b\x9b\u2066x\u2069") == r"\x00\x1b\x9b\u2066x\u2069"
    rtl = "\u200f\u05e9\u05dc\u05d5\u05dd"  # an RLM mark, then Hebrew
    kept = f"tabs\tand\nnewlines, é, 中文, emoji 👨\u200d👩\u200d👧, rtl {rtl}"
    assert terminal_safe(kept) is kept


def test_json_safe_keeps_the_value() -> None:
    text = json.dumps({"r": EVIL_REPLY + "\x85\u2066"}, ensure_ascii=False)
    safe = json_safe(text)
    assert json.loads(safe) == json.loads(text)
    assert_safe(safe, (*RAW, "\x85", "\u2066"))


# --- ask and batch: a terminal gets visible controls, a pipe the exact reply -------------------


def test_ask_on_a_terminal_shows_controls(evil_model: Path) -> None:
    received = run_on_terminal("ask", "Hi", "-m", str(evil_model))  # markdown, as in the chat
    assert_safe(received)
    assert all(part in received for part in SHOWN_MARKDOWN), received
    received = run_on_terminal("ask", "Hi", "-m", str(evil_model), "--plain")
    assert_safe(received)
    assert SHOWN in received


def test_ask_to_a_pipe_writes_the_exact_reply(evil_model: Path) -> None:
    result = run_cli("ask", "Hi", "-m", str(evil_model))
    assert result.code == 0, result.stderr
    assert result.stdout == EVIL_REPLY + "\n"
    result = run_cli("ask", "Hi", "-m", str(evil_model), "--json")
    assert json.loads(result.stdout)["reply"] == EVIL_REPLY
    assert "\\u001b[2J" in result.stdout  # JSON's own escaping


def test_batch_on_a_terminal_shows_controls(evil_model: Path) -> None:
    received = run_on_terminal("run", "-m", str(evil_model), stdin=b"one\ntwo\n")
    assert_safe(received)
    assert received.count(SHOWN) == 2


def test_batch_to_a_pipe_writes_the_exact_replies(evil_model: Path) -> None:
    result = run_cli("run", "-m", str(evil_model), stdin="one\ntwo\n")
    assert result.code == 0, result.stderr
    assert result.stdout == f"{EVIL_REPLY}\n\n{EVIL_REPLY}\n\n"


def test_json_escapes_the_controls_json_leaves_raw(evil_model: Path) -> None:
    # json.dumps(ensure_ascii=False) escapes C0 only; DEL, C1 and bidi controls would stay raw.
    result = run_cli("ask", "Hi", "-m", str(evil_model), "--json")
    assert_safe(result.stdout)
    assert json.loads(result.stdout)["reply"] == EVIL_REPLY
    assert "\\u009d0;X\\b\\u202e!\\u007f" in result.stdout
    result = run_cli("run", "-m", str(evil_model), "--jsonl", stdin='{"prompt": "Hi"}\n')
    assert_safe(result.stdout)
    assert json.loads(result.stdout)["reply"] == EVIL_REPLY


# --- stderr: always safe, pipe or not --------------------------------------------------------


def test_verbose_prompt_shows_past_replies_and_the_question_safely(evil_model: Path) -> None:
    question = "say\x1b]0;title\x07 it"
    result = run_cli(
        "run", "-m", str(evil_model), "--verbose-prompt", stdin=f"one\n{question}\n".encode()
    )
    assert result.code == 0, result.stderr
    assert_safe(result.stderr, (*RAW, "\x1b]0;"))
    assert f"USER: one ASSISTANT: {SHOWN}</s>" in result.stderr  # the second prompt
    assert r"USER: say\x1b]0;title\x07 it ASSISTANT:" in result.stderr


def test_verbose_prompt_on_a_terminal(evil_model: Path) -> None:
    received = run_on_terminal("ask", "a\x1b]0;t\x07b", "-m", str(evil_model), "--verbose-prompt")
    assert_safe(received, (*RAW, "\x1b]0;"))
    assert r"USER: a\x1b]0;t\x07b ASSISTANT:" in received


def test_an_error_echoing_a_path_shows_its_controls(tmp_path: Path) -> None:
    path = tmp_path / "x\x1b[2Jy\x07.gguf"
    result = run_cli("ask", "Hi", "-m", str(path))
    assert result.code != 0
    assert "wizardchat: error:" in result.stderr
    assert_safe(result.stderr)
    assert r"x\x1b[2Jy\x07.gguf" in result.stderr


def test_the_load_bar_shows_a_file_name_safely(evil_model: Path, tmp_path: Path) -> None:
    named = tmp_path / "m\x1b]0;t\x07.gguf"
    named.symlink_to(evil_model)
    received = run_on_terminal("ask", "Hi", "-m", str(named))
    assert_safe(received, (*RAW, "\x1b]0;"))
    assert r"m\x1b]0;t\x07.gguf" in received


def test_llama_log_on_stderr_shows_a_path_safely(evil_model: Path, tmp_path: Path) -> None:
    named = tmp_path / "m\x1b]0;t\x07.gguf"
    named.symlink_to(evil_model)
    result = run_cli("ask", "Hi", "-m", str(named), "--verbose")
    assert result.code == 0, result.stderr
    assert "llama_model_loader" in result.stderr  # llama.cpp's log names the file it loads
    assert_safe(result.stderr, (*RAW, "\x1b]0;"))
    assert r"m\x1b]0;t\x07.gguf" in result.stderr


def test_doctor_on_a_terminal_shows_a_path_safely(evil_model: Path, tmp_path: Path) -> None:
    named = tmp_path / "m\x1b]0;t\x07.gguf"
    named.symlink_to(evil_model)
    received = run_on_terminal("doctor", "-m", str(named))
    assert_safe(received, (*RAW, "\x1b]0;"))
    assert r"m\x1b]0;t\x07.gguf" in received


def test_bench_on_a_terminal_names_the_model_safely(evil_model: Path, tmp_path: Path) -> None:
    named = tmp_path / "m\x1b]0;t\x07.gguf"
    named.symlink_to(evil_model)
    received = run_on_terminal("bench", "-m", str(named), "-c", "512", "--reps", "1")
    assert_safe(received, (*RAW, "\x1b]0;"))
    assert r"model: m\x1b]0;t\x07.gguf" in received


# --- the REPL in a pty -----------------------------------------------------------------------


class RawChat(Chat):
    """A Chat that keeps what the terminal received raw, before escape sequences are cleaned."""

    def wait_prompt(self) -> str:
        raw = super().wait_prompt()
        self.__dict__.setdefault("raw", []).append(raw)
        return raw

    def say(self, line: str) -> str:
        """Send a line; return the raw output until the next prompt."""
        self.send(line)
        return str(self.raw[-1])


@pytest.fixture
def raw_chats() -> Iterator[type[RawChat]]:
    """RawChat processes that are always stopped after the test."""
    made: list[RawChat] = []

    class Tracked(RawChat):
        def __init__(self, *args: str, **kw: object) -> None:
            made.append(self)
            super().__init__(*args, **kw)  # type: ignore[arg-type]

    yield Tracked
    for chat in made:
        if hasattr(chat, "child"):
            chat.kill()


def test_repl_markdown_reply_shows_controls(evil_model: Path, raw_chats: type[RawChat]) -> None:
    chat = raw_chats("-m", str(evil_model))
    received = chat.say("Hi there")
    assert_safe(received)
    shown = clean(received)
    assert all(part in shown for part in SHOWN_MARKDOWN), shown
    assert chat.exit() == 0


def test_repl_plain_reply_shows_controls(evil_model: Path, raw_chats: type[RawChat]) -> None:
    chat = raw_chats("-m", str(evil_model), "--plain")
    received = chat.say("Hi there")
    assert_safe(received)
    assert SHOWN in received
    assert chat.exit() == 0


def _save_evil_session(home: Path, name: str = "evil") -> None:
    sessions = home / "data" / "sessions"
    sessions.mkdir(parents=True, exist_ok=True)
    data = {
        "version": 1,
        "name": name,
        "model": SAVED_MODEL,
        "created": 1.0,
        "updated": 2.0,
        "system": SAVED_SYSTEM,
        "turns": [{"user": SAVED_USER, "reply": SAVED_REPLY, "interrupted": False}],
    }
    (sessions / f"{name}.json").write_text(json.dumps(data), encoding="utf-8")


@pytest.mark.parametrize("plain", [False, True], ids=["markdown", "plain"])
def test_resume_replays_past_turns_safely(
    evil_model: Path, raw_chats: type[RawChat], isolated_home: Path, plain: bool
) -> None:
    _save_evil_session(isolated_home)
    chat = raw_chats("-m", str(evil_model), "--resume", *(["--plain"] if plain else []))
    received = chat.raw[0]
    assert_safe(received, SAVED_RAW)
    shown = clean(received)
    assert r"what\x1bc is\x1b]0;pwned\x07 this" in shown
    assert r"It\x1b[2J is\x1b]0;owned\x07 gone\x1bc" in shown
    assert r"(it was held with model\x1b]2;named\x07)" in shown
    received = chat.say("/prompt")
    assert_safe(received, SAVED_RAW)
    shown = clean(received)
    assert r"Be kind.\x1b]1;icon\x07" in shown
    assert r"USER: what\x1bc is\x1b]0;pwned\x07 this ASSISTANT: It\x1b[2J is" in shown
    received = chat.say("/system")
    assert_safe(received, SAVED_RAW)
    assert r"Be kind.\x1b]1;icon\x07" in clean(received)
    assert chat.exit() == 0


@pytest.mark.parametrize("plain", [False, True], ids=["markdown", "plain"])
def test_load_replays_past_turns_and_prompt_shows_replies_safely(
    evil_model: Path, raw_chats: type[RawChat], isolated_home: Path, plain: bool
) -> None:
    _save_evil_session(isolated_home)
    chat = raw_chats("-m", str(evil_model), *(["--plain"] if plain else []))
    received = chat.say("/load evil")
    assert_safe(received, SAVED_RAW)
    assert r"It\x1b[2J is\x1b]0;owned\x07 gone\x1bc" in clean(received)
    chat.say("Hi")
    received = chat.say("/prompt")
    assert_safe(received, (*RAW, *SAVED_RAW))
    shown = clean(received).replace(" \n", "\n")
    assert r"gone\x1bc</s>" in shown
    assert r"ASSISTANT: Hi\x1b[2J\x07\r\x9d0;X" in shown.replace("\n", "")
    assert chat.exit() == 0


# --- the Output classes, each method --------------------------------------------------------


def _drain(fd: int) -> bytes:
    """Everything waiting on `fd` (each write may arrive in its own read)."""
    data = bytearray()
    while select.select([fd], [], [], 0.5)[0]:
        data += os.read(fd, 65536)
    return bytes(data)


def test_plain_output_on_a_terminal_and_a_file(tmp_path: Path) -> None:
    from wizardchat.tui.output import PlainOutput

    master, slave = pty.openpty()
    try:
        with open(slave, "w", encoding="utf-8", closefd=False) as tty:
            err = io.StringIO()
            out = PlainOutput(tty, err)
            out.text("t\x1b[2J")
            out.rows([("r\x1b[2J", "c\x07")])
            out.past_turn("u\x1bc", "p\x9d")
            out.message("m\x1b[2J\nm2\x07")  # a message from $EDITOR, echoed
            out.note("n\x1b]0;x\x07")
            out.error("e\x1b[2J")
        received = _drain(master).decode()
    finally:
        os.close(master)
        os.close(slave)
    assert_safe(received + err.getvalue(), (*RAW, "\x1bc", "\x1b]0;"))
    for shown in (r"t\x1b[2J", r"r\x1b[2J", r"c\x07", r"u\x1bc", r"p\x9d"):
        assert shown in received
    assert ">>> m\\x1b[2J\r\n... m2\\x07" in received
    assert err.getvalue() == "n\\x1b]0;x\\x07\nerror: e\\x1b[2J\n"
    # A file is not a terminal: stdout keeps the exact text, stderr is still made safe.
    with (tmp_path / "out").open("w", encoding="utf-8") as f:
        out = PlainOutput(f, err)
        out.text("t\x1b[2J")
        out.message("m\x1b[2J")  # the echo goes where the prompt is: the terminal, on stderr
    assert (tmp_path / "out").read_text(encoding="utf-8") == "t\x1b[2J\n"
    assert err.getvalue().endswith(">>> m\\x1b[2J\n")


def test_rich_output_gives_rich_no_raw_control() -> None:
    from rich.console import Console

    from wizardchat.tui.output import RichOutput

    screen = io.StringIO()
    console = Console(file=screen, force_terminal=True, width=80, highlight=False)
    out = RichOutput(console, console)
    out.reply(iter(["a\x1b[2J", "b\x07c\x9d"]))
    out.note("n\x1b]0;x\x07")
    out.error("e\x1b[2J")
    out.text("t\x1bc")
    out.rows([("r\x1b[2J", "c\x07")])
    out.past_turn("u\x1bc", "p\x1b[2J")
    out.message("m\x1b[2J")
    received = screen.getvalue()
    assert_safe(received, (*RAW, "\x1bc", "\x1b]0;"))
    for shown in (r"a\x1b[2Jb\x07c\x9d", r"n\x1b]0;x\x07", r"e\x1b[2J", r"t\x1bc"):
        assert shown in received
    for shown in (r"r\x1b[2J", r"c\x07", r"u\x1bc", r"p\x1b[2J", r">>> m\x1b[2J"):
        assert shown in received
