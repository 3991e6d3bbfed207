"""Saved KV states on disk: one state file per session, its record beside it, under a size budget.

`NAME.kv` is the state llama.cpp wrote (gigabytes for a long conversation on WizardLM-2 8x22B);
`NAME.kv.json` is its record: what it was made with (model file fingerprint, context, KV types,
llama.cpp version), how many tokens it holds and their hash, and its exact size. The record is
the commit mark. A write removes the old record first, writes the state to a temporary file,
flushes and renames it, and writes the new record last (itself atomically), so a kill at any
moment leaves either a whole state with its record or no record at all: a state file without a
record is never loaded, and is removed by the next write or `sessions rm`. The previous state is
not kept during a write: at 224 KiB a token it would double the disk the states take.

A state is a cache of the session's text, never the only copy of anything: any of them can be
deleted at any time, and the least recently used go first when the budget is full.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import re
import shutil
import struct
import tempfile
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from wizardchat.errors import KvStateError
from wizardchat.paths import make_private_dir

FORMAT_VERSION = 1
KV_SUFFIX = ".kv"
RECORD_SUFFIX = ".kv.json"
TMP_SUFFIX = ".kv.tmp"
MAX_RECORD_BYTES = 64 * 1024
# Never fill the disk to its last byte with a cache: the session files and the system need it.
FREE_DISK_MARGIN = 1 << 30
GB = 1e9
_TMP_RE = re.compile(r"[A-Za-z0-9_]+\.(kv|json)\.tmp")


def tokens_digest(tokens: Sequence[int]) -> str:
    """sha256 (hex) of token ids as little-endian int32s: what a state's record says it holds."""
    return hashlib.sha256(struct.pack(f"<{len(tokens)}i", *tokens)).hexdigest()


@dataclass(frozen=True)
class KvRecord:
    """What one saved state holds and what it was made with."""

    identity: dict[str, Any]
    n_tokens: int
    tokens_sha256: str
    kv_bytes: int
    saved: float

    def to_json(self) -> dict[str, Any]:
        return {"version": FORMAT_VERSION, **asdict(self)}

    @classmethod
    def from_json(cls, data: Any) -> KvRecord:
        """A record from its JSON; ValueError says what is wrong (exact types, as session files)."""
        if not isinstance(data, dict) or data.get("version") != FORMAT_VERSION:
            raise ValueError("unknown format")
        identity, n, digest = data.get("identity"), data.get("n_tokens"), data.get("tokens_sha256")
        size, saved = data.get("kv_bytes"), data.get("saved")
        if not isinstance(identity, dict):
            raise ValueError("no 'identity'")
        if type(n) is not int or n < 0 or type(size) is not int or size < 0:
            raise ValueError("bad 'n_tokens' or 'kv_bytes'")
        if not isinstance(digest, str) or not isinstance(saved, int | float):
            raise ValueError("bad 'tokens_sha256' or 'saved'")
        return cls(identity, n, digest, size, float(saved))


@dataclass(frozen=True)
class KvEntry:
    """A saved state as the budget and `wizardchat sessions` see it."""

    name: str
    kv_bytes: int
    last_used: float


