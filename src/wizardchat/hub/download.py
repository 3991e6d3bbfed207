"""List a repository's quants on the hub, and pull one into the cache.

Listing uses `HfApi.model_info(files_metadata=True)`: one request gives the commit, every path,
size and LFS sha256, each checked before it becomes a path. Pulling plans what is missing, stops
before any byte when the disk cannot hold it, fetches the files in parallel with wizardchat's
own resumable loop (hub/fetch.py: since huggingface_hub PR #4228 `hf_hub_download` writes to a
per-process temporary file and deletes it on failure, so an interrupted 40 GB shard would start
again from zero), and joins byte parts into one model file.
"""

from __future__ import annotations

import os
import shutil
import threading
from concurrent.futures import FIRST_EXCEPTION, ThreadPoolExecutor, wait
from dataclasses import dataclass
from pathlib import Path
from typing import Any

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
from wizardchat.hub.fetch import CHUNK, Progress, blob, endpoint, fetch, first_line, partial

MAX_FILE_BYTES = 1 << 40  # 1.1 TB: the hub takes files up to 50 GB; more is a lie or a bug


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
    from huggingface_hub.utils import httpx

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
        raise HubError(f"the hub refused to list {ref.repo}: {first_line(e)}") from None
    except HFValidationError as e:  # parse_ref checks the same rules: this is a last line
        raise UsageError(f"{ref.repo} is not a repository id: {first_line(e)}") from None
    except (KeyError, TypeError, ValueError, AttributeError) as e:  # JSON, but not the hub's
        raise HubError(
            f"the answer of {endpoint()} about {ref.repo} is not the hub's "
            f"({type(e).__name__}: {first_line(e)}); a proxy or captive portal?"
        ) from None
    except (httpx.HTTPError, httpx.InvalidURL, ConnectionError, TimeoutError) as e:
        # The network (refused, reset, timed out, a proxy), or an HF_ENDPOINT that is no URL.
        raise HubError(
            f"cannot reach {endpoint()}: {first_line(e)}", hints=network_hints()
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


def free_bytes(directory: Path) -> int:
    """Free space where the cache is (the nearest existing parent of `directory`)."""
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
    path = partial(model.repo, model.commit, f)
    return path.stat().st_size if path.exists() else 0


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
        futures = [
            pool.submit(fetch, model.repo, model.commit, f, snapshot, progress, cancel)
            for f in files
        ]
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
        blob(model.repo, model.commit, f).unlink(missing_ok=True)


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
