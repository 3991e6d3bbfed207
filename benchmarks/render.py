"""wizardchat's streaming markdown against re-rendering the whole reply, in one run.

    .venv/bin/python benchmarks/render.py [--quick] [--json PATH] [--threads N]

Three figures, each with its goal:

1. CPU seconds (`time.process_time`) to stream a ~10 KB markdown reply (headings, paragraphs,
   lists, code, tables, quotes: what an assistant writes), cut into 4-character tokens, through
   `MarkdownStream` on a terminal console (force_terminal, 100x40, truecolor) writing to memory;
   against the usual way, `Live.update(Markdown(reply_so_far), refresh=True)` at every token.
   The stream's clock is a fake one that advances 20 ms per token (50 tokens/s, faster than
   WizardLM-2 8x22B runs on the machines wizardchat is for), so the 15 Hz throttle allows a
   redraw every ~3 tokens as it would in use; with the real clock this loop, which has no model
   to wait for, runs at thousands of tokens/s and the throttle would skip nearly every redraw,
   which would flatter the figure. The naive way is timed over the whole reply in a full run;
   `--quick` times it at 12 evenly spaced reply lengths and sums (midpoint rule), which came
   within 10% of the timed figure here, and says so;
2. growth: the stream's CPU seconds for a reply 8x as long (~80 KB) divided by those for 1x.
   Linear cost gives 8; the goal is <= 10;
3. end to end: tokens/s of a `ChatSession` reply streamed through `stream_markdown` (terminal
   console on an in-memory file, the real clock) divided by tokens/s of the same reply through
   `safe_text.stream_plain`, on the generated random-weights model of benchmarks/engine.py (~1 ms a
   token, far faster than the real model, so this is a stress test of the per-token overhead).
   300 tokens (max_tokens, greedy, fixed seed), the conversation reset before each reply so
   every run does the same work; runs alternate, markdown first in every other pair, each pair
   after a reply thrown away (the first reply after a pause runs ~15% slower), and the median of
   the pairs' ratios is reported. Random weights write random words and bytes.

Runs during which other processes used the CPUs are redone (within a time budget), as in
benchmarks/engine.py, whose model settings and helpers this script shares.
"""

from __future__ import annotations

import argparse
import io
import os
import platform
import statistics
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass
from importlib.metadata import version
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(Path(__file__).resolve().parent))

# benchmarks/engine.py puts tests/ and src/ on sys.path
from engine import (  # noqa: E402
    BIG,
    N_CTX,
    Contention,
    LogCounter,
    cpu_name,
    gguf_models,
    repeat,
    settings_for,
    table,
    verdict,
    write_json,
)
from rich.console import Console  # noqa: E402
from rich.live import Live  # noqa: E402
from rich.markdown import Markdown  # noqa: E402

from wizardchat.chat.session import ChatSession  # noqa: E402
from wizardchat.engine.llama_engine import LlamaEngine  # noqa: E402
from wizardchat.safe_text import stream_plain  # noqa: E402
from wizardchat.settings import DEFAULT_SYSTEM_PROMPT  # noqa: E402
from wizardchat.tui.markdown_stream import MarkdownStream, stream_markdown  # noqa: E402

TOKEN_CHARS = 4
TOKEN_SECONDS = 0.020  # the fake clock's step per token
WIDTH, HEIGHT = 100, 40
REPLY_TOKENS = 300
USER_TEXT = "Tell me more about it."

