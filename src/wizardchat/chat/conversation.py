"""WizardLM-2's Vicuna conversation kept as token ids, with its context budget (pure, no I/O).

The model card's format, one line, `</s>` being the EOS token:
`{system} USER: {text} ASSISTANT: {reply}</s>USER: {text} ASSISTANT: {reply}</s>...`
The history is, token for token, llama.cpp's tokenization of that line as `text()` shows it,
for any vocabulary: llama.cpp splits a prompt into fragments at special tokens, and an SPM
vocabulary (WizardLM-2's) puts a space before a fragment that starts the prompt or follows a
special token, while a BPE one (Llama 3's, SmolLM2's) does not. So a turn's `USER: {text}
ASSISTANT:` is tokenized where it stands: after an EOS, or first with no system prompt, it starts
a fragment; right after the system prompt it continues the system's fragment, from the space
between them (`Vocabulary.space_prefix` says how). Typed text that looks like `</s>` stays text.
Replies keep the ids the model generated, so every turn's prompt extends the last one token for
token and llama.cpp's KV cache needs to evaluate only the new tokens; BOS comes first only when
the model's file says so, and EOS is shown as the model's own EOS text.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import KW_ONLY, dataclass, field
from typing import Protocol

from wizardchat.errors import ContextError

# text -> ids as a prompt of just this text would have them: no BOS, special tokens never
# parsed, an SPM vocabulary's space prefix included (the text starts a fragment).
Tokenize = Callable[[str], list[int]]
EOS_TEXT = "</s>"  # WizardLM-2's EOS as text
# Room a reply needs at the least; a message that leaves less is refused.
MIN_REPLY_TOKENS = 8


def user_segment(text: str) -> str:
    """The text of one user turn up to the generation prompt (no trailing space)."""
    return f"USER: {text} ASSISTANT:"


class Vocabulary(Protocol):
    """What a conversation needs of an engine's tokenizer (LlamaEngine, RemoteEngine, ...)."""

    bos: int
    eos: int
    n_ctx: int
    add_bos: bool  # BOS starts a prompt (the file's tokenizer.ggml.add_bos_token)
    eos_text: str  # the EOS token as a prompt writes it
    space_prefix: bool  # a fragment at the start or after a special token gets a space (SPM)

    def tokenize(self, text: str) -> list[int]: ...


