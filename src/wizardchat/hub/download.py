"""The only module that imports huggingface_hub: list a repository's quants, download them.

Listing uses `HfApi.model_info(files_metadata=True)`: one request gives the commit, every path,
size and LFS sha256. Downloading is wizardchat's own loop on huggingface_hub's URL, header
(auth) and HTTP session helpers, because since huggingface_hub PR #4228 `hf_hub_download`
writes to a per-process temporary file and deletes it on failure: an interrupted 40 GB shard
would start again from zero. Here each file downloads into a partial file with a stable name in
the hub cache (hub/cache.py), continues with an HTTP Range request from the bytes on disk (in
this run after a dropped connection, or in the next run), is hashed while it arrives, and only
after its sha256 matches the hub's LFS oid is it renamed to its blob and linked into the
snapshot. A file where a model is expected is therefore always complete and verified.
"""

from __future__ import annotations

import hashlib
import os
import shutil
import threading
import time
from concurrent.futures import FIRST_EXCEPTION, ThreadPoolExecutor, wait
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

from wizardchat.errors import HubError, NoModelError, UsageError
from wizardchat.hub import cache as hubcache
from wizardchat.hub.catalog import (
    ModelRef,
    Quant,
    RemoteFile,
    group_quants,
    human_size,
    is_commit,
    is_model_file,
    is_sha256,
    is_wizardlm2,
    repo_path_problem,
)

CHUNK = 1 << 20
RETRY_DELAYS = (0.5, 1.0, 2.0)  # seconds before each retry of a dropped transfer, in one run
CONNECT_TIMEOUT, READ_TIMEOUT = 10.0, 60.0
MAX_FILE_BYTES = 1 << 40  # 1.1 TB: the hub takes files up to 50 GB; more is a lie or a bug
# Tests simulate a nearly full disk with this (bytes); the real figure comes from the OS.
FREE_BYTES_OVERRIDE = "WIZARDCHAT_TEST_DISK_FREE_BYTES"


def endpoint() -> str:
    """The hub's base URL (HF_ENDPOINT, read now rather than at import)."""
    return os.environ.get("HF_ENDPOINT", "https://huggingface.co").rstrip("/")


class Progress(Protocol):
    """Where a pull reports its bytes (rich bars on a terminal, lines elsewhere)."""

    def start(self, path: str, total: int, done: int) -> None: ...

    def advance(self, path: str, n: int) -> None: ...

    def finish(self, path: str) -> None: ...

    def note(self, text: str) -> None: ...


@dataclass(frozen=True)
class RemoteModel:
    """A repository at one commit and its quants."""

    repo: str
    commit: str
    quants: dict[str, Quant]


def list_remote(ref: ModelRef) -> RemoteModel:
    """The repository's commit and quants, from the hub's API (nothing is downloaded).

    The answer is checked before any of it becomes a path: the commit id, and of every model
    file its path, size and sha256. A hub that answers otherwise is refused (HubError).
    """
    if hubcache.offline():
        raise HubError(f"HF_HUB_OFFLINE is set: cannot ask the hub about {ref.repo}")
    from huggingface_hub import HfApi
    from huggingface_hub.errors import (
        GatedRepoError,
        HfHubHTTPError,
        HFValidationError,
        RepositoryNotFoundError,
    )

    try:
        info = HfApi(endpoint=endpoint()).model_info(ref.repo, files_metadata=True)
    except GatedRepoError:
        raise HubError(
            f"{ref.repo} is gated: accept its terms on the hub, then set HF_TOKEN to a token "
            "of that account"
        ) from None
    except RepositoryNotFoundError:
        raise NoModelError(
            f"no repository {ref.repo} on {endpoint()} (or it is private: set HF_TOKEN)"
        ) from None
    except HfHubHTTPError as e:
        raise HubError(f"the hub refused to list {ref.repo}: {_first_line(e)}") from None
    except HFValidationError as e:  # parse_ref checks the same rules: this is a last line
        raise UsageError(f"{ref.repo} is not a repository id: {_first_line(e)}") from None
    except (KeyError, TypeError, ValueError, AttributeError) as e:  # JSON, but not the hub's
        raise HubError(
            f"the answer of {endpoint()} about {ref.repo} is not the hub's "
            f"({type(e).__name__}: {_first_line(e)}); a proxy or captive portal?"
        ) from None
    except Exception as e:  # network: httpx2's errors, OSError, timeouts
        raise HubError(
            f"cannot reach {endpoint()}: {_first_line(e)}", hints=network_hints()
        ) from None
    commit = info.sha
    if commit is None or not is_commit(commit):
        raise HubError(_refusal(ref.repo, f"its commit id {_shown(commit)} is not 40 hex digits"))
    files = [
        _checked_file(ref.repo, s.rfilename, s.size, s.lfs)
        for s in info.siblings or []
        if isinstance(s.rfilename, str) and is_model_file(s.rfilename)
    ]  # other files are never downloaded, so never become paths
    paths = [f.path for f in files]
    twice = next((p for p in paths if paths.count(p) > 1), None)
    if twice is not None:  # two sizes or hashes for one path: which bytes would be right?
        raise HubError(_refusal(ref.repo, f"it lists {_shown(twice)} twice"))
    return RemoteModel(ref.repo, commit, group_quants(files))


