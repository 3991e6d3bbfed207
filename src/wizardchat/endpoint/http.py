"""HTTP to an OpenAI-compatible server: JSON requests, and a reply streamed as server-sent events.

The standard library's http.client: it starts in milliseconds (an `ask` pays every import), and
its HTTPS verifies certificates and host names with the system's trust store
(ssl.create_default_context); there is no switch to turn that off. Proxies are not used.

Everything the server sends is untrusted: bodies are read up to a bound, JSON is checked for the
shape it must have, and an answer that is not JSON (an HTML error page, a login portal) is named
as such in one line. The API key goes in the Authorization header and nowhere else: no message
quotes a header or a URL's credentials.
"""

from __future__ import annotations

import contextlib
import http.client
import json
import queue
import socket
import ssl
import threading
import time
import urllib.parse
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any

from wizardchat.errors import EndpointError, UsageError

CONNECT_TIMEOUT = 10.0
REQUEST_TIMEOUT = 60.0  # a JSON request (models, tokenize) that takes longer has failed
STALL_TIMEOUT = 120.0  # a stream with no byte for this long is cut (a big prompt can take long)
MAX_BODY = 16 << 20  # a JSON answer past this is not one this client asked for
MAX_EVENT = 1 << 20  # one server-sent event line
RETRIES = 3  # 429 and 5xx before the first token: tries after the first
RETRY_AFTER_MAX = 30.0


@dataclass(frozen=True)
class Endpoint:
    """An OpenAI-compatible base URL (`http://host:8000/v1`) and the key to send it."""

    scheme: str
    host: str
    port: int
    path: str  # the base path, without a trailing slash: "/v1"
    api_key: str | None = None

    @classmethod
    def parse(cls, url: str, api_key: str | None = None) -> Endpoint:
        """`--endpoint`'s value (UsageError when it is not an http(s) URL with a host)."""
        text = url.strip()
        if "://" not in text:
            text = f"http://{text}"
        try:
            parts = urllib.parse.urlsplit(text)
            port = parts.port
        except ValueError as e:
            raise UsageError(f"--endpoint: not a URL ({e})") from None
        if parts.scheme not in ("http", "https") or not parts.hostname:
            raise UsageError(
                "--endpoint: expected an http:// or https:// URL with a host, "
                "such as http://127.0.0.1:8000/v1"
            )
        if parts.username or parts.password:
            raise UsageError(
                "--endpoint: put the key in --api-key or WIZARDCHAT_API_KEY, not the URL"
            )
        if parts.query or parts.fragment:
            raise UsageError("--endpoint: the base URL takes no query or fragment")
        path = parts.path.rstrip("/")
        default_port = 443 if parts.scheme == "https" else 80
        return cls(parts.scheme, parts.hostname, port or default_port, path, api_key or None)

    @property
    def url(self) -> str:
        """The base URL as messages show it (never with credentials)."""
        host = f"[{self.host}]" if ":" in self.host else self.host
        default = self.port == (443 if self.scheme == "https" else 80)
        return f"{self.scheme}://{host}{'' if default else f':{self.port}'}{self.path}"

    @property
    def root(self) -> str:
        """The server's own path (the base without its trailing /v1): where llama-server and
        vLLM put /tokenize and /props."""
        return self.path[: -len("/v1")] if self.path.endswith("/v1") else self.path

    def headers(self, body: bool) -> dict[str, str]:
        """The request headers: the key as a Bearer token, JSON in and out."""
        out = {"Accept": "application/json, text/event-stream", "User-Agent": "wizardchat"}
        if body:
            out["Content-Type"] = "application/json"
        if self.api_key:
            out["Authorization"] = f"Bearer {self.api_key}"
        return out


class HttpStatusError(EndpointError):
    """The server answered with an error status."""

    def __init__(self, message: str, status: int, retry_after: float | None = None) -> None:
        super().__init__(message)
        self.status = status
        self.retry_after = retry_after


def _connection(endpoint: Endpoint, timeout: float) -> http.client.HTTPConnection:
    if endpoint.scheme == "https":
        context = ssl.create_default_context()
        return http.client.HTTPSConnection(
            endpoint.host, endpoint.port, timeout=timeout, context=context
        )
    return http.client.HTTPConnection(endpoint.host, endpoint.port, timeout=timeout)


