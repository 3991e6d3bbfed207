"""RPC workers and clients on 127.0.0.1: endpoint parsing, refusals, and a model split over two
real workers that generates the same tokens as a local run.

Registering RPC devices is global to a process, so every client that does it runs in a child
process; the test process only parses, checks endpoints and talks to fake servers.
"""

from __future__ import annotations

import contextlib
import json
import re
import signal
import socket
import struct
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
from conftest import WIZARDCHAT, Models, run_cli

from wizardchat import rpc_endpoints
from wizardchat.engine import ggml, rpc
from wizardchat.errors import LoadError, UsageError

READY_TIMEOUT = 20.0  # a worker imports llama_cpp and starts listening in ~1 s
STOP_TIMEOUT = 5.0

requires_rpc = pytest.mark.skipif("RPC" not in ggml.backends(), reason=rpc.REBUILD_HINT)
# Registering RPC devices is process-wide, and a failing worker makes llama.cpp abort the process:
# the CLI tests that reach a worker spawn wizardchat.
real_process = pytest.mark.real_process


def free_port() -> int:
    """A loopback port nothing listens on (the OS's pick; free for a moment)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def refused(port: int) -> bool:
    """Whether nothing listens on 127.0.0.1:port."""
    try:
        socket.create_connection(("127.0.0.1", port), timeout=1).close()
    except ConnectionRefusedError:
        return True
    return False


# --- real workers -------------------------------------------------------------------------------


def start_worker(port: int) -> subprocess.Popen[str]:
    """Start an RPC worker on 127.0.0.1:port (one thread: the test machine may have two cores)."""
    return subprocess.Popen(
        [WIZARDCHAT, "rpc-worker", "--port", str(port), "--threads", "1"],
        stdin=subprocess.DEVNULL,
        stdout=subprocess.DEVNULL,  # llama.cpp's "Accepted client connection" lines
        stderr=subprocess.PIPE,
        text=True,
    )


def wait_ready(proc: subprocess.Popen[str], timeout: float = READY_TIMEOUT) -> list[str]:
    """Wait for the worker's announce line; returns its stderr lines, still being collected."""
    lines: list[str] = []
    ready = threading.Event()

    def drain() -> None:  # keeps reading so that the pipe never fills up
        assert proc.stderr is not None
        for line in proc.stderr:
            lines.append(line)
            if "listening on" in line:
                ready.set()
        ready.set()  # EOF: the worker ended

    threading.Thread(target=drain, daemon=True).start()
    if not ready.wait(timeout) or proc.poll() is not None:
        stop_worker(proc)
        pytest.fail(f"RPC worker did not start within {timeout} s:\n{''.join(lines)}")
    return lines


def stop_worker(proc: subprocess.Popen[str]) -> None:
    """Terminate, then kill if it has not ended in time."""
    if proc.poll() is None:
        proc.terminate()
        try:
            proc.wait(STOP_TIMEOUT)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(STOP_TIMEOUT)


@pytest.fixture(scope="module")
def workers() -> Iterator[list[str]]:
    """Two RPC workers on loopback; yields their endpoints."""
    procs: list[subprocess.Popen[str]] = []
    endpoints = []
    try:
        for _ in range(2):
            port = free_port()
            procs.append(start_worker(port))
            endpoints.append(f"127.0.0.1:{port}")
        for proc in procs:
            wait_ready(proc)
        yield endpoints
    finally:
        for proc in procs:
            stop_worker(proc)


CLIENT = """
import io, json, sys, threading
from pathlib import Path
from wizardchat.settings import load_settings

model, endpoints = sys.argv[1], [e for e in sys.argv[2].split(",") if e]
out = {}
if endpoints:
    from wizardchat.engine import ggml, rpc
    out["added"] = rpc.add_servers(endpoints)
    out["again"] = rpc.add_servers(endpoints)
    out["devices"] = [[d.name, d.description, d.kind] for d in ggml.devices()]
from wizardchat.engine.llama_engine import LlamaEngine
values = {"model": model, "ctx_size": 512, "threads": 1, "seed": 1, "n_gpu_layers": 99,
          "temperature": 0}
settings = load_settings(values, config_path=Path("/nonexistent"), environ={})
log = io.StringIO()
engine = LlamaEngine(settings, progress=None, log=log)
stream = engine.stream(engine.tokenize("Hello world"), 16, threading.Event())
out["tokens"] = [token for token, _ in stream]
out["show"] = dict(engine.describe())
engine.close()
out["log"] = log.getvalue()
print(json.dumps(out))
"""


