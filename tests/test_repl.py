"""The interactive REPL, driven in a real pty with pexpect: the installed `wizardchat run`."""

from __future__ import annotations

import json
import os
import re
import signal
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pexpect
import pytest
from conftest import WIZARDCHAT, Models, run_cli
from gguf_models import SCRIPT_REPLY, write_model

# prompt-toolkit draws the prompt's trailing space as a cursor move, so the prompt is `>>>` and an
# escape sequence; a resumed conversation's echoed messages (`>>> text`) do not match.
TOOLKIT_PROMPT = r">>>(?=\x1b\[)"
PLAIN_PROMPT = r">>> $"
CURSOR_POSITION_REQUEST = r"\x1b\[6n"
UP = "\x1b[A"
ANSI = re.compile(r"\x1b\[[0-9;?]*[ -/]*[@-~]|\x1b[()][0-9A-B]|\x1b[=>]|\r")


def clean(text: str) -> str:
    """Terminal output without escape sequences and carriage returns."""
    return ANSI.sub("", text)


def seen(text: str) -> str:
    """What the output leaves on the screen: after a carriage return the text overwrites the
    line from its start, so a progress line that was cleared leaves only blanks (stripped)."""
    lines = []
    for line in ANSI.sub(lambda m: m.group() if m.group() == "\r" else "", text).split("\n"):
        screen: list[str] = []
        for part in line.split("\r"):
            screen[: len(part)] = part
        lines.append("".join(screen).rstrip())
    return "\n".join(lines)


class Chat:
    """A `wizardchat run` in a pty (80x30), with helpers that wait for what a user would see."""

    def __init__(
        self,
        *args: str,
        term: str = "xterm-256color",
        env: dict[str, str] | None = None,
        cwd: Path | None = None,
    ):
        environ = {**os.environ, "TERM": term}
        environ.pop("NO_COLOR", None)
        environ.update(env or {})
        self.prompt = PLAIN_PROMPT if term == "dumb" else TOOLKIT_PROMPT
        self.child = pexpect.spawn(
            WIZARDCHAT,
            ["run", *args],
            env=environ,
            encoding="utf-8",
            dimensions=(30, 80),
            timeout=30,
            cwd=str(cwd) if cwd else None,
        )
        self.banner = clean(self.expect("/help for commands"))  # the plan and the banner
        self.intro = clean(self.wait_prompt())  # what is shown before the first prompt

    def expect(self, pattern: str) -> str:
        """Wait for a regex, answering prompt-toolkit's cursor position requests on the way
        (as a terminal does; without answers it cannot tell the screen's height and hides the
        toolbar). Returns the output before the match."""
        seen = []
        while self.child.expect([pattern, CURSOR_POSITION_REQUEST]) == 1:
            seen.append(str(self.child.before))
            self.child.send("\x1b[1;1R")
        return "".join(seen) + str(self.child.before)

    def wait_prompt(self) -> str:
        """Wait for the input prompt; return what was printed before it."""
        return self.expect(self.prompt)

    def send(self, line: str) -> str:
        """Type a line and press Enter; return the output until the next prompt, cleaned."""
        self.child.send(line + "\r")
        self.expect(re.escape(line[-10:]))  # the echo, so the output below is the answer
        return clean(self.wait_prompt())

    def exit(self) -> int:
        """Ctrl-D, and the exit status."""
        self.child.sendcontrol("d")
        self.child.expect(pexpect.EOF)
        self.child.close()
        return int(self.child.exitstatus if self.child.exitstatus is not None else -1)

    def kill(self) -> None:
        if self.child.isalive():
            self.child.kill(signal.SIGKILL)
        self.child.close(force=True)


@pytest.fixture
def chats() -> Iterator[type[Chat]]:
    """Chat processes that are always stopped after the test."""
    made: list[Chat] = []

    class Tracked(Chat):
        def __init__(self, *args: str, **kw: object) -> None:
            super().__init__(*args, **kw)  # type: ignore[arg-type]
            made.append(self)

    yield Tracked
    for chat in made:
        chat.kill()


