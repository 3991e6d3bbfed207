"""One file from the hub into the cache: resumed, hashed as it arrives, retried, verified, linked.

The file downloads into a partial file with a stable name in the hub cache (hub/cache.py) and
continues with an HTTP Range request from the bytes on disk (in this run after a dropped
connection, or in the next run). Only after its sha256 matches the hub's LFS oid is it renamed to
its blob and linked into the snapshot, so a file where a model is expected is always complete and
verified.

Only what the network or the hub can do is retried: a dropped connection, a timeout, a 5xx. A
local disk error stops the pull with its reason; anything else is a bug and propagates as it is.
"""

from __future__ import annotations

import hashlib
import os
import shutil
import threading
import time
from pathlib import Path
from typing import Protocol

from wizardchat.errors import HubError
from wizardchat.hub import cache as hubcache
from wizardchat.hub.catalog import RemoteFile, human_size

CHUNK = 1 << 20
RETRY_DELAYS = (0.5, 1.0, 2.0)  # seconds before each retry of a dropped transfer, in one run
CONNECT_TIMEOUT, READ_TIMEOUT = 10.0, 60.0


def endpoint() -> str:
    """The hub's base URL (HF_ENDPOINT, read now rather than at import)."""
    return os.environ.get("HF_ENDPOINT", "https://huggingface.co").rstrip("/")


def first_line(e: BaseException) -> str:
    """The first line of an exception's text (its type's name when it has none)."""
    return (str(e).strip().splitlines() or [type(e).__name__])[0]


class Progress(Protocol):
    """Where a pull reports its bytes (rich bars on a terminal, lines elsewhere)."""

    def start(self, path: str, total: int, done: int) -> None: ...

    def advance(self, path: str, n: int) -> None: ...

    def finish(self, path: str) -> None: ...

    def note(self, text: str) -> None: ...


class _Cancelled(Exception):
    """The pull was cancelled (Ctrl-C, or another file failed)."""


class _RangeIgnored(Exception):
    """The server answered a Range request with the whole file."""


class _HubBusy(Exception):
    """The hub answered with a server error (5xx): worth another try."""


def _blob_name(commit: str, f: RemoteFile) -> str:
    # GGUFs on the hub are LFS files, named by their sha256. A file without one is named by a
    # hash of its commit and path: another commit may have other bytes under the same path.
    if f.sha256:
        return f.sha256
    return "path-" + hashlib.sha256(f"{commit}/{f.path}".encode()).hexdigest()


def blob(repo: str, commit: str, f: RemoteFile) -> Path:
    """Where the verified bytes of `f` are kept."""
    return hubcache.blob_path(repo, _blob_name(commit, f))


def partial(repo: str, commit: str, f: RemoteFile) -> Path:
    """Where `f` downloads until it is verified."""
    return hubcache.partial_path(repo, _blob_name(commit, f))


def fetch(
    repo: str,
    commit: str,
    f: RemoteFile,
    snapshot: Path,
    progress: Progress,
    cancel: threading.Event,
) -> None:
    """One file: resume its partial file, hash it, verify, move it into place."""
    done = blob(repo, commit, f)
    link = snapshot / f.path
    if _already_there(done, f, progress):  # the same bytes under another path or commit
        _link(done, link)
        return
    part = partial(repo, commit, f)
    part.parent.mkdir(parents=True, exist_ok=True)
    have = part.stat().st_size if part.exists() else 0
    if have > f.size:
        part.unlink()
        have = 0
    progress.start(f.path, f.size, have)
    hasher = _transfer_with_retries(repo, commit, f, part, progress, cancel)
    if hasher is None:
        return
    if f.sha256 and hasher.hexdigest() != f.sha256:
        part.unlink()
        raise HubError(
            f"{f.path} does not match the hub's sha256 (got {hasher.hexdigest()[:12]}..., "
            f"expected {f.sha256[:12]}...): the bad file was deleted; run pull again"
        )
    os.replace(part, done)
    _link(done, link)
    progress.finish(f.path)


def _transfer_with_retries(
    repo: str,
    commit: str,
    f: RemoteFile,
    part: Path,
    progress: Progress,
    cancel: threading.Event,
) -> hashlib._Hash | None:
    """Transfer until `part` holds all of `f`; the sha256 of its bytes (None: cancelled)."""
    from huggingface_hub.utils import httpx

    # What a network or a hub does: the connection drops or stalls, the hub has a bad moment.
    transient = (httpx.TransportError, ConnectionError, TimeoutError, _HubBusy)
    have, hasher = _on_disk(part)
    attempt = 0
    while have < f.size:
        if cancel.is_set():
            return None
        try:
            have = _transfer(repo, commit, f, part, have, hasher, progress, cancel)
        except _Cancelled:
            return None
        except _RangeIgnored:  # start over from byte 0, without counting it as a failure
            part.unlink()
            progress.advance(f.path, -have)
            have, hasher = 0, hashlib.sha256()
            continue
        except transient as e:  # continue from the bytes on disk
            if attempt >= len(RETRY_DELAYS):
                raise HubError(_failed(f, have, e)) from e
            time.sleep(RETRY_DELAYS[attempt])
            attempt += 1
            have, hasher = _on_disk(part)  # none yet if the hub failed before the first byte
        except (httpx.HTTPError, OSError) as e:  # a redirect loop; the local disk (full, gone)
            raise HubError(_failed(f, have, e)) from e
    return hasher


