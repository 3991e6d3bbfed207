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
from wizardchat.ggml_types import GGML_TYPES

GGUF_MAGIC = b"GGUF"
LFS_POINTER_PREFIX = b"version https://git-lfs"
# Architectures whose tensors and prompt format wizardchat knows (Mixtral/WizardLM-2 is "llama").
SUPPORTED_ARCHITECTURES = ("llama",)
SHARD_RE = re.compile(r"^(?P<stem>.*)-(?P<no>\d{5})-of-(?P<count>\d{5})\.gguf$")

_SCALARS = {0: "<B", 1: "<b", 2: "<H", 3: "<h", 4: "<I", 5: "<i", 6: "<f", 7: "<?", 10: "<Q",
            11: "<q", 12: "<d"}  # fmt: skip
_STRING, _ARRAY = 8, 9
# Arrays longer than this (the vocabulary) are skipped, not kept: only their length is stored.
_KEEP_ARRAY_MAX = 64
# Arrays kept whole whatever their length, because their contents are checked (check_vocabulary).
_TOKENS, _SCORES, _TOKEN_TYPES = (
    "tokenizer.ggml.tokens",
    "tokenizer.ggml.scores",
    "tokenizer.ggml.token_type",
)
_MAX_STRING = 1 << 24  # a header string longer than 16 MiB is a corrupt length
_MAX_DIMS = 4  # GGML_MAX_DIMS
_MAX_ELEMENTS = 1 << 44  # far beyond any real tensor; a larger shape is a corrupt dimension


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
    array_types: dict[str, int] = field(default_factory=dict)  # key -> GGUF item type

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
    def __init__(self, f: IO[bytes], path: Path, file_size: int) -> None:
        self.f = f
        self.path = path
        self.file_size = file_size
        self.array_types: dict[str, int] = {}  # metadata key -> item type of its array

    def corrupt(self, what: str) -> BadModelError:
        return corrupt_header(self.path, what)

    def truncated(self) -> BadModelError:
        return BadModelError(f"{self.path} is truncated (the header ends early): download it again")

    def read(self, n: int) -> bytes:
        data = self.f.read(n)
        if len(data) != n:
            raise self.truncated()
        return data

    def remaining(self) -> int:
        return self.file_size - self.f.tell()

    def scalar(self, fmt: str) -> Any:
        return struct.unpack(fmt, self.read(struct.calcsize(fmt)))[0]

    def string(self) -> str:
        n = self.scalar("<Q")
        if n > _MAX_STRING:
            raise self.corrupt(f"a {n:,}-byte string at byte {self.f.tell() - 8:,}")
        return self.read(n).decode("utf-8", errors="replace")

    def value(self, vtype: int, key: str) -> Any:
        if vtype in _SCALARS:
            return self.scalar(_SCALARS[vtype])
        if vtype == _STRING:
            return self.string()
        if vtype == _ARRAY:
            return self.array(key)
        raise self.corrupt(f"{_name(key)} has value type {vtype}")

    def array(self, key: str) -> Any:
        item_type = self.scalar("<I")
        count = self.scalar("<Q")
        if item_type not in _SCALARS and item_type != _STRING:
            raise self.corrupt(f"array {_name(key)} has item type {item_type}")
        item_size = struct.calcsize(_SCALARS[item_type]) if item_type in _SCALARS else 8
        if count * item_size > self.file_size:  # more than the whole file could hold
            raise self.corrupt(f"array {_name(key)} claims {count:,} items")
        if count * item_size > self.remaining():
            raise self.truncated()
        self.array_types[key] = item_type
        if count <= _KEEP_ARRAY_MAX or key in (_TOKENS, _TOKEN_TYPES):
            if item_type in _SCALARS:
                fmt = _SCALARS[item_type]
                return list(struct.unpack(f"<{count}{fmt[1]}", self.read(count * item_size)))
            return [self.string() for _ in range(count)]
        if item_type in _SCALARS:  # skip fixed-size items in one seek
            self.f.seek(count * item_size, 1)
        else:
            for _ in range(count):
                self.string()
        return _SkippedArray(count)


def corrupt_header(path: Path, what: str) -> BadModelError:
    """The error for a header whose values cannot be right (exit 4)."""
    return BadModelError(f"{path}: corrupt header: {what}; download it again")


@dataclass(frozen=True)
class _SkippedArray:
    """A long metadata array (e.g. the scores) of which only the length is kept."""

    length: int

    def __len__(self) -> int:
        return self.length


def _nbytes(shape: tuple[int, ...], ggml_type: int) -> int | None:
    if ggml_type not in GGML_TYPES:
        return None
    block, size = GGML_TYPES[ggml_type].block, GGML_TYPES[ggml_type].block_bytes
    n = 1
    for d in shape:
        n *= d
    return n // block * size


