"""An OpenAI-compatible HTTP API on `wizardchat serve --http`: the same engine, the same prompts.

`/v1/chat/completions` builds WizardLM-2's Vicuna prompt with the local chat's own code
(chat/conversation.py) and streams the reply through chat/reply.py, so a reply is the one `ask`
gives, stopped on `USER:` as it is; `/v1/completions` continues a raw prompt; `/v1/models` names
the one model. Each reply runs on a worker thread that holds the engine the way a socket client's
reply does (EngineServer.holding: one at a time, in line, cancelled by stop()); its text crosses
to uvicorn's event loop through a queue. A client that goes away cancels its reply: while it
waits in line, while the prompt is evaluated, or between tokens.

Only loopback addresses unless `--allow-remote`, and then only with an API key, checked in
constant time on every request and never printed.
"""

from __future__ import annotations

import asyncio
import contextlib
import hmac
import ipaddress
import json
import secrets
import socket
import threading
import time
from collections.abc import AsyncIterator, Callable, Iterator
from dataclasses import dataclass, field
from typing import Any, Literal

import uvicorn
from starlette.applications import Starlette
from starlette.exceptions import HTTPException
from starlette.requests import ClientDisconnect, Request
from starlette.responses import JSONResponse, Response, StreamingResponse
from starlette.routing import Route
from starlette.types import ASGIApp, Receive, Scope, Send

from wizardchat.chat.conversation import Conversation, Turn
from wizardchat.chat.reply import Reply
from wizardchat.engine.generate import GenerationStats, TokenStream
from wizardchat.engine.llama_engine import LlamaEngine
from wizardchat.errors import ServerError, UsageError, WizardchatError
from wizardchat.serve.openai_requests import (
    ApiError,
    Params,
    StopStrings,
    bad_request,
    parse_messages,
    parse_params,
    parse_prompt,
    parse_tokenize,
)
from wizardchat.serve.server import EngineServer, _RequestError

API_KEY_ENV = "WIZARDCHAT_API_KEY"
DEFAULT_HOST = "127.0.0.1"
MAX_BODY_BYTES = 8 << 20  # a request body past this is refused (413) before it is parsed
COMPLETIONS_MAX_TOKENS = 16  # OpenAI's default for /v1/completions; chat replies fill the context
DISCONNECT_POLL_SECONDS = 0.25  # how soon a client gone before its reply starts is noticed
START_TIMEOUT_SECONDS = 30.0
SHUTDOWN_SECONDS = 10.0


# --- where it listens ---------------------------------------------------------------------------


@dataclass(frozen=True)
class Address:
    """A host and TCP port to listen on."""

    host: str
    port: int

    @property
    def loopback(self) -> bool:
        """Whether only this machine can reach it."""
        if self.host == "localhost":
            return True
        try:
            return ipaddress.ip_address(self.host).is_loopback
        except ValueError:
            return False

    def __str__(self) -> str:
        host = f"[{self.host}]" if ":" in self.host else self.host
        return f"{host}:{self.port}"

    @property
    def url(self) -> str:
        """The API's base URL, as OpenAI clients take it."""
        return f"http://{self}/v1"


def parse_address(text: str) -> Address:
    """`--http`'s value: PORT (on 127.0.0.1), HOST:PORT or [IPv6]:PORT; UsageError otherwise."""
    raw = text.strip()
    if raw.startswith("["):
        host, sep, port = raw[1:].partition("]:")
    elif ":" not in raw:
        host, sep, port = DEFAULT_HOST, ":", raw
    elif raw.count(":") == 1:
        host, sep, port = raw.partition(":")
    else:  # a bare IPv6 address: without brackets its port is ambiguous
        host, sep, port = "", "", ""
    if not (host and sep and port.isascii() and port.isdigit() and int(port) <= 65535):
        raise UsageError(
            f"--http: {text!r} is not [HOST:]PORT (e.g. 8080, 127.0.0.1:8080 or [::1]:8080)"
        )
    return Address(host, int(port))


