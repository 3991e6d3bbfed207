"""`--endpoint`: chatting through an OpenAI-compatible server that loads the model itself.

Two servers nobody here wrote the client for, started on 127.0.0.1 by the tests: llama-cpp-python's
own server (`python -m llama_cpp.server`) and `wizardchat serve --http`, each on a generated
model; a local `ask`/`run` of the same model is the reference. A small fake server plays the
faults a real one will not produce on demand (a stall, a cut stream, HTML, 429).
"""

from __future__ import annotations

import contextlib
import http.server
import json
import re
import shutil
import socket
import ssl
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import httpx2
import pytest
from conftest import Models, run_cli
from test_repl import Chat, clean
from test_serve import servers

pytestmark = pytest.mark.real_process

__all__ = ["servers"]  # the fixture, from test_serve.py

GREEDY = ("--temp", "0", "--seed", "1")
SCRIPT = "Hello, world! €5"  # what models.scripted answers to anything
KEY = "sk-endpoint-4b7e9d"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@pytest.fixture
def llama_cpp_server(tmp_path: Path) -> Iterator[Callable[..., str]]:
    """Start `python -m llama_cpp.server` on a model; its base URL."""
    procs: list[subprocess.Popen[bytes]] = []

    def start(model: Path, *args: str) -> str:
        port = free_port()
        log = tmp_path / f"llama-cpp-server-{port}.log"
        proc = subprocess.Popen(
            [sys.executable, "-m", "llama_cpp.server", "--model", str(model), "--host",
             "127.0.0.1", "--port", str(port), "--n_ctx", "4096", "--verbose", "false", *args],
            stdin=subprocess.DEVNULL, stdout=log.open("wb"), stderr=subprocess.STDOUT,
        )  # fmt: skip
        procs.append(proc)
        url = f"http://127.0.0.1:{port}/v1"
        deadline = time.monotonic() + 120
        while True:
            assert proc.poll() is None, log.read_text(errors="replace")
            with contextlib.suppress(httpx2.HTTPError):
                if httpx2.get(f"{url}/models", timeout=2).status_code == 200:
                    return url
            assert time.monotonic() < deadline, log.read_text(errors="replace")
            time.sleep(0.2)

    yield start
    for proc in procs:
        proc.terminate()
        try:
            proc.wait(15)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(10)


@pytest.fixture
def endpoint_of(servers: Any, llama_cpp_server: Callable[..., str]) -> Callable[[str, Path], str]:
    """The base URL of a server of each kind on `model`."""

    def start(kind: str, model: Path) -> str:
        if kind == "llama_cpp":
            return llama_cpp_server(model)
        server = servers(model, "--http", "127.0.0.1:0")
        return f"http://{server.entry.http}/v1"

    return start


def ok(*args: str, stdin: str | None = None) -> Any:
    r = run_cli(*args, stdin=stdin)
    assert r.code == 0, r.stderr
    return r


# --- the same chat as locally ----------------------------------------------------------------


@pytest.mark.parametrize("kind", ["llama_cpp", "wizardchat"])
def test_ask_and_a_batch_through_a_server_reply_as_the_local_model(
    models: Models, endpoint_of: Callable[[str, Path], str], kind: str
) -> None:
    url = endpoint_of(kind, models.scripted)
    local = ok("ask", "Hi", "-m", str(models.scripted), "--no-server", *GREEDY)
    through = ok("ask", "Hi", "--endpoint", url, *GREEDY)
    assert through.stdout == local.stdout == SCRIPT + "\n"
    assert f"at {url}" in through.stderr  # which server and model, on stderr

    lines = "Hi\nWho are you?\nAnd then?\n"
    local_batch = ok("run", "-m", str(models.scripted), "--no-server", *GREEDY, stdin=lines)
    batch = ok("run", "--endpoint", url, *GREEDY, stdin=lines)
    assert batch.stdout == local_batch.stdout == (SCRIPT + "\n\n") * 3


@pytest.mark.parametrize("kind", ["llama_cpp", "wizardchat"])
def test_a_session_through_the_endpoint_is_saved_and_resumed(
    models: Models, endpoint_of: Callable[[str, Path], str], kind: str
) -> None:
    url = endpoint_of(kind, models.scripted)
    ok("run", "--endpoint", url, "--session", "remote", *GREEDY, stdin="Hi\n")
    again = ok("run", "--endpoint", url, "--session", "remote", "--verbose-prompt", *GREEDY,
               stdin="Who are you?\n")  # fmt: skip
    assert f"USER: Hi ASSISTANT: {SCRIPT}</s>USER: Who are you? ASSISTANT:" in again.stderr
    saved = json.loads(Path(_session_files("remote")[0]).read_text())
    assert [(t["user"], t["reply"]) for t in saved["turns"]] == [
        ("Hi", SCRIPT), ("Who are you?", SCRIPT)
    ]  # fmt: skip


