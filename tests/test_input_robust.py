"""Hostile input: odd bytes, huge numbers, endless streams, odd files, closed or full outputs.

Each case must end with one line on stderr and a documented exit code (or a per-line error in
batch mode) before any model is loaded where it can be, and never with a traceback or a hang.
"""

from __future__ import annotations

import json
import math
import os
import re
import subprocess
import time
from pathlib import Path

import pexpect
import pytest
from conftest import WIZARDCHAT, run_cli
from gguf_models import SCRIPT_REPLY

from wizardchat.errors import ExitCode, UsageError
from wizardchat.settings import load_settings
from wizardchat.tui import commands
from wizardchat.tui.commands import CommandError

# ------------------------------------------------------------------ one range table everywhere

OUT_OF_RANGE = [
    ("temperature", math.nan),
    ("temperature", math.inf),
    ("top_p", 5.0),
    ("min_p", 2.0),
    ("repeat_penalty", -1.0),
    ("top_k", -1),
    ("seed", 2**32),
    ("seed", -2),
    ("threads", 100_000),
    ("batch_size", 99_999_999_999),
    ("ubatch_size", 100_000_000),
    ("ctx_size", 2**40),
    ("n_cpu_moe", 10**9),
    ("n_gpu_layers", -2),
    ("max_tokens", 0),
]


def _toml(value: float) -> str:
    if isinstance(value, float) and math.isnan(value):
        return "nan"
    if isinstance(value, float) and math.isinf(value):
        return "inf"
    return repr(value)


@pytest.mark.parametrize(("name", "value"), OUT_OF_RANGE)
def test_out_of_range_values_are_refused_from_flags_env_and_config(
    tmp_path: Path, name: str, value: float
) -> None:
    none = tmp_path / "none.toml"
    env = f"WIZARDCHAT_{name.upper()}"
    cfg = tmp_path / "config.toml"
    cfg.write_text(f"{name} = {_toml(value)}\n")
    attempts = [
        lambda: load_settings({name: value}, config_path=none, environ={}),
        lambda: load_settings({}, config_path=none, environ={env: str(value)}),
        lambda: load_settings({}, config_path=cfg, environ={}),
    ]
    for attempt in attempts:
        with pytest.raises(UsageError, match=f"({name}|{env}): must be "):
            attempt()


@pytest.mark.parametrize("name", sorted(commands.PARAMS))
def test_set_allows_exactly_what_flags_allow(tmp_path: Path, name: str) -> None:
    candidates = ["-2", "-1", "0", "0.5", "1", "1.5", "2", "5", "99", "101", "4294967294",
                  "4294967295", "1e9", "nan", "inf", "-inf"]  # fmt: skip
    parse = commands.PARAMS[name].parse
    for text in candidates:
        try:
            value = parse(text)
        except CommandError:
            value = None
        try:
            settings = load_settings({name: text}, config_path=tmp_path / "none", environ={})
            flag_value = getattr(settings, name)
        except UsageError:
            flag_value = None
        assert value == flag_value, (name, text)


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("ctx_size = [1, 2]\n", "ctx_size: [1, 2] is not a whole number"),
        ("threads = { a = 1 }\n", "threads: {'a': 1} is not a whole number"),
        ("ctx_size = 2.5\n", "ctx_size: 2.5 is not a whole number"),
        ("ctx_size = inf\n", "ctx_size: inf is not a whole number"),
        ("temperature = [0.5]\n", "temperature: [0.5] is not a number"),
        ("ctx_size = " + "9" * 5000 + "\n", "config file"),
        ("override_tensor = " + "[" * 5000 + "]" * 5000 + "\n", "nested too deeply"),
        ('system = "a\\u0000b"\n', "system: 'a\\x00b' is not text"),
    ],
)
def test_config_of_the_wrong_shape_is_one_line_naming_the_file(
    tmp_path: Path, text: str, message: str
) -> None:
    cfg = tmp_path / "config.toml"
    cfg.write_text(text)
    with pytest.raises(UsageError, match=re.escape(message)) as info:
        load_settings({}, config_path=cfg, environ={})
    assert str(cfg) in str(info.value) and len(str(info.value)) < 300