def test_a_message_gets_a_streamed_reply_and_a_stats_line(
    models: Models, chats: type[Chat]
) -> None:
    chat = chats("-m", str(models.scripted))
    out = chat.send("Hi there")
    assert SCRIPT_REPLY in out
    assert re.search(r"9 tokens · [\d.]+ tok/s · first token [\d.]+ s", out), out
    assert chat.exit() == 0


def test_a_reply_cut_by_max_tokens_is_marked(models: Models, chats: type[Chat]) -> None:
    chat = chats("-m", str(models.scripted), "-n", "3")
    out = chat.send("Hi there")
    assert "Hello, world" in out and "[max tokens reached]" in out, out
    assert re.search(r"3 tokens · [\d.]+ tok/s · first token [\d.]+ s", out), out
    chat.send("/set max_tokens -1")
    out = chat.send("Hi again")
    assert SCRIPT_REPLY in out and "[max tokens reached]" not in out and "[empty reply]" not in out
    assert chat.exit() == 0


def test_an_empty_reply_says_so(chats: type[Chat], tmp_path: Path) -> None:
    silent = write_model(tmp_path / "silent.gguf", script=("</s>",))  # EOS at once
    chat = chats("-m", str(silent))
    out = chat.send("Hi there")
    assert "[empty reply]" in out, out
    assert re.search(r"0 tokens · end of turn after [\d.]+ s", out), out
    assert "tok/s" not in out  # no speed for no tokens
    assert chat.exit() == 0


def test_toolbar_shows_model_and_context_use(models: Models, chats: type[Chat]) -> None:
    chat = chats("-m", str(models.scripted), "-c", "2048")
    chat.send("Hi")
    chat.expect(r"scripted\.gguf · (\d+)/2048 tokens")
    assert int(chat.child.match.group(1)) > 40  # system prompt + one exchange
    assert chat.exit() == 0


def test_commands(models: Models, chats: type[Chat], tmp_path: Path) -> None:
    chat = chats("-m", str(models.scripted), "--no-stats", cwd=tmp_path)
    out = chat.send("first question")
    assert SCRIPT_REPLY in out and "tok/s" not in out  # --no-stats

    out = chat.send("/stats")
    assert re.search(r"prompt tokens\s+\d+ \(\d+ evaluated\)", out), out
    assert re.search(r"generated tokens\s+9\b", out), out
    assert re.search(r"generation speed\s+[\d.]+ tok/s", out), out
    assert "time to first token" in out

    out = chat.send("/prompt")
    assert "A chat between a curious user" in out
    assert f"USER: first question ASSISTANT: {SCRIPT_REPLY}</s>" in out

    assert "temperature = 0.0" in chat.send("/set temperature 0")
    assert "seed = 7" in chat.send("/set seed 7")
    assert "max_tokens = 50" in chat.send("/set max-tokens 50")
    shown = chat.send("/set")
    assert re.search(r"temperature\s+0\.0", shown)
    assert re.search(r"seed\s+7 ", shown) and re.search(r"max_tokens\s+50 ", shown), shown
    out = chat.send("/set temperature hot")
    assert "'hot' is not a number" in out
    out = chat.send("/set top_p 7")
    assert "out of range" in out

    chat.send("second question")
    out = chat.send("/regen")
    assert SCRIPT_REPLY in out
    out = chat.send("/prompt")
    assert out.count("USER: second question") == 1  # replaced, not added

    assert "removed the last exchange ('second question')" in chat.send("/undo")
    assert "second question" not in chat.send("/prompt")

    notes = tmp_path / "notes.txt"
    notes.write_text("alpha beta gamma\n", encoding="utf-8")
    assert SCRIPT_REPLY in chat.send("/read notes.txt")  # relative: long lines would wrap
    assert "--- File: notes.txt ---\nalpha beta gamma" in chat.send("/prompt").replace(" \n", "\n")
    assert "cannot read" in chat.send("/read missing.txt")

    out = chat.send("/system You answer in haiku.")
    assert "new conversation" in out
    assert "You answer in haiku." in chat.send("/system")
    out = chat.send("/prompt")
    assert out.strip().splitlines()[1] == "You answer in haiku."
    assert "first question" not in out

    out = chat.send("/stast")
    assert "unknown command /stast; did you mean /stats?" in out
    assert "/regen" in chat.send("/help")
    assert chat.exit() == 0


