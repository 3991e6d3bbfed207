"""Saved conversations: the sessions directory, one JSON file per session, written atomically.

The file format is chat/session_file.py; holding a name while a session is open is
chat/claims.py. Writes go to a temporary file in the same directory, are flushed to disk, then
renamed over the old file, so a crash or a kill at any moment leaves either the old or the new
file, never half of one. A file that cannot be parsed, or holds a field of the wrong type, is
reported and left exactly as it is.

A session is open in one wizardchat at a time: `SessionStore.claim` takes the lock of
chat/claims.py. As a second line of defence `save` refuses to replace a file that changed on
disk since this store last read or wrote it (`SessionChanged`), so no one's turns are lost.
"""

from __future__ import annotations

import atexit
import json
import os
import re
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

from wizardchat.chat.claims import SessionClaim, SessionHeld, lock_file
from wizardchat.chat.session_file import (
    LATEST_TIME,
    SavedSession,
    SavedTurn,
    parse,
    read_text,
)
from wizardchat.errors import SessionError
from wizardchat.paths import make_private_dir

# The store's API includes the types it saves, loads and hands out (callers import them here).
__all__ = [
    "SavedSession",
    "SavedTurn",
    "SessionChanged",
    "SessionClaim",
    "SessionHeld",
    "SessionStore",
    "SessionSummary",
    "auto_name",
    "check_name",
]

SUFFIX = ".json"
LOCK_SUFFIX = ".lock"
_NAME_RE = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,63}")


@dataclass(frozen=True)
class SessionSummary:
    """A line of `wizardchat sessions`."""

    name: str
    turns: int | None  # None: the file could not be read
    updated: float
    problem: str = ""  # why the file could not be read
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
            fd = lock_file(self.directory / (name + LOCK_SUFFIX), name)
        except ImportError:
            fd = -1  # no locking on this platform
        except OSError as e:
            raise SessionError(f"cannot claim session '{name}' in {self.directory}: {e}") from None
        claim = SessionClaim(name, self.directory / (name + LOCK_SUFFIX), fd, self._forget_claim)
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
            return SessionSummary(name, None, min(max(mtime, 0.0), LATEST_TIME), problem)
        return SessionSummary(
            name, len(session.turns), session.updated, model_ref=session.model_ref
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
