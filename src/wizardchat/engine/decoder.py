"""llama.cpp's decode loop driven directly: one reused batch and llama.cpp's own sampler chain.

`Llama.generate` pays Python work on every token (a batch rebuilt field by field, a prefix scan
in a Python loop, a sampler object per call, numpy bookkeeping); at 5 ms a token on a fast GPU
that is several percent. Here a generated token costs four C calls: sample (which also feeds
the sampler's history), is-end-of-generation, token-to-piece and decode, with the batch's
sequence fields written once. Prompt batches are filled with numpy slices of the batch's own
arrays.

llama-cpp-python's record of what the KV cache holds, `input_ids[:n_tokens]`, is kept exactly
true after every batch: the KV-state files (engine/kv_state.py), the server's conversation
switching and the prefix reuse of the next reply all read it.
"""

from __future__ import annotations

import ctypes
import weakref
from collections.abc import Sequence
from typing import Any

import llama_cpp
import numpy as np

from wizardchat.engine.model import CountingLlama, EvalProgress
from wizardchat.engine.reply_data import Sampling

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
    """Fail clearly if llama_batch is not laid out as the numpy views below assume."""
    fields = [name for name, _ in llama_cpp.llama_batch._fields_]
    if fields != ["n_tokens", "token", "embd", "pos", "n_seq_id", "seq_id", "logits"]:
        raise RuntimeError(f"unexpected llama_batch layout: {fields}")
    sizes = (ctypes.sizeof(llama_cpp.llama_token), ctypes.sizeof(llama_cpp.llama_pos))
    if sizes != (4, 4) or ctypes.sizeof(ctypes.c_int8) != 1:
        raise RuntimeError("unexpected llama_token/llama_pos size")


class Decoder:
    """Evaluates tokens on one model's context, keeping the KV cache's token record true."""

    def __init__(self, llm: CountingLlama) -> None:
        check_batch_layout()
        self.llm = llm
        self.ctx = llm._ctx.ctx
        self.n_batch = int(llm.n_batch)
        self._batch = llama_cpp.llama_batch_init(self.n_batch, 0, 1)
        # The batch is C memory of its own: free it with this object, whatever happens.
        self._free = weakref.finalize(self, llama_cpp.llama_batch_free, self._batch)
        b, n = self._batch, self.n_batch
        self._tokens = np.ctypeslib.as_array(b.token, shape=(n,))
        self._pos = np.ctypeslib.as_array(b.pos, shape=(n,))
        self._logits = np.ctypeslib.as_array(b.logits, shape=(n,))
        np.ctypeslib.as_array(b.n_seq_id, shape=(n,))[:] = 1
        for i in range(n):  # every token belongs to sequence 0, once and for all
            b.seq_id[i][0] = 0

    def close(self) -> None:
        """Free the batch now."""
        self._free()

    def keep(self, n_tokens: int) -> None:
        """Drop every cached position from `n_tokens` on (the next tokens go there)."""
        llm = self.llm
        llama_cpp.llama_memory_seq_rm(llama_cpp.llama_get_memory(self.ctx), 0, n_tokens, -1)
        llm.n_tokens = min(llm.n_tokens, n_tokens)
        llm._requires_eval = True

    def evaluate(self, tokens: Sequence[int], progress: EvalProgress | None = None) -> None:
        """Evaluate `tokens` after the cached positions, n_batch at a time, logits for the last
        one only. DecodeError if llama.cpp refuses a batch (the batches before it stay)."""
        llm, b, n_batch = self.llm, self._batch, self.n_batch
        ids = np.asarray(tokens, dtype=np.int32)
        total = len(ids)
        if progress is not None:
            progress.update(0, total)
        for start in range(0, total, n_batch):
            n = min(n_batch, total - start)
            past = int(llm.n_tokens)
            self._tokens[:n] = ids[start : start + n]
            self._pos[:n] = np.arange(past, past + n, dtype=np.int32)
            self._logits[:n] = 0
            if start + n == total:
                self._logits[n - 1] = 1
            b.n_tokens = n
            status = llama_cpp.llama_decode(self.ctx, b)
            if status != 0:
                raise DecodeError(status)
            llm.input_ids[past : past + n] = ids[start : start + n]
            llm.n_tokens = past + n
            llm.evaluated_tokens += n
            llm._requires_eval = False
            if progress is not None:
                progress.update(start + n, total)

    def step(self, token: int) -> None:
        """Evaluate one generated token (the decoding step: logits for it only)."""
        llm, b = self.llm, self._batch
        past = llm.n_tokens
        b.token[0] = token
        b.pos[0] = past
        b.logits[0] = 1
        b.n_tokens = 1
        status = llama_cpp.llama_decode(self.ctx, b)
        if status != 0:
            raise DecodeError(status)
        llm.input_ids[past] = token
        llm.n_tokens = past + 1
        llm.evaluated_tokens += 1


def decoder_for(llm: CountingLlama) -> Decoder:
    """The model's decoder, made on first use and kept with it (its batch is reused)."""
    decoder: Decoder | None = llm.__dict__.get("decoder")
    if decoder is None:
        decoder = llm.__dict__["decoder"] = Decoder(llm)
    return decoder


def held_prefix(llm: CountingLlama, tokens: Sequence[int]) -> int:
    """How many of `tokens`, from the first, the KV cache holds now (numpy: a 64K-token history
    is compared before every reply)."""
    n = min(int(llm.n_tokens), len(tokens))
    cached = llm.input_ids[:n]
    differ = np.flatnonzero(cached != np.asarray(tokens[:n], dtype=cached.dtype))
    return int(differ[0]) if differ.size else n


class SamplerChain:
    """llama.cpp's sampler chain for one reply's settings; sample() also feeds its history."""

    def __init__(self, sampling: Sampling, seed: int, n_vocab: int) -> None:
        s = sampling
        params = llama_cpp.llama_sampler_chain_default_params()
        params.no_perf = True
        chain = llama_cpp.llama_sampler_chain_init(params)
        self.chain = chain
        self._free = weakref.finalize(self, llama_cpp.llama_sampler_free, chain)
        # The same samplers, in the same order, as llama-cpp-python's Llama.generate built, so
        # a seed gives the reply it gave; the ones that would change nothing are left out
        # (llama.cpp skips them anyway, after a call each).
        parts: list[Any] = []
        if s.repeat_penalty != 1.0:
            parts.append(
                llama_cpp.llama_sampler_init_penalties(
                    n_vocab, PENALTY_LAST_N, s.repeat_penalty, 0.0, 0.0
                )
            )
        if s.temperature < 0:
            parts.append(llama_cpp.llama_sampler_init_dist(seed))
        elif s.temperature == 0:
            parts.append(llama_cpp.llama_sampler_init_greedy())
        else:
            if s.top_k > 0:
                parts.append(llama_cpp.llama_sampler_init_top_k(s.top_k))
            if s.top_p < 1.0:
                parts.append(llama_cpp.llama_sampler_init_top_p(s.top_p, 1))
            if s.min_p > 0.0:
                parts.append(llama_cpp.llama_sampler_init_min_p(s.min_p, 1))
            parts.append(llama_cpp.llama_sampler_init_temp(s.temperature))
            parts.append(llama_cpp.llama_sampler_init_dist(seed))
        for part in parts:  # the chain owns them from here on
            llama_cpp.llama_sampler_chain_add(chain, part)

    def close(self) -> None:
        """Free the chain and its samplers now."""
        self._free()
