"""The per-token path (engine/decoder.py) on a real trained model and on generated ones.

Replies are compared token for token with llama-cpp-python's own `Llama.generate` on the same
file (the peer wizardchat's decoder replaced), greedy and seeded; the KV cache's token record
is checked against llama.cpp's own view of the cache after every kind of reply end.
"""

from __future__ import annotations

import subprocess
import sys
import threading
from pathlib import Path
from typing import Any

import llama_cpp
import pytest
from conftest import Models

from wizardchat.engine.decoder import held_prefix
from wizardchat.engine.generate import PieceDecoder, Sampling, TokenStream

SEEDED = Sampling(temperature=0.8, top_p=0.9, top_k=40, min_p=0.05, repeat_penalty=1.15)


def _stream(engine: Any, prompt: list[int], n: int, **kw: Any) -> tuple[list[int], str, Any]:
    stream = TokenStream(engine.llm, prompt, kw.pop("sampling", engine.sampling), n, **kw)
    ids, text = [], []
    for token, piece in stream:
        ids.append(token)
        text.append(piece)
    return ids, "".join(text), stream.stats


def _cache_end(engine: Any) -> int:
    """llama.cpp's own highest cached position of sequence 0 (-1: empty)."""
    return int(llama_cpp.llama_memory_seq_pos_max(llama_cpp.llama_get_memory(engine.llm.ctx), 0))


def _peer_reply(engine: Any, prompt: list[int], n: int, sampling: Sampling) -> list[int]:
    """The same reply through llama-cpp-python's Llama.generate (the path wizardchat left),
    loaded with the engine's plan."""
    plan = engine.load_plan
    llm = llama_cpp.Llama(
        str(plan.path),
        n_ctx=plan.n_ctx,
        n_batch=plan.batch_size,
        n_ubatch=plan.ubatch_size,
        n_threads=plan.threads,
        n_threads_batch=plan.threads,
        flash_attn=plan.flash_attn,
        seed=engine.llm.seed,
        verbose=False,
    )
    try:
        out: list[int] = []
        for token in llm.generate(
            prompt,
            top_k=sampling.top_k,
            top_p=sampling.top_p,
            min_p=sampling.min_p,
            temp=sampling.temperature,
            repeat_penalty=sampling.repeat_penalty,
        ):
            if llama_cpp.llama_vocab_is_eog(llm._model.vocab, token) or len(out) >= n:
                break
            out.append(int(token))
        return out
    finally:
        llm.close()


@pytest.fixture
def smol(smollm2: Path, engine_factory: Any) -> Any:
    return engine_factory(smollm2, ctx_size=2048, threads=2, temperature=0.0, seed=7)


def _prompt(engine: Any, text: str) -> list[int]:
    return list(engine.llm.tokenize(text.encode(), add_bos=engine.add_bos, special=False))


STORY = "USER: Write a long story about a lighthouse keeper and a storm. ASSISTANT:"


@pytest.mark.parametrize("sampling", ["greedy", "seeded"])
def test_replies_are_llama_cpp_pythons_token_for_token(smol: Any, sampling: str) -> None:
    s = Sampling(temperature=0.0) if sampling == "greedy" else SEEDED
    prompt = _prompt(smol, STORY)
    ids, text, stats = _stream(smol, prompt, 48, sampling=s)
    assert len(ids) == 48 and stats.finish == "length"
    assert ids == _peer_reply(smol, prompt, 48, s)
    assert text == smol.llm.detokenize(ids).decode()
    # A reply again from the same seed is the same reply: each reply seeds its own sampler.
    assert _stream(smol, prompt, 48, sampling=s)[0] == ids


def test_the_cache_record_is_what_llama_cpp_holds_after_each_kind_of_end(smol: Any) -> None:
    prompt = _prompt(smol, STORY)
    ids, _, stats = _stream(smol, prompt, 12)
    assert stats.evaluated_tokens == len(prompt) and stats.finish == "length"
    # The last token is sampled but never decoded: the cache holds everything before it.
    assert smol.llm.tokens == prompt + ids[:-1]
    assert _cache_end(smol) == len(prompt) + len(ids) - 2

    cancel = threading.Event()
    stream = TokenStream(smol.llm, prompt, smol.sampling, 100, cancel)
    got = []
    for token, _ in stream:
        got.append(token)
        if len(got) == 3:
            cancel.set()
    assert got == ids[:3] and stream.stats.finish == "interrupted"
    assert stream.stats.evaluated_tokens == 1  # the prompt was cached: only its last token
    assert smol.llm.tokens == prompt + got[:-1] and _cache_end(smol) == len(smol.llm.tokens) - 1

    # The consumer stops reading (the chat's `USER:` stop closes the generator).
    stream = TokenStream(smol.llm, prompt, smol.sampling, 100)
    gen = iter(stream)
    first = [next(gen)[0] for _ in range(5)]
    gen.close()  # type: ignore[attr-defined]
    assert first == ids[:5] and stream.stats.finish == "interrupted"
    assert smol.llm.tokens == prompt + first[:-1] and _cache_end(smol) == len(smol.llm.tokens) - 1


