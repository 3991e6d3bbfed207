"""Scripted batch mode: user turns from a pipe, one per line (plain text or JSONL)."""

from __future__ import annotations

import json
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import Any, TextIO

from wizardchat.errors import ContextError, UsageError
from wizardchat.render import stream_plain
from wizardchat.safe_text import json_safe
from wizardchat.session import ChatSession


@dataclass
class BatchResult:
    """How a batch went: answered turns and lines that were refused."""

    answered: int = 0
    failed: int = 0


def _slash_command(session: ChatSession, line: str) -> None:
    name, _, arg = line[1:].partition(" ")
    if name == "reset":
        session.reset()
    elif name == "system":
        session.reset(system=arg.strip())
    else:
        raise UsageError(f"unknown command /{name} (batch mode knows /reset and /system TEXT)")


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
            if line.startswith("/"):
                _slash_command(session, line)
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
    if not isinstance(record, dict):
        raise UsageError('expected an object like {"prompt": "..."}')
    if not isinstance(record.get("prompt"), str) or not record["prompt"].strip():
        raise UsageError('"prompt" must be a non-empty string')
    if "system" in record and not isinstance(record["system"], str):
        raise UsageError('"system" must be a string')
    if "reset" in record and not isinstance(record["reset"], bool):
        raise UsageError('"reset" must be true or false')
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
            if "system" in record and record["system"] != session.conversation.system:
                session.reset(system=record["system"])
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
        out.write(json_safe(json.dumps(answer, ensure_ascii=False)) + "\n")
        out.flush()
    return result
