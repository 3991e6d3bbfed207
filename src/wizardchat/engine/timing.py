"""Timing token evaluation on a loaded model, llama-bench's way, for `wizardchat bench`.

The tokens go through the decoder replies use (engine/decoder.py), so the figures include the
per-call cost wizardchat's replies pay. Here because it reaches into llama-cpp-python's context
and vocab.
"""

from __future__ import annotations

import random
import time

from wizardchat.engine.context import ModelContext
from wizardchat.engine.decoder import decoder_for
from wizardchat.engine.llama_lib import lib
from wizardchat.engine.vocab import adds_bos


class TokenTimer:
    """Evaluates token ids on the engine's context and times them, llama-bench's way."""

    def __init__(self, llm: ModelContext, seed: int) -> None:
        self.llm = llm
        self.decoder = decoder_for(llm)
        self.n_vocab = llm.n_vocab
        self.add_bos = adds_bos(llm)
        self.bos = int(llm.token_bos())
        self.rng = random.Random(seed)

    def tokens(self, n: int) -> list[int]:
        """BOS (when the model adds one) then random ids, like llama-bench's test_prompt."""
        ids = [self.rng.randrange(self.n_vocab) for _ in range(n)]
        if ids and self.add_bos:
            ids[0] = self.bos
        return ids

    def sync(self) -> None:
        """Wait for the backend to finish (GPU backends return from decode early)."""
        lib.llama_synchronize(self.llm.ctx)

    def clear(self) -> None:
        """Empty the KV cache and Llama's record of it: the next eval starts at position 0."""
        self.llm.tokens = []
        lib.llama_memory_clear(lib.llama_get_memory(self.llm.ctx), True)

    def cut(self, n: int) -> None:
        """Keep only the first `n` positions of the KV cache."""
        self.decoder.keep(n)

    def prompt(self, ids: list[int]) -> float:
        """Seconds to evaluate `ids` in batches of n_batch."""
        start = time.perf_counter()
        self.decoder.evaluate(ids)
        self.sync()
        return time.perf_counter() - start

    def generate(self, ids: list[int]) -> float:
        """Seconds to evaluate `ids` one token at a time, as decoding does."""
        step, sync = self.decoder.step, self.sync
        start = time.perf_counter()
        for token in ids:
            step(token)
            sync()
        return time.perf_counter() - start
