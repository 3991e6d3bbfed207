"""EndpointEngine: an OpenAI-compatible server behind the interface the chat uses for llama.cpp.

The chat (ChatSession, the REPL, batch mode, `ask`) keeps its history as token ids and asks its
engine to count and to stream. A remote server gives no ids, so here the "ids" of a text are
placeholders (TextIds): as many as the server's tokenizer counts for it, the first standing for
the whole text. Eviction and the reply budget then work on the server's counts as they do on a
local model's, with no code of their own. The prompt sent is the text the chat builds for
`--verbose-prompt` (Conversation.text: WizardLM-2's Vicuna format, EOS as `</s>`), handed to
`stream` whole, never rebuilt from ids.

Counting uses the server's tokenizer where it has one (llama-server's and vLLM's /tokenize,
llama-cpp-python's /extras/tokenize, `wizardchat serve --http`'s /tokenize); elsewhere a
deliberately high estimate (a token per 3 bytes; WizardLM-2 averages about 4 on English), so
eviction comes early rather than a prompt overflowing the server's context.
"""

from __future__ import annotations

import dataclasses
import math
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from typing import Any, TypeGuard

from wizardchat.chat.conversation import EOS_TEXT
from wizardchat.endpoint.http import Endpoint, open_stream, request_json
from wizardchat.engine.reply_data import GenerationStats, Sampling
from wizardchat.errors import EndpointError
from wizardchat.settings import Settings

STOP_STRINGS = ["USER:"]  # the model starting a user turn: the server stops there too
BYTES_PER_TOKEN_ESTIMATE = 3.0
DEFAULT_N_CTX = 4096  # when neither the server nor -c says


class TextIds:
    """Placeholder token ids for texts: `ids(text, n)` gives n new ids, the first standing for
    the whole text and the rest for nothing, so the ids of any whole texts join to their text."""

    FIRST = 1 << 40  # above every real vocabulary: a local model reads these as foreign ids
    BOS = FIRST - 2
    EOS = FIRST - 1

    def __init__(self) -> None:
        self._texts: dict[int, str] = {self.BOS: "", self.EOS: EOS_TEXT}
        self._next = self.FIRST

    def ids(self, text: str, n: int) -> list[int]:
        """`n` new ids for `text` (none for an empty text)."""
        if not text:
            return []
        n = max(1, n)
        first = self._next
        self._next += n
        self._texts[first] = text
        return list(range(first, first + n))

    def piece(self, token: int) -> str:
        """The text an id stands for (ValueError: not one of these ids)."""
        text = self._texts.get(token)
        if text is not None:
            return text
        if self.FIRST <= token < self._next:
            return ""
        raise ValueError(f"token id {token} is not a text of this endpoint")


class TokenCounter:
    """How many tokens the server's model makes of a text: its own tokenizer where it has one
    (found on first use), else an estimate that errs high."""

    def __init__(self, endpoint: Endpoint, model: str) -> None:
        self.endpoint = endpoint
        self.model = model
        self.source = ""  # which tokenizer answered ("" until the first count)
        self._count: Callable[[str], int] | None = None

    def __call__(self, text: str) -> int:
        if not text:
            return 0
        if self._count is None:
            self._count = self._find()
        return self._count(text)

    def _find(self) -> Callable[[str], int]:
        """The first tokenize API that answers: llama-server's (and wizardchat's), vLLM's,
        llama-cpp-python's; each is asked without special tokens, or corrected for them."""
        root = self.endpoint.root
        tries: list[tuple[str, str, Callable[[str], dict[str, Any]]]] = [
            ("llama-server's /tokenize", f"{root}/tokenize",
             lambda t: {"content": t, "add_special": False}),
            ("vLLM's /tokenize", f"{root}/tokenize",
             lambda t: {"model": self.model, "prompt": t, "add_special_tokens": False}),
            ("llama-cpp-python's /extras/tokenize", f"{root}/extras/tokenize",
             lambda t: {"input": t, "model": self.model}),
        ]  # fmt: skip
        for name, path, body in tries:
            try:
                empty = _token_count(request_json(self.endpoint, "POST", path, body("")))
                probe = _token_count(request_json(self.endpoint, "POST", path, body("Hi there")))
            except (EndpointError, ValueError):
                continue
            if probe <= empty:
                continue
            self.source = f"the server's tokenizer ({name})"

            def count(text: str, path: str = path, body: Any = body, extra: int = empty) -> int:
                try:
                    return (
                        _token_count(request_json(self.endpoint, "POST", path, body(text))) - extra
                    )
                except ValueError:
                    return _estimate(text)

            return count
        per = f"a token per {BYTES_PER_TOKEN_ESTIMATE:g} bytes"
        self.source = f"an estimate ({per}: the server has no tokenize API)"
        return _estimate


