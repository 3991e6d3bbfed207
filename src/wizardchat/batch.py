"""Scripted batch mode: user turns from a pipe, one per line (plain text or JSONL)."""

from __future__ import annotations

import json
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import Any, TextIO

from wizardchat.conversation import MIN_REPLY_TOKENS, user_segment
from wizardchat.errors import ContextError, UsageError
from wizardchat.inputs import MAX_BYTES_PER_TOKEN, repair_text
from wizardchat.render import stream_plain
from wizardchat.session import ChatSession


@dataclass
class BatchResult:
    """How a batch went: answered turns and lines that were refused."""

    answered: int = 0
    failed: int = 0


def _slash_command(session: ChatSession, line: str, note: Callable[[str], None]) -> None:
    name, _, arg = line[1:].partition(" ")
    if name == "reset":
        session.reset()
    elif name == "system" and not arg.strip():
        # As in the REPL, /system alone shows the prompt; on stderr, so stdout stays replies.
        note(f"system prompt: {session.conversation.system or '(none)'}")
    elif name == "system":
        _set_system(session, arg.strip())
    else:
        raise UsageError(
            f"unknown command /{name} (batch mode knows /reset, /system [TEXT] and //TEXT)"
        )


def _check_length(session: ChatSession, text: str, what: str) -> None:
    """Refuse text that cannot fit the context before tokenizing it all (megabytes are slow)."""
    n_ctx = session.conversation.n_ctx
    if len(text) > n_ctx * MAX_BYTES_PER_TOKEN:
        raise ContextError(
            f"{what} too long: {len(text)} characters cannot fit in the {n_ctx}-token context"
        )


def _set_system(session: ChatSession, system: str) -> None:
    """Start a new conversation with `system`, unless it leaves no room for a message."""
    _check_length(session, system, "system prompt")
    previous = session.conversation.system
    session.reset(system=system)
    conv = session.conversation
    # The shortest exchange: an empty user turn and the least room a reply needs.
    least = len(conv.system_tokens) + len(conv.tokenize(user_segment(""))) + MIN_REPLY_TOKENS
    if least > conv.n_ctx:
        session.reset(system=previous)
        raise ContextError(
            f"system prompt too long: {len(conv.system_tokens)} tokens leave no room for a "
            f"message in the {conv.n_ctx}-token context; the previous one is kept"
        )


def run_lines(
    session: ChatSession, lines: Iterable[str], out: TextIO, error: Callable[[str], None]
) -> BatchResult:
    """Each non-empty line is a user turn; a line starting with / is a command."""
    result = BatchResult()
    for number, raw in enumerate(lines, 1):
        line = raw.rstrip("\r\n")
        if not line.strip():
            continue
        try:
            _check_length(session, line, "message")
            if line.startswith("//"):
                line = line[1:]  # the REPL's escape: send text that begins with /
            elif line.startswith("/"):
                _slash_command(session, line, error)
                continue
            reply = stream_plain(session.send(line), out)
            out.write("\n\n" if not reply.endswith("\n") else "\n")
            out.flush()
            result.answered += 1
        except (UsageError, ContextError) as e:
            error(f"line {number}: {e}")
            result.failed += 1
    return result


def _parse_record(line: str) -> dict[str, Any]:
    try:
        record = json.loads(line)
    except json.JSONDecodeError as e:
        raise UsageError(f"not JSON ({e.msg} at column {e.colno})") from None
    except RecursionError:
        raise UsageError("JSON nested too deeply") from None
    except ValueError as e:  # valid JSON Python refuses: an integer over 4300 digits
        raise UsageError(f"unreadable JSON ({e})") from None
    if not isinstance(record, dict):
        raise UsageError('expected an object like {"prompt": "..."}')
    if not isinstance(record.get("prompt"), str) or not record["prompt"].strip():
        raise UsageError('"prompt" must be a non-empty string')
    if "system" in record and not isinstance(record["system"], str):
        raise UsageError('"system" must be a string')
    if "reset" in record and not isinstance(record["reset"], bool):
        raise UsageError('"reset" must be true or false')
    # JSON may spell lone surrogates ("\ud800") that no UTF-8 can carry: U+FFFD, as stdin gets.
    for key in ("prompt", "system"):
        if key in record:
            record[key] = repair_text(record[key])
    return record


def run_jsonl(
    session: ChatSession, lines: Iterable[str], out: TextIO, error: Callable[[str], None]
) -> BatchResult:
    """Each line is {"prompt", optional "system", "reset"}; each answer is one JSON line."""
    result = BatchResult()
    for number, raw in enumerate(lines, 1):
        line = raw.strip()
        if not line:
            continue
        try:
            record = _parse_record(line)
            _check_length(session, record["prompt"], "prompt")
            if "system" in record and record["system"] != session.conversation.system:
                _set_system(session, record["system"])
            elif record.get("reset"):
                session.reset()
            reply = "".join(session.send(record["prompt"]))
            last = session.last
            assert last is not None
            answer: dict[str, Any] = {
                "prompt": record["prompt"],
                "reply": reply,
                "prompt_tokens": last.prompt_tokens,
                "completion_tokens": last.completion_tokens,
                "evaluated_tokens": last.evaluated_tokens,
                "seconds": round(last.seconds, 4),
            }
            result.answered += 1
        except (UsageError, ContextError) as e:
            error(f"line {number}: {e}")
            answer = {"line": number, "error": str(e)}
            result.failed += 1
        out.write(json.dumps(answer, ensure_ascii=False) + "\n")
        out.flush()
    return result
