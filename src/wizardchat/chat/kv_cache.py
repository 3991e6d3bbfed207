"""A session's KV cache kept on disk with it: restored instead of re-evaluated, saved when it pays.

When to write. A state is rewritten whole (llama.cpp has no append), about 224 KiB a token for
WizardLM-2 8x22B at f16: 3.5 GiB for 16K tokens, seconds even on an NVMe disk. Writing after
every reply would stall the chat for that long each time. So after a reply the state is written
only when the cache grew by SAVE_EVERY_TOKENS since the last write; and always, whatever it grew
by, when the conversation is left: at exit (Ctrl-D, /exit, the end of piped input), on SIGTERM or
SIGHUP, on /save, and before /load, /new or /system switch to another conversation. A crash
then costs at most SAVE_EVERY_TOKENS re-evaluated tokens on top of what the state holds, since a
state that holds a prefix of the conversation is restored and only the rest is evaluated.

What a state may claim. Its record names exactly the tokens its file holds. After /undo, /regen
or eviction the conversation no longer starts with them: at the next save point the stale state
is removed (or replaced), and a restore checks the tokens anyway, so it is never used for a
conversation it does not match.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any, Protocol

from wizardchat.chat.kv_store import KvRecord, KvStore, tokens_digest
from wizardchat.errors import KvStateError

SAVE_EVERY_TOKENS = 2048


class KvEngine(Protocol):
    """What saving and restoring a KV state needs from the loaded model (LlamaEngine)."""

    def kv_identity(self) -> dict[str, Any]: ...

    def kv_held(self, tokens: Sequence[int]) -> int: ...

    def kv_keep(self, n_tokens: int) -> int: ...

    def kv_save(self, path: Path) -> list[int]: ...

    def kv_load(self, path: Path) -> list[int]: ...


_IDENTITY_WORDS = {
    "model": "it was saved with another model file",
    "n_ctx": "it was saved with a {saved}-token context (this one has {now}; -c {saved} fits it)",
    "type_k": "it was saved with K cache type {saved} (this one is {now})",
    "type_v": "it was saved with V cache type {saved} (this one is {now})",
    "flash_attn": "it was saved with flash attention {saved_onoff} (now {now_onoff})",
    "llama_cpp_python": "it was saved by llama-cpp-python {saved} (this is {now})",
}


def identity_mismatch(saved: dict[str, Any], now: dict[str, Any]) -> str | None:
    """Why a state made with `saved` is not valid here, in words; None when it is."""
    for key, value in now.items():
        if saved.get(key) != value:
            words = _IDENTITY_WORDS.get(key, "it was saved with another " + key)
            return words.format(
                saved=saved.get(key),
                now=value,
                saved_onoff="on" if saved.get(key) else "off",
                now_onoff="on" if value else "off",
            )
    if set(saved) != set(now):
        return "it was saved by another version of wizardchat"
    return None


class KvCache:
    """Restores and saves the KV state of whichever session is open, in one KvStore."""

    def __init__(
        self,
        engine: KvEngine,
        store: KvStore,
        notify: Callable[[str], None],
        save_every: int = SAVE_EVERY_TOKENS,
    ) -> None:
        self.engine = engine
        self.store = store
        self.notify = notify
        self.save_every = save_every
        # What the store holds for each session this process saved or restored: its token count
        # and the hash of those tokens.
        self._saved: dict[str, tuple[int, str]] = {}
        self._said: set[str] = set()  # save failures already told (not once per reply)

    def restore(self, name: str, tokens: Sequence[int]) -> int:
        """Load `name`'s saved state if it belongs to this model, context and these tokens (it
        may hold a prefix of them); say what happened. Returns the tokens restored (0: the
        history is evaluated as before)."""
        self._saved.pop(name, None)
        try:
            record = self.store.read(name)
            if record is None:
                return 0
            n = self._check(record, tokens)
            start = time.perf_counter()
            loaded = self.engine.kv_load(self.store.kv_path(name))
            if loaded != list(tokens[:n]):
                self.engine.kv_keep(0)
                raise KvStateError("its state file holds other tokens than its record says")
        except KvStateError as e:
            self.notify(f"saved KV state of '{name}' not used: {e}; evaluating the history")
            return 0
        seconds = time.perf_counter() - start
        self._saved[name] = (n, record.tokens_sha256)
        self.store.touch(name)
        rest = len(tokens) - n  # the last reply token and EOS are never in a cache: say more
        more = f" ({rest:,} more to evaluate)" if rest > 8 else ""
        self.notify(f"restored {n:,} tokens in {seconds:.1f} s{more}")
        return n

    def _check(self, record: KvRecord, tokens: Sequence[int]) -> int:
        try:
            identity = self.engine.kv_identity()
        except OSError as e:
            raise KvStateError(f"the model file cannot be read ({e.strerror or e})") from None
        why = identity_mismatch(record.identity, identity)
        if why:
            raise KvStateError(why)
        n = record.n_tokens
        if n == 0 or n > len(tokens) or tokens_digest(tokens[:n]) != record.tokens_sha256:
            raise KvStateError("it holds other tokens than this conversation (edited since?)")
        return n

    def checkpoint(self, name: str, tokens: Sequence[int], *, leaving: bool = False) -> None:
        """A save point of session `name`, whose model-visible history is `tokens`.

        A saved state that no longer starts the conversation is removed. The cache is written
        when it holds SAVE_EVERY_TOKENS more than the saved state, or, `leaving` the
        conversation (exit, a signal, /save, a switch), when it holds anything more.
        """
        if not self.store.enabled:
            return
        saved = self._saved.get(name)
        if saved is not None:
            n, digest = saved
            if n > len(tokens) or tokens_digest(tokens[:n]) != digest:
                self.store.remove(name)  # never left claiming tokens the conversation lost
                del self._saved[name]
                saved = None
        held = self.engine.kv_held(tokens)
        done = saved[0] if saved is not None else 0
        grown = held - done
        if held == 0 or grown <= 0 or (not leaving and grown < self.save_every):
            return
        self._write(name, held)

    def _write(self, name: str, held: int) -> None:
        try:
            identity = self.engine.kv_identity()
            size = self.engine.kv_keep(held)
            record = self.store.write(name, size, identity, self.engine.kv_save)
        except (OSError, KvStateError) as e:
            why = e.strerror if isinstance(e, OSError) and e.strerror else str(e)
            self._tell(f"KV state of '{name}' not saved: {why}")
            if not self.store.record_path(name).exists():  # else the earlier state is kept
                self._saved.pop(name, None)
            return
        self._saved[name] = (record.n_tokens, record.tokens_sha256)

    def _tell(self, message: str) -> None:
        """Say a save failure once per process: after every reply it would drown the chat."""
        if message not in self._said:
            self._said.add(message)
            self.notify(message)

    def rename(self, old: str, new: str) -> None:
        """Session `old` is now called `new` (/save NAME): its state goes with it."""
        self.store.rename(old, new)
        if old in self._saved:
            self._saved[new] = self._saved.pop(old)

    def remove(self, name: str) -> None:
        """Session `name` is deleted: so is its state."""
        self.store.remove(name)
        self._saved.pop(name, None)
