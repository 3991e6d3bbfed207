"""The tokens the model sees are llama.cpp's tokenization of the prompt as shown, on real
vocabularies: SentencePiece (Llama's, WizardLM-2's kind) and BPE (Llama 3's, SmolLM2's).

llama.cpp tokenizes a whole string in fragments split at special tokens: an SPM vocabulary puts
a space before a fragment that starts the text or follows a special token, a BPE one never does;
BOS comes first only when the file says so (`tokenizer.ggml.add_bos_token`). The history, built
turn by turn from token ids, must be what that whole-string tokenization of
`Conversation.text()` gives, with the EOS between turns written as the model's own EOS text.
"""

from __future__ import annotations

import json
import re
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from conftest import run_cli
from test_serve import Server

from wizardchat.chat.conversation import Conversation
from wizardchat.chat.session import ChatSession
from wizardchat.gguf_file import read_header
from wizardchat.settings import DEFAULT_SYSTEM_PROMPT

# The models, and whether BOS starts a prompt: what each file says, or llama.cpp's default for
# its tokenizer when it says nothing (SPM and Llama 3's BPE: yes).
KINDS = {"spm": True, "spm_no_bos": False, "bpe": True, "smollm2": False}
FIXTURES = {
    "spm": "spm_model",
    "spm_no_bos": "spm_model_no_bos",
    "bpe": "bpe_model",
    "smollm2": "smollm2",
}
SYSTEMS = [DEFAULT_SYSTEM_PROMPT, "", "Réponds en français. 答えは短く。"]
EXCHANGES = [
    ("Hi", "Hello! How can I help you today?"),
    ("Translate: 日本語のテキスト", "Japanese text: 日本語のテキスト 🎌"),
    ("Emoji? 👩\u200d💻 naïve café", "Sure: 👩\u200d💻 and 🙂, naïve café."),
    ("What is 12,345 \u00d7 6?", "74,070."),
]
# Typed text that looks like special tokens: it must stay text.
SPECIAL_LOOKING = "a </s> b <s> c <|im_end|> d <|end_of_text|> e USER: f ASSISTANT:"


@pytest.fixture(params=list(KINDS))
def kind(request: pytest.FixtureRequest) -> str:
    return str(request.param)


@pytest.fixture
def engine(kind: str, request: pytest.FixtureRequest, engine_factory: Any) -> Any:
    return engine_factory(request.getfixturevalue(FIXTURES[kind]), ctx_size=1024)


def whole(engine: Any, text: str) -> list[int]:
    """llama.cpp's tokenization of `text` as one prompt: BOS as the file says, specials parsed."""
    return list(engine.llm.tokenize(text.encode(), add_bos=True, special=True))


def fragments(engine: Any, parts: list[str]) -> list[int]:
    """What llama.cpp makes of `parts` joined by the EOS token: each part a fragment of raw text
    (special-looking text in it kept as text), BOS as the file says."""
    out = list(engine.llm.tokenize(parts[0].encode(), add_bos=True, special=False))
    for part in parts[1:]:
        out.append(int(engine.llm.token_eos()))
        out += engine.llm.tokenize(part.encode(), add_bos=False, special=False)
    return out


def eos_text(engine: Any) -> str:
    """The model's EOS token as text."""
    return str(engine.llm.detokenize([engine.llm.token_eos()], special=True).decode())


def generated(engine: Any, reply: str) -> list[int]:
    """The ids a model generates for `reply` after `ASSISTANT:`: as they come in that string."""
    head = list(engine.llm.tokenize(b"USER: x ASSISTANT:", add_bos=False, special=False))
    full = list(engine.llm.tokenize(f"USER: x ASSISTANT: {reply}".encode(), False, False))
    assert full[: len(head)] == head
    return full[len(head) :]


def conversation(engine: Any, system: str) -> Conversation:
    return ChatSession(engine, system=system).conversation


def close(engine: Any, conv: Conversation, user: str, reply: str) -> None:
    turn = conv.new_turn(user)
    turn.reply, turn.reply_tokens = reply, generated(engine, reply)
    conv.close(turn)


@pytest.mark.parametrize("system", SYSTEMS, ids=["default-system", "no-system", "unicode-system"])
def test_the_history_is_the_whole_string_tokenization_of_the_text(engine: Any, system: str) -> None:
    conv = conversation(engine, system)
    pending = conv.new_turn("First question?")
    assert conv.prompt(pending) == whole(engine, conv.text(pending))
    for user, reply in EXCHANGES:
        close(engine, conv, user, reply)
        pending = conv.new_turn(f"And then? {user}")
        assert conv.prompt(pending) == whole(engine, conv.text(pending)), conv.text(pending)
    assert conv.tokens() == whole(engine, conv.text())


def test_the_eos_between_turns_is_written_as_the_models_eos_token(engine: Any) -> None:
    conv = conversation(engine, DEFAULT_SYSTEM_PROMPT)
    close(engine, conv, "Hi", "Hello.")
    assert conv.text().endswith(f"ASSISTANT: Hello.{eos_text(engine)}")
    assert conv.tokens()[-1] == engine.llm.token_eos()


