"""Keeping one conversation saved under one name, after every reply (REPL and batch mode alike)."""

from __future__ import annotations

import shlex
import time
from pathlib import Path
from typing import TYPE_CHECKING

from wizardchat.chat.conversation import Conversation
from wizardchat.chat.store import SavedSession, SavedTurn, SessionStore, auto_name

if TYPE_CHECKING:
    from wizardchat.chat.kv_cache import KvCache


def _model_ids(ids: list[int]) -> list[int] | None:
    """A reply's ids as saved: None for the placeholders of a text API (--endpoint: the server
    gave text, not ids; endpoint/engine.TextIds), which no model could read back."""
    return list(ids) if all(0 <= t < 2**31 for t in ids) else None


def saved_session(
    conversation: Conversation, name: str, model: str, created: float, model_ref: str = ""
) -> SavedSession:
    """The whole transcript as it is saved: every turn, evicted or not."""
    return SavedSession(
        name=name,
        system=conversation.system,
        turns=[
            SavedTurn(t.user, t.reply, t.interrupted, _model_ids(t.reply_tokens))
            for t in conversation.turns
        ],
        model=model,
        created=created,
        model_ref=model_ref,
    )


def continue_command(store: SessionStore, name: str, model_ref: str) -> str:
    """A command that continues session `name` with the model `model_ref`.

    `--resume` only while `name` is the newest session (else `--session NAME`), and `-m` only
    when the file does not name that model itself (a file of an older version, or one opened
    with another -m and not saved since).
    """
    how = "--resume" if store.last() == name else f"--session {name}"
    on_file = store.summary(store.path(name)).model_ref
    model = "" if on_file == model_ref or not model_ref else f" -m {shlex.quote(model_ref)}"
    return f"wizardchat run {how}{model}"


def free_name(store: SessionStore) -> str:
    """An automatic name (chat-YYYYMMDD-HHMMSS) that no saved session has yet, now claimed."""
    return store.claim_free_name(auto_name()).name


class Recording:
    """Saves a conversation as session `name` in `store` each time `save` is called."""

    def __init__(
        self,
        store: SessionStore,
        name: str,
        model: str,
        created: float | None = None,
        model_ref: str = "",
        kv: KvCache | None = None,
    ) -> None:
        self.store = store
        self.name = name
        self.model = model
        self.model_ref = model_ref
        self.created = created or time.time()
        self.kv = kv  # the KV state saved with it (None: not kept)
        # Held until exit: no other wizardchat may write this session meanwhile (exit 7 there).
        self.claim = store.claim(name)

    def save(self, conversation: Conversation, *, leaving: bool = False) -> Path | None:
        """Write the transcript (atomically), and the KV state when the policy says so
        (chat/kv_cache.py; always when `leaving`); nothing while the conversation has no turn."""
        if not conversation.turns and not self.store.exists(self.name):
            return None
        path = self.store.save(
            saved_session(conversation, self.name, self.model, self.created, self.model_ref)
        )
        if self.kv is not None:
            self.kv.checkpoint(self.name, conversation.tokens(), leaving=leaving)
        return path
