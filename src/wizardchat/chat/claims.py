"""Holding a session name: an advisory lock on NAME.lock that names its holder.

A session is open in one wizardchat at a time. The kernel drops the lock when the holder dies,
however it dies, so a killed process leaves nothing that blocks.
"""

from __future__ import annotations

import contextlib
import json
import os
import socket
import sys
from collections.abc import Callable
from pathlib import Path
from types import TracebackType

from wizardchat.errors import SessionError


class SessionHeld(SessionError):
    """Another live wizardchat holds the session (its pid and host are in the message)."""


class SessionClaim:
    """This process's hold on one session name: release() or leaving a `with` gives it up.

    The hold is an advisory lock (flock) on NAME.lock, which also names the holder (pid and
    host) for the message another wizardchat shows. The kernel drops the lock when the process
    dies, however it dies, so a stale NAME.lock never blocks anyone.
    """

    def __init__(
        self,
        name: str,
        path: Path,
        fd: int | None,
        on_release: Callable[[SessionClaim], None],
    ) -> None:
        self.name, self.path = name, path
        self._fd = fd
        self._on_release = on_release  # the store forgets the claim

    @property
    def held(self) -> bool:
        """Whether this claim still holds the session."""
        return self._fd is not None

    def release(self) -> None:
        """Give the session up (idempotent); the lock file is removed while still locked."""
        fd, self._fd = self._fd, None
        if fd is None:
            return
        self._on_release(self)
        if fd >= 0:
            # Unlink first, while locked: a process waiting on this inode re-checks the path
            # after it gets the lock and starts over on the new file (see lock_file).
            if sys.platform != "win32":
                with contextlib.suppress(OSError):
                    self.path.unlink()
            os.close(fd)

    def __enter__(self) -> SessionClaim:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.release()

    def __repr__(self) -> str:
        return f"SessionClaim({self.name!r}, held={self.held})"


def _holder(path: Path) -> str:
    """Who holds a lock file, from what it says: "pid 1234 on host"."""
    try:
        info = json.loads(path.read_text(encoding="utf-8"))
        host = "".join(c for c in str(info["host"])[:64] if c.isprintable())
        return f"pid {int(info['pid'])} on {host}"
    except (OSError, ValueError, KeyError, TypeError):
        return "pid unknown"


def _try_lock(fd: int) -> bool:
    """Lock an open lock file without waiting; False if another process holds it."""
    if sys.platform == "win32":
        import msvcrt

        try:
            # Lock a byte far past the holder's text, so that text stays readable.
            os.lseek(fd, 1 << 30, os.SEEK_SET)
            msvcrt.locking(fd, msvcrt.LK_NBLCK, 1)
        except OSError:
            return False
        finally:
            os.lseek(fd, 0, os.SEEK_SET)
        return True
    import fcntl

    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        return False
    return True


def lock_file(path: Path, name: str) -> int:
    """An open, locked lock file for `name`, its text naming us; SessionError if held."""
    for _ in range(20):  # bounded: each round loses only to a holder releasing at that instant
        flags = os.O_RDWR | os.O_CREAT | getattr(os, "O_CLOEXEC", 0) | getattr(os, "O_NOFOLLOW", 0)
        fd = os.open(path, flags, 0o600)
        try:
            if not _try_lock(fd):
                raise SessionHeld(
                    f"session '{name}' is open in another wizardchat ({_holder(path)}); "
                    "close it there or use another --session"
                )
            if os.fstat(fd).st_ino != _stamp_ino(path):
                os.close(fd)  # the holder released and removed this file meanwhile: again
                continue
            me = json.dumps({"pid": os.getpid(), "host": socket.gethostname()}) + "\n"
            os.ftruncate(fd, 0)
            os.write(fd, me.encode("utf-8"))
            return fd
        except BaseException:
            with contextlib.suppress(OSError):
                os.close(fd)
            raise
    raise SessionError(f"cannot claim session '{name}': its lock file keeps changing ({path})")


def _stamp_ino(path: Path) -> int | None:
    try:
        return os.stat(path, follow_symlinks=False).st_ino
    except OSError:
        return None
