"""Saved conversations: one JSON file per session in the data dir, written atomically.

A session file holds text only (system prompt, and each turn's message and reply). Token ids are
not stored: they belong to one tokenizer, and a restored conversation is evaluated afresh on its
first new turn anyway, so re-tokenizing the text costs nothing extra and works with any model.

Writes go to a temporary file in the same directory, are flushed to disk, then renamed over the
old file, so a crash or a kill at any moment leaves either the old or the new file, never half of
one. A file that cannot be parsed is reported and left exactly as it is.
"""

from __future__ import annotations

import json
import os
import re
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from wizardchat.errors import SessionError

FORMAT_VERSION = 1
SUFFIX = ".json"
_NAME_RE = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,63}")


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
    model: str = ""
    created: float = field(default_factory=time.time)
    updated: float = field(default_factory=time.time)

    def to_json(self) -> dict[str, Any]:
        """The file's JSON object."""
        return {
            "version": FORMAT_VERSION,
            "name": self.name,
            "model": self.model,
            "created": self.created,
            "updated": self.updated,
            "system": self.system,
            "turns": [
                {"user": t.user, "reply": t.reply, "interrupted": t.interrupted} for t in self.turns
            ],
        }

    @classmethod
    def from_json(cls, data: Any) -> SavedSession:
        """Parse a file's JSON object; ValueError says what is wrong with it."""
        if not isinstance(data, dict):
            raise ValueError("not a JSON object")
        if data.get("version") != FORMAT_VERSION:
            raise ValueError(f"unknown format version {data.get('version')!r}")
        turns_data = data.get("turns")
        if not isinstance(turns_data, list):
            raise ValueError("'turns' is not a list")
        turns = []
        for i, t in enumerate(turns_data, 1):
            if not (
                isinstance(t, dict)
                and isinstance(t.get("user"), str)
                and isinstance(t.get("reply"), str)
            ):
                raise ValueError(f"turn {i} lacks a 'user' or 'reply' text")
            turns.append(SavedTurn(t["user"], t["reply"], bool(t.get("interrupted", False))))
        system = data.get("system")
        if not isinstance(system, str):
            raise ValueError("'system' is not a text")
        return cls(
            name=str(data.get("name", "")),
            system=system,
            turns=turns,
            model=str(data.get("model", "")),
            created=float(data.get("created", 0.0)),
            updated=float(data.get("updated", 0.0)),
        )


@dataclass(frozen=True)
class SessionSummary:
    """A line of `wizardchat sessions`."""

    name: str
    turns: int | None  # None: the file could not be read
    updated: float
    path: Path
    problem: str = ""


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


class SessionStore:
    """The sessions directory: save, load, list and remove conversations by name."""

    def __init__(self, directory: Path) -> None:
        self.directory = directory

    def path(self, name: str) -> Path:
        """Where the session `name` is kept."""
        return self.directory / (check_name(name) + SUFFIX)

    def exists(self, name: str) -> bool:
        """Whether a session of that name is saved."""
        return self.path(name).exists()

    def save(self, session: SavedSession) -> Path:
        """Write atomically (temp file, fsync, rename); stamps `updated`."""
        path = self.path(session.name)
        session.updated = time.time()
        data = json.dumps(session.to_json(), ensure_ascii=False, indent=1) + "\n"
        try:
            self.directory.mkdir(parents=True, exist_ok=True)
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
        return path

    def load(self, name: str) -> SavedSession:
        """Read a session; a missing or corrupt file is a SessionError and is left untouched."""
        path = self.path(name)
        try:
            text = path.read_text(encoding="utf-8")
        except FileNotFoundError:
            known = ", ".join(s.name for s in self.list()[:8]) or "none saved yet"
            raise SessionError(f"no session named '{name}' (saved: {known})") from None
        except (OSError, UnicodeDecodeError) as e:
            raise SessionError(f"cannot read session '{name}' ({path}): {e}") from None
        try:
            session = SavedSession.from_json(json.loads(text))
        except ValueError as e:  # JSONDecodeError is a ValueError
            raise SessionError(
                f"session '{name}' is corrupt ({path}: {e}); the file was left as it is"
            ) from None
        session.name = name  # the file name wins over a stale name inside
        return session

    def list(self) -> list[SessionSummary]:
        """Saved sessions, most recently used first (unreadable ones included, marked)."""
        out = []
        for path in self.directory.glob("*" + SUFFIX):
            name = path.name[: -len(SUFFIX)]
            if not _NAME_RE.fullmatch(name):
                continue
            try:
                session = SavedSession.from_json(json.loads(path.read_text(encoding="utf-8")))
                out.append(SessionSummary(name, len(session.turns), session.updated, path))
            except (OSError, ValueError) as e:
                mtime = path.stat().st_mtime if path.exists() else 0.0
                out.append(SessionSummary(name, None, mtime, path, problem=str(e)))
        out.sort(key=lambda s: s.updated, reverse=True)
        return out

    def last(self) -> str | None:
        """The most recently used readable session's name, or None."""
        for summary in self.list():
            if summary.turns is not None:
                return summary.name
        return None

    def remove(self, name: str) -> Path:
        """Delete a saved session; SessionError if there is none of that name."""
        path = self.path(name)
        try:
            path.unlink()
        except FileNotFoundError:
            raise SessionError(f"no session named '{name}'") from None
        except OSError as e:
            raise SessionError(f"cannot remove session '{name}' ({path}): {e}") from None
        return path
