"""The wire format between `wizardchat serve` and its clients: one JSON object per line.

A connection carries one request. Most get one answer: `{"ok": VALUE}` or `{"error": {"kind":
..., "message": ...}}`. A `stream` request gets events until `{"event": "end", ...}`, and the
client may send `{"op": "cancel"}` on the same connection meanwhile; closing the connection
cancels too. JSON escapes every control character, so a model's bytes cross it as data.
"""

from __future__ import annotations

import json
import socket
from typing import Any

MAX_LINE = 64 << 20  # a 64K-token history as JSON is under 1 MiB: far below, never unbounded
VERSION = 2  # 2: `hello` tells how the model tokenizes a prompt (add_bos, eos_text, space_prefix)


class ProtocolError(Exception):
    """The other side broke the format, or the connection ended in the middle of a message."""


def send(sock: socket.socket, message: dict[str, Any]) -> None:
    """Write one message (OSError when the other side is gone)."""
    sock.sendall(json.dumps(message, ensure_ascii=False).encode("utf-8") + b"\n")


class LineReader:
    """Messages from a socket, one per line, with the bytes of an unfinished line kept."""

    def __init__(self, sock: socket.socket) -> None:
        self.sock = sock
        self._buf = bytearray()

    def read(self) -> dict[str, Any] | None:
        """The next message; None at a clean end of the connection. socket.timeout (TimeoutError)
        passes through with nothing lost, so a caller can poll."""
        while True:
            message = self.buffered()
            if message is not None:
                return message
            if len(self._buf) > MAX_LINE:
                raise ProtocolError("a message over 64 MiB")
            chunk = self.sock.recv(1 << 16)
            if not chunk:
                if self._buf:
                    raise ProtocolError("the connection ended in the middle of a message")
                return None
            self._buf += chunk

    def buffered(self) -> dict[str, Any] | None:
        """The next message if it has already been received whole, else None (no waiting)."""
        end = self._buf.find(b"\n")
        if end < 0:
            return None
        line = bytes(self._buf[:end])
        del self._buf[: end + 1]
        try:
            message = json.loads(line)
        except ValueError as e:
            raise ProtocolError(f"not a JSON message ({e})") from None
        if not isinstance(message, dict):
            raise ProtocolError("a message is not a JSON object")
        return message