def run_client(model: Path, endpoints: list[str]) -> dict[str, object]:
    """Load `model` in a child process (with the workers' devices added, if any) and generate."""
    proc = subprocess.run(
        [sys.executable, "-c", CLIENT, str(model), ",".join(endpoints)],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    result: dict[str, object] = json.loads(proc.stdout.splitlines()[-1])
    return result


@requires_rpc
def test_model_split_over_two_workers_generates_the_local_tokens(
    models: Models, workers: list[str]
) -> None:
    remote = run_client(models.random, workers)
    local = run_client(models.random, [])

    assert remote["added"] == ["RPC0", "RPC1"]
    assert remote["again"] == ["RPC0", "RPC1"]  # idempotent: no second registration
    assert ["RPC0", workers[0], "GPU"] in remote["devices"]  # type: ignore[operator]
    assert ["RPC1", workers[1], "GPU"] in remote["devices"]  # type: ignore[operator]
    log = str(remote["log"])
    assert f"using device RPC0 ({workers[0]})" in log
    assert f"using device RPC1 ({workers[1]})" in log
    assert "layer   0 assigned to device RPC0" in log
    assert "assigned to device RPC1" in log
    assert "offloaded 3/3 layers to GPU" in log
    # Buffer names carry the device index on the worker (0 on each) and the endpoint.
    assert f"RPC0[{workers[0]}] model buffer size" in log
    assert f"RPC0[{workers[1]}] model buffer size" in log
    assert f"RPC0[{workers[0]}] KV buffer size" in log
    assert "RPC" not in str(local["log"])
    offload = remote["show"]["GPU offload"]  # type: ignore[index]
    assert f"RPC0 (RPC worker {workers[0]})" in offload and "CPU" not in offload, offload

    tokens = remote["tokens"]
    assert isinstance(tokens, list) and len(tokens) == 16
    assert len(set(tokens)) > 1  # random weights: not one token repeated
    assert tokens == local["tokens"]


@real_process
@requires_rpc
def test_a_session_on_rpc_workers_saves_and_restores_its_kv_state(
    models: Models, workers: list[str], isolated_home: Path
) -> None:
    """The state API reads the KV cache from the workers and writes it back there."""
    prompts = ["Hello world", "Tell me more", "And then?"]
    lines = [json.dumps({"prompt": p}) + "\n" for p in prompts]
    common = ("run", "--jsonl", "-m", str(models.random), "-c", "512", "-t", "1",
              "--temperature", "0", "-n", "16")  # fmt: skip
    remote = ("--rpc", ",".join(workers))
    first = run_cli(*common, *remote, "--session", "r", stdin="".join(lines[:2]))
    assert first.code == 0, first.stderr[-2000:]
    assert (isolated_home / "data" / "kv" / "r.kv.json").is_file()

    resumed = run_cli(*common, *remote, "--session", "r", stdin=lines[2])
    assert resumed.code == 0, resumed.stderr[-2000:]
    assert re.search(r"^restored [\d,]+ tokens in \d+\.\d s$", resumed.stderr, re.M), resumed.stderr
    third = json.loads(resumed.stdout)
    assert third["evaluated_tokens"] < 20  # the new message, not the history

    local = run_cli(*common, stdin="".join(lines))  # one process, no workers, never stopped
    assert local.code == 0, local.stderr
    assert third["reply"] == json.loads(local.stdout.splitlines()[2])["reply"]


@real_process
@requires_rpc
def test_ask_with_rpc_places_layers_on_the_workers_and_answers_as_locally(
    models: Models, workers: list[str]
) -> None:
    common = ("-m", str(models.random), "-c", "512", "-t", "1", "--temperature", "0", "-n", "16")
    remote = run_cli("ask", "Hello world", *common, "--rpc", ",".join(workers), "--verbose")
    assert remote.code == 0, remote.stderr[-2000:]
    for endpoint in workers:  # llama.cpp's own log (--verbose sends it to stderr)
        assert (
            f"({endpoint})" in remote.stderr and f"RPC0[{endpoint}] model buffer" in remote.stderr
        )
    assert "assigned to device RPC1" in remote.stderr
    plan = re.search(r"^plan: .*$", remote.stderr, re.M)
    assert plan and re.match(r"plan: 2/2 layers on RPC0 \(.*\) \+ RPC1 \(", plan.group()), plan
    local = run_cli("ask", "Hello world", *common)
    assert local.code == 0, local.stderr
    assert remote.stdout == local.stdout and len(remote.stdout.strip()) > 0


@real_process
@requires_rpc
def test_ask_with_an_unreachable_worker_fails_fast(models: Models) -> None:
    start = time.monotonic()
    r = run_cli("ask", "Hi", "-m", str(models.random), "--rpc", f"127.0.0.1:{free_port()}")
    assert r.code == 5 and "cannot reach RPC worker" in r.stderr
    assert r.stderr.count("\n") == 1 and time.monotonic() - start < 15


@requires_rpc
def test_a_busy_worker_is_reported_not_waited_for(workers: list[str]) -> None:
    host, port = workers[0].split(":")
    # A worker serves one client at a time: hold it with a connection that says nothing.
    with socket.create_connection((host, int(port)), timeout=2):
        time.sleep(0.2)  # let the worker accept it
        start = time.monotonic()
        with pytest.raises(LoadError, match=r"did not answer within 0\.5 s"):
            rpc.check_reachable(workers[0], timeout=0.5)
        assert time.monotonic() - start < 2
    deadline = time.monotonic() + 5
    while True:  # free again once it has seen the connection close
        try:
            rpc.check_reachable(workers[0], timeout=1)
            break
        except LoadError:
            if time.monotonic() > deadline:
                raise


@requires_rpc
@pytest.mark.parametrize("signum", [signal.SIGTERM, signal.SIGINT])
def test_worker_ends_promptly_on_sigterm_and_ctrl_c(signum: int) -> None:
    if signum == signal.SIGINT and signal.getsignal(signal.SIGINT) is signal.SIG_IGN:
        pytest.skip("SIGINT is ignored here (a background job), so in the worker too")
    port = free_port()
    proc = start_worker(port)
    try:
        lines = wait_ready(proc)
        assert f"listening on 127.0.0.1:{port}, serving CPU" in lines[-1]
        assert "no authentication" not in "".join(lines)  # loopback: no warning
        start = time.monotonic()
        proc.send_signal(signum)
        code = proc.wait(STOP_TIMEOUT)
        assert time.monotonic() - start < 2
        # SIGTERM is a normal stop; Ctrl-C is KeyboardInterrupt (the CLI maps it to 130).
        if signum == signal.SIGTERM:
            assert code == 0
        else:
            assert code != 0
        assert refused(port)
    finally:
        stop_worker(proc)


# --- endpoints ----------------------------------------------------------------------------------


def test_parse_endpoints() -> None:
    assert rpc_endpoints.parse_endpoints("127.0.0.1:50052") == ["127.0.0.1:50052"]
    assert rpc_endpoints.parse_endpoints(" 10.0.0.2:1 , gpu-box.lan:065535") == [
        "10.0.0.2:1",
        "gpu-box.lan:65535",
    ]


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("", "no RPC endpoint given"),
        ("  ", "no RPC endpoint given"),
        ("127.0.0.1", "missing port"),
        ("127.0.0.1:", "missing port"),
        (":50052", "missing host"),
        ("host:0", "out of range 1-65535"),
        ("host:65536", "out of range 1-65535"),
        ("host:http", "is not a number"),
        ("a:1,,b:2", "empty entry"),
        ("a:1,", "empty entry"),
        ("[::1]:50052", "IPv4 only"),
        ("bad host:1", "not a host name"),
        ("a:1,a:01", "listed twice"),
    ],
)
def test_parse_endpoints_refuses(text: str, message: str) -> None:
    with pytest.raises(UsageError, match=message) as caught:
        rpc_endpoints.parse_endpoints(text)
    assert "\n" not in str(caught.value)