def test_non_utf8_config_is_one_line(tmp_path: Path) -> None:
    cfg = tmp_path / "config.toml"
    cfg.write_bytes(b'system = "caf\xe9"\n')
    with pytest.raises(UsageError, match="not UTF-8"):
        load_settings({}, config_path=cfg, environ={})


def test_config_that_is_a_directory_is_one_line(tmp_path: Path) -> None:
    (tmp_path / "dir.toml").mkdir()
    with pytest.raises(UsageError, match=r"config file .* is a directory"):
        load_settings({}, config_path=tmp_path / "dir.toml", environ={})


def test_config_that_is_a_fifo_is_refused_not_waited_on(isolated_home: Path) -> None:
    config = isolated_home / "config" / "config.toml"
    config.parent.mkdir(parents=True)
    os.mkfifo(config)
    r = run_cli("ask", "Hi", "-m", "/nonexistent.gguf", timeout=30)  # reading it would block
    assert r.code == ExitCode.USAGE and "is a FIFO" in r.stderr, r.stderr


def test_flags_out_of_range_fail_before_loading(models) -> None:
    for args in (["-t", "100000"], ["--temperature", "nan"], ["--top-p", "5"], ["--seed", "-5"],
                 ["-b", "99999999999"], ["-ub", "100000000"]):  # fmt: skip
        r = run_cli("ask", "Hi", "-m", str(models.scripted), *args, timeout=60)
        assert r.code == ExitCode.USAGE, (args, r.stderr)
        assert r.stderr.startswith("wizardchat: error: ") and r.stderr.count("\n") == 1, r.stderr


def test_huge_threads_from_the_environment_fails_before_loading(models, monkeypatch) -> None:
    monkeypatch.setenv("WIZARDCHAT_THREADS", "99999999999999")
    r = run_cli("ask", "Hi", "-m", str(models.scripted), timeout=60)
    assert (
        r.code == ExitCode.USAGE
        and "WIZARDCHAT_THREADS: must be 0 (physical cores) to 512" in r.stderr
    )


def test_empty_model_is_a_usage_error_not_the_default() -> None:
    r = run_cli("ask", "Hi", "-m", "", timeout=60)
    assert r.code == ExitCode.USAGE and "model is empty" in r.stderr


@pytest.mark.parametrize(
    ("value", "message"),
    [
        ("a{99999999999}=CPU", "invalid regex"),
        ("a{100000}=CPU", "invalid regex (repeat counts go up to 1000)"),
        ("([", "invalid regex"),
        ("a++=CPU", "invalid regex"),
        ("(?>a)=CPU", "invalid regex"),
    ],
)
def test_bad_override_regex_is_named_as_such(models, value: str, message: str) -> None:
    r = run_cli("ask", "Hi", "-m", str(models.scripted), "-ot", value, timeout=60)
    assert r.code == ExitCode.USAGE and message in r.stderr and "Traceback" not in r.stderr


def test_a_huge_ubatch_is_what_llama_cpp_uses_not_a_fit_problem() -> None:
    from test_planner import Q4_K_M, gpu, make_plan, ram

    base = make_plan(Q4_K_M, [gpu(24)], ram(128), n_ctx=4096, n_ubatch=4096)
    huge = make_plan(Q4_K_M, [gpu(24)], ram(128), n_ctx=4096, n_ubatch=100_000_000)
    assert (huge.fits, huge.n_gpu_layers, huge.n_cpu_moe, huge.n_ctx) == (
        base.fits, base.n_gpu_layers, base.n_cpu_moe, base.n_ctx)  # fmt: skip


def test_a_fit_problem_from_ubatch_names_it() -> None:
    from test_planner import Q4_K_M, gpu, make_plan, ram

    from wizardchat.plan.shapes import FitError

    with pytest.raises(FitError, match="-ub 65536"):
        make_plan(Q4_K_M, [gpu(12)], ram(64), n_ctx=65536, n_ubatch=65536, fixed_ctx=True)


