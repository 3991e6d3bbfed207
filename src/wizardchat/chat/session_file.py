"""The session file format: a conversation as JSON text, and reading such a file safely.

A session file holds the text (system prompt, and each turn's message and reply), which is the
source of truth, and each reply's token ids as the model generated them. Tokenizing a reply's
text again need not give those ids (a model may write "hel"+"lo" where the tokenizer says
"hello"), and a conversation continues exactly as it would have, and matches its saved KV state
(chat/kv_cache.py), only with the very ids. They are used on resume only where they decode to the
reply's text with the loaded model; elsewhere (another model, a hand-edited reply) the text is
tokenized again. Every field is checked for its exact type when read: a file written by hand or
by another program must not turn into a crash later.
"""

from __future__ import annotations

import json
import math
import os
import stat
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

FORMAT_VERSION = 1
# A conversation is text a person typed and read; far below this. A bigger file is not parsed
# (json would need several times its size in memory).
MAX_FILE_BYTES = 64 * 1024 * 1024
# Timestamps from 1970 to the end of year 9999: what time.localtime can show everywhere.
LATEST_TIME = 253402300799.0


@dataclass
class SavedTurn:
    """One exchange as saved: the user's message and the reply shown."""

    user: str
    reply: str
    interrupted: bool = False
    reply_tokens: list[int] | None = None  # as generated (None: not known, tokenize the text)


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
            "turns": [_turn_json(t) for t in self.turns],
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
    if not (math.isfinite(seconds) and 0.0 <= seconds <= LATEST_TIME):
        raise ValueError(f"'{key}' is out of range ({_short(value)})")
    return seconds


def _turn_json(turn: SavedTurn) -> dict[str, Any]:
    out: dict[str, Any] = {"user": turn.user, "reply": turn.reply, "interrupted": turn.interrupted}
    if turn.reply_tokens is not None:
        out["reply_tokens"] = turn.reply_tokens
    return out


def _token_ids(data: Any, i: int) -> list[int] | None:
    """A turn's reply ids: absent is fine (older files, hand-written ones), wrong is not."""
    ids = data.get("reply_tokens")
    if ids is None:
        return None
    if not isinstance(ids, list) or not all(type(t) is int and 0 <= t < 2**31 for t in ids):
        raise ValueError(f"turn {i}: 'reply_tokens' is not a list of token ids")
    return ids


def _turn(data: Any, i: int) -> SavedTurn:
    if not (isinstance(data, dict) and isinstance(data.get("user"), str)):
        raise ValueError(f"turn {i} lacks a 'user' or 'reply' text")
    if not isinstance(data.get("reply"), str):
        raise ValueError(f"turn {i} lacks a 'user' or 'reply' text")
    interrupted = data.get("interrupted", False)
    if not isinstance(interrupted, bool):  # "no" must not read as true
        raise ValueError(f"turn {i}: 'interrupted' is not true or false ({_short(interrupted)})")
    return SavedTurn(data["user"], data["reply"], interrupted, _token_ids(data, i))


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
