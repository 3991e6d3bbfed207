"""The OpenAI API's request bodies read into what the engine needs, and its error shape.

Pure parsing, no HTTP: serve/http_api.py hands the decoded JSON body here and answers an
ApiError with its status. Every field is checked (type, range, size) before it reaches the
engine; a value the API allows but wizardchat does not do (n > 1, tools, echo) is refused with
400 rather than ignored.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from wizardchat.inputs import repair_text
from wizardchat.settings import RANGES, Bounds

MAX_STOPS = 16
ROLES = {"system", "developer", "user", "assistant"}  # "developer": OpenAI's newer "system"


class ApiError(Exception):
    """A request answered with an error: its HTTP status and OpenAI's error fields."""

    def __init__(
        self,
        status: int,
        message: str,
        *,
        kind: str = "invalid_request_error",
        code: str | None = None,
        param: str | None = None,
    ) -> None:
        super().__init__(message)
        self.status = status
        self.kind = kind
        self.code = code
        self.param = param

    def body(self) -> dict[str, Any]:
        """`{"error": {...}}` as OpenAI sends it."""
        return {
            "error": {
                "message": str(self),
                "type": self.kind,
                "param": self.param,
                "code": self.code,
            }
        }


def bad_request(message: str, param: str | None = None) -> ApiError:
    """A 400: the body is malformed or asks for what is not supported."""
    return ApiError(400, message, param=param)


def _value(body: dict[str, Any], name: str, bounds: Bounds, *, integer: bool) -> Any:
    """A numeric field within `bounds` (None when absent); ApiError (400) otherwise."""
    value = body.get(name)
    if value is None:
        return None
    kinds = int if integer else int | float
    if not isinstance(value, kinds) or isinstance(value, bool) or not bounds.allows(value):
        what = "an integer" if integer else "a number"
        raise bad_request(f"'{name}' must be {what}, {bounds.rule}", name)
    return value


def _text(value: Any, param: str) -> str:
    if not isinstance(value, str):
        raise bad_request(f"'{param}' must be a string", param)
    return repair_text(value)  # a lone surrogate in JSON would break the tokenizer's UTF-8


@dataclass(frozen=True)
class Params:
    """What a completion request asks for besides its prompt."""

    max_tokens: int | None
    sampling: dict[str, Any]
    seed: int | None
    stops: tuple[str, ...]
    stream: bool
    include_usage: bool


def parse_params(body: dict[str, Any], defaults: dict[str, Any], max_tokens: int | None) -> Params:
    """The sampling, length, stop and streaming fields of a request (ApiError: 400)."""
    if body.get("n") not in (None, 1):
        raise bad_request("only n=1 is supported", "n")
    if body.get("echo"):
        raise bad_request("echo is not supported", "echo")
    length = Bounds(1, 2**31 - 1, f"1 to {2**31 - 1}")
    limit = _value(body, "max_completion_tokens", length, integer=True)
    if limit is None:
        limit = _value(body, "max_tokens", length, integer=True)
    sampling = dict(defaults)
    # top_k, min_p and repeat_penalty are llama.cpp's, taken as llama-cpp-python's server does.
    for name in ("temperature", "top_p", "top_k", "min_p", "repeat_penalty"):
        value = _value(body, name, RANGES[name], integer=name == "top_k")
        if value is not None:
            sampling[name] = value
    stop = body.get("stop")
    stops = [stop] if isinstance(stop, str) else stop if stop is not None else []
    if not isinstance(stops, list) or len(stops) > MAX_STOPS:
        raise bad_request(
            f"'stop' must be a string or a list of at most {MAX_STOPS} strings", "stop"
        )
    stream = body.get("stream", False)
    if not isinstance(stream, bool | None):
        raise bad_request("'stream' must be true or false", "stream")
    options = body.get("stream_options") or {}
    if not isinstance(options, dict):
        raise bad_request("'stream_options' must be an object", "stream_options")
    return Params(
        max_tokens=limit if limit is not None else max_tokens,
        sampling=sampling,
        seed=_value(body, "seed", RANGES["seed"], integer=True),
        stops=tuple(s for s in (_text(s, "stop") for s in stops) if s),
        stream=bool(stream),
        include_usage=bool(options.get("include_usage")),
    )


