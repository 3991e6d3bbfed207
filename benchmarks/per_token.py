"""What a generated token costs outside llama.cpp: wizardchat's per-token path against
llama-cpp-python's `Llama.generate`, on the same model, in one process.

    .venv/bin/python benchmarks/per_token.py [--model GGUF] [--tokens N] [--rounds N] [--no-depth]

Whole-run timings on a shared 2-core machine move by 5-10 % from one run to the next, which
hides a per-token difference of 1 %. This measures the difference directly: `llama_decode` and
`llama_sampler_sample` are wrapped with a clock (the same wrapper for both paths: they are
looked up on the bindings module at each call), and what remains of each token's time is the
Python work around llama.cpp: batch filling, bookkeeping, detokenizing, the generator. Rounds
alternate between the two paths; medians are printed, per token, in microseconds.

Then the depth: the per-token cost with 100 and with 4000 tokens in the KV cache, through
wizardchat's path (the whole token) and inside llama.cpp (its decode and sampling alone), in the
same runs. llama.cpp's own cost grows with the depth; the growth of wizardchat's whole token
must equal it within 5 %, which holds when wizardchat's own work per token does not grow.

The model defaults to SmolLM2-135M-Instruct Q4_1 from benchmarks/peers.py's cache (run that
once, or `peers.py --prepare-only`), else pass --model.
"""

from __future__ import annotations

import argparse
import io
import os
import statistics
import sys
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "src"))

from wizardchat.engine.generate import TokenStream  # noqa: E402
from wizardchat.engine.llama_engine import LlamaEngine  # noqa: E402
from wizardchat.engine.llama_lib import lib  # noqa: E402
from wizardchat.settings import load_settings  # noqa: E402

PEERS_CACHE = Path(os.environ.get("WIZARDCHAT_PEERS_CACHE", "~/.cache/wizardchat-peers"))
DEFAULT_MODEL = PEERS_CACHE.expanduser() / "model" / "SmolLM2-135M-Instruct.Q4_1.gguf"
PROMPT = "USER: Write a very long story about a young dragon who bakes bread. ASSISTANT:"


class Clock:
    """Time spent inside the wrapped C functions since the last reset."""

    def __init__(self) -> None:
        self.inside = 0.0

    def wrap(self, name: str) -> Callable[[], None]:
        real = getattr(lib, name)

        def timed(*args: Any) -> Any:
            start = time.perf_counter()
            try:
                return real(*args)
            finally:
                self.inside += time.perf_counter() - start

        setattr(lib, name, timed)
        return lambda: setattr(lib, name, real)


def measure(tokens: Iterator[Any], clock: Clock, n: int) -> tuple[float, float]:
    """(total, inside llama.cpp) seconds per token from the first token to the n-th."""
    count, start, inside = 0, 0.0, 0.0
    for _ in tokens:
        count += 1
        if count == 1:
            start, inside = time.perf_counter(), clock.inside
        if count >= n:
            break
    total = time.perf_counter() - start
    per = max(count - 1, 1)
    return total / per, (clock.inside - inside) / per


