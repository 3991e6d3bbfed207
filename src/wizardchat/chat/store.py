"""Saved conversations: one JSON file per session in the data dir, written atomically.

A session file holds text only (system prompt, and each turn's message and reply). Token ids are
not stored: they belong to one tokenizer, and a restored conversation is evaluated afresh on its
first new turn anyway, so re-tokenizing the text costs nothing extra and works with any model.

Writes go to a temporary file in the same directory, are flushed to disk, then renamed over the
old file, so a crash or a kill at any moment leaves either the old or the new file, never half of
one. A file that cannot be parsed, or holds a field of the wrong type, is reported and left
exactly as it is.

A session is open in one wizardchat at a time: `SessionStore.claim` takes an advisory lock on
NAME.lock beside NAME.json (the kernel drops it when the holder dies, so a killed process leaves
nothing that blocks). As a second line of defence `save` refuses to replace a file that changed
on disk since this store last read or wrote it (`SessionChanged`), so no one's turns are lost.
"""

from __future__ import annotations

import atexit
import contextlib
import json
import math
import os
import re
import socket
import stat
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from types import TracebackType
from typing import Any

from wizardchat.errors import SessionError
from wizardchat.paths import make_private_dir

FORMAT_VERSION = 1
SUFFIX = ".json"
LOCK_SUFFIX = ".lock"
_NAME_RE = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,63}")
# A conversation is text a person typed and read; far below this. A bigger file is not parsed
# (json would need several times its size in memory).
MAX_FILE_BYTES = 64 * 1024 * 1024
# Timestamps from 1970 to the end of year 9999: what time.localtime can show everywhere.
_LATEST_TIME = 253402300799.0


@dataclass
class SavedTurn:
    """One exchange as saved: the user's message and the reply shown."""

    user: str
    reply: str
    interrupted: bool = False


@dataclass
class SavedSession:
    """A conversation as it is kept on disk."""

    name: str
    system: str
    turns: list[SavedTurn] = field(default_factory=list)
    model: str = ""  # the model file's name, to show
    created: float = field(default_factory=time.time)
    updated: float = field(default_factory=time.time)
    # What `--resume` loads it with again: a hub reference as given, or the file's absolute path
    # ("" in files written before wizardchat kept it: then the configured model is used).
    model_ref: str = ""

    def to_json(self) -> dict[str, Any]:
        """The file's JSON object."""
        return {
            "version": FORMAT_VERSION,
            "name": self.name,
            "model": self.model,
            "model_ref": self.model_ref,
            "created": self.created,
            "updated": self.updated,
            "system": self.system,
            "turns": [
                {"user": t.user, "reply": t.reply, "interrupted": t.interrupted} for t in self.turns
            ],
        }

    @classmethod
    def from_json(cls, data: Any) -> SavedSession:
        """Parse a file's JSON object; ValueError says what is wrong with it.

        Every field is checked for its exact type: a file written by hand or by another program
        must not turn into a crash later (a null date, "no" read as true, a list as a name).
        """
        if not isinstance(data, dict):
            raise ValueError("not a JSON object")
        version = data.get("version")
        if type(version) is not int or version != FORMAT_VERSION:  # `true == 1` in Python
            raise ValueError(f"unknown format version {_short(version)}")
        turns_data = data.get("turns")
        if not isinstance(turns_data, list):
            raise ValueError("'turns' is not a list")
        return cls(
            name=_text(data, "name", default=""),
            system=_text(data, "system"),
            turns=[_turn(t, i) for i, t in enumerate(turns_data, 1)],
            model=_text(data, "model", default=""),
            model_ref=_text(data, "model_ref", default=""),
            created=_time(data, "created"),
            updated=_time(data, "updated"),
        )


def _short(value: Any) -> str:
    text = repr(value)
    return text if len(text) <= 40 else text[:37] + "..."


def _text(data: dict[str, Any], key: str, default: str | None = None) -> str:
    value = data.get(key, default)
    if not isinstance(value, str):
        what = "missing" if key not in data else f"not a text ({_short(value)})"
        raise ValueError(f"'{key}' is {what}")
    return value


