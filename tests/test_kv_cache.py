"""The KV state policy on the real engine: when it is written, and that it never claims tokens the
conversation no longer has (after /undo, eviction, an edit); the reply ids kept in session files."""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
from conftest import Models

from wizardchat.chat.kv_cache import KvCache
from wizardchat.chat.kv_store import KvStore, tokens_digest
from wizardchat.chat.session import ChatSession
from wizardchat.chat.session_file import SavedSession, SavedTurn, parse

Factory = Callable[..., Any]


def _setup(
    engine_factory: Factory, model: Path, tmp_path: Path, *, ctx: int = 1024, every: int = 10**9
) -> tuple[Any, ChatSession, KvCache, KvStore, list[str]]:
    engine = engine_factory(model, ctx_size=ctx, temperature=0)
    notes: list[str] = []
    session = ChatSession(engine, system="Be brief.", max_tokens=12, notify=notes.append)
    store = KvStore(tmp_path / "kv", 10**9)
    return engine, session, KvCache(engine, store, notes.append, save_every=every), store, notes


def _holds_prefix(store: KvStore, name: str, tokens: list[int]) -> bool:
    record = store.read(name)
    assert record is not None
    n = record.n_tokens
    return n <= len(tokens) and tokens_digest(tokens[:n]) == record.tokens_sha256


def test_a_reply_writes_the_state_only_when_it_grew_enough_and_leaving_always(
    models: Models, engine_factory: Factory, tmp_path: Path
) -> None:
    _, session, kv, store, _ = _setup(engine_factory, models.random, tmp_path, every=60)
    session.send("one").text()
    kv.checkpoint("s", session.conversation.tokens())
    assert store.read("s") is None  # grew by less than 60 tokens: not written
    session.send("two, a longer message than the first one was").text()
    kv.checkpoint("s", session.conversation.tokens())
    first = store.read("s")
    assert first is not None and first.n_tokens > 60
    session.send("three").text()
    kv.checkpoint("s", session.conversation.tokens())
    assert store.read("s") == first  # 20-odd tokens more: not rewritten
    kv.checkpoint("s", session.conversation.tokens(), leaving=True)
    last = store.read("s")
    assert last is not None and last.n_tokens > first.n_tokens
    assert _holds_prefix(store, "s", session.conversation.tokens())


def test_after_undo_the_stale_state_is_dropped_then_replaced(
    models: Models, engine_factory: Factory, tmp_path: Path
) -> None:
    _, session, kv, store, _ = _setup(engine_factory, models.random, tmp_path)
    session.send("one").text()
    session.send("two").text()
    kv.checkpoint("s", session.conversation.tokens(), leaving=True)
    assert _holds_prefix(store, "s", session.conversation.tokens())

    session.drop_last()  # /undo: the state holds turn two, which the conversation lost
    kv.checkpoint("s", session.conversation.tokens())  # the save after /undo
    assert store.read("s") is None
    assert not (tmp_path / "kv" / "s.kv").exists()

    kv.checkpoint("s", session.conversation.tokens(), leaving=True)
    assert _holds_prefix(store, "s", session.conversation.tokens())


def test_after_eviction_the_state_matches_the_window_the_model_sees(
    models: Models, engine_factory: Factory, tmp_path: Path
) -> None:
    _, session, kv, store, notes = _setup(engine_factory, models.random, tmp_path, ctx=256)
    session.send("the first message, which will be evicted later on").text()
    kv.checkpoint("s", session.conversation.tokens(), leaving=True)
    for i in range(12):
        session.send(f"message number {i} with some words in it").text()
        kv.checkpoint("s", session.conversation.tokens())
        if session.conversation.evicted:
            break
    assert session.conversation.evicted, notes  # the context filled up
    tokens = session.conversation.tokens()
    record = store.read("s")
    assert record is None or _holds_prefix(store, "s", tokens)  # never the pre-eviction state
    kv.checkpoint("s", tokens, leaving=True)
    assert _holds_prefix(store, "s", tokens)