@dataclass(frozen=True)
class HttpOptions:
    """Where the API listens and the key it requires (None: none), checked for exposure."""

    address: Address
    api_key: str | None = field(default=None, repr=False)  # never in a log or a traceback

    @classmethod
    def of(cls, text: str, *, allow_remote: bool, api_key: str | None) -> HttpOptions:
        """`--http`, `--allow-remote` and the key; UsageError for a non-loopback address
        without both of the latter."""
        address = parse_address(text)
        if not address.loopback:
            if not allow_remote:
                raise UsageError(
                    f"--http {address}: not a loopback address; listening there needs "
                    f"--allow-remote and an API key (--api-key or {API_KEY_ENV})"
                )
            if not api_key:
                raise UsageError(
                    f"--http {address}: --allow-remote needs an API key "
                    f"(--api-key KEY or {API_KEY_ENV})"
                )
        return cls(address, api_key or None)

    def listen(self) -> tuple[socket.socket, Address]:
        """A socket bound to the address (now, so a taken port fails before the model loads)
        and the address it got (port 0: a free port)."""
        host, port = self.address.host, self.address.port
        try:
            infos = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE)
        except socket.gaierror as e:
            raise UsageError(f"--http {self.address}: {e.strerror or e}") from None
        family, kind, proto, _, sockaddr = infos[0]
        sock = socket.socket(family, kind, proto)
        try:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            sock.bind(sockaddr)
        except OSError as e:
            sock.close()
            raise UsageError(
                f"--http {self.address}: cannot listen there ({e.strerror or e})"
            ) from None
        return sock, Address(self.address.host, int(sock.getsockname()[1]))


@contextlib.contextmanager
def serving(
    server: EngineServer, sock: socket.socket, options: HttpOptions, *, system: str
) -> Iterator[None]:
    """The API served by uvicorn on a thread of its own, `sock` listening, for the block
    (`system`: the system prompt of a chat whose messages give none)."""
    app: ASGIApp = Api(server, system=system, api_key=options.api_key).app()
    config = uvicorn.Config(
        app,
        lifespan="off",
        log_config=None,  # its warnings and errors still reach stderr; no access log, no banner
        log_level="warning",
        access_log=False,
        proxy_headers=False,
        server_header=False,
        timeout_graceful_shutdown=int(SHUTDOWN_SECONDS / 2),
    )
    http = uvicorn.Server(config)
    thread = threading.Thread(
        target=http.run, kwargs={"sockets": [sock]}, name="http-api", daemon=True
    )
    thread.start()
    deadline = time.monotonic() + START_TIMEOUT_SECONDS
    while not http.started:
        if not thread.is_alive() or time.monotonic() > deadline:
            http.should_exit = True
            raise ServerError("the OpenAI-compatible API did not start")
        time.sleep(0.02)
    try:
        yield
    finally:
        http.should_exit = True
        thread.join(SHUTDOWN_SECONDS)


# --- errors in OpenAI's shape --------------------------------------------------------------------


def error_response(error: ApiError) -> JSONResponse:
    """An ApiError as an HTTP response."""
    headers = {"WWW-Authenticate": "Bearer"} if error.status == 401 else None
    return JSONResponse(error.body(), status_code=error.status, headers=headers)


STOPPING = ApiError(503, "the server is stopping", kind="server_error", code="stopping")


async def _http_error(request: Request, exc: Exception) -> Response:
    """Starlette's own errors (404, 405) in OpenAI's shape."""
    status = exc.status_code if isinstance(exc, HTTPException) else 500
    detail = exc.detail if isinstance(exc, HTTPException) else "internal error"
    code = "not_found" if status == 404 else None
    return error_response(ApiError(status, str(detail), code=code))


async def _internal_error(request: Request, exc: Exception) -> Response:
    """A bug: a 500 in OpenAI's shape (uvicorn logs the traceback)."""
    return error_response(ApiError(500, "internal error", kind="server_error"))


