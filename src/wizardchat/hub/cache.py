"""Models already on this machine, in the Hugging Face hub cache (filesystem only, no network).

The layout is huggingface_hub's own, so `hf` and other tools share the files:
`{HF_HUB_CACHE}/models--OWNER--NAME/blobs/{sha256}` holds the bytes and
`snapshots/{commit}/{path}` links to them. wizardchat adds three things of its own:
- `blobs/{sha256}.wizardchat-partial`: a download in progress. Its name is stable across runs
  (huggingface_hub's temporary files are per process and deleted on failure), so an interrupted
  `pull` continues from the bytes already there;
- `snapshots/{commit}/{name}.gguf`, a regular file: byte parts joined into one model;
- `wizardchat-pull.json`: what each pulled quant consists of (path, size, sha256), so `models`
  can tell a complete model from an interrupted one and `rm` knows every file to delete.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import stat
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from wizardchat.hub.catalog import (
    FAMILIES,
    Quant,
    RemoteFile,
    group_quants,
    is_commit,
    is_sha256,
    repo_id_problem,
    repo_path_problem,
)

PARTIAL_SUFFIX = ".wizardchat-partial"
MANIFEST = "wizardchat-pull.json"
LAYOUTS = ("single", "split", "parts")
# A blob is named by its sha256, or (a file without one) by a hash of its commit and path.
_BLOB_NAME_RE = re.compile(r"(?:path-)?[0-9a-f]{64}")


def _truthy(value: str | None) -> bool:
    return (value or "").strip().lower() in ("1", "true", "yes", "on")


def offline() -> bool:
    """HF_HUB_OFFLINE=1: use the cache only."""
    return _truthy(os.environ.get("HF_HUB_OFFLINE"))


def cache_dir() -> Path:
    """The hub cache, resolved as huggingface_hub does (HF_HUB_CACHE, else HF_HOME/hub)."""
    explicit = os.environ.get("HF_HUB_CACHE") or os.environ.get("HUGGINGFACE_HUB_CACHE")
    if explicit:
        return Path(explicit).expanduser()
    home = os.environ.get("HF_HOME")
    if home:
        return Path(home).expanduser() / "hub"
    xdg = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return Path(xdg).expanduser() / "huggingface" / "hub"


def repo_dir(repo: str) -> Path:
    """Where one model repository lives in the cache."""
    # Every value that becomes a path part is checked where it does: a repo id, a commit, a
    # blob name. Callers check them first and say why; these are the last line.
    if repo_id_problem(repo) is not None:
        raise ValueError(f"not a repository id: {repo!r}")
    return cache_dir() / ("models--" + repo.replace("/", "--"))


def blob_path(repo: str, name: str) -> Path:
    """A file's bytes, named by their sha256 (see _BLOB_NAME_RE)."""
    if not _BLOB_NAME_RE.fullmatch(name):
        raise ValueError(f"not a blob name: {name!r}")
    return repo_dir(repo) / "blobs" / name


def partial_path(repo: str, name: str) -> Path:
    """Where the blob `name` downloads until it is verified."""
    return blob_path(repo, name).with_name(name + PARTIAL_SUFFIX)


def snapshot_dir(repo: str, commit: str) -> Path:
    """The files of one commit, by their paths in the repo."""
    if not is_commit(commit):
        raise ValueError(f"not a commit id: {commit!r}")
    return repo_dir(repo) / "snapshots" / commit


def read_manifest(repo: str) -> dict[str, Any]:
    """What `pull` recorded for this repo ({} when nothing or unreadable)."""
    try:
        data = json.loads((repo_dir(repo) / MANIFEST).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return {}
    return data if isinstance(data, dict) else {}


def recorded_quants(repo: str) -> dict[str, dict[str, Any]]:
    """The manifest's quants whose every value is safe to make a path of; others are ignored.

    The file is in the cache, where anything may have been edited: a commit, sha256 or path
    that leaves the repository's folder is no reason to write or delete there.
    """
    quants = read_manifest(repo).get("quants")
    if not isinstance(quants, dict):
        return {}
    return {
        name: entry
        for name, entry in quants.items()
        if isinstance(name, str) and isinstance(entry, dict) and _sane_entry(entry)
    }


def _sane_entry(entry: dict[str, Any]) -> bool:
    files = entry.get("files")
    return (
        is_commit(entry.get("commit"))
        and entry.get("layout") in LAYOUTS
        and repo_path_problem(entry.get("model_path")) is None
        and isinstance(files, list)
        and all(isinstance(f, dict) and _sane_file(f) for f in files)
    )


def _sane_file(f: dict[str, Any]) -> bool:
    size, sha = f.get("size"), f.get("sha256")
    return (
        repo_path_problem(f.get("path")) is None
        and type(size) is int
        and size >= 0
        and (sha is None or is_sha256(sha))
    )


def write_manifest(repo: str, commit: str, quant: Quant) -> None:
    """Record a quant about to be pulled (atomically: temp file then rename)."""
    data: dict[str, Any] = {"quants": recorded_quants(repo)}
    data["quants"][quant.name] = {
        "commit": commit,
        "layout": quant.layout,
        "model_path": quant.model_path,
        "files": [{"path": f.path, "size": f.size, "sha256": f.sha256} for f in quant.files],
    }
    path = repo_dir(repo) / MANIFEST
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(data, indent=1) + "\n", encoding="utf-8")
    os.replace(tmp, path)