def _time(data: dict[str, Any], key: str) -> float:
    """A time stamp: a finite number of seconds between 1970 and the year 9999 (0 if absent)."""
    value = data.get(key, 0.0)
    if type(value) not in (int, float):  # bool is an int subclass: excluded by `type`
        raise ValueError(f"'{key}' is not a time stamp ({_short(value)})")
    seconds = float(value)
    if not (math.isfinite(seconds) and 0.0 <= seconds <= _LATEST_TIME):
        raise ValueError(f"'{key}' is out of range ({_short(value)})")
    return seconds


def _turn(data: Any, i: int) -> SavedTurn:
    if not (isinstance(data, dict) and isinstance(data.get("user"), str)):
        raise ValueError(f"turn {i} lacks a 'user' or 'reply' text")
    if not isinstance(data.get("reply"), str):
        raise ValueError(f"turn {i} lacks a 'user' or 'reply' text")
    interrupted = data.get("interrupted", False)
    if not isinstance(interrupted, bool):  # "no" must not read as true
        raise ValueError(f"turn {i}: 'interrupted' is not true or false ({_short(interrupted)})")
    return SavedTurn(data["user"], data["reply"], interrupted)


def parse(text: str) -> SavedSession:
    """A session from a file's text; ValueError (never anything else) says what is wrong."""
    try:
        data = json.loads(text)
    except RecursionError:  # e.g. 100000 `[`: json recurses once per level
        raise ValueError("nested too deeply") from None
    try:
        return SavedSession.from_json(data)
    except RecursionError:  # repr of a deeply nested value in a message
        raise ValueError("nested too deeply") from None


def read_text(path: Path) -> str:
    """A session file's text: a regular file (a symlink to one is fine) of sane size, UTF-8.

    OSError or ValueError say what is wrong. Opening with O_NONBLOCK and checking the type
    before reading means a FIFO or a device (a symlink to /dev/zero) cannot hang or flood us.
    """
    flags = os.O_RDONLY | getattr(os, "O_NONBLOCK", 0) | getattr(os, "O_CLOEXEC", 0)
    fd = os.open(path, flags)
    try:
        info = os.fstat(fd)  # before fdopen, which has its own idea of what a directory is
        if not stat.S_ISREG(info.st_mode):
            raise ValueError("not a regular file")
        if info.st_size > MAX_FILE_BYTES:
            mib = MAX_FILE_BYTES // 2**20
            raise ValueError(f"too large ({info.st_size / 2**20:.0f} MiB; at most {mib} MiB)")
    except BaseException:
        os.close(fd)
        raise
    with os.fdopen(fd, "rb") as f:
        data = f.read(MAX_FILE_BYTES + 1)
    if len(data) > MAX_FILE_BYTES:
        raise ValueError("too large (it grew while being read)")
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError as e:
        raise ValueError(f"not UTF-8 text (byte {e.start})") from None


@dataclass(frozen=True)
class SessionSummary:
    """A line of `wizardchat sessions`."""

    name: str
    turns: int | None  # None: the file could not be read
    updated: float
    path: Path
    problem: str = ""
    model_ref: str = ""  # what --resume would load it with ("" if none is saved)


def _remove_hint(name: str) -> str:
    """The next step after a file that cannot be read: it is kept, and can be deleted."""
    return f"; the file was left as it is: fix it, or delete it with: wizardchat sessions rm {name}"


def check_name(name: str) -> str:
    """A session name usable as a file name on every OS, or a SessionError saying why not."""
    if not _NAME_RE.fullmatch(name):
        raise SessionError(
            f"invalid session name {name!r}: use 1-64 letters, digits, '.', '_' or '-', "
            "starting with a letter or digit"
        )
    return name


def auto_name(now: float | None = None) -> str:
    """A name for a conversation the user did not name: chat-YYYYMMDD-HHMMSS."""
    return time.strftime("chat-%Y%m%d-%H%M%S", time.localtime(now))


class SessionHeld(SessionError):
    """Another live wizardchat holds the session (its pid and host are in the message)."""


class SessionChanged(SessionError):
    """The file changed on disk since this store read or wrote it; it was not overwritten."""


# What identifies one version of a file: inode, size, mtime and ctime (a rename by another
# writer makes a new inode; ctime cannot be set back by hand).
_Stamp = tuple[int, int, int, int]


def _stamp(path: Path) -> _Stamp | None:
    try:
        s = os.stat(path)
    except OSError:
        return None
    return (s.st_ino, s.st_size, s.st_mtime_ns, s.st_ctime_ns)