# ------------------------------------------------------------------ invalid UTF-8 in argv / env


def _run_bytes(
    args: list[bytes], env: dict[bytes, bytes] | None = None
) -> subprocess.CompletedProcess[bytes]:
    environ = dict(os.environb)
    environ.update(env or {})
    return subprocess.run([WIZARDCHAT.encode(), *args], env=environ, capture_output=True,
                          stdin=subprocess.DEVNULL, timeout=120)  # fmt: skip


def test_invalid_utf8_in_the_prompt_argument_is_replaced(models) -> None:
    p = _run_bytes([b"ask", b"caf\xe9", b"-m", bytes(models.scripted), b"--verbose-prompt"])
    assert p.returncode == 0, p.stderr
    assert p.stdout.decode() == SCRIPT_REPLY + "\n"
    assert "USER: caf\ufffd ASSISTANT:" in p.stderr.decode()


def test_invalid_utf8_in_system_flag_and_env_is_replaced(models) -> None:
    p = _run_bytes([b"ask", b"Hi", b"-m", bytes(models.scripted), b"--verbose-prompt",
                    b"--system", b"\xff sys"])  # fmt: skip
    assert p.returncode == 0, p.stderr
    assert "\ufffd sys USER: Hi" in p.stderr.decode()
    p = _run_bytes([b"ask", b"Hi", b"-m", bytes(models.scripted), b"--verbose-prompt"],
                   env={b"WIZARDCHAT_SYSTEM": b"env \xe9"})  # fmt: skip
    assert p.returncode == 0, p.stderr
    assert "env \ufffd USER: Hi" in p.stderr.decode()


# ------------------------------------------------------------------ JSONL edge cases


def test_valid_json_python_cannot_take_is_a_line_error_and_the_batch_goes_on(models) -> None:
    lines = [
        '{"prompt": "\\ud800 lone"}',
        '{"prompt": "Hi", "system": "sys \\udfff"}',
        '{"prompt": "Hi", "n": ' + "1" * 5000 + "}",
        '{"prompt": "Hi", "x": ' + "[" * 100_000 + "]" * 100_000 + "}",
        json.dumps({"prompt": "Hello"}),
    ]
    r = run_cli("run", "--jsonl", "-m", str(models.scripted), stdin="\n".join(lines) + "\n")
    out = [json.loads(line) for line in r.stdout.splitlines()]
    assert len(out) == 5, r.stderr
    assert out[0]["prompt"] == "\ufffd lone" and out[0]["reply"] == SCRIPT_REPLY
    assert out[1]["reply"] == SCRIPT_REPLY
    assert out[2]["line"] == 3 and "error" in out[2]
    assert out[3] == {"line": 4, "error": "JSON nested too deeply"}
    assert out[4]["reply"] == SCRIPT_REPLY
    assert r.code == ExitCode.USAGE and "Traceback" not in r.stderr


def test_jsonl_system_longer_than_the_context_is_refused_and_the_previous_kept(models) -> None:
    lines = [json.dumps({"prompt": "Hi", "system": "word " * 400}), json.dumps({"prompt": "Hello"})]
    r = run_cli("run", "--jsonl", "-m", str(models.scripted), "-c", "128", "--verbose-prompt",
                stdin="\n".join(lines) + "\n")  # fmt: skip
    out = [json.loads(line) for line in r.stdout.splitlines()]
    assert "system prompt too long" in out[0]["error"]
    assert out[1]["reply"] == SCRIPT_REPLY
    assert r.code == ExitCode.USAGE


# ------------------------------------------------------------------ batch slash commands