# --- the prompt is the local one, byte for byte -------------------------------------------------


class Fake:
    """A fake OpenAI-compatible server: /v1/models, and /v1/completions answered by `reply`
    (a function of the request body and the handler), with every body recorded."""

    def __init__(self) -> None:
        self.bodies: list[dict[str, Any]] = []
        self.reply: Callable[[dict[str, Any], Any], None] = stream_text(" " + SCRIPT)
        self.models_status = 200
        fake = self

        class Handler(http.server.BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def log_message(self, *args: Any) -> None:
                pass

            def do_GET(self) -> None:
                if self.path == "/v1/models":
                    send_json(self, fake.models_status, {"data": [{"id": "fake-model"}]})
                else:
                    send_json(self, 404, {"error": {"message": "no such path"}})

            def do_POST(self) -> None:
                length = int(self.headers.get("Content-Length", "0"))
                body = json.loads(self.rfile.read(length) or b"{}")
                if self.path != "/v1/completions":
                    send_json(self, 404, {"error": {"message": "no such path"}})
                    return
                fake.bodies.append(body)
                fake.reply(body, self)

        self.httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.httpd.daemon_threads = True
        self.url = f"http://127.0.0.1:{self.httpd.server_address[1]}/v1"
        self.thread = threading.Thread(target=self.httpd.serve_forever, daemon=True)
        self.thread.start()

    def close(self) -> None:
        self.httpd.shutdown()
        self.httpd.server_close()


def send_json(handler: Any, status: int, data: Any) -> None:
    payload = json.dumps(data).encode()
    handler.send_response(status)
    handler.send_header("Content-Type", "application/json")
    handler.send_header("Content-Length", str(len(payload)))
    handler.end_headers()
    handler.wfile.write(payload)


def start_events(handler: Any) -> None:
    handler.send_response(200)
    handler.send_header("Content-Type", "text/event-stream")
    handler.send_header("Connection", "close")
    handler.end_headers()


def event(handler: Any, data: Any) -> None:
    handler.wfile.write(f"data: {json.dumps(data)}\n\n".encode())
    handler.wfile.flush()


def chunk(text: str, finish: str | None = None) -> dict[str, Any]:
    return {"choices": [{"index": 0, "text": text, "finish_reason": finish}]}


def stream_text(text: str, *, cut_after: int | None = None, stall_after: int | None = None):  # type: ignore[no-untyped-def]
    """A reply streaming `text` a character at a time, whole, or cut or stalled partway."""

    def reply(body: dict[str, Any], handler: Any) -> None:
        start_events(handler)
        for i, ch in enumerate(text):
            if i == cut_after:
                return  # the connection closes: no finish, no [DONE]
            if i == stall_after:
                time.sleep(30)
                return
            event(handler, chunk(ch))
        event(handler, chunk("", "stop"))
        handler.wfile.write(b"data: [DONE]\n\n")

    return reply


@pytest.fixture
def fake() -> Iterator[Fake]:
    server = Fake()
    yield server
    server.close()


def test_the_prompt_sent_is_what_verbose_prompt_prints_locally(models: Models, fake: Fake) -> None:
    lines = "Hi\nWho are you?\nTell me more about </s> and USER: tags\n"
    local = ok("run", "-m", str(models.scripted), "--no-server", "--verbose-prompt", *GREEDY,
               stdin=lines)  # fmt: skip
    shown = [
        part.split("\n", 1)[1].rsplit("\n--- end of prompt ---", 1)[0]
        for part in local.stderr.split("--- prompt: ")[1:]
    ]
    through = ok("run", "--endpoint", fake.url, *GREEDY, stdin=lines)
    assert through.stdout == local.stdout
    assert [b["prompt"] for b in fake.bodies] == shown
    assert len(shown) == 3 and shown[2].endswith("USER: tags ASSISTANT:")
    body = fake.bodies[0]
    assert body["model"] == "fake-model" and body["stream"] is True
    assert body["temperature"] == 0 and body["seed"] == 1 and "USER:" in body["stop"]


# --- faults --------------------------------------------------------------------------------------


def fails(*args: str, code: int = 11) -> str:
    r = run_cli(*args)
    assert r.code == code, (r.code, r.stdout, r.stderr)
    assert "Traceback" not in r.stderr
    return r.stderr


def test_an_unreachable_endpoint_is_one_line_and_exit_11() -> None:
    url = f"http://127.0.0.1:{free_port()}/v1"
    err = fails("ask", "Hi", "--endpoint", url)
    assert err.strip().splitlines() == [
        f"wizardchat: error: the endpoint {url} cannot be reached: connection refused"
    ]
    assert "an http://" in fails("ask", "Hi", "--endpoint", "ftp://x/v1", code=2)


def test_keys_models_and_html_get_one_clear_line_and_the_key_is_never_shown(fake: Fake) -> None:
    fake.models_status = 401
    err = fails("ask", "Hi", "--endpoint", fake.url, "--api-key", KEY)
    assert "refused the API key (401)" in err and KEY not in err
    assert "needs an API key" in fails("ask", "Hi", "--endpoint", fake.url)
    fake.models_status = 200
    err = fails("ask", "Hi", "--endpoint", fake.url, "--endpoint-model", "nope")
    assert "does not serve 'nope' (it serves: fake-model)" in err

    def html(body: dict[str, Any], handler: Any) -> None:
        page = b"<html><body>Sign in to the proxy</body></html>"
        handler.send_response(200)
        handler.send_header("Content-Type", "text/html")
        handler.send_header("Content-Length", str(len(page)))
        handler.end_headers()
        handler.wfile.write(page)

    fake.reply = html
    assert "with an HTML page" in fails("ask", "Hi", "--endpoint", fake.url)


def test_429_before_the_first_token_is_tried_again(fake: Fake) -> None:
    calls: list[int] = []
    streamed = stream_text(" " + SCRIPT)

    def busy_once(body: dict[str, Any], handler: Any) -> None:
        calls.append(1)
        if len(calls) == 1:
            handler.send_response(429)
            handler.send_header("Retry-After", "0")
            handler.send_header("Content-Length", "0")
            handler.end_headers()
            return
        streamed(body, handler)

    fake.reply = busy_once
    r = ok("ask", "Hi", "--endpoint", fake.url)
    assert r.stdout == SCRIPT + "\n" and len(calls) == 2
    assert "is busy (429: too many requests)" in r.stderr and "trying again" in r.stderr


@pytest.mark.parametrize("how", ["cut", "stall"])
def test_a_reply_cut_or_stalled_midway_keeps_its_text_and_says_so(fake: Fake, how: str) -> None:
    text = " Hello there, this reply will not end well"
    if how == "cut":
        fake.reply = stream_text(text, cut_after=12)
    else:
        fake.reply = stream_text(text, stall_after=12)
    r = run_cli("run", "--endpoint", fake.url, "--endpoint-timeout", "1", "--session", "cut",
                stdin="Hi\n")  # fmt: skip
    assert r.code == 11, r.stderr
    assert r.stdout.startswith(text.strip()[:11])  # what came before is kept on stdout
    why = "ended the reply in the middle" if how == "cut" else "sent nothing for 1 s"
    assert why in r.stderr
    saved = json.loads(Path(_session_files("cut")[0]).read_text())
    assert saved["turns"][0]["user"] == "Hi"  # the message and its partial reply are saved
    assert saved["turns"][0]["reply"].startswith(text.strip()[:11])


def _session_files(name: str) -> list[str]:
    from wizardchat import paths

    return [str(p) for p in paths.sessions_dir().glob(f"{name}*.json")]


@pytest.mark.parametrize("kind", ["llama_cpp", "wizardchat"])
def test_the_repl_through_the_endpoint_stops_on_ctrl_c_regenerates_and_shows_it(
    models: Models, endpoint_of: Callable[[str, Path], str], kind: str
) -> None:
    url = endpoint_of(kind, models.slow)
    # llama_cpp.server generates on after its client has gone, up to max_tokens (at about 60
    # tokens/s here, its first token after a second or two): 400 keep the next request's wait
    # short; wizardchat serve --http stops.
    n = "400" if kind == "llama_cpp" else "100000"
    chat = Chat("--endpoint", url, "-n", n, "--seed", "3")
    try:
        assert f"at {url}" in chat.banner
        chat.child.send("tell me everything\r")
        chat.expect("everything")
        time.sleep(3 if kind == "llama_cpp" else 1)  # the reply is streaming
        chat.child.sendcontrol("c")
        out = clean(chat.wait_prompt())
        assert "[interrupted]" in out and "Traceback" not in out
        chat.send("/set max_tokens 5")
        out = chat.send("/regen")
        # The count is the stream's pieces: llama_cpp.server may split a token's bytes over two.
        assert "[max tokens reached]" in out and re.search(r"\n[5-9] tokens · ", out), out
        shown = " ".join(chat.send("/show").split())  # rows wrap at 80 columns
        assert url in shown and "(the first it serves)" in shown
        assert re.search(r"tokens counted by\s+the server's tokenizer", shown), shown
        stats = chat.send("/stats")
        assert "tok/s" in stats, stats
        assert chat.exit() == 0
    finally:
        chat.kill()


def test_a_long_chat_through_the_endpoint_evicts_old_turns_and_says_so(fake: Fake) -> None:
    lines = "".join(f"message number {i} with a few words in it\n" for i in range(12))
    r = ok("run", "--endpoint", fake.url, "-c", "200", stdin=lines)
    assert r.stdout == (SCRIPT + "\n\n") * 12
    assert "context full: the model no longer sees the" in r.stderr, r.stderr
    prompts = [b["prompt"] for b in fake.bodies]
    assert "message number 0 " not in prompts[-1] and "message number 11 " in prompts[-1]
    assert max(len(p.encode()) for p in prompts) <= 200 * 3  # the estimate errs high


def test_doctor_checks_an_endpoint_as_a_chat_would_use_it(
    models: Models, servers: Any, fake: Fake
) -> None:
    server = servers(models.scripted, "--http", "127.0.0.1:0")
    url = f"http://{server.entry.http}/v1"
    report = json.loads(ok("doctor", "--endpoint", url, "--json").stdout)
    assert report["model"] == "scripted.gguf" and report["context_tokens"] == 4096
    assert report["token_counting"] == "the server's tokenizer (llama-server's /tokenize)"
    assert report["one_token_reply"] == " Hello" and report["one_token_finish"] == "length"
    assert report["prompt_tokens"] > 20

    shown = ok("doctor", "--endpoint", fake.url).stdout
    assert "not reported: 4,096 assumed (-c sets it)" in shown
    assert "an estimate (a token per 3 bytes: the server has no tokenize API)" in shown
    assert "one-token test" in shown
    assert fake.bodies[-1]["max_tokens"] == 1
    err = fails("doctor", "--endpoint", f"http://127.0.0.1:{free_port()}/v1")
    assert "cannot be reached: connection refused" in err


@pytest.mark.skipif(shutil.which("openssl") is None, reason="needs the openssl command")
def test_https_is_verified_a_server_this_machine_does_not_trust_is_refused(
    fake: Fake, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    cert, key = tmp_path / "cert.pem", tmp_path / "key.pem"
    subprocess.run(
        ["openssl", "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-keyout", str(key),
         "-out", str(cert), "-days", "1", "-subj", "/CN=127.0.0.1",
         "-addext", "subjectAltName=IP:127.0.0.1"],
        check=True, capture_output=True, timeout=60,
    )  # fmt: skip
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    context.load_cert_chain(cert, key)
    fake.httpd.socket = context.wrap_socket(fake.httpd.socket, server_side=True)
    url = fake.url.replace("http://", "https://")
    err = fails("ask", "Hi", "--endpoint", url)
    assert "its TLS certificate did not verify" in err
    monkeypatch.setenv("SSL_CERT_FILE", str(cert))  # now this machine trusts it
    assert ok("ask", "Hi", "--endpoint", url).stdout == SCRIPT + "\n"


def test_a_local_session_continues_through_the_endpoint_without_its_model_file(
    models: Models, fake: Fake, tmp_path: Path
) -> None:
    model = tmp_path / "gone.gguf"
    model.write_bytes(models.scripted.read_bytes())
    ok("run", "-m", str(model), "--no-server", "--session", "moved", *GREEDY, stdin="Hi\n")
    model.unlink()  # the laptop's model is gone; the team's server has one
    r = ok("run", "--endpoint", fake.url, "--session", "moved", stdin="Who are you?\n")
    assert "resuming 'moved' with its model" not in r.stderr
    assert fake.bodies[-1]["prompt"].endswith(
        f"USER: Hi ASSISTANT: {SCRIPT}</s>USER: Who are you? ASSISTANT:"
    )
