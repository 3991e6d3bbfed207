"""The WizardLM-2 family on the Hugging Face hub (data), model references, and GGUF file layouts.

Quantizers publish a quant in one of four layouts, all seen for WizardLM-2 8x22B:
- gguf-split files side by side: `WizardLM-2-8x22B.Q4_K_M-00001-of-00005.gguf` (MaziyarPanahi);
- gguf-split inside a per-quant folder whose name ends in .gguf:
  `WizardLM-2-8x22B-Q4_K_M.gguf/WizardLM-2-8x22B-Q4_K_M-00001-of-00005.gguf` (bartowski);
- raw byte parts to be joined: `WizardLM-2-8x22B.Q4_K_S.gguf.part1of2` (mradermacher);
- one file: `WizardLM-2-7B.Q5_K_M.gguf`, and the 8x22B IQ1 quants.
llama.cpp loads gguf-split shards from the first one; byte parts must be concatenated first.
Everything here is pure: no network, no disk.
"""

from __future__ import annotations

import os
import re
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path

from wizardchat.errors import NoModelError, UsageError

DEFAULT_QUANT = "Q4_K_M"


@dataclass(frozen=True)
class Family:
    """A model of the catalog: where it is published (its shape: plan/shapes.py CATALOG_DIMS)."""

    name: str
    repo: str
    alternatives: tuple[str, ...]


FAMILIES = {
    f.name: f
    for f in (
        Family(
            name="wizardlm2-8x22b",
            repo="MaziyarPanahi/WizardLM-2-8x22B-GGUF",
            alternatives=(
                "bartowski/WizardLM-2-8x22B-GGUF",
                "mradermacher/WizardLM-2-8x22B-GGUF",
                "mradermacher/WizardLM-2-8x22B-i1-GGUF",
            ),
        ),
        Family(
            name="wizardlm2-7b",
            repo="MaziyarPanahi/WizardLM-2-7B-GGUF",
            alternatives=("bartowski/WizardLM-2-7B-GGUF", "mradermacher/WizardLM-2-7B-GGUF"),
        ),
    )
}
DEFAULT_FAMILY = "wizardlm2-8x22b"

# huggingface_hub's repo-id rules (utils/_validators.py), in ASCII: each part starts and ends
# with a letter, digit or `_`, has only those and `-` and `.`, no `--` or `..` (the cache folder
# models--OWNER--NAME must map back to one repo), the name at most 96 characters, no `.git` end.
_REPO_PART_RE = re.compile(r"[A-Za-z0-9_](?:[A-Za-z0-9_.-]*[A-Za-z0-9_])?")
REPO_NAME_MAX = 96
_COMMIT_RE = re.compile(r"[0-9a-f]{40}")
_SHA256_RE = re.compile(r"[0-9a-f]{64}")
_QUANT_RE = re.compile(
    r"(?<![A-Za-z0-9])(I?Q\d(?:_[A-Z0-9]+)*|F16|FP16|F32|BF16|MXFP4(?:_MOE)?)(?![A-Za-z0-9])",
    re.IGNORECASE,
)
_SPLIT_RE = re.compile(r"-(\d{5})-of-(\d{5})\.gguf$")
_PART_RE = re.compile(r"\.gguf\.part(\d+)of(\d+)$")


def is_wizardlm2(repo: str) -> bool:
    """Whether a repository holds a WizardLM-2 model (a catalog repository or one so named)."""
    known = {r for f in FAMILIES.values() for r in (f.repo, *f.alternatives)}
    return repo in known or "wizardlm-2" in repo.lower()


def repo_id_problem(repo: str) -> str | None:
    """Why `repo` is not a valid OWNER/NAME repository id, or None when it is."""
    owner, slash, name = repo.partition("/")
    if not slash or not owner or not name:
        return "a repository is OWNER/NAME"
    if "/" in name:
        return "a repository is OWNER/NAME, with one '/'"
    for part in (owner, name):
        if not _REPO_PART_RE.fullmatch(part):
            return (
                f"{part!r} may only have ASCII letters, digits, '-', '_' and '.', "
                "and must start and end with a letter, digit or '_'"
            )
    if "--" in repo or ".." in repo:
        return "'--' and '..' are not allowed in it"
    if max(len(owner), len(name)) > REPO_NAME_MAX:
        return f"OWNER and NAME may have at most {REPO_NAME_MAX} characters each"
    if repo.endswith(".git"):
        return "it may not end in '.git'"
    return None


