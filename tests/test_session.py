"""A chat session on the real llama.cpp: prefix reuse, streaming, stops, cancellation, budget."""

from __future__ import annotations

import pytest
from gguf_models import SCRIPT_REPLY

from wizardchat.chat.reply import ReplyNotDone, StopScanner
from wizardchat.chat.session import ChatSession
from wizardchat.errors import ContextError
from wizardchat.settings import DEFAULT_SYSTEM_PROMPT


def _session(engine, **kw) -> ChatSession:  # type: ignore[no-untyped-def]
    return ChatSession(engine, system=DEFAULT_SYSTEM_PROMPT, **kw)


def test_later_turns_evaluate_only_the_new_tokens(models, engine_factory) -> None:
    session = _session(engine_factory(models.scripted))
    questions = ["Hi", "Who are you?", "What is two plus three? Tell me more about it."]
    evaluated, new_tokens, prompts = [], [], []
    for q in questions:
        new_tokens.append(len(session.conversation.new_turn(q).user_tokens))
        reply = session.send(q)
        assert reply.text() == SCRIPT_REPLY
        evaluated.append(reply.result.evaluated_tokens)
        prompts.append(reply.result.prompt_tokens)
    assert evaluated[0] == prompts[0]  # a fresh context evaluates the whole first prompt
    for k in (1, 2):
        assert evaluated[k] <= new_tokens[k] + 8, (evaluated, new_tokens)


def test_reply_streams_multibyte_text_split_over_tokens_without_replacement(
    models, engine_factory
) -> None:
    session = _session(engine_factory(models.scripted))
    chunks = list(session.send("Hi"))
    reply = "".join(chunks)
    assert reply == SCRIPT_REPLY  # "€" is three byte tokens in the script
    assert "\ufffd" not in reply
    assert not reply.startswith(" ")
    assert len(chunks) > 3  # streamed, not delivered at the end
    assert session.conversation.turns[0].reply == SCRIPT_REPLY


def test_model_starting_a_user_turn_is_stopped_and_that_text_dropped(
    models, engine_factory
) -> None:
    session = _session(engine_factory(models.user_turn))
    reply = session.send("Hi")
    assert reply.text() == "Hi"  # neither "USER:" nor the newline before it
    assert reply.result.finish == "stop"
    assert "USER" not in session.conversation.turns[0].reply
    # The history still ends the turn with EOS, and the next turn works.
    assert "".join(session.send("again")) == "Hi"


def test_the_newline_before_a_model_started_user_turn_is_not_in_the_history_tokens(
    models, engine_factory
) -> None:
    engine = engine_factory(models.user_turn)
    session = _session(engine)
    list(session.send("Hi"))
    turn = session.conversation.turns[0]
    # The card's format: "...reply</s>USER:", no whitespace between the reply and EOS.
    assert engine.llm.detokenize(turn.reply_tokens).decode() == " Hi"
    assert session.conversation.text().endswith("ASSISTANT: Hi</s>")


def test_stop_scanner_holds_back_only_what_may_start_user_colon() -> None:
    scanner = StopScanner()
    released = []
    for i, piece in enumerate([" The", " US", "A is", " big.", "\n", "US", "ER", ":", " more"]):
        released += scanner.push(i, piece)
        if scanner.stopped:
            break
    assert "".join(p for _, p in released) == " The USA is big."
    assert scanner.stopped


def test_stop_scanner_releases_held_whitespace_when_no_stop_follows() -> None:
    scanner = StopScanner()
    released = []
    for i, piece in enumerate([" One", "\n", "\n", "US", "A", " two", "\n"]):
        released += scanner.push(i, piece)
    released += scanner.flush()
    assert "".join(p for _, p in released) == " One\n\nUSA two\n"
    assert not scanner.stopped


def test_stop_scanner_keeps_a_token_that_holds_text_and_the_newline() -> None:
    scanner = StopScanner()
    released = []
    for i, piece in enumerate([" ok.\n", "USER", ":"]):
        released += scanner.push(i, piece)
    assert "".join(p for _, p in released) == " ok.\n"  # the text is never lost
    assert scanner.stopped


def test_cancel_keeps_the_partial_reply_and_the_next_turn_works(models, engine_factory) -> None:
    session = _session(engine_factory(models.scripted))
    reply = session.send("Hi")
    stream = iter(reply)
    first = next(stream)
    session.cancel()
    rest = list(stream)
    assert reply.result.finish == "interrupted"
    turn = session.conversation.turns[0]
    assert turn.interrupted and turn.reply == first + "".join(rest)
    assert SCRIPT_REPLY.startswith(turn.reply) and turn.reply != SCRIPT_REPLY
    second = session.send("Who are you?")
    assert second.text() == SCRIPT_REPLY
    assert second.result.evaluated_tokens <= len(session.conversation.turns[1].user_tokens) + 8