def _token_count(answer: Any) -> int:
    """The number of tokens in a tokenize answer (`tokens` list, or vLLM's `count`)."""
    if isinstance(answer, dict):
        tokens = answer.get("tokens")
        if isinstance(tokens, list):
            return len(tokens)
        count = answer.get("count")
        if isinstance(count, int) and not isinstance(count, bool) and count >= 0:
            return count
    raise ValueError("not a tokenize answer")


def _estimate(text: str) -> int:
    return math.ceil(len(text.encode("utf-8")) / BYTES_PER_TOKEN_ESTIMATE)


@dataclasses.dataclass(frozen=True)
class ServedModel:
    """The model an endpoint serves, and its context length where the server tells it."""

    name: str
    n_ctx: int | None
    chosen_by_default: bool


def served_model(endpoint: Endpoint, wanted: str | None) -> ServedModel:
    """The model to use: `wanted` (EndpointError when the server does not list it, if it
    lists models at all) or the first the server lists."""
    answer = request_json(endpoint, "GET", f"{endpoint.path}/models")
    data = answer.get("data") if isinstance(answer, dict) else None
    if not isinstance(data, list):
        raise EndpointError(f"the endpoint {endpoint.url} answered /models with no model list")
    models = [m for m in data if isinstance(m, dict) and isinstance(m.get("id"), str)]
    if wanted is not None:
        found = [m for m in models if m["id"] == wanted]
        if models and not found:
            names = ", ".join(m["id"] for m in models[:8])
            raise EndpointError(
                f"the endpoint {endpoint.url} does not serve {wanted!r} (it serves: {names})"
            )
        model = found[0] if found else {"id": wanted}
    elif models:
        model = models[0]
    else:
        raise EndpointError(f"the endpoint {endpoint.url} serves no model")
    return ServedModel(str(model["id"]), _context_length(endpoint, model), wanted is None)


def _context_length(endpoint: Endpoint, model: dict[str, Any]) -> int | None:
    """vLLM's `max_model_len` (wizardchat serve --http gives it too), else llama-server's
    /props; None when the server says nothing."""
    n = model.get("max_model_len")
    if _positive(n):
        return int(n)
    try:
        props = request_json(endpoint, "GET", f"{endpoint.root}/props")
    except EndpointError:
        return None
    if isinstance(props, dict):
        settings = props.get("default_generation_settings")
        for source in (settings if isinstance(settings, dict) else {}, props):
            if _positive(source.get("n_ctx")):
                return int(source["n_ctx"])
    return None


def _positive(value: Any) -> TypeGuard[int]:
    return isinstance(value, int) and not isinstance(value, bool) and value > 0


