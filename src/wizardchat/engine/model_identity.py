"""Which model file a saved KV state belongs to: a fingerprint of the file's content.

llama.cpp accepts a state file for any model of the same architecture and KV shape, so a state
from another quant or fine-tune of WizardLM-2 8x22B would load without a word and the next reply
would be garbage. Hashing 80 GB to tell them apart takes a minute; every fine-tune or quant
differs in size or in nearly every tensor byte, so the size and 24 blocks sampled across each
shard (the header with its metadata, evenly spaced tensor data, the tail) identify the file in
milliseconds, and a copy of the same file keeps its states valid.
"""

from __future__ import annotations

import hashlib
import os
from collections.abc import Sequence
from pathlib import Path

HEAD_BYTES = 1 << 20  # the GGUF header: metadata and tensor table
BLOCK_BYTES = 64 << 10
BLOCKS = 24


def _sample_offsets(size: int) -> list[int]:
    if size <= HEAD_BYTES + BLOCK_BYTES:
        return []
    span = size - BLOCK_BYTES - HEAD_BYTES
    return [HEAD_BYTES + span * i // (BLOCKS - 1) for i in range(BLOCKS)]


def fingerprint(paths: Sequence[Path]) -> str:
    """sha256 (hex) over each shard's size, header and sampled blocks. OSError if unreadable."""
    h = hashlib.sha256(b"wizardchat-model-fingerprint-1\0")
    for path in paths:
        with open(path, "rb") as f:
            size = os.fstat(f.fileno()).st_size
            h.update(size.to_bytes(8, "little"))
            h.update(f.read(HEAD_BYTES))
            for offset in _sample_offsets(size):
                f.seek(offset)
                h.update(f.read(BLOCK_BYTES))
    return h.hexdigest()
