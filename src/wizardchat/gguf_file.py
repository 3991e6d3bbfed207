"""Read a GGUF header in pure Python and check the file (and its shards) before llama.cpp sees it.

llama.cpp answers a bad file with "failed to load model"; reading the header ourselves lets
every bad input end with one line that says what is wrong and what to do.
"""

from __future__ import annotations

import re
import struct
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO, Any

from wizardchat.errors import BadModelError, NoModelError

GGUF_MAGIC = b"GGUF"
LFS_POINTER_PREFIX = b"version https://git-lfs"
# Architectures whose tensors and prompt format wizardchat knows (Mixtral/WizardLM-2 is "llama").
SUPPORTED_ARCHITECTURES = ("llama",)
SHARD_RE = re.compile(r"^(?P<stem>.*)-(?P<no>\d{5})-of-(?P<count>\d{5})\.gguf$")

# ggml_type -> (block size in elements, bytes per block); from gguf-py GGML_QUANT_SIZES.
_TYPE_SIZES: dict[int, tuple[int, int]] = {
    0: (1, 4), 1: (1, 2), 2: (32, 18), 3: (32, 20), 6: (32, 22), 7: (32, 24), 8: (32, 34),
    9: (32, 40), 10: (256, 84), 11: (256, 110), 12: (256, 144), 13: (256, 176), 14: (256, 210),
    15: (256, 292), 16: (256, 66), 17: (256, 74), 18: (256, 98), 19: (256, 50), 20: (32, 18),
    21: (256, 110), 22: (256, 82), 23: (256, 136), 24: (1, 1), 25: (1, 2), 26: (1, 4),
    27: (1, 8), 28: (1, 8), 29: (256, 56), 30: (1, 2), 34: (256, 54), 35: (256, 66),
    39: (32, 17),
}  # fmt: skip
_SCALARS = {0: "<B", 1: "<b", 2: "<H", 3: "<h", 4: "<I", 5: "<i", 6: "<f", 7: "<?", 10: "<Q",
            11: "<q", 12: "<d"}  # fmt: skip
_STRING, _ARRAY = 8, 9
# Arrays longer than this (the vocabulary) are skipped, not kept: only their length is stored.
_KEEP_ARRAY_MAX = 64


@dataclass
class TensorInfo:
    """Name, shape, ggml type and byte size of one tensor."""

    name: str
    shape: tuple[int, ...]
    ggml_type: int
    offset: int
    nbytes: int | None  # None for a type this reader does not know


@dataclass
class GGUFInfo:
    """What the header of one GGUF file says."""

    path: Path
    version: int
    metadata: dict[str, Any]
    tensors: list[TensorInfo] = field(default_factory=list)
    data_offset: int = 0
    file_size: int = 0

    @property
    def architecture(self) -> str:
        """general.architecture, or '' when missing."""
        return str(self.metadata.get("general.architecture", ""))

    def arch_value(self, key: str, default: Any = None) -> Any:
        """An architecture-scoped value such as `llama.block_count`."""
        return self.metadata.get(f"{self.architecture}.{key}", default)

    @property
    def expected_size(self) -> int | None:
        """Bytes the file must have to hold all its tensors, if every tensor type is known."""
        if any(t.nbytes is None for t in self.tensors):
            return None
        end = max((t.offset + (t.nbytes or 0) for t in self.tensors), default=0)
        return self.data_offset + end


class _Reader:
    def __init__(self, f: IO[bytes], path: Path) -> None:
        self.f = f
        self.path = path

    def read(self, n: int) -> bytes:
        data = self.f.read(n)
        if len(data) != n:
            raise BadModelError(
                f"{self.path} is truncated (the header ends early): download it again"
            )
        return data

    def scalar(self, fmt: str) -> Any:
        return struct.unpack(fmt, self.read(struct.calcsize(fmt)))[0]

    def string(self) -> str:
        n = self.scalar("<Q")
        if n > 1 << 24:
            raise BadModelError(f"{self.path} has a corrupt header (a {n}-byte string)")
        return self.read(n).decode("utf-8", errors="replace")

    def value(self, vtype: int) -> Any:
        if vtype in _SCALARS:
            return self.scalar(_SCALARS[vtype])
        if vtype == _STRING:
            return self.string()
        if vtype == _ARRAY:
            item_type = self.scalar("<I")
            count = self.scalar("<Q")
            if count <= _KEEP_ARRAY_MAX:
                return [self.value(item_type) for _ in range(count)]
            if item_type in _SCALARS:  # skip fixed-size items in one seek
                self.f.seek(count * struct.calcsize(_SCALARS[item_type]), 1)
            else:
                for _ in range(count):
                    self.value(item_type)
            return _SkippedArray(count)
        raise BadModelError(f"{self.path} has a corrupt header (value type {vtype})")


@dataclass(frozen=True)
class _SkippedArray:
    """A long metadata array (e.g. the vocabulary) of which only the length is kept."""

    length: int

    def __len__(self) -> int:
        return self.length


def _nbytes(shape: tuple[int, ...], ggml_type: int) -> int | None:
    if ggml_type not in _TYPE_SIZES:
        return None
    block, size = _TYPE_SIZES[ggml_type]
    n = 1
    for d in shape:
        n *= d
    return n // block * size


