"""`wizardchat doctor --endpoint URL`: what a chat through that server would find.

The same steps a chat takes, in its order, each reported: the model list, the context length,
the tokenizer used for counting, and a one-token completion of the Vicuna prompt. A server that
cannot be reached, or refuses, is EndpointError (one line, exit 11) as it is for a chat.
"""

from __future__ import annotations

import threading
import time
from typing import Any

from wizardchat.chat.conversation import Conversation
from wizardchat.endpoint.engine import DEFAULT_N_CTX, EndpointEngine, served_model
from wizardchat.endpoint.http import Endpoint
from wizardchat.engine.reply_data import Sampling
from wizardchat.settings import Settings


def check(settings: Settings, api_key: str | None) -> dict[str, Any]:
    """The endpoint's report (see the module); EndpointError when it cannot be used at all."""
    assert settings.endpoint
    endpoint = Endpoint.parse(settings.endpoint, api_key)
    started = time.perf_counter()
    model = served_model(endpoint, settings.endpoint_model)
    listed_s = time.perf_counter() - started
    engine = EndpointEngine(
        endpoint,
        model,
        n_ctx=model.n_ctx or DEFAULT_N_CTX,
        n_ctx_source="the server's" if model.n_ctx else "assumed",
        sampling=Sampling(temperature=0.0),
        seed=-1,
        notify=lambda _line: None,
        stall_seconds=settings.endpoint_timeout,
    )
    chat = Conversation.on(engine, settings.system)
    turn = chat.new_turn("Hi")
    prompt = chat.prompt(turn)
    started = time.perf_counter()
    stream = engine.stream(prompt, 1, threading.Event(), text=chat.text(turn))
    reply = "".join(piece for _token, piece in stream)
    return {
        "endpoint": endpoint.url,
        "api_key": "set" if api_key else "none",
        "model": model.name,
        "model_chosen": "--endpoint-model" if settings.endpoint_model else "the first listed",
        "models_seconds": round(listed_s, 3),
        "context_tokens": model.n_ctx,
        "token_counting": engine.count.source,
        "prompt_tokens": len(prompt),
        "one_token_reply": reply,
        "one_token_finish": stream.stats.finish,
        "one_token_seconds": round(time.perf_counter() - started, 3),
    }


def render(report: dict[str, Any]) -> str:
    """The report as doctor prints it."""
    context = report["context_tokens"]
    rows = [
        ("endpoint", f"{report['endpoint']} (API key: {report['api_key']})"),
        ("model", f"{report['model']} ({report['model_chosen']}; the list took "
                  f"{report['models_seconds']:.2f} s)"),
        ("context", f"{context:,} tokens" if context else
                    f"not reported: {DEFAULT_N_CTX:,} assumed (-c sets it)"),
        ("token counts", report["token_counting"]),
        ("one-token test", f"{report['prompt_tokens']} prompt tokens -> "
                           f"{report['one_token_reply']!r} ({report['one_token_finish']}) in "
                           f"{report['one_token_seconds']:.2f} s"),
    ]  # fmt: skip
    width = max(len(name) for name, _ in rows)
    return "".join(f"{name:<{width}}  {value}\n" for name, value in rows)