def network_hints() -> list[str]:
    """What to check when the hub cannot be reached, and what works without it."""
    hints = [
        "check the network, a proxy (HTTPS_PROXY) and HF_ENDPOINT",
        "HF_HUB_OFFLINE=1 uses the models already downloaded; -m FILE.gguf uses a file you have",
    ]
    here = [
        m.reference
        for m in hubcache.local_models()
        if m.complete and (is_wizardlm2(m.repo) or m.reference.startswith("wizardlm2-"))
    ]
    if here:
        hints.append(f"already here: {', '.join(here[:3])} (wizardchat run -m {here[0]})")
    return hints


def _refusal(repo: str, why: str) -> str:
    return f"refusing the hub's answer about {repo}: {why}"


def _shown(value: object) -> str:
    """A value from the hub, quoted, escaped (no control sequence reaches the terminal), short."""
    text = ascii(value)
    return text if len(text) <= 80 else text[:77] + "..."


def _checked_file(repo: str, path: object, size: object, lfs: Any) -> RemoteFile:
    """A model file of the hub's answer, once its path, size and sha256 are safe to use."""
    problem = repo_path_problem(path)
    if problem is not None:
        raise HubError(_refusal(repo, f"the path {_shown(path)}: {problem}"))
    assert isinstance(path, str)
    if type(size) is not int or not 0 <= size <= MAX_FILE_BYTES:
        raise HubError(_refusal(repo, f"the size of {_shown(path)} is {_shown(size)}"))
    if lfs is None:
        return RemoteFile(path, size, None)
    sha256, lfs_size = getattr(lfs, "sha256", None), getattr(lfs, "size", None)
    if not is_sha256(sha256):
        raise HubError(
            _refusal(repo, f"the sha256 of {_shown(path)} is {_shown(sha256)}, not 64 hex digits")
        )
    if lfs_size != size:
        raise HubError(
            _refusal(repo, f"the size of {_shown(path)} is {size} and {_shown(lfs_size)}")
        )
    return RemoteFile(path, size, sha256)


def check_quant(model: RemoteModel, quant: Quant) -> None:
    """Refuse what must not become a path: a commit, sha256 or file path the checks refuse."""
    if not is_commit(model.commit):
        raise HubError(f"refusing the commit id {_shown(model.commit)}: not 40 hex digits")
    for f in quant.files:
        problem = repo_path_problem(f.path)
        if problem is not None:
            raise HubError(f"refusing the hub path {_shown(f.path)}: {problem}")
        if f.sha256 is not None and not is_sha256(f.sha256):
            raise HubError(f"refusing the sha256 {_shown(f.sha256)}: not 64 hex digits")
        if not 0 <= f.size <= MAX_FILE_BYTES:
            raise HubError(f"refusing the size {f.size} of {_shown(f.path)}")


def _first_line(e: BaseException) -> str:
    return (str(e).strip().splitlines() or [type(e).__name__])[0]


def free_bytes(directory: Path) -> int:
    """Free space where the cache is (the nearest existing parent of `directory`)."""
    override = os.environ.get(FREE_BYTES_OVERRIDE)
    if override:
        return int(override)
    d = directory
    while not d.exists() and d != d.parent:
        d = d.parent
    return shutil.disk_usage(d).free


def pull(
    model: RemoteModel,
    quant: Quant,
    progress: Progress,
    *,
    workers: int = 4,
    cancel: threading.Event | None = None,
) -> Path:
    """Download (or finish downloading) every file of `quant`; return the path to load."""
    check_quant(model, quant)
    if not quant.complete:
        missing = ", ".join(map(str, quant.missing)) or "none, but others twice or extra"
        raise HubError(
            f"{model.repo} {quant.name} is incomplete on the hub: of its {quant.expected} "
            f"files, it lacks {missing}"
        )
    snapshot = hubcache.snapshot_dir(model.repo, model.commit)
    target = snapshot / quant.model_path
    if target.is_file() and (quant.layout != "split" or _all_present(snapshot, quant)):
        return target
    hubcache.write_manifest(model.repo, model.commit, quant)
    todo = [f for f in quant.files if not (snapshot / f.path).is_file()]
    need = sum(f.size - _partial_size(model, f) for f in todo)
    if quant.layout == "parts":
        need += quant.size  # the joined copy exists beside the parts until they are removed
    free = free_bytes(hubcache.cache_dir())
    if need > free:
        raise HubError(
            f"not enough disk space in {hubcache.cache_dir()}: {quant.name} needs "
            f"{human_size(need)} more, {human_size(free)} free (set HF_HUB_CACHE to a bigger disk)"
        )
    cancel = cancel or threading.Event()
    _download_all(model, todo, snapshot, progress, workers, cancel)
    if quant.layout == "parts":
        _join(model, snapshot, quant, progress)
    refs = hubcache.repo_dir(model.repo) / "refs" / "main"
    refs.parent.mkdir(parents=True, exist_ok=True)
    refs.write_text(model.commit, encoding="utf-8")
    return target