class _KeyCheck:
    """Lets through only requests with `Authorization: Bearer KEY` (compared in constant time)."""

    def __init__(self, app: ASGIApp, key: str) -> None:
        self.app = app
        self.key = key.encode("utf-8")

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "http" and not self._allowed(scope):
            error = ApiError(
                401,
                "a valid API key is required (Authorization: Bearer KEY)",
                code="invalid_api_key",
            )
            await error_response(error)(scope, receive, send)
            return
        await self.app(scope, receive, send)

    def _allowed(self, scope: Scope) -> bool:
        given = b""
        for name, value in scope.get("headers", []):
            if name.lower() == b"authorization":
                scheme, _, token = bytes(value).strip().partition(b" ")
                if scheme.lower() == b"bearer":
                    given = token.strip()
        return hmac.compare_digest(given, self.key)


# --- the request body ----------------------------------------------------------------------------


async def _json_body(request: Request) -> dict[str, Any]:
    """The body as a JSON object, at most MAX_BODY_BYTES (ApiError otherwise)."""
    too_big = ApiError(
        413, f"the request body is over {MAX_BODY_BYTES >> 20} MiB", code="request_too_large"
    )
    length = request.headers.get("content-length", "")
    if length.isascii() and length.isdigit() and int(length) > MAX_BODY_BYTES:
        raise too_big
    chunks: list[bytes] = []
    size = 0
    async for chunk in request.stream():
        size += len(chunk)
        if size > MAX_BODY_BYTES:
            raise too_big
        chunks.append(chunk)
    try:
        body = json.loads(b"".join(chunks))
    except (ValueError, RecursionError):
        raise bad_request("the request body is not valid JSON") from None
    if not isinstance(body, dict):
        raise bad_request("the request body must be a JSON object")
    return body


# --- one reply, on a worker thread ---------------------------------------------------------------


@dataclass(frozen=True)
class Event:
    """What the worker tells the request: ready (the prompt fits), text, end, or an error."""

    kind: Literal["ready", "text", "end", "error"]
    text: str = ""
    finish: str = ""
    usage: dict[str, int] = field(default_factory=dict)
    error: ApiError | None = None


class Job:
    """One reply's worker and its request: events one way, a cancel the other."""

    def __init__(self, loop: asyncio.AbstractEventLoop) -> None:
        self.loop = loop
        self.events: asyncio.Queue[Event] = asyncio.Queue()
        self._lock = threading.Lock()
        self._cancel: threading.Event | None = None
        self._gone = False

    def put(self, event: Event) -> None:
        """Hand `event` to the request (from the worker thread)."""
        try:
            self.loop.call_soon_threadsafe(self.events.put_nowait, event)
        except RuntimeError:  # the event loop is closed: nobody is listening any more
            self.abandon()

    def attach(self, cancel: threading.Event) -> None:
        """The reply's cancel event (set at once if the client is already gone)."""
        with self._lock:
            self._cancel = cancel
            if self._gone:
                cancel.set()

    def abandon(self) -> None:
        """The client is gone (or done): stop the reply at the next token, or its wait."""
        with self._lock:
            self._gone = True
            if self._cancel is not None:
                self._cancel.set()


class _Owned:
    """A token stream whose generator can be closed here, whoever iterates it."""

    def __init__(self, stream: TokenStream) -> None:
        self.stream = stream
        self.stats: GenerationStats = stream.stats
        self._tokens: Iterator[tuple[int, str]] | None = None

    def __iter__(self) -> Iterator[tuple[int, str]]:
        self._tokens = iter(self.stream)
        return self._tokens

    def close(self) -> None:
        close = getattr(self._tokens, "close", None)
        if close is not None:
            close()  # its `finally` runs now, while this reply still holds the engine


class _Texts:
    """A reply's text as it streams, and how it ended ("stop", "eos", "length", "interrupted")."""

    def __init__(self, tokens: _Owned, turn: Turn | None) -> None:
        self.tokens = tokens
        # A chat reply goes through chat/reply.py: the `USER:` stop, the text `ask` shows.
        self.reply = (
            Reply(turn, tokens, record=lambda t: None, context_limited=False) if turn else None
        )

    def __iter__(self) -> Iterator[str]:
        if self.reply is not None:
            return iter(self.reply)
        return (piece for _, piece in self.tokens)

    def finish(self) -> str:
        """Why it ended (after close)."""
        if self.reply is not None:
            return self.reply.result.finish
        return self.tokens.stats.finish or "interrupted"

    def close(self) -> None:
        if self.reply is not None:
            self.reply.close()
        self.tokens.close()