def test_save_and_load_in_a_new_process(
    models: Models, chats: type[Chat], isolated_home: Path
) -> None:
    sessions = isolated_home / "data" / "sessions"
    first = chats("-m", str(models.scripted))
    first.send("remember the number seven")
    names = [p.name for p in sessions.glob("*.json")]
    assert len(names) == 1 and names[0].startswith("chat-")  # autosaved
    assert "saved as 'seven'" in first.send("/save seven")
    assert [p.name for p in sessions.glob("*.json")] == ["seven.json"]  # renamed, not copied
    assert first.exit() == 0

    second = chats("-m", str(models.scripted))
    out = second.send("/load seven")
    assert "continuing 'seven': 1 turn" in out
    assert "remember the number seven" in out
    second.send("what was it?")
    out = second.send("/prompt")
    assert "USER: remember the number seven ASSISTANT:" in out
    assert "USER: what was it? ASSISTANT:" in out
    assert "no session named 'nope'" in second.send("/load nope")
    assert re.search(r"seven\s+2\s", second.send("/sessions"))
    assert second.exit() == 0
    listing = run_cli("sessions")
    assert re.search(r"^seven\s+2\s", listing.stdout, re.M), listing.stdout


def test_ctrl_c_stops_a_long_reply_and_the_next_message_works(
    models: Models, chats: type[Chat]
) -> None:
    chat = chats("-m", str(models.slow), "-n", "100000", "-c", "8192", "--seed", "3")
    chat.child.send("tell me everything\r")
    chat.expect("everything")
    chat.expect(r"[^\s\x1b]{20}")  # the reply is streaming
    chat.child.sendcontrol("c")
    out = clean(chat.wait_prompt())
    assert "[interrupted]" in out
    assert "Traceback" not in out
    stats = re.search(r"(\d+) tokens · ", out)
    assert stats and 0 < int(stats.group(1)) < 7000  # stopped early, not at the context's end
    chat.send("/set max_tokens 5")
    out = chat.send("and now?")
    assert "5 tokens · " in out
    assert "[interrupted]" not in out
    assert chat.exit() == 0


def test_keys_typed_during_a_reply_wait_for_the_prompt(models: Models, chats: type[Chat]) -> None:
    chat = chats("-m", str(models.slow), "-n", "100000", "-c", "8192", "--seed", "3")
    chat.child.send("go on\r")
    chat.expect("go on")
    chat.expect(r"[^\s\x1b]{20}")  # the reply is streaming
    chat.child.send("/prompt\r")  # typed ahead, Enter included
    chat.child.sendcontrol("c")
    during = chat.expect(re.escape("[interrupted]"))
    assert "/prompt" not in during and "^C" not in during  # no echo into the reply
    out = clean(chat.expect(r"--- end of prompt ---"))
    assert "USER: go on ASSISTANT:" in out  # /prompt ran: the Enter sent it
    chat.wait_prompt()
    assert chat.exit() == 0


def test_ctrl_c_stops_a_long_prompt_evaluation(
    models: Models, chats: type[Chat], tmp_path: Path
) -> None:
    big = tmp_path / "big.txt"
    big.write_text("word " * 3400, encoding="utf-8")  # ~6800 tokens: about a second to evaluate
    chat = chats("-m", str(models.slow), "-c", "8192", "-n", "5", cwd=tmp_path)
    chat.child.send("/read big.txt\r")  # relative: a long path would wrap the echoed line
    chat.expect("big.txt")
    time.sleep(0.2)
    chat.child.sendcontrol("c")
    out = clean(chat.wait_prompt())
    assert "interrupted before the reply began: the model will not see" in out, out
    # The stats line says what happened, not "0 tokens · 0.0 tok/s".
    assert re.search(
        r"interrupted before the first token · [\d.]+ s into a [\d,]+-token prompt", out
    )
    assert "0.0 tok/s" not in out
    assert "Traceback" not in out and "Exception ignored" not in out
    assert "5 tokens · " in chat.send("and now a short one")
    # The aborted file is not part of the conversation: it is not evaluated again.
    evaluated = re.search(r"\((\d+) evaluated\)", chat.send("/stats"))
    assert evaluated and int(evaluated.group(1)) < 200, evaluated
    assert "big.txt" not in chat.send("/prompt")
    assert chat.exit() == 0
    # The transcript keeps what the user sent, marked interrupted.
    (saved,) = (tmp_path / "home" / "data" / "sessions").glob("*.json")
    turns = json.loads(saved.read_text(encoding="utf-8"))["turns"]
    assert turns[0]["user"].startswith("--- File: big.txt ---") and turns[0]["interrupted"]
    assert turns[1]["user"] == "and now a short one"


