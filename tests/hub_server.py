"""A loopback Hugging Face Hub for tests and benchmarks (plain HTTP on 127.0.0.1, port 0).

It answers what `huggingface_hub` 2.4 asks for when listing and downloading model files:

- `GET /api/models/{repo}/tree/{rev}[/{path}]?recursive=&expand=` (`HfApi.list_repo_tree`)
- `GET /api/models/{repo}` and `/api/models/{repo}/revision/{rev}[?blobs=true]`
  (`HfApi.model_info`, `HfApi.repo_info`, the first call of `snapshot_download`)
- `HEAD`/`GET /{repo}/resolve/{rev}/{path}` with `Range` (`get_hf_file_metadata`, `hf_hub_download`)
- `GET /api/agent-harnesses` (an empty registry; see "telemetry" below)

`rev` is `main` (also `refs/heads/main`) or the repo's commit hash (40 hex, or a prefix of 7+).
Files are served with status 200 straight away (no redirect to a CDN), so the client's
redirect/auth-stripping logic never comes into play.

Errors carry the headers `hf_raise_for_status` keys on (`X-Error-Code`, `X-Error-Message`):

- unknown repo: 404 `X-Error-Code: RepoNotFound` (the code the client checks is `RepoNotFound`,
  not `RepositoryNotFound`) -> `RepositoryNotFoundError`
- gated repo, no or wrong `Authorization: Bearer <token>`: 401 `X-Error-Code: GatedRepo`
  -> `GatedRepoError` (a subclass of `RepositoryNotFoundError`!)
- unknown revision: 404 `RevisionNotFound` -> `RevisionNotFoundError`
- unknown file or folder: 404 `EntryNotFound` (+ `X-Repo-Commit`) -> `RemoteEntryNotFoundError`
  (`huggingface_hub.errors.EntryNotFoundError` is its base class)

Pointing `huggingface_hub` at it
--------------------------------
Subprocesses: put `hub_env(hub.url, home)` into the child's environment (it sets `HF_ENDPOINT`,
`HF_HOME`, `HF_HUB_CACHE`, `HF_HUB_DISABLE_XET=1`, `HF_HUB_DISABLE_TELEMETRY=1`, ...) and remove
`HF_TOKEN`, `HUGGING_FACE_HUB_TOKEN` and `HF_HUB_OFFLINE` from it. `huggingface_hub` reads all of
these once, at import, so a fresh process is the simple case.

In-process (pytest): `huggingface_hub.constants` was filled at import time, and several values were
copied out of it then (`HUGGINGFACE_CO_URL_TEMPLATE`, the module-level `huggingface_hub.hf_api.api`
behind `huggingface_hub.list_repo_tree`/`model_info`, ...). Either

1. pass `endpoint=hub.url` explicitly everywhere (`HfApi(endpoint=...)`,
   `hf_hub_download(..., endpoint=...)`, `hf_hub_url(..., endpoint=...)`) and leave
   `constants.ENDPOINT` alone, or
2. call `point_huggingface_hub_at(monkeypatch, hub.url, tmp_path)`, which sets the env vars and
   patches `constants.ENDPOINT` together with `constants.HUGGINGFACE_CO_URL_TEMPLATE`,
   `hf_api.api.endpoint`, the cache and token paths, and the Xet/telemetry switches.

Do NOT patch `constants.ENDPOINT` alone: `hf_hub_url(..., endpoint=X)` builds the URL from
`HUGGINGFACE_CO_URL_TEMPLATE` and only swaps in `X` if that URL starts with `constants.ENDPOINT`,
so a lone patch silently sends downloads to https://huggingface.co.

Xet and telemetry: the client only tries Xet when a HEAD response carries `X-Xet-Hash` (+ a refresh
route) or a cached tree entry has `xetHash`; this server sends neither, so downloads stay plain HTTP
even with `hf_xet` installed. `HF_HUB_DISABLE_XET=1` is set anyway as a belt and braces.
`build_hf_headers` calls `detect_agent()`, which (unless `HF_HUB_DISABLE_TELEMETRY=1`) fetches
`{constants.ENDPOINT}/api/agent-harnesses` once per process (3 s timeout) and caches it under
`HF_HOME`; with telemetry disabled that request is never made, and this server answers it anyway.

Fault injection is per (repo_id, path): `drop_after`, `corrupt`, `serve_html_error`, `stall`,
`fail_with` (the next GETs answer an HTTP error such as 503);
`clear_faults()` removes them. `tamper(repo_id, commit=..., files=...)` makes the hub lie in its
JSON answers the way a hostile or broken hub could (a commit id like `../../x`, a path or LFS sha256
with `../`, a negative size, ...) while still serving the real bytes wherever the client then asks.
Accounting: `bytes_served`, `requests`, `reset_counters()`.
Request headers are recorded with lower-case names and `authorization` replaced by "***".
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import socket
import struct
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from types import TracebackType
from typing import TYPE_CHECKING, Any
from urllib.parse import parse_qs, unquote, urlencode, urlsplit

if TYPE_CHECKING:
    import pytest

CHUNK_SIZE = 1 << 20
SOCKET_TIMEOUT = 10.0
FAKE_DATE = "2024-04-15T12:00:00.000Z"
HTML_ERROR_PAGE = (
    b"<!DOCTYPE html>\n<html><head><title>Network login required</title></head>\n"
    b"<body><h1>Sign in to the network</h1><p>Your connection was intercepted by a proxy."
    b"</p></body></html>\n"
)
_LFS_POINTER = "version https://git-lfs.github.com/spec/v1\noid sha256:{sha256}\nsize {size}\n"
_CORRUPT_TABLE = bytes((b ^ 0xFF) for b in range(256))


@dataclass
class FakeFile:
    """One file in a fake repo: `data` in memory, or `path_on_disk` streamed in chunks."""

    data: bytes | None = None
    path_on_disk: Path | None = None
    # LFS files report `lfs: {oid: sha256, size, pointerSize}` in the tree and use the sha256 as
    # ETag/X-Linked-Etag; other files use their git blob sha1 as ETag.
    lfs: bool = True
    # Precomputed sha256 of the contents (LFS files): skips hashing big `path_on_disk` files.
    sha256: str | None = None

    def __post_init__(self) -> None:
        if (self.data is None) == (self.path_on_disk is None):
            raise ValueError("FakeFile needs exactly one of data= or path_on_disk=")

    @property
    def size(self) -> int:
        if self.data is not None:
            return len(self.data)
        assert self.path_on_disk is not None
        return self.path_on_disk.stat().st_size

    def chunks(self, start: int = 0, end: int | None = None) -> Iterator[bytes]:
        """Contents from byte `start` to byte `end` (exclusive), at most CHUNK_SIZE at a time."""
        stop = self.size if end is None else end
        if self.data is not None:
            view = memoryview(self.data)
            for pos in range(start, stop, CHUNK_SIZE):
                yield bytes(view[pos : min(pos + CHUNK_SIZE, stop)])
            return
        assert self.path_on_disk is not None
        with self.path_on_disk.open("rb") as f:
            f.seek(start)
            left = stop - start
            while left > 0:
                block = f.read(min(CHUNK_SIZE, left))
                if not block:
                    return
                left -= len(block)
                yield block


def git_blob_sha1(chunks: Iterator[bytes], size: int) -> str:
    """The git object id of a blob with these contents."""
    h = hashlib.sha1(b"blob %d\0" % size)
    for chunk in chunks:
        h.update(chunk)
    return h.hexdigest()


@dataclass
class _Entry:
    path: str
    file: FakeFile
    size: int
    lfs: bool
    sha256: str | None  # LFS only
    oid: str  # git blob id: of the contents, or of the LFS pointer
    pointer_size: int

    @property
    def etag(self) -> str:
        return self.sha256 if self.lfs and self.sha256 else self.oid

    def tree_json(self) -> dict[str, Any]:
        entry: dict[str, Any] = {"type": "file", "oid": self.oid, "size": self.size}
        entry["path"] = self.path
        if self.lfs:
            entry["lfs"] = {"oid": self.sha256, "size": self.size, "pointerSize": self.pointer_size}
        return entry

    def sibling_json(self) -> dict[str, Any]:
        sibling: dict[str, Any] = {"rfilename": self.path, "size": self.size, "blobId": self.oid}
        if self.lfs:
            sibling["lfs"] = {
                "sha256": self.sha256,
                "size": self.size,
                "pointerSize": self.pointer_size,
            }
        return sibling


def _make_entry(path: str, file: FakeFile) -> _Entry:
    size = file.size
    if not file.lfs:
        return _Entry(path, file, size, False, None, git_blob_sha1(file.chunks(), size), 0)
    sha256 = file.sha256
    if sha256 is None:
        h = hashlib.sha256()
        for chunk in file.chunks():
            h.update(chunk)
        sha256 = h.hexdigest()
    pointer = _LFS_POINTER.format(sha256=sha256, size=size).encode()
    oid = git_blob_sha1(iter([pointer]), len(pointer))
    return _Entry(path, file, size, True, sha256, oid, len(pointer))


@dataclass
class _Repo:
    repo_id: str
    entries: dict[str, _Entry]
    dirs: set[str]
    gated: bool
    token: str
    commit: str

    def resolve(self, revision: str) -> str | None:
        """The commit a revision names, or None."""
        if revision in ("main", "refs/heads/main"):
            return self.commit
        if len(revision) >= 7 and self.commit.startswith(revision.lower()):
            return self.commit
        return None


@dataclass
class _Tamper:
    """Lies told about a repo: another commit id, and per real path, replaced JSON fields."""

    commit: str | None = None
    files: dict[str, dict[str, Any]] | None = None

    def sibling(self, path: str, honest: dict[str, Any]) -> dict[str, Any]:
        return _patched(honest, (self.files or {}).get(path), name_key="rfilename")

    def tree(self, path: str, honest: dict[str, Any]) -> dict[str, Any]:
        return _patched(honest, (self.files or {}).get(path), name_key="path")

    def real_path(self, claimed: str) -> str:
        """The real file behind a path the hub claimed (renamed with `path`), else `claimed`."""
        for real, fields in (self.files or {}).items():
            if fields.get("path") == claimed:
                return real
        return claimed


def _patched(
    honest: dict[str, Any], fields: dict[str, Any] | None, *, name_key: str
) -> dict[str, Any]:
    """`honest` with `fields` laid over it: `path` renames, `lfs` is merged (its `sha256` is
    the tree's `oid`), anything else replaces the field of that name."""
    if not fields:
        return honest
    out = dict(honest)
    for key, value in fields.items():
        if key == "path":
            out[name_key] = value
        elif key == "lfs" and isinstance(value, dict) and isinstance(out.get("lfs"), dict):
            lfs = dict(out["lfs"])
            for k, v in value.items():
                lfs["oid" if k == "sha256" and name_key == "path" else k] = v
            out["lfs"] = lfs
        else:
            out[key] = value
    return out


@dataclass
class _Drop:
    n_bytes: int
    times: int
    reset: bool


class HubError(Exception):
    """An error response, the way the Hub sends them."""

    def __init__(
        self, status: int, code: str | None, message: str, headers: dict[str, str] | None = None
    ) -> None:
        super().__init__(message)
        self.status = status
        self.code = code
        self.message = message
        self.headers = headers or {}


class _Server(ThreadingHTTPServer):
    daemon_threads = True
    block_on_close = False
    request_queue_size = 128

    def __init__(self, hub: FakeHub) -> None:
        self.hub = hub
        self.conn_lock = threading.Lock()
        self.conn_threads: set[threading.Thread] = set()
        self.conn_sockets: set[socket.socket] = set()
        self.reset_on_close: set[int] = set()  # ids of sockets to close with an RST
        super().__init__(("127.0.0.1", 0), _Handler)

    def process_request(self, request: Any, client_address: Any) -> None:
        thread = threading.Thread(
            target=self._serve_connection,
            args=(request, client_address),
            name="fakehub-conn",
            daemon=True,
        )
        with self.conn_lock:
            self.conn_threads.add(thread)
            self.conn_sockets.add(request)
        thread.start()

    def _serve_connection(self, request: Any, client_address: Any) -> None:
        try:
            self.process_request_thread(request, client_address)
        finally:
            with self.conn_lock:
                self.conn_threads.discard(threading.current_thread())
                self.conn_sockets.discard(request)

    def shutdown_request(self, request: Any) -> None:
        with self.conn_lock:
            reset = id(request) in self.reset_on_close
            self.reset_on_close.discard(id(request))
        if reset:
            self.close_request(request)  # SO_LINGER 0 is set: close() sends an RST, no FIN
        else:
            super().shutdown_request(request)

    def handle_error(self, request: Any, client_address: Any) -> None:
        """Quiet: a client going away mid-response is routine here."""

    def close_connections(self, deadline: float) -> None:
        with self.conn_lock:
            sockets = list(self.conn_sockets)
            threads = list(self.conn_threads)
        for sock in sockets:
            with contextlib.suppress(OSError):
                sock.shutdown(socket.SHUT_RDWR)
        for thread in threads:
            thread.join(max(0.0, deadline - _now()))


def _now() -> float:
    return time.monotonic()


class _Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    timeout = SOCKET_TIMEOUT
    disable_nagle_algorithm = True
    server: _Server

    def log_message(self, format: str, *args: Any) -> None:
        """Quiet: no request log on stderr."""

    def do_GET(self) -> None:
        self._dispatch(head=False)

    def do_HEAD(self) -> None:
        self._dispatch(head=True)

    def do_POST(self) -> None:
        self._not_allowed()

    def do_PUT(self) -> None:
        self._not_allowed()

    def do_DELETE(self) -> None:
        self._not_allowed()

    # -- plumbing --------------------------------------------------------------------------------

    @property
    def hub(self) -> FakeHub:
        return self.server.hub

    def _record(self) -> None:
        headers = {
            k.lower(): ("***" if k.lower() == "authorization" else v)
            for k, v in self.headers.items()
        }
        self.hub._record(self.command, self.path, headers)

    def _not_allowed(self) -> None:
        self._record()
        self._drain_body()
        self._send_json(405, {"error": "Method not allowed"}, head=False)

    def _drain_body(self) -> None:
        length = int(self.headers.get("Content-Length") or 0)
        while length > 0:
            got = self.rfile.read(min(length, CHUNK_SIZE))
            if not got:
                break
            length -= len(got)

    def _send(self, status: int, headers: dict[str, str], body: bytes = b"", *, head: bool) -> None:
        self.send_response(status)
        for name, value in headers.items():
            self.send_header(name, value)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        if body and not head:
            self.wfile.write(body)

    def _send_json(
        self, status: int, payload: Any, *, head: bool, headers: dict[str, str] | None = None
    ) -> None:
        body = json.dumps(payload).encode()
        all_headers = {"Content-Type": "application/json; charset=utf-8", **(headers or {})}
        self._send(status, all_headers, body, head=head)

    def _send_error(self, err: HubError, *, head: bool) -> None:
        headers = dict(err.headers)
        if err.code is not None:
            headers["X-Error-Code"] = err.code
        headers["X-Error-Message"] = err.message
        self._send_json(err.status, {"error": err.message}, head=head, headers=headers)

    def _dispatch(self, *, head: bool) -> None:
        self._record()
        try:
            try:
                self._route(head=head)
            except HubError as err:
                self._send_error(err, head=head)
        except OSError:  # client went away, timeout, or stop() shut the socket
            self.close_connection = True

    # -- routing ---------------------------------------------------------------------------------

    def _route(self, *, head: bool) -> None:
        split = urlsplit(self.path)
        query = parse_qs(split.query)
        segs = [unquote(s) for s in split.path.split("/")[1:]]
        if segs[:2] == ["api", "agent-harnesses"]:
            self._send_json(200, {"standardEnvVars": [], "harnesses": {}}, head=head)
            return
        if len(segs) >= 3 and segs[:2] == ["api", "models"]:
            self._api_models(segs[2:], split.path, query, head=head)
            return
        for i in (2, 1):
            if len(segs) > i + 1 and segs[i] == "resolve":
                repo_id = "/".join(segs[:i])
                self._resolve(repo_id, segs[i + 1], "/".join(segs[i + 2 :]), head=head)
                return
        raise HubError(404, None, "Sorry, we can't find the page you are looking for.")

    def _split_repo(self, rest: list[str]) -> tuple[str, list[str]]:
        """Split `org/name/tree/main/x` into the repo id and what follows it."""
        known = self.hub._repo_ids()
        if len(rest) >= 2 and "/".join(rest[:2]) in known:
            return "/".join(rest[:2]), rest[2:]
        if rest[0] in known:
            return rest[0], rest[1:]
        if len(rest) >= 2 and rest[1] in ("tree", "revision"):
            return rest[0], rest[1:]
        return "/".join(rest[:2]), rest[2:]

    def _repo_and_commit(self, repo_id: str, revision: str) -> tuple[_Repo, str]:
        tamper = self.hub._tamper_of(repo_id)
        if tamper.commit is not None and revision == tamper.commit:
            revision = "main"  # the client asks for the commit it was told: serve the real one
        repo = self.hub._get_repo(repo_id)
        if repo is None:
            raise HubError(404, "RepoNotFound", "Repository not found")
        if repo.gated and self.headers.get("Authorization") != f"Bearer {repo.token}":
            raise HubError(
                401,
                "GatedRepo",
                f"Access to model {repo_id} is restricted. You must have access to it and be"
                " authenticated to access it. Please log in.",
            )
        commit = repo.resolve(revision)
        if commit is None:
            raise HubError(404, "RevisionNotFound", f"Invalid rev id: {revision}")
        return repo, commit

    # -- /api/models -----------------------------------------------------------------------------

    def _api_models(
        self, rest: list[str], raw_path: str, query: dict[str, list[str]], *, head: bool
    ) -> None:
        repo_id, tail = self._split_repo(rest)
        if not tail:
            self._model_info(repo_id, "main", query, head=head)
        elif tail[0] == "revision" and len(tail) == 2:
            self._model_info(repo_id, tail[1], query, head=head)
        elif tail[0] == "tree" and len(tail) >= 2:
            self._tree(repo_id, tail[1], "/".join(tail[2:]), raw_path, query, head=head)
        else:
            raise HubError(404, None, "Sorry, we can't find the page you are looking for.")

    def _model_info(
        self, repo_id: str, revision: str, query: dict[str, list[str]], *, head: bool
    ) -> None:
        repo, commit = self._repo_and_commit(repo_id, revision)
        blobs = _flag(query, "blobs")
        entries = [repo.entries[p] for p in sorted(repo.entries)]
        tamper = self.hub._tamper_of(repo_id)
        siblings = [
            tamper.sibling(e.path, e.sibling_json() if blobs else {"rfilename": e.path})
            for e in entries
        ]
        author = repo_id.split("/")[0] if "/" in repo_id else None
        info = {
            "_id": hashlib.sha1(repo_id.encode()).hexdigest()[:24],
            "id": repo_id,
            "modelId": repo_id,
            "author": author,
            "sha": commit if tamper.commit is None else tamper.commit,
            "lastModified": FAKE_DATE,
            "createdAt": FAKE_DATE,
            "private": False,
            "gated": "manual" if repo.gated else False,
            "disabled": False,
            "downloads": 0,
            "likes": 0,
            "library_name": "gguf",
            "tags": ["gguf"],
            "siblings": siblings,
            "usedStorage": sum(e.size for e in entries),
        }
        self._send_json(200, info, head=head)

    def _tree(
        self,
        repo_id: str,
        revision: str,
        path: str,
        raw_path: str,
        query: dict[str, list[str]],
        *,
        head: bool,
    ) -> None:
        repo, commit = self._repo_and_commit(repo_id, revision)
        path = path.strip("/")
        if path and path not in repo.dirs:
            raise HubError(
                404,
                "EntryNotFound",
                f"{path} does not exist on {revision!r}",
                {"X-Repo-Commit": commit},
            )
        recursive = _flag(query, "recursive")
        expand = _flag(query, "expand")
        prefix = f"{path}/" if path else ""

        def wanted(p: str) -> bool:
            return p.startswith(prefix) and (recursive or "/" not in p[len(prefix) :])

        items: list[dict[str, Any]] = []
        for p in sorted({*repo.dirs, *repo.entries}):
            if not wanted(p):
                continue
            if p in repo.entries:
                item = self.hub._tamper_of(repo_id).tree(p, repo.entries[p].tree_json())
            else:
                oid = hashlib.sha1(f"tree:{commit}:{p}".encode()).hexdigest()
                item = {"type": "directory", "oid": oid, "size": 0, "path": p}
            if expand:
                item["lastCommit"] = {"id": commit, "title": "Upload model", "date": FAKE_DATE}
            items.append(item)

        headers: dict[str, str] = {}
        page_size = self.hub.tree_page_size
        if page_size:
            start = int((query.get("cursor") or ["0"])[0])
            if start + page_size < len(items):
                params = {k: v[0] for k, v in query.items()}
                params["cursor"] = str(start + page_size)
                headers["Link"] = f'<{self.hub.url}{raw_path}?{urlencode(params)}>; rel="next"'
            items = items[start : start + page_size]
        self._send_json(200, items, head=head, headers=headers)

    # -- /{repo}/resolve/{rev}/{path} ------------------------------------------------------------

    def _resolve(self, repo_id: str, revision: str, path: str, *, head: bool) -> None:
        repo, commit = self._repo_and_commit(repo_id, revision)
        entry = repo.entries.get(self.hub._tamper_of(repo_id).real_path(path))
        if entry is None:
            raise HubError(404, "EntryNotFound", "Entry not found", {"X-Repo-Commit": commit})
        key = (repo.repo_id, path)
        faults = self.hub._faults_for(key, take_drop=not head)
        if faults.status is not None:
            raise HubError(faults.status, None, f"fault injected: HTTP {faults.status}")
        if faults.html and not head:
            self.send_response(200)
            self.send_header("Content-Type", "text/html; charset=utf-8")
            self.send_header("Content-Length", str(len(HTML_ERROR_PAGE)))
            self.end_headers()
            self._stream(key, iter([HTML_ERROR_PAGE]), None, reset=False)
            return

        headers = {
            "Content-Type": "application/octet-stream",
            "Accept-Ranges": "bytes",
            "ETag": f'"{entry.etag}"',
            "X-Repo-Commit": commit,
        }
        if entry.lfs:
            headers["X-Linked-Etag"] = f'"{entry.etag}"'
            headers["X-Linked-Size"] = str(entry.size)

        size = entry.size
        byte_range = _parse_range(self.headers.get("Range"), size)
        if byte_range == "unsatisfiable":
            headers["Content-Range"] = f"bytes */{size}"
            self._send(416, headers, head=head)
            return
        if byte_range is None:
            status, start, end = 200, 0, size
        else:
            status, (start, end) = 206, byte_range
            headers["Content-Range"] = f"bytes {start}-{end - 1}/{size}"

        self.send_response(status)
        for name, value in headers.items():
            self.send_header(name, value)
        self.send_header("Content-Length", str(end - start))
        self.end_headers()
        if head:
            return
        if faults.stall:
            self.wfile.flush()
            if self.hub._stopping.wait(faults.stall):
                self.close_connection = True
                return
        chunks = entry.file.chunks(start, end)
        if faults.corrupt:
            chunks = (c.translate(_CORRUPT_TABLE) for c in chunks)
        limit = faults.drop.n_bytes if faults.drop else None
        self._stream(key, chunks, limit, reset=bool(faults.drop and faults.drop.reset))

    def _stream(
        self, key: tuple[str, str], chunks: Iterator[bytes], limit: int | None, *, reset: bool
    ) -> None:
        """Send body chunks, counting them; past `limit` bytes, cut the connection."""
        sent = 0
        for block in chunks:
            chunk = block if limit is None else block[: limit - sent]
            if chunk:
                # Counted before the write so that a client which has read the bytes always
                # sees them counted; taken back if the write fails.
                self.hub._count(key, len(chunk))
                try:
                    self.wfile.write(chunk)
                except OSError:
                    self.hub._count(key, -len(chunk))
                    raise
                sent += len(chunk)
            if limit is not None and sent >= limit:
                self._cut(reset=reset)
                return

    def _cut(self, *, reset: bool) -> None:
        """End this connection mid-body: a FIN (default) or an RST."""
        self.close_connection = True
        if reset:
            self.connection.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
            with self.server.conn_lock:
                self.server.reset_on_close.add(id(self.connection))


def _flag(query: dict[str, list[str]], name: str) -> bool:
    return (query.get(name) or ["false"])[0].lower() in ("1", "true", "yes")


def _parse_range(value: str | None, size: int) -> tuple[int, int] | str | None:
    """(start, end exclusive) for a single `bytes=` range, "unsatisfiable", or None for all."""
    if not value:
        return None
    unit, _, spec = value.strip().partition("=")
    if unit.strip().lower() != "bytes" or "," in spec:
        return None
    first, dash, last = spec.strip().partition("-")
    first, last = first.strip(), last.strip()
    if (
        not dash
        or not (first or last)
        or not (first or "0").isdigit()
        or not (last or "0").isdigit()
    ):
        return None
    if not first:  # bytes=-K: the last K bytes
        suffix = int(last)
        if suffix == 0 or size == 0:
            return "unsatisfiable"
        return max(0, size - suffix), size
    start = int(first)
    end = size if not last else min(int(last) + 1, size)
    if start >= size or (last and int(last) < start):
        return "unsatisfiable"
    return start, end


@dataclass
class _Faults:
    status: int | None = None  # answer this HTTP error instead of the file
    drop: _Drop | None = None
    corrupt: bool = False
    html: bool = False
    stall: float = 0.0


class FakeHub:
    """A hub-compatible HTTP server on 127.0.0.1 for tests and benchmarks; see the module doc."""

    def __init__(self) -> None:
        self.url = ""
        self.bytes_served: dict[tuple[str, str], int] = {}
        self.requests: list[tuple[str, str, dict[str, str]]] = []
        # When set, tree listings are split into pages of this many entries (Link: rel="next").
        self.tree_page_size: int | None = None
        self._lock = threading.Lock()
        self._repos: dict[str, _Repo] = {}
        self._drops: dict[tuple[str, str], _Drop] = {}
        self._corrupt: set[tuple[str, str]] = set()
        self._html: set[tuple[str, str]] = set()
        self._stalls: dict[tuple[str, str], float] = {}
        self._failures: dict[tuple[str, str], list[int]] = {}  # [status, GETs left]
        self._tampers: dict[str, _Tamper] = {}
        self._stopping = threading.Event()
        self._server: _Server | None = None
        self._thread: threading.Thread | None = None

    # -- lifecycle -------------------------------------------------------------------------------

    def start(self) -> FakeHub:
        if self._server is not None:
            return self
        self._stopping.clear()
        self._server = _Server(self)
        host, port = self._server.server_address[:2]
        self.url = f"http://{host!s}:{port}"
        self._thread = threading.Thread(
            target=self._server.serve_forever,
            kwargs={"poll_interval": 0.05},
            name="fakehub",
            daemon=True,
        )
        self._thread.start()
        return self

    def stop(self) -> None:
        server, thread = self._server, self._thread
        if server is None:
            return
        self._server = self._thread = None
        deadline = _now() + 1.0
        self._stopping.set()
        server.shutdown()
        server.close_connections(deadline)
        server.server_close()
        if thread is not None:
            thread.join(max(0.0, deadline - _now()))

    def __enter__(self) -> FakeHub:
        return self.start()

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.stop()

    # -- content ---------------------------------------------------------------------------------

    def add_repo(
        self,
        repo_id: str,
        files: dict[str, FakeFile],
        *,
        gated: bool = False,
        token: str = "hf_test_token",
        commit: str | None = None,
    ) -> None:
        """Add (or replace) a model repo. Hashes are computed here, once."""
        if commit is None:
            commit = hashlib.sha1(f"fakehub:{repo_id}".encode()).hexdigest()
        if len(commit) != 40 or any(c not in "0123456789abcdef" for c in commit):
            raise ValueError("commit must be 40 lower-case hex characters")
        entries = {p.strip("/"): _make_entry(p.strip("/"), f) for p, f in files.items()}
        dirs = {p.rsplit("/", i)[0] for p in entries for i in range(1, p.count("/") + 1)}
        clash = dirs & entries.keys()
        if clash:
            raise ValueError(f"paths used both as a file and a folder: {sorted(clash)}")
        with self._lock:
            self._repos[repo_id] = _Repo(repo_id, entries, dirs, gated, token, commit)

    def commit_of(self, repo_id: str) -> str:
        repo = self._get_repo(repo_id)
        if repo is None:
            raise KeyError(repo_id)
        return repo.commit

    def sha256_of(self, repo_id: str, path: str) -> str | None:
        repo = self._get_repo(repo_id)
        if repo is None:
            raise KeyError(repo_id)
        return repo.entries[path].sha256

    # -- fault injection -------------------------------------------------------------------------

    def drop_after(
        self, repo_id: str, path: str, n_bytes: int, times: int = 1, *, reset: bool = False
    ) -> None:
        """The next `times` GETs of the file send `n_bytes` of body (from the start of the range
        asked for), then end the connection: with a FIN, or with an RST if `reset`."""
        with self._lock:
            self._drops[(repo_id, path)] = _Drop(n_bytes, times, reset)

    def corrupt(self, repo_id: str, path: str) -> None:
        """Serve every byte inverted (same length), still advertising the right sha256/size."""
        with self._lock:
            self._corrupt.add((repo_id, path))

    def serve_html_error(self, repo_id: str, path: str) -> None:
        """GETs answer 200 with an HTML page (a captive portal) instead of the file; HEAD is
        unaffected."""
        with self._lock:
            self._html.add((repo_id, path))

    def fail_with(self, repo_id: str, path: str, status: int, times: int = 1) -> None:
        """The next `times` GETs of the file answer HTTP `status` (a 503: the hub is busy)."""
        with self._lock:
            self._failures[(repo_id, path)] = [status, times]

    def stall(self, repo_id: str, path: str, seconds: float) -> None:
        """GETs send the headers, then wait `seconds` before the body."""
        with self._lock:
            self._stalls[(repo_id, path)] = seconds

    def tamper(
        self,
        repo_id: str,
        *,
        commit: str | None = None,
        files: dict[str, dict[str, Any]] | None = None,
    ) -> None:
        """Lie about a repo in the JSON answers (model_info and tree), as a hostile hub could.

        `commit` replaces the commit id (`sha`); `files` maps a real path to fields that replace
        its entry's: `path` (a new name), `size`, `lfs` (merged: `sha256`, `size`). Downloads at
        the claimed commit or of a claimed path still serve the real file, so a client that
        believes the lie gets bytes to write wherever the lie points.
        """
        with self._lock:
            self._tampers[repo_id] = _Tamper(commit, files)

    def clear_faults(self) -> None:
        with self._lock:
            self._tampers.clear()
            self._drops.clear()
            self._corrupt.clear()
            self._html.clear()
            self._stalls.clear()
            self._failures.clear()

    # -- accounting ------------------------------------------------------------------------------

    def served(self, repo_id: str, path: str) -> int:
        with self._lock:
            return self.bytes_served.get((repo_id, path), 0)

    def reset_counters(self) -> None:
        with self._lock:
            self.bytes_served.clear()
            self.requests.clear()

    # -- internals used by the handler -----------------------------------------------------------

    def _repo_ids(self) -> set[str]:
        with self._lock:
            return set(self._repos)

    def _tamper_of(self, repo_id: str) -> _Tamper:
        with self._lock:
            return self._tampers.get(repo_id) or _Tamper()

    def _get_repo(self, repo_id: str) -> _Repo | None:
        with self._lock:
            return self._repos.get(repo_id)

    def _record(self, method: str, path: str, headers: dict[str, str]) -> None:
        with self._lock:
            self.requests.append((method, path, headers))

    def _count(self, key: tuple[str, str], n: int) -> None:
        with self._lock:
            self.bytes_served[key] = self.bytes_served.get(key, 0) + n

    def _faults_for(self, key: tuple[str, str], *, take_drop: bool) -> _Faults:
        with self._lock:
            drop = self._drops.get(key) if take_drop else None
            if drop is not None:
                drop.times -= 1
                if drop.times <= 0:
                    del self._drops[key]
                drop = _Drop(drop.n_bytes, 1, drop.reset)
            failure = self._failures.get(key) if take_drop else None
            if failure is not None:
                failure[1] -= 1
                if failure[1] <= 0:
                    del self._failures[key]
            return _Faults(
                status=failure[0] if failure else None,
                drop=drop,
                corrupt=key in self._corrupt,
                html=key in self._html,
                stall=self._stalls.get(key, 0.0),
            )


def hub_env(url: str, home: Path) -> dict[str, str]:
    """Environment variables that point a fresh `huggingface_hub` process at `url`.

    Also remove HF_TOKEN, HUGGING_FACE_HUB_TOKEN and HF_HUB_OFFLINE from the child's environment.
    """
    return {
        "HF_ENDPOINT": url,
        "HF_HOME": str(home),
        "HF_HUB_CACHE": str(home / "hub"),
        "HF_XET_CACHE": str(home / "xet"),
        "HF_HUB_DISABLE_XET": "1",
        "HF_HUB_DISABLE_TELEMETRY": "1",
        "HF_HUB_DISABLE_UPDATE_CHECK": "1",
    }


def point_huggingface_hub_at(monkeypatch: pytest.MonkeyPatch, url: str, home: Path) -> None:
    """Point the already imported `huggingface_hub` of this process at `url`, with its cache,
    token and Xet cache under `home`, no Xet, no telemetry."""
    import huggingface_hub.hf_api
    import huggingface_hub.utils._cache_manager
    from huggingface_hub import constants

    for name, value in hub_env(url, home).items():
        monkeypatch.setenv(name, value)
    for name in ("HF_TOKEN", "HUGGING_FACE_HUB_TOKEN", "HF_HUB_OFFLINE"):
        monkeypatch.delenv(name, raising=False)
    patches: dict[str, object] = {
        "ENDPOINT": url,
        "HUGGINGFACE_CO_URL_TEMPLATE": url + "/{repo_id}/resolve/{revision}/{filename}",
        "HF_HOME": str(home),
        "HF_HUB_CACHE": str(home / "hub"),
        "HUGGINGFACE_HUB_CACHE": str(home / "hub"),
        "HF_ASSETS_CACHE": str(home / "assets"),
        "HF_XET_CACHE": str(home / "xet"),
        "HF_TOKEN_PATH": str(home / "token"),
        "HF_STORED_TOKENS_PATH": str(home / "stored_tokens"),
        "AGENT_HARNESSES_PATH": str(home / ".agent_harnesses.json"),
        "HF_HUB_OFFLINE": False,
        "HF_HUB_DISABLE_XET": True,
        "HF_HUB_DISABLE_TELEMETRY": True,
    }
    for name, value in patches.items():
        monkeypatch.setattr(constants, name, value)
    monkeypatch.setattr(huggingface_hub.hf_api.api, "endpoint", url)
    monkeypatch.setattr(huggingface_hub.utils._cache_manager, "HF_HUB_CACHE", str(home / "hub"))
    os.makedirs(home, exist_ok=True)