def _read_tensor(r: _Reader) -> TensorInfo:
    name = r.string()
    label = _name(name)
    n_dims = r.scalar("<I")
    if not 1 <= n_dims <= _MAX_DIMS:
        raise r.corrupt(f"tensor {label} has {n_dims} dimensions")
    shape = tuple(r.scalar("<Q") for _ in range(n_dims))
    ggml_type = r.scalar("<I")
    offset = r.scalar("<Q")
    if ggml_type not in GGML_TYPES:  # ids ggml removed (4, 5, 31-33, 36-38) or never had
        raise r.corrupt(f"tensor {label} has unknown type {ggml_type}")
    elements = 1
    for d in shape:
        elements *= d
    if elements > _MAX_ELEMENTS or (elements and max(shape) > 1 << 40):
        raise r.corrupt(f"tensor {label} has shape {list(shape)}")
    block = GGML_TYPES[ggml_type].block
    if shape[0] % block:
        raise r.corrupt(
            f"tensor {label} has {shape[0]} columns, not a multiple of its type's block of {block}"
        )
    if offset > r.file_size:
        raise r.corrupt(f"tensor {label} starts at byte {offset:,}, past the end of the file")
    return TensorInfo(name, shape, ggml_type, offset, _nbytes(shape, ggml_type))


def _alignment(path: Path, metadata: dict[str, Any]) -> int:
    alignment = metadata.get("general.alignment", 32)
    if not _is_int(alignment) or not 1 <= alignment <= 1 << 20 or alignment & (alignment - 1):
        raise corrupt_header(path, f"general.alignment is {alignment!r}")
    return int(alignment)


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def read_header(path: Path) -> GGUFInfo:
    """Read the GGUF header of one file; a file that is not a GGUF, or whose header cannot be
    right (a length past the end, an unknown tensor type...), raises BadModelError."""
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
        file_size = f.seek(0, 2)
        f.seek(4)
        r = _Reader(f, path, file_size)
        version = r.scalar("<I")
        if version not in (2, 3):
            raise BadModelError(f"{path} is GGUF version {version}; only versions 2 and 3 load")
        n_tensors = r.scalar("<Q")
        n_kv = r.scalar("<Q")
        if n_tensors > 1 << 20 or n_kv > 1 << 20:
            raise r.corrupt(f"{n_tensors:,} tensors and {n_kv:,} metadata keys")
        metadata: dict[str, Any] = {}
        for _ in range(n_kv):
            key = r.string()
            if key in metadata:
                raise r.corrupt(f"key {_name(key)} appears twice")
            metadata[key] = r.value(r.scalar("<I"), key)
        tensors = []
        names: set[str] = set()
        for _ in range(n_tensors):
            tensor = _read_tensor(r)
            if tensor.name in names:
                raise r.corrupt(f"tensor {_name(tensor.name)} appears twice")
            names.add(tensor.name)
            tensors.append(tensor)
        alignment = _alignment(path, metadata)
        _check_general(path, metadata)
        pos = f.tell()
        data_offset = (pos + alignment - 1) // alignment * alignment
    return GGUFInfo(path, version, metadata, tensors, data_offset, file_size, r.array_types)


def _check_general(path: Path, metadata: dict[str, Any]) -> None:
    """Keys every header may have, which wizardchat reads as numbers or text."""
    for key, high in (("split.count", 9999), ("split.no", 9999), ("general.file_type", 1 << 16)):
        value = metadata.get(key)
        if value is not None and (not _is_int(value) or not 0 <= value <= high):
            raise corrupt_header(path, f"{key} is {_show(value)}")
    for key in ("general.architecture", "general.name"):
        value = metadata.get(key)
        if value is not None and not isinstance(value, str):
            raise corrupt_header(path, f"{key} is {_show(value)}, not text")


# Architecture-scoped integer keys: (name, lowest, highest, required by llama.cpp). The highest
# values are llama.cpp's own limits (LLAMA_MAX_LAYERS, LLAMA_MAX_EXPERTS) or far beyond any real
# model; llama.cpp aborts the process (GGML_ASSERT) on some of these instead of refusing the file,
# and wizardchat sizes the default context from context_length.
_ARCH_INTS: tuple[tuple[str, int, int, bool], ...] = (
    ("block_count", 1, 512, True),
    ("context_length", 1, 1 << 24, True),
    ("embedding_length", 1, 1 << 20, True),
    ("feed_forward_length", 1, 1 << 22, False),
    ("attention.head_count", 1, 1 << 14, True),
    ("attention.head_count_kv", 1, 1 << 14, False),
    ("attention.key_length", 1, 1 << 16, False),
    ("attention.value_length", 1, 1 << 16, False),
    ("rope.dimension_count", 1, 1 << 16, False),
    ("expert_count", 0, 1024, False),
    ("expert_used_count", 0, 1024, False),
)