def is_commit(value: object) -> bool:
    """Whether `value` is a commit id as the hub gives it: 40 lower-case hex digits."""
    return isinstance(value, str) and _COMMIT_RE.fullmatch(value) is not None


def is_sha256(value: object) -> bool:
    """Whether `value` is a sha256 as the hub gives it: 64 lower-case hex digits."""
    return isinstance(value, str) and _SHA256_RE.fullmatch(value) is not None


def repo_path_problem(path: object) -> str | None:
    """Why `path` cannot be a file's path inside a repository (and the cache), or None."""
    if not isinstance(path, str) or not path:
        return "it is empty or not text"
    if any(ord(c) < 0x20 or 0x7F <= ord(c) < 0xA0 for c in path):
        return "it has control characters"
    if "\\" in path or path.startswith("/"):
        return "it leaves the repository"
    if any(part in ("", ".", "..") for part in path.split("/")):
        return "it leaves the repository or has empty, '.' or '..' parts"
    return None


def human_size(n: int) -> str:
    """Bytes for people: 85.6 GB, 512.0 MB, 12.3 KB, 100 B (decimal units, as the hub shows)."""
    for unit, scale in (("GB", 1e9), ("MB", 1e6), ("KB", 1e3)):
        if abs(n) >= scale:
            return f"{n / scale:.1f} {unit}"
    return f"{n} B"


@dataclass(frozen=True)
class ModelRef:
    """A model on the hub: a repository and maybe a quant (None: the default or best fit)."""

    repo: str
    quant: str | None = None
    family: Family | None = None

    def __str__(self) -> str:
        name = self.family.name if self.family and self.repo == self.family.repo else self.repo
        return f"{name}:{self.quant}" if self.quant else name


def parse_ref(text: str, *, reference_only: bool = False) -> ModelRef | Path:
    """`wizardlm2-8x22b[:QUANT]`, `OWNER/REPO[:QUANT]`, or a local path (returned as a Path).

    A text shaped like a reference (a `:QUANT`, or one `/`) that breaks the hub's repository-id
    rules is a usage error, found here before any request. Any other text that is neither is a
    missing file (NoModelError) where paths are allowed, and a usage error under
    `reference_only` (pull, rm), whose argument can only be a reference.
    """
    text = text.strip()
    path = Path(text).expanduser()
    if path.exists() or text.endswith(".gguf") or text.startswith((".", "/", "~")):
        return path
    name, colon, quant = text.partition(":")
    quant_name = quant.strip().upper() or None
    if quant_name is not None and not _QUANT_RE.fullmatch(quant_name):
        raise UsageError(f"{text!r}: {quant!r} is not a quant name such as Q4_K_M or IQ2_XS")
    family = FAMILIES.get(name.lower())
    if family is not None:
        return ModelRef(family.repo, quant_name, family)
    problem = repo_id_problem(name)
    if problem is None:
        known = next((f for f in FAMILIES.values() if name in (f.repo, *f.alternatives)), None)
        return ModelRef(name, quant_name, known)
    examples = f"{' or '.join(FAMILIES)} (with :QUANT), or OWNER/REPO:QUANT"
    if reference_only or colon or name.count("/") == 1:
        raise UsageError(f"{text!r} is not a model reference: {problem} (use {examples})")
    raise NoModelError(
        f"{text!r} is neither a file nor a model reference: use a path to a .gguf file, {examples}"
    )


def quant_of(filename: str) -> str | None:
    """The quant a GGUF file name carries (Q4_K_M, IQ2_XS, ...), or None."""
    stem = _PART_RE.sub("", _SPLIT_RE.sub("", Path(filename).name))
    stem = stem.removesuffix(".gguf")
    found = _QUANT_RE.findall(stem)
    return found[-1].upper().replace("FP16", "F16") if found else None


@dataclass(frozen=True)
class RemoteFile:
    """One file of a repository: path in the repo, size, LFS sha256 (None for non-LFS files)."""

    path: str
    size: int
    sha256: str | None = None


