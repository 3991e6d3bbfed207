"""What `ask` and batch `run` do before the model loads: typer builds only the command that
runs, and modules only some runs need (sessions, servers, terminals, the hub) stay unimported.

benchmarks/startup.py measures the phases; these tests keep the work away.
"""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
from conftest import Models, run_cli
from gguf_models import SCRIPT_REPLY

from wizardchat.cli import usage
from wizardchat.errors import ExitCode

# Needed only by a named session, a running server, a terminal, --json, a hub reference or a
# config file: none of which the runs below have.
NOT_NEEDED = {
    "wizardchat.chat.store",
    "wizardchat.chat.claims",
    "wizardchat.chat.recording",
    "wizardchat.chat.kv_cache",
    "wizardchat.chat.kv_store",
    "wizardchat.chat.batch",
    "wizardchat.serve.client",
    "wizardchat.endpoint.engine",
    "wizardchat.hub.download",
    "wizardchat.hub.resolve",
    "wizardchat.tui.progress",
    "wizardchat.tui.markdown_stream",
    "rich",
    "prompt_toolkit",
    "huggingface_hub",
    "pydantic",
    "tomllib",
}


def imported_by(*args: str, stdin: bytes = b"") -> set[str]:
    """The modules a real `wizardchat ARGS` imported, stdout and stderr pipes, in a subprocess."""
    script = (
        "import sys\n"
        "from wizardchat.entry import main\n"
        "try:\n"
        f"    main({list(args)!r})\n"
        "except SystemExit as e:\n"
        "    print('exit', e.code, file=sys.stderr)\n"
        "print('MODULES', *sorted(sys.modules), file=sys.stderr)\n"
    )
    proc = subprocess.run([sys.executable, "-c", script], input=stdin, capture_output=True,
                          timeout=120)  # fmt: skip
    lines = proc.stderr.decode().splitlines()
    assert lines[-2] == "exit 0", proc.stderr.decode()[-2000:]
    assert SCRIPT_REPLY in proc.stdout.decode()
    return set(lines[-1].split()[1:])


def test_ask_with_a_model_file_imports_only_what_it_uses(models: Models) -> None:
    imported = imported_by("ask", "Hi", "-m", str(models.scripted), "-c", "512", "--temp", "0")
    assert "wizardchat.engine.llama_engine" in imported  # the check saw a real load
    assert imported & NOT_NEEDED == set()


def test_batch_mode_without_a_session_imports_only_what_it_uses(models: Models) -> None:
    imported = imported_by("run", "-m", str(models.scripted), "-c", "512", stdin=b"Hi\n")
    assert "wizardchat.engine.llama_engine" in imported
    # chat/batch.py itself imports the recording (and with it the store and its claims).
    in_batch = {"wizardchat.chat.batch", "wizardchat.chat.recording", "wizardchat.chat.store",
                "wizardchat.chat.claims"}  # fmt: skip
    assert imported & (NOT_NEEDED - in_batch) == set()


@pytest.mark.parametrize(
    ("args", "built"),
    [
        (("ask", "Hi", "-m", "MODEL"), ["ask"]),
        (("--debug", "ask", "Hi", "-m", "MODEL"), ["ask"]),
        (("run", "-m", "MODEL"), ["run"]),
        (("models",), ["models"]),
        (("sessions",), ["rm"]),  # the group's one command
        (("sessions", "rm", "nothing"), ["rm"]),
    ],
)
def test_a_run_builds_only_the_command_it_runs(
    args: tuple[str, ...], built: list[str], models: Models, monkeypatch: pytest.MonkeyPatch
) -> None:
    # typer builds every command it knows on every run (options, types, help): ~3 ms each.
    names: list[str | None] = []
    build = usage.Command.__init__

    def counting(self: usage.Command, *a: Any, **kw: Any) -> None:
        build(self, *a, **kw)
        names.append(self.name)

    monkeypatch.setattr(usage.Command, "__init__", counting)
    run_cli(*(str(models.scripted) if a == "MODEL" else a for a in args), stdin="Hi\n")
    assert names == built


# A console run whose object `kept` says when Python's teardown frees it, and whose atexit
# handler says when it runs; SLOW_THREAD starts a thread that ends after the command.
CONSOLE_RUN = """
import atexit, os, sys, threading, time
import wizardchat.cli.app as app
class Teardown:
    def __del__(self, write=os.write):  # os itself may be gone by then
        write(2, b"teardown\\n")
kept = Teardown()
atexit.register(lambda: print("atexit", file=sys.stderr, flush=True))
command_over = threading.Event()
def command(argv):
    try:
        app_main(argv)
    finally:
        command_over.set()
app_main, app.main = app.main, command
def slow():
    command_over.wait()
    time.sleep(0.5)
    print("thread done", file=sys.stderr, flush=True)
if SLOW_THREAD:
    threading.Thread(target=slow).start()
sys.argv = ["wizardchat", *ARGS]
from wizardchat.entry import main
main()
"""


def console_run(*args: str, slow_thread: bool = False) -> subprocess.CompletedProcess[str]:
    script = f"SLOW_THREAD = {slow_thread}\nARGS = {list(args)!r}\n" + CONSOLE_RUN
    return subprocess.run([sys.executable, "-c", script], capture_output=True, text=True,
                          timeout=120, stdin=subprocess.DEVNULL)  # fmt: skip


def test_the_process_ends_after_the_command_without_python_teardown(
    models: Models, tmp_path: Path
) -> None:
    # Freeing every module's objects one by one (llama_cpp, numpy, typer) took 0.1-0.2 s after
    # the reply was out; atexit handlers (session claims, logging) still run.
    proc = console_run("ask", "Hi", "-m", str(models.scripted), "-c", "512")
    assert (proc.returncode, proc.stdout) == (0, SCRIPT_REPLY + "\n"), proc.stderr
    assert proc.stderr.splitlines()[-1:] == ["atexit"]
    assert "teardown" not in proc.stderr
    missing = console_run("ask", "Hi", "-m", str(tmp_path / "missing.gguf"))
    assert missing.returncode == ExitCode.NO_MODEL
    assert missing.stderr.splitlines() == [
        f"wizardchat: error: model file not found: {tmp_path / 'missing.gguf'}",
        "atexit",
    ]


def test_a_thread_still_running_after_the_command_is_waited_for(models: Models) -> None:
    proc = console_run("ask", "Hi", "-m", str(models.scripted), "-c", "512", slow_thread=True)
    assert (proc.returncode, proc.stdout) == (0, SCRIPT_REPLY + "\n"), proc.stderr
    # Python's own exit then: it waits for the thread, runs atexit, tears down.
    assert proc.stderr.splitlines()[-3:] == ["thread done", "atexit", "teardown"]