def _remove_from_manifest(repo: str, quant: str) -> None:
    data = read_manifest(repo)
    quants = data.get("quants")
    if isinstance(quants, dict) and quant in quants:
        del quants[quant]
        path = repo_dir(repo) / MANIFEST
        if quants:
            path.write_text(json.dumps(data, indent=1) + "\n", encoding="utf-8")
        else:
            path.unlink(missing_ok=True)


@dataclass(frozen=True)
class LocalModel:
    """A quant in the cache: complete (loadable) or an interrupted download."""

    repo: str
    quant: str
    commit: str
    path: Path  # the file llama.cpp loads (the first shard, or the joined file)
    size_on_disk: int
    total_size: int  # what the complete model has (as far as known)
    complete: bool

    @property
    def reference(self) -> str:
        """How to name it on the command line."""
        family = next((f.name for f in FAMILIES.values() if f.repo == self.repo), None)
        return f"{family or self.repo}:{self.quant}"


def _size(path: Path) -> int:
    try:
        return path.stat().st_size  # follows the snapshot symlink to the blob
    except OSError:
        return 0


def _snapshot_files(snapshot: Path) -> list[RemoteFile]:
    out = []
    for path in snapshot.rglob("*"):
        if path.is_file():  # a symlink to an existing blob, or a joined file
            out.append(RemoteFile(path.relative_to(snapshot).as_posix(), _size(path)))
    return out


def _repos() -> list[str]:
    root = cache_dir()
    if not root.is_dir():
        return []
    repos = []
    for d in sorted(root.glob("models--*--*")):
        owner, _, name = d.name.removeprefix("models--").partition("--")
        if repo_id_problem(f"{owner}/{name}") is None and d.is_dir() and not d.is_symlink():
            repos.append(f"{owner}/{name}")
    return repos


def _snapshots(repo: str) -> list[Path]:
    """The repo's snapshot folders: real folders named by a commit (a link may lead anywhere)."""
    snapshots = repo_dir(repo) / "snapshots"
    if not snapshots.is_dir() or snapshots.is_symlink():
        return []
    return [
        d
        for d in sorted(snapshots.iterdir())
        if is_commit(d.name) and d.is_dir() and not d.is_symlink()
    ]


def local_models(repo: str | None = None) -> list[LocalModel]:
    """Every quant found in the cache (of one repo, or of all), complete or not."""
    found: list[LocalModel] = []
    for r in [repo] if repo else _repos():
        manifest = recorded_quants(r)
        pending = _pending(r, manifest)
        seen: set[str] = set()
        for snapshot in _snapshots(r):
            for q in group_quants(_snapshot_files(snapshot)).values():
                recorded = manifest.get(q.name, {})
                total = sum(f["size"] for f in recorded.get("files", [])) or q.size
                path = snapshot / q.files[0].path
                complete = q.complete and q.layout != "parts" and q.name not in pending
                found.append(LocalModel(r, q.name, snapshot.name, path, q.size, total, complete))
                seen.add(q.name)
        for name, recorded in manifest.items():  # pulls that never finished a file
            if name not in seen:
                total = sum(f["size"] for f in recorded["files"])
                partial = sum(_partial_size(r, f) for f in recorded["files"])
                path = snapshot_dir(r, recorded["commit"]) / recorded["model_path"]
                found.append(LocalModel(r, name, recorded["commit"], path, partial, total, False))
    return found


def _partial_size(repo: str, f: dict[str, Any]) -> int:
    sha = f.get("sha256")
    return _size(partial_path(repo, sha)) if sha else 0


def _pending(repo: str, manifest: dict[str, dict[str, Any]]) -> set[str]:
    """Quants of the manifest with a file not yet downloaded in full."""
    pending = set()
    for name, recorded in manifest.items():
        snapshot = snapshot_dir(repo, recorded["commit"])
        if recorded.get("layout") == "parts":
            if not (snapshot / recorded["model_path"]).is_file():
                pending.add(name)
            continue
        if any(not (snapshot / f["path"]).is_file() for f in recorded["files"]):
            pending.add(name)
    return pending


