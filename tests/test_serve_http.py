"""`wizardchat serve --http`: the OpenAI-compatible API, used through the official `openai` client.

Real processes throughout: `wizardchat serve --http 127.0.0.1:0` on a generated model, the
`openai` package as the client (and httpx2, the HTTP client under it and huggingface_hub, for
what openai hides), `wizardchat ask` as the reference.
"""

from __future__ import annotations

import json
import signal
import socket
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx2
import openai
import pytest
from conftest import Models, run_cli
from test_serve import Server, servers

pytestmark = pytest.mark.real_process

__all__ = ["servers"]  # the fixture, shared with test_serve.py

TIMEOUT = 60.0
KEY = "sk-test-7f3a9c1e5b"
HTTP = ("--http", "127.0.0.1:0")
SCRIPT = "Hello, world! €5"  # what models.scripted answers to anything


def base_url(server: Server) -> str:
    host, _, port = server.entry.http.rpartition(":")
    assert host == "127.0.0.1" and int(port) > 0, server.entry.http
    return f"http://{server.entry.http}/v1"


def client(server: Server, key: str = "none") -> openai.OpenAI:
    return openai.OpenAI(base_url=base_url(server), api_key=key, timeout=TIMEOUT, max_retries=0)


def chat(
    server: Server, text: str = "Hi", *, key: str = "none", **kw: Any
) -> openai.types.chat.ChatCompletion:
    return client(server, key).chat.completions.create(
        model="any", messages=[{"role": "user", "content": text}], **kw
    )


def ask_json(*args: str) -> dict[str, Any]:
    r = run_cli("ask", *args, "--no-server", "--json")
    assert r.code == 0, r.stderr
    record = json.loads(r.stdout)
    assert isinstance(record, dict)
    return record


# --- replies ------------------------------------------------------------------------------------


def test_models_and_a_chat_reply_whole_and_streamed(models: Models, servers: Any) -> None:
    server = servers(models.scripted, *HTTP)
    assert f"OpenAI-compatible API on {base_url(server)}" in server.stderr()
    assert server.status()["http"] == server.entry.http
    listed_servers = run_cli("ps").stdout.splitlines()[1].split()
    assert listed_servers[-2:] == [base_url(server), server.entry.socket]
    listed = client(server).models.list()
    assert [(m.id, m.owned_by) for m in listed.data] == [("scripted.gguf", "wizardchat")]

    whole = chat(server)
    assert whole.object == "chat.completion" and whole.model == "scripted.gguf"
    choice = whole.choices[0]
    assert (choice.message.role, choice.message.content) == ("assistant", SCRIPT)
    assert choice.finish_reason == "stop"  # the model's EOS
    local = ask_json("Hi", "-m", str(models.scripted))  # the prompt is the local chat's, exactly
    usage = whole.usage
    assert usage is not None
    assert usage.prompt_tokens == local["prompt_tokens"]
    assert usage.completion_tokens == local["completion_tokens"]
    assert usage.total_tokens == usage.prompt_tokens + usage.completion_tokens

    chunks = list(
        client(server).chat.completions.create(
            model="any",
            messages=[{"role": "user", "content": "Hi"}],
            stream=True,
            stream_options={"include_usage": True},
        )
    )
    assert chunks[0].choices[0].delta.role == "assistant"
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text == SCRIPT
    finishes = [c.choices[0].finish_reason for c in chunks if c.choices]
    assert finishes[-1] == "stop" and set(finishes[:-1]) == {None}
    assert chunks[-1].choices == [] and chunks[-1].usage is not None
    assert chunks[-1].usage.total_tokens == usage.total_tokens


def test_a_greedy_chat_reply_is_the_one_ask_gives(models: Models, servers: Any) -> None:
    prompt = "Tell me about the sea"
    local = ask_json(prompt, "-m", str(models.random), "-n", "24", "--temp", "0", "--seed", "1")
    server = servers(models.random, *HTTP)
    for _ in range(2):  # the second time from the server's KV cache: the same reply
        reply = chat(server, prompt, temperature=0, max_tokens=24, seed=1)
        assert reply.choices[0].message.content == local["reply"]
        assert reply.usage is not None
        assert reply.usage.prompt_tokens == local["prompt_tokens"]


def test_a_conversation_and_a_system_message_make_the_vicuna_prompt(
    models: Models, servers: Any, engine_factory: Any
) -> None:
    server = servers(models.scripted, *HTTP)
    turns = [
        {"role": "system", "content": "Be brief."},
        {"role": "user", "content": "Hi"},
        {"role": "assistant", "content": "Hello."},
        {"role": "user", "content": [{"type": "text", "text": "Who are you?"}]},
    ]
    reply = client(server).chat.completions.create(model="any", messages=turns)
    assert reply.choices[0].message.content == SCRIPT
    # `Be brief. USER: Hi ASSISTANT: Hello.</s>USER: Who are you? ASSISTANT:`, BOS first.
    tokenize = engine_factory(models.scripted).tokenize
    segments = ["Be brief.", "USER: Hi ASSISTANT:", "Hello.", "USER: Who are you? ASSISTANT:"]
    expected = 2 + sum(len(tokenize(s)) for s in segments)  # and BOS, EOS
    assert reply.usage is not None and reply.usage.prompt_tokens == expected