def test_batch_system_alone_shows_it_and_keeps_it(models) -> None:
    r = run_cli("run", "-m", str(models.scripted), "--verbose-prompt",
                stdin="/system Be brief.\n/system\nHi\n")  # fmt: skip
    assert r.code == 0, r.stderr
    assert "system prompt: Be brief." in r.stderr
    assert "Be brief. USER: Hi ASSISTANT:" in r.stderr
    assert r.stdout == SCRIPT_REPLY + "\n\n"


def test_batch_double_slash_sends_text_that_begins_with_a_slash(models) -> None:
    r = run_cli("run", "-m", str(models.scripted), "--verbose-prompt", stdin="//usr/bin is\n")
    assert r.code == 0, r.stderr
    assert "USER: /usr/bin is ASSISTANT:" in r.stderr
    assert r.stdout == SCRIPT_REPLY + "\n\n"


def test_batch_system_longer_than_the_context_is_refused_once(models) -> None:
    stdin = "/system " + "word " * 400 + "\nHi\nHello\n"
    r = run_cli("run", "-m", str(models.scripted), "-c", "128", stdin=stdin)
    assert r.code == ExitCode.USAGE
    assert r.stdout == (SCRIPT_REPLY + "\n\n") * 2
    errors = [line for line in r.stderr.splitlines() if "error" in line or "line " in line]
    assert len(errors) == 1 and "line 1: system prompt too long" in errors[0], r.stderr


# ------------------------------------------------------------------ unbounded reads


def test_endless_stdin_to_ask_ends_with_exit_6(models) -> None:
    yes = subprocess.Popen(["yes"], stdout=subprocess.PIPE)
    try:
        start = time.monotonic()
        p = subprocess.run([WIZARDCHAT, "ask", "-m", str(models.scripted)], stdin=yes.stdout,
                           capture_output=True, timeout=60)  # fmt: skip
    finally:
        yes.kill()
        yes.wait()
    assert p.returncode == ExitCode.CONTEXT, p.stderr
    assert b"input too long" in p.stderr and time.monotonic() - start < 30


def test_stdin_too_long_for_the_context_is_refused_before_tokenizing(models) -> None:
    r = run_cli("ask", "-m", str(models.scripted), "-c", "128", stdin="y\n" * 1_000_000)
    assert r.code == ExitCode.CONTEXT and "input too long for the context" in r.stderr


@pytest.mark.parametrize("kind", ["fifo", "dir"])
def test_model_that_is_not_a_regular_file(tmp_path: Path, kind: str) -> None:
    path = tmp_path / "model.gguf"
    if kind == "fifo":
        os.mkfifo(path)
    else:
        path.mkdir()
    for command in ("ask", "doctor"):
        r = run_cli(command, *(["Hi"] if command == "ask" else []), "-m", str(path), timeout=30)
        assert r.code == ExitCode.BAD_MODEL, (command, r.stderr)
        assert ("is a FIFO" if kind == "fifo" else "is a directory") in r.stderr
        assert r.stderr.count("\n") == 1


def test_read_refuses_fifos_devices_directories_and_files_too_big(models, tmp_path: Path) -> None:
    os.mkfifo(tmp_path / "pipe")
    (tmp_path / "big.txt").write_text("word " * 20000)
    child = pexpect.spawn(WIZARDCHAT, ["run", "-m", str(models.scripted), "-c", "128"],
                          env={**os.environ, "TERM": "dumb"}, encoding="utf-8",
                          dimensions=(30, 200), timeout=30, cwd=str(tmp_path))  # fmt: skip
    try:
        child.expect(">>> ")
        refusals = [("pipe", "is a FIFO"), ("/dev/zero", "is a device"), (".", "is a directory"),
                    ("big.txt", "too big for the context")]  # fmt: skip
        for arg, message in refusals:
            child.sendline(f"/read {arg}")
            child.expect(message)
            child.expect(">>> ")
        child.sendline("Hi")
        child.expect("Hello, world!")
        child.expect(">>> ")
    finally:
        child.sendcontrol("d")
        child.expect(pexpect.EOF)
        child.close()


# ------------------------------------------------------------------ closed or full outputs