def find_complete(repo: str, quant: str | None) -> LocalModel | None:
    """A complete local copy of `repo` (and `quant`, if given), newest snapshot first."""
    candidates = [m for m in local_models(repo) if m.complete and (quant in (None, m.quant))]
    if len(candidates) == 1 or (quant and candidates):
        return candidates[0]
    return None  # none, or several quants and no way to choose


@dataclass(frozen=True)
class Removed:
    """What `remove` did: bytes freed, and files outside the repo's folder it left alone."""

    freed: int
    kept: tuple[Path, ...]


def remove(model: LocalModel) -> Removed:
    """Delete a quant's files (links, blobs no other file uses, partial and joined files).

    Only entries inside the repository's own cache folder are deleted, and a link is deleted
    as a link: whatever a link points to outside the folder stays (and is reported in `kept`).
    """
    root = repo_dir(model.repo)
    inside = root.resolve()
    blobs_dir = inside / "blobs"
    recorded = recorded_quants(model.repo).get(model.quant, {})
    entries = {p for p in _quant_entries(model, recorded) if _lives_in(p, inside)}
    blobs = {
        _entry(blob_path(model.repo, f["sha256"])) for f in recorded.get("files", []) if f["sha256"]
    }
    blobs |= {_link_entry(p) for p in entries if p.is_symlink()}
    blobs = {b for b in blobs if b.parent == blobs_dir}
    blobs |= {b.with_name(b.name + PARTIAL_SUFFIX) for b in list(blobs)}
    # A blob another snapshot file still links to stays.
    in_use = {_link_entry(p) for p in _snapshot_links(root)} - {
        _link_entry(p) for p in entries if p.is_symlink()
    }
    doomed = [*entries, *(blobs - in_use)]
    kept = tuple(
        sorted({p.resolve() for p in doomed if p.is_symlink() and not _inside(p.resolve(), inside)})
    )
    freed = sum(_unlink(p) for p in doomed)
    _remove_from_manifest(model.repo, model.quant)
    _prune_empty(root)
    return Removed(freed, kept)


def _quant_entries(model: LocalModel, recorded: dict[str, Any]) -> set[Path]:
    """The snapshot entries (links or files) of a quant: found there, and recorded by pull."""
    snapshot = snapshot_dir(model.repo, model.commit)
    real = snapshot in _snapshots(model.repo)
    quants = group_quants(_snapshot_files(snapshot)) if real else {}
    local = quants[model.quant].files if model.quant in quants else []
    paths = {snapshot / f.path for f in local}
    paths |= {snapshot / f["path"] for f in recorded.get("files", [])}
    if recorded.get("model_path"):
        paths.add(snapshot / recorded["model_path"])
    return paths


def _snapshot_links(root: Path) -> list[Path]:
    snapshots = root / "snapshots"
    if not snapshots.is_dir() or snapshots.is_symlink():
        return []
    return [p for p in snapshots.rglob("*") if p.is_symlink()]  # rglob does not enter links


def _inside(path: Path, folder: Path) -> bool:
    return path == folder or path.is_relative_to(folder)


def _lives_in(entry: Path, folder: Path) -> bool:
    """Whether the directory entry `entry` (not what it may link to) is inside `folder`."""
    return _inside(entry.parent.resolve(), folder)


def _entry(path: Path) -> Path:
    """`path` with its folder resolved and its last part as it is (a link stays a link)."""
    return path.parent.resolve() / path.name


def _link_entry(link: Path) -> Path:
    """The directory entry a link names (one step, not followed further), folder resolved."""
    target = Path(os.path.normpath(link.parent.resolve() / os.readlink(link)))
    return _entry(target)


def _unlink(path: Path) -> int:
    """Delete a file or link (never a folder, never through a link); its bytes freed."""
    try:
        st = os.lstat(path)
        if stat.S_ISDIR(st.st_mode):
            return 0
        path.unlink()
    except FileNotFoundError:
        return 0
    return st.st_size if stat.S_ISREG(st.st_mode) else 0


def _prune_empty(root: Path) -> None:
    """Remove directories left empty, up to and including the repo's own."""
    if not root.is_dir():
        return
    folders = (p for p in root.rglob("*") if p.is_dir() and not p.is_symlink())
    for d in sorted(folders, key=lambda p: -len(p.parts)):
        if not any(d.iterdir()):
            d.rmdir()
    remaining = [p for p in root.rglob("*") if p.is_file() and p.parent.name != "refs"]
    if not remaining:
        shutil.rmtree(root, ignore_errors=True)
