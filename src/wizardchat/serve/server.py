"""`wizardchat serve`: one loaded engine behind a Unix socket, one reply at a time.

The server is the engine, not the chat: clients keep the conversation (its Vicuna turns as token
ids, eviction, the stop on `USER:`, sessions) and ask for what LlamaEngine does, one request per
connection (serve/protocol.py). A reply holds the engine; other replies wait their turn and are
told so. Every reply may be cancelled between tokens or in the middle of its prompt by the
client (a cancel message, or the connection closing), so a client killed mid-reply frees the
engine at the next token.

After `keep_alive` seconds without a request the model is unloaded (its memory given back) and
loaded again by the next request that needs it.
"""

from __future__ import annotations

import contextlib
import dataclasses
import os
import socket
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

from wizardchat.engine.llama_engine import LlamaEngine
from wizardchat.errors import KvStateError, WizardchatError
from wizardchat.serve import registry
from wizardchat.serve.protocol import VERSION, LineReader, ProtocolError, send
from wizardchat.serve.switch import ConversationCaches

ACCEPT_POLL_SECONDS = 0.2  # how soon the accept loop sees a stop request
STOP_GRACE_SECONDS = 10.0  # how long a stop waits for the current reply to end


class _ProgressRelay:
    """Passes the prompt's evaluation progress to the client (LlamaEngine's EvalProgress)."""

    def __init__(self, conn: socket.socket) -> None:
        self.conn = conn

    def update(self, done: int, total: int) -> None:
        with contextlib.suppress(OSError):
            send(self.conn, {"event": "progress", "done": done, "total": total})

    def end(self) -> None:
        with contextlib.suppress(OSError):
            send(self.conn, {"event": "prompt_done"})


