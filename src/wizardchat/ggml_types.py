"""ggml's tensor types, once: ids, names, block sizes, and which of them a KV cache may use.

Everything that sizes a tensor or names a type reads this table: the GGUF header reader (tensor
bytes), the fit model (weights and KV cache bytes), the settings (the KV cache choices) and the
engine (the ggml_type ids llama.cpp takes). It is a foundation module, below plan/ and engine/,
because gguf_file.py and settings.py need it too.
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class GgmlType:
    """One ggml tensor type: its id in ggml.h, its name, and how it packs elements."""

    id: int
    name: str  # ggml's own spelling (ggml_type_name): "q8_0", "q4_K", "bf16"
    block: int  # elements per block
    block_bytes: int  # bytes per block


# ggml.h enum ggml_type with the block sizes of ggml.c's type traits (gguf-py GGML_QUANT_SIZES).
# Ids 4, 5, 31-33 and 36-38 were removed from ggml: a file with one of them is corrupt.
GGML_TYPES: dict[int, GgmlType] = {
    t.id: t
    for t in (
        GgmlType(0, "f32", 1, 4), GgmlType(1, "f16", 1, 2), GgmlType(2, "q4_0", 32, 18),
        GgmlType(3, "q4_1", 32, 20), GgmlType(6, "q5_0", 32, 22), GgmlType(7, "q5_1", 32, 24),
        GgmlType(8, "q8_0", 32, 34), GgmlType(9, "q8_1", 32, 40), GgmlType(10, "q2_K", 256, 84),
        GgmlType(11, "q3_K", 256, 110), GgmlType(12, "q4_K", 256, 144),
        GgmlType(13, "q5_K", 256, 176), GgmlType(14, "q6_K", 256, 210),
        GgmlType(15, "q8_K", 256, 292), GgmlType(16, "iq2_xxs", 256, 66),
        GgmlType(17, "iq2_xs", 256, 74), GgmlType(18, "iq3_xxs", 256, 98),
        GgmlType(19, "iq1_s", 256, 50), GgmlType(20, "iq4_nl", 32, 18),
        GgmlType(21, "iq3_s", 256, 110), GgmlType(22, "iq2_s", 256, 82),
        GgmlType(23, "iq4_xs", 256, 136), GgmlType(24, "i8", 1, 1), GgmlType(25, "i16", 1, 2),
        GgmlType(26, "i32", 1, 4), GgmlType(27, "i64", 1, 8), GgmlType(28, "f64", 1, 8),
        GgmlType(29, "iq1_m", 256, 56), GgmlType(30, "bf16", 1, 2),
        GgmlType(34, "tq1_0", 256, 54), GgmlType(35, "tq2_0", 256, 66),
        GgmlType(39, "mxfp4", 32, 17), GgmlType(40, "nvfp4", 64, 36), GgmlType(41, "q1_0", 128, 18),
        GgmlType(42, "q2_0", 64, 18),
    )
}  # fmt: skip
_BY_NAME = {t.name.lower(): t for t in GGML_TYPES.values()}

# llama.cpp's KV cache types (common/arg.cpp kv_cache_types): the -ctk/-ctv values, by ggml id.
KV_CACHE_TYPES: dict[str, int] = {
    name: _BY_NAME[name].id
    for name in ("f32", "f16", "q4_0", "q4_1", "q5_0", "q5_1", "q8_0", "iq4_nl", "bf16")
}
# llama-bench's ggml_type_from_name: the KV cache types its -ctk/-ctv accept (all but f32).
LLAMA_BENCH_KV_TYPES = tuple(name for name in KV_CACHE_TYPES if name != "f32")
FLASH_ATTN_CHOICES = ("auto", "on", "off")
_UNQUANTIZED = ("f32", "f16", "bf16")


def ggml_type(name: str) -> GgmlType:
    """The type named `name`, in any case ("Q4_K", "q4_K"); KeyError if ggml has none."""
    return _BY_NAME[name.lower()]


def tensor_bytes(elements: int, name: str) -> int:
    """Bytes of `elements` elements stored as `name` (whole blocks, as in a GGUF file)."""
    t = ggml_type(name)
    return elements // t.block * t.block_bytes


def row_bytes(elements: int, name: str) -> int:
    """Bytes of one row of `elements` elements stored as `name`, its last block padded."""
    t = ggml_type(name)
    return -(-elements // t.block) * t.block_bytes


def is_quantized(kv_type: str) -> bool:
    """Whether a KV cache type is a quantized (block) type."""
    return kv_type not in _UNQUANTIZED


def flash_attn_enabled(choice: str, type_v: str) -> bool:
    """Whether llama.cpp runs with flash attention for `--flash-attn choice` and this V cache.

    llama.cpp refuses a quantized V cache without flash attention, so such a cache forces it
    on; every backend wizardchat builds for (CPU, CUDA, Metal) implements it, so "auto" is on.
    """
    return choice != "off" or is_quantized(type_v)