@dataclass(frozen=True)
class Prompt:
    """A reply to generate: the prompt's token ids, and the chat turn when it is a chat."""

    tokens: list[int]
    turn: Turn | None


# --- the application -----------------------------------------------------------------------------


class Api:
    """The endpoints, over one EngineServer."""

    def __init__(self, server: EngineServer, *, system: str, api_key: str | None) -> None:
        self.server = server
        self.system = system
        self._key = api_key
        self.model = server.entry.model_name
        self.created = int(server.entry.started)
        # The server's sampler settings: a request's own fields change them for its reply only.
        self.defaults = dict(server.info.get("sampling") or {})

    def app(self) -> ASGIApp:
        """The ASGI application (behind the key check when a key is set)."""
        app = Starlette(
            routes=[
                Route("/v1/models", self.models, methods=["GET"]),
                Route("/v1/models/{model:path}", self.model_info, methods=["GET"]),
                Route("/v1/chat/completions", self.chat, methods=["POST"]),
                Route("/v1/completions", self.completions, methods=["POST"]),
                Route("/tokenize", self.tokenize, methods=["POST"]),
            ],
            exception_handlers={HTTPException: _http_error, Exception: _internal_error},
        )
        return _KeyCheck(app, self._key) if self._key else app

    # --- endpoints ---------------------------------------------------------------------------

    def _model_object(self) -> dict[str, Any]:
        return {
            "id": self.model,
            "object": "model",
            "created": self.created,
            "owned_by": "wizardchat",
            "max_model_len": self.server.info.get("n_ctx"),  # vLLM's field: the context length
        }

    async def models(self, request: Request) -> Response:
        """GET /v1/models: the one model."""
        return JSONResponse({"object": "list", "data": [self._model_object()]})

    async def model_info(self, request: Request) -> Response:
        """GET /v1/models/{id}."""
        if request.path_params["model"] != self.model:
            missing = f"no model {request.path_params['model']!r} here"
            return error_response(ApiError(404, missing, code="model_not_found", param="model"))
        return JSONResponse(self._model_object())

    async def chat(self, request: Request) -> Response:
        """POST /v1/chat/completions."""
        try:
            body = await _json_body(request)
            messages = parse_messages(body)
            params = parse_params(body, self.defaults, None)
        except ApiError as e:
            return error_response(e)
        except ClientDisconnect:
            return Response(status_code=400)
        system = self.system if messages.system is None else messages.system

        def prompt(engine: LlamaEngine) -> Prompt:
            conv = Conversation.on(engine, system)
            for user, reply in messages.history:  # as session.restore rebuilds a saved chat
                turn = conv.new_turn(user)
                turn.reply = reply
                turn.reply_tokens = conv.reply_ids(reply)
                conv.close(turn)
            turn = conv.new_turn(messages.last)
            return Prompt(conv.prompt(turn), turn)

        return await self._respond(request, prompt, params, chat=True)

    async def completions(self, request: Request) -> Response:
        """POST /v1/completions."""
        try:
            body = await _json_body(request)
            text = parse_prompt(body)
            params = parse_params(body, self.defaults, COMPLETIONS_MAX_TOKENS)
        except ApiError as e:
            return error_response(e)
        except ClientDisconnect:
            return Response(status_code=400)
        return await self._respond(
            request,
            # A raw prompt's `</s>` is the end-of-sequence token, as llama-server and
            # llama-cpp-python's server read it: the Vicuna string of a chat holds them. BOS
            # comes first when the model's file says so, as llama.cpp tokenizes a prompt.
            lambda engine: Prompt(
                [engine.bos] * engine.add_bos + engine.tokenize(text, special=True), None
            ),
            params,
            chat=False,
        )

    async def tokenize(self, request: Request) -> Response:
        """POST /tokenize, as llama-server has it: `{"content": TEXT, "add_special": false}` ->
        `{"tokens": [...]}` (special tokens in the text parsed, as /v1/completions does)."""
        try:
            body = await _json_body(request)
            text = parse_tokenize(body)
        except ApiError as e:
            return error_response(e)
        except ClientDisconnect:
            return Response(status_code=400)
        add_bos = body.get("add_special") is True

        def tokens() -> list[int]:
            with self.server.holding() as engine:
                bos = [engine.bos] * (add_bos and engine.add_bos)  # as llama-server: the file's
                return bos + engine.tokenize(text, special=True)

        try:
            return JSONResponse({"tokens": await asyncio.to_thread(tokens)})
        except _RequestError:
            return error_response(STOPPING)

    # --- the reply ---------------------------------------------------------------------------

    async def _respond(
        self,
        request: Request,
        prompt: Callable[[LlamaEngine], Prompt],
        params: Params,
        *,
        chat: bool,
    ) -> Response:
        job = Job(asyncio.get_running_loop())
        worker = threading.Thread(
            target=self._generate, args=(job, prompt, params), name="http-reply", daemon=True
        )
        worker.start()
        first = await self._next(job, request)
        if first is None:
            return Response(status_code=499)  # the client is gone: nobody reads this
        if first.error is not None:
            return error_response(first.error)
        ident = f"{'chatcmpl' if chat else 'cmpl'}-{secrets.token_hex(12)}"
        reply = _Shape(ident, self.model, chat)
        if params.stream:
            return _EventStream(self._events(job, reply, params), job)
        texts: list[str] = []
        while (event := await self._next(job, request)) is not None:
            if event.error is not None:
                return error_response(event.error)
            if event.kind == "text":
                texts.append(event.text)
            elif event.kind == "end":
                return JSONResponse(reply.whole("".join(texts), event.finish, event.usage))
        return Response(status_code=499)

    async def _next(self, job: Job, request: Request) -> Event | None:
        """The worker's next event; None (and the reply cancelled) when the client is gone."""
        while True:
            try:
                return await asyncio.wait_for(job.events.get(), DISCONNECT_POLL_SECONDS)
            except asyncio.TimeoutError:
                if await request.is_disconnected():
                    job.abandon()
                    return None

    async def _events(self, job: Job, reply: _Shape, params: Params) -> AsyncIterator[bytes]:
        """The reply as server-sent events, OpenAI's chunks, then `[DONE]`."""
        try:
            yield _sse(reply.chunk("", None, first=True))
            while True:
                event = await job.events.get()
                if event.error is not None:
                    yield _sse(event.error.body())
                    break
                if event.kind == "text":
                    yield _sse(reply.chunk(event.text, None))
                elif event.kind == "end":
                    yield _sse(reply.chunk("", event.finish))
                    if params.include_usage:
                        yield _sse(reply.usage_chunk(event.usage))
                    break
            yield b"data: [DONE]\n\n"
        finally:
            job.abandon()  # however the stream ends: a client gone stops the reply

    def _generate(self, job: Job, prompt: Callable[[LlamaEngine], Prompt], params: Params) -> None:
        """The worker: wait for the engine, check the prompt fits, stream the reply's text."""
        server = self.server
        try:
            with server.cancellable() as cancel:
                job.attach(cancel)
                with server.holding(cancel) as engine:
                    self._reply(job, engine, prompt(engine), params, cancel)
        except _RequestError as e:
            job.put(Event("error", error=STOPPING if e.kind == "stopping" else _server_error(e)))
        except ApiError as e:
            job.put(Event("error", error=e))
        except WizardchatError as e:  # loading the model again after keep-alive failed
            job.put(Event("error", error=_server_error(e)))
        except Exception as e:
            server.say(f"HTTP API: a reply failed: {type(e).__name__}: {e}")
            job.put(Event("error", error=ApiError(500, "internal error", kind="server_error")))

    def _reply(
        self,
        job: Job,
        engine: LlamaEngine,
        prompt: Prompt,
        params: Params,
        cancel: threading.Event,
    ) -> None:
        tokens = prompt.tokens
        if len(tokens) + 1 > engine.n_ctx:
            raise ApiError(
                413,
                f"the prompt is {len(tokens)} tokens; the context holds {engine.n_ctx} "
                "(prompt and reply together)",
                code="context_length_exceeded",
                param="messages" if prompt.turn else "prompt",
            )
        room = engine.n_ctx - len(tokens) - 1  # as Conversation.max_reply_tokens: EOS kept room
        budget = max(1, min(params.max_tokens, room) if params.max_tokens else room)
        self.server.start_reply(engine, tokens, params.sampling, params.seed)
        job.put(Event("ready"))
        stream = _Owned(engine.stream(tokens, budget, cancel, abort_prompt=True))
        texts = _Texts(stream, prompt.turn)
        stops = StopStrings(params.stops)
        try:
            for text in texts:
                if out := stops.push(text):
                    job.put(Event("text", out))
                if stops.stopped:
                    break
            else:
                if out := stops.flush():
                    job.put(Event("text", out))
        finally:
            texts.close()
        finish = "stop" if stops.stopped else texts.finish()
        if finish == "interrupted":  # cancelled: the client is gone, or the server stops
            job.put(Event("error", error=STOPPING))
            return
        stats = stream.stats
        usage = {
            "prompt_tokens": len(tokens),
            "completion_tokens": stats.completion_tokens,
            "total_tokens": len(tokens) + stats.completion_tokens,
        }
        job.put(Event("end", finish="length" if finish == "length" else "stop", usage=usage))


