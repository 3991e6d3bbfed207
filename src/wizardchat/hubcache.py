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
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from wizardchat.catalog import FAMILIES, Quant, RemoteFile, group_quants

PARTIAL_SUFFIX = ".wizardchat-partial"
MANIFEST = "wizardchat-pull.json"


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
    return cache_dir() / ("models--" + repo.replace("/", "--"))


def blob_path(repo: str, sha256: str) -> Path:
    """A file's bytes, named by their sha256."""
    return repo_dir(repo) / "blobs" / sha256


def snapshot_dir(repo: str, commit: str) -> Path:
    """The files of one commit, by their paths in the repo."""
    return repo_dir(repo) / "snapshots" / commit


def read_manifest(repo: str) -> dict[str, Any]:
    """What `pull` recorded for this repo ({} when nothing or unreadable)."""
    try:
        data = json.loads((repo_dir(repo) / MANIFEST).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return {}
    return data if isinstance(data, dict) else {}


def write_manifest(repo: str, commit: str, quant: Quant) -> None:
    """Record a quant about to be pulled (atomically: temp file then rename)."""
    data = read_manifest(repo)
    data.setdefault("quants", {})[quant.name] = {
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
    if quant in data.get("quants", {}):
        del data["quants"][quant]
        path = repo_dir(repo) / MANIFEST
        if data["quants"]:
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
        repos.append(f"{owner}/{name}")
    return repos


def local_models(repo: str | None = None) -> list[LocalModel]:
    """Every quant found in the cache (of one repo, or of all), complete or not."""
    found: list[LocalModel] = []
    for r in [repo] if repo else _repos():
        manifest = read_manifest(r).get("quants", {})
        pending = _pending(r, manifest)
        seen: set[str] = set()
        snapshots = repo_dir(r) / "snapshots"
        for snapshot in sorted(snapshots.iterdir()) if snapshots.is_dir() else []:
            for q in group_quants(_snapshot_files(snapshot)).values():
                recorded = manifest.get(q.name, {})
                total = sum(int(f["size"]) for f in recorded.get("files", [])) or q.size
                path = snapshot / q.files[0].path
                complete = q.complete and q.layout != "parts" and q.name not in pending
                found.append(LocalModel(r, q.name, snapshot.name, path, q.size, total, complete))
                seen.add(q.name)
        for name, recorded in manifest.items():  # pulls that never finished a file
            if name not in seen:
                total = sum(int(f["size"]) for f in recorded.get("files", []))
                partial = sum(_partial_size(r, f) for f in recorded.get("files", []))
                path = snapshot_dir(r, recorded["commit"]) / recorded["model_path"]
                found.append(LocalModel(r, name, recorded["commit"], path, partial, total, False))
    return found


def _partial_size(repo: str, f: dict[str, Any]) -> int:
    sha = f.get("sha256")
    return _size(blob_path(repo, sha + PARTIAL_SUFFIX)) if sha else 0


def _pending(repo: str, manifest: dict[str, Any]) -> set[str]:
    """Quants of the manifest with a file not yet downloaded in full."""
    pending = set()
    for name, recorded in manifest.items():
        snapshot = snapshot_dir(repo, recorded["commit"])
        if recorded.get("layout") == "parts":
            if not (snapshot / recorded["model_path"]).is_file():
                pending.add(name)
            continue
        if any(not (snapshot / f["path"]).is_file() for f in recorded.get("files", [])):
            pending.add(name)
    return pending


def find_complete(repo: str, quant: str | None) -> LocalModel | None:
    """A complete local copy of `repo` (and `quant`, if given), newest snapshot first."""
    candidates = [m for m in local_models(repo) if m.complete and (quant in (None, m.quant))]
    if len(candidates) == 1 or (quant and candidates):
        return candidates[0]
    return None  # none, or several quants and no way to choose


def remove(model: LocalModel) -> int:
    """Delete a quant's files (links, blobs no other file uses, partial and joined files).

    Returns the bytes freed.
    """
    root = repo_dir(model.repo)
    snapshot = snapshot_dir(model.repo, model.commit)
    recorded = read_manifest(model.repo).get("quants", {}).get(model.quant, {})
    quants = group_quants(_snapshot_files(snapshot)) if snapshot.is_dir() else {}
    local = quants[model.quant].files if model.quant in quants else []
    paths = {snapshot / f.path for f in local}
    paths |= {snapshot / f["path"] for f in recorded.get("files", [])}
    if recorded.get("model_path"):
        paths.add(snapshot / recorded["model_path"])
    blobs = {blob_path(model.repo, f["sha256"]) for f in recorded.get("files", []) if f["sha256"]}
    for path in paths:
        if path.is_symlink():
            blobs.add(path.resolve())
    blobs |= {b.with_name(b.name + PARTIAL_SUFFIX) for b in list(blobs)}
    # A blob another snapshot file still links to stays.
    in_use = {p.resolve() for p in (root / "snapshots").rglob("*") if p.is_symlink()} - {
        p.resolve() for p in paths if p.is_symlink()
    }
    freed = 0
    for path in paths:
        if path.is_symlink():
            path.unlink()
        elif path.is_file():
            freed += _size(path)
            path.unlink()
    for blob in blobs - in_use:
        if blob.is_file():
            freed += _size(blob)
            blob.unlink()
    _remove_from_manifest(model.repo, model.quant)
    _prune_empty(root)
    return freed


def _prune_empty(root: Path) -> None:
    """Remove directories left empty, up to and including the repo's own."""
    if not root.is_dir():
        return
    for d in sorted((p for p in root.rglob("*") if p.is_dir()), key=lambda p: -len(p.parts)):
        if not any(d.iterdir()):
            d.rmdir()
    remaining = [p for p in root.rglob("*") if p.is_file() and p.parent.name != "refs"]
    if not remaining:
        shutil.rmtree(root, ignore_errors=True)