def test_consumer_interrupt_records_the_turn(models, engine_factory) -> None:
    session = _session(engine_factory(models.scripted))
    reply = session.send("Hi")
    stream = iter(reply)
    shown = next(stream) + next(stream)
    reply.close()  # what Ctrl-C in the renderer does
    assert session.conversation.turns[0].reply == shown
    assert session.conversation.turns[0].interrupted
    assert "".join(session.send("Hi")) == SCRIPT_REPLY


def test_the_result_is_there_once_the_reply_is_done_and_not_before(models, engine_factory) -> None:
    session = _session(engine_factory(models.scripted))
    reply = session.send("Hi")
    with pytest.raises(ReplyNotDone):
        reply.result  # noqa: B018
    stream = iter(reply)
    first = next(stream)
    with pytest.raises(ReplyNotDone):
        reply.result  # noqa: B018
    assert not reply.done and session.conversation.turns == []
    assert first + "".join(stream) == SCRIPT_REPLY
    assert reply.done and reply.result.finish == "eos" and reply.result.reply == SCRIPT_REPLY
    assert reply.result.completion_tokens == len(session.conversation.turns[0].reply_tokens)
    assert "".join(reply) == reply.text() == SCRIPT_REPLY  # a done reply reads again


def test_a_reply_closed_before_it_is_read_keeps_the_message(models, engine_factory) -> None:
    session = _session(engine_factory(models.scripted))
    reply = session.send("Hi")
    reply.close()  # e.g. the terminal went away before the first chunk was shown
    assert reply.result.finish == "interrupted" and reply.result.dropped
    assert [t.user for t in session.conversation.turns] == ["Hi"]  # said, so kept
    assert session.conversation.window() == []
    assert session.send("Hi").text() == SCRIPT_REPLY


def test_max_tokens_ends_the_reply(models, engine_factory) -> None:
    session = _session(engine_factory(models.scripted), max_tokens=2)
    reply = session.send("Hi")
    assert reply.text() == "Hello,"
    assert reply.result.finish == "length"
    assert reply.result.completion_tokens == 2


def test_full_context_evicts_old_turns_and_says_so(models, engine_factory) -> None:
    notes: list[str] = []
    engine = engine_factory(models.scripted, ctx_size=256)
    session = ChatSession(engine, system=DEFAULT_SYSTEM_PROMPT, max_tokens=16, notify=notes.append)
    for i in range(20):
        assert "".join(session.send(f"What is two plus three {i}")) == SCRIPT_REPLY
    assert any("no longer sees the" in n and "oldest turn" in n for n in notes)
    assert len(session.conversation.window()) < 20
    assert len(session.conversation.tokens()) <= 256
    # Eviction limits what the model sees, never what was said.
    assert [t.user for t in session.conversation.turns] == [
        f"What is two plus three {i}" for i in range(20)
    ]


def test_a_prompt_aborted_before_any_reply_token_is_kept_but_not_seen(
    models, engine_factory
) -> None:
    session = _session(engine_factory(models.slow, ctx_size=8192), max_tokens=5)
    session.abort_prompt = True
    list(session.send("Hi"))
    big = "word " * 3000
    reply = session.send(big)
    session.cancel()  # as the REPL's Ctrl-C does while the prompt is evaluated
    assert list(reply) == []
    assert reply.result.finish == "interrupted"
    assert reply.result.dropped
    # What the user said stays in the transcript; the model no longer sees it.
    assert [t.user for t in session.conversation.turns] == ["Hi", big]
    assert session.conversation.turns[1].interrupted and session.conversation.turns[1].reply == ""
    assert [t.user for t in session.conversation.window()] == ["Hi"]
    # The next message does not evaluate the aborted one again.
    next_reply = session.send("Who are you?")
    next_reply.text()
    assert next_reply.result.evaluated_tokens < 100
    assert [t.user for t in session.conversation.window()] == ["Hi", "Who are you?"]


def test_a_message_longer_than_the_context_is_refused(models, engine_factory) -> None:
    session = _session(engine_factory(models.scripted, ctx_size=256))
    with pytest.raises(ContextError):
        list(session.send("word " * 400))
    assert session.conversation.turns == []
    assert "".join(session.send("Hi")) == SCRIPT_REPLY


def test_reset_and_new_system_prompt(models, engine_factory) -> None:
    session = _session(engine_factory(models.scripted))
    list(session.send("Hi"))
    session.reset(system="Be brief.")
    assert session.conversation.turns == []
    assert session.conversation.text(session.conversation.new_turn("x")).startswith(
        "Be brief. USER:"
    )
