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
_STRUCTS = {vtype: struct.Struct(fmt) for vtype, fmt in _SCALARS.items()}
_STRING, _ARRAY = 8, 9
_U32, _U64 = _STRUCTS[4], _STRUCTS[10]
# Arrays longer than this (the vocabulary, the merges) are read past, not decoded.
_KEEP_ARRAY_MAX = 64
# The arrays check_vocabulary looks into; never decoded, whatever their length.
_TOKENS, _SCORES, _TOKEN_TYPES = (
    "tokenizer.ggml.tokens",
    "tokenizer.ggml.scores",
    "tokenizer.ggml.token_type",
)
_MAX_STRING = 1 << 24  # a header string longer than 16 MiB is a corrupt length
_MAX_DIMS = 4  # GGML_MAX_DIMS
_MAX_ELEMENTS = 1 << 44  # far beyond any real tensor; a larger shape is a corrupt dimension
# The file is read in blocks, the first this big and each next one twice the last: one read for
# most headers, and a few for a vocabulary of hundreds of thousands of tokens with its merges.
_CHUNK = 1 << 20


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


@dataclass(frozen=True)
class SkippedArray:
    """A metadata array read past without decoding its items (only llama.cpp uses them).

    For the vocabulary's arrays it keeps what check_vocabulary needs, worked out from the raw
    bytes while they were read.
    """

    length: int
    item_type: int
    distinct: int | None = None  # tokens: how many differ, as llama.cpp's token map keys them
    bad_type: int | None = None  # token types: the first one outside 0-6, if any

    def __len__(self) -> int:
        return self.length


class _Reader:
    """The header read sequentially through a buffer: a few large reads, not one per value."""

    def __init__(self, f: IO[bytes], path: Path, file_size: int) -> None:
        self.f = f
        self.path = path
        self.file_size = file_size
        self.buf = b""
        self.pos = 0  # the next byte to read, in buf
        self.base = f.tell()  # the file offset of buf[0]
        self.chunk = _CHUNK
        self.array_types: dict[str, int] = {}  # metadata key -> item type of its array

    def corrupt(self, what: str) -> BadModelError:
        return corrupt_header(self.path, what)

    def truncated(self) -> BadModelError:
        return BadModelError(f"{self.path} is truncated (the header ends early): download it again")

    def tell(self) -> int:
        return self.base + self.pos

    def remaining(self) -> int:
        return self.file_size - self.tell()

    def need(self, n: int) -> None:
        """Make the next `n` bytes of the file readable in buf (truncated if it has fewer)."""
        have = len(self.buf) - self.pos
        if have >= n:
            return
        if n > self.remaining():  # never read the rest of a model for a corrupt length
            raise self.truncated()
        data = self.f.read(max(n - have, self.chunk))
        self.chunk *= 2
        self.base += self.pos
        self.buf = self.buf[self.pos :] + data
        self.pos = 0
        if len(self.buf) < n:  # the file shrank while read
            raise self.truncated()

    def take(self, n: int) -> bytes:
        self.need(n)
        data = self.buf[self.pos : self.pos + n]
        self.pos += n
        return data

    def skip(self, n: int) -> None:
        if n <= len(self.buf) - self.pos:
            self.pos += n
            return
        if n > self.remaining():
            raise self.truncated()
        self.base = self.f.seek(self.tell() + n)
        self.buf, self.pos = b"", 0

    def scalar(self, unpacker: struct.Struct) -> Any:
        self.need(unpacker.size)
        value = unpacker.unpack_from(self.buf, self.pos)[0]
        self.pos += unpacker.size
        return value

    def raw_string(self) -> bytes:
        n = self.scalar(_U64)
        if n > _MAX_STRING:
            raise self.corrupt(f"a {n:,}-byte string at byte {self.tell() - 8:,}")
        return self.take(n)

    def string(self) -> str:
        return self.raw_string().decode("utf-8", errors="replace")

    def value(self, vtype: int, key: str) -> Any:
        if vtype in _STRUCTS:
            return self.scalar(_STRUCTS[vtype])
        if vtype == _STRING:
            return self.string()
        if vtype == _ARRAY:
            return self.array(key)
        raise self.corrupt(f"{_name(key)} has value type {vtype}")

    def array(self, key: str) -> Any:
        item_type = self.scalar(_U32)
        count = self.scalar(_U64)
        if item_type not in _SCALARS and item_type != _STRING:
            raise self.corrupt(f"array {_name(key)} has item type {item_type}")
        item_size = _STRUCTS[item_type].size if item_type in _STRUCTS else 8  # a string: 8 at least
        if count * item_size > self.file_size:  # more than the whole file could hold
            raise self.corrupt(f"array {_name(key)} claims {count:,} items")
        if count * item_size > self.remaining():
            raise self.truncated()
        self.array_types[key] = item_type
        vocabulary = key in (_TOKENS, _TOKEN_TYPES, _SCORES)
        if count <= _KEEP_ARRAY_MAX and not vocabulary:
            if item_type == _STRING:
                return [self.string() for _ in range(count)]
            fmt = _SCALARS[item_type]
            return list(struct.unpack(f"<{count}{fmt[1]}", self.take(count * item_size)))
        if item_type == _STRING:
            words = self.strings(count, keep=key == _TOKENS)
            distinct = _distinct_tokens(words) if key == _TOKENS else None
            return SkippedArray(count, item_type, distinct=distinct)
        if key == _TOKEN_TYPES and item_type in (4, 5):  # int32 (uint32 reads the same)
            raw = self.take(count * item_size)
            return SkippedArray(count, item_type, bad_type=_bad_token_type(raw, item_type))
        self.skip(count * item_size)
        return SkippedArray(count, item_type)

    def strings(self, count: int, *, keep: bool) -> list[bytes]:
        """Read past `count` strings, their bytes undecoded (returned when `keep`)."""
        unpack = _U64.unpack_from
        words: list[bytes] = []
        done = 0
        while done < count:
            # As many as the buffer holds, in a tight loop; the one that runs past its end (a
            # next block to read, the header's end, or a corrupt length) goes through
            # raw_string(), which reads more or says what is wrong.
            buf, p = self.buf, self.pos
            limit = len(buf) - 8  # the room for the next string's length
            stop = done
            if p <= limit:
                stop = count
                for i in range(done, count):
                    end = p + 8 + unpack(buf, p)[0]
                    if end > limit:
                        stop = i
                        break
                    if keep:
                        words.append(buf[p + 8 : end])
                    p = end
                self.pos = p
            if stop < count:
                word = self.raw_string()
                if keep:
                    words.append(word)
                stop += 1
            done = stop
        return words


