"""One reply as it is generated: the text streamed without a model-started `USER:` turn, the
turn recorded however the reply ends, and its result (tokens, speed, why it ended) when done."""

from __future__ import annotations

import re
import time
from collections.abc import Callable, Generator, Iterable, Iterator
from dataclasses import dataclass, field
from typing import Protocol

from wizardchat.chat.conversation import Turn


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


def _shown_piece(piece: str, *, started: bool) -> str:
    """A token's text as the reply shows it: the space SPM puts before the first word is not
    reply text."""
    return piece[1:] if not started and piece.startswith(" ") else piece


def reply_text(pieces: Iterable[str]) -> str:
    """The reply's text for its tokens' pieces, exactly as a streamed reply builds it."""
    chunks: list[str] = []
    for piece in pieces:
        shown = _shown_piece(piece, started=bool(chunks))
        if shown:
            chunks.append(shown)
    return "".join(chunks)


def _strip_trailing_space(text: str, end: int) -> int:
    """The index where the run of whitespace that ends at `end` begins."""
    while end > 0 and text[end - 1].isspace():
        end -= 1
    return end


DROPPED_MARK = (
    "[interrupted before the reply began: the model will not see this message; "
    "it stays in the saved conversation]"
)


@dataclass
class TurnResult:
    """The outcome of one reply: why it ended and what it cost."""

    reply: str = ""
    prompt_tokens: int = 0
    completion_tokens: int = 0
    evaluated_tokens: int = 0
    seconds: float = 0.0
    finish: str = ""
    # Interrupted before the first reply token (Ctrl-C during a long prompt): the message stays
    # in the transcript, but the model no longer sees it, so the next message does not
    # evaluate it again.
    dropped: bool = False
    context_limited: bool = False  # the room left in the context, not --max-tokens, capped it
    context_full: bool = False  # the reply was cut because the context filled up
    timings: dict[str, float] = field(default_factory=dict)

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


class ReplyNotDone(RuntimeError):
    """A reply's result was asked for while the reply was still being generated (a bug)."""


class Reply:
    """A reply being generated, as simonw/llm's lazy `Response`: iterate it for the text chunks
    as they stream; once it is done, `result` says how it ended and what it cost.

    It is done when read to the end, stopped by the model, cancelled, or closed; then its turn is
    recorded in the conversation, with the text shown so far. Iterating a done reply gives its
    chunks again.

        reply = session.send("Hi")
        for chunk in reply:
            print(chunk, end="")
        print(reply.result.completion_tokens, reply.result.finish)
    """

    def __init__(
        self,
        turn: Turn,
        stream: TokenStreamLike,
        *,
        record: Callable[[Turn], None],
        context_limited: bool,
    ) -> None:
        self._turn = turn
        self._stream = stream
        self._record = record  # closes the turn into the conversation
        self._result = TurnResult(context_limited=context_limited)
        self._chunks: list[str] = []
        self._live: Generator[str, None, None] | None = None
        self._done = False

    def __iter__(self) -> Iterator[str]:
        if self._done:
            return iter(list(self._chunks))
        if self._live is None:
            self._live = self._generate()
        return self._live

    def text(self) -> str:
        """The whole reply's text (generating the rest of it first)."""
        for _ in self:
            pass
        return "".join(self._chunks)

    @property
    def done(self) -> bool:
        """Whether the reply has ended and its turn is recorded."""
        return self._done

    @property
    def result(self) -> TurnResult:
        """How the reply ended and what it cost; ReplyNotDone while it is still streaming."""
        if not self._done:
            raise ReplyNotDone("the reply is still being generated: read it to the end or close it")
        return self._result

    def close(self) -> None:
        """End the reply where it is (its text is what was read so far) and record the turn."""
        if self._live is not None:
            self._live.close()  # runs the generator's `finally`: it records the turn
        if not self._done:  # never iterated: the message is kept, unanswered
            self._finish("interrupted", 0.0)

    def _generate(self) -> Generator[str, None, None]:
        scanner = StopScanner()
        start = time.perf_counter()
        finish = ""
        try:
            for token, piece in self._stream:
                yield from self._show(scanner.push(token, piece))
                if scanner.stopped:
                    break
            else:
                yield from self._show(scanner.flush())
            finish = "stop" if scanner.stopped else self._stream.stats.finish
        finally:
            # Runs on normal end, on Ctrl-C inside the engine, and when the consumer closes us.
            self._finish(finish or "interrupted", time.perf_counter() - start)

    def _show(self, released: Iterable[tuple[int, str]]) -> Iterator[str]:
        for token, piece in released:
            self._turn.reply_tokens.append(token)
            piece = _shown_piece(piece, started=bool(self._chunks))
            if piece:
                self._chunks.append(piece)
                yield piece

    def _finish(self, finish: str, seconds: float) -> None:
        turn, result, stats = self._turn, self._result, self._stream.stats
        turn.reply = "".join(self._chunks)
        turn.interrupted = finish == "interrupted"
        self._record(turn)
        result.finish = finish
        result.dropped = turn.unanswered  # kept in the transcript, out of the model's view
        result.reply = turn.reply
        result.prompt_tokens = stats.prompt_tokens
        result.completion_tokens = len(turn.reply_tokens)
        result.evaluated_tokens = stats.evaluated_tokens
        result.seconds = seconds
        result.timings = stats.timings()
        # A "length" finish is the context's doing (not --max-tokens') when it set the budget.
        result.context_full = finish == "length" and result.context_limited
        self._done = True
