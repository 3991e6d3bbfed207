"""The token stream of one reply: prefix reuse, incremental detokenizing, stop, cancel, timing."""

from __future__ import annotations

import codecs
import ctypes
import threading
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field

import llama_cpp

from wizardchat.engine.model import CountingLlama, EvalProgress
from wizardchat.engine.reply_data import GenerationStats, Sampling

__all__ = ["GenerationStats", "PieceDecoder", "PromptAbort", "Sampling", "TokenStream"]


class PieceDecoder:
    """Turns token ids into text one token at a time: each token decoded once, O(1) per token.

    Byte-fallback tokens can split one UTF-8 character over several tokens; the incremental
    decoder carries the incomplete bytes to the next piece instead of emitting U+FFFD.
    """

    def __init__(self, llm: CountingLlama) -> None:
        self._vocab = llm._model.vocab
        self._buf = ctypes.create_string_buffer(256)
        self._utf8 = codecs.getincrementaldecoder("utf-8")(errors="replace")

    def piece_bytes(self, token: int) -> bytes:
        """The raw bytes of one token (special tokens give b"")."""
        n = llama_cpp.llama_token_to_piece(self._vocab, token, self._buf, len(self._buf), 0, False)
        if n < 0:  # buffer too small: grow once and retry
            self._buf = ctypes.create_string_buffer(-n)
            n = llama_cpp.llama_token_to_piece(self._vocab, token, self._buf, -n, 0, False)
        return self._buf.raw[:n]

    def decode(self, token: int) -> str:
        """Text completed by this token (may be '' while a character is still incomplete)."""
        return self._utf8.decode(self.piece_bytes(token))


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

    def __init__(self, llm: CountingLlama, cancel: threading.Event) -> None:
        self._ctx = llm._ctx.ctx
        self._callback = llama_cpp.ggml_abort_callback(lambda _data: cancel.is_set())
        llama_cpp.llama_set_abort_callback(self._ctx, self._callback, None)
        self.active = True

    def remove(self) -> None:
        """Back to no callback (a NULL function pointer)."""
        if self.active:
            llama_cpp.llama_set_abort_callback(self._ctx, llama_cpp.ggml_abort_callback(), None)
            self.active = False


@dataclass
class TokenStream:
    """Generates one reply's tokens for a full prompt; iterate it for (token id, text) pairs."""

    llm: CountingLlama
    prompt: Sequence[int]
    sampling: Sampling
    max_tokens: int
    cancel: threading.Event = field(default_factory=threading.Event)
    abort_prompt: bool = False  # let `cancel` stop the prompt's evaluation too (PromptAbort)
    progress: EvalProgress | None = None  # told after each batch of the prompt, and at its end
    stats: GenerationStats = field(default_factory=GenerationStats)

    def __iter__(self) -> Iterator[tuple[int, str]]:
        llm, s, stats = self.llm, self.sampling, self.stats
        stats.prompt_tokens = len(self.prompt)
        decoder = PieceDecoder(llm)
        vocab = llm._model.vocab
        evaluated_before = llm.evaluated_tokens
        start = time.perf_counter()
        first_at = start
        stats.finish = "length"
        # Llama.generate keeps the longest common prefix of the KV cache and evaluates the rest.
        tokens = llm.generate(
            self.prompt,
            top_k=s.top_k,
            top_p=s.top_p,
            min_p=s.min_p,
            temp=s.temperature,
            repeat_penalty=s.repeat_penalty,
            reset=True,
        )
        abort = PromptAbort(llm, self.cancel) if self.abort_prompt else None
        llm.eval_progress = self.progress
        try:
            for token in tokens:
                now = time.perf_counter()
                if abort is not None:  # the prompt is evaluated: no callback per generated token
                    abort.remove()
                    abort = None
                if llm.eval_progress is not None:
                    self._prompt_over()
                if stats.completion_tokens == 0:
                    first_at = now
                    stats.prompt_seconds = now - start
                    stats.evaluated_tokens = llm.evaluated_tokens - evaluated_before
                stats.decode_seconds = now - first_at
                if llama_cpp.llama_vocab_is_eog(vocab, token):
                    stats.finish = "eos"
                    break
                stats.completion_tokens += 1
                yield token, decoder.decode(token)
                if self.cancel.is_set():
                    stats.finish = "interrupted"
                    break
                if stats.completion_tokens >= self.max_tokens:
                    break
        except RuntimeError:
            if not (abort is not None and self.cancel.is_set()):
                raise
            # llama_decode returned 2: aborted. llama.cpp dropped the unfinished batch from the
            # KV cache, and Llama counts only the batches that finished, so the two agree.
            stats.finish = "interrupted"
        except (KeyboardInterrupt, GeneratorExit):
            # Ctrl-C inside llama.cpp's eval, or the consumer stopped reading: either way the
            # reply ends here, and the KV cache stays valid for the tokens it holds.
            stats.finish = "interrupted"
            raise
        finally:
            if abort is not None:
                abort.remove()
            if llm.eval_progress is not None:
                self._prompt_over()
            tokens.close()

    def _prompt_over(self) -> None:
        """No more progress reports (decoding would report each token): tell the listener."""
        self.llm.eval_progress = None
        if self.progress is not None:
            self.progress.end()
