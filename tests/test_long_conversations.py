"""Long conversations end to end: the context filling up, every context size, sessions in batch
mode, and SIGTERM/SIGHUP mid-reply. The transcript on disk keeps every turn, always."""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import time
from pathlib import Path

import pexpect
import pytest
from conftest import WIZARDCHAT, Models, run_cli
from gguf_models import SCRIPT_REPLY
from test_repl import Chat, clean

EVICTION = re.compile(r"no longer sees the (\d+) oldest turns? \((\d+) of (\d+) still")


def _sessions(home: Path) -> Path:
    return home / "data" / "sessions"


def _saved_users(home: Path, name: str) -> list[str]:
    data = json.loads((_sessions(home) / f"{name}.json").read_text(encoding="utf-8"))
    return [t["user"] for t in data["turns"]]


def _check_evictions_were_all_said(text: str, turns: int) -> int:
    """Every eviction was announced: the reported counts add up to what left the window."""
    notes = [tuple(map(int, m)) for m in EVICTION.findall(text)]
    assert notes, "the context never filled up: the test is not testing eviction"
    said = sum(n for n, _, _ in notes)
    _, in_view, total = notes[-1]
    assert said == total - in_view, notes  # no silent eviction in between
    assert total < turns
    return len(notes)


# --- one context size everywhere (llama.cpp pads to 256) -------------------------------------


