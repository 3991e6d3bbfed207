"""A loaded model and its llama.cpp context, through the bindings alone (engine/llama_lib.py).

This is what llama-cpp-python's `Llama` did for wizardchat, and no more: the model, the context,
the vocabulary, the tokenizer, and the record of which token ids the KV cache holds. No numpy
arrays sized by the context and the vocabulary, no chat templates, no Python per token.
"""

from __future__ import annotations

import ctypes
import weakref
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

from wizardchat.engine.llama_lib import lib

if TYPE_CHECKING:
    from wizardchat.engine.decoder import Decoder


def _free(model: Any, ctx: Any) -> None:
    lib.llama_free(ctx)  # the context first: it refers to the model
    lib.llama_model_free(model)


class ModelContext:
    """A model, its context (sequence 0 holds the conversation) and what its KV cache holds."""

    def __init__(self, model: Any, ctx: Any, *, n_ctx: int, n_batch: int, seed: int) -> None:
        self.model = model
        self.ctx = ctx
        self.vocab = lib.llama_model_get_vocab(model)
        self.n_ctx = n_ctx  # the context wizardchat budgets (llama.cpp may pad its own)
        self.n_batch = n_batch
        self.n_vocab = int(lib.llama_vocab_n_tokens(self.vocab))
        # The token ids of the cached positions, in order: what the decoder compares a new
        # prompt against, and what a saved KV state records. Kept true by engine/decoder.py
        # and engine/kv_state.py.
        self.tokens: list[int] = []
        self.evaluated_tokens = 0  # tokens llama.cpp evaluated, for the prefix-reuse figures
        self.seed = seed  # the sampler's seed for the next replies (LLAMA_DEFAULT_SEED: random)
        self.decoder: Decoder | None = None  # made on first use (engine/decoder.py)
        self._free = weakref.finalize(self, _free, model, ctx)

    @property
    def n_tokens(self) -> int:
        """How many positions the KV cache holds."""
        return len(self.tokens)

    def token_bos(self) -> int:
        """The beginning-of-sequence token id."""
        return int(lib.llama_vocab_bos(self.vocab))

    def token_eos(self) -> int:
        """The end-of-sequence token id."""
        return int(lib.llama_vocab_eos(self.vocab))

    def tokenize(self, text: bytes, add_bos: bool = True, special: bool = False) -> list[int]:
        """llama.cpp's tokenization of `text` (`add_bos`: as the vocabulary says to;
        `special`: special-token text becomes the special token)."""
        room = len(text) + 8  # at most a token per byte, plus BOS and a space prefix
        out = (lib.llama_token * room)()
        n = lib.llama_tokenize(self.vocab, text, len(text), out, room, add_bos, special)
        if n < 0:  # cannot happen with that room, but llama.cpp says how much it needs
            room = -n
            out = (lib.llama_token * room)()
            n = lib.llama_tokenize(self.vocab, text, len(text), out, room, add_bos, special)
        return list(out[:n])

    def piece(self, token: int, special: bool = False) -> bytes:
        """One token's bytes as llama.cpp writes it (`special`: control tokens as their text)."""
        size = 64
        while True:
            buf = ctypes.create_string_buffer(size)
            n = lib.llama_token_to_piece(self.vocab, token, buf, size, 0, special)
            if n >= 0:
                return buf.raw[:n]
            size = -n  # too small: llama.cpp says how much it needs

    def detokenize(self, tokens: Sequence[int], special: bool = False) -> bytes:
        """The bytes of `tokens` (`special`: control tokens written as their text), as
        llama-cpp-python's detokenize gives them: after a leading BOS, the space prefix of
        the first word is not text."""
        out = b"".join(self.piece(token, special) for token in tokens)
        if tokens and tokens[0] == self.token_bos() and out.startswith(b" "):
            return out[1:]
        return out

    def close(self) -> None:
        """Free the context and the model now rather than at interpreter exit."""
        if self.decoder is not None:
            self.decoder.close()
            self.decoder = None
        self._free()