def test_max_tokens_cuts_with_length_and_a_stop_string_cuts_with_stop(
    models: Models, servers: Any
) -> None:
    server = servers(models.scripted, *HTTP)
    cut = chat(server, max_tokens=3)
    assert cut.choices[0].finish_reason == "length"
    assert cut.choices[0].message.content == "Hello, world"
    assert cut.usage is not None and cut.usage.completion_tokens == 3

    stopped = chat(server, stop="world")
    assert stopped.choices[0].finish_reason == "stop"
    assert stopped.choices[0].message.content == "Hello, "
    streamed = client(server).chat.completions.create(
        model="any", messages=[{"role": "user", "content": "Hi"}], stream=True, stop=["!", "zz"]
    )
    assert "".join(c.choices[0].delta.content or "" for c in streamed) == "Hello, world"


def test_completions_continue_a_raw_prompt_whole_and_streamed(models: Models, servers: Any) -> None:
    server = servers(models.scripted, *HTTP)
    completions = client(server).completions
    prompt = "USER: Hi ASSISTANT:"  # the scripted model answers after a final `:`
    whole = completions.create(model="any", prompt=prompt, max_tokens=50)
    assert whole.object == "text_completion"
    assert whole.choices[0].text == " " + SCRIPT  # raw: the space before the first word stays
    assert whole.choices[0].finish_reason == "stop"
    assert whole.usage is not None and whole.usage.completion_tokens == 9
    assert whole.usage.prompt_tokens > 1  # BOS and the prompt's tokens
    short = completions.create(model="any", prompt=prompt, max_tokens=2)
    assert (short.choices[0].text, short.choices[0].finish_reason) == (" Hello,", "length")
    pieces = completions.create(model="any", prompt=prompt, max_tokens=50, stream=True, stop="€")
    chunks = list(pieces)
    assert "".join(c.choices[0].text for c in chunks) == " Hello, world! "
    assert chunks[-1].choices[0].finish_reason == "stop"


# --- errors -------------------------------------------------------------------------------------


def test_bad_requests_are_400_in_openai_shape(models: Models, servers: Any) -> None:
    server = servers(models.scripted, *HTTP)
    with pytest.raises(openai.BadRequestError) as bad_role:
        client(server).chat.completions.create(
            model="any",
            messages=[{"role": "wizard", "content": "Hi"}],
        )
    assert bad_role.value.status_code == 400
    assert "messages[0].role" in bad_role.value.message
    with pytest.raises(openai.BadRequestError):  # continuing an assistant message
        client(server).chat.completions.create(
            model="any",
            messages=[{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "He"}],
        )
    with pytest.raises(openai.BadRequestError):
        chat(server, top_p=0)
    with httpx2.Client(timeout=TIMEOUT) as http:
        url = f"{base_url(server)}/chat/completions"
        for body in (b"{not json", b"[1, 2]", b'{"messages": "Hi"}'):
            r = http.post(url, content=body)
            assert r.status_code == 400
            error = r.json()["error"]
            assert set(error) == {"message", "type", "param", "code"}
            assert error["type"] == "invalid_request_error"
        huge = http.post(url, content=b" " * (9 << 20))
        assert huge.status_code == 413
        assert http.get(f"{base_url(server)}/nothing").json()["error"]["code"] == "not_found"


def test_a_prompt_over_the_context_is_413(models: Models, servers: Any) -> None:
    server = servers(models.scripted, *HTTP, "-c", "256")
    with pytest.raises(openai.APIStatusError) as too_long:
        chat(server, "word " * 400)
    assert too_long.value.status_code == 413
    assert "context" in too_long.value.message
    assert chat(server).choices[0].message.content == SCRIPT  # and the server still answers


def test_with_a_key_every_request_needs_it_and_it_is_never_shown(
    models: Models, servers: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("WIZARDCHAT_API_KEY", KEY)
    server = servers(models.scripted, *HTTP)
    with pytest.raises(openai.AuthenticationError) as wrong:
        chat(server, key="sk-wrong")
    assert wrong.value.status_code == 401
    with httpx2.Client(timeout=TIMEOUT) as http:
        assert http.get(f"{base_url(server)}/models").status_code == 401  # no key at all
    assert chat(server, key=KEY).choices[0].message.content == SCRIPT
    assert [m.id for m in client(server, KEY).models.list().data] == ["scripted.gguf"]
    server.proc.send_signal(signal.SIGTERM)
    assert server.wait() == 0
    assert KEY not in server.stderr()


# --- where it listens ---------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("args", "line"),
    [
        (
            ("--http", "0.0.0.0:0"),
            "wizardchat: error: --http 0.0.0.0:0: not a loopback address; listening there "
            "needs --allow-remote and an API key (--api-key or WIZARDCHAT_API_KEY)",
        ),
        (
            ("--http", "0.0.0.0:0", "--allow-remote"),
            "wizardchat: error: --http 0.0.0.0:0: --allow-remote needs an API key "
            "(--api-key KEY or WIZARDCHAT_API_KEY)",
        ),
        (
            ("--http", "localhost:http"),
            "wizardchat: error: --http: 'localhost:http' is not [HOST:]PORT (e.g. 8080, "
            "127.0.0.1:8080 or [::1]:8080)",
        ),
        (
            ("--api-key", KEY),
            "wizardchat: error: --allow-remote and --api-key go with --http [HOST:]PORT",
        ),
    ],
)
def test_a_remote_bind_needs_allow_remote_and_a_key(
    models: Models, args: tuple[str, ...], line: str
) -> None:
    r = run_cli("serve", "-m", str(models.scripted), *args)
    assert r.code == 2
    assert r.stderr.splitlines() == [line]