def _all_present(snapshot: Path, quant: Quant) -> bool:
    return all((snapshot / f.path).is_file() for f in quant.files)


def _partial_size(model: RemoteModel, f: RemoteFile) -> int:
    partial = _partial(model, f)
    return partial.stat().st_size if partial.exists() else 0


def _blob_name(model: RemoteModel, f: RemoteFile) -> str:
    # GGUFs on the hub are LFS files, named by their sha256. A file without one is named by a
    # hash of its commit and path: another commit may have other bytes under the same path.
    if f.sha256:
        return f.sha256
    return "path-" + hashlib.sha256(f"{model.commit}/{f.path}".encode()).hexdigest()


def _blob(model: RemoteModel, f: RemoteFile) -> Path:
    return hubcache.blob_path(model.repo, _blob_name(model, f))


def _partial(model: RemoteModel, f: RemoteFile) -> Path:
    return hubcache.partial_path(model.repo, _blob_name(model, f))


def _download_all(
    model: RemoteModel,
    files: list[RemoteFile],
    snapshot: Path,
    progress: Progress,
    workers: int,
    cancel: threading.Event,
) -> None:
    if not files:
        return
    with ThreadPoolExecutor(max_workers=max(1, min(workers, len(files)))) as pool:
        futures = [pool.submit(_download, model, f, snapshot, progress, cancel) for f in files]
        try:
            done, _ = wait(futures, return_when=FIRST_EXCEPTION)
        except KeyboardInterrupt:
            cancel.set()  # the workers stop at their next chunk; partial files stay
            wait(futures)
            raise
        failed = [f for f in done if f.exception() is not None]
        if failed:
            cancel.set()
            wait(futures)
            error = failed[0].exception()
            assert error is not None
            raise error


class _Cancelled(Exception):
    """The pull was cancelled (Ctrl-C, or another file failed)."""


class _RangeIgnored(Exception):
    """The server answered a Range request with the whole file."""


def _download(
    model: RemoteModel, f: RemoteFile, snapshot: Path, progress: Progress, cancel: threading.Event
) -> None:
    """One file: resume its partial file, hash it, verify, move it into place."""
    blob = _blob(model, f)
    link = snapshot / f.path
    if _already_there(blob, f, progress):  # the same bytes under another path or commit
        _link(blob, link)
        return
    partial = _partial(model, f)
    partial.parent.mkdir(parents=True, exist_ok=True)
    hasher = hashlib.sha256()
    have = partial.stat().st_size if partial.exists() else 0
    if have > f.size:
        partial.unlink()
        have = 0
    progress.start(f.path, f.size, have)
    if have:
        _hash_file(partial, hasher)
    attempt = 0
    while have < f.size:
        if cancel.is_set():
            return
        try:
            have = _transfer(model, f, partial, have, hasher, progress, cancel)
        except _Cancelled:
            return
        except _RangeIgnored:  # start over from byte 0, without counting it as a failure
            partial.unlink()
            progress.advance(f.path, -have)
            have, hasher = 0, hashlib.sha256()
            continue
        except HubError:
            raise
        except Exception as e:  # a dropped connection, a timeout, a 5xx: continue from `have`
            if attempt >= len(RETRY_DELAYS):
                raise HubError(
                    f"download of {f.path} failed ({_first_line(e)}); {human_size(have)} of "
                    f"{human_size(f.size)} kept: run the same pull again to continue"
                ) from None
            time.sleep(RETRY_DELAYS[attempt])
            attempt += 1
            have = partial.stat().st_size
            hasher = hashlib.sha256()
            _hash_file(partial, hasher)
    if f.sha256 and hasher.hexdigest() != f.sha256:
        partial.unlink()
        raise HubError(
            f"{f.path} does not match the hub's sha256 (got {hasher.hexdigest()[:12]}..., "
            f"expected {f.sha256[:12]}...): the bad file was deleted; run pull again"
        )
    os.replace(partial, blob)
    _link(blob, link)
    progress.finish(f.path)