def _distinct_tokens(words: list[bytes]) -> int:
    """How many of the tokens llama.cpp's map tells apart: by their bytes, an empty one named
    `[EMPTY_<id>]` (llama-vocab.cpp); two the same make it abort (GGML_ASSERT)."""
    seen = set(words)
    if b"" in seen:
        seen = {w or b"[EMPTY_%d]" % i for i, w in enumerate(words)}
    return len(seen)


_TOKEN_TYPE_MAX = 6  # LLAMA_TOKEN_TYPE_BYTE; 0 (undefined) to 6 are the types there are
_TOKEN_TYPE_BYTES = bytes(range(_TOKEN_TYPE_MAX + 1))


def _bad_token_type(raw: bytes, item_type: int) -> int | None:
    """The first of these 32-bit token types outside 0-6, or None (the usual answer, found
    without decoding: each little-endian item is then one byte of 0-6 and three zero bytes)."""
    low = raw[0::4]
    if not low.translate(None, _TOKEN_TYPE_BYTES) and raw.count(0) - low.count(0) == 3 * len(low):
        return None
    values: tuple[int, ...] = struct.unpack(f"<{len(low)}{_SCALARS[item_type][1]}", raw)
    return next(v for v in values if not 0 <= v <= _TOKEN_TYPE_MAX)


def corrupt_header(path: Path, what: str) -> BadModelError:
    """The error for a header whose values cannot be right (exit 4)."""
    return BadModelError(f"{path}: corrupt header: {what}; download it again")


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
    n_dims = r.scalar(_U32)
    if not 1 <= n_dims <= _MAX_DIMS:
        raise r.corrupt(f"tensor {label} has {n_dims} dimensions")
    shape = tuple(r.scalar(_U64) for _ in range(n_dims))
    ggml_type = r.scalar(_U32)
    offset = r.scalar(_U64)
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
        version = r.scalar(_U32)
        if version not in (2, 3):
            raise BadModelError(f"{path} is GGUF version {version}; only versions 2 and 3 load")
        n_tensors = r.scalar(_U64)
        n_kv = r.scalar(_U64)
        if n_tensors > 1 << 20 or n_kv > 1 << 20:
            raise r.corrupt(f"{n_tensors:,} tensors and {n_kv:,} metadata keys")
        metadata: dict[str, Any] = {}
        for _ in range(n_kv):
            key = r.string()
            if key in metadata:
                raise r.corrupt(f"key {_name(key)} appears twice")
            metadata[key] = r.value(r.scalar(_U32), key)
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
        pos = r.tell()
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


# The ids wizardchat itself uses; llama.cpp ignores other special ids outside the vocabulary.
_TOKEN_ID_KEYS = ("bos", "eos")


def check_vocabulary(info: GGUFInfo) -> None:
    """Refuse a vocabulary llama.cpp would read out of bounds of or abort on."""
    tokens = info.metadata.get(_TOKENS)
    if tokens is None:
        raise corrupt_header(info.path, f"{_TOKENS} (the vocabulary) is missing")
    if not isinstance(tokens, SkippedArray) or tokens.item_type != _STRING or not tokens.length:
        raise corrupt_header(info.path, f"{_TOKENS} is not a list of strings")
    n_vocab = len(tokens)
    for key in (_SCORES, _TOKEN_TYPES):  # llama.cpp indexes them by token id, unchecked
        other = info.metadata.get(key)
        if other is not None and (not isinstance(other, SkippedArray) or len(other) != n_vocab):
            raise corrupt_header(
                info.path, f"{key} has {_length(other)} entries for {n_vocab} tokens"
            )
    # llama.cpp casts the arrays' data to float* and int* without looking at their item type.
    for key, item_types, what in ((_SCORES, (6,), "float32"), (_TOKEN_TYPES, (4, 5), "int32")):
        item_type = info.array_types.get(key)
        if item_type is not None and item_type not in item_types:
            raise corrupt_header(info.path, f"{key} has items of type {item_type}, not {what}")
    types = info.metadata.get(_TOKEN_TYPES)
    if isinstance(types, SkippedArray) and types.bad_type is not None:
        raise corrupt_header(info.path, f"{_TOKEN_TYPES} has type {_show(types.bad_type)}")
    if tokens.distinct != n_vocab:
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