def test_ctrl_c_at_the_prompt_clears_the_line_and_twice_exits(
    models: Models, chats: type[Chat]
) -> None:
    chat = chats("-m", str(models.scripted))
    chat.child.send("half a thought")
    chat.child.sendcontrol("c")
    out = chat.send("/prompt")  # the cleared text must not be part of this line
    assert "unknown command" not in out and "--- prompt:" in out
    chat.child.sendcontrol("c")
    chat.expect("Ctrl-C again or Ctrl-D to exit")
    chat.wait_prompt()  # as a user sees it: the prompt is back
    # Clearing text is not the second Ctrl-C: only Ctrl-C on an empty line counts, and the
    # count starts again.
    chat.child.send("second thought")
    chat.expect("thought")
    chat.child.sendcontrol("c")
    chat.child.sendcontrol("c")
    chat.expect("Ctrl-C again or Ctrl-D to exit")
    chat.wait_prompt()
    chat.child.sendcontrol("c")
    chat.child.expect(pexpect.EOF)
    chat.child.close()
    assert chat.child.exitstatus == 0
    assert "Traceback" not in clean(str(chat.child.before))


def test_multi_line_input(models: Models, chats: type[Chat]) -> None:
    chat = chats("-m", str(models.scripted), "--no-stats")
    chat.child.send('"""\rline one\rline two\r"""\r')
    chat.expect(re.escape(SCRIPT_REPLY))
    chat.wait_prompt()
    chat.child.send("and\x1b\rmore\r")  # Alt-Enter inserts a newline
    chat.expect(re.escape(SCRIPT_REPLY))
    chat.wait_prompt()
    chat.child.send("\x1b[200~pasted one\npasted two\x1b[201~\r")  # bracketed paste
    chat.expect(re.escape(SCRIPT_REPLY))
    chat.wait_prompt()
    out = chat.send("/prompt")
    assert "USER: line one\nline two ASSISTANT:" in out
    assert "USER: and\nmore ASSISTANT:" in out
    assert "USER: pasted one\npasted two ASSISTANT:" in out
    assert out.count(" ASSISTANT:") == 3  # three messages, not six
    assert chat.exit() == 0


def test_edit_composes_in_editor(models: Models, chats: type[Chat], tmp_path: Path) -> None:
    editor = tmp_path / "editor.sh"
    editor.write_text('#!/bin/sh\nprintf "written in the editor\\nover two lines\\n" > "$1"\n')
    editor.chmod(0o755)
    chat = chats("-m", str(models.scripted), env={"EDITOR": str(editor), "VISUAL": ""})
    out = chat.send("/edit")
    # The sent message is in the scrollback, as a typed one would be, before the reply.
    echo = ">>> written in the editor\n... over two lines\n"
    assert echo in out and out.index(echo) < out.index(SCRIPT_REPLY), out
    assert "USER: written in the editor\nover two lines ASSISTANT:" in chat.send("/prompt")
    chat.child.sendcontrol("g")  # Ctrl-G: the editor's text comes back to the line, unsent
    chat.expect("over two lines")
    chat.child.send("!\r")
    chat.wait_prompt()
    assert "USER: written in the editor\nover two lines! ASSISTANT:" in chat.send("/prompt")
    assert chat.exit() == 0