SECTION = """\
## {n}. Setting up the project

Before you start, make sure you have **Python 3.11** or newer and a recent `pip`. The steps
below work on Linux, macOS and Windows; where they differ, the difference is noted. If you
already have a virtual environment, you can skip the first step.

1. **Create a virtual environment.** This keeps the project's dependencies apart from the
   system's packages:

   ```bash
   python -m venv .venv
   source .venv/bin/activate
   ```

2. **Install the dependencies** with `pip install -r requirements.txt`. This may take a minute.
3. **Run the tests** to check that everything works: `pytest -q`.

Here is a small example that reads a CSV file and prints a summary:

```python
import csv
from collections import Counter
from pathlib import Path


def summarize(path: Path) -> dict[str, int]:
    \"\"\"Count the rows of each category in a CSV file.\"\"\"
    counts: Counter[str] = Counter()
    with path.open(newline="", encoding="utf-8") as f:
        for row in csv.DictReader(f):
            counts[row["category"]] += 1
    return dict(counts)


if __name__ == "__main__":
    for name, count in sorted(summarize(Path("data.csv")).items()):
        print(f"{{name:<20}} {{count:>6}}")
```

| Option | Default | Meaning |
|--------|---------|---------|
| `--verbose` | off | print every step |
| `--jobs N` | 1 | run N jobs at once |
| `--output PATH` | `out/` | where the results go |

> **Note:** on Windows, use `.venv\\Scripts\\activate` instead of `source`; see the
> [venv documentation](https://docs.python.org/3/library/venv.html) for details.

Some things to keep in mind:

- Keep functions small and give them clear names.
- Write a test for each bug you fix, so that it stays fixed.
  - Run the tests often, not only before a release.
  - Use `pytest -x` to stop at the first failure.
- Prefer the standard library when it does the job.

"""


@dataclass(frozen=True)
class Plan:
    """How long each part runs."""

    stream_reps: int  # figure 1 and 2: runs of the stream, median kept
    naive_full: bool  # figure 1: time the naive way over the whole reply (else sample it)
    e2e_pairs: int
    e2e_budget_s: float


FULL = Plan(stream_reps=3, naive_full=True, e2e_pairs=25, e2e_budget_s=90)
QUICK = Plan(stream_reps=1, naive_full=False, e2e_pairs=10, e2e_budget_s=20)