def _failed(f: RemoteFile, have: int, e: BaseException) -> str:
    return (
        f"download of {f.path} failed ({first_line(e)}); {human_size(have)} of "
        f"{human_size(f.size)} kept: run the same pull again to continue"
    )


def _already_there(path: Path, f: RemoteFile, progress: Progress) -> bool:
    """Whether the blob holds the file's bytes: hashed again, never trusted for name and size
    (another tool may have put other bytes there)."""
    if not path.is_file() or path.is_symlink() or path.stat().st_size != f.size:
        return False
    if f.sha256 is None:
        return True  # nothing to compare with: named by commit and path, as downloaded
    progress.note(f"verifying {f.path}, already in the cache")
    return _hashed(path).hexdigest() == f.sha256


def _on_disk(part: Path) -> tuple[int, hashlib._Hash]:
    """The bytes of a partial file so far (0 when there is none yet), and their sha256."""
    if not part.exists():
        return 0, hashlib.sha256()
    return part.stat().st_size, _hashed(part)


def _hashed(path: Path) -> hashlib._Hash:
    hasher = hashlib.sha256()
    with path.open("rb") as fh:
        while block := fh.read(8 * CHUNK):
            hasher.update(block)
    return hasher


def _transfer(
    repo: str,
    commit: str,
    f: RemoteFile,
    part: Path,
    have: int,
    hasher: hashlib._Hash,
    progress: Progress,
    cancel: threading.Event,
) -> int:
    """One HTTP GET from byte `have` on; returns the bytes on disk after it."""
    from huggingface_hub import get_session, hf_hub_url, hf_raise_for_status
    from huggingface_hub.errors import GatedRepoError, HfHubHTTPError
    from huggingface_hub.utils import build_hf_headers, httpx

    url = hf_hub_url(repo, f.path, revision=commit, endpoint=endpoint())
    headers = build_hf_headers()
    headers["Accept-Encoding"] = "identity"
    if have:
        headers["Range"] = f"bytes={have}-"
    timeout = httpx.Timeout(READ_TIMEOUT, connect=CONNECT_TIMEOUT)
    with get_session().stream(
        "GET", url, headers=headers, follow_redirects=True, timeout=timeout
    ) as response:
        if response.status_code >= 400:
            response.read()
            try:
                hf_raise_for_status(response)
            except GatedRepoError:
                raise HubError(f"{repo} is gated: set HF_TOKEN") from None
            except HfHubHTTPError as e:
                if response.status_code < 500:
                    raise HubError(f"{f.path}: {first_line(e)}") from None
                raise _HubBusy(first_line(e)) from e
        if have and response.status_code != 206:
            raise _RangeIgnored
        if "text/html" in response.headers.get("content-type", ""):
            raise HubError(
                f"{f.path}: the server sent a web page instead of the file "
                "(a proxy, captive portal or login page?)"
            )
        with part.open("ab" if have else "wb") as out:
            # As the bytes arrive (a chunk size would buffer them, and lose them when the
            # connection drops before the buffer is full).
            for chunk in response.iter_bytes():
                if have == 0:
                    _check_start(f, chunk)
                out.write(chunk)
                hasher.update(chunk)
                have += len(chunk)
                progress.advance(f.path, len(chunk))
                if have > f.size:
                    part.unlink()
                    raise HubError(f"{f.path}: the server sent more than its {f.size} bytes")
                if cancel.is_set():
                    raise _Cancelled
    return have


def _check_start(f: RemoteFile, first: bytes) -> None:
    head = first[:64].lstrip().lower()
    if head.startswith(b"version https://git-lfs"):
        raise HubError(f"{f.path}: the server sent a git-lfs pointer, not the file")
    if head.startswith((b"<!doctype html", b"<html")):
        raise HubError(f"{f.path}: the server sent a web page instead of the file")


def _link(target: Path, link: Path) -> None:
    """Link the snapshot path to its blob (relative, as huggingface_hub does), or copy it."""
    link.parent.mkdir(parents=True, exist_ok=True)
    tmp = link.with_name(link.name + ".wizardchat-link")
    tmp.unlink(missing_ok=True)
    try:
        tmp.symlink_to(os.path.relpath(target, link.parent))
    except OSError:  # no symlinks (Windows without developer mode): keep a copy there
        shutil.copyfile(target, tmp)
    os.replace(tmp, link)
