"""The GGUF header reader on hand-built headers: the vocabulary read past without being decoded,
checked as llama.cpp would key it, and every cut or corrupt length a clean one-line error, however
the file's blocks fall."""

from __future__ import annotations

import struct
from pathlib import Path

import pytest
from conftest import Models
from gguf_models import vocabulary

from wizardchat import gguf_file
from wizardchat.errors import BadModelError
from wizardchat.gguf_file import check_vocabulary, read_header

TOKENS, TYPES = "tokenizer.ggml.tokens", "tokenizer.ggml.token_type"
MERGES = "tokenizer.ggml.merges"
U32, I32, STRING, ARRAY = 4, 5, 8, 9


def text(data: bytes) -> bytes:
    return struct.pack("<Q", len(data)) + data


def strings(key: str, words: list[bytes]) -> bytes:
    items = b"".join(text(w) for w in words)
    return text(key.encode()) + struct.pack("<IIQ", ARRAY, STRING, len(words)) + items


def ints(key: str, values: list[int], item_type: int = I32) -> bytes:
    items = struct.pack(f"<{len(values)}{'i' if item_type == I32 else 'I'}", *values)
    return text(key.encode()) + struct.pack("<IIQ", ARRAY, item_type, len(values)) + items


def header(*kvs: bytes) -> bytes:
    """A GGUF v3 with these metadata entries and one 32-float tensor, its data included."""
    tensor = text(b"t.weight") + struct.pack("<IQIQ", 1, 32, 0, 0)  # 1 dim of 32, F32, offset 0
    head = b"GGUF" + struct.pack("<IQQ", 3, 1, len(kvs)) + b"".join(kvs) + tensor
    return head + bytes(-len(head) % 32) + bytes(4 * 32)


def vocab_header(words: list[bytes], types: list[int] | None = None) -> bytes:
    merges = [b"%d %d" % (i, i + 1) for i in range(300)]
    types = [1] * len(words) if types is None else types
    return header(strings(TOKENS, words), ints(TYPES, types), strings(MERGES, merges))


def checked(path: Path, data: bytes) -> gguf_file.GGUFInfo:
    path.write_bytes(data)
    info = read_header(path)
    check_vocabulary(info)
    return info


WORDS = [b"w%d" % i for i in range(200)]


def test_the_vocabulary_is_read_past_not_decoded(models: Models) -> None:
    tokens, scores, types = vocabulary()
    info = read_header(models.scripted)
    for key, items in ((TOKENS, tokens), ("tokenizer.ggml.scores", scores), (TYPES, types)):
        value = info.metadata[key]
        assert isinstance(value, gguf_file.SkippedArray) and len(value) == len(items)
    assert info.metadata[TOKENS].distinct == len(tokens)
    assert info.metadata[TYPES].bad_type is None


def test_tokens_that_differ_only_in_invalid_utf8_are_two_tokens(tmp_path: Path) -> None:
    # llama.cpp keys its token map by the bytes; decoding would make both U+FFFD.
    checked(tmp_path / "m.gguf", vocab_header([*WORDS, b"\xff", b"\xfe"]))


def test_empty_tokens_are_told_apart_by_id_as_llama_cpp_names_them(tmp_path: Path) -> None:
    checked(tmp_path / "empties.gguf", vocab_header([*WORDS, b"", b""]))
    with pytest.raises(BadModelError, match="lists a token twice"):
        checked(tmp_path / "named.gguf", vocab_header([b"", b"[EMPTY_0]", *WORDS]))


def test_a_token_listed_twice_is_refused(tmp_path: Path) -> None:
    with pytest.raises(BadModelError, match=f"corrupt header: {TOKENS} lists a token twice"):
        checked(tmp_path / "m.gguf", vocab_header([*WORDS, b"w7"]))


@pytest.mark.parametrize(
    ("value", "item_type"), [(7, I32), (-1, I32), (256, I32), (2**31 - 1, I32), (2**32 - 1, U32)]
)
def test_a_token_type_out_of_range_is_named(tmp_path: Path, value: int, item_type: int) -> None:
    types = [0, 1, 2, 3, 4, 5, 6] * 40
    types[123] = value
    data = header(strings(TOKENS, [b"w%d" % i for i in range(280)]), ints(TYPES, types, item_type))
    with pytest.raises(BadModelError, match=f"{TYPES} has type {value}; "):
        checked(tmp_path / "m.gguf", data)


def test_every_token_type_from_0_to_6_passes(tmp_path: Path) -> None:
    for item_type in (I32, U32):
        types = [0, 1, 2, 3, 4, 5, 6] * 40
        words = [b"w%d" % i for i in range(280)]
        checked(tmp_path / "m.gguf", header(strings(TOKENS, words), ints(TYPES, types, item_type)))


@pytest.mark.parametrize("chunk", [1, 5, 8, 64, 1000])
def test_the_same_header_whatever_the_read_block(
    models: Models, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, chunk: int
) -> None:
    built = tmp_path / "built.gguf"
    built.write_bytes(vocab_header([*WORDS, b"", b"\xff" * 300]))
    expected = [read_header(p) for p in (models.scripted, built)]
    monkeypatch.setattr(gguf_file, "_CHUNK", chunk)
    assert [read_header(p) for p in (models.scripted, built)] == expected


@pytest.mark.parametrize("chunk", [7, gguf_file.__dict__.get("_CHUNK", 1 << 20)])
def test_every_cut_of_the_header_is_a_clean_error(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, chunk: int
) -> None:
    monkeypatch.setattr(gguf_file, "_CHUNK", chunk, raising=False)
    data = vocab_header(WORDS[:80])
    path = tmp_path / "cut.gguf"
    path.write_bytes(data)
    end = read_header(path).data_offset
    for cut in range(end - 31):  # past that, only the alignment padding is missing
        path.write_bytes(data[:cut])
        with pytest.raises(BadModelError) as caught:
            read_header(path)
        message = str(caught.value)
        assert "\n" not in message
        if cut >= 24:  # past the counts: the file ends inside the header
            assert "is truncated (the header ends early)" in message or "corrupt header" in message


@pytest.mark.parametrize("chunk", [3, 1 << 20])
def test_a_corrupt_length_inside_a_long_array_names_its_byte(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, chunk: int
) -> None:
    monkeypatch.setattr(gguf_file, "_CHUNK", chunk, raising=False)
    data = bytearray(vocab_header(WORDS))
    at = data.index(text(b"w150"))
    data[at : at + 8] = struct.pack("<Q", 2**40)
    path = tmp_path / "m.gguf"
    path.write_bytes(bytes(data))
    with pytest.raises(BadModelError) as caught:
        read_header(path)
    assert str(caught.value) == (
        f"{path}: corrupt header: a 1,099,511,627,776-byte string at byte {at:,}; download it again"
    )
    data[at : at + 8] = struct.pack("<Q", len(data))  # within bounds, past the end of the file
    path.write_bytes(bytes(data))
    with pytest.raises(BadModelError, match="is truncated"):
        read_header(path)