def test_prefix_reuse_evaluates_only_what_the_cache_lacks(smol: Any) -> None:
    head = _prompt(smol, "USER: Name three rivers. ASSISTANT:")
    ids, _, _ = _stream(smol, head, 8)
    follow = head + ids + [smol.eos] + smol.tokenize("USER: And three mountains? ASSISTANT:")
    _, _, stats = _stream(smol, follow, 8)
    # The reply's last token was never decoded, so it is evaluated with the new message.
    assert stats.evaluated_tokens == len(follow) - (len(head) + len(ids) - 1)

    # Eviction: the oldest turn leaves the window, and only the BOS/system prefix is kept.
    evicted = head[:1] + smol.tokenize("USER: And three mountains? ASSISTANT:")
    warm, _, stats = _stream(smol, evicted, 8)
    assert stats.evaluated_tokens == len(evicted) - 1
    smol.kv_keep(0)
    cold, _, stats = _stream(smol, evicted, 8)
    assert stats.evaluated_tokens == len(evicted) and cold == warm


def test_a_cut_cache_reply_equals_a_fresh_one_on_a_generated_model(
    models: Models, engine_factory: Any
) -> None:
    engine = engine_factory(models.random, ctx_size=1024, temperature=0.0)
    a = [engine.bos, *engine.tokenize("USER: one two three four ASSISTANT:")]
    b = [engine.bos, *engine.tokenize("USER: five six ASSISTANT:")]
    _stream(engine, a, 20)
    warm, _, warm_stats = _stream(engine, b, 20)
    engine.kv_keep(0)
    cold, _, cold_stats = _stream(engine, b, 20)
    assert warm == cold and warm_stats.evaluated_tokens < cold_stats.evaluated_tokens


def test_pieces_carry_a_character_split_over_byte_tokens(spm_model: Path, engine_factory: Any):
    engine = engine_factory(spm_model, ctx_size=512)
    text = "héllo 世界 🙂 naïve ✓"
    ids = engine.llm.tokenize(text.encode(), add_bos=False, special=False)
    assert len(ids) > len(text.split())  # byte fallback: several tokens for one character
    decoder = PieceDecoder(engine.llm)
    pieces = [decoder.decode(t) for t in ids]
    assert "".join(pieces) == " " + text and "\ufffd" not in "".join(pieces)
    assert "" in pieces  # a token that ends inside a character yields nothing yet


@pytest.mark.parametrize(
    ("cached", "prompt", "held"),
    [
        ([], [1, 2], 0),
        ([1, 2, 3], [1, 2, 3], 3),
        ([1, 2, 3], [1, 2], 2),
        ([1, 2], [1, 2, 3], 2),
        ([5] * 3000, [5] * 1023 + [6], 1023),
        ([5] * 3000, [5] * 1024 + [6], 1024),
        ([5] * 3000, [5] * 2049 + [6] * 10, 2049),
        ([5] * 3000, [5] * 3000, 3000),
        ([7] + [5] * 3000, [5] * 3000, 0),
    ],
)
def test_held_prefix(cached: list[int], prompt: list[int], held: int) -> None:
    class Record:
        tokens = cached
        n_tokens = len(cached)

    assert held_prefix(Record(), prompt) == held  # type: ignore[arg-type]


def test_ask_loads_neither_numpy_nor_llama_cpp_pythons_high_level_package(models: Models):
    # `import llama_cpp` pulls in Llama, numpy, jinja2 and the chat formats: 0.13-0.2 s before
    # the model could load. ask drives llama.cpp through the bindings alone.
    script = (
        "import sys\n"
        "from wizardchat.entry import main\n"
        "try:\n"
        f"    main(['ask', 'Hi', '-m', {str(models.scripted)!r}, '-n', '3', '--no-server'])\n"
        "except SystemExit as e:\n"
        "    print('exit', e.code, file=sys.stderr)\n"
        "heavy = ['numpy', 'llama_cpp.llama', 'jinja2', 'llama_cpp.llama_chat_format']\n"
        "print([m for m in heavy if m in sys.modules], file=sys.stderr)\n"
    )
    proc = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True,
                          timeout=120, stdin=subprocess.DEVNULL)  # fmt: skip
    assert proc.stderr.splitlines()[-2:] == ["exit 0", "[]"], proc.stderr