def test_a_port_in_use_fails_before_the_load(models: Models) -> None:
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        r = run_cli("serve", "-m", str(models.scripted), "--http", str(port))
    assert r.code == 2
    assert r.stderr.splitlines() == [
        f"wizardchat: error: --http 127.0.0.1:{port}: cannot listen there (Address already in use)"
    ]


def test_without_the_serve_extra_http_is_one_line(
    models: Models, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    hidden = tmp_path / "hidden"  # a starlette that is not installed, ahead of the real one
    (hidden / "starlette").mkdir(parents=True)
    (hidden / "starlette" / "__init__.py").write_text(
        "raise ModuleNotFoundError(\"No module named 'starlette'\", name='starlette')\n"
    )
    monkeypatch.setenv("PYTHONPATH", str(hidden))
    r = run_cli("serve", "-m", str(models.scripted), "--http", "0")
    assert r.code == 2
    assert r.stderr.splitlines() == [
        "wizardchat: error: --http needs the serve extra: pip install 'wizardchat[serve]'"
    ]


# --- cancelling ---------------------------------------------------------------------------------


def stream_a_while(server: Server, http: httpx2.Client) -> tuple[httpx2.Response, Iterator[str]]:
    """A reply of the whole context streaming on `http`, some of it read; the response and its
    line iterator, which the caller keeps (dropping it would close the response early)."""
    body = {"model": "any", "messages": [{"role": "user", "content": "go on and on"}],
            "max_tokens": 100000, "stream": True}  # fmt: skip
    request = http.build_request("POST", f"{base_url(server)}/chat/completions", json=body)
    response = http.send(request, stream=True)
    assert response.status_code == 200
    lines = response.iter_lines()
    data = [line for line, _ in zip(lines, range(40), strict=False) if line.startswith("data:")]
    assert len(data) >= 10 and server.status()["busy"] is True
    return response, lines


def test_clients_gone_mid_stream_and_in_line_free_the_server(models: Models, servers: Any) -> None:
    # A whole 32K context takes the slow model a minute or more: only a cancel ends it sooner.
    server = servers(models.slow, *HTTP, "-c", "32768")
    with httpx2.Client(timeout=TIMEOUT) as http:
        streaming, _lines = stream_a_while(server, http)
        body = {"model": "any", "messages": [{"role": "user", "content": "me too"}],
                "max_tokens": 100000}  # fmt: skip
        with pytest.raises(httpx2.ReadTimeout):  # in line behind the stream, then gone
            http.post(f"{base_url(server)}/chat/completions", json=body, timeout=1.5)
        deadline = time.monotonic() + 5
        while server.status()["waiting"]:  # its turn will not come
            assert time.monotonic() < deadline, "a request in line stayed there without its client"
            time.sleep(0.05)
        assert server.status()["busy"] is True  # the stream still goes on
        streaming.close()
    deadline = time.monotonic() + 10
    while server.status()["busy"]:
        assert time.monotonic() < deadline, "a reply went on without its client"
        time.sleep(0.05)
    short = chat(server, max_tokens=5)
    assert short.usage is not None and short.usage.completion_tokens <= 5
    assert server.status()["replies"] == 2  # the stream and this one: not the one gone


def test_stopping_the_server_ends_an_open_stream_and_the_api(models: Models, servers: Any) -> None:
    server = servers(models.slow, *HTTP, "-c", "32768")
    url = base_url(server)
    with httpx2.Client(timeout=TIMEOUT) as http:
        body = {"model": "any", "messages": [{"role": "user", "content": "go"}],
                "max_tokens": 100000, "stream": True}  # fmt: skip
        with http.stream("POST", f"{url}/chat/completions", json=body) as response:
            lines = response.iter_lines()
            assert next(lines).startswith("data:")
            started = time.monotonic()
            server.proc.send_signal(signal.SIGTERM)
            rest = [line for line in lines if line]  # ends: an error event, then [DONE]
        assert time.monotonic() - started < 30
        events = [json.loads(line[6:]) for line in rest if line.startswith("data: {")]
        assert events[-1]["error"]["code"] == "stopping"
        assert rest[-1] == "data: [DONE]"
    assert server.wait() == 0
    with pytest.raises(httpx2.ConnectError), httpx2.Client(timeout=5) as http:
        http.get(f"{url}/models")