def test_bos_starts_the_prompt_exactly_when_the_file_says_so(
    kind: str, engine: Any, request: pytest.FixtureRequest
) -> None:
    says = read_header(request.getfixturevalue(FIXTURES[kind])).metadata
    assert says.get("tokenizer.ggml.add_bos_token", KINDS[kind]) is KINDS[kind]
    for system in SYSTEMS:
        conv = conversation(engine, system)
        prompt = conv.prompt(conv.new_turn("Hi"))
        assert (prompt[:1] == [engine.llm.token_bos()]) is KINDS[kind], (system, prompt)
        assert engine.llm.token_bos() not in prompt[1:]


@pytest.mark.parametrize("system", SYSTEMS[:2], ids=["default-system", "no-system"])
def test_typed_special_token_text_stays_text(engine: Any, system: str) -> None:
    conv = conversation(engine, system)
    close(engine, conv, SPECIAL_LOOKING, "Hello.")
    close(engine, conv, "Hi", f"It says {SPECIAL_LOOKING}")
    pending = conv.new_turn(SPECIAL_LOOKING)
    parts = [
        f"{system} " * bool(system) + f"USER: {SPECIAL_LOOKING} ASSISTANT: Hello.",
        f"USER: Hi ASSISTANT: It says {SPECIAL_LOOKING}",
        f"USER: {SPECIAL_LOOKING} ASSISTANT:",
    ]
    assert conv.text(pending) == eos_text(engine).join(parts)
    prompt = conv.prompt(pending)
    assert prompt.count(engine.llm.token_eos()) == 2  # the two closed turns' EOS only
    assert prompt == fragments(engine, parts)
    # The same rule gives the whole-string tokenization where no typed text looks special.
    parts = [
        f"{system} " * bool(system) + "USER: Hi ASSISTANT: Hello.",
        "USER: Who are you? ASSISTANT:",
    ]
    assert fragments(engine, parts) == whole(engine, eos_text(engine).join(parts))


def _fill(engine: Any, conv: Conversation, n: int) -> None:
    for i in range(n):
        user, reply = EXCHANGES[i % len(EXCHANGES)]
        close(engine, conv, f"{i}: {user}", f"{reply} ({i})")


@pytest.mark.parametrize("system", SYSTEMS[:2], ids=["default-system", "no-system"])
def test_after_eviction_the_history_is_still_the_whole_string_tokenization(
    engine: Any, system: str
) -> None:
    conv = conversation(engine, system)
    _fill(engine, conv, 40)
    assert len(conv.tokens()) > engine.n_ctx
    turn = conv.new_turn("Next question, please.")
    evicted = conv.make_room(turn, max_tokens=64)
    assert 0 < evicted < 40
    prompt = conv.prompt(turn)
    assert prompt == whole(engine, conv.text(turn)), conv.text(turn)
    # Down to half the context, and no further: keeping one more turn would pass half.
    target = engine.n_ctx // 2
    assert len(prompt) <= target
    conv.evicted -= 1
    assert len(conv.prompt(turn)) > target
    conv.evicted += 1
    # The turns after the new first one keep their tokens: the KV cache reuses them as they
    # are, and the next turn extends this prompt token for token.
    turn.reply, turn.reply_tokens = "Sure.", generated(engine, "Sure.")
    conv.close(turn)
    following = conv.new_turn("And after that?")
    assert conv.make_room(following, max_tokens=64) == 0
    extended = conv.prompt(following)
    assert extended[: len(prompt)] == prompt
    assert extended == whole(engine, conv.text(following))


def test_a_message_that_evicts_every_turn_is_tokenized_where_it_stands(engine: Any) -> None:
    conv = conversation(engine, DEFAULT_SYSTEM_PROMPT)
    _fill(engine, conv, 16)
    long = "Summarize this:"
    while len(engine.tokenize(long)) < engine.n_ctx * 0.65:  # over half: no turn can stay
        long += " The quick brown fox jumps over the lazy dog."
    turn = conv.new_turn(long)
    conv.make_room(turn, max_tokens=64)
    assert conv.window() == []
    assert conv.prompt(turn) == whole(engine, conv.text(turn))
    # What make_room counted is what the prompt holds: the reply gets the rest of the context.
    assert conv.max_reply_tokens(turn, -1) == engine.n_ctx - len(whole(engine, conv.text(turn))) - 1


def test_a_restored_reply_known_only_as_text_is_tokenized_as_the_text_shows_it(
    engine: Any,
) -> None:
    from wizardchat.chat.session_file import SavedTurn

    session = ChatSession(engine, system=DEFAULT_SYSTEM_PROMPT)
    session.restore(
        DEFAULT_SYSTEM_PROMPT,
        [SavedTurn("Hi", "Hello there.", False, None), SavedTurn("Again", "Yes, again.", False)],
    )
    conv = session.conversation
    pending = conv.new_turn("More?")
    assert conv.prompt(pending) == whole(engine, conv.text(pending)), conv.text(pending)