class EngineServer:
    """Serves `load()`'s engine on `entry.socket` until stop() (or a signal calling it)."""

    def __init__(
        self,
        load: Callable[[], LlamaEngine],
        entry: registry.ServerEntry,
        *,
        keep_alive: float | None,
        say: Callable[[str], None],
        switch_bytes: int = 0,
    ) -> None:
        self._load = load
        self.entry = entry
        self.keep_alive = keep_alive  # seconds; None: never unload
        self.say = say
        self.engine: LlamaEngine | None = None
        self.info: dict[str, Any] = {}  # what hello answers, kept while unloaded
        self.load_count = 0
        self.replies = 0
        self.waiting = 0
        self.last_used = time.monotonic()
        self._lock = threading.Lock()  # held by whoever uses the engine
        self._stopping = threading.Event()
        self._cancels: set[threading.Event] = set()  # of the replies running or waiting
        self._cancels_lock = threading.Lock()
        self._listener: socket.socket | None = None
        # Copies of other conversations' caches, switched in when their client comes back.
        self.caches = ConversationCaches(switch_bytes, say=say)

    # --- the model -------------------------------------------------------------------------

    def load_now(self) -> LlamaEngine:
        """Load the model (the caller holds the engine lock, or nobody else runs yet)."""
        engine = self._load()
        self.engine = engine
        self.load_count += 1
        self.info = {
            "version": VERSION,
            "pid": os.getpid(),
            "model": self.entry.model,
            "model_name": engine.model_name,
            "n_ctx": engine.n_ctx,
            "bos": engine.bos,
            "eos": engine.eos,
            "add_bos": engine.add_bos,
            "eos_text": engine.eos_text,
            "space_prefix": engine.space_prefix,
            "seed": engine.seed,
            "sampling": dataclasses.asdict(engine.sampling),
            "plan_line": engine.plan_line(),
            "describe": engine.describe(),
            "settings": self.entry.settings,
        }
        return engine

    def _engine(self, on_loading: Callable[[], None] | None) -> LlamaEngine:
        """The loaded engine, loading it first if keep-alive unloaded it (telling the client)."""
        if self.engine is None:
            if on_loading is not None:
                on_loading()
            self.say("loading the model again (a client asked)")
            self.load_now()
        assert self.engine is not None
        return self.engine

    def _unload(self) -> None:
        self.caches.clear()
        if self.engine is not None:
            self.engine.close()
            self.engine = None

    def _keep_alive_loop(self) -> None:
        while not self._stopping.wait(1.0):
            if self.keep_alive is None or self.engine is None:
                continue
            if time.monotonic() - self.last_used < self.keep_alive:
                continue
            if self._lock.acquire(blocking=False):
                try:
                    if self.engine is not None:
                        self._unload()
                        self.say(f"unloaded the model after {self.keep_alive:g} s idle")
                finally:
                    self._lock.release()

    # --- serving ---------------------------------------------------------------------------

    def serve(self) -> None:
        """Accept connections until stop(); then end the current reply, answer the waiting
        clients, and remove the socket and the registry entry."""
        path = Path(self.entry.socket)
        with contextlib.suppress(FileNotFoundError):
            path.unlink()
        listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        old_umask = os.umask(0o177)  # the socket is created 0600: the user's alone
        try:
            listener.bind(str(path))
        finally:
            os.umask(old_umask)
        listener.listen(16)
        listener.settimeout(ACCEPT_POLL_SECONDS)
        self._listener = listener
        registry.register(self.entry)
        threads: list[threading.Thread] = []
        keeper = threading.Thread(target=self._keep_alive_loop, name="keep-alive", daemon=True)
        keeper.start()
        try:
            while not self._stopping.is_set():
                try:
                    conn, _ = listener.accept()
                except TimeoutError:
                    threads = [t for t in threads if t.is_alive()]
                    continue
                except OSError:
                    break
                t = threading.Thread(target=self._handle, args=(conn,), daemon=True)
                t.start()
                threads.append(t)
        finally:
            registry.unregister(self.entry)
            listener.close()
            self.stop()
            deadline = time.monotonic() + STOP_GRACE_SECONDS
            for t in threads:
                t.join(max(0.0, deadline - time.monotonic()))
            with self._lock_within(STOP_GRACE_SECONDS):
                self._unload()

    @contextlib.contextmanager
    def _lock_within(self, seconds: float) -> Any:
        got = self._lock.acquire(timeout=seconds)
        try:
            yield
        finally:
            if got:
                self._lock.release()

    def stop(self) -> None:
        """Stop serving: the reply running ends after its current token (safe from signals)."""
        self._stopping.set()
        with self._cancels_lock:
            for cancel in self._cancels:
                cancel.set()

    def _handle(self, conn: socket.socket) -> None:
        with conn:
            reader = LineReader(conn)
            try:
                request = reader.read()
                if request is None:
                    return
                op = request.get("op")
                if op == "stream":
                    self._stream(conn, reader, request)
                    return
                send(conn, {"ok": self._answer(op, request, conn)})
            except _RequestError as e:
                with contextlib.suppress(OSError):
                    send(conn, {"error": {"kind": e.kind, "message": str(e)}})
            except WizardchatError as e:  # loading again after keep-alive failed
                with contextlib.suppress(OSError):
                    send(conn, {"error": {"kind": "server", "message": str(e)}})
            except (OSError, ProtocolError):
                return  # the client went away or spoke nonsense: nothing to answer

    def _answer(self, op: Any, request: dict[str, Any], conn: socket.socket) -> Any:
        if op == "hello":
            return self.info
        if op == "status":
            return self.status()
        if op == "stop":
            threading.Thread(target=self.stop, daemon=True).start()
            return True
        handlers: dict[str, Callable[[LlamaEngine, dict[str, Any]], Any]] = {
            "tokenize": lambda e, r: e.tokenize(str(r["text"])),
            "pieces": lambda e, r: e.pieces(_ints(r["tokens"])),
            "kv_identity": lambda e, r: e.kv_identity(),
            "kv_held": lambda e, r: e.kv_held(_ints(r["tokens"])),
            "kv_keep": lambda e, r: e.kv_keep(int(r["n_tokens"])),
            "kv_save": lambda e, r: e.kv_save(Path(str(r["path"]))),
            "kv_load": self._kv_load,
        }
        handler = handlers.get(str(op))
        if handler is None:
            raise _RequestError("protocol", f"unknown request {op!r}")
        with self.holding(None, _teller(conn, "waiting"), _teller(conn, "loading")) as engine:
            try:
                return handler(engine, request)
            except (KeyError, TypeError) as e:
                raise _RequestError("protocol", f"a malformed {op} request ({e})") from None
            except ValueError as e:
                raise _RequestError("value", str(e)) from None
            except KvStateError as e:
                raise _RequestError("kv_state", str(e)) from None
            except OSError as e:
                raise _RequestError("os", e.strerror or str(e)) from None

    def _kv_load(self, engine: LlamaEngine, request: dict[str, Any]) -> list[int]:
        self.caches.before_replace(engine)  # the conversation in the cache may come back
        return engine.kv_load(Path(str(request["path"])))

    @contextlib.contextmanager
    def holding(
        self,
        cancel: threading.Event | None = None,
        on_wait: Callable[[], None] | None = None,
        on_loading: Callable[[], None] | None = None,
    ) -> Iterator[LlamaEngine]:
        """The engine, held for one request: in line behind the reply running (`on_wait` is
        told), loaded again if keep-alive unloaded it (`on_loading` is told). _RequestError
        when the server stops, or `cancel` is set, before its turn."""
        if not self._lock.acquire(blocking=False):
            if on_wait is not None:
                on_wait()
            self.waiting += 1
            try:
                while not self._lock.acquire(timeout=0.1):
                    if self._stopping.is_set() or (cancel is not None and cancel.is_set()):
                        raise _RequestError("stopping", "the server is stopping")
            finally:
                self.waiting -= 1
        try:
            if self._stopping.is_set():
                raise _RequestError("stopping", "the server is stopping")
            yield self._engine(on_loading)
        finally:
            self.last_used = time.monotonic()
            self._lock.release()

    @contextlib.contextmanager
    def cancellable(self) -> Iterator[threading.Event]:
        """A cancel event for one reply, set by stop() too."""
        cancel = threading.Event()
        with self._cancels_lock:
            self._cancels.add(cancel)
        try:
            if self._stopping.is_set():
                raise _RequestError("stopping", "the server is stopping")
            yield cancel
        finally:
            with self._cancels_lock:
                self._cancels.discard(cancel)

    def start_reply(
        self, engine: LlamaEngine, prompt: list[int], sampling: dict[str, Any], seed: Any
    ) -> None:
        """Ready `engine` for a reply to `prompt`: this request's sampler settings and seed, and
        the cache of its conversation switched in when a copy holds more of it."""
        if sampling:
            engine.set_sampling(**sampling)
        if seed is not None:
            engine.set_seed(int(seed))
        self.caches.prepare(engine, prompt)
        self.replies += 1

    def _stream(self, conn: socket.socket, reader: LineReader, request: dict[str, Any]) -> None:
        with self.cancellable() as cancel:

            def watch() -> None:  # a cancel message, or the client gone, stops the reply
                with contextlib.suppress(OSError, ProtocolError):
                    while (message := reader.read()) is not None:
                        if message.get("op") == "cancel":
                            break
                cancel.set()

            threading.Thread(target=watch, name="cancel-watch", daemon=True).start()
            with self.holding(cancel, _teller(conn, "waiting"), _teller(conn, "loading")) as engine:
                self._reply(conn, engine, request, cancel)

    def _reply(
        self,
        conn: socket.socket,
        engine: LlamaEngine,
        request: dict[str, Any],
        cancel: threading.Event,
    ) -> None:
        try:
            prompt = _ints(request["prompt"])
            max_tokens = int(request["max_tokens"])
            sampling = dict(request.get("sampling") or {})
            seed = request.get("seed")
        except (KeyError, TypeError, ValueError) as e:
            raise _RequestError("protocol", f"a malformed stream request ({e})") from None
        self.start_reply(engine, prompt, sampling, seed)
        progress = _ProgressRelay(conn) if request.get("progress") else None
        stream = engine.stream(prompt, max_tokens, cancel, abort_prompt=True, progress=progress)
        tokens = iter(stream)
        try:
            first = True
            for token, text in tokens:
                message: dict[str, Any] = {"event": "token", "id": token, "text": text}
                if first:  # what the prompt cost is known at the first token
                    message["evaluated"] = stream.stats.evaluated_tokens
                    first = False
                try:
                    send(conn, message)
                except OSError:
                    cancel.set()  # the client is gone: stop after this token
        finally:
            close = getattr(tokens, "close", None)
            if close is not None:
                close()
        stats = stream.stats
        with contextlib.suppress(OSError):
            send(
                conn,
                {
                    "event": "end",
                    "stats": {
                        "prompt_tokens": stats.prompt_tokens,
                        "evaluated_tokens": stats.evaluated_tokens,
                        "completion_tokens": stats.completion_tokens,
                        "prompt_seconds": stats.prompt_seconds,
                        "decode_seconds": stats.decode_seconds,
                        "finish": "interrupted" if self._stopping.is_set() else stats.finish,
                    },
                    "stopping": self._stopping.is_set(),
                },
            )

    def status(self) -> dict[str, Any]:
        """What `wizardchat ps` shows of this server."""
        return {
            "pid": os.getpid(),
            "model": self.entry.model,
            "loaded": self.engine is not None,
            "busy": self._lock.locked(),
            "waiting": self.waiting,
            "idle_seconds": round(time.monotonic() - self.last_used, 1),
            "load_count": self.load_count,
            "replies": self.replies,
            "kept_conversations": len(self.caches.kept),
            "kept_bytes": self.caches.nbytes,
            "switches": self.caches.switches,
            "keep_alive": self.keep_alive,
            "rss_bytes": _rss_bytes(),
            "http": self.entry.http,
        }


class _RequestError(Exception):
    """A request the server answers with an error (kind: a word the client maps to its error)."""

    def __init__(self, kind: str, message: str) -> None:
        super().__init__(message)
        self.kind = kind


def _teller(conn: socket.socket, event: str) -> Callable[[], None]:
    """A function that tells the client `event` (waiting in line, loading the model)."""
    return lambda: send(conn, {"event": event})


def _ints(values: Any) -> list[int]:
    if not isinstance(values, list) or not all(type(v) is int for v in values):
        raise TypeError("token ids must be a list of integers")
    return values


def _rss_bytes() -> int:
    """This process's resident memory (0 where /proc is not there)."""
    try:
        with open("/proc/self/status", encoding="ascii") as f:
            for line in f:
                if line.startswith("VmRSS:"):
                    return int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        pass
    return 0
