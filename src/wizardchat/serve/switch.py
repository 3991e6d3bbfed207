"""Conversations that take turns on one server keep their KV caches: copies in RAM, switched in.

llama.cpp keeps one cache, and a prompt that shares little with it evaluates everything: two
clients alternating would each re-evaluate their whole history at every turn. So before a
prompt replaces a cache worth keeping, the cache is copied into RAM; and a prompt that a kept
copy holds more of than the live cache does gets that copy restored first, so only its new
tokens are evaluated. The copies live under a byte budget and a count, least recently used
first out.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Sequence
from typing import Protocol

from wizardchat.engine.llama_engine import KvSnapshot
from wizardchat.errors import KvStateError

WORTH_KEEPING = 64  # tokens: less is re-evaluated faster than it is copied


class SwitchEngine(Protocol):
    """What switching needs of the loaded model (LlamaEngine)."""

    @property
    def kv_cached(self) -> int: ...

    def kv_held(self, tokens: Sequence[int]) -> int: ...

    def kv_snapshot(self) -> KvSnapshot: ...

    def kv_restore_snapshot(self, snap: KvSnapshot) -> None: ...


def _common(a: Sequence[int], b: Sequence[int]) -> int:
    n = min(len(a), len(b))
    i = 0
    while i < n and a[i] == b[i]:
        i += 1
    return i


class ConversationCaches:
    """The RAM copies of recent conversations' caches, newest last."""

    def __init__(
        self, max_bytes: int, max_count: int = 4, say: Callable[[str], None] | None = None
    ) -> None:
        self.max_bytes = max_bytes
        self.max_count = max_count
        self.say = say
        self.kept: list[KvSnapshot] = []
        self.switches = 0  # restores done, for status

    @property
    def nbytes(self) -> int:
        """RAM the copies take."""
        return sum(s.nbytes for s in self.kept)

    def prepare(self, engine: SwitchEngine, prompt: Sequence[int]) -> None:
        """Before `prompt` is evaluated: keep the live cache if the prompt would throw it away,
        and bring back the kept copy that holds the most of the prompt when that beats it."""
        if self.max_bytes <= 0:
            return
        held = engine.kv_held(prompt)
        best, best_n = None, held
        for snap in self.kept:
            n = _common(snap.tokens, prompt)
            if n > best_n:
                best, best_n = snap, n
        switching = best is not None and best_n - held >= WORTH_KEEPING
        losing = engine.kv_cached - held >= WORTH_KEEPING  # the prompt diverges from the cache
        if not switching and not losing:
            return
        try:
            if losing:
                self._keep(engine.kv_snapshot())
            if switching and best is not None:
                engine.kv_restore_snapshot(best)
                self.kept.remove(best)
                self.kept.append(best)  # the most recently used
                self.switches += 1
        except (KvStateError, MemoryError) as e:  # evaluating the prompt is the fallback
            if self.say is not None:
                self.say(f"conversation switch without its cache copy: {e}")

    def before_replace(self, engine: SwitchEngine) -> None:
        """The live cache is about to be replaced whole (a saved state loaded): keep a copy."""
        if self.max_bytes > 0 and engine.kv_cached >= WORTH_KEEPING:
            with contextlib.suppress(KvStateError, MemoryError):
                self._keep(engine.kv_snapshot())

    def _keep(self, snap: KvSnapshot) -> None:
        # A copy that the new one extends (the same conversation, further on) is replaced.
        self.kept = [s for s in self.kept if _common(s.tokens, snap.tokens) < len(s.tokens)]
        if snap.nbytes > self.max_bytes:
            return
        self.kept.append(snap)
        while len(self.kept) > self.max_count or self.nbytes > self.max_bytes:
            self.kept.pop(0)

    def clear(self) -> None:
        """Forget every copy (the model is unloaded)."""
        self.kept.clear()