def reply(kib: int) -> str:
    """A markdown reply of `kib` KiB (to the end of the line), sections numbered so they differ."""
    size = kib * 1024
    sections = "".join(SECTION.format(n=n + 1) for n in range(size // len(SECTION) + 1))
    return sections[: sections.index("\n", size) + 1]


def tokens_of(text: str) -> list[str]:
    return [text[i : i + TOKEN_CHARS] for i in range(0, len(text), TOKEN_CHARS)]


def terminal() -> Console:
    return Console(
        file=io.StringIO(),
        force_terminal=True,
        width=WIDTH,
        height=HEIGHT,
        color_system="truecolor",
    )


class FakeClock:
    """Time that passes only when told: TOKEN_SECONDS per token."""

    def __init__(self) -> None:
        self.now = 0.0

    def __call__(self) -> float:
        return self.now


# --- figures 1 and 2: CPU cost of streaming ------------------------------------------------------


def cpu_stream(text: str) -> dict[str, Any]:
    """CPU seconds to stream `text` token by token through MarkdownStream."""
    tokens = tokens_of(text)
    console, clock = terminal(), FakeClock()
    stream = MarkdownStream(console, clock=clock)
    start = time.process_time()
    for token in tokens:
        stream.feed(token)
        clock.now += TOKEN_SECONDS
    stream.finish()
    seconds = time.process_time() - start
    return {"cpu_s": seconds, "tokens": len(tokens), "refreshes": stream.refreshes}


def naive_step_cost(text: str, reps: int = 3) -> float:
    """CPU seconds of one naive step at this reply length: render it all, redraw the screen."""
    console = terminal()
    with Live(console=console, auto_refresh=False) as live:
        live.update(Markdown(text), refresh=True)  # the first draw has nothing to erase
        start = time.process_time()
        for _ in range(reps):
            live.update(Markdown(text), refresh=True)
        return (time.process_time() - start) / reps


def cpu_naive(text: str, full: bool) -> dict[str, Any]:
    """CPU seconds of `Live.update(Markdown(text_so_far))` at every token (sampled if not full)."""
    tokens = tokens_of(text)
    if full:
        console = terminal()
        so_far = ""
        start = time.process_time()
        with Live(console=console, auto_refresh=False) as live:
            for token in tokens:
                so_far += token
                live.update(Markdown(so_far), refresh=True)
        return {"cpu_s": time.process_time() - start, "tokens": len(tokens), "method": "timed"}
    k = 12
    costs = [naive_step_cost(text[: int(len(text) * (j + 0.5) / k)]) for j in range(k)]
    return {
        "cpu_s": statistics.fmean(costs) * len(tokens),
        "tokens": len(tokens),
        "method": f"estimated from {k} reply lengths",
    }


def median_run(run: Callable[[], dict[str, Any]], reps: int) -> dict[str, Any]:
    runs = [run() for _ in range(reps)]
    return sorted(runs, key=lambda r: float(r["cpu_s"]))[len(runs) // 2] | {
        "all_cpu_s": [r["cpu_s"] for r in runs]
    }


# --- figure 3: end to end with the model ---------------------------------------------------------


def e2e_run(session: ChatSession, markdown: bool) -> dict[str, Any]:
    """One reply, streamed as markdown to a terminal console or as plain text to a file."""
    session.reset()
    console, file = terminal(), io.StringIO()
    start = time.perf_counter()
    reply = session.send(USER_TEXT)
    text = stream_markdown(reply, console) if markdown else stream_plain(reply, file)
    seconds = time.perf_counter() - start
    return {"seconds": seconds, "tokens": reply.result.completion_tokens, "chars": len(text)}


def bench_e2e(session: ChatSession, plan: Plan) -> dict[str, Any]:
    c = Contention()
    for _ in range(2):  # warm-up: page the weights in, fill the KV cache with the prompt
        e2e_run(session, True)
        e2e_run(session, False)

    def pair(i: int) -> tuple[dict[str, Any], dict[str, Any]] | None:
        # `repeat` has just waited for a quiet machine: the first reply after that pause runs
        # ~15% slower (idle cores, llama.cpp's threads asleep), so one is thrown away first.
        e2e_run(session, False)
        if i % 2 == 0:
            md = e2e_run(session, True)
            plain = e2e_run(session, False)
        else:
            plain = e2e_run(session, False)
            md = e2e_run(session, True)
        return (md, plain) if md["tokens"] == plain["tokens"] == REPLY_TOKENS else None

    pairs = repeat(plan.e2e_pairs, plan.e2e_budget_s, pair, c)
    md_rates = [m["tokens"] / m["seconds"] for m, _ in pairs]
    plain_rates = [p["tokens"] / p["seconds"] for _, p in pairs]
    ratios = [m / p for m, p in zip(md_rates, plain_rates, strict=True)]
    return {
        "tokens_per_run": REPLY_TOKENS,
        "chars_per_reply": pairs[0][0]["chars"],
        "markdown_tokens_per_second": md_rates,
        "plain_tokens_per_second": plain_rates,
        "markdown_median": statistics.median(md_rates),
        "plain_median": statistics.median(plain_rates),
        "pair_ratios": ratios,
        "ratio": statistics.median(ratios),
        "contention": c,
    }


# --- output -----------------------------------------------------------------------------------


def print_report(r: dict[str, Any]) -> None:
    m, one, eight, naive, e2e = r["machine"], r["stream_1x"], r["stream_8x"], r["naive"], r["e2e"]
    print()
    print(f"machine   {m['cores']} cores usable ({m['cpu']}), {m['threads']} threads")
    print(
        f"          rich {m['rich']}, markdown-it-py {m['markdown_it']}, "
        f"Python {m['python']}; {r['mode']} run"
    )
    print(
        f"reply     {r['reply_chars']} chars of markdown in {one['tokens']} tokens of "
        f"{TOKEN_CHARS} chars; console {WIDTH}x{HEIGHT}, truecolor, in memory"
    )
    print(
        f"stream    MarkdownStream, fake clock +{TOKEN_SECONDS * 1e3:.0f} ms a token: "
        f"{one['refreshes']} live redraws (15 Hz at most); median of {len(one['all_cpu_s'])} run(s)"
    )
    print(
        "naive     Live.update(Markdown(text_so_far), refresh=True) every token: " + naive["method"]
    )
    print(
        f"e2e       random model ({', '.join(f'{k} {v}' for k, v in BIG.items())}), "
        f"{e2e['tokens_per_run']} tokens "
        f"({e2e['chars_per_reply']} chars) a reply: markdown {e2e['markdown_median']:.0f} tok/s, "
        f"plain {e2e['plain_median']:.0f} tok/s (medians of {len(e2e['pair_ratios'])} pairs; "
        f"ratios {min(e2e['pair_ratios']):.3f}..{max(e2e['pair_ratios']):.3f})"
    )
    print()
    growth = eight["cpu_s"] / one["cpu_s"]
    busy = " (busy machine)" if e2e["contention"].contended else ""
    rows = [
        (
            "CPU s, 10 KB reply, MarkdownStream",
            f"{one['cpu_s']:.2f}",
            "<= 2",
            verdict(one["cpu_s"] <= 2.0),
        ),
        (
            "CPU s, 10 KB reply, naive re-render",
            f"{naive['cpu_s']:.1f}" + ("" if naive["method"] == "timed" else " (estimated)"),
            "(for comparison)",
            f"{naive['cpu_s'] / one['cpu_s']:.0f}x the stream",
        ),
        (
            "CPU s at 8x the length / at 1x",
            f"{growth:.2f}  ({eight['cpu_s']:.2f} / {one['cpu_s']:.2f} s)",
            "<= 10",
            verdict(growth <= 10),
        ),
        (
            "tokens/s end to end, markdown / plain",
            f"{e2e['ratio']:.4f}",
            ">= 0.98",
            verdict(e2e["ratio"] >= 0.98) + busy,
        ),
    ]
    table(rows, ("metric", "measured", "goal", ""))
    print()
    c = e2e["contention"]
    print(f"load      {c.redone} end-to-end pair(s) redone because other processes used the CPUs")
    print(f"total     {r['seconds']:.1f} s")


def main() -> None:
    parser = argparse.ArgumentParser(description=(__doc__ or "").split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="shorter run, fewer repetitions")
    parser.add_argument("--json", type=Path, metavar="PATH", help="also write the results here")
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    parser.add_argument("--threads", type=int, default=cores or 1, help="threads (default: all)")
    args = parser.parse_args()
    plan = QUICK if args.quick else FULL
    started = time.perf_counter()

    def step(text: str) -> None:
        print(f"[{time.perf_counter() - started:5.1f}s] {text}", file=sys.stderr, flush=True)

    report: dict[str, Any] = {
        "mode": "quick" if args.quick else "full",
        "plan": asdict(plan),
        "machine": {
            "cores": cores,
            "cpu": cpu_name(),
            "threads": args.threads,
            "rich": version("rich"),
            "markdown_it": version("markdown-it-py"),
            "python": platform.python_version(),
        },
    }
    text1, text8 = reply(10), reply(80)
    report["reply_chars"] = len(text1)
    step(f"MarkdownStream, {len(text1)} chars, {plan.stream_reps} run(s)")
    report["stream_1x"] = median_run(lambda: cpu_stream(text1), plan.stream_reps)
    step(f"MarkdownStream, {len(text8)} chars, {plan.stream_reps} run(s)")
    report["stream_8x"] = median_run(lambda: cpu_stream(text8), plan.stream_reps)
    step("naive re-rendering" + (" (about a minute)" if plan.naive_full else ", sampled"))
    report["naive"] = cpu_naive(text1, plan.naive_full)

    with tempfile.TemporaryDirectory(prefix="wizardchat-bench-") as tmp:
        step("writing the model")
        model = gguf_models.write_model(
            Path(tmp) / "big.gguf", flavour="random", n_ctx_train=N_CTX, seed=0, **BIG
        )
        engine = LlamaEngine(settings_for(model, args.threads), progress=None, log=LogCounter())
        session = ChatSession(engine, system=DEFAULT_SYSTEM_PROMPT, max_tokens=REPLY_TOKENS)
        step(f"end to end: {plan.e2e_pairs} pairs of {REPLY_TOKENS}-token replies")
        report["e2e"] = bench_e2e(session, plan)
        engine.close()
    report["seconds"] = time.perf_counter() - started
    print_report(report)
    write_json(report, args.json)


if __name__ == "__main__":
    main()
