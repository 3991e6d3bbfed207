"""A loaded model as the session sees it: tokenizer, special ids, context size, token streams."""

from __future__ import annotations

import threading
from collections.abc import Sequence
from typing import IO

from wizardchat.engine.generate import Sampling, TokenStream
from wizardchat.engine.model import ProgressFn, load
from wizardchat.engine.placement import plan_overrides
from wizardchat.settings import Settings


class LlamaEngine:
    """llama.cpp behind the session's ChatEngine protocol."""

    def __init__(self, settings: Settings, *, progress: ProgressFn | None, log: IO[str] | None):
        overrides = plan_overrides(settings.override_tensor, settings.cpu_moe, settings.n_cpu_moe)
        self.llm, self.plan, self.info, self._overrides = load(
            settings, overrides, progress=progress, log=log
        )
        self.sampling = Sampling(
            temperature=settings.temperature,
            top_p=settings.top_p,
            top_k=settings.top_k,
            min_p=settings.min_p,
            repeat_penalty=settings.repeat_penalty,
        )
        self.bos = int(self.llm.token_bos())
        self.eos = int(self.llm.token_eos())
        self.n_ctx = int(self.llm.n_ctx())
        self.model_name = self.plan.path.name

    def tokenize(self, text: str) -> list[int]:
        """Token ids of `text`: no BOS, and `</s>` typed by a user stays five characters."""
        return list(self.llm.tokenize(text.encode("utf-8"), add_bos=False, special=False))

    def stream(
        self, prompt: Sequence[int], max_tokens: int, cancel: threading.Event
    ) -> TokenStream:
        """A token stream for one reply."""
        return TokenStream(self.llm, prompt, self.sampling, max_tokens, cancel)

    def close(self) -> None:
        """Free the model and context now rather than at interpreter exit."""
        self.llm.close()