def _unreachable(endpoint: Endpoint, e: BaseException) -> EndpointError:
    if isinstance(e, ssl.SSLCertVerificationError):
        why = f"its TLS certificate did not verify ({e.verify_message})"
    elif isinstance(e, ssl.SSLError):
        why = f"TLS failed ({e.reason or e})"
    elif isinstance(e, socket.gaierror):
        why = f"the host name does not resolve ({e.strerror or e})"
    elif isinstance(e, TimeoutError):
        why = "it did not answer in time"
    elif isinstance(e, OSError) and e.strerror:
        why = e.strerror[0].lower() + e.strerror[1:]
    else:
        why = str(e) or type(e).__name__
    return EndpointError(f"the endpoint {endpoint.url} cannot be reached: {why}")


def _status_error(endpoint: Endpoint, status: int, headers: Any, body: bytes) -> HttpStatusError:
    """One line for an error status, with the server's own message when it gave one."""
    message = _error_message(body, headers.get("Content-Type", ""))
    what = {
        401: "refused the API key (401)"
        if endpoint.api_key
        else "needs an API key (401): set --api-key or WIZARDCHAT_API_KEY",
        403: "refused the request (403: forbidden)",
        404: "has no such path or model (404)",
        429: "is busy (429: too many requests)",
    }.get(status, f"failed ({status})")
    retry_after = None
    value = headers.get("Retry-After", "")
    if value.strip().isdigit():
        retry_after = min(float(value.strip()), RETRY_AFTER_MAX)
    detail = f": {message}" if message else ""
    return HttpStatusError(f"the endpoint {endpoint.url} {what}{detail}", status, retry_after)


def _error_message(body: bytes, content_type: str) -> str:
    """The `error.message` (or `detail`) of an error body; "" when there is none."""
    try:
        data = json.loads(body)
    except ValueError:
        return "an HTML page, not an API answer" if "html" in content_type.lower() else ""
    error = data.get("error") if isinstance(data, dict) else None
    text = error.get("message") if isinstance(error, dict) else error
    if text is None and isinstance(data, dict):
        text = data.get("detail") or data.get("message")
    return " ".join(str(text).split())[:300] if text else ""


def _not_json(endpoint: Endpoint, path: str, content_type: str) -> EndpointError:
    kind = "an HTML page" if "html" in content_type.lower() else "something that is not JSON"
    return EndpointError(
        f"the endpoint {endpoint.url} answered {path} with {kind}: "
        "is this the base URL of an OpenAI-compatible API (it usually ends in /v1)?"
    )


def request_json(
    endpoint: Endpoint, method: str, path: str, body: Any = None, timeout: float = REQUEST_TIMEOUT
) -> Any:
    """One request and its JSON answer (EndpointError, HttpStatusError)."""
    data = None if body is None else json.dumps(body).encode("utf-8")
    conn = _connection(endpoint, min(timeout, CONNECT_TIMEOUT))
    try:
        try:
            conn.connect()
            conn.sock.settimeout(timeout)
            conn.request(method, path, body=data, headers=endpoint.headers(data is not None))
            response = conn.getresponse()
            payload = response.read(MAX_BODY + 1)
        except (OSError, http.client.HTTPException) as e:
            raise _unreachable(endpoint, e) from None
        if response.status >= 400:
            raise _status_error(endpoint, response.status, response.headers, payload)
        if len(payload) > MAX_BODY:
            raise EndpointError(f"the endpoint {endpoint.url} answered {path} with over 16 MiB")
        try:
            return json.loads(payload)
        except ValueError:
            raise _not_json(endpoint, path, response.headers.get("Content-Type", "")) from None
    finally:
        conn.close()