def test_messages_composed_in_the_editor_stay_on_screen(models: Models, tmp_path: Path) -> None:
    """The screen as a terminal shows it (pyte, with true cursor positions): a message sent with
    /edit or with Ctrl-G then Enter is in the scrollback above its reply, as a typed one is."""
    import pyte

    editor = tmp_path / "editor.sh"
    editor.write_text('#!/bin/sh\nprintf "from the editor\\nline two\\n" > "$1"\n')
    editor.chmod(0o755)
    screen = pyte.Screen(80, 40)
    terminal = pyte.Stream(screen)
    child = pexpect.spawn(
        WIZARDCHAT,
        ["run", "-m", str(models.scripted), "--no-stats"],
        env={**os.environ, "TERM": "xterm-256color", "EDITOR": str(editor), "VISUAL": ""},
        encoding="utf-8",
        dimensions=(40, 80),
        timeout=30,
    )

    def until(text: str, times: int = 1) -> list[str]:
        """Feed the terminal until `text` is on the screen `times` times; return its lines."""
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:
            lines = [line.rstrip() for line in screen.display]
            if "\n".join(lines).count(text) >= times:
                return lines
            try:
                data = child.read_nonblocking(65536, timeout=0.2)
            except pexpect.TIMEOUT:
                continue
            terminal.feed(data)
            for _ in range(data.count("\x1b[6n")):  # where the cursor is, as a terminal answers
                child.send(f"\x1b[{screen.cursor.y + 1};{screen.cursor.x + 1}R")
        raise AssertionError(f"{text!r} never appeared:\n" + "\n".join(screen.display))

    try:
        until("/help for commands")
        until(">>>")
        child.send("/edit\r")
        until(SCRIPT_REPLY)
        child.sendcontrol("g")
        until("line two", times=2)  # the first is /edit's message: wait for the editor's text
        child.send("!\r")
        until(SCRIPT_REPLY + "\n\n>>> from the editor\n... line two!\n" + SCRIPT_REPLY)
        lines = until(">>> from the editor\n... line two!\n" + SCRIPT_REPLY + "\n\n>>>")
        shown = "\n".join(lines)
        assert ">>> /edit\n>>> from the editor\n... line two\n" + SCRIPT_REPLY in shown, shown
    finally:
        child.close(force=True)


def test_tab_completes_commands_and_paths(
    models: Models, chats: type[Chat], tmp_path: Path
) -> None:
    (tmp_path / "quarterly-report.txt").write_text("numbers\n", encoding="utf-8")
    chat = chats("-m", str(models.scripted), cwd=tmp_path)
    chat.child.send("/sta\t")
    chat.expect("ts")  # completed to /stats
    chat.child.send("\r")
    chat.expect("no reply yet")  # /stats ran
    chat.wait_prompt()
    chat.child.send("/read quar\t")
    chat.expect("terly-report.txt")
    chat.child.send("\r")
    chat.wait_prompt()
    assert "--- File: quarterly-report.txt ---" in chat.send("/prompt")
    assert chat.exit() == 0


def test_input_history_survives_a_restart(models: Models, chats: type[Chat]) -> None:
    first = chats("-m", str(models.scripted))
    first.send("a message worth repeating")
    assert first.exit() == 0
    second = chats("-m", str(models.scripted))
    second.child.send(UP)
    second.expect("a message worth repeating")
    second.child.send("\r")
    second.wait_prompt()
    assert "USER: a message worth repeating" in second.send("/prompt")
    assert second.exit() == 0


def test_killed_after_a_reply_then_resume_shows_that_turn(
    models: Models, chats: type[Chat], isolated_home: Path
) -> None:
    first = chats("-m", str(models.scripted))
    first.send("do not lose this")
    first.kill()  # SIGKILL: no exit handlers, nothing flushed at exit
    saved = list((isolated_home / "data" / "sessions").glob("*.json"))
    assert len(saved) == 1
    second = chats("-m", str(models.scripted), "--resume")
    out = second.intro
    assert "continuing" in out and "do not lose this" in out and SCRIPT_REPLY in out
    second.send("and more")
    # The restored history is evaluated once on the first new turn, then reused.
    first_turn = re.search(r"\((\d+) evaluated\)", second.send("/stats"))
    second.send("and again")
    next_turn = re.search(r"prompt tokens\s+(\d+) \((\d+) evaluated\)", second.send("/stats"))
    assert first_turn and next_turn
    assert int(first_turn.group(1)) > 50
    assert int(next_turn.group(2)) < 15 < int(next_turn.group(1))
    assert second.exit() == 0
    data = json.loads(saved[0].read_text(encoding="utf-8"))
    assert [t["user"] for t in data["turns"]] == ["do not lose this", "and more", "and again"]