@dataclass
class Turn:
    """One exchange: the user's text and tokens, and the reply as text and generated ids."""

    user: str
    user_tokens: list[int]
    reply: str = ""
    reply_tokens: list[int] = field(default_factory=list)
    interrupted: bool = False
    # `user_tokens` starts a fragment (after EOS, or with no system prompt); these continue the
    # system prompt's text (the turn right after it, where a BPE vocabulary tokenizes
    # ` USER:`). Made when first needed; None until then.
    lead_tokens: list[int] | None = field(default=None, repr=False)

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
    _: KW_ONLY
    add_bos: bool = True  # BOS starts the history (WizardLM-2's files say so)
    eos_text: str = EOS_TEXT  # the EOS token as text() writes it
    space_prefix: bool = True  # see Vocabulary: `tokenize` puts the space before a fragment

    def __post_init__(self) -> None:
        bos = [self.bos] if self.add_bos else []
        self.system_tokens = bos + (self.tokenize(self.system) if self.system else [])

    @classmethod
    def on(cls, engine: Vocabulary, system: str) -> Conversation:
        """A new conversation tokenized as `engine`'s model tokenizes a whole prompt."""
        return cls(
            system,
            engine.tokenize,
            engine.bos,
            engine.eos,
            engine.n_ctx,
            add_bos=engine.add_bos,
            eos_text=engine.eos_text,
            space_prefix=engine.space_prefix,
        )

    def new_turn(self, text: str) -> Turn:
        """An open turn for `text` (not yet part of the history)."""
        return Turn(user=text, user_tokens=self.tokenize(user_segment(text)))

    def continued(self, text: str) -> list[int]:
        """Ids of `text`, which starts with a space, where it continues text before it in the
        same fragment (not at the prompt's start or after a special token)."""
        if self.space_prefix and text.startswith(" "):
            return self.tokenize(text[1:])  # the space prefix stands for the text's own space
        return self.tokenize(text)

    def reply_ids(self, reply: str) -> list[int]:
        """Ids for a reply known only as text (a saved turn, an API's history): what the
        prompt's text, `ASSISTANT: {reply}`, holds after the colon."""
        return self.continued(f" {reply}") if reply else []

    def _user_tokens(self, turn: Turn, *, first: bool) -> list[int]:
        """`turn`'s user segment as it stands: `first` in the window (right after the system
        prompt, if any) or after an EOS."""
        if not (first and self.system) or self.space_prefix:
            # An SPM space prefix gives ` USER:` the same ids wherever the segment stands.
            return turn.user_tokens
        if turn.lead_tokens is None:
            turn.lead_tokens = self.continued(f" {user_segment(turn.user)}")
        return turn.lead_tokens

    def window(self) -> list[Turn]:
        """The closed turns the model sees: the transcript less the evicted oldest turns and
        the unanswered ones."""
        return [t for t in self.turns[self.evicted :] if not t.unanswered]

    def _first_in_window(self) -> Turn | None:
        for i in range(self.evicted, len(self.turns)):
            if not self.turns[i].unanswered:
                return self.turns[i]
        return None

    def tokens(self) -> list[int]:
        """The history as the model sees it: BOS, system, then each window turn closed by EOS."""
        out = list(self.system_tokens)
        for i, t in enumerate(self.window()):
            out += self._user_tokens(t, first=i == 0)
            out += t.reply_tokens
            out.append(self.eos)
        return out

    def prompt(self, turn: Turn) -> list[int]:
        """The tokens to generate `turn`'s reply from."""
        first = self._first_in_window() is None
        return self.tokens() + self._user_tokens(turn, first=first)

    def text(self, pending: Turn | None = None) -> str:
        """What the model sees, as one Vicuna string (EOS as the model's EOS text), up to
        `pending`'s prompt."""
        parts: list[str] = []
        for t in self.window():
            # An empty reply (EOS at once) has no space after `ASSISTANT:`, as its tokens.
            reply = f" {t.reply}" if t.reply or t.reply_tokens else ""
            parts.append(f"{user_segment(t.user)}{reply}{self.eos_text}")
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
        message = len(self._user_tokens(turn, first=True))
        fixed = len(self.system_tokens) + message
        if fixed + MIN_REPLY_TOKENS > self.n_ctx:
            raise ContextError(
                f"message too long: {message} tokens, and with the system prompt "
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
        system = len(self.system_tokens)
        reserve = self.reply_reserve(max_tokens)
        history = len(self.tokens()) - system
        message = len(self._user_tokens(turn, first=self._first_in_window() is None))
        if system + history + message + reserve <= self.n_ctx:
            return 0
        # Down to half the context for history and message: with the reserve at most a quarter,
        # the next turns have at least a quarter of the context to grow into.
        target = max(self.n_ctx // 2, system + len(self._user_tokens(turn, first=True)))
        evicted_now = 0
        while self.evicted < len(self.turns) and system + history + message > target:
            old = self.turns[self.evicted]
            self.evicted += 1
            if old.unanswered:  # an unanswered turn is not in the window anyway
                continue
            # `old` was first in the window; the turn after it (or the message) is first now,
            # and its user segment takes the form that follows the system prompt.
            history -= len(self._user_tokens(old, first=True)) + len(old.reply_tokens) + 1
            evicted_now += 1
            now_first = self._first_in_window()
            if now_first is None:
                message = len(self._user_tokens(turn, first=True))
            else:
                history += len(self._user_tokens(now_first, first=True))
                history -= len(now_first.user_tokens)
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