class EventStream:
    """The `data:` events of a streamed answer, as JSON objects, read on a thread of their own.

    The reading thread blocks on the socket; the consumer waits on a queue and so can stop at
    any moment (cancel, Ctrl-C) by closing the stream, and notices a server that stops sending
    (STALL_TIMEOUT without a byte). `[DONE]` ends it.
    """

    def __init__(
        self, endpoint: Endpoint, conn: http.client.HTTPConnection, response: Any, stall: float
    ) -> None:
        self.endpoint = endpoint
        self.conn = conn
        self.response = response
        self.stall = stall
        self.done = False  # `[DONE]` came: the answer was whole
        self._events: queue.Queue[tuple[str, Any]] = queue.Queue()
        self._closed = threading.Event()
        self._thread = threading.Thread(target=self._read, name="endpoint-stream", daemon=True)
        self._thread.start()

    def _read(self) -> None:
        try:
            self._read_events()
        except TimeoutError:  # the socket's timeout is the stall time
            self._events.put(("stall", None))
        except Exception as e:  # closed under readline(): http.client breaks in any way
            if not self._closed.is_set():
                self._events.put(("error", f"the connection failed ({e.__class__.__name__})"))
        finally:
            self.conn.close()  # here, not in close(): never under this thread's readline()

    def _read_events(self) -> None:
        while not self._closed.is_set():
            line = self.response.readline(MAX_EVENT + 1)
            if not line:
                self._events.put(("end", None))
                return
            if len(line) > MAX_EVENT:
                self._events.put(("error", "an event line over 1 MiB"))
                return
            text = line.decode("utf-8", errors="replace").strip()
            if not text.startswith("data:"):
                continue  # blank separators, `event:`, `id:`, `:` comments (keep-alives)
            data = text[5:].strip()
            if data == "[DONE]":
                self._events.put(("done", None))
                return
            try:
                self._events.put(("event", json.loads(data)))
            except ValueError:
                self._events.put(("error", "an event that is not JSON"))
                return

    def events(self, cancel: threading.Event, poll: float = 0.05) -> Iterator[dict[str, Any]]:
        """Each event as it comes; returns at `[DONE]`, at the end of the answer, or as soon as
        `cancel` is set. EndpointError when the stream is cut, stalls or breaks the format."""
        last = time.monotonic()
        while not cancel.is_set():
            try:
                kind, value = self._events.get(timeout=poll)
            except queue.Empty:
                if time.monotonic() - last > self.stall:
                    raise self._stalled() from None
                continue
            last = time.monotonic()
            if kind == "stall":
                raise self._stalled()
            if kind == "event":
                if not isinstance(value, dict):
                    raise EndpointError(f"the endpoint {self.endpoint.url} sent an event that "
                                        "is not a JSON object")  # fmt: skip
                yield value
            elif kind == "done":
                self.done = True
                return
            elif kind == "end":
                return  # the caller decides whether an end without [DONE] cut the reply
            else:
                raise EndpointError(f"the endpoint {self.endpoint.url} broke the stream: {value}")

    def _stalled(self) -> EndpointError:
        return EndpointError(
            f"the endpoint {self.endpoint.url} sent nothing for {self.stall:g} s: the reply is "
            "given up (--endpoint-timeout sets how long to wait)"
        )

    def close(self) -> None:
        """Stop reading: the connection is shut down, which tells the server to stop
        generating; the reading thread ends on it and closes the connection."""
        self._closed.set()
        sock = self.conn.sock
        if sock is not None:
            with contextlib.suppress(OSError):
                sock.shutdown(socket.SHUT_RDWR)


def open_stream(
    endpoint: Endpoint,
    path: str,
    body: dict[str, Any],
    cancel: threading.Event,
    *,
    notify: Callable[[str], None],
    stall: float = STALL_TIMEOUT,
) -> EventStream | None:
    """POST `body` to `path` and return its event stream (None when `cancel` was set first).

    Nothing has been generated before the answer's status: a 429 or a 5xx (the server busy,
    restarting, or behind a gateway that is) is tried again after a pause (Retry-After when
    the server gives one), RETRIES times. Errors after the first event are never retried.
    """
    data = json.dumps(body).encode("utf-8")
    for attempt in range(RETRIES + 1):
        conn = _connection(endpoint, CONNECT_TIMEOUT)
        try:
            conn.connect()
            conn.sock.settimeout(stall)
            conn.request("POST", path, body=data, headers=endpoint.headers(True))
            response = conn.getresponse()
        except (OSError, http.client.HTTPException) as e:
            conn.close()
            raise _unreachable(endpoint, e) from None
        if response.status < 400:
            content_type = response.headers.get("Content-Type", "")
            if "text/event-stream" not in content_type:
                conn.close()
                raise _not_json(endpoint, path, content_type)
            return EventStream(endpoint, conn, response, stall)
        try:
            payload = response.read(MAX_BODY)
        except (OSError, http.client.HTTPException):
            payload = b""
        conn.close()
        error = _status_error(endpoint, response.status, response.headers, payload)
        if (response.status != 429 and response.status < 500) or attempt == RETRIES:
            raise error
        pause = error.retry_after if error.retry_after is not None else 0.5 * 2**attempt
        notify(f"{error} — trying again in {pause:g} s")
        if cancel.wait(pause):
            return None
    raise AssertionError("unreachable")  # pragma: no cover
