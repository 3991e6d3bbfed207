"""llama.cpp's decode loop driven directly: one reused batch and llama.cpp's own sampler chain.

`Llama.generate` pays Python work on every token (a batch rebuilt field by field, a prefix scan
in a Python loop, a sampler object per call, numpy bookkeeping); at 5 ms a token on a fast GPU
that is several percent. Here a generated token costs four C calls: sample (which also feeds
the sampler's history), is-end-of-generation, token-to-piece and decode, with the batch's
sequence fields written once. Prompt batches are copied into the batch's arrays whole.

The record of what the KV cache holds, `ModelContext.tokens`, is kept exactly true after every
batch: the KV-state files (engine/kv_state.py), the server's conversation switching and the
prefix reuse of the next reply all read it.
"""

from __future__ import annotations

import array
import ctypes
import weakref
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

from wizardchat.engine.context import ModelContext
from wizardchat.engine.llama_lib import lib
from wizardchat.engine.reply_data import Sampling

if TYPE_CHECKING:
    from wizardchat.engine.model import EvalProgress

# llama.cpp's decode status for an abort callback's "stop" (llama.h: llama_decode).
DECODE_ABORTED = 2
# The window the repeat penalty looks back over: llama-cpp-python's default, kept so replies
# with --repeat-penalty are what they were.
PENALTY_LAST_N = 64


class DecodeError(RuntimeError):
    """llama_decode failed: 1 no room in the KV cache, 2 aborted, negative an error."""

    def __init__(self, status: int) -> None:
        super().__init__(f"llama_decode returned {status}")
        self.status = status


def check_batch_layout() -> None:
    """Fail clearly if llama_batch is not laid out as the copies below assume."""
    fields = [name for name, _ in lib.llama_batch._fields_]
    if fields != ["n_tokens", "token", "embd", "pos", "n_seq_id", "seq_id", "logits"]:
        raise RuntimeError(f"unexpected llama_batch layout: {fields}")
    sizes = (ctypes.sizeof(lib.llama_token), ctypes.sizeof(lib.llama_pos))
    if sizes != (4, 4) or array.array("i").itemsize != 4:
        raise RuntimeError("unexpected llama_token/llama_pos size")


def _address(pointer: Any) -> int:
    address = ctypes.cast(pointer, ctypes.c_void_p).value
    if not address:
        raise MemoryError("llama_batch_init returned no memory")
    return address


class Decoder:
    """Evaluates tokens on one model's context, keeping the KV cache's token record true."""

    def __init__(self, llm: ModelContext) -> None:
        check_batch_layout()
        self.llm = llm
        self.ctx = llm.ctx
        self.n_batch = n = llm.n_batch
        self._batch = b = lib.llama_batch_init(n, 0, 1)
        # The batch is C memory of its own: free it with this object, whatever happens.
        self._free = weakref.finalize(self, lib.llama_batch_free, b)
        for i in range(n):  # every token belongs to sequence 0, once and for all
            b.n_seq_id[i] = 1
            b.seq_id[i][0] = 0
        # The batch's arrays never move: keep pointers to them rather than re-read the fields.
        self._token, self._position, self._logit = b.token, b.pos, b.logits
        self._token_addr = _address(b.token)
        self._pos_addr = _address(b.pos)
        self._logits_addr = _address(b.logits)

    def close(self) -> None:
        """Free the batch now."""
        self._free()

    def keep(self, n_tokens: int) -> None:
        """Drop every cached position from `n_tokens` on (the next tokens go there)."""
        memory = lib.llama_get_memory(self.ctx)
        if not lib.llama_memory_seq_rm(memory, 0, n_tokens, -1):
            # A recurrent model's state cannot lose only its last positions: start over.
            lib.llama_memory_clear(memory, True)
            n_tokens = 0
        del self.llm.tokens[n_tokens:]

    def evaluate(self, tokens: Sequence[int], progress: EvalProgress | None = None) -> None:
        """Evaluate `tokens` after the cached positions, n_batch at a time, logits for the last
        one only. DecodeError if llama.cpp refuses a batch (the batches before it stay)."""
        llm, b, n_batch = self.llm, self._batch, self.n_batch
        ids = list(tokens)
        total = len(ids)
        if progress is not None:
            progress.update(0, total)
        for start in range(0, total, n_batch):
            chunk = ids[start : start + n_batch]
            n = len(chunk)
            past = llm.n_tokens
            ctypes.memmove(self._token_addr, array.array("i", chunk).tobytes(), 4 * n)
            ctypes.memmove(self._pos_addr, array.array("i", range(past, past + n)).tobytes(), 4 * n)
            ctypes.memset(self._logits_addr, 0, n)
            b.logits[n - 1] = 1 if start + n == total else 0
            b.n_tokens = n
            status = lib.llama_decode(self.ctx, b)
            if status != 0:
                raise DecodeError(status)
            llm.tokens += chunk
            llm.evaluated_tokens += n
            if progress is not None:
                progress.update(start + n, total)

    def step(self, token: int) -> None:
        """Evaluate one generated token (the decoding step: logits for it only)."""
        llm, b = self.llm, self._batch
        self._token[0] = token
        self._position[0] = len(llm.tokens)
        self._logit[0] = 1
        b.n_tokens = 1
        status = lib.llama_decode(self.ctx, b)
        if status != 0:
            raise DecodeError(status)
        llm.tokens.append(token)
        llm.evaluated_tokens += 1