@dataclass
class Quant:
    """The files of one quant, in order, and how they make a loadable model."""

    name: str
    layout: str  # "single", "split" (gguf-split shards) or "parts" (bytes to join)
    files: list[RemoteFile] = field(default_factory=list)
    expected: int = 1  # how many files the names say there are

    @property
    def size(self) -> int:
        """Bytes of all its files."""
        return sum(f.size for f in self.files)

    @property
    def complete(self) -> bool:
        """Whether every shard or part the names announce is there, each once."""
        if self.layout == "single":
            return len(self.files) == 1
        numbers = [_numbering(f.path) for f in self.files]
        return numbers == [(i, self.expected) for i in range(1, self.expected + 1)]

    @property
    def missing(self) -> list[int]:
        """The shard or part numbers the names announce that are not listed."""
        if self.layout == "single":
            return [] if self.files else [1]
        present = {n for n, _ in filter(None, (_numbering(f.path) for f in self.files))}
        return [i for i in range(1, self.expected + 1) if i not in present]

    @property
    def model_path(self) -> str:
        """The path (in the repo or snapshot) llama.cpp loads: first shard or the joined file."""
        if self.layout == "parts":
            return _PART_RE.sub(".gguf", self.files[0].path)
        return self.files[0].path


def _numbering(path: str) -> tuple[int, int] | None:
    """(n, of) from a shard's or part's name, None for a single file."""
    found = _PART_RE.search(path) or _SPLIT_RE.search(path)
    return (int(found.group(1)), int(found.group(2))) if found else None


def is_model_file(path: str) -> bool:
    """Whether a repository path is a GGUF model file, a shard or a byte part (not mmproj)."""
    name = Path(path).name.lower()
    if "mmproj" in name or name.startswith("."):
        return False
    return name.endswith(".gguf") or bool(_PART_RE.search(name))


def group_quants(files: Iterable[RemoteFile]) -> dict[str, Quant]:
    """The repository's quants by name (the first layout found wins when one appears twice)."""
    quants: dict[str, Quant] = {}
    for f in sorted(files, key=lambda f: f.path):
        if not is_model_file(f.path):
            continue
        name = quant_of(f.path)
        if name is None:
            continue
        part, split = _PART_RE.search(f.path), _SPLIT_RE.search(f.path)
        layout = "parts" if part else "split" if split else "single"
        number = part or split
        expected = int(number.group(2)) if number else 1
        quant = quants.setdefault(name, Quant(name, layout, expected=expected))
        if quant.layout != layout or (layout == "single" and quant.files):
            continue  # a second copy of the quant in another layout or name: keep the first
        quant.files.append(f)
    for quant in quants.values():
        if quant.layout != "single":  # part10of12 sorts before part2of12 as text
            quant.files.sort(key=lambda f: _numbering(f.path) or (0, 0))
    return quants


def choose_quant(quants: dict[str, Quant], ref: ModelRef, budget: int | None) -> Quant:
    """The quant `ref` names, else the biggest complete one within `budget` bytes, else Q4_K_M."""
    if ref.quant:
        if ref.quant in quants:
            return quants[ref.quant]
        known = ", ".join(sort_quants(quants)) or "none"
        raise NoModelError(f"{ref.repo} has no quant {ref.quant}; it has: {known}")
    complete = [q for q in quants.values() if q.complete]
    if not complete:
        raise NoModelError(f"{ref.repo} has no complete GGUF quant")
    if budget is not None:
        fitting = [q for q in complete if q.size <= budget]
        if fitting:
            return max(fitting, key=lambda q: q.size)
    if DEFAULT_QUANT in quants and quants[DEFAULT_QUANT].complete:
        return quants[DEFAULT_QUANT]
    return min(complete, key=lambda q: q.size)


def sort_quants(quants: dict[str, Quant]) -> list[str]:
    """Quant names from the largest to the smallest."""
    return sorted(quants, key=lambda name: -quants[name].size)


def model_reference(given: str, path: Path) -> str:
    """What a session keeps to load its model again: a hub reference as it was given (it finds
    the file wherever the hub cache is), or the absolute path of the file (a relative one would
    depend on the working directory of the next run)."""
    text = given.strip()
    if isinstance(parse_ref(text), Path):
        return os.path.abspath(path.expanduser())
    return text