def load_engine(args: argparse.Namespace, ctx_size: int) -> LlamaEngine:
    """wizardchat's engine on the model: greedy, flash attention, the given context."""
    flags = {
        "model": str(args.model),
        "ctx_size": ctx_size,
        "threads": args.threads,
        "temperature": 0.0,
        "flash_attn": "on",
        "seed": 0,
    }
    settings = load_settings(flags, config_path=Path("/nonexistent"), environ={})
    return LlamaEngine(settings, progress=None, log=io.StringIO())


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", type=Path, default=DEFAULT_MODEL)
    parser.add_argument("--tokens", type=int, default=256)
    parser.add_argument("--rounds", type=int, default=6)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--no-depth", action="store_true", help="skip the depth comparison")
    args = parser.parse_args()
    if not args.model.is_file():
        raise SystemExit(f"no model at {args.model}: run benchmarks/peers.py --prepare-only")

    import llama_cpp  # the peer; imported here so wizardchat's own path loaded without it

    engine = load_engine(args, 2048)
    plan = engine.load_plan
    peer = llama_cpp.Llama(
        str(args.model),
        n_ctx=plan.n_ctx,
        n_batch=plan.batch_size,
        n_ubatch=plan.ubatch_size,
        n_threads=plan.threads,
        n_threads_batch=plan.threads,
        flash_attn=plan.flash_attn,
        verbose=False,
    )
    prompt = engine.llm.tokenize(PROMPT.encode(), add_bos=engine.add_bos)

    def ours() -> Iterator[Any]:
        engine.kv_keep(0)
        return iter(
            TokenStream(engine.llm, prompt, engine.sampling, args.tokens, threading.Event())
        )

    def theirs() -> Iterator[Any]:
        peer.reset()
        peer._ctx.kv_cache_clear()

        def stream() -> Iterator[Any]:
            for token in peer.generate(prompt, temp=0.0, top_k=40, top_p=0.95, min_p=0.05):
                yield token, peer.detokenize([token])  # the text a chat needs, token by token

        return stream()

    clock = Clock()
    restore = [clock.wrap("llama_decode"), clock.wrap("llama_sampler_sample")]
    results: dict[str, list[tuple[float, float]]] = {"wizardchat": [], "llama-cpp-python": []}
    try:
        for r in range(args.rounds):
            order = [("wizardchat", ours), ("llama-cpp-python", theirs)]
            for name, make in order if r % 2 == 0 else order[::-1]:
                results[name].append(measure(make(), clock, args.tokens))
    finally:
        for undo in restore:
            undo()
        peer.close()
        engine.close()

    print(f"{args.model.name}, {args.threads} threads, greedy, {args.tokens} tokens, "
          f"{args.rounds} rounds, medians per token")  # fmt: skip
    print(f"{'path':18} {'total ms':>9} {'in llama.cpp ms':>16} {'outside us':>11} {'share':>7}")
    outside: dict[str, float] = {}
    for name, runs in results.items():
        total = statistics.median(t for t, _ in runs)
        inside = statistics.median(i for _, i in runs)
        outside[name] = statistics.median((t - i) * 1e6 for t, i in runs)
        share = outside[name] / (total * 1e6)
        print(
            f"{name:18} {total * 1e3:9.3f} {inside * 1e3:16.3f} {outside[name]:11.1f} {share:7.2%}"
        )
    print(
        f"wizardchat's work outside llama.cpp is {outside['wizardchat']:.0f} us a token, "
        f"llama-cpp-python's {outside['llama-cpp-python']:.0f} us"
    )
    if not args.no_depth:
        depth_growth(args)


def depth_growth(args: argparse.Namespace) -> None:
    """Per-token cost at depth 100 and 4000: wizardchat's whole token against llama.cpp's part."""
    engine = load_engine(args, 4352)  # depth 4000 and the reply
    text = engine.llm.tokenize(b" The lighthouse keeper counted the ships again.", add_bos=False)
    n_gen = 128
    clock = Clock()
    restore = [clock.wrap("llama_decode"), clock.wrap("llama_sampler_sample")]
    costs: dict[int, list[tuple[float, float]]] = {100: [], 4000: []}
    try:
        for _ in range(max(args.rounds // 2, 2)):
            for depth in costs:
                prompt = (text * (depth // len(text) + 1))[:depth]
                engine.kv_keep(0)
                stream = TokenStream(engine.llm, prompt, engine.sampling, n_gen, threading.Event())
                costs[depth].append(measure(iter(stream), clock, n_gen))
    finally:
        for undo in restore:
            undo()
        engine.close()
    total = {d: statistics.median(t for t, _ in runs) for d, runs in costs.items()}
    inside = {d: statistics.median(i for _, i in runs) for d, runs in costs.items()}
    ours, theirs = total[4000] / total[100], inside[4000] / inside[100]
    print(f"depth: per-token cost at 4000 / at 100, {n_gen} tokens each, same runs")
    for d in costs:
        whole, part = total[d] * 1e3, inside[d] * 1e3
        print(f"  d{d:<5} whole token {whole:7.3f} ms, inside llama.cpp {part:7.3f} ms")
    verdict = "PASS" if abs(ours / theirs - 1) <= 0.05 else "MISS"
    print(
        f"growth: wizardchat {ours:.3f}, llama.cpp {theirs:.3f}, ratio {ours / theirs:.3f} "
        f"(goal 1 +- 0.05): {verdict}"
    )


if __name__ == "__main__":
    main()