def read_header(path: Path) -> GGUFInfo:
    """Read the GGUF header of one file; a file that is not a GGUF raises BadModelError."""
    try:
        f = path.open("rb")
    except FileNotFoundError:
        raise NoModelError(f"model file not found: {path}") from None
    except IsADirectoryError:
        raise BadModelError(f"{path} is a directory, not a .gguf file") from None
    except OSError as e:
        raise BadModelError(f"cannot read {path}: {e.strerror}") from None
    with f:
        head = f.read(len(LFS_POINTER_PREFIX))
        if head.startswith(LFS_POINTER_PREFIX):
            raise BadModelError(
                f"{path} is a git-lfs pointer, not the model: fetch the real file "
                "(git lfs pull, or download it from the hub)"
            )
        if not head.startswith(GGUF_MAGIC):
            if not head:
                raise BadModelError(f"{path} is empty: download it again")
            raise BadModelError(f"{path} is not a GGUF file (wrong magic bytes {head[:4]!r})")
        f.seek(4)
        r = _Reader(f, path)
        version = r.scalar("<I")
        if version not in (2, 3):
            raise BadModelError(f"{path} is GGUF version {version}; only versions 2 and 3 load")
        n_tensors = r.scalar("<Q")
        n_kv = r.scalar("<Q")
        if n_tensors > 1 << 20 or n_kv > 1 << 20:
            raise BadModelError(f"{path} has a corrupt header")
        metadata: dict[str, Any] = {}
        for _ in range(n_kv):
            key = r.string()
            metadata[key] = r.value(r.scalar("<I"))
        tensors = []
        for _ in range(n_tensors):
            name = r.string()
            n_dims = r.scalar("<I")
            if n_dims > 8:
                raise BadModelError(f"{path} has a corrupt header (tensor {name})")
            shape = tuple(r.scalar("<Q") for _ in range(n_dims))
            ggml_type = r.scalar("<I")
            offset = r.scalar("<Q")
            tensors.append(TensorInfo(name, shape, ggml_type, offset, _nbytes(shape, ggml_type)))
        alignment = int(metadata.get("general.alignment", 32)) or 32
        pos = f.tell()
        data_offset = (pos + alignment - 1) // alignment * alignment
        f.seek(0, 2)
        file_size = f.tell()
    return GGUFInfo(path, version, metadata, tensors, data_offset, file_size)


def shard_paths(first: Path, info: GGUFInfo) -> list[Path]:
    """All shard paths of a split model given its first shard (just [first] for a single file)."""
    count = int(info.metadata.get("split.count", 1) or 1)
    m = SHARD_RE.match(first.name)
    if count <= 1 and not m:
        return [first]
    if not m:
        raise BadModelError(
            f"{first} says it is shard 1 of {count}, "
            f"but its name does not end in -00001-of-{count:05d}.gguf"
        )
    if int(m["no"]) != 1:
        first_name = f"{m['stem']}-00001-of-{m['count']}.gguf"
        raise BadModelError(
            f"{first.name} is shard {int(m['no'])}: pass the first shard, {first_name}"
        )
    total = int(m["count"])
    return [
        first.with_name(f"{m['stem']}-{i:05d}-of-{total:05d}.gguf") for i in range(1, total + 1)
    ]


def _check_complete(info: GGUFInfo) -> None:
    expected = info.expected_size
    if expected is not None and info.file_size < expected:
        raise BadModelError(
            f"{info.path} is truncated: {info.file_size:,} of {expected:,} bytes; download it again"
        )


def inspect_model(path: Path) -> GGUFInfo:
    """Check that `path` is a complete, supported GGUF with all its shards; return its header."""
    if not path.exists():
        raise NoModelError(f"model file not found: {path}")
    info = read_header(path)
    shards = shard_paths(path, info)  # first: a later shard has no architecture to check
    arch = info.architecture
    if arch not in SUPPORTED_ARCHITECTURES:
        raise BadModelError(
            f"{path.name} has architecture '{arch or '?'}'; wizardchat runs WizardLM-2 "
            f"(architecture {', '.join(SUPPORTED_ARCHITECTURES)})"
        )
    missing = [p.name for p in shards if not p.exists()]
    if missing:
        raise BadModelError(
            f"{len(missing)} of {len(shards)} shards missing next to {path.name}: "
            + ", ".join(missing)
        )
    _check_complete(info)
    for shard in shards[1:]:
        _check_complete(read_header(shard))
    return info


def model_bytes(path: Path, info: GGUFInfo) -> int:
    """Total size on disk of the model, all shards together."""
    return sum(p.stat().st_size for p in shard_paths(path, info))


# llama.cpp's llama_ftype values (general.file_type) and the names quant files use.
FILE_TYPES = {
    0: "F32",
    1: "F16",
    2: "Q4_0",
    3: "Q4_1",
    7: "Q8_0",
    8: "Q5_0",
    9: "Q5_1",
    10: "Q2_K",
    11: "Q3_K_S",
    12: "Q3_K_M",
    13: "Q3_K_L",
    14: "Q4_K_S",
    15: "Q4_K_M",
    16: "Q5_K_S",
    17: "Q5_K_M",
    18: "Q6_K",
    19: "IQ2_XXS",
    20: "IQ2_XS",
    21: "Q2_K_S",
    22: "IQ3_XS",
    23: "IQ3_XXS",
    24: "IQ1_S",
    25: "IQ4_NL",
    26: "IQ3_S",
    27: "IQ3_M",
    28: "IQ2_S",
    29: "IQ2_M",
    30: "IQ4_XS",
    31: "IQ1_M",
    32: "BF16",
    36: "TQ1_0",
    37: "TQ2_0",
    38: "MXFP4_MOE",
}


def quant_name(info: GGUFInfo) -> str:
    """The quantization the file says it has (general.file_type), e.g. Q4_K_M."""
    ftype = info.metadata.get("general.file_type")
    if ftype is None:
        return "unknown"
    return FILE_TYPES.get(int(ftype), f"type {ftype}")
