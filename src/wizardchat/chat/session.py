"""A chat session: send text, stream the reply's text, and record the turn when it ends."""

from __future__ import annotations

import re
import threading
import time
from collections.abc import Callable, Generator, Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from typing import Protocol

from wizardchat.chat.conversation import Conversation, Turn


class Stats(Protocol):
    """The engine's per-reply figures the session reports."""

    prompt_tokens: int
    evaluated_tokens: int
    completion_tokens: int
    finish: str

    def timings(self) -> dict[str, float]: ...


class TokenStreamLike(Protocol):
    """An iterable of (token id, text) pairs with stats filled in as it runs."""

    @property
    def stats(self) -> Stats: ...

    def __iter__(self) -> Iterator[tuple[int, str]]: ...


class PromptProgress(Protocol):
    """Told how far the engine got evaluating a prompt, and when the reply comes next."""

    def update(self, done: int, total: int) -> None: ...

    def end(self) -> None: ...


class ChatEngine(Protocol):
    """What the session needs from a loaded model."""

    bos: int
    eos: int
    n_ctx: int
    model_name: str

    def tokenize(self, text: str) -> list[int]: ...

    def stream(
        self,
        prompt: Sequence[int],
        max_tokens: int,
        cancel: threading.Event,
        abort_prompt: bool = False,
        progress: PromptProgress | None = None,
    ) -> TokenStreamLike: ...


# The model starting a user turn of its own: "USER:" at the start or after whitespace.
STOP = "USER:"
_STOP_RE = re.compile(r"(?<!\S)USER:")


class StopScanner:
    """Holds back text that may be the start of `USER:` until it is sure, and finds the stop.

    Whitespace at the end is held back too: when `USER:` follows, the newline before it is part
    of the model's turn-taking, not of the reply. The card's format is `...ok.</s>USER:`, so
    that whitespace is kept neither in the reply's text nor in its tokens.
    """

    def __init__(self) -> None:
        self.text = ""  # everything released so far
        self.pending: list[tuple[int, str]] = []
        self.stopped = False

    def push(self, token: int, piece: str) -> list[tuple[int, str]]:
        """Add one token; return the tokens now safe to show (none after the stop)."""
        self.pending.append((token, piece))
        held = "".join(p for _, p in self.pending)
        full = self.text + held
        base = len(self.text)
        m = _STOP_RE.search(full, max(0, base - 1))
        if m:
            self.stopped = True
            cut = _strip_trailing_space(full, m.start())
            return self._release_stop(cut - base, m.start() - base)
        return self._release_until(self._hold_from(full) - base)

    def flush(self) -> list[tuple[int, str]]:
        """Release everything held (the stream ended without a stop)."""
        return self._release_until(None)

    @staticmethod
    def _hold_from(full: str) -> int:
        """Where trailing whitespace and a possible unfinished `USER:` begin (or len(full))."""
        end = len(full)
        for k in range(min(len(STOP) - 1, len(full)), 0, -1):
            start = len(full) - k
            if STOP.startswith(full[start:]) and (start == 0 or full[start - 1].isspace()):
                end = start
                break
        return _strip_trailing_space(full, end)

    def _release_until(self, limit: int | None) -> list[tuple[int, str]]:
        out, used = [], 0
        while self.pending:
            piece = self.pending[0][1]
            if limit is not None and used + len(piece) > limit:
                break
            used += len(piece)
            out.append(self.pending.pop(0))
        self.text += "".join(p for _, p in out)
        if self.stopped:
            self.pending.clear()
        return out

    def _release_stop(self, cut: int, stop: int) -> list[tuple[int, str]]:
        """At the stop: release the tokens that start before `cut` (the whitespace before
        `USER:`) and end by `stop`; a token holding text and the whitespace stays whole."""
        out, used = [], 0
        for token, piece in self.pending:
            if used >= cut or used + len(piece) > stop:
                break
            used += len(piece)
            out.append((token, piece))
        self.text += "".join(p for _, p in out)
        self.pending.clear()
        return out


def _strip_trailing_space(text: str, end: int) -> int:
    """The index where the run of whitespace that ends at `end` begins."""
    while end > 0 and text[end - 1].isspace():
        end -= 1
    return end


def eviction_note(evicted: int, in_view: int, total: int) -> str:
    """What the user is told when the oldest turns leave the model's context."""
    s = "s" if evicted > 1 else ""
    return (
        f"context full: the model no longer sees the {evicted} oldest turn{s} "
        f"({in_view} of {total} still in its context; the saved conversation keeps all {total})"
    )


DROPPED_MARK = (
    "[interrupted before the reply began: the model will not see this message; "
    "it stays in the saved conversation]"
)


