"""The running `wizardchat serve` servers: one JSON file each in the runtime dir, beside sockets.

`runtime_dir/servers/PID.json` says where a server listens, which model file it serves and the
load settings it serves it with. The directory is 0700 and the files 0600: a socket there
answers whoever can reach it, so only the user may. An entry whose process is gone (killed,
crashed) is stale: every listing removes it, with its socket.
"""

from __future__ import annotations

import contextlib
import json
import os
import tempfile
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from wizardchat import paths

# The longest path a Unix socket address holds is 108 bytes on Linux (104 on macOS), with NUL.
MAX_SOCKET_PATH = 100


@dataclass(frozen=True)
class ServerEntry:
    """One running server, as its registry file describes it."""

    pid: int
    socket: str
    model: str  # the model file's path, resolved
    settings: dict[str, Any] = field(default_factory=dict)  # its load settings (LOAD_FIELDS)
    started: float = 0.0
    http: str = ""  # HOST:PORT of its OpenAI-compatible API, "" when off

    @property
    def model_name(self) -> str:
        """The model file's name, as lists show it."""
        return Path(self.model).name


def servers_dir() -> Path:
    """Where the entries live (created 0700)."""
    return paths.make_private_dir(paths.runtime_dir() / "servers")


def socket_path(pid: int) -> Path:
    """Where server `pid` listens: beside its entry, or in a private directory under /tmp when
    that path is too long for a socket address."""
    path = servers_dir() / f"{pid}.sock"
    if len(os.fsencode(path)) <= MAX_SOCKET_PATH:
        return path
    short = Path(tempfile.gettempdir()) / f"wizardchat-{os.getuid()}"
    return paths.make_private_dir(short) / f"{pid}.sock"


def _entry_path(pid: int) -> Path:
    return servers_dir() / f"{pid}.json"


def register(entry: ServerEntry) -> None:
    """Publish `entry` (written whole, then renamed: a reader never sees half of it)."""
    path = _entry_path(entry.pid)
    tmp = path.with_suffix(".json.tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "w", encoding="utf-8") as f:
        json.dump(asdict(entry), f)
    os.replace(tmp, path)


def unregister(entry: ServerEntry) -> None:
    """Remove `entry` and its socket (either may be gone already)."""
    for path in (_entry_path(entry.pid), Path(entry.socket)):
        with contextlib.suppress(FileNotFoundError):
            path.unlink()


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # someone else's process reuses the pid: not our server
        return False
    return True


def _read(path: Path) -> ServerEntry | None:
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
        return ServerEntry(
            pid=int(data["pid"]),
            socket=str(data["socket"]),
            model=str(data["model"]),
            settings=dict(data.get("settings") or {}),
            started=float(data.get("started") or 0.0),
            http=str(data.get("http") or ""),
        )
    except (OSError, ValueError, KeyError, TypeError):
        return None


def entries() -> list[ServerEntry]:
    """The running servers, oldest first; stale and unreadable entries are removed."""
    found = []
    for path in sorted(servers_dir().glob("*.json")):
        entry = _read(path)
        if entry is None or not _alive(entry.pid) or not Path(entry.socket).exists():
            if entry is None or not _alive(entry.pid):
                with contextlib.suppress(FileNotFoundError):
                    path.unlink()
                if entry is not None:
                    unregister(entry)
            continue
        found.append(entry)
    return sorted(found, key=lambda e: e.started)


def for_model(model: Path) -> list[ServerEntry]:
    """The running servers of the model file `model` (the same file, by path)."""
    wanted = os.path.realpath(model)
    return [e for e in entries() if os.path.realpath(e.model) == wanted]


def new_entry(pid: int, model: Path, settings: dict[str, Any], http: str = "") -> ServerEntry:
    """The entry of a server starting now."""
    return ServerEntry(
        pid=pid,
        socket=str(socket_path(pid)),
        model=os.path.realpath(model),
        settings=settings,
        started=time.time(),
        http=http,
    )