class SessionClaim:
    """This process's hold on one session name: release() or leaving a `with` gives it up.

    The hold is an advisory lock (flock) on NAME.lock, which also names the holder (pid and
    host) for the message another wizardchat shows. The kernel drops the lock when the process
    dies, however it dies, so a stale NAME.lock never blocks anyone.
    """

    def __init__(self, store: SessionStore, name: str, path: Path, fd: int | None) -> None:
        self.store, self.name, self.path = store, name, path
        self._fd = fd

    @property
    def held(self) -> bool:
        """Whether this claim still holds the session."""
        return self._fd is not None

    def release(self) -> None:
        """Give the session up (idempotent); the lock file is removed while still locked."""
        fd, self._fd = self._fd, None
        if fd is None:
            return
        self.store._forget_claim(self)
        if fd >= 0:
            # Unlink first, while locked: a process waiting on this inode re-checks the path
            # after it gets the lock and starts over on the new file (see _lock_file).
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


def _lock_file(path: Path, name: str) -> int:
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


class SessionStore:
    """The sessions directory: save, load, list, claim and remove conversations by name."""

    def __init__(self, directory: Path) -> None:
        self.directory = directory
        self._seen: dict[str, _Stamp | None] = {}  # each file as this store last read/wrote it
        self._claims: dict[str, SessionClaim] = {}
        self._exit_hook = False

    def path(self, name: str) -> Path:
        """Where the session `name` is kept."""
        return self.directory / (check_name(name) + SUFFIX)

    def exists(self, name: str) -> bool:
        """Whether something is saved under that name (a broken symlink or a directory too)."""
        return os.path.lexists(self.path(name))

    def names(self) -> list[str]:
        """The names of the saved sessions, sorted, without reading any file (for completion)."""
        try:
            found = [p.name[: -len(SUFFIX)] for p in self.directory.glob("*" + SUFFIX)]
        except OSError:
            return []
        return sorted(n for n in found if _NAME_RE.fullmatch(n))

    # --- claims -------------------------------------------------------------------------------

    def claim_free_name(self, base: str) -> SessionClaim:
        """Claim `base`, else `base-2`, `base-3`, ...: the first name with no file and no holder."""
        for n in range(1, 1000):
            name = base if n == 1 else f"{base[:60]}-{n}"
            if self.exists(name):
                continue
            try:
                return self.claim(name)
            except SessionHeld:
                continue  # another wizardchat picked it a moment ago
        raise SessionError(f"no free session name like '{base}' in {self.directory}")

    def claim(self, name: str) -> SessionClaim:
        """Hold session `name` for this process until the claim is released (or the process ends).

        SessionHeld (a SessionError, exit 7) names the holder if another live process holds it;
        SessionError if the lock file cannot be made. Claiming a name this store already holds
        returns that same claim. Without file locking (no fcntl or msvcrt) the claim holds
        nothing, and `save`'s changed-on-disk check is the only protection.
        """
        check_name(name)
        held = self._claims.get(name)
        if held is not None and held.held:
            return held
        try:
            make_private_dir(self.directory)
            fd = _lock_file(self.directory / (name + LOCK_SUFFIX), name)
        except ImportError:
            fd = -1  # no locking on this platform
        except OSError as e:
            raise SessionError(f"cannot claim session '{name}' in {self.directory}: {e}") from None
        claim = SessionClaim(self, name, self.directory / (name + LOCK_SUFFIX), fd)
        if not self._exit_hook:
            self._exit_hook = True
            # At exit at the latest, so no NAME.lock is left behind (a kill leaves one, which
            # blocks no one: the kernel dropped its lock).
            atexit.register(self.close)
        self._claims[name] = claim
        return claim

    def holds(self, name: str) -> bool:
        """Whether this store holds a claim on `name`."""
        claim = self._claims.get(name)
        return claim is not None and claim.held

    def _forget_claim(self, claim: SessionClaim) -> None:
        if self._claims.get(claim.name) is claim:
            del self._claims[claim.name]

    def close(self) -> None:
        """Release every claim this store holds."""
        for claim in list(self._claims.values()):
            claim.release()

    def __enter__(self) -> SessionStore:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()

    # --- files --------------------------------------------------------------------------------

    def save(self, session: SavedSession) -> Path:
        """Write atomically (temp file, fsync, rename); stamps `updated`.

        SessionChanged if the file changed on disk since this store last read or wrote it (or
        appeared since, unseen): it is left as it is, and the caller keeps the conversation.
        """
        path = self.path(session.name)
        self._check_unchanged(session.name, path)
        session.updated = time.time()
        data = json.dumps(session.to_json(), ensure_ascii=False, indent=1) + "\n"
        try:
            make_private_dir(self.directory)
            # mkstemp creates the file 0600 whatever the umask; the rename keeps that mode.
            fd, tmp = tempfile.mkstemp(
                prefix=f".{session.name}.", suffix=".tmp", dir=self.directory
            )
            try:
                with os.fdopen(fd, "w", encoding="utf-8") as f:
                    f.write(data)
                    f.flush()
                    os.fsync(f.fileno())
                os.replace(tmp, path)
            except BaseException:
                Path(tmp).unlink(missing_ok=True)
                raise
        except OSError as e:
            raise SessionError(f"cannot save session '{session.name}' to {path}: {e}") from None
        self._seen[session.name] = _stamp(path)
        return path

    def _check_unchanged(self, name: str, path: Path) -> None:
        if not os.path.lexists(path):
            return  # nothing to overwrite (or someone removed it: writing it again loses nothing)
        if name in self._seen and self._seen[name] == _stamp(path):
            return
        when = "since it was read" if name in self._seen else "meanwhile"
        raise SessionChanged(
            f"session '{name}' was changed on disk by another program {when}; not overwritten"
        )

    def load(self, name: str) -> SavedSession:
        """Read a session; a missing or corrupt file is a SessionError and is left untouched."""
        path = self.path(name)
        before = _stamp(path)
        try:
            text = read_text(path)
        except FileNotFoundError:
            if os.path.islink(path):
                raise SessionError(
                    f"cannot read session '{name}' ({path}): a symlink to nothing"
                    + _remove_hint(name)
                ) from None
            known = ", ".join(s.name for s in self.list()[:8]) or "none saved yet"
            raise SessionError(f"no session named '{name}' (saved: {known})") from None
        except OSError as e:
            raise SessionError(
                f"cannot read session '{name}' ({path}): {e.strerror or e}" + _remove_hint(name)
            ) from None
        except ValueError as e:
            raise SessionError(
                f"session '{name}' is unreadable ({path}: {e})" + _remove_hint(name)
            ) from None
        try:
            session = parse(text)
        except ValueError as e:  # JSONDecodeError is a ValueError
            raise SessionError(
                f"session '{name}' is corrupt ({path}: {e})" + _remove_hint(name)
            ) from None
        session.name = name  # the file name wins over a stale name inside
        self._seen[name] = before
        return session

    def summary(self, path: Path) -> SessionSummary:
        """One session file as `list` shows it; never raises for what the file holds."""
        name = path.name[: -len(SUFFIX)]
        try:
            session = parse(read_text(path))
        except (OSError, ValueError) as e:
            problem = e.strerror if isinstance(e, OSError) and e.strerror else str(e)
            try:
                mtime = os.lstat(path).st_mtime
            except OSError:
                mtime = 0.0
            return SessionSummary(name, None, min(max(mtime, 0.0), _LATEST_TIME), path, problem)
        return SessionSummary(
            name, len(session.turns), session.updated, path, model_ref=session.model_ref
        )

    def list(self) -> list[SessionSummary]:
        """Saved sessions, most recently used first (unreadable ones included, marked)."""
        out = [self.summary(self.directory / (name + SUFFIX)) for name in self.names()]
        out.sort(key=lambda s: s.updated, reverse=True)
        return out

    def last(self) -> str | None:
        """The most recently used readable session's name, or None."""
        for summary in self.list():
            if summary.turns is not None:
                return summary.name
        return None

    def remove(self, name: str) -> Path:
        """Delete a saved session; SessionError if there is none of that name, or if another
        wizardchat has it open (it would write it again at its next reply)."""
        path = self.path(name)
        if not os.path.lexists(path):
            raise SessionError(f"no session named '{name}' (wizardchat sessions lists them)")
        claim = None if self.holds(name) else self.claim(name)
        try:
            path.unlink()
        except FileNotFoundError:
            raise SessionError(f"no session named '{name}'") from None
        except OSError as e:
            raise SessionError(f"cannot remove session '{name}' ({path}): {e}") from None
        finally:
            if claim is not None:
                claim.release()
        self._seen.pop(name, None)
        return path