class EndpointEngine:
    """An OpenAI-compatible server as the session's engine (the ChatEngine and ReplEngine
    protocols), with this client's sampler settings sent with each reply."""

    def __init__(
        self,
        endpoint: Endpoint,
        model: ServedModel,
        *,
        n_ctx: int,
        n_ctx_source: str,
        sampling: Sampling,
        seed: int,
        notify: Callable[[str], None],
        stall_seconds: float = 120.0,
    ) -> None:
        self.endpoint = endpoint
        self.stall_seconds = stall_seconds
        self.model = model
        # llama-cpp-python's server names its model by the file's path: the file name says it.
        self.model_name = (
            model.name.rsplit("/", 1)[-1] if model.name.startswith("/") else model.name
        )
        self.n_ctx = n_ctx
        self.n_ctx_source = n_ctx_source
        self.sampling = sampling
        self.seed = seed
        self.notify = notify
        self.texts = TextIds()
        self.bos, self.eos = TextIds.BOS, TextIds.EOS
        # The server gets text, WizardLM-2's Vicuna string with `</s>` for EOS: the history's
        # placeholder ids stand for that text, built as for an SPM model with BOS.
        self.add_bos, self.eos_text, self.space_prefix = True, EOS_TEXT, True
        self.count = TokenCounter(endpoint, model.name)

    # --- ChatEngine ------------------------------------------------------------------------

    def tokenize(self, text: str) -> list[int]:
        """Placeholder ids for `text`, as many as the server's model makes of it."""
        return self.texts.ids(text, self.count(text))

    def pieces(self, tokens: Sequence[int]) -> list[str]:
        """The texts of ids given here (ValueError for any other id: a session's ids from a
        local model, whose text is then counted again)."""
        return [self.texts.piece(int(t)) for t in tokens]

    def stream(
        self,
        prompt: Sequence[int],
        max_tokens: int,
        cancel: threading.Event,
        abort_prompt: bool = False,
        progress: Any = None,
        text: str | None = None,
    ) -> EndpointStream:
        """The reply to the prompt `text` (the Vicuna string of `prompt`), streamed from the
        server's /completions; `prompt` only sizes it."""
        if text is None:
            text = "".join(self.pieces(prompt))
        body: dict[str, Any] = {
            "model": self.model.name,
            "prompt": text,
            "stream": True,
            "stream_options": {"include_usage": True},
            "max_tokens": max(1, max_tokens),
            "temperature": self.sampling.temperature,
            "top_p": self.sampling.top_p,
            "top_k": self.sampling.top_k,
            "min_p": self.sampling.min_p,
            "stop": STOP_STRINGS,
        }
        if self.sampling.repeat_penalty != 1.0:  # llama.cpp's name, and vLLM's
            body["repeat_penalty"] = body["repetition_penalty"] = self.sampling.repeat_penalty
        if self.seed >= 0:
            body["seed"] = self.seed
        return EndpointStream(self, body, len(prompt), cancel)

    # --- ReplEngine ------------------------------------------------------------------------

    def set_sampling(self, **changes: Any) -> None:
        """Change the sampler settings sent with the next replies."""
        self.sampling = dataclasses.replace(self.sampling, **changes)

    def set_seed(self, seed: int) -> None:
        """The seed sent with the next replies (-1: none, the server picks)."""
        self.seed = seed

    def describe(self) -> list[tuple[str, str]]:
        """What /show lists: the endpoint, its model, the context and how tokens are counted."""
        chosen = " (the first it serves)" if self.model.chosen_by_default else ""
        return [
            ("endpoint", self.endpoint.url),
            ("model", f"{self.model.name}{chosen}"),
            ("context", f"{self.n_ctx:,} tokens ({self.n_ctx_source})"),
            ("tokens counted by", self.count.source or "the server's tokenizer, when first asked"),
        ]


