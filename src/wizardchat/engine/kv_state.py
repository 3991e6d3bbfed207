"""The KV cache of sequence 0 to and from a file, with the record of its tokens kept true.

llama.cpp's sequence-state file API streams the cache tensor by tensor from wherever it lives
(CPU, GPU, RPC worker) into a file, and back; `Llama.save_state()` would copy the whole state
into RAM three times instead. The file holds the token ids of the cached positions (magic
`ggsq`), then the KV cells.

What llama.cpp restores is only the cache. The decoder (engine/decoder.py) decides what to
evaluate from the record `ModelContext.tokens`: after a restore that record must say exactly
which tokens the cache holds, or a reply re-evaluates everything (llama.cpp#26676 is that bug
in llama-server). No logits are saved; a reply always evaluates at least its last prompt token
before sampling.
"""

from __future__ import annotations

import ctypes
from collections.abc import Sequence
from pathlib import Path

from wizardchat.engine.context import ModelContext
from wizardchat.engine.decoder import decoder_for, held_prefix
from wizardchat.engine.llama_lib import lib
from wizardchat.errors import KvStateError

SEQ = 0  # wizardchat keeps one conversation in sequence 0
__all__ = ["held_prefix", "load", "restore_snapshot", "save", "snapshot", "state_size", "trim"]


def _memory(llm: ModelContext) -> lib.llama_memory_t:
    return lib.llama_get_memory(llm.ctx)


def trim(llm: ModelContext, n_tokens: int) -> None:
    """Keep only the first `n_tokens` cached positions (what the next reply would drop anyway)."""
    if n_tokens < llm.n_tokens:
        decoder_for(llm).keep(n_tokens)


def state_size(llm: ModelContext) -> int:
    """Bytes the cached positions take in a state file (llama.cpp counts them, copying none)."""
    return int(lib.llama_state_seq_get_size(llm.ctx, SEQ))


def save(llm: ModelContext, path: Path) -> int:
    """Write the cached positions and their token ids to `path` (which llama.cpp creates or
    truncates); return the bytes written. KvStateError if llama.cpp could not write it."""
    n = llm.n_tokens
    ids = (lib.llama_token * max(n, 1))(*llm.tokens)
    written = lib.llama_state_seq_save_file(llm.ctx, str(path).encode(), SEQ, ids, n)
    if not written:
        raise KvStateError("llama.cpp could not write the state file (the log says why)")
    return int(written)


def load(llm: ModelContext, path: Path, capacity: int) -> list[int]:
    """Replace the cache with the state in `path` and return the token ids it holds.

    On any failure the cache is left empty (never half a state) and KvStateError says why.
    """
    memory = _memory(llm)
    lib.llama_memory_seq_rm(memory, SEQ, -1, -1)
    llm.tokens = []
    capacity = min(capacity, llm.n_ctx)
    ids = (lib.llama_token * max(capacity, 1))()
    count = ctypes.c_size_t(0)
    read = lib.llama_state_seq_load_file(
        llm.ctx, str(path).encode(), SEQ, ids, capacity, ctypes.byref(count)
    )
    n = int(count.value)
    if not read or n > capacity:
        lib.llama_memory_seq_rm(memory, SEQ, -1, -1)
        raise KvStateError("llama.cpp could not read it (another model shape, or a damaged file)")
    tokens = list(ids[:n])
    # The record the decoder trusts: exactly the positions the cache now holds.
    llm.tokens = list(tokens)
    return tokens


def snapshot(llm: ModelContext) -> tuple[ctypes.Array[ctypes.c_uint8], list[int]]:
    """A copy in RAM of the cached positions, and the token ids they hold (KvStateError if
    llama.cpp could not copy them)."""
    size = state_size(llm)
    data = (ctypes.c_uint8 * max(size, 1))()
    copied = lib.llama_state_seq_get_data(llm.ctx, data, size, SEQ)
    if copied != size:
        raise KvStateError("llama.cpp could not copy the KV cache")
    return data, list(llm.tokens)


def restore_snapshot(
    llm: ModelContext, data: ctypes.Array[ctypes.c_uint8], tokens: Sequence[int]
) -> None:
    """Make a snapshot() the cache again, with the bookkeeping the decoder trusts; on failure
    the cache is left empty and KvStateError says so."""
    memory = _memory(llm)
    lib.llama_memory_seq_rm(memory, SEQ, -1, -1)
    llm.tokens = []
    if len(tokens) > llm.n_ctx or not lib.llama_state_seq_set_data(llm.ctx, data, len(data), SEQ):
        lib.llama_memory_seq_rm(memory, SEQ, -1, -1)
        raise KvStateError("llama.cpp could not restore the KV cache copy")
    llm.tokens = list(tokens)