def _already_there(blob: Path, f: RemoteFile, progress: Progress) -> bool:
    """Whether the blob holds the file's bytes: hashed again, never trusted for name and size
    (another tool may have put other bytes there)."""
    if not blob.is_file() or blob.is_symlink() or blob.stat().st_size != f.size:
        return False
    if f.sha256 is None:
        return True  # nothing to compare with: named by commit and path, as downloaded
    progress.note(f"verifying {f.path}, already in the cache")
    hasher = hashlib.sha256()
    _hash_file(blob, hasher)
    return hasher.hexdigest() == f.sha256


def _hash_file(path: Path, hasher: hashlib._Hash) -> None:
    with path.open("rb") as fh:
        while block := fh.read(8 * CHUNK):
            hasher.update(block)


def _transfer(
    model: RemoteModel,
    f: RemoteFile,
    partial: Path,
    have: int,
    hasher: hashlib._Hash,
    progress: Progress,
    cancel: threading.Event,
) -> int:
    """One HTTP GET from byte `have` on; returns the bytes on disk after it."""
    import httpx2
    from huggingface_hub import get_session, hf_hub_url, hf_raise_for_status
    from huggingface_hub.errors import GatedRepoError, HfHubHTTPError
    from huggingface_hub.utils._headers import build_hf_headers

    url = hf_hub_url(model.repo, f.path, revision=model.commit, endpoint=endpoint())
    headers = build_hf_headers()
    headers["Accept-Encoding"] = "identity"
    if have:
        headers["Range"] = f"bytes={have}-"
    timeout = httpx2.Timeout(READ_TIMEOUT, connect=CONNECT_TIMEOUT)
    with get_session().stream(
        "GET", url, headers=headers, follow_redirects=True, timeout=timeout
    ) as response:
        if response.status_code >= 400:
            response.read()
            try:
                hf_raise_for_status(response)
            except GatedRepoError:
                raise HubError(f"{model.repo} is gated: set HF_TOKEN") from None
            except HfHubHTTPError as e:
                if response.status_code < 500:
                    raise HubError(f"{f.path}: {_first_line(e)}") from None
                raise
        if have and response.status_code != 206:
            raise _RangeIgnored
        if "text/html" in response.headers.get("content-type", ""):
            raise HubError(
                f"{f.path}: the server sent a web page instead of the file "
                "(a proxy, captive portal or login page?)"
            )
        with partial.open("ab" if have else "wb") as out:
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
                    partial.unlink()
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


def _link(blob: Path, link: Path) -> None:
    """Link the snapshot path to its blob (relative, as huggingface_hub does), or move it."""
    link.parent.mkdir(parents=True, exist_ok=True)
    tmp = link.with_name(link.name + ".wizardchat-link")
    tmp.unlink(missing_ok=True)
    try:
        tmp.symlink_to(os.path.relpath(blob, link.parent))
    except OSError:  # no symlinks (Windows without developer mode): keep a copy there
        shutil.copyfile(blob, tmp)
    os.replace(tmp, link)


def _join(model: RemoteModel, snapshot: Path, quant: Quant, progress: Progress) -> None:
    """Concatenate verified byte parts into the model file, then remove the parts."""
    target = snapshot / quant.model_path
    tmp = target.with_name(target.name + hubcache.PARTIAL_SUFFIX)
    progress.note(f"joining {len(quant.files)} parts into {target.name}")
    with tmp.open("wb") as out:
        for f in quant.files:
            with (snapshot / f.path).open("rb") as part:
                shutil.copyfileobj(part, out, 16 * CHUNK)
    if tmp.stat().st_size != quant.size:
        tmp.unlink()
        raise HubError(f"joining the parts of {quant.name} gave the wrong size")
    os.replace(tmp, target)
    for f in quant.files:
        (snapshot / f.path).unlink(missing_ok=True)
        # The blob pull verified and linked: never where a link found in the snapshot leads.
        _blob(model, f).unlink(missing_ok=True)


def resolve_local(ref: ModelRef) -> Path | None:
    """The cached, complete model for `ref`, or None.

    A catalog name (`wizardlm2-8x22b[:Q]`) also finds copies pulled from its alternative
    repositories; without a quant, one local quant is taken as it is, and among several the
    default (Q4_K_M) is.
    """
    from wizardchat.hub.catalog import DEFAULT_QUANT

    repos = [ref.repo]
    if ref.family is not None and ref.repo == ref.family.repo:
        repos += ref.family.alternatives
    for repo in repos:
        found = hubcache.find_complete(repo, ref.quant)
        if found is None and ref.quant is None:
            found = hubcache.find_complete(repo, DEFAULT_QUANT)
        if found is not None:
            return found.path
    return None