@pytest.mark.parametrize("ctx", [30, 256, 300, 320, 384, 512, 640, 1000, 1024])
def test_a_long_batch_is_answered_whole_at_any_context_size(models: Models, ctx: int) -> None:
    lines = [f"What is two plus three {i} tell me more about it" for i in range(40)]
    stdin = "\n".join(lines) + "\n"
    r = run_cli("run", "-m", str(models.scripted), "-c", str(ctx), stdin=stdin, timeout=300)
    assert r.code == 0, r.stderr
    assert r.stdout.count(SCRIPT_REPLY) == 40
    assert "Traceback" not in r.stderr and "unexpected error" not in r.stderr
    padded = -(-ctx // 256) * 256
    if padded != ctx:
        assert f"context: {padded} tokens (-c {ctx} rounded up" in r.stderr
    else:
        assert "rounded up" not in r.stderr


def test_a_prompt_just_past_an_unpadded_context_size_is_answered(
    models: Models, tmp_path: Path
) -> None:
    # -c 300 with a ~303-token prompt used to crash llama-cpp-python's token buffer.
    text = " ".join(["Hello world"] * 150)
    r = run_cli("ask", "-m", str(models.scripted), "-c", "300", "--json", text)
    assert r.code == 0, r.stderr
    record = json.loads(r.stdout)
    assert 300 < record["prompt_tokens"] < 512 and record["reply"] == SCRIPT_REPLY


def test_a_message_longer_than_the_padded_context_is_exit_6(models: Models) -> None:
    r = run_cli("ask", "-m", str(models.scripted), "-c", "300", "Hello world " * 400)
    assert r.code == 6, r.stderr
    assert "message too long" in r.stderr and "512-token context" in r.stderr
    assert r.stderr.count("\n") == 2  # the rounding note and the error line


def test_a_reply_cut_by_a_full_context_says_so(models: Models) -> None:
    # The random model never says EOS: its reply runs until the context is full.
    r = run_cli("ask", "-m", str(models.slow), "-c", "256", "Hi")
    assert r.code == 0, r.stderr
    assert "the context is full" in r.stderr
    r = run_cli("ask", "-m", str(models.slow), "-c", "256", "-n", "5", "Hi")
    assert r.code == 0 and "context is full" not in r.stderr  # --max-tokens is no surprise


def test_bench_at_an_unpadded_context(models: Models) -> None:
    r = run_cli("bench", "-m", str(models.scripted), "-c", "300", "--reps", "1", "--json")
    assert r.code == 0, r.stderr
    assert json.loads(r.stdout)


def test_the_repl_banner_toolbar_and_plan_agree_on_the_context(
    models: Models, isolated_home: Path
) -> None:
    chat = Chat("-m", str(models.scripted), "-c", "300")
    try:
        assert "context 512 tokens" in chat.banner
        assert "ctx 512" in chat.banner and "-c 300 rounded up" in chat.banner
        chat.send("Hi")
        chat.expect(r"/512 tokens")
        assert re.search(r"context\s+512 tokens", chat.send("/show"))
        assert chat.exit() == 0
    finally:
        chat.kill()


# --- the transcript is sacred ---------------------------------------------------------------


def _write_session(home: Path, name: str, turns: int) -> None:
    _sessions(home).mkdir(parents=True, exist_ok=True)
    data = {
        "version": 1,
        "name": name,
        "model": "scripted.gguf",
        "created": 1.0,
        "updated": 2.0,
        "system": "A chat.",
        "turns": [
            {
                "user": f"old question {i} " + "word " * 10,
                "reply": SCRIPT_REPLY,
                "interrupted": False,
            }
            for i in range(turns)
        ],
    }
    (_sessions(home) / f"{name}.json").write_text(json.dumps(data), encoding="utf-8")


def test_resuming_a_long_session_in_a_small_context_keeps_every_turn(
    models: Models, isolated_home: Path
) -> None:
    _write_session(isolated_home, "big", 50)
    r = run_cli("run", "-m", str(models.scripted), "-c", "512", "--session", "big", stdin="more\n")
    assert r.code == 0, r.stderr
    assert r.stdout.count(SCRIPT_REPLY) == 1
    assert "no longer sees the" in r.stderr
    users = _saved_users(isolated_home, "big")
    assert len(users) == 51 and users[0].startswith("old question 0") and users[-1] == "more"


def test_a_large_max_tokens_keeps_the_history(models: Models) -> None:
    lines = ["Hi", "Who are you", "What is two plus three"]
    r = run_cli(
        "run",
        "-m",
        str(models.scripted),
        "-c",
        "1024",
        "-n",
        "1000",
        "--verbose-prompt",
        stdin="\n".join(lines) + "\n",
    )
    assert r.code == 0, r.stderr
    assert "no longer sees" not in r.stderr
    last_prompt = r.stderr.split("--- prompt:")[-1]
    assert "USER: Hi ASSISTANT:" in last_prompt  # the first turn is still seen


# --- 200-turn soaks -------------------------------------------------------------------------


@pytest.mark.slow
@pytest.mark.parametrize("ctx", [320, 512])
def test_soak_200_turns_in_batch_mode_with_a_session(
    models: Models, isolated_home: Path, ctx: int
) -> None:
    lines = [f"question {i} what is two plus three" for i in range(200)]
    r = run_cli(
        "run",
        "-m",
        str(models.scripted),
        "-c",
        str(ctx),
        "--session",
        "soak",
        stdin="\n".join(lines) + "\n",
        timeout=300,
    )
    assert r.code == 0, r.stderr[-2000:]
    assert r.stdout.count(SCRIPT_REPLY) == 200
    assert _saved_users(isolated_home, "soak") == lines
    _check_evictions_were_all_said(r.stderr, 200)


@pytest.mark.slow
def test_soak_200_turns_in_jsonl_mode_with_a_session(models: Models, isolated_home: Path) -> None:
    prompts = [f"question {i} what is two plus three" for i in range(200)]
    stdin = "".join(json.dumps({"prompt": p}) + "\n" for p in prompts)
    r = run_cli(
        "run",
        "--jsonl",
        "-m",
        str(models.scripted),
        "-c",
        "320",
        "--session",
        "soakj",
        stdin=stdin,
        timeout=300,
    )
    assert r.code == 0, r.stderr[-2000:]
    answers = [json.loads(line) for line in r.stdout.splitlines()]
    assert [a["reply"] for a in answers] == [SCRIPT_REPLY] * 200
    assert _saved_users(isolated_home, "soakj") == prompts
    _check_evictions_were_all_said(r.stderr, 200)


@pytest.mark.slow
@pytest.mark.parametrize("ctx", [320, 512])
def test_soak_200_turns_in_the_repl_with_a_session(
    models: Models, isolated_home: Path, ctx: int
) -> None:
    chat = Chat("-m", str(models.scripted), "-c", str(ctx), "--session", "soakr", "--no-stats")
    chat.child.setwinsize(30, 250)  # eviction notes on one line each
    shown = []
    try:
        for i in range(200):
            out = chat.send(f"question {i} what is two plus three")
            assert SCRIPT_REPLY in out, (i, out)
            shown.append(out)
        assert chat.exit() == 0
    finally:
        chat.kill()
    assert _saved_users(isolated_home, "soakr") == [
        f"question {i} what is two plus three" for i in range(200)
    ]
    _check_evictions_were_all_said("".join(shown), 200)


# --- sessions in batch mode -----------------------------------------------------------------


def test_batch_saves_a_named_session_after_each_reply_and_resumes_it(
    models: Models, isolated_home: Path
) -> None:
    r = run_cli("run", "-m", str(models.scripted), "--session", "script", stdin="one\ntwo\n")
    assert r.code == 0, r.stderr
    assert _saved_users(isolated_home, "script") == ["one", "two"]
    r = run_cli("run", "-m", str(models.scripted), "--resume", stdin="three\n")
    assert r.code == 0, r.stderr
    assert "continuing 'script': 2 turns" in r.stderr
    assert _saved_users(isolated_home, "script") == ["one", "two", "three"]
    r = run_cli(
        "run",
        "--jsonl",
        "-m",
        str(models.scripted),
        "--session",
        "script",
        stdin='{"prompt": "four"}\n',
    )
    assert r.code == 0, r.stderr
    assert _saved_users(isolated_home, "script") == ["one", "two", "three", "four"]


def test_batch_without_a_session_saves_nothing(models: Models, isolated_home: Path) -> None:
    r = run_cli("run", "-m", str(models.scripted), stdin="one\n")
    assert r.code == 0
    assert not _sessions(isolated_home).exists() or not list(_sessions(isolated_home).iterdir())


def test_a_reset_in_a_saved_batch_keeps_the_earlier_conversation(
    models: Models, isolated_home: Path
) -> None:
    r = run_cli("run", "-m", str(models.scripted), "--session", "keep", stdin="one\n/reset\ntwo\n")
    assert r.code == 0, r.stderr
    assert _saved_users(isolated_home, "keep") == ["one"]
    new = re.search(r"new conversation, saved as '([^']+)'", r.stderr)
    assert new, r.stderr
    assert _saved_users(isolated_home, new.group(1)) == ["two"]


# --- SIGTERM and SIGHUP mid-reply: the turn is closed, marked and saved ------------------------


def _wait_streaming(chat: Chat, message: str) -> None:
    chat.child.send(message + "\r")
    chat.expect(re.escape(message))
    chat.expect(r"[^\s\x1b]{20}")  # the reply is streaming


@pytest.mark.parametrize("how", ["SIGTERM", "hangup"])
def test_sigterm_or_closing_the_terminal_mid_reply_saves_the_partial_turn(
    models: Models, isolated_home: Path, how: str
) -> None:
    chat = Chat("-m", str(models.slow), "-n", "100000", "-c", "8192", "--session", "sig")
    try:
        chat.send("/set max_tokens 3")
        chat.send("first")  # a whole turn, so the file exists before
        chat.send("/set max_tokens 100000")
        _wait_streaming(chat, "tell me everything")
        if how == "SIGTERM":
            chat.child.kill(signal.SIGTERM)
            chat.child.expect(pexpect.EOF, timeout=30)
            chat.child.close()
            assert chat.child.exitstatus == 128 + signal.SIGTERM
        else:
            # Closing the master side is what closing a terminal window does: the kernel sends
            # SIGHUP, and every later write to the terminal fails.
            pid = chat.child.pid
            os.close(chat.child.child_fd)
            chat.child.child_fd, chat.child.closed = -1, True
            deadline = time.monotonic() + 30
            while time.monotonic() < deadline:
                done, status = os.waitpid(pid, os.WNOHANG)
                if done:
                    assert os.WIFEXITED(status), status
                    assert os.WEXITSTATUS(status) == 128 + signal.SIGHUP
                    break
                time.sleep(0.05)
            else:
                pytest.fail("wizardchat did not exit after a hangup")
    finally:
        chat.kill() if chat.child.child_fd != -1 else None
    data = json.loads((_sessions(isolated_home) / "sig.json").read_text(encoding="utf-8"))
    assert [t["user"] for t in data["turns"]] == ["first", "tell me everything"]
    last = data["turns"][-1]
    assert last["interrupted"] is True and len(last["reply"]) > 5
    # The KV state was saved on the way out, partial reply included: resuming evaluates only
    # the new message.
    r = run_cli("run", "--jsonl", "--session", "sig", "-c", "8192", "-n", "2",
                stdin='{"prompt": "go on"}\n')  # fmt: skip
    assert r.code == 0, r.stderr
    assert re.search(r"^restored [\d,]+ tokens in ", r.stderr, re.M), r.stderr
    assert json.loads(r.stdout)["evaluated_tokens"] < 20


def test_sigterm_at_the_prompt_exits_143_and_keeps_the_session(
    models: Models, isolated_home: Path
) -> None:
    chat = Chat("-m", str(models.scripted), "--session", "idle")
    try:
        chat.send("hello")
        chat.child.kill(signal.SIGTERM)
        chat.child.expect(pexpect.EOF, timeout=30)
        chat.child.close()
        assert chat.child.exitstatus == 128 + signal.SIGTERM
        assert "Traceback" not in clean(str(chat.child.before))
    finally:
        chat.kill()
    assert _saved_users(isolated_home, "idle") == ["hello"]


def test_sigterm_mid_reply_in_batch_mode_saves_the_partial_turn(
    models: Models, isolated_home: Path
) -> None:
    proc = subprocess.Popen(
        [
            WIZARDCHAT,
            "run",
            "-m",
            str(models.slow),
            "-n",
            "100000",
            "-c",
            "8192",
            "--session",
            "bsig",
        ],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
    )
    assert proc.stdin and proc.stdout
    proc.stdin.write(b"tell me everything\nthis line is never answered\n")
    proc.stdin.flush()
    proc.stdout.read(40)  # the reply is streaming
    proc.send_signal(signal.SIGTERM)
    _, err = proc.communicate(timeout=60)
    assert proc.returncode == 128 + signal.SIGTERM, err
    data = json.loads((_sessions(isolated_home) / "bsig.json").read_text(encoding="utf-8"))
    assert [t["user"] for t in data["turns"]] == ["tell me everything"]
    assert data["turns"][0]["interrupted"] is True
