"""`wizardchat serve`: a resident model that ask, run and batch mode use without loading.

Real processes throughout: the server is `wizardchat serve` on a generated model, its clients
are `wizardchat ask` and `run` (piped and in a pty), talking over the Unix socket.
"""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pexpect
import pytest
from conftest import WIZARDCHAT, Models, run_cli, run_process
from test_repl import Chat, clean

from wizardchat.serve import registry
from wizardchat.serve.client import call

pytestmark = pytest.mark.real_process

GREEDY = ("--temp", "0", "--seed", "1")


class Server:
    """A `wizardchat serve` process, its registry entry, and its stderr."""

    def __init__(self, model: Path, *args: str, log: Path) -> None:
        self.log = log
        self.proc = subprocess.Popen(
            [WIZARDCHAT, "serve", "-m", str(model), *args],
            stdin=subprocess.DEVNULL,
            stdout=subprocess.DEVNULL,
            stderr=log.open("wb"),
            env=os.environ.copy(),
        )
        deadline = time.monotonic() + 120
        while True:
            found = [e for e in registry.entries() if e.pid == self.proc.pid]
            if found:
                self.entry = found[0]
                break
            assert self.proc.poll() is None, self.stderr()
            assert time.monotonic() < deadline, self.stderr()
            time.sleep(0.05)

    @property
    def pid(self) -> int:
        return self.proc.pid

    def status(self) -> dict[str, Any]:
        status = call(self.entry, "status")
        assert isinstance(status, dict)
        return status

    def stderr(self) -> str:
        return self.log.read_text(encoding="utf-8", errors="replace")

    def wait(self, timeout: float = 30) -> int:
        return self.proc.wait(timeout)

    def kill(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait(10)


@pytest.fixture
def servers(tmp_path: Path) -> Iterator[Any]:
    started: list[Server] = []

    def start(model: Path, *args: str) -> Server:
        server = Server(model, *args, log=tmp_path / f"serve-{len(started)}.log")
        started.append(server)
        return server

    yield start
    for server in started:
        server.kill()


def wait_busy(server: Server) -> None:
    """Until a reply holds the server's model, and a little longer (tokens flowing)."""
    deadline = time.monotonic() + 60
    while not server.status()["busy"]:
        assert time.monotonic() < deadline
        time.sleep(0.02)
    time.sleep(0.3)


def ask(*args: str, timeout: float = 120) -> Any:
    return run_cli("ask", *args, timeout=timeout)


# --- ask, batch and sessions through the server ------------------------------------------------


def test_ask_through_the_server_replies_as_in_process_and_loads_nothing(
    models: Models, servers: Any
) -> None:
    flags = ("-m", str(models.random), "-n", "24", *GREEDY)
    alone = ask("Hi there", *flags, "--no-server")
    assert alone.code == 0 and "using wizardchat serve" not in alone.stderr
    server = servers(models.random)
    through = ask("Hi there", *flags)
    assert through.code == 0, through.stderr
    assert through.stdout == alone.stdout
    assert f"using wizardchat serve (pid {server.pid})" in through.stderr
    again = ask("Hi there", *flags)
    assert again.stdout == alone.stdout
    status = server.status()
    assert status["load_count"] == 1 and status["replies"] == 2  # loaded once, at start


def test_a_client_asking_other_load_options_is_told_and_uses_the_server(
    models: Models, servers: Any
) -> None:
    server = servers(models.scripted, "-c", "2048")
    r = ask("Hi", "-m", str(models.scripted), "-c", "1024")
    assert r.code == 0
    assert f"using wizardchat serve (pid {server.pid}); it was started with -c 2048 (not 1024)" in (
        r.stderr
    )
    assert "--no-server" in r.stderr


def test_batch_and_a_session_resume_through_the_server_with_its_kv_state(
    models: Models, servers: Any, isolated_home: Path
) -> None:
    flags = ("-m", str(models.random), "-n", "16", *GREEDY)
    lines = "one\ntwo\nthree\n"
    alone = run_cli("run", *flags, "--no-server", stdin=lines)
    assert alone.code == 0
    servers(models.random)
    batch = run_cli("run", *flags, "--session", "b", stdin=lines)
    assert batch.code == 0, batch.stderr
    assert batch.stdout == alone.stdout  # three replies, the same as in-process
    assert "saved as 'b'" in batch.stderr
    more = run_cli("run", *flags, "--session", "b", stdin="four\n")
    assert more.code == 0, more.stderr
    restored = re.search(r"restored ([\d,]+) tokens", more.stderr)
    assert restored, more.stderr  # the state the server saved, loaded back on the server
    saved = json.loads((isolated_home / "data" / "sessions" / "b.json").read_text())
    assert [t["user"] for t in saved["turns"]] == ["one", "two", "three", "four"]


def test_no_server_and_server_pid_choose(models: Models, servers: Any) -> None:
    server = servers(models.scripted)
    local = ask("Hi", "-m", str(models.scripted), "--no-server")
    assert local.code == 0 and "using wizardchat serve" not in local.stderr
    picked = ask("Hi", "-m", str(models.scripted), "--server", str(server.pid))
    assert picked.code == 0 and f"(pid {server.pid})" in picked.stderr
    missing = ask("Hi", "-m", str(models.scripted), "--server", "999999")
    assert missing.code == 10
    assert missing.stderr.strip().splitlines()[-1] == (
        "wizardchat: error: no wizardchat serve runs as 999999 (wizardchat ps lists them)"
    )


# --- the REPL through the server ----------------------------------------------------------------


def test_the_repl_through_the_server_stops_on_ctrl_c_regenerates_and_shows_stats(
    models: Models, servers: Any
) -> None:
    server = servers(models.slow, "-c", "8192")
    chat = Chat("-m", str(models.slow), "-n", "100000", "--seed", "3")
    try:
        assert f"using wizardchat serve (pid {server.pid})" in chat.banner
        chat.child.send("tell me everything\r")
        chat.expect("everything")
        chat.expect(r"[^\s\x1b]{20}")  # the reply is streaming
        chat.child.sendcontrol("c")
        out = clean(chat.wait_prompt())
        assert "[interrupted]" in out and "Traceback" not in out
        deadline = time.monotonic() + 10  # the server stopped generating, not only the client
        while server.status()["busy"]:
            assert time.monotonic() < deadline
            time.sleep(0.05)
        chat.send("/set max_tokens 5")
        out = chat.send("/regen")
        assert "5 tokens · " in out
        stats = chat.send("/stats")
        assert re.search(r"\d+ evaluated", stats), stats
        assert chat.exit() == 0
    finally:
        chat.kill()


# --- several clients ------------------------------------------------------------------------------


def test_two_clients_at_once_are_both_answered_and_the_second_waits(
    models: Models, servers: Any, tmp_path: Path
) -> None:
    server = servers(models.slow, "-c", "4096")
    flags = ("-m", str(models.slow), *GREEDY)
    expected = {
        n: ask(f"story {n}", *flags, "-n", str(n), "--no-server").stdout for n in (3000, 20)
    }
    results: dict[int, Any] = {}

    def client(n: int) -> None:
        results[n] = ask(f"story {n}", *flags, "-n", str(n))

    first = threading.Thread(target=client, args=(3000,))
    first.start()
    deadline = time.monotonic() + 60
    while not server.status()["busy"]:  # the long reply holds the model
        assert time.monotonic() < deadline and first.is_alive()
        time.sleep(0.02)
    client(20)
    first.join(120)
    assert results[3000].code == 0 and results[20].code == 0
    assert results[3000].stdout == expected[3000]
    assert results[20].stdout == expected[20]
    assert "waiting for another reply…" in results[20].stderr
    assert "waiting" not in results[3000].stderr


# --- keep-alive, ps, stop, stale entries ----------------------------------------------------------


def test_keep_alive_unloads_when_idle_and_the_next_request_loads_again(
    models: Models, servers: Any
) -> None:
    server = servers(models.scripted, "--keep-alive", "1s")
    deadline = time.monotonic() + 30
    while server.status()["loaded"]:
        assert time.monotonic() < deadline
        time.sleep(0.1)
    listed = run_cli("ps")
    assert re.search(rf"^{server.pid}\s+scripted\.gguf\s+unloaded\s", listed.stdout, re.M)
    r = ask("Hi", "-m", str(models.scripted))
    assert r.code == 0 and r.stdout == "Hello, world! €5\n"
    assert "is loading the model…" in r.stderr
    assert server.status()["load_count"] == 2
    assert "unloaded the model after 1 s idle" in server.stderr()


def test_keep_alive_takes_durations_and_refuses_nonsense(models: Models) -> None:
    r = run_cli("serve", "-m", str(models.scripted), "--keep-alive", "soon")
    assert r.code == 2
    assert "--keep-alive: 'soon' is not a duration" in r.stderr


def test_ps_lists_and_stop_ends_a_server_cleanly(models: Models, servers: Any) -> None:
    assert "no wizardchat serve is running" in run_cli("ps").stderr
    server = servers(models.scripted)
    listed = run_cli("ps")
    assert listed.code == 0
    header, row = listed.stdout.splitlines()
    assert header.split() == ["PID", "MODEL", "STATE", "MEMORY", "IDLE", "WAITING", "REPLIES",
                              "HTTP", "SOCKET"]  # fmt: skip
    assert row.split()[:3] == [str(server.pid), "scripted.gguf", "loaded"]
    assert row.split()[-2:] == ["-", server.entry.socket]  # no --http
    socket_path = Path(server.entry.socket)
    assert socket_path.exists() and (socket_path.stat().st_mode & 0o777) == 0o600
    stopped = run_cli("stop", str(server.pid))
    assert stopped.code == 0
    assert f"stopped wizardchat serve (pid {server.pid}, scripted.gguf)" in stopped.stderr
    assert server.wait() == 0
    assert not socket_path.exists() and registry.entries() == []
    none = run_cli("stop")
    assert none.code == 10 and "no wizardchat serve runs" in none.stderr


def test_a_stale_entry_is_ignored_and_removed(models: Models) -> None:
    dead = subprocess.Popen(["true"])
    dead.wait()
    stale = registry.new_entry(dead.pid, models.scripted, {})
    registry.register(stale)
    Path(stale.socket).touch()
    r = ask("Hi", "-m", str(models.scripted))
    assert r.code == 0 and "using wizardchat serve" not in r.stderr
    assert registry.entries() == []
    assert not Path(stale.socket).exists()


# --- faults ---------------------------------------------------------------------------------------


def test_the_server_killed_mid_reply_ends_the_client_with_one_line_and_keeps_the_turns(
    models: Models, servers: Any, isolated_home: Path
) -> None:
    server = servers(models.slow, "-c", "8192")
    env = os.environ.copy()
    client = subprocess.Popen(
        [WIZARDCHAT, "run", "-m", str(models.slow), "--session", "k", "-n", "100000"],
        stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE, env=env,
    )  # fmt: skip
    assert client.stdin is not None and client.stdout is not None
    client.stdin.write(b"first\n")
    client.stdin.flush()
    wait_busy(server)  # the reply streams (100000 tokens): kill the server in the middle
    server.proc.send_signal(signal.SIGKILL)
    server.proc.wait(10)
    _out, err = client.communicate(timeout=60)
    assert client.returncode == 10, err
    lines = [line for line in err.decode().splitlines() if line.startswith("wizardchat: error")]
    assert lines == [f"wizardchat: error: wizardchat serve (pid {server.pid}) stopped during the "
                     "reply"], err.decode()  # fmt: skip
    assert "Traceback" not in err.decode()
    saved = json.loads((isolated_home / "data" / "sessions" / "k.json").read_text())
    assert [t["user"] for t in saved["turns"]] == ["first"]  # the message is kept
    assert saved["turns"][0]["interrupted"] is True


def test_a_client_killed_mid_reply_does_not_wedge_the_server(models: Models, servers: Any) -> None:
    server = servers(models.slow, "-c", "8192")
    client = subprocess.Popen(
        [WIZARDCHAT, "ask", "go on and on", "-m", str(models.slow), "-n", "100000"],
        stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL,
        env=os.environ.copy(),
    )  # fmt: skip
    assert client.stdout is not None
    wait_busy(server)
    client.kill()
    client.wait(10)
    started = time.monotonic()
    r = ask("Hi", "-m", str(models.slow), "-n", "5")
    assert r.code == 0 and "waiting" not in r.stderr
    assert time.monotonic() - started < 30
    assert server.status()["busy"] is False


def test_sigterm_on_the_server_ends_the_reply_and_removes_its_socket(
    models: Models, servers: Any
) -> None:
    server = servers(models.slow, "-c", "8192")
    client = subprocess.Popen(
        [WIZARDCHAT, "ask", "go on and on", "-m", str(models.slow), "-n", "100000"],
        stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
        env=os.environ.copy(),
    )  # fmt: skip
    assert client.stdout is not None
    client.stdout.read(1)  # the reply is streaming
    server.proc.send_signal(signal.SIGTERM)
    assert server.wait() == 0
    _out, err = client.communicate(timeout=30)
    assert client.returncode == 0, err  # the reply ended, marked, as a Ctrl-C would end it
    assert "[interrupted]" in err.decode()
    assert f"wizardchat serve (pid {server.pid}) is stopping: the reply ends here" in err.decode()
    assert not Path(server.entry.socket).exists() and registry.entries() == []


def test_two_conversations_taking_turns_evaluate_only_their_new_messages(
    models: Models, servers: Any
) -> None:
    server = servers(models.scripted, "-c", "4096")
    flags = ("-m", str(models.scripted), "--json", "--kv-cache-max-gb", "0")  # no saved states

    def turn(name: str, text: str) -> int:
        r = ask(text, *flags, "--session", name)
        assert r.code == 0, r.stderr
        return int(json.loads(r.stdout)["evaluated_tokens"])

    assert turn("a", "alpha " * 300) > 300
    assert turn("b", "beta " * 300) > 300
    assert turn("a", "more") <= 12  # the new message, the last reply's end: not the history
    assert turn("b", "more") <= 12
    status = server.status()
    assert status["switches"] == 2 and status["kept_conversations"] >= 1


def test_without_the_conversation_cache_each_turn_evaluates_its_history(
    models: Models, servers: Any
) -> None:
    servers(models.scripted, "-c", "4096", "--conversation-cache-gb", "0")
    flags = ("-m", str(models.scripted), "--json", "--kv-cache-max-gb", "0")
    evaluated = []
    for name, text in (("a", "alpha " * 300), ("b", "beta " * 300), ("a", "more")):
        r = ask(text, *flags, "--session", name)
        evaluated.append(int(json.loads(r.stdout)["evaluated_tokens"]))
    assert evaluated[2] > 300  # what the cache copies save


def test_the_repl_ends_with_one_line_when_its_server_dies_mid_reply(
    models: Models, servers: Any, isolated_home: Path
) -> None:
    server = servers(models.slow, "-c", "8192")
    chat = Chat("-m", str(models.slow), "-n", "100000", "--session", "r")
    try:
        chat.child.send("tell me everything\r")
        chat.expect("everything")
        chat.expect(r"[^\s\x1b]{20}")  # the reply is streaming
        server.proc.kill()
        server.proc.wait(10)
        chat.expect(r"wizardchat: error: wizardchat serve \(pid \d+\) stopped during the reply")
        chat.child.expect(pexpect.EOF)
        chat.child.close()
        assert chat.child.exitstatus == 10
        assert "Traceback" not in str(chat.child.before)
        saved = json.loads((isolated_home / "data" / "sessions" / "r.json").read_text())
        assert [t["user"] for t in saved["turns"]] == ["tell me everything"]
    finally:
        chat.kill()


def test_a_second_server_of_the_same_model_is_refused(models: Models, servers: Any) -> None:
    server = servers(models.scripted)
    r = run_cli("serve", "-m", str(models.scripted))
    assert r.code == 10
    assert r.stderr == (
        f"wizardchat: error: wizardchat serve (pid {server.pid}) already serves scripted.gguf "
        f"(wizardchat stop {server.pid} ends it)\n"
    )


def test_ps_without_xdg_runtime_dir_prints_no_library_warning(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # No WIZARDCHAT_HOME and no XDG_RUNTIME_DIR (ssh sessions, containers, cron): platformdirs
    # falls back to a directory of its own and warns about it; the user asked for a list.
    monkeypatch.delenv("WIZARDCHAT_HOME")
    monkeypatch.delenv("XDG_RUNTIME_DIR", raising=False)
    for key in ("HOME", "XDG_DATA_HOME", "XDG_CONFIG_HOME", "XDG_CACHE_HOME", "XDG_STATE_HOME"):
        monkeypatch.setenv(key, str(tmp_path / "user"))
    listed = run_process("ps")
    assert listed.code == 0
    assert listed.stderr.strip() == (
        "no wizardchat serve is running (wizardchat serve -m FILE.gguf starts one)"
    )
