"""What llama.cpp says: its log lines (to a file, or stderr with --verbose) and its aborts.

llama.cpp reports through C callbacks that must stay alive as long as the library may call them;
one sink per process. An abort ends the process with one line and exit 5 instead of SIGABRT.
"""

from __future__ import annotations

import contextlib
import ctypes
import io
import os
import threading
from collections.abc import Callable
from pathlib import Path
from typing import IO, cast

from wizardchat.engine.llama_lib import lib
from wizardchat.errors import ExitCode
from wizardchat.safe_text import terminal_safe
from wizardchat.signals import before_fatal_exit


class _LogSink:
    """Where llama.cpp's log goes: a file, or stderr with --verbose. One per process."""

    ERROR = 4  # GGML_LOG_LEVEL_ERROR in ggml.h (llama_cpp/_logger.py says 3: stale)

    def __init__(self) -> None:
        self.stream: IO[str] | None = None
        self.last_error = ""  # llama.cpp's own reason when a load fails
        self.interrupted = False  # a Ctrl-C landed in this callback (load() re-raises it)
        self._lock = threading.Lock()
        # ctypes must keep the callback object alive for as long as llama.cpp may call it.
        self.callback = lib.llama_log_callback(self._write)

    def _write(self, level: int, text: bytes, user_data: ctypes.c_void_p) -> None:
        # An exception cannot cross the C frame: ctypes prints "Exception ignored" and drops
        # it. Ctrl-C during loading mostly lands here, while llama.cpp logs, so remember it.
        try:
            line = text.decode("utf-8", errors="replace")
            with self._lock:
                if level == self.ERROR and line.strip():
                    self.last_error = line.strip()
                if self.stream is not None and not self.stream.closed:
                    # The log quotes the model's path and metadata: untrusted text, read by people.
                    self.stream.write(terminal_safe(line))
                    self.stream.flush()
        except KeyboardInterrupt:
            self.interrupted = True

    def attach(self, stream: IO[str] | None) -> None:
        with self._lock:
            self.stream = stream
        lib.llama_log_set(self.callback, ctypes.c_void_p(0))


sink = _LogSink()  # the one sink: llama.cpp has one log callback per process
# Until a log is opened, llama.cpp's lines are dropped rather than printed on the terminal
# (llama.cpp's own default), as llama-cpp-python's quiet logger did.
sink.attach(None)


def route_llama_log(stream: IO[str] | None) -> None:
    """Send llama.cpp's log lines (all levels, DEBUG included) to `stream`; None drops them."""
    sink.attach(stream)


LOG_ROTATE_BYTES = 10 * 1024 * 1024  # a log larger than this is moved to llama.log.1 at open


class LlamaLog(io.TextIOBase):
    """llama.cpp's log file, which never stops the chat: the first failure to open or write
    it (read-only home, full disk) is reported once through `warn` and the rest is dropped."""

    def __init__(self, path: Path, warn: Callable[[str], None]) -> None:
        super().__init__()
        self.path = path
        self._warn = warn
        self._file: IO[str] | None = None
        try:
            path.parent.mkdir(parents=True, exist_ok=True)
            _rotate(path)
            self._file = path.open("a", encoding="utf-8")
        except OSError as e:
            self._fail(e)

    @property
    def name(self) -> str:
        """Where a reader finds llama.cpp's messages (error messages point there)."""
        return str(self.path) if self._file is not None else "--verbose shows llama.cpp's log"

    def _fail(self, e: OSError) -> None:
        if self._file is not None:
            with contextlib.suppress(OSError):
                self._file.close()  # the pending lines fail again; the file closes anyway
            self._file = None
        self._warn(
            f"llama.cpp log unavailable: {self.path}: {e.strerror or e}; continuing without it"
        )

    def write(self, text: str) -> int:
        if self._file is not None:
            try:
                self._file.write(text)
                self._file.flush()
            except OSError as e:
                self._fail(e)
        return len(text)

    def flush(self) -> None:
        pass  # every write is flushed (or dropped)

    def close(self) -> None:
        file, self._file = self._file, None
        if file is not None:
            try:
                file.close()
            except OSError as e:
                self._fail(e)
        super().close()


def open_llama_log(path: Path, warn: Callable[[str], None]) -> IO[str]:
    """Open llama.cpp's log file for appending (see LlamaLog); it never raises OSError."""
    return cast("IO[str]", LlamaLog(path, warn))  # a TextIOBase is a text IO at runtime


def _rotate(path: Path) -> None:
    """Keep one old log: move a log over LOG_ROTATE_BYTES to NAME.1 (replacing the older one)."""
    try:
        size = path.stat().st_size
    except FileNotFoundError:
        return
    if size > LOG_ROTATE_BYTES and path.is_file():
        with contextlib.suppress(OSError):  # then the log grows on: better than none
            path.replace(path.with_name(path.name + ".1"))


def _on_abort(message: bytes | None) -> None:
    """ggml's abort callback: one line on stderr and exit 5, instead of SIGABRT (exit 134).

    GGML_ABORT and GGML_ASSERT call it just before abort(), from whatever thread failed;
    nothing can return to Python from there, so the process ends here, without unwinding.
    """
    text = (message or b"").decode("utf-8", errors="replace").strip().replace("\n", " ")
    where, sep, what = text.partition(": ")  # "/long/build/path/ggml-rpc.cpp:35: reason"
    if sep:
        text = f"{os.path.basename(where)}: {what}"
    log_name = getattr(sink.stream, "name", "")
    hint = f" (details: {log_name})" if log_name and log_name != "<stderr>" else ""
    with contextlib.suppress(Exception):
        if sink.stream is not None and not sink.stream.closed:
            sink.stream.write(f"ggml abort: {text}\n")
            sink.stream.flush()
    before_fatal_exit()  # e.g. the terminal's echo, turned off while a reply streams
    line = f"wizardchat: error: llama.cpp stopped on an internal error: {text}{hint}\n"
    line = terminal_safe(line.rstrip("\n")) + "\n"
    with contextlib.suppress(OSError):
        os.write(2, line.encode("utf-8", errors="replace"))
    os._exit(ExitCode.LOAD_FAILED)  # llama.cpp could not go on with the model


_abort_callback = ctypes.CFUNCTYPE(None, ctypes.c_char_p)(_on_abort)  # alive for good


def install_abort_handler() -> None:
    """Route ggml's aborts to `_on_abort` (in the libggml that libllama uses)."""
    set_callback = lib._lib["ggml_set_abort_callback"]
    set_callback.argtypes = [ctypes.c_void_p]
    set_callback.restype = ctypes.c_void_p
    set_callback(ctypes.cast(_abort_callback, ctypes.c_void_p))