def test_corrupt_session_is_reported_and_left_untouched(
    models: Models, chats: type[Chat], isolated_home: Path
) -> None:
    sessions = isolated_home / "data" / "sessions"
    sessions.mkdir(parents=True)
    broken = sessions / "broken.json"
    broken.write_text('{"version": 1, "turns": [', encoding="utf-8")
    child = pexpect.spawn(
        WIZARDCHAT, ["run", "-m", str(models.scripted), "--session", "broken"], encoding="utf-8"
    )
    child.expect(pexpect.EOF, timeout=30)
    child.close()
    message = clean(str(child.before)).strip()
    assert child.exitstatus == 7
    assert message.count("\n") == 0 and "session 'broken' is corrupt" in message, message
    chat = chats("-m", str(models.scripted))
    assert "is corrupt" in chat.send("/load broken")
    chat.send("hello")
    assert chat.exit() == 0
    assert broken.read_text(encoding="utf-8") == '{"version": 1, "turns": ['


def test_dumb_terminal_gets_plain_line_input(models: Models, chats: type[Chat]) -> None:
    chat = chats("-m", str(models.scripted), term="dumb")
    chat.child.send("plain please\r")
    chat.expect(re.escape(SCRIPT_REPLY))
    raw = chat.wait_prompt()
    assert "\x1b" not in raw  # no escape codes at all
    assert chat.exit() == 0


def test_sessions_command_lists_and_removes(models: Models, chats: type[Chat]) -> None:
    chat = chats("-m", str(models.scripted), "--session", "alpha")
    chat.send("one")
    chat.send("two")
    assert chat.exit() == 0
    listing = run_cli("sessions")
    assert listing.code == 0
    # the KV STATE column: the state Ctrl-D saved
    assert re.search(r"^alpha\s+2\s+\d{4}-\d\d-\d\d \d\d:\d\d\s+\d+\.\d kB$", listing.stdout, re.M)
    assert run_cli("sessions", "rm", "alpha").code == 0
    missing = run_cli("sessions", "rm", "alpha")
    assert missing.code == 7 and "no session named 'alpha'" in missing.stderr
    assert run_cli("run", "-m", "x", "--session", "../etc").code == 7


@pytest.mark.parametrize("how", ["--plain", "NO_COLOR"])
def test_plain_replies_have_no_escape_codes(models: Models, chats: type[Chat], how: str) -> None:
    args = ["-m", str(models.scripted), *(["--plain"] if how == "--plain" else [])]
    chat = chats(*args, env={"NO_COLOR": "1"} if how == "NO_COLOR" else None)
    chat.child.send("Hi there\r")
    chat.expect("there")
    raw = chat.wait_prompt()
    # From the reply to the end of the stats line: the text alone, no styling or padding.
    start = raw.index(SCRIPT_REPLY)
    end = raw.index("\n", raw.index("tok/s"))
    assert re.fullmatch(rf"{re.escape(SCRIPT_REPLY)}\r\n9 tokens · [^\x1b]*\r", raw[start:end])
    assert chat.exit() == 0


def test_output_to_a_file_is_the_replies_alone(models: Models, tmp_path: Path) -> None:
    transcript = tmp_path / "out.txt"
    child = pexpect.spawn(
        "/bin/sh",
        ["-c", f'"{WIZARDCHAT}" run -m "{models.scripted}" > "{transcript}"'],
        encoding="utf-8",
        timeout=30,
    )
    child.expect_exact("/help for commands")
    child.expect_exact(">>> ")  # the prompt goes to stderr, which is still the terminal
    child.send("Hi\r")
    child.expect(r"tok/s.*\r\n")
    child.expect_exact(">>> ")
    child.sendcontrol("d")
    child.expect(pexpect.EOF)
    child.close()
    assert child.exitstatus == 0
    assert transcript.read_text(encoding="utf-8") == f"{SCRIPT_REPLY}\n\n"


