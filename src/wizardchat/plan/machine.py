"""Facts about this machine (cores, memory) and the arithmetic that sizes the context to fit it."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

from wizardchat.gguf_file import GGUFInfo

# Bytes per element of the KV cache types (block bytes / block size).
_KV_TYPE_BYTES = {
    "f32": 4.0, "f16": 2.0, "bf16": 2.0, "q8_0": 34 / 32, "q4_0": 18 / 32, "q4_1": 20 / 32,
    "q5_0": 22 / 32, "q5_1": 24 / 32, "iq4_nl": 18 / 32,
}  # fmt: skip
CTX_FLOOR = 2048  # below this a chat is not worth having; let llama.cpp try and say why
CTX_STEP = 256


def physical_cores() -> int:
    """Physical CPU cores usable by this process (llama.cpp's best thread count for decoding)."""
    logical = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    logical = logical or 1
    cores: int | None = None
    if sys.platform.startswith("linux"):
        siblings = set()
        for topo in Path("/sys/devices/system/cpu").glob("cpu[0-9]*/topology/thread_siblings_list"):
            try:
                siblings.add(topo.read_text().strip())
            except OSError:
                continue
        cores = len(siblings) or None
    elif sys.platform == "darwin":
        try:
            out = subprocess.run(
                ["sysctl", "-n", "hw.perflevel0.physicalcpu"],
                capture_output=True, text=True, timeout=2, check=True,
            )  # fmt: skip
            cores = int(out.stdout.strip())  # performance cores: efficiency cores slow decoding
        except (OSError, ValueError, subprocess.SubprocessError):
            cores = None
    return max(1, min(cores or logical, logical))


def host_memory() -> tuple[int, int]:
    """(available, total) bytes of system RAM."""
    if sys.platform.startswith("linux"):
        try:
            fields = {}
            for line in Path("/proc/meminfo").read_text().splitlines():
                key, _, rest = line.partition(":")
                fields[key] = int(rest.split()[0]) * 1024
            return fields.get("MemAvailable", fields["MemFree"]), fields["MemTotal"]
        except (OSError, KeyError, ValueError, IndexError):
            pass
    try:
        total = os.sysconf("SC_PHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
    except (ValueError, OSError, AttributeError):
        return 0, 0
    return int(total * 0.7), total  # macOS has no cheap "available"; assume most is reclaimable


def kv_bytes_per_token(info: GGUFInfo, type_k: str, type_v: str) -> int:
    """KV cache bytes one context token costs for this model (224 KiB in f16 for 8x22B)."""
    n_layer = int(info.arch_value("block_count", 0))
    n_head = int(info.arch_value("attention.head_count", 1))
    n_head_kv = int(info.arch_value("attention.head_count_kv", n_head))
    n_embd = int(info.arch_value("embedding_length", 0))
    head_k = int(info.arch_value("attention.key_length", n_embd // max(n_head, 1)))
    head_v = int(info.arch_value("attention.value_length", head_k))
    per_layer = n_head_kv * (head_k * _KV_TYPE_BYTES[type_k] + head_v * _KV_TYPE_BYTES[type_v])
    return int(n_layer * per_layer)


def default_context(n_ctx_train: int, kv_per_token: int, free_bytes: int) -> int:
    """The model's trained context, capped to what fits in `free_bytes` for the KV cache.

    Uses at most 3/4 of the free memory so compute buffers and the OS keep room.
    """
    if n_ctx_train <= 0:
        n_ctx_train = 4096
    if kv_per_token <= 0:
        return n_ctx_train
    fits = int(max(free_bytes, 0) * 0.75) // kv_per_token // CTX_STEP * CTX_STEP
    return min(n_ctx_train, max(fits, min(CTX_FLOOR, n_ctx_train)))
