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

import pytest
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
        assert set(record) == {"prompt", "reply", "model", "prompt_tokens", "completion_tokens",
                               "evaluated_tokens", "finish", "timings"}  # fmt: skip
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
    assert "-fa/--flash-attn: must be one of auto, on, off" in r.stderr
    assert "Traceback" not in r.stderr


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

    code = "from wizardchat.cli.app import main; main()"
    proc = subprocess.run([sys.executable, "-c", code, "--help"], capture_output=True, text=True,
                          timeout=60, env={**os.environ, "COLUMNS": "80"})  # fmt: skip
    assert proc.stdout == TOP_LEVEL_HELP


def test_version() -> None:
    r = run_cli("--version")
    assert r.code == 0 and r.stdout.startswith("wizardchat ")


# ------------------------------------------------------------------ help texts (issue 10)

COMMANDS = ["ask", "run", "pull", "models", "rm", "doctor", "bench", "rpc-worker", "sessions",
            "sessions rm"]  # fmt: skip
PYTHON_TYPES = re.compile(r"<(int|float|str|bool|path)|list\[|range>|\[\[|\{\w+\}")


@pytest.mark.parametrize("columns", ["80", "100"])
@pytest.mark.parametrize("command", COMMANDS)
def test_help_has_no_python_types_and_fits_the_terminal(
    command: str, columns: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("COLUMNS", columns)
    r = run_cli(*command.split(), "--help", timeout=60)
    assert r.code == 0, r.stderr
    assert not PYTHON_TYPES.search(r.stdout), r.stdout
    assert "Examples:" in r.stdout, r.stdout
    too_wide = [line for line in r.stdout.splitlines() if len(line) > int(columns)]
    assert too_wide == []


def test_usage_lines_show_arguments_as_users_write_them() -> None:
    assert run_cli("pull", "-h").stdout.startswith("Usage: wizardchat pull [OPTIONS] [REF]\n")
    assert run_cli("rm", "-h").stdout.startswith("Usage: wizardchat rm [OPTIONS] REF\n")
    assert run_cli("ask", "-h").stdout.startswith("Usage: wizardchat ask [OPTIONS] [PROMPT]\n")
    usage = run_cli("sessions", "rm", "-h").stdout.splitlines()[0]
    assert usage == "Usage: wizardchat sessions rm [OPTIONS] NAME..."


def _option_line(help_text: str, flag: str) -> str:
    """The help of one option, its wrapped lines joined."""
    lines = help_text.splitlines()
    start = next(i for i, line in enumerate(lines) if re.match(rf"\s+(-\S+, )*{flag}\b", line))
    block = [lines[start]]
    for line in lines[start + 1 :]:
        if not line.startswith(" " * 10):
            break
        block.append(line)
    return " ".join(part.strip() for part in block)


@pytest.mark.parametrize("command", ["run", "ask"])
def test_run_and_ask_help_show_the_sampling_defaults(command: str) -> None:
    out = run_cli(command, "--help").stdout
    for flag, default in [("--temperature", "0.8"), ("--top-p", "0.95"), ("--top-k", "40"),
                          ("--min-p", "0.05"), ("--repeat-penalty", "1.0"), ("--ctx-size", "0"),
                          ("--flash-attn", "auto"), ("--batch-size", "2048")]:  # fmt: skip
        assert f"[default: {default}]" in _option_line(out, flag), (flag, out)


def test_run_help_groups_its_options_in_panels() -> None:
    out = run_cli("run", "--help").stdout
    panels = [line[:-1] for line in out.splitlines() if re.fullmatch(r"[A-Z][a-z ]+:", line)]
    assert panels == ["Chat", "Sessions", "Model and loading", "Expert placement and performance",
                      "Output", "Options", "Examples"]  # fmt: skip
    chat = out.split("\nChat:\n")[1].split("\n\n")[0]
    assert "--temperature" in chat and "--system" in chat
    assert "--session NAME" in out.split("\nSessions:\n")[1].split("\n\n")[0]
    assert "--kv-cache-max-gb" in out.split("\nSessions:\n")[1].split("\n\n")[0]
    ask = run_cli("ask", "--help").stdout
    assert "\nChat:\n" in ask and "\nOutput:\n" in ask
    sessions = ask.split("\nSessions:\n")[1].split("\n\n")[0]  # ask --session NAME continues one
    assert "--session NAME" in sessions and "--kv-cache-max-gb" in sessions
    assert "--kv-cache-max-gb" not in run_cli("bench", "--help").stdout  # no conversation there


def test_bench_reps_help_says_what_it_counts() -> None:
    line = _option_line(run_cli("bench", "--help").stdout, "--reps")
    assert "Timed runs a test" not in line and "each test" in line


def test_top_level_help_says_how_to_start_with_a_file() -> None:
    r = run_cli("--help")
    assert "wizardchat run -m FILE.gguf" in r.stdout


# ------------------------------------------------------------------ usage errors: one line, exit 2

USAGE_ERRORS = [
    (["run", "-c", "abc"], "-c/--ctx-size: 'abc' is not a whole number"),
    (["ask", "-n", "1.5", "Hi"], "-n/--max-tokens: '1.5' is not a whole number"),
    (["run", "--temp", "hot"], "--temperature/--temp: 'hot' is not a number"),
    (["run", "--top-p", "2"], "--top-p: must be above 0, at most 1, not 2.0"),
    (["ask", "Hi", "-t", "100000"], "-t/--threads: must be 0 (physical cores) to 512, not 100000"),
    (["run", "-fa", "maybe"], "-fa/--flash-attn: must be one of auto, on, off, not 'maybe'"),
    (["pull", "--workers", "99"], "--workers: must be 1 to 16, not 99"),
    (["pull", "--workers", "x"], "--workers: 'x' is not a whole number"),
    (["rpc-worker", "--port", "0"], "--port: must be 1 to 65535, not 0"),
    (["run", "--tempreture", "1"], "unknown option --tempreture (did you mean --temperature?)"),
    (["ask", "-ng", "5", "Hi"], "unknown option -ng (did you mean -ngl?)"),
    (["models", "--zzz"], "unknown option --zzz (wizardchat models -h lists the options)"),
    (["run", "--temp"], "--temp: needs a value"),
    (["run", "--mmap=3"], "--mmap: takes no value"),
    (["rm"], "rm: missing REF (usage: wizardchat rm [OPTIONS] REF)"),
    (["sessions", "rm"],
     "sessions rm: missing NAME (usage: wizardchat sessions rm [OPTIONS] NAME...)"),
    (["rm", "a", "b"], "rm: unexpected extra argument 'b' (usage: wizardchat rm [OPTIONS] REF)"),
    (["ask", "-5 degrees, what to wear?"],
     "unknown option -5 (text that starts with - goes after --: wizardchat ask -- TEXT)"),
    (["--debug"], "missing COMMAND (wizardchat -h lists the commands)"),
    (["-m", "x.gguf", "run"], "-m goes after the command: wizardchat run -m ..."),
    (["--temp", "0.5"], "--temp goes after the command: wizardchat run --temp ..."),
    (["ask", "why", "is", "it"],
     "ask: unexpected extra arguments 'is' 'it' (quote a prompt of several words: "
     "wizardchat ask \"...\")"),
]  # fmt: skip


@pytest.mark.parametrize(
    ("args", "message"), USAGE_ERRORS, ids=[" ".join(a) for a, _ in USAGE_ERRORS]
)
def test_usage_errors_are_one_line_naming_the_flag(args: list[str], message: str) -> None:
    r = run_cli(*args, timeout=60)
    assert (r.code, r.stderr) == (ExitCode.USAGE, f"wizardchat: error: {message}\n")
    assert r.stdout == ""


ENV_ERRORS = [
    ("WIZARDCHAT_CTX_SIZE", "abc", "WIZARDCHAT_CTX_SIZE: 'abc' is not a whole number"),
    ("WIZARDCHAT_TEMPERATURE", "hot", "WIZARDCHAT_TEMPERATURE: 'hot' is not a number"),
    ("WIZARDCHAT_TOP_P", "5", "WIZARDCHAT_TOP_P: must be above 0, at most 1, not 5.0"),
    ("WIZARDCHAT_FLASH_ATTN", "maybe",
     "WIZARDCHAT_FLASH_ATTN: must be one of auto, on, off, not 'maybe'"),
    ("WIZARDCHAT_MLOCK", "perhaps", "WIZARDCHAT_MLOCK: 'perhaps' is not one of true, false, yes, "
     "no, on, off, 1, 0"),
]  # fmt: skip


@pytest.mark.parametrize(("name", "value", "message"), ENV_ERRORS)
def test_bad_environment_values_name_the_variable(
    name: str, value: str, message: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv(name, value)
    r = run_cli("ask", "Hi", "-m", "/nonexistent.gguf", timeout=60)
    assert (r.code, r.stderr) == (ExitCode.USAGE, f"wizardchat: error: {message}\n")


CONFIG_ERRORS = [
    ("tempreature = 0.5\n", "unknown setting 'tempreature' (did you mean 'temperature'?)"),
    ("ctx-sise = 10\n", "unknown setting 'ctx-sise' (did you mean 'ctx-size'?)"),
    ("top_p = 5\n", "top_p: must be above 0, at most 1, not 5.0"),
    ("ctx-size = 'abc'\n", "ctx-size: 'abc' is not a whole number"),
    ("flash_attn = 'maybe'\n", "flash_attn: must be one of auto, on, off, not 'maybe'"),
]


@pytest.mark.parametrize(("text", "message"), CONFIG_ERRORS)
def test_bad_config_values_name_the_file_and_the_key(
    text: str, message: str, isolated_home: Path
) -> None:
    config = isolated_home / "config" / "config.toml"
    config.parent.mkdir(parents=True)
    config.write_text(text)
    r = run_cli("ask", "Hi", "-m", "/nonexistent.gguf", timeout=60)
    expected = f"wizardchat: error: config file {config}: {message}\n"
    assert (r.code, r.stderr) == (ExitCode.USAGE, expected)


def test_a_flag_beats_a_bad_value_from_the_environment_no_error(models, monkeypatch) -> None:
    monkeypatch.setenv("WIZARDCHAT_TOP_P", "5")
    r = run_cli("ask", "Hi", "-m", str(models.scripted), "--top-p", "0.9")
    assert (r.code, r.stdout) == (0, SCRIPT_REPLY + "\n"), r.stderr


# ------------------------------------------------------------------ unknown commands

UNKNOWN_COMMANDS = [
    (["list"], "unknown command 'list' (did you mean 'wizardchat models'?)"),
    (["ls"], "unknown command 'ls' (did you mean 'wizardchat models'?)"),
    (["chat"], "unknown command 'chat' (did you mean 'wizardchat run'?)"),
    (["download", "x"], "unknown command 'download' (did you mean 'wizardchat pull'?)"),
    (["delete"], "unknown command 'delete' (did you mean 'wizardchat rm'?)"),
    (["remove"], "unknown command 'remove' (did you mean 'wizardchat rm'?)"),
    (["modles"], "unknown command 'modles' (did you mean 'wizardchat models'?)"),
    (["server"], "unknown command 'server' (did you mean 'wizardchat serve'?)"),
    (["frobnicate"], "unknown command 'frobnicate' (wizardchat -h lists the commands)"),
    (["sessions", "delete"], "unknown command 'sessions delete' (did you mean "
                             "'wizardchat sessions rm'?)"),
    (["sessions", "list"], "unknown command 'sessions list' (did you mean 'wizardchat sessions'?)"),
]  # fmt: skip


@pytest.mark.parametrize(("args", "message"), UNKNOWN_COMMANDS, ids=lambda v: str(v)[:20])
def test_unknown_commands_suggest_the_nearest(args: list[str], message: str) -> None:
    r = run_cli(*args, timeout=60)
    assert (r.code, r.stderr) == (ExitCode.USAGE, f"wizardchat: error: {message}\n")


# ------------------------------------------------------------------ --debug, bare wizardchat


@pytest.mark.parametrize("command", ["run", "ask"])
def test_debug_works_after_the_subcommand(command: str, tmp_path: Path) -> None:
    prompt = ["Hi"] if command == "ask" else []
    r = run_cli(command, "--debug", "-m", str(tmp_path / "missing.gguf"), *prompt)
    assert r.code != 0 and "Traceback" in r.stderr and "NoModelError" in r.stderr


def test_bare_wizardchat_prints_the_help_and_exits_0() -> None:
    from wizardchat.entry import TOP_LEVEL_HELP

    r = run_cli()
    assert (r.code, r.stdout, r.stderr) == (0, TOP_LEVEL_HELP, "")
    code = "from wizardchat.cli.app import main; main()"  # the typer path says the same
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                          timeout=60, env={**os.environ, "COLUMNS": "80"})  # fmt: skip
    assert (proc.returncode, proc.stdout, proc.stderr) == (0, TOP_LEVEL_HELP, "")


# ------------------------------------------------------------------ a file that is not a GGUF


@pytest.mark.parametrize("name", ["README.md", "README", "notes.txt", "model.bin"])
@pytest.mark.parametrize("command", ["run", "ask", "bench"])
def test_an_existing_file_that_is_not_gguf_says_so(
    name: str, command: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    (tmp_path / name).write_text("# wizardchat\n\nSome text.\n")
    monkeypatch.chdir(tmp_path)
    args = [command, "-m", name] + (["Hi"] if command == "ask" else [])
    r = run_cli(*args, timeout=60)
    assert r.code == ExitCode.BAD_MODEL, r.stderr
    assert r.stderr.startswith(f"wizardchat: error: {name} is not a GGUF file"), r.stderr
    assert r.stderr.count("\n") == 1


# ------------------------------------------------------------------ options declared once


def test_every_setting_is_one_option_and_each_command_takes_its_set() -> None:
    import typer

    from wizardchat.cli.app import app
    from wizardchat.cli.options import CHAT_OPTIONS, LOAD_OPTIONS, OPTIONS, SAMPLING
    from wizardchat.settings import FIELD_NAMES

    assert set(OPTIONS) == set(FIELD_NAMES)
    group = typer.main.get_command(app)
    commands = group.commands  # type: ignore[attr-defined]
    taken = {name: [p.name for p in c.params if p.name in OPTIONS] for name, c in commands.items()}
    assert taken["ask"] == taken["run"] == list(CHAT_OPTIONS)
    assert taken["bench"] == list(LOAD_OPTIONS) and not set(SAMPLING) & set(LOAD_OPTIONS)
    # its own -m (other help), the shared --rpc, and the --endpoint it can check instead
    assert taken["doctor"] == ["model", "rpc", "endpoint", "endpoint_model", "endpoint_timeout"]