def decoder_for(llm: ModelContext) -> Decoder:
    """The model's decoder, made on first use and kept with it (its batch is reused)."""
    if llm.decoder is None:
        llm.decoder = Decoder(llm)
    return llm.decoder


def held_prefix(llm: ModelContext, tokens: Sequence[int]) -> int:
    """How many of `tokens`, from the first, the KV cache holds now: compared a block at a time
    (list equality runs in C; a 64K-token history is compared before every reply)."""
    cached, n = llm.tokens, min(llm.n_tokens, len(tokens))
    block, i = 1024, 0
    while i < n and cached[i : i + block] == list(tokens[i : i + block]):
        i += block
    if i >= n:
        return n
    for j in range(i, min(i + block, n)):
        if cached[j] != tokens[j]:
            return j
    return min(i + block, n)


class SamplerChain:
    """llama.cpp's sampler chain for one reply's settings; sample() also feeds its history."""

    def __init__(self, sampling: Sampling, seed: int, n_vocab: int) -> None:
        s = sampling
        params = lib.llama_sampler_chain_default_params()
        params.no_perf = True
        chain = lib.llama_sampler_chain_init(params)
        self.chain = chain
        self._free = weakref.finalize(self, lib.llama_sampler_free, chain)
        # The same samplers, in the same order, as llama-cpp-python's Llama.generate built, so
        # a seed gives the reply it gave; the ones that would change nothing are left out
        # (llama.cpp skips them anyway, after a call each).
        parts: list[Any] = []
        if s.repeat_penalty != 1.0:
            parts.append(
                lib.llama_sampler_init_penalties(
                    n_vocab, PENALTY_LAST_N, s.repeat_penalty, 0.0, 0.0
                )
            )
        if s.temperature < 0:
            parts.append(lib.llama_sampler_init_dist(seed))
        elif s.temperature == 0:
            parts.append(lib.llama_sampler_init_greedy())
        else:
            if s.top_k > 0:
                parts.append(lib.llama_sampler_init_top_k(s.top_k))
            if s.top_p < 1.0:
                parts.append(lib.llama_sampler_init_top_p(s.top_p, 1))
            if s.min_p > 0.0:
                parts.append(lib.llama_sampler_init_min_p(s.min_p, 1))
            parts.append(lib.llama_sampler_init_temp(s.temperature))
            parts.append(lib.llama_sampler_init_dist(seed))
        for part in parts:  # the chain owns them from here on
            lib.llama_sampler_chain_add(chain, part)

    def close(self) -> None:
        """Free the chain and its samplers now."""
        self._free()