# Every way an endpoint list comes in goes through parse_endpoints: a bad one is exit 2 and one
# line naming where it came from and what is wrong, before any model is loaded.
EXPECTED = "(expected HOST:PORT[,HOST:PORT...])"
RPC_FLAG_ERRORS = [
    ("", f"--rpc: no RPC endpoint given {EXPECTED}"),
    (" , ", f"--rpc: no RPC endpoint given {EXPECTED}"),
    ("127.0.0.1:1,,127.0.0.1:2",
     "--rpc: bad RPC endpoint list '127.0.0.1:1,,127.0.0.1:2': an empty entry between commas"),
    ("127.0.0.1:1,", "--rpc: bad RPC endpoint list '127.0.0.1:1,': an empty entry between commas"),
    ("127.0.0.1:50052,127.0.0.1:050052", "--rpc: RPC endpoint 127.0.0.1:50052 is listed twice"),
    ("gpu-box", "--rpc: bad RPC endpoint 'gpu-box': missing port (expected HOST:PORT, "
                "e.g. 192.168.1.20:50052)"),
]  # fmt: skip


@pytest.mark.parametrize("command", ["ask", "doctor"])
@pytest.mark.parametrize(("text", "message"), RPC_FLAG_ERRORS, ids=lambda v: repr(v)[:24])
def test_a_bad_rpc_flag_is_one_line_and_exit_2(
    command: str, text: str, message: str, models: Models
) -> None:
    prompt = ["Hi"] if command == "ask" else []
    r = run_cli(command, *prompt, "-m", str(models.scripted), "--rpc", text, timeout=60)
    assert (r.code, r.stderr, r.stdout) == (2, f"wizardchat: error: {message}\n", "")


