"""The installed `wizardchat` command in a subprocess: streams, exit codes, batch, JSON."""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

from conftest import WIZARDCHAT, run_cli
from gguf_models import SCRIPT_REPLY

from wizardchat.errors import ExitCode
from wizardchat.settings import DEFAULT_SYSTEM_PROMPT

PROMPT_BLOCK = re.compile(r"--- prompt: (\d+) tokens ---\n(.*?)\n--- end of prompt ---", re.S)


def test_ask_streams_only_the_reply_to_stdout(models) -> None:
    r = run_cli("ask", "Hi", "-m", str(models.scripted))
    assert r.code == 0
    assert r.stdout == SCRIPT_REPLY + "\n"
    assert r.stderr == ""  # no progress bar or chatter when stderr is not a terminal


def test_ask_puts_piped_stdin_first_then_a_blank_line_then_the_prompt(models) -> None:
    r = run_cli("ask", "Summarize", "-m", str(models.scripted), "--verbose-prompt",
                stdin="line one\nline two\n")  # fmt: skip
    assert r.code == 0
    ((count, text),) = PROMPT_BLOCK.findall(r.stderr)
    assert text == f"{DEFAULT_SYSTEM_PROMPT} USER: line one\nline two\n\nSummarize ASSISTANT:"
    assert int(count) > 0


def test_ask_from_stdin_alone(models) -> None:
    r = run_cli("ask", "-m", str(models.scripted), stdin="Hi there")
    assert (r.code, r.stdout) == (0, SCRIPT_REPLY + "\n")


def test_ask_with_nothing_to_ask_is_a_usage_error(models) -> None:
    r = run_cli("ask", "-m", str(models.scripted), stdin="")
    assert r.code == ExitCode.USAGE
    assert r.stderr.strip() == (
        'wizardchat: error: nothing to ask: give a prompt (wizardchat ask "...") or pipe text in'
    )


def test_ask_json(models) -> None:
    r = run_cli("ask", "Hi", "-m", str(models.scripted), "--json")
    assert r.code == 0
    record = json.loads(r.stdout)
    assert record["reply"] == SCRIPT_REPLY
    assert record["model"] == models.scripted.name
    assert record["completion_tokens"] == 9
    assert record["evaluated_tokens"] == record["prompt_tokens"] > 0
    assert {"prompt_seconds", "decode_tokens_per_second"} <= set(record["timings"])


def test_ask_into_a_closed_pipe_exits_quietly(models) -> None:
    cmd = f"'{WIZARDCHAT}' ask Hi -m '{models.slow}' -n 3000 | head -c 10; exit ${{PIPESTATUS[0]}}"
    proc = subprocess.run(["bash", "-c", cmd], capture_output=True, text=True, timeout=120,
                          stdin=subprocess.DEVNULL)  # fmt: skip
    assert len(proc.stdout.encode()) == 10
    assert proc.returncode == 0, proc.stderr
    assert "Traceback" not in proc.stderr and "BrokenPipe" not in proc.stderr


def test_ctrl_c_stops_ask_with_130_and_no_traceback(models) -> None:
    proc = subprocess.Popen([WIZARDCHAT, "ask", "Hi", "-m", str(models.slow), "-n", "6000"],
                            stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE)  # fmt: skip
    assert proc.stdout is not None
    proc.stdout.read(1)  # generating now
    time.sleep(0.2)
    proc.send_signal(signal.SIGINT)
    _, err = proc.communicate(timeout=60)
    assert proc.returncode == ExitCode.INTERRUPTED
    assert b"Traceback" not in err and b"interrupted" in err


def test_batch_lines_answer_each_line_followed_by_an_empty_line(models) -> None:
    r = run_cli("run", "-m", str(models.scripted), stdin="Hi\n\nWho are you?\n/reset\nHello\n")
    assert r.code == 0
    assert r.stdout == (SCRIPT_REPLY + "\n\n") * 3


def test_batch_verbose_prompt_is_the_exact_vicuna_conversation(models) -> None:
    r = run_cli("run", "-m", str(models.scripted), "--verbose-prompt",
                stdin="Hi\nWho are you?\n/system Be brief.\nHello\n")  # fmt: skip
    assert r.code == 0
    replies = r.stdout.split("\n\n")[:3]
    prompts = PROMPT_BLOCK.findall(r.stderr)
    assert [p[1] for p in prompts] == [
        f"{DEFAULT_SYSTEM_PROMPT} USER: Hi ASSISTANT:",
        f"{DEFAULT_SYSTEM_PROMPT} USER: Hi ASSISTANT: {replies[0]}</s>"
        "USER: Who are you? ASSISTANT:",
        "Be brief. USER: Hello ASSISTANT:",
    ]
    assert int(prompts[1][0]) > int(prompts[0][0])