class KvStore:
    """The KV state directory; `max_bytes` 0 turns saving and restoring off."""

    def __init__(self, directory: Path, max_bytes: int) -> None:
        self.directory = directory
        self.max_bytes = max_bytes

    @property
    def enabled(self) -> bool:
        return self.max_bytes > 0

    def kv_path(self, name: str) -> Path:
        return self.directory / (name + KV_SUFFIX)

    def record_path(self, name: str) -> Path:
        return self.directory / (name + RECORD_SUFFIX)

    # --- reading ---------------------------------------------------------------------------

    def read(self, name: str) -> KvRecord | None:
        """The record of `name`'s state; None when none is saved. KvStateError when the record or
        its state file cannot be used (say why; the caller evaluates the history instead)."""
        try:
            with open(self.record_path(name), "rb") as f:
                data = f.read(MAX_RECORD_BYTES + 1)
        except FileNotFoundError:
            return None
        except OSError as e:
            raise KvStateError(f"its record cannot be read ({e.strerror or e})") from None
        try:
            if len(data) > MAX_RECORD_BYTES:
                raise ValueError("too large")
            record = KvRecord.from_json(json.loads(data.decode("utf-8")))
        except (ValueError, RecursionError) as e:
            raise KvStateError(f"its record is damaged ({e})") from None
        try:
            size = os.stat(self.kv_path(name)).st_size
        except OSError:
            raise KvStateError("its state file is missing") from None
        if size != record.kv_bytes:
            raise KvStateError(
                f"its state file is truncated or damaged ({size:,} bytes, "
                f"{record.kv_bytes:,} expected)"
            )
        return record

    def entries(self) -> list[KvEntry]:
        """Every saved state with a record, least recently used first."""
        out = []
        with contextlib.suppress(OSError):
            for record in self.directory.glob("*" + RECORD_SUFFIX):
                name = record.name[: -len(RECORD_SUFFIX)]
                try:
                    used = record.stat().st_mtime
                    size = self.kv_path(name).stat().st_size
                except OSError:
                    continue
                out.append(KvEntry(name, size, used))
        out.sort(key=lambda e: e.last_used)
        return out

    def sizes(self) -> dict[str, int]:
        """Bytes of each session's saved state, by session name."""
        return {e.name: e.kv_bytes for e in self.entries()}

    def touch(self, name: str) -> None:
        """Mark `name`'s state as just used (the budget removes the least recently used)."""
        with contextlib.suppress(OSError):
            os.utime(self.record_path(name))

    # --- writing ---------------------------------------------------------------------------

    def remove(self, name: str) -> None:
        """Delete `name`'s state: the record first (from then on there is no state), then the
        file, and any temporary file a killed write left."""
        for path in (self.record_path(name), self.kv_path(name)):
            with contextlib.suppress(FileNotFoundError):
                path.unlink()
        with contextlib.suppress(OSError):
            for tmp in self.directory.glob(f".{name}.*.tmp"):  # names hold no glob characters
                # mkstemp's part has no dot: `.x.kv.ab12.kv.tmp` is session x.kv's, not x's
                if _TMP_RE.fullmatch(tmp.name[len(name) + 2 :]):
                    with contextlib.suppress(OSError):
                        tmp.unlink()

    def rename(self, old: str, new: str) -> None:
        """The session `old` is `new` from now on: its state follows it (best effort)."""
        self.remove(new)
        try:
            os.replace(self.kv_path(old), self.kv_path(new))
            os.replace(self.record_path(old), self.record_path(new))
        except OSError:
            self.remove(old)
            self.remove(new)

    def write(
        self,
        name: str,
        size: int,
        identity: dict[str, Any],
        write_state: Callable[[Path], list[int]],
    ) -> KvRecord:
        """Save a state of about `size` bytes for `name`: `write_state(path)` writes it and
        returns the token ids it holds. Older states of other sessions are removed, least
        recently used first, to keep the total within the budget. KvStateError says why a state
        was not saved (too big for the budget or the disk, or the write failed); then `name` has
        no saved state, except when it is too big for the budget: then the one saved before
        is left as it is (it may still hold the start of the conversation)."""
        if size > self.max_bytes:
            raise KvStateError(
                f"it would take {size / GB:.1f} GB and kv_cache_max_gb is "
                f"{self.max_bytes / GB:g} (raise it with --kv-cache-max-gb)"
            )
        self.remove(name)
        try:
            make_private_dir(self.directory)
            self._make_room(size)
            free = shutil.disk_usage(self.directory).free
        except OSError as e:
            raise KvStateError(f"{self.directory}: {e.strerror or e}") from None
        if free - size < FREE_DISK_MARGIN:
            raise KvStateError(
                f"it would take {size / GB:.1f} GB and {self.directory} has {free / GB:.1f} GB free"
            )
        fd, tmp_name = tempfile.mkstemp(prefix=f".{name}.", suffix=TMP_SUFFIX, dir=self.directory)
        os.close(fd)  # llama.cpp opens it itself; mkstemp made it 0600
        tmp = Path(tmp_name)
        try:
            tokens = write_state(tmp)
            _fsync(tmp)
            kv_bytes = tmp.stat().st_size
            os.replace(tmp, self.kv_path(name))
            record = KvRecord(identity, len(tokens), tokens_digest(tokens), kv_bytes, time.time())
            self._write_record(name, record)
        except OSError as e:
            self.remove(name)
            raise KvStateError(f"{self.directory}: {e.strerror or e}") from None
        except BaseException:
            self.remove(name)
            raise
        return record

    def _make_room(self, size: int) -> None:
        entries = self.entries()
        total = sum(e.kv_bytes for e in entries)
        for entry in entries:  # least recently used first
            if total + size <= self.max_bytes:
                break
            self.remove(entry.name)
            total -= entry.kv_bytes

    def _write_record(self, name: str, record: KvRecord) -> None:
        data = json.dumps(record.to_json(), indent=1).encode()
        fd, tmp = tempfile.mkstemp(prefix=f".{name}.", suffix=".json.tmp", dir=self.directory)
        try:
            with os.fdopen(fd, "wb") as f:
                f.write(data)
                f.flush()
                os.fsync(f.fileno())
            os.replace(tmp, self.record_path(name))
        except BaseException:
            Path(tmp).unlink(missing_ok=True)
            raise


def _fsync(path: Path) -> None:
    """Flush a file llama.cpp wrote to the disk before it is renamed into place."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