def test_a_state_holding_a_prefix_is_restored_and_only_the_rest_evaluated(
    models: Models, engine_factory: Factory, tmp_path: Path
) -> None:
    engine, session, kv, store, notes = _setup(engine_factory, models.random, tmp_path)
    session.send("one").text()
    kv.checkpoint("s", session.conversation.tokens(), leaving=True)
    session.send("two").text()  # then a crash: the state holds turn one only
    tokens = session.conversation.tokens()
    held = store.read("s")
    assert held is not None

    engine.kv_keep(0)  # a new process: nothing cached
    assert kv.restore("s", tokens) == held.n_tokens
    assert any(note.startswith(f"restored {held.n_tokens:,} tokens in ") for note in notes), notes
    reply = session.send("three")
    reply.text()
    not_held = len(tokens) - held.n_tokens
    assert reply.result.evaluated_tokens <= not_held + len(
        session.conversation.turns[-1].user_tokens
    )


def test_a_restore_that_llama_cpp_refuses_leaves_an_empty_cache_and_says_why(
    models: Models, engine_factory: Factory, tmp_path: Path
) -> None:
    engine, session, kv, store, notes = _setup(engine_factory, models.random, tmp_path)
    session.send("one").text()
    tokens = session.conversation.tokens()
    kv.checkpoint("s", tokens, leaving=True)
    record = store.read("s")
    assert record is not None
    kv_file = store.kv_path("s")
    data = bytearray(kv_file.read_bytes())
    data[0:4] = b"XXXX"  # not a sequence-state file any more, same size
    kv_file.write_bytes(bytes(data))
    assert kv.restore("s", tokens) == 0
    assert notes[-1].startswith("saved KV state of 's' not used: llama.cpp could not read it")
    assert engine.llm.n_tokens == 0 and engine.kv_held(tokens) == 0


# --- reply ids in the session file ------------------------------------------------------------


def test_reply_ids_survive_the_file_and_are_used_only_where_they_spell_the_reply(
    models: Models, engine_factory: Factory
) -> None:
    engine = engine_factory(models.random, temperature=0)
    session = ChatSession(engine, system="Be brief.", max_tokens=12)
    session.send("one").text()
    session.send("two").text()
    generated = [list(t.reply_tokens) for t in session.conversation.turns]

    saved = SavedSession(
        "s",
        "Be brief.",
        [SavedTurn(t.user, t.reply, t.interrupted, list(t.reply_tokens))
         for t in session.conversation.turns],
    )  # fmt: skip
    back = parse(json.dumps(saved.to_json()))
    assert [t.reply_tokens for t in back.turns] == generated

    back.turns[0].reply = back.turns[0].reply + " (edited)"  # a hand-edited reply
    back.turns[1].reply_tokens = [10**9]  # ids of some other vocabulary
    session.restore(back.system, back.turns)
    restored = session.conversation.turns
    assert restored[0].reply_tokens == engine.tokenize(back.turns[0].reply)
    assert restored[1].reply_tokens == engine.tokenize(back.turns[1].reply)

    session.restore(saved.system, saved.turns)  # untouched: the very ids, not a re-tokenization
    assert [t.reply_tokens for t in session.conversation.turns] == generated


@pytest.mark.parametrize("ids", ['"1 2 3"', "[1, true]", "[-1]", "[1.5]", f"[{2**31}]", '{"a": 1}'])
def test_reply_ids_of_the_wrong_type_make_the_file_unreadable(ids: str) -> None:
    text = (
        '{"version": 1, "system": "", "turns": [{"user": "a", "reply": "b", '
        f'"reply_tokens": {ids}}}]}}'
    )
    with pytest.raises(ValueError, match="'reply_tokens' is not a list of token ids"):
        parse(text)


def test_files_without_reply_ids_still_load() -> None:
    text = '{"version": 1, "system": "", "turns": [{"user": "a", "reply": "b"}]}'
    assert parse(text).turns[0].reply_tokens is None