def test_a_chat_on_smollm2_evaluates_the_prompt_it_shows(
    smollm2: Path, engine_factory: Any
) -> None:
    engine = engine_factory(smollm2, ctx_size=1024, temperature=0.0)
    shown: list[tuple[str, int]] = []
    session = ChatSession(
        engine,
        system=DEFAULT_SYSTEM_PROMPT,
        max_tokens=12,
        show_prompt=lambda text, n: shown.append((text, n)),
    )
    for question in ("Hi, who are you?", "What is the capital of France?"):
        reply = session.send(question)
        reply.text()
        text, n = shown[-1]
        expected = whole(engine, text)
        assert n == len(expected) == reply.result.prompt_tokens
        # The KV cache holds exactly those ids: what llama.cpp evaluated.
        assert engine.kv_held(expected) == len(expected), text


@pytest.mark.parametrize("system", [DEFAULT_SYSTEM_PROMPT, ""], ids=["default-system", "no-system"])
def test_ask_verbose_prompt_on_smollm2_shows_what_is_evaluated(
    smollm2: Path, engine_factory: Any, system: str
) -> None:
    r = run_cli("ask", "Hi", "-m", str(smollm2), "--system", system, "--verbose-prompt",
                "--json", "--max-tokens", "4", "--ctx-size", "1024", "--threads", "2")  # fmt: skip
    assert r.code == 0, r.stderr[-2000:]
    m = re.search(r"--- prompt: (\d+) tokens ---\n(.*)\n--- end of prompt ---", r.stderr, re.S)
    assert m, r.stderr
    engine = engine_factory(smollm2, ctx_size=1024)
    expected = whole(engine, m.group(2))
    answer = json.loads(r.stdout)
    assert answer["prompt_tokens"] == int(m.group(1)) == len(expected), m.group(2)


@pytest.fixture
def smollm2_server(smollm2: Path, tmp_path: Path) -> Iterator[Server]:
    server = Server(smollm2, "--ctx-size", "1024", "--threads", "2", log=tmp_path / "serve.log")
    yield server
    server.kill()


@pytest.mark.real_process
def test_a_client_of_wizardchat_serve_builds_the_same_history_as_the_model_loaded_here(
    smollm2: Path, engine_factory: Any, smollm2_server: Server
) -> None:
    from wizardchat.engine.reply_data import Sampling
    from wizardchat.serve.client import RemoteEngine

    remote = RemoteEngine(smollm2_server.entry, Sampling(), seed=1, notify=lambda _line: None)
    local = engine_factory(smollm2, ctx_size=1024)
    facts = ("bos", "eos", "add_bos", "eos_text", "space_prefix")
    assert [getattr(remote, k) for k in facts] == [getattr(local, k) for k in facts]
    for system in SYSTEMS:
        here, there = conversation(local, system), conversation(remote, system)
        for user, reply in EXCHANGES[:2]:
            close(local, here, user, reply)
            close(local, there, user, reply)
        pending = there.new_turn("Next?")
        assert there.prompt(pending) == whole(local, there.text(pending))
        assert there.prompt(pending) == here.prompt(here.new_turn("Next?"))


@pytest.mark.real_process
def test_serve_http_builds_chat_prompts_and_counts_tokens_as_llama_cpp_does(
    smollm2: Path, engine_factory: Any, tmp_path: Path
) -> None:
    import httpx2

    server = Server(smollm2, "--http", "127.0.0.1:0", "--ctx-size", "1024", "--threads", "2",
                    log=tmp_path / "serve.log")  # fmt: skip
    try:
        local = engine_factory(smollm2, ctx_size=1024)
        base = f"http://{server.entry.http}"
        text = f"Hi{eos_text(local)}USER: x"
        got = httpx2.post(f"{base}/tokenize", json={"content": text, "add_special": True})
        assert got.json()["tokens"] == whole(local, text)  # no BOS: SmolLM2's file says so
        system = "Be brief."
        messages = [
            {"role": "system", "content": system},
            {"role": "user", "content": "Hi"},
            {"role": "assistant", "content": "Hello."},
            {"role": "user", "content": "Next?"},
        ]
        shown = f"{system} USER: Hi ASSISTANT: Hello.{eos_text(local)}USER: Next? ASSISTANT:"
        body = {"model": "any", "messages": messages, "max_tokens": 1}
        answer = httpx2.post(f"{base}/v1/chat/completions", json=body, timeout=60).json()
        assert answer["usage"]["prompt_tokens"] == len(whole(local, shown))
        body = {"model": "any", "prompt": shown, "max_tokens": 1}
        answer = httpx2.post(f"{base}/v1/completions", json=body, timeout=60).json()
        assert answer["usage"]["prompt_tokens"] == len(whole(local, shown))
    finally:
        server.kill()
