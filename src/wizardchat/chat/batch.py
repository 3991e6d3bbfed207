"""Scripted batch mode: user turns from a pipe, one per line (plain text or JSONL)."""

from __future__ import annotations

import contextlib
import json
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from typing import Any, TextIO

from wizardchat.chat.conversation import MIN_REPLY_TOKENS, user_segment
from wizardchat.chat.recording import Recording, free_name
from wizardchat.chat.reply import Reply, TurnResult
from wizardchat.chat.session import ChatSession
from wizardchat.errors import ContextError, UsageError
from wizardchat.inputs import check_fits, repair_text
from wizardchat.safe_text import json_safe, stream_plain
from wizardchat.signals import Termination


@dataclass
class BatchResult:
    """How a batch went: how many lines were refused, and whether a signal ended it."""

    failed: int = 0
    terminated: int = 0  # the exit status a SIGTERM/SIGHUP mid-reply asks for (0: none)


@dataclass
class Batch:
    """One scripted conversation: the session, and optionally its file and signal handling."""

    session: ChatSession
    error: Callable[[str], None]
    recording: Recording | None = None  # --session/--resume: saved after every reply
    termination: Termination | None = None
    result: BatchResult = field(default_factory=BatchResult)

    def reset(self, system: str | None = None) -> None:
        """A new conversation; a saved one stays as it is and the new one gets its own name.

        A system prompt that leaves no room for a message is refused (ContextError) and the
        conversation goes on as it was.
        """
        old_conversation = self.session.conversation
        had_turns = bool(old_conversation.turns)
        if system is None:
            self.session.reset()
        else:
            _set_system(self.session, system)
        if self.recording is not None and had_turns:
            old = self.recording.name
            name = free_name(self.recording.store)
            old_recording = self.recording
            old_recording.save(old_conversation, leaving=True)  # its KV state, before it goes
            self.recording = Recording(
                old_recording.store,
                name,
                old_recording.model,
                model_ref=old_recording.model_ref,
                kv=old_recording.kv,
            )
            self.error(f"new conversation, saved as '{name}' ('{old}' keeps the previous one)")

    def answer(self, text: str, show: Callable[[Reply], object]) -> Reply:
        """The reply to `text`, done: `show` reads it as it streams; the turn is saved however
        the reply ends. A cut or empty reply gets its mark on stderr (the replies stay exact)."""
        reply = self.session.send(text)
        replying = self.termination.replying() if self.termination else contextlib.nullcontext()
        with replying:
            try:
                show(reply)
            finally:
                reply.close()  # records the turn now, even if writing the reply failed
                if self.recording is not None:
                    self.recording.save(self.session.conversation)
        if self.termination is not None and self.termination.received:
            self.result.terminated = self.termination.exit_code
        last = reply.result
        if last.finish != "interrupted":  # a signal's end needs no mark
            mark = last.end_mark()
            if mark:
                self.error(mark)
        return reply


def answer_record(reply: TurnResult, model: str) -> dict[str, Any]:
    """One answer as JSON, the same fields for `ask --json` and each `run --jsonl` line.

    No total time: it is `timings.prompt_seconds + timings.decode_seconds`.
    """
    return {
        "reply": reply.reply,
        "model": model,
        "prompt_tokens": reply.prompt_tokens,
        "completion_tokens": reply.completion_tokens,
        "evaluated_tokens": reply.evaluated_tokens,
        "finish": reply.finish,
        "timings": reply.timings,
    }


def _slash_command(batch: Batch, line: str) -> None:
    name, _, arg = line[1:].partition(" ")
    if name == "reset":
        batch.reset()
    elif name == "system" and not arg.strip():
        # As in the REPL, /system alone shows the prompt; on stderr, so stdout stays replies.
        batch.error(f"system prompt: {batch.session.conversation.system or '(none)'}")
    elif name == "system":
        batch.reset(system=arg.strip())
    else:
        raise UsageError(
            f"unknown command /{name} (batch mode knows /reset, /system [TEXT] and //TEXT)"
        )


def _check_length(session: ChatSession, text: str, what: str) -> None:
    check_fits(text, session.conversation.n_ctx, f"{what} too long")


def _set_system(session: ChatSession, system: str) -> None:
    """Start a new conversation with `system`, unless it leaves no room for a message (then the
    conversation goes on as it was)."""
    _check_length(session, system, "system prompt")
    conv = session.conversation
    system_tokens = 1 + (len(conv.tokenize(system)) if system else 0)  # BOS, then the text
    # The shortest exchange: an empty user turn and the least room a reply needs.
    least = system_tokens + len(conv.tokenize(user_segment(""))) + MIN_REPLY_TOKENS
    if least > conv.n_ctx:
        raise ContextError(
            f"system prompt too long: {system_tokens} tokens leave no room for a message in the "
            f"{conv.n_ctx}-token context; the previous one is kept"
        )
    session.reset(system=system)


def run_lines(batch: Batch, lines: Iterable[str], out: TextIO) -> BatchResult:
    """Each non-empty line is a user turn; a line starting with / is a command."""
    result = batch.result
    for number, raw in enumerate(lines, 1):
        line = raw.rstrip("\r\n")
        if not line.strip():
            continue
        try:
            _check_length(batch.session, line, "message")
            if line.startswith("//"):
                line = line[1:]  # the REPL's escape: send text that begins with /
            elif line.startswith("/"):
                _slash_command(batch, line)
                continue
            text = batch.answer(line, lambda reply: stream_plain(reply, out)).text()
            out.write("\n\n" if not text.endswith("\n") else "\n")
            out.flush()
        except (UsageError, ContextError) as e:
            batch.error(f"line {number}: {e}")
            result.failed += 1
        if result.terminated:
            break
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


def run_jsonl(batch: Batch, lines: Iterable[str], out: TextIO) -> BatchResult:
    """Each line is {"prompt", optional "system", "reset"}; each answer is one JSON line."""
    result, session, error = batch.result, batch.session, batch.error
    for number, raw in enumerate(lines, 1):
        line = raw.strip()
        if not line:
            continue
        try:
            record = _parse_record(line)
            _check_length(session, record["prompt"], "prompt")
            if "system" in record and record["system"] != session.conversation.system:
                batch.reset(system=record["system"])
            elif record.get("reset"):
                batch.reset()
            reply = batch.answer(record["prompt"], Reply.text)
            answer: dict[str, Any] = {
                "prompt": record["prompt"],
                **answer_record(reply.result, session.engine.model_name),
            }
        except (UsageError, ContextError) as e:
            error(f"line {number}: {e}")
            answer = {"line": number, "error": str(e)}
            result.failed += 1
        out.write(json_safe(json.dumps(answer, ensure_ascii=False)) + "\n")
        out.flush()
        if result.terminated:
            break
    return result