class EndpointStream:
    """One reply streamed from /completions: (placeholder id, text) per event, stats as it runs.

    Ends at the server's finish (`stop`: its end of sequence or a stop string; `length`), when
    the chat stops reading (Ctrl-C, `USER:`: the connection is closed, so the server stops
    too), or with EndpointError when the stream stalls, breaks its format or is cut: the text
    received until then stays the reply.
    """

    def __init__(
        self, engine: EndpointEngine, body: dict[str, Any], n_prompt: int, cancel: threading.Event
    ) -> None:
        self.engine = engine
        self.body = body
        self.cancel = cancel
        self.stats = GenerationStats(prompt_tokens=n_prompt, evaluated_tokens=n_prompt)
        self._text: list[str] = []
        self._counted = False  # the server said how many tokens it generated

    def __iter__(self) -> Iterator[tuple[int, str]]:
        engine, stats = self.engine, self.stats
        start = time.perf_counter()
        first_at = start
        path = f"{engine.endpoint.path}/completions"
        events = open_stream(
            engine.endpoint,
            path,
            self.body,
            self.cancel,
            notify=engine.notify,
            stall=engine.stall_seconds,
        )
        if events is None:
            stats.finish = "interrupted"
            return
        try:
            for event in events.events(self.cancel):
                self._usage(event.get("usage"))
                choices = event.get("choices")
                if not choices:
                    continue
                choice = choices[0] if isinstance(choices, list) else None
                if not isinstance(choice, dict) or not isinstance(choice.get("text", ""), str):
                    raise EndpointError(
                        f"the endpoint {engine.endpoint.url} sent a completion chunk without "
                        "text: is it a completions API?"
                    )
                piece = choice.get("text") or ""
                if piece:
                    self._text.append(piece)
                    now = time.perf_counter()
                    if stats.completion_tokens == 0:
                        first_at = now
                        stats.prompt_seconds = now - start
                    stats.completion_tokens += 1
                    stats.decode_seconds = now - first_at
                    yield engine.texts.ids(piece, 1)[0], piece
                finish = choice.get("finish_reason")
                if finish:
                    stats.finish = "length" if finish == "length" else "eos"
            events.close()  # before asking the server anything more: it may wait for this
            if not self._counted and self._text and not self.cancel.is_set():
                # llama-cpp-python's server sends no usage: the limit it stopped at, or the
                # text counted again (it may tokenize a little differently than generated).
                if stats.finish == "length":
                    stats.completion_tokens = int(self.body["max_tokens"])
                else:
                    stats.completion_tokens = max(1, engine.count("".join(self._text)))
            if self.cancel.is_set():
                stats.finish = "interrupted"
            elif not stats.finish:
                raise EndpointError(
                    f"the endpoint {engine.endpoint.url} ended the reply in the middle "
                    "(no finish reason)"
                )
        except GeneratorExit:
            stats.finish = stats.finish or "interrupted"
            raise
        finally:
            events.close()

    def _usage(self, usage: Any) -> None:
        """The server's own counts, when it sends them (the last chunk, with include_usage)."""
        if not isinstance(usage, dict):
            return
        prompt, completion = usage.get("prompt_tokens"), usage.get("completion_tokens")
        if _positive(prompt):
            self.stats.prompt_tokens = self.stats.evaluated_tokens = int(prompt)
        if _positive(completion):
            self.stats.completion_tokens = int(completion)
            self._counted = True


def open_endpoint(
    settings: Settings, api_key: str | None, notify: Callable[[str], None]
) -> EndpointEngine:
    """The engine of `settings.endpoint`: its model found, its context length learnt (or -c,
    or DEFAULT_N_CTX, said on stderr), this run's sampling. EndpointError when the server
    cannot be reached or serves no such model."""
    assert settings.endpoint
    endpoint = Endpoint.parse(settings.endpoint, api_key)
    model = served_model(endpoint, settings.endpoint_model)
    if settings.ctx_size > 0:
        n_ctx, source = settings.ctx_size, "-c"
        if model.n_ctx is not None and model.n_ctx < n_ctx:
            n_ctx, source = model.n_ctx, f"the server's; -c {settings.ctx_size} is more"
    elif model.n_ctx is not None:
        n_ctx, source = model.n_ctx, "the server's"
    else:
        n_ctx, source = DEFAULT_N_CTX, "assumed: the server does not say; -c sets it"
    engine = EndpointEngine(
        endpoint,
        model,
        n_ctx=n_ctx,
        n_ctx_source=source,
        sampling=Sampling.of(settings),
        seed=settings.seed,
        notify=notify,
        stall_seconds=settings.endpoint_timeout,
    )
    first = (
        " (the first it serves; --endpoint-model picks another)" if model.chosen_by_default else ""
    )
    notify(f"using {model.name}{first} at {endpoint.url}, context {n_ctx:,} tokens ({source})")
    return engine