def _server_error(e: Exception) -> ApiError:
    return ApiError(500, str(e), kind="server_error")


@dataclass(frozen=True)
class _Shape:
    """OpenAI's response objects of one reply: a chat completion or a text completion."""

    ident: str
    model: str
    chat: bool
    created: int = field(default_factory=lambda: int(time.time()))

    def _head(self, chunk: bool) -> dict[str, Any]:
        kind = ("chat.completion" if self.chat else "text_completion") + (
            ".chunk" if chunk and self.chat else ""
        )
        return {"id": self.ident, "object": kind, "created": self.created, "model": self.model}

    def whole(self, text: str, finish: str, usage: dict[str, int]) -> dict[str, Any]:
        """The reply in one response."""
        choice: dict[str, Any] = {"index": 0, "finish_reason": finish, "logprobs": None}
        if self.chat:
            choice["message"] = {"role": "assistant", "content": text}
        else:
            choice["text"] = text
        return {**self._head(False), "choices": [choice], "usage": usage}

    def chunk(self, text: str, finish: str | None, *, first: bool = False) -> dict[str, Any]:
        """One streamed piece (the first names the role; the last has the finish reason)."""
        choice: dict[str, Any] = {"index": 0, "finish_reason": finish, "logprobs": None}
        if self.chat:
            delta: dict[str, Any] = {"role": "assistant", "content": ""} if first else {}
            if text:
                delta["content"] = text
            choice["delta"] = delta
        else:
            choice["text"] = text
        return {**self._head(True), "choices": [choice]}

    def usage_chunk(self, usage: dict[str, int]) -> dict[str, Any]:
        """The last chunk when `stream_options.include_usage` asks for it."""
        return {**self._head(True), "choices": [], "usage": usage}


def _sse(data: dict[str, Any]) -> bytes:
    return b"data: " + json.dumps(data, ensure_ascii=False).encode("utf-8") + b"\n\n"


class _EventStream(StreamingResponse):
    """Server-sent events whose reply is cancelled however the response ends (a client gone
    mid-send cancels the task without closing the generator)."""

    def __init__(self, events: AsyncIterator[bytes], job: Job) -> None:
        super().__init__(
            events,
            media_type="text/event-stream",
            headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"},
        )
        self.job = job

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        try:
            await super().__call__(scope, receive, send)
        finally:
            self.job.abandon()
