"""The token stream of one reply: prefix reuse, incremental detokenizing, stop, cancel, timing."""

from __future__ import annotations

import codecs
import ctypes
import threading
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field

from wizardchat.engine.context import ModelContext
from wizardchat.engine.decoder import (
    DECODE_ABORTED,
    DecodeError,
    Decoder,
    SamplerChain,
    decoder_for,
    held_prefix,
)
from wizardchat.engine.llama_lib import lib
from wizardchat.engine.model import EvalProgress
from wizardchat.engine.reply_data import GenerationStats, Sampling

__all__ = ["GenerationStats", "PieceDecoder", "PromptAbort", "Sampling", "TokenStream"]


class PieceDecoder:
    """Turns token ids into text one token at a time: each token decoded once, O(1) per token.

    Byte-fallback tokens can split one UTF-8 character over several tokens; the incremental
    decoder carries the incomplete bytes to the next piece instead of emitting U+FFFD.
    """

    def __init__(self, llm: ModelContext) -> None:
        self._vocab = llm.vocab
        self._size = 256
        self._buf = ctypes.create_string_buffer(self._size)
        self._utf8 = codecs.getincrementaldecoder("utf-8")(errors="replace").decode

    def piece_bytes(self, token: int) -> bytes:
        """The raw bytes of one token (special tokens give b"")."""
        n = lib.llama_token_to_piece(self._vocab, token, self._buf, self._size, 0, False)
        if n < 0:  # buffer too small: grow once and retry
            self._size = -n
            self._buf = ctypes.create_string_buffer(self._size)
            n = lib.llama_token_to_piece(self._vocab, token, self._buf, self._size, 0, False)
        return ctypes.string_at(self._buf, n)  # only the piece, not the whole buffer

    def decode(self, token: int) -> str:
        """Text completed by this token (may be '' while a character is still incomplete)."""
        return self._utf8(self.piece_bytes(token))


class PromptAbort:
    """Lets `cancel` stop llama.cpp in the middle of evaluating a prompt.

    A long prompt (a pasted file, a resumed conversation) can keep llama_decode busy for minutes
    on a CPU, and Python runs no signal handler until it returns. llama.cpp's abort callback is
    called by the CPU backend between graph nodes on the calling thread; the Python SIGINT
    handler runs there too, sets `cancel`, and the callback's True makes llama_decode return 2.
    It is installed only while the prompt is evaluated: per token it would cost more than the
    token itself on a small model. Only for callers whose SIGINT handler does not raise (an
    exception cannot leave a ctypes callback and would be lost).
    """

    def __init__(self, llm: ModelContext, cancel: threading.Event) -> None:
        self._ctx = llm.ctx
        self._callback = lib.ggml_abort_callback(lambda _data: cancel.is_set())
        lib.llama_set_abort_callback(self._ctx, self._callback, None)
        self.active = True

    def remove(self) -> None:
        """Back to no callback (a NULL function pointer)."""
        if self.active:
            lib.llama_set_abort_callback(self._ctx, lib.ggml_abort_callback(), None)
            self.active = False


@dataclass
class TokenStream:
    """Generates one reply's tokens for a full prompt; iterate it for (token id, text) pairs."""

    llm: ModelContext
    prompt: Sequence[int]
    sampling: Sampling
    max_tokens: int
    cancel: threading.Event = field(default_factory=threading.Event)
    abort_prompt: bool = False  # let `cancel` stop the prompt's evaluation too (PromptAbort)
    progress: EvalProgress | None = None  # told after each batch of the prompt, and at its end
    stats: GenerationStats = field(default_factory=GenerationStats)

    def __iter__(self) -> Iterator[tuple[int, str]]:
        llm, stats, cancel = self.llm, self.stats, self.cancel
        if not self.prompt:
            raise ValueError("empty prompt")
        decoder = decoder_for(llm)
        stats.prompt_tokens = len(self.prompt)
        stats.finish = "length"
        evaluated_before = llm.evaluated_tokens
        start = time.perf_counter()
        # Keep the longest prefix the KV cache already holds; the last prompt token is always
        # evaluated, since sampling needs its logits.
        reuse = min(held_prefix(llm, self.prompt), len(self.prompt) - 1)
        decoder.keep(reuse)
        chain = SamplerChain(self.sampling, llm.seed, llm.n_vocab)
        try:
            if not self._evaluate_prompt(decoder, self.prompt[reuse:]):
                return
            stats.evaluated_tokens = llm.evaluated_tokens - evaluated_before
            # The per-token loop: sample (which also feeds the sampler's history), end check,
            # piece, decode. Everything else stays out of it.
            sample, is_eog = lib.llama_sampler_sample, lib.llama_vocab_is_eog
            step = decoder.step
            sampler, ctx, vocab = chain.chain, decoder.ctx, llm.vocab
            pieces = PieceDecoder(llm)
            clock, max_tokens = time.perf_counter, self.max_tokens
            first_at = 0.0
            while True:
                token = sample(sampler, ctx, -1)
                now = clock()
                if first_at == 0.0:
                    first_at = now
                    stats.prompt_seconds = now - start
                stats.decode_seconds = now - first_at
                if is_eog(vocab, token):
                    stats.finish = "eos"
                    return
                stats.completion_tokens += 1
                yield token, pieces.decode(token)
                if cancel.is_set():
                    stats.finish = "interrupted"
                    return
                if stats.completion_tokens >= max_tokens:
                    return
                step(token)
        except (KeyboardInterrupt, GeneratorExit):
            # Ctrl-C inside llama.cpp's decode, or the consumer stopped reading: either way the
            # reply ends here, and the KV cache stays valid for the tokens it holds.
            stats.finish = "interrupted"
            raise
        finally:
            chain.close()

    def _evaluate_prompt(self, decoder: Decoder, tokens: Sequence[int]) -> bool:
        """Evaluate the prompt's uncached tokens; False when `cancel` aborted it."""
        abort = PromptAbort(self.llm, self.cancel) if self.abort_prompt else None
        try:
            decoder.evaluate(tokens, self.progress)
        except DecodeError as e:
            if not (e.status == DECODE_ABORTED and abort is not None and self.cancel.is_set()):
                raise
            # llama.cpp dropped the unfinished batch from the KV cache, and the decoder
            # recorded only the batches that finished, so the two agree.
            self.stats.finish = "interrupted"
            return False
        finally:
            if abort is not None:  # no callback per generated token
                abort.remove()
            if self.progress is not None:
                self.progress.end()
        return True