def test_output_to_a_file_leaves_marks_and_messages_on_their_own_lines(
    models: Models, tmp_path: Path
) -> None:
    """With stdout in a file, the prompt, notes and echoes share the terminal (stderr): each
    starts on its own line, whatever ended the line before (Enter, Ctrl-C, Ctrl-D)."""
    transcript = tmp_path / "out.txt"
    editor = tmp_path / "editor.sh"
    editor.write_text('#!/bin/sh\nprintf "from the editor\\n" > "$1"\n')
    editor.chmod(0o755)
    child = pexpect.spawn(
        "/bin/sh",
        # exec: no shell that dies of the Ctrl-C below when wizardchat ends
        ["-c", f'exec "{WIZARDCHAT}" run -m "{models.scripted}" -n 3 > "{transcript}"'],
        env={**os.environ, "EDITOR": str(editor), "VISUAL": ""},
        encoding="utf-8",
        timeout=30,
    )
    try:
        child.expect_exact("/help for commands")
        child.expect_exact(">>> ")
        child.send("Hi\r")
        child.expect_exact(">>> ")
        out = seen(str(child.before))  # (a slow machine shows the prompt's progress, cleared)
        assert "[max tokens reached]\n3 tokens · " in out, out  # on the terminal, not in the file
        child.send("/edit\r")
        child.expect_exact("/edit")
        child.expect_exact(">>> ")  # the message, echoed on the terminal on its own line
        assert clean(str(child.before)) == "\n", repr(child.before)
        child.expect_exact("from the editor\r\n[max tokens reached]")
        child.expect_exact(">>> ")
        child.send("half a thought")
        child.sendcontrol("c")  # the terminal echoes ^C and drops the line
        child.expect_exact("(Ctrl-C again or Ctrl-D to exit)")
        assert clean(str(child.before)).endswith("^C\n"), repr(child.before)
        child.expect_exact(">>> ")
        child.send("partial")
        child.sendcontrol("d")
        child.sendcontrol("d")  # as in `cat`, the second Ctrl-D sends the text, no newline
        child.expect_exact(">>> ")
        assert seen(str(child.before)).startswith("partial\n[max tokens reached]"), repr(
            child.before
        )
        child.sendcontrol("d")
        child.expect(pexpect.EOF)
        goodbye = clean(str(child.before))
        assert goodbye.startswith("\nsaved as '"), repr(child.before)
        assert child.wait() == 0  # the model's memory is freed after the terminal's last line
        assert transcript.read_text(encoding="utf-8") == "Hello, world\n\n" * 3
    finally:
        child.close(force=True)


def test_sigterm_at_a_plain_prompt_leaves_the_terminal_on_a_new_line(
    models: Models, tmp_path: Path
) -> None:
    child = pexpect.spawn(
        "/bin/sh",
        ["-c", f'exec "{WIZARDCHAT}" run -m "{models.scripted}" > "{tmp_path / "out.txt"}"'],
        encoding="utf-8",
        timeout=30,
    )
    try:
        child.expect_exact("/help for commands")
        child.expect_exact(">>> ")
        child.send("half a thought")
        child.expect_exact("thought")
        child.kill(signal.SIGTERM)
        child.expect(pexpect.EOF)
        assert clean(str(child.before)) == "\n", repr(child.before)  # the shell's prompt is next
        assert child.wait() == 143
    finally:
        child.close(force=True)


def test_a_programming_error_in_the_line_editor_setup_is_not_hidden(tmp_path: Path) -> None:
    # make_reader falls back to plain lines on a terminal prompt-toolkit cannot drive (an
    # OSError); a bug (here a TypeError from a bad argument) must surface, not read as that.
    code = (
        "from pathlib import Path\n"
        "from wizardchat.tui.reader import make_reader\n"
        f"make_reader(Path({str(tmp_path / 'history')!r}), None, {{}}, list, [])\n"
        "print('fell back')\n"
    )
    child = pexpect.spawn(
        sys.executable, ["-c", code], env={**os.environ, "TERM": "xterm"}, encoding="utf-8"
    )
    child.expect(pexpect.EOF, timeout=30)
    child.close()
    out = str(child.before)
    assert "fell back" not in out
    assert "TypeError" in out and child.exitstatus == 1


def test_keyboard_echo_off_leaves_a_stream_that_is_no_terminal_alone(tmp_path: Path) -> None:
    from wizardchat.tui.repl import keyboard_echo_off

    with (tmp_path / "input").open("w+") as not_a_terminal, keyboard_echo_off(not_a_terminal):
        pass


