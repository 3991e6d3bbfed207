"""Keeping one conversation saved under one name, after every reply (REPL and batch mode alike)."""

from __future__ import annotations

import time
from pathlib import Path

from wizardchat.conversation import Conversation
from wizardchat.store import SavedSession, SavedTurn, SessionStore, auto_name


def saved_session(
    conversation: Conversation, name: str, model: str, created: float
) -> SavedSession:
    """The whole transcript as it is saved: every turn, evicted or not."""
    return SavedSession(
        name=name,
        system=conversation.system,
        turns=[SavedTurn(t.user, t.reply, t.interrupted) for t in conversation.turns],
        model=model,
        created=created,
    )


def free_name(store: SessionStore) -> str:
    """An automatic name (chat-YYYYMMDD-HHMMSS) that no saved session has yet, now claimed."""
    return store.claim_free_name(auto_name()).name


class Recording:
    """Saves a conversation as session `name` in `store` each time `save` is called."""

    def __init__(
        self, store: SessionStore, name: str, model: str, created: float | None = None
    ) -> None:
        self.store = store
        self.name = name
        self.model = model
        self.created = created or time.time()
        # Held until exit: no other wizardchat may write this session meanwhile (exit 7 there).
        self.claim = store.claim(name)

    def save(self, conversation: Conversation) -> Path | None:
        """Write the transcript (atomically); nothing while the conversation has no turn."""
        if not conversation.turns and not self.store.exists(self.name):
            return None
        return self.store.save(saved_session(conversation, self.name, self.model, self.created))
