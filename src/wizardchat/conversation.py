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


@dataclass
class Conversation:
    """The system prompt and the closed turns, as text and as the tokens the model saw."""

    system: str
    tokenize: Tokenize
    bos: int
    eos: int
    n_ctx: int
    turns: list[Turn] = field(default_factory=list)

    def __post_init__(self) -> None:
        self.system_tokens = [self.bos, *(self.tokenize(self.system) if self.system else [])]

    def new_turn(self, text: str) -> Turn:
        """An open turn for `text` (not yet part of the history)."""
        return Turn(user=text, user_tokens=self.tokenize(user_segment(text)))

    def tokens(self) -> list[int]:
        """The whole history as the model sees it: BOS, system, then each turn closed by EOS."""
        out = list(self.system_tokens)
        for t in self.turns:
            out += t.user_tokens
            out += t.reply_tokens
            out.append(self.eos)
        return out

    def prompt(self, turn: Turn) -> list[int]:
        """The tokens to generate `turn`'s reply from."""
        return self.tokens() + turn.user_tokens

    def text(self, pending: Turn | None = None) -> str:
        """The conversation as one Vicuna string (EOS written `</s>`), up to `pending`'s prompt."""
        parts: list[str] = []
        for t in self.turns:
            parts.append(f"{user_segment(t.user)} {t.reply}{EOS_TEXT}")
        if pending is not None:
            parts.append(user_segment(pending.user))
        body = "".join(parts)
        return f"{self.system} {body}" if self.system and body else self.system or body

    def reply_reserve(self, max_tokens: int) -> int:
        """Tokens kept free for a reply when deciding whether history must be evicted."""
        return max_tokens if max_tokens > 0 else min(1024, self.n_ctx // 4)

    def make_room(self, turn: Turn, max_tokens: int) -> int:
        """Evict the oldest whole turns if `turn` and its reply would not fit; return how many.

        Eviction is rare and in one chunk: it goes down to half the context, so the next turns
        extend the KV cache again instead of re-evaluating the history every turn.
        """
        fixed = len(self.system_tokens) + len(turn.user_tokens)
        if fixed + MIN_REPLY_TOKENS > self.n_ctx:
            raise ContextError(
                f"message too long: {len(turn.user_tokens)} tokens, and with the system prompt "
                f"it needs {fixed + MIN_REPLY_TOKENS} of the {self.n_ctx}-token context "
                "(use a larger --ctx-size or a shorter message)"
            )
        reserve = self.reply_reserve(max_tokens)
        history = len(self.tokens()) - len(self.system_tokens)
        if fixed + history + reserve <= self.n_ctx:
            return 0
        target = self.n_ctx // 2
        evicted = 0
        while self.turns and fixed + history + reserve > target:
            old = self.turns.pop(0)
            history -= len(old.user_tokens) + len(old.reply_tokens) + 1
            evicted += 1
        return evicted

    def max_reply_tokens(self, turn: Turn, max_tokens: int) -> int:
        """How many tokens the reply may have: --max-tokens, and room left for it and its EOS."""
        room = self.n_ctx - len(self.prompt(turn)) - 1
        return min(max_tokens, room) if max_tokens > 0 else room

    def close(self, turn: Turn) -> None:
        """Append a finished (or interrupted) turn to the history."""
        self.turns.append(turn)