def test_an_editor_variable_that_does_not_parse_is_one_clear_error(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    from wizardchat.errors import WizardchatError
    from wizardchat.tui.editor import editor_command

    monkeypatch.setenv("VISUAL", "")
    monkeypatch.setenv("EDITOR", 'code "--wait')  # an unclosed quote: shlex cannot split it
    with pytest.raises(WizardchatError, match=r"cannot use \$EDITOR .*closing quotation"):
        editor_command()


def test_commands_need_only_the_chat_context() -> None:
    """Slash commands run on anything that implements commands.ChatContext, not only a Repl."""
    from typing import Any

    from wizardchat.chat.conversation import Conversation
    from wizardchat.chat.reply import TurnResult
    from wizardchat.tui import commands

    class Out:
        def __init__(self) -> None:
            self.lines: list[str] = []

        def text(self, text: str) -> None:
            self.lines.append(text)

        note = text

        def rows(self, rows: Any, header: bool = False) -> None:
            self.lines += ["  ".join(row) for row in rows]

    class Context:
        name = "notes"
        out = Out()
        conversation = Conversation(
            system="Be brief.", tokenize=lambda s: [7] * len(s.split()), bos=1, eos=2, n_ctx=64
        )
        last_result: TurnResult | None = None

        def __init__(self) -> None:
            self.settings: dict[str, Any] = dict.fromkeys(commands.PARAMS, 0)

        def setting(self, name: str) -> Any:
            return self.settings[name]

        def change_setting(self, name: str, value: Any) -> None:
            self.settings[name] = value

        def describe(self) -> list[tuple[str, str]]:
            return [("model", "tiny")]

    ctx = Context()
    for line in ("set top_k 5", "set", "show", "prompt", "system"):
        name, _, arg = line.partition(" ")
        commands.find(name).handler(ctx, arg)  # type: ignore[arg-type]
    assert ctx.settings["top_k"] == 5
    shown = "\n".join(ctx.out.lines)
    assert "top_k = 5" in shown and "model  tiny" in shown and "Be brief." in shown
    assert "session  notes (0 turns, 0 in the model's context, 3 tokens)" in shown
    with pytest.raises(commands.CommandError, match="no reply yet"):
        commands.find("stats").handler(ctx, "")  # type: ignore[arg-type]
    ctx.last_result = TurnResult(reply="ok", completion_tokens=1, finish="eos")
    commands.find("stats").handler(ctx, "")  # type: ignore[arg-type]
    assert "finish  eos" in "\n".join(ctx.out.lines)


def test_the_kv_state_is_saved_at_exit_and_restored_by_resume_load_and_kept_through_save_as(
    models: Models, chats: type[Chat], isolated_home: Path
) -> None:
    kv = isolated_home / "data" / "kv"
    common = ("-m", str(models.random), "--temp", "0", "-n", "8")
    first = chats(*common, "--session", "k")
    first.send("hello there")
    first.send("tell me more")
    assert not (kv / "k.kv.json").exists()  # a short chat: no write after a reply
    assert first.exit() == 0
    assert (kv / "k.kv.json").is_file()  # Ctrl-D saved it

    second = chats(*common, "--resume")
    assert re.search(r"restored [\d,]+ tokens in \d+\.\d s", second.intro), second.intro
    out = second.send("and then?")
    assert re.search(r"\b\d+ tokens · ", out)
    second.send("/clear")  # leaving 'k' saves its state with the new turn
    second.send("a second conversation")
    assert "saved as 'other'" in second.send("/save other")  # the automatic name's state moves
    assert (kv / "other.kv.json").is_file()
    assert not list(kv.glob("chat-*"))
    out = second.send("/load k")
    assert re.search(r"restored [\d,]+ tokens in \d+\.\d s", out), out
    assert "more to evaluate" not in out  # the state held every turn of 'k'
    assert second.exit() == 0
    listing = run_cli("sessions").stdout
    assert re.search(r"^k\s+3\s.*\d kB$", listing, re.M), listing
    assert re.search(r"^other\s+1\s.*\d kB$", listing, re.M), listing