@dataclass(frozen=True)
class ChatMessages:
    """A chat request's messages as the Vicuna format has them: the system prompt, the closed
    (user, assistant) exchanges, and the user message to answer."""

    system: str | None
    history: list[tuple[str, str]]
    last: str


def _content(message: dict[str, Any], param: str) -> str:
    """A message's text: a string, or OpenAI's list of text parts."""
    content = message.get("content")
    if content is None and message.get("role") == "assistant":
        return ""
    if isinstance(content, list):
        parts = []
        for i, part in enumerate(content):
            if not isinstance(part, dict) or part.get("type") != "text":
                raise bad_request("only text content parts are supported", f"{param}.content[{i}]")
            parts.append(_text(part.get("text"), f"{param}.content[{i}].text"))
        return "".join(parts)
    return _text(content, f"{param}.content")


def parse_messages(body: dict[str, Any]) -> ChatMessages:
    """`messages` as Vicuna turns (ApiError, 400, for what they cannot be): system messages,
    wherever they are, make the system prompt; consecutive messages of one role are joined by a
    blank line; the last must be the user's."""
    messages = body.get("messages")
    if not isinstance(messages, list) or not messages:
        raise bad_request("'messages' must be a non-empty list", "messages")
    if body.get("tools") or body.get("functions"):
        raise bad_request("tools and functions are not supported", "tools")
    system: list[str] = []
    turns: list[tuple[str, list[str]]] = []  # (role, texts), roles alternating
    for i, message in enumerate(messages):
        param = f"messages[{i}]"
        if not isinstance(message, dict):
            raise bad_request(f"'{param}' must be an object", param)
        role = message.get("role")
        if role not in ROLES:
            raise bad_request(
                f"'{param}.role' must be one of system, user, assistant", f"{param}.role"
            )
        text = _content(message, param)
        if role in ("system", "developer"):
            system.append(text)
        elif turns and turns[-1][0] == role:
            turns[-1][1].append(text)
        elif role == "assistant" and not turns:
            raise bad_request(f"'{param}': an assistant message must follow a user message", param)
        else:
            turns.append((str(role), [text]))
    if not turns or turns[-1][0] != "user":
        raise bad_request(
            "the last message must be the user's (a final assistant message to continue is "
            "not supported)",
            "messages",
        )
    texts = ["\n\n".join(t) for _, t in turns]
    history = list(zip(texts[:-1:2], texts[1:-1:2], strict=True))
    return ChatMessages("\n\n".join(system) if system else None, history, texts[-1])


def parse_prompt(body: dict[str, Any]) -> str:
    """`prompt` of /v1/completions: a string (or a list of one string)."""
    prompt = body.get("prompt")
    if isinstance(prompt, list) and len(prompt) == 1:
        prompt = prompt[0]
    if not isinstance(prompt, str):
        raise bad_request("'prompt' must be a string", "prompt")
    return _text(prompt, "prompt")


def parse_tokenize(body: dict[str, Any]) -> str:
    """`content` of /tokenize (llama-server's shape)."""
    return _text(body.get("content"), "content")


class StopStrings:
    """Holds back text that may begin a stop string, and cuts the text at the first one."""

    def __init__(self, stops: tuple[str, ...]) -> None:
        self.stops = stops
        self.held = ""
        self.stopped = False

    def push(self, text: str) -> str:
        """Add text; return what is now sure to come before any stop string."""
        if self.stopped:
            return ""
        self.held += text
        found = [i for i in (self.held.find(s) for s in self.stops) if i >= 0]
        if found:
            self.stopped = True
            out, self.held = self.held[: min(found)], ""
            return out
        keep = 0  # the longest end of the text that is the start of a stop string
        for stop in self.stops:
            for k in range(min(len(stop) - 1, len(self.held)), keep, -1):
                if self.held.endswith(stop[:k]):
                    keep = k
                    break
        out = self.held[: len(self.held) - keep]
        self.held = self.held[len(out) :]
        return out

    def flush(self) -> str:
        """The text held back (the reply ended without a stop string)."""
        out, self.held = self.held, ""
        return out