def test_a_bad_rpc_environment_value_names_the_variable(
    models: Models, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("WIZARDCHAT_RPC", "127.0.0.1:7,127.0.0.1:7")
    r = run_cli("ask", "Hi", "-m", str(models.scripted), timeout=60)
    expected = "wizardchat: error: WIZARDCHAT_RPC: RPC endpoint 127.0.0.1:7 is listed twice\n"
    assert (r.code, r.stderr, r.stdout) == (2, expected, "")


@pytest.mark.parametrize(
    ("written", "message"),
    [
        ('rpc = "127.0.0.1:1,,127.0.0.1:2"\n',
         "rpc: bad RPC endpoint list '127.0.0.1:1,,127.0.0.1:2': an empty entry between commas"),
        ('rpc = ["127.0.0.1:1", ""]\n', "rpc: bad RPC endpoint list ['127.0.0.1:1', '']: an empty "
                                        "entry"),
        ('rpc = ["127.0.0.1:1", "127.0.0.1:1"]\n', "rpc: RPC endpoint 127.0.0.1:1 is listed twice"),
        ("rpc = []\n", f"rpc: no RPC endpoint given {EXPECTED}"),
    ],
)  # fmt: skip
def test_a_bad_rpc_config_value_names_the_file_and_the_key(
    written: str, message: str, models: Models, isolated_home: Path
) -> None:
    config = isolated_home / "config" / "config.toml"
    config.parent.mkdir(parents=True)
    config.write_text(written)
    r = run_cli("ask", "Hi", "-m", str(models.scripted), timeout=60)
    expected = f"wizardchat: error: config file {config}: {message}\n"
    assert (r.code, r.stderr, r.stdout) == (2, expected, "")


def test_good_rpc_values_from_every_source_become_canonical_settings(tmp_path: Path) -> None:
    from wizardchat.settings import load_settings

    config = tmp_path / "config.toml"
    config.write_text('rpc = [" gpu-box:050052", "10.0.0.2:1"]\n')
    from_config = load_settings({}, config_path=config, environ={})
    assert from_config.rpc == ("gpu-box:50052", "10.0.0.2:1")
    from_env = load_settings({}, config_path=config, environ={"WIZARDCHAT_RPC": "a:01, b:2"})
    assert from_env.rpc == ("a:1", "b:2")
    from_flag = load_settings({"rpc": "c:3"}, config_path=config, environ={})
    assert from_flag.rpc == ("c:3",)


def test_unreachable_endpoint_is_a_clear_error_within_the_timeout() -> None:
    port = free_port()
    start = time.monotonic()
    with pytest.raises(LoadError) as caught:
        rpc.check_reachable(f"127.0.0.1:{port}", timeout=3)
    assert time.monotonic() - start < 3.5
    assert str(caught.value).startswith(
        f"cannot reach RPC worker 127.0.0.1:{port}: connection refused"
    )


@requires_rpc
def test_add_servers_checks_every_endpoint_before_registering_any() -> None:
    with pytest.raises(LoadError, match="connection refused"):
        rpc.add_servers([f"127.0.0.1:{free_port()}"])


@contextlib.contextmanager
def fake_server(answer: Callable[[socket.socket], None]) -> Iterator[str]:
    """A one-connection loopback server that `answer`s the client; yields its endpoint."""
    listener = socket.create_server(("127.0.0.1", 0))
    port = listener.getsockname()[1]

    def serve_one() -> None:
        with contextlib.suppress(OSError):
            conn, _ = listener.accept()
            with conn:
                answer(conn)

    thread = threading.Thread(target=serve_one, daemon=True)
    thread.start()
    try:
        yield f"127.0.0.1:{port}"
    finally:
        listener.close()
        thread.join(5)


def _read_hello(conn: socket.socket) -> bytes:
    conn.settimeout(5)
    data = b""
    while len(data) < 1 + 8 + 24:
        chunk = conn.recv(64)
        if not chunk:
            break
        data += chunk
    return data


def test_a_worker_of_another_protocol_version_is_refused() -> None:
    def old_worker(conn: socket.socket) -> None:
        hello = _read_hello(conn)
        assert hello[0] == 14 and struct.unpack("<Q", hello[1:9])[0] == 24
        conn.sendall(struct.pack("<Q", 28) + bytes([3, 6, 1, 0]) + bytes(24))

    with (
        fake_server(old_worker) as endpoint,
        pytest.raises(LoadError, match=r"speaks RPC protocol 3\.6\.1; this build speaks 7\.0"),
    ):
        rpc.check_reachable(endpoint)


def test_something_else_on_the_port_is_refused() -> None:
    def web_server(conn: socket.socket) -> None:
        _read_hello(conn)
        conn.sendall(b"HTTP/1.1 400 Bad Request\r\n\r\n")

    with (
        fake_server(web_server) as endpoint,
        pytest.raises(LoadError, match=r"is not a compatible llama\.cpp RPC worker"),
    ):
        rpc.check_reachable(endpoint)


# --- serving ------------------------------------------------------------------------------------


def test_serve_refuses_a_non_loopback_address_without_allow_remote() -> None:
    port = free_port()
    said: list[str] = []
    with pytest.raises(UsageError, match="no authentication") as caught:
        rpc.serve("0.0.0.0", port, announce=said.append)
    assert "--allow-remote" in str(caught.value)
    assert said == []
    assert refused(port)


class _Stop(Exception):
    pass


def test_serve_with_allow_remote_warns_before_listening() -> None:
    port = free_port()
    said: list[str] = []

    def announce(line: str) -> None:
        said.append(line)
        raise _Stop  # stop here: nothing should listen on all interfaces in a test

    with pytest.raises(_Stop):
        rpc.serve("0.0.0.0", port, allow_remote=True, announce=announce)
    assert said[0].startswith("warning: the RPC protocol has no authentication")
    assert "trusted network" in said[0]
    assert refused(port)


def test_serve_refuses_bad_hosts_and_ports() -> None:
    with pytest.raises(UsageError, match="needs an IPv4 address"):
        rpc.serve("gpu-box.lan", free_port())
    with pytest.raises(UsageError, match="out of range"):
        rpc.serve(port=0)


@requires_rpc
def test_serve_refuses_unknown_devices_and_busy_ports() -> None:
    with pytest.raises(UsageError, match=r"unknown device 'NOPE0'; available here: CPU \("):
        rpc.serve(port=free_port(), devices=["NOPE0"])
    with socket.create_server(("127.0.0.1", 0)) as taken:
        port = taken.getsockname()[1]
        with pytest.raises(UsageError, match=f"cannot listen on 127.0.0.1:{port}"):
            rpc.serve(port=port)


def test_a_build_without_rpc_says_how_to_rebuild() -> None:
    from wizardchat.engine.model import LLAMA_CPP_VERSION

    assert 'CMAKE_ARGS="-DGGML_RPC=on" pip install --no-cache-dir --force-reinstall' in (
        rpc.REBUILD_HINT
    )
    assert f"llama-cpp-python=={LLAMA_CPP_VERSION}" in rpc.REBUILD_HINT
    # The same lookup as for "RPC", of a backend this build certainly lacks.
    with pytest.raises(UsageError) as caught:
        rpc._Api("NO_SUCH_BACKEND")
    assert str(caught.value).endswith(rpc.REBUILD_HINT)


# --- a worker that passes the handshake, then misbehaves -----------------------------------------

_HELLO_ANSWER = struct.pack("<Q", 28) + bytes([7, 0, 0, 0]) + bytes(24)


@contextlib.contextmanager
def misbehaving_worker(after_hello: Callable[[socket.socket], None]) -> Iterator[str]:
    """A loopback server that answers every connection's HELLO like a 7.0.0 worker, then does
    `after_hello` at the next command; yields its endpoint."""
    listener = socket.create_server(("127.0.0.1", 0))
    listener.settimeout(0.2)
    port = listener.getsockname()[1]
    stop = threading.Event()

    def serve() -> None:
        while not stop.is_set():
            try:
                conn, _ = listener.accept()
            except TimeoutError:
                continue
            except OSError:
                return
            with conn, contextlib.suppress(OSError):
                _read_hello(conn)
                conn.sendall(_HELLO_ANSWER)
                conn.settimeout(5)
                if conn.recv(1):  # the next command (a bare handshake check closes instead)
                    after_hello(conn)

    thread = threading.Thread(target=serve, daemon=True)
    thread.start()
    try:
        yield f"127.0.0.1:{port}"
    finally:
        stop.set()
        thread.join(5)
        listener.close()


def _close(conn: socket.socket) -> None:
    pass  # leaving the `with` closes it


def _garbage(conn: socket.socket) -> None:
    conn.sendall(struct.pack("<Q", 2**40) + b"\xff" * 64)


@real_process
@requires_rpc
@pytest.mark.parametrize("after_hello", [_close, _garbage], ids=["closes", "garbage"])
def test_a_worker_failing_after_the_handshake_is_one_line_not_an_abort_dump(
    models: Models, after_hello: Callable[[socket.socket], None]
) -> None:
    with misbehaving_worker(after_hello) as endpoint:
        r = run_cli("ask", "Hi", "-m", str(models.random), "--rpc", endpoint, timeout=60)
    assert r.code == 5, (r.code, r.stderr[-3000:])
    assert r.stdout == ""
    (line,) = r.stderr.splitlines()
    assert line.startswith("wizardchat: error: llama.cpp stopped on an internal error: ")
    assert "ggml-rpc.cpp:" in line and "/ggml-rpc.cpp" not in line  # no build path


@real_process
@requires_rpc
def test_doctor_lists_a_worker_as_rpc_not_as_a_gpu(models: Models, workers: list[str]) -> None:
    # The workers serve their CPU; llama.cpp types every RPC device GPU whatever it serves.
    r = run_cli("doctor", "--json", "--rpc", workers[0], "-m", str(models.random))
    assert r.code == 0, r.stderr[-2000:]
    devices = {d["name"]: d for d in json.loads(r.stdout)["devices"]}
    assert devices["RPC0"]["kind"] == "RPC" and devices["RPC0"]["description"] == workers[0]
    text = run_cli("doctor", "--rpc", workers[0], "-m", str(models.random))
    assert text.code == 0, text.stderr[-2000:]
    line = next(x for x in text.stdout.splitlines() if x.strip().startswith("RPC0"))
    assert line.split()[1] == "RPC" and "GPU" not in line, line