def check_hyperparameters(info: GGUFInfo) -> None:
    """Refuse architecture values llama.cpp would abort on or wizardchat would misuse."""
    arch = info.architecture
    for key, low, high, required in _ARCH_INTS:
        value = info.arch_value(key)
        if value is None:
            if required:
                raise corrupt_header(info.path, f"{arch}.{key} is missing")
            continue
        if not _is_int(value) or not low <= value <= high:
            raise corrupt_header(
                info.path, f"{arch}.{key} is {_show(value)} (expected {low}-{high})"
            )
    n_embd = info.arch_value("embedding_length")
    n_head = info.arch_value("attention.head_count")
    n_head_kv = info.arch_value("attention.head_count_kv", n_head)
    if info.arch_value("attention.key_length") is None and n_embd % n_head:
        raise corrupt_header(
            info.path, f"{arch}.embedding_length {n_embd} is not a multiple of head_count {n_head}"
        )
    if n_head % n_head_kv:
        raise corrupt_header(
            info.path,
            f"{arch}.attention.head_count {n_head} is not a multiple of head_count_kv {n_head_kv}",
        )
    n_expert = info.arch_value("expert_count", 0)
    n_used = info.arch_value("expert_used_count", 0)
    if n_expert == 0 and any(t.name.endswith("_exps.weight") for t in info.tensors):
        raise corrupt_header(
            info.path, f"{arch}.expert_count is 0 but the model has expert tensors"
        )
    if n_expert == 0 and n_used:
        raise corrupt_header(info.path, f"{arch}.expert_used_count is {n_used} with no experts")
    if n_expert and not 1 <= n_used <= n_expert:
        raise corrupt_header(
            info.path, f"{arch}.expert_used_count is {n_used} (expected 1-{n_expert}, the experts)"
        )


_TOKEN_TYPE_MAX = 6  # LLAMA_TOKEN_TYPE_BYTE; 0 (undefined) to 6 are the types there are
# The ids wizardchat itself uses; llama.cpp ignores other special ids outside the vocabulary.
_TOKEN_ID_KEYS = ("bos", "eos")


def check_vocabulary(info: GGUFInfo) -> None:
    """Refuse a vocabulary llama.cpp would read out of bounds of or abort on."""
    tokens = info.metadata.get(_TOKENS)
    if tokens is None:
        raise corrupt_header(info.path, f"{_TOKENS} (the vocabulary) is missing")
    if not isinstance(tokens, list) or not all(isinstance(t, str) for t in tokens) or not tokens:
        raise corrupt_header(info.path, f"{_TOKENS} is not a list of strings")
    n_vocab = len(tokens)
    for key in (_SCORES, _TOKEN_TYPES):  # llama.cpp indexes them by token id, unchecked
        other = info.metadata.get(key)
        if other is not None and (
            not isinstance(other, list | _SkippedArray) or len(other) != n_vocab
        ):
            raise corrupt_header(
                info.path, f"{key} has {_length(other)} entries for {n_vocab} tokens"
            )
    # llama.cpp casts the arrays' data to float* and int* without looking at their item type.
    for key, item_types, what in ((_SCORES, (6,), "float32"), (_TOKEN_TYPES, (4, 5), "int32")):
        item_type = info.array_types.get(key)
        if item_type is not None and item_type not in item_types:
            raise corrupt_header(info.path, f"{key} has items of type {item_type}, not {what}")
    types = info.metadata.get(_TOKEN_TYPES)
    if types is not None:
        bad = [t for t in types if not _is_int(t) or not 0 <= t <= _TOKEN_TYPE_MAX]
        if bad:
            raise corrupt_header(info.path, f"{_TOKEN_TYPES} has type {_show(bad[0])}")
    if len(set(tokens)) != n_vocab:
        raise corrupt_header(info.path, f"{_TOKENS} lists a token twice")
    for name in _TOKEN_ID_KEYS:
        key = f"tokenizer.ggml.{name}_token_id"
        value = info.metadata.get(key)
        if value is not None and (not _is_int(value) or not 0 <= value < n_vocab):
            raise corrupt_header(info.path, f"{key} is {_show(value)} ({n_vocab} tokens)")


def _length(value: Any) -> str:
    try:
        return f"{len(value):,}"
    except TypeError:
        return "no"


def _name(text: str) -> str:
    """A key or tensor name from the file, safe to print: as it is, or quoted, escaped and cut."""
    if text.isascii() and text.isprintable() and 0 < len(text) <= 64:
        return text
    return _show(text)


def _show(value: Any) -> str:
    text = repr(value)
    return text if len(text) <= 40 else text[:37] + "..."


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
            f"{path.name} has architecture {_show(arch or '?')}; wizardchat runs WizardLM-2 "
            f"(architecture {', '.join(SUPPORTED_ARCHITECTURES)})"
        )
    missing = [p.name for p in shards if not p.exists()]
    if missing:
        raise BadModelError(
            f"{len(missing)} of {len(shards)} shards missing next to {path.name}: "
            + ", ".join(missing)
        )
    if not info.tensors:
        raise BadModelError(
            f"{path} has no weights (vocabulary only): it is not a model; pass the model's .gguf"
        )
    check_hyperparameters(info)
    check_vocabulary(info)
    _check_complete(info)
    for shard in shards[1:]:
        _check_complete(read_header(shard))
    return info


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