def _shell(cmd: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(["bash", "-c", cmd], capture_output=True, text=True, timeout=120,
                          stdin=subprocess.DEVNULL)  # fmt: skip


def test_closed_stdout_is_one_line_and_exit_9_before_loading(models) -> None:
    p = _shell(f"'{WIZARDCHAT}' ask Hi -m '{models.scripted}' >&-")
    assert p.returncode == ExitCode.OUTPUT, p.stderr
    assert p.stderr == "wizardchat: error: cannot write output: stdout is closed\n"


def test_full_stdout_is_one_line_and_exit_9(models) -> None:
    p = _shell(f"'{WIZARDCHAT}' ask Hi -m '{models.scripted}' >/dev/full")
    assert p.returncode == ExitCode.OUTPUT, p.stderr
    assert p.stderr == "wizardchat: error: cannot write output: No space left on device\n"


def test_help_and_version_into_a_closed_stdout(models) -> None:
    for args in ("--help", "--version", "ask --help"):
        p = _shell(f"'{WIZARDCHAT}' {args} >&-")
        assert p.returncode == ExitCode.OUTPUT and "Traceback" not in p.stderr, (args, p.stderr)


def test_closed_stderr_does_not_stop_the_reply(models) -> None:
    p = _shell(f"'{WIZARDCHAT}' ask Hi -m '{models.scripted}' 2>&-")
    assert (p.returncode, p.stdout) == (0, SCRIPT_REPLY + "\n")
    p = _shell(f"'{WIZARDCHAT}' ask Hi -m /nonexistent.gguf 2>&-")
    assert p.returncode == ExitCode.NO_MODEL


def test_full_stderr_keeps_the_exit_code_and_the_reply(models) -> None:
    p = _shell(f"'{WIZARDCHAT}' ask Hi -m /nonexistent.gguf 2>/dev/full")
    assert p.returncode == ExitCode.NO_MODEL  # the error line is lost, not the exit code
    p = _shell(f"'{WIZARDCHAT}' ask Hi -m '{models.scripted}' -c 300 2>/dev/full")
    assert (p.returncode, p.stdout) == (0, SCRIPT_REPLY + "\n")  # its "rounded up" note failed


def test_endless_line_to_batch_ends_it_with_exit_6(models) -> None:
    # ulimit: should the bound ever break, fail with MemoryError instead of filling the machine
    p = _shell(f"ulimit -v 8000000; (echo Hi; cat /dev/zero) | '{WIZARDCHAT}' run "
               f"-m '{models.scripted}'")  # fmt: skip
    assert p.returncode == ExitCode.CONTEXT, p.stderr
    assert p.stdout == SCRIPT_REPLY + "\n\n"
    assert p.stderr == (
        "wizardchat: error: line 2: over 16 MiB without a newline; the batch stops here\n"
    )


def test_batch_message_too_long_is_refused_before_tokenizing(models) -> None:
    lines = [
        "y " * 500_000,
        "Hi",
        json.dumps({"prompt": "y " * 500_000}),
        json.dumps({"prompt": "Hi"}),
    ]
    r = run_cli("run", "-m", str(models.scripted), "-c", "128", stdin="\n".join(lines[:2]) + "\n")
    assert r.code == ExitCode.USAGE and r.stdout == SCRIPT_REPLY + "\n\n"
    assert "line 1: message too long: 1000000 characters cannot fit in the " in r.stderr
    r = run_cli("run", "--jsonl", "-m", str(models.scripted), "-c", "128",
                stdin="\n".join(lines[2:]) + "\n")  # fmt: skip
    out = [json.loads(line) for line in r.stdout.splitlines()]
    assert "prompt too long: 1000000 characters cannot fit" in out[0]["error"]
    assert out[1]["reply"] == SCRIPT_REPLY


def test_rpc_worker_threads_are_bounded_too() -> None:
    r = run_cli("rpc-worker", "-t", "100000", timeout=30)
    assert r.code == ExitCode.USAGE and "-t/--threads: must be 0 to 512, not 100000" in r.stderr