def test_batch_unknown_command_is_reported_and_the_batch_goes_on(models) -> None:
    r = run_cli("run", "-m", str(models.scripted), stdin="/nope\nHi\n")
    assert r.code == ExitCode.USAGE
    assert r.stdout == SCRIPT_REPLY + "\n\n"
    assert "line 1: unknown command /nope" in r.stderr


def test_batch_replaces_invalid_utf8(models) -> None:
    r = run_cli("run", "-m", str(models.scripted), "--verbose-prompt", stdin=b"caf\xe9 ok\n")
    assert r.code == 0 and r.stdout == SCRIPT_REPLY + "\n\n"
    assert "USER: caf\ufffd ok ASSISTANT:" in r.stderr


def test_jsonl_batch_with_a_malformed_line(models) -> None:
    lines = [
        json.dumps({"prompt": "Hi"}),
        "{not json",
        json.dumps({"prompt": "Who are you?"}),
        json.dumps({"prompt": "Hello", "system": "Be brief."}),
        json.dumps({"prompt": "Hello", "reset": True}),
        json.dumps({"no_prompt": 1}),
    ]
    r = run_cli("run", "--jsonl", "-m", str(models.scripted), stdin="\n".join(lines) + "\n")
    assert r.code == ExitCode.USAGE
    out = [json.loads(line) for line in r.stdout.splitlines()]
    assert len(out) == 6
    assert out[1] == {"line": 2, "error": out[1]["error"]} and "not JSON" in out[1]["error"]
    assert "prompt" in out[5]["error"]
    for record in (out[0], out[2], out[3], out[4]):
        assert record["reply"] == SCRIPT_REPLY
        assert set(record) == {"prompt", "reply", "prompt_tokens", "completion_tokens",
                               "evaluated_tokens", "seconds", "finish"}  # fmt: skip
    # The second turn continues the first: only its new tokens are evaluated.
    assert out[2]["evaluated_tokens"] < out[2]["prompt_tokens"] / 2
    assert out[2]["prompt_tokens"] > out[0]["prompt_tokens"]
    # A new system prompt and a reset each start a new conversation.
    assert out[3]["prompt_tokens"] < out[2]["prompt_tokens"]
    # reset keeps the current system prompt: the same prompt again, served from the KV cache.
    assert out[4]["prompt_tokens"] == out[3]["prompt_tokens"]
    assert out[4]["evaluated_tokens"] <= 1


def test_bad_flag_value_is_a_usage_error_without_traceback(models) -> None:
    r = run_cli("ask", "Hi", "-m", str(models.scripted), "-fa", "maybe")
    assert r.code == ExitCode.USAGE
    assert "flash_attn must be one of auto, on, off" in r.stderr and "Traceback" not in r.stderr


def test_debug_shows_the_traceback(tmp_path: Path) -> None:
    r = run_cli("--debug", "ask", "Hi", "-m", str(tmp_path / "missing.gguf"))
    assert r.code != 0 and "Traceback" in r.stderr and "NoModelError" in r.stderr


def test_model_from_the_environment(models, monkeypatch) -> None:
    monkeypatch.setenv("WIZARDCHAT_MODEL", str(models.scripted))
    assert run_cli("ask", "Hi").stdout == SCRIPT_REPLY + "\n"


HEAVY = {"llama_cpp", "numpy", "huggingface_hub", "prompt_toolkit", "rich", "jinja2"}


def _imported_by(*args: str) -> tuple[set[str], str]:
    proc = subprocess.run([sys.executable, "-X", "importtime", "-m", "wizardchat", *args],
                          capture_output=True, text=True, timeout=60)  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-2000:]
    imported = {line.split("|")[-1].strip().split(".")[0] for line in proc.stderr.splitlines()}
    assert "wizardchat" in imported  # the check saw the real import list
    return imported, proc.stdout


def test_top_level_help_imports_neither_typer_nor_heavy_modules() -> None:
    imported, out = _imported_by("--help")
    assert "ask" in out and "run" in out
    assert imported & (HEAVY | {"typer", "click"}) == set()


def test_command_help_does_not_import_heavy_modules() -> None:
    imported, out = _imported_by("ask", "--help")
    assert "--n-cpu-moe" in out and "--override-tensor" in out
    assert imported & HEAVY == set()


def test_fast_top_level_help_is_exactly_what_typer_renders() -> None:
    from wizardchat.entry import TOP_LEVEL_HELP

    code = "from wizardchat.cli import main; main()"
    proc = subprocess.run([sys.executable, "-c", code, "--help"], capture_output=True, text=True,
                          timeout=60, env={**os.environ, "COLUMNS": "80"})  # fmt: skip
    assert proc.stdout == TOP_LEVEL_HELP


def test_version() -> None:
    r = run_cli("--version")
    assert r.code == 0 and r.stdout.startswith("wizardchat ")
