"""A chat session: the conversation on one engine; `send` starts a reply (chat/reply.py)."""

from __future__ import annotations

import threading
from collections.abc import Callable, Iterable, Sequence
from typing import Protocol

from wizardchat.chat.conversation import Conversation, Turn
from wizardchat.chat.reply import Reply, TokenStreamLike, reply_text
from wizardchat.chat.session_file import SavedTurn


class PromptProgress(Protocol):
    """Told how far the engine got evaluating a prompt, and when the reply comes next."""

    def update(self, done: int, total: int) -> None: ...

    def end(self) -> None: ...


class ChatEngine(Protocol):
    """What the session needs from a loaded model."""

    bos: int
    eos: int
    n_ctx: int
    add_bos: bool
    eos_text: str
    space_prefix: bool
    model_name: str

    def tokenize(self, text: str) -> list[int]: ...

    def pieces(self, tokens: Sequence[int]) -> list[str]: ...

    def stream(
        self,
        prompt: Sequence[int],
        max_tokens: int,
        cancel: threading.Event,
        abort_prompt: bool = False,
        progress: PromptProgress | None = None,
        text: str | None = None,  # the prompt as the Vicuna string: what a text API is sent
    ) -> TokenStreamLike: ...


def eviction_note(evicted: int, in_view: int, total: int) -> str:
    """What the user is told when the oldest turns leave the model's context."""
    s = "s" if evicted > 1 else ""
    return (
        f"context full: the model no longer sees the {evicted} oldest turn{s} "
        f"({in_view} of {total} still in its context; the saved conversation keeps all {total})"
    )


class ChatSession:
    """A WizardLM-2 conversation on one engine; `send` returns the reply as it streams."""

    def __init__(
        self,
        engine: ChatEngine,
        *,
        system: str,
        max_tokens: int = -1,
        notify: Callable[[str], None] = lambda message: None,
        show_prompt: Callable[[str, int], None] | None = None,
    ) -> None:
        self.engine = engine
        self.max_tokens = max_tokens
        self.notify = notify
        self.show_prompt = show_prompt
        self.cancel_event = threading.Event()
        # Set by callers whose Ctrl-C only calls cancel(): then it stops a prompt's evaluation too.
        self.abort_prompt = False
        # Shows the prompt's evaluation to the user (on a terminal); None shows nothing.
        self.progress: PromptProgress | None = None
        self.conversation = self._new_conversation(system)

    def _new_conversation(self, system: str) -> Conversation:
        return Conversation.on(self.engine, system)

    def reset(self, system: str | None = None) -> None:
        """Start a new conversation, with a new system prompt if given."""
        self.conversation = self._new_conversation(
            self.conversation.system if system is None else system
        )

    def restore(self, system: str, turns: Iterable[SavedTurn]) -> None:
        """Replace the conversation with saved turns.

        Each reply keeps the ids the model generated when they decode to its text with this
        model (then the history is token for token the one the model saw, and a saved KV state
        of it matches); else its text is tokenized again. Unless a KV state is restored
        (chat/kv_cache.py), the next `send` evaluates the whole history once.
        """
        conv = self._new_conversation(system)
        for saved in turns:
            turn = conv.new_turn(saved.user)
            turn.reply = saved.reply
            turn.reply_tokens = self._reply_tokens(conv, saved)
            turn.interrupted = saved.interrupted
            conv.close(turn)
        self.conversation = conv

    def _reply_tokens(self, conv: Conversation, saved: SavedTurn) -> list[int]:
        ids = saved.reply_tokens
        if ids is not None:
            try:
                if reply_text(self.engine.pieces(ids)) == saved.reply:
                    return list(ids)
            except ValueError:  # ids of another vocabulary
                pass
        return conv.reply_ids(saved.reply)

    def drop_last(self) -> Turn | None:
        """Remove the last exchange from the history and return it (None when empty)."""
        return self.conversation.drop_last()

    def cancel(self) -> None:
        """Stop the reply being generated after the current token (safe from other threads)."""
        self.cancel_event.set()

    def send(self, text: str) -> Reply:
        """The reply to `text`: iterate it for the text as it streams; the turn is recorded
        however the reply ends. A message that cannot fit raises ContextError here."""
        conv = self.conversation
        turn = conv.new_turn(text)
        evicted = conv.make_room(turn, self.max_tokens)
        if evicted:
            self.notify(eviction_note(evicted, len(conv.window()), len(conv.turns)))
        prompt = conv.prompt(turn)
        text = conv.text(turn)
        if self.show_prompt:
            self.show_prompt(text, len(prompt))
        self.cancel_event.clear()
        budget = conv.max_reply_tokens(turn, self.max_tokens)
        stream = self.engine.stream(
            prompt,
            budget,
            self.cancel_event,
            abort_prompt=self.abort_prompt,
            progress=self.progress,
            text=text,
        )
        return Reply(
            turn,
            stream,
            record=conv.close,
            # A "length" finish is the context's doing (not --max-tokens') when it set the budget.
            context_limited=self.max_tokens <= 0 or budget < self.max_tokens,
        )
