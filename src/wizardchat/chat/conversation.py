"""WizardLM-2's Vicuna conversation kept as token ids, with its context budget (pure, no I/O).

The model card's format, one line, `</s>` being the EOS token:
`{system} USER: {text} ASSISTANT: {reply}</s>USER: {text} ASSISTANT: {reply}</s>...`
Each turn's user segment `USER: {text} ASSISTANT:` is tokenized once, without parsing special
tokens (typed text that looks like `</s>` stays text). The SPM tokenizer's space prefix gives
the space before `USER:`, exactly as tokenizing the whole line would after the EOS token. Replies
keep the ids the model generated, so every turn's prompt extends the last one token for token and
llama.cpp's KV cache needs to evaluate only the new tokens.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field

from wizardchat.errors import ContextError

Tokenize = Callable[[str], list[int]]  # text -> ids, no BOS, special tokens never parsed
EOS_TEXT = "</s>"
# Room a reply needs at the least; a message that leaves less is refused.
MIN_REPLY_TOKENS = 8


def user_segment(text: str) -> str:
    """The text of one user turn up to the generation prompt (no trailing space)."""
    return f"USER: {text} ASSISTANT:"


@dataclass
class Turn:
    """One exchange: the user's text and tokens, and the reply as text and generated ids."""

    user: str
    user_tokens: list[int]
    reply: str = ""
    reply_tokens: list[int] = field(default_factory=list)
    interrupted: bool = False

    @property
    def unanswered(self) -> bool:
        """Interrupted before the first reply token (Ctrl-C during a long prompt).

        Such a turn stays in the transcript, as the user said it, but the model does not see
        it: the next message would otherwise evaluate it again, whole, for nothing.
        """
        return self.interrupted and not self.reply_tokens and not self.reply


@dataclass
class Conversation:
    """The system prompt and the closed turns: all of them as said, and the window the model sees.

    `turns` is the transcript: every closed turn, in order, exactly what is saved. Eviction never
    removes from it; it only moves `evicted`, the number of oldest turns the model no longer sees.
    """

    system: str
    tokenize: Tokenize
    bos: int
    eos: int
    n_ctx: int
    turns: list[Turn] = field(default_factory=list)
    evicted: int = 0  # turns[:evicted] are in the transcript but out of the model's context

    def __post_init__(self) -> None:
        self.system_tokens = [self.bos, *(self.tokenize(self.system) if self.system else [])]

    def new_turn(self, text: str) -> Turn:
        """An open turn for `text` (not yet part of the history)."""
        return Turn(user=text, user_tokens=self.tokenize(user_segment(text)))

    def window(self) -> list[Turn]:
        """The closed turns the model sees: the transcript less the evicted oldest turns and
        the unanswered ones."""
        return [t for t in self.turns[self.evicted :] if not t.unanswered]

    def tokens(self) -> list[int]:
        """The history as the model sees it: BOS, system, then each window turn closed by EOS."""
        out = list(self.system_tokens)
        for t in self.window():
            out += t.user_tokens
            out += t.reply_tokens
            out.append(self.eos)
        return out

    def prompt(self, turn: Turn) -> list[int]:
        """The tokens to generate `turn`'s reply from."""
        return self.tokens() + turn.user_tokens

    def text(self, pending: Turn | None = None) -> str:
        """What the model sees, as one Vicuna string (EOS as `</s>`), up to `pending`'s prompt."""
        parts: list[str] = []
        for t in self.window():
            parts.append(f"{user_segment(t.user)} {t.reply}{EOS_TEXT}")
        if pending is not None:
            parts.append(user_segment(pending.user))
        body = "".join(parts)
        return f"{self.system} {body}" if self.system and body else self.system or body

    def reply_reserve(self, max_tokens: int) -> int:
        """Tokens kept free for a reply when deciding whether history must be evicted.

        At most a quarter of the context: reserving all of `-n 1000` in a 1024-token context
        would evict every turn, every turn, although the reply may well be short.
        """
        wanted = max_tokens if max_tokens > 0 else 1024
        return max(MIN_REPLY_TOKENS, min(wanted, self.n_ctx // 4))

    def check_fits(self, turn: Turn) -> None:
        """Refuse a message that cannot fit even with no history (ContextError, exit 6)."""
        fixed = len(self.system_tokens) + len(turn.user_tokens)
        if fixed + MIN_REPLY_TOKENS > self.n_ctx:
            raise ContextError(
                f"message too long: {len(turn.user_tokens)} tokens, and with the system prompt "
                f"it needs {fixed + MIN_REPLY_TOKENS} of the {self.n_ctx}-token context "
                "(use a larger --ctx-size or a shorter message)"
            )

    def make_room(self, turn: Turn, max_tokens: int) -> int:
        """Evict the oldest turns from the window if `turn` and its reply would not fit.

        Returns how many were evicted now. Nothing is evicted while the history, the message and
        the reply reserve fit. When they do not, eviction goes down until history and message
        take at most half the context, in one chunk, so the next turns extend the KV cache again
        instead of re-evaluating the history every turn. Evicted turns stay in `turns` (the
        transcript).
        """
        self.check_fits(turn)
        fixed = len(self.system_tokens) + len(turn.user_tokens)
        reserve = self.reply_reserve(max_tokens)
        history = len(self.tokens()) - len(self.system_tokens)
        if fixed + history + reserve <= self.n_ctx:
            return 0
        # Down to half the context for history and message: with the reserve at most a quarter,
        # the next turns have at least a quarter of the context to grow into.
        target = max(self.n_ctx // 2, fixed)
        evicted_now = 0
        while self.evicted < len(self.turns) and fixed + history > target:
            old = self.turns[self.evicted]
            self.evicted += 1
            if not old.unanswered:  # an unanswered turn is not in the window anyway
                history -= len(old.user_tokens) + len(old.reply_tokens) + 1
                evicted_now += 1
        return evicted_now

    def max_reply_tokens(self, turn: Turn, max_tokens: int) -> int:
        """How many tokens the reply may have: --max-tokens, and room left for it and its EOS."""
        room = self.n_ctx - len(self.prompt(turn)) - 1
        return min(max_tokens, room) if max_tokens > 0 else room

    def close(self, turn: Turn) -> None:
        """Append a finished (or interrupted) turn to the history."""
        self.turns.append(turn)

    def drop_last(self) -> Turn | None:
        """Remove the last turn from the transcript (the user's /undo); None when empty."""
        if not self.turns:
            return None
        turn = self.turns.pop()
        self.evicted = min(self.evicted, len(self.turns))
        return turn