@dataclass
class TurnResult:
    """The outcome of one `send`: the reply and what it cost."""

    prompt: str
    reply: str = ""
    prompt_tokens: int = 0
    completion_tokens: int = 0
    evaluated_tokens: int = 0
    seconds: float = 0.0
    finish: str = ""
    evicted_turns: int = 0
    # Interrupted before the first reply token (Ctrl-C during a long prompt): the message stays
    # in the transcript, but the model no longer sees it, so the next message does not
    # evaluate it again.
    dropped: bool = False
    context_limited: bool = False  # the room left in the context, not --max-tokens, capped it
    context_full: bool = False  # the reply was cut because the context filled up

    def context_full_note(self) -> str:
        """What the user is told when the context, not --max-tokens, cut the reply short."""
        return (
            f"[reply cut at {self.completion_tokens} tokens: the context is full; the next "
            "message makes room by evicting the oldest turns, a larger --ctx-size gives more]"
        )

    def end_mark(self) -> str:
        """The mark shown after a reply that did not simply end with text ("" when it did):
        interrupted, cut by the context or by --max-tokens, or empty. No cut is ever silent."""
        if self.dropped:
            return DROPPED_MARK
        if self.finish == "interrupted":
            return "[interrupted]"
        if self.context_full:
            return self.context_full_note()
        if self.finish == "length":
            return "[max tokens reached]"
        if not self.reply.strip():
            return "[empty reply]"  # the model ended its turn at once (or wrote only spaces)
        return ""

    timings: dict[str, float] = field(default_factory=dict)


class ChatSession:
    """A WizardLM-2 conversation on one engine; `send` streams a reply and records the turn."""

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
        self.last: TurnResult | None = None
        self.conversation = self._new_conversation(system)

    def _new_conversation(self, system: str) -> Conversation:
        e = self.engine
        return Conversation(system=system, tokenize=e.tokenize, bos=e.bos, eos=e.eos, n_ctx=e.n_ctx)

    def reset(self, system: str | None = None) -> None:
        """Start a new conversation, with a new system prompt if given."""
        self.conversation = self._new_conversation(
            self.conversation.system if system is None else system
        )

    def restore(self, system: str, turns: Iterable[tuple[str, str, bool]]) -> None:
        """Replace the conversation with saved (message, reply, interrupted) turns.

        The text is tokenized again; the KV cache holds none of it, so the next `send` evaluates
        the whole history once and later turns are back to evaluating only their new tokens.
        """
        conv = self._new_conversation(system)
        for user, reply, interrupted in turns:
            turn = conv.new_turn(user)
            turn.reply = reply
            turn.reply_tokens = self.engine.tokenize(reply) if reply else []
            turn.interrupted = interrupted
            conv.close(turn)
        self.conversation = conv

    def drop_last(self) -> Turn | None:
        """Remove the last exchange from the history and return it (None when empty)."""
        return self.conversation.drop_last()

    def cancel(self) -> None:
        """Stop the reply being generated after the current token (safe from other threads)."""
        self.cancel_event.set()

    def send(self, text: str) -> Generator[str, None, None]:
        """Stream the reply to `text` as text chunks; the turn is recorded however it ends."""
        conv = self.conversation
        turn = conv.new_turn(text)
        evicted = conv.make_room(turn, self.max_tokens)
        if evicted:
            self.notify(eviction_note(evicted, len(conv.window()), len(conv.turns)))
        prompt = conv.prompt(turn)
        if self.show_prompt:
            self.show_prompt(conv.text(turn), len(prompt))
        self.cancel_event.clear()
        budget = conv.max_reply_tokens(turn, self.max_tokens)
        stream = self.engine.stream(
            prompt,
            budget,
            self.cancel_event,
            abort_prompt=self.abort_prompt,
            progress=self.progress,
        )
        result = TurnResult(prompt=text, evicted_turns=evicted)
        # A "length" finish is the context's doing (not --max-tokens') when it set the budget.
        result.context_limited = self.max_tokens <= 0 or budget < self.max_tokens
        self.last = result
        return self._run(turn, stream, result)

    def _run(
        self, turn: Turn, stream: TokenStreamLike, result: TurnResult
    ) -> Generator[str, None, None]:
        scanner = StopScanner()
        shown: list[str] = []
        start = time.perf_counter()
        try:
            for token, piece in stream:
                yield from self._show(scanner.push(token, piece), turn, shown)
                if scanner.stopped:
                    break
            else:
                yield from self._show(scanner.flush(), turn, shown)
            result.finish = "stop" if scanner.stopped else stream.stats.finish
        finally:
            # Runs on normal end, on Ctrl-C inside the engine, and when the consumer closes us.
            if not result.finish:
                result.finish = "interrupted"
            turn.reply = "".join(shown)
            turn.interrupted = result.finish == "interrupted"
            result.dropped = turn.unanswered  # kept in the transcript, out of the model's view
            self.conversation.close(turn)
            stats = stream.stats
            result.reply = turn.reply
            result.prompt_tokens = stats.prompt_tokens
            result.completion_tokens = len(turn.reply_tokens)
            result.evaluated_tokens = stats.evaluated_tokens
            result.seconds = time.perf_counter() - start
            result.timings = stats.timings()
            result.context_full = result.finish == "length" and result.context_limited

    @staticmethod
    def _show(released: Iterable[tuple[int, str]], turn: Turn, shown: list[str]) -> Iterator[str]:
        for token, piece in released:
            turn.reply_tokens.append(token)
            if not shown and piece.startswith(" "):
                piece = piece[1:]  # the space SPM puts before the first word is not reply text
            if piece:
                shown.append(piece)
                yield piece
