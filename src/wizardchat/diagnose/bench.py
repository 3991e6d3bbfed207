"""`wizardchat bench`: prompt and generation speed of the loaded model, measured like llama-bench.

The tests and their names are llama-bench's (tools/llama-bench/llama-bench.cpp):

- ``pp512``, ``pp2048``: N token ids (BOS, then random ids from a fixed seed) evaluated from an
  empty KV cache in batches of n_batch; the time of the whole prompt;
- ``tg128``: 128 tokens evaluated one at a time (batch of 1), each a random id, no sampling:
  the time of decoding alone, from an empty KV cache;
- ``tg128 @ d4096``: the same after `depth` tokens are in the KV cache (filled once, untimed;
  each run cuts the cache back to them, as llama-bench restores its saved state).

Each test runs once untimed (warm-up), then `reps` timed runs; tok/s is the median over runs.
The tokens go through `Llama.eval`, so the figures include llama-cpp-python's per-call cost,
the one wizardchat's replies pay. diagnose/llama_bench.py runs llama-bench
itself with the same plan.
"""

from __future__ import annotations

import dataclasses
import statistics
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

from wizardchat.engine.llama_engine import LlamaEngine
from wizardchat.engine.model import LoadPlan
from wizardchat.engine.timing import TokenTimer
from wizardchat.gguf_file import quant_name
from wizardchat.plan.report import rate_text

PP_SIZES = (512, 2048)
TG_TOKENS = 128
AUTO_DEPTH_MAX = 4096  # the deepest context the automatic depth test uses
AUTO_DEPTH_ROOM = 2048  # the automatic depth leaves this much of the context (plus tg) free
AUTO_DEPTH_MIN = 512  # below this, an automatic depth test says little: skipped
SEED = 1234


def bench_label(n_prompt: int, n_gen: int, n_depth: int = 0) -> str:
    """A test's name as llama-bench's markdown output writes it: pp512, tg128, tg128 @ d4096."""
    if n_prompt > 0 and n_gen == 0:
        name = f"pp{n_prompt}"
    elif n_gen > 0 and n_prompt == 0:
        name = f"tg{n_gen}"
    else:
        name = f"pp{n_prompt}+tg{n_gen}"
    return f"{name} @ d{n_depth}" if n_depth > 0 else name


@dataclass(frozen=True)
class Measurement:
    """One test: its name, the tokens each run processed and every timed run's seconds."""

    test: str  # llama-bench's name: "pp512", "tg128", "tg128 @ d4096"
    tokens: int
    seconds: list[float]  # every timed run (the warm-up is not among them)
    depth: int = 0  # tokens already in the KV cache when the timed tokens start

    @property
    def generation(self) -> bool:
        """A tg test (one token at a time), as opposed to prompt processing."""
        return self.test.startswith("tg")

    @property
    def samples_tps(self) -> list[float]:
        """Tokens per second of each run."""
        return [self.tokens / s for s in self.seconds if s > 0]

    @property
    def median_tps(self) -> float:
        """Median tokens per second over the timed runs (0 when there are none)."""
        samples = self.samples_tps
        return statistics.median(samples) if samples else 0.0


@dataclass(frozen=True)
class BenchResult:
    """What `run_bench` measured, with the plan it ran under."""

    model: str
    plan: dict[str, Any]
    measurements: list[Measurement]
    bound_tps: float | None  # the plan's decode bound from memory bandwidth, when known
    depth: int = 0  # depth of the deep tg test; 0 when it was skipped
    notes: list[str] = field(default_factory=list)  # tests skipped, and why
    quant: str = ""  # the file's quantization (general.file_type), e.g. Q4_K_M
    plan_line: str = ""  # the load plan in one line, as the chat shows it at start

    def fraction_of_bound(self, m: Measurement) -> float | None:
        """A tg test's median speed as a fraction of the bandwidth bound (None: not known)."""
        if not m.generation or not self.bound_tps or self.bound_tps <= 0:
            return None
        return m.median_tps / self.bound_tps

    def to_json(self) -> dict[str, Any]:
        """Plain data for --json."""
        return {
            "model": self.model,
            "quant": self.quant,
            "plan_line": self.plan_line,
            "plan": self.plan,
            "bound_tokens_per_second": self.bound_tps,
            "depth": self.depth,
            "tests": [
                {
                    "test": m.test,
                    "tokens": m.tokens,
                    "depth": m.depth,
                    "runs": len(m.seconds),
                    "seconds": [round(s, 6) for s in m.seconds],
                    "samples_tokens_per_second": [round(t, 3) for t in m.samples_tps],
                    "tokens_per_second": round(m.median_tps, 3),
                    "fraction_of_bound": _round_or_none(self.fraction_of_bound(m), 4),
                }
                for m in self.measurements
            ],
            "notes": list(self.notes),
        }


def _round_or_none(value: float | None, digits: int) -> float | None:
    return None if value is None else round(value, digits)


def plan_dict(plan: LoadPlan) -> dict[str, Any]:
    """The load plan as plain data (path as text, overrides as llama.cpp's PATTERN=BUFFER)."""
    data = dataclasses.asdict(plan)
    data["path"] = str(plan.path)
    data["overrides"] = [f"{o.pattern}={o.buffer}" for o in plan.overrides]
    return data


def auto_depth(n_ctx: int, tg_tokens: int = TG_TOKENS) -> int:
    """The depth of the deep tg test for a context size: min(4096, n_ctx - 2048 - tg), or 0
    (no deep test) when that leaves fewer than 512 tokens."""
    depth = min(AUTO_DEPTH_MAX, n_ctx - AUTO_DEPTH_ROOM - tg_tokens)
    return depth if depth >= AUTO_DEPTH_MIN else 0


def run_bench(
    engine: LlamaEngine,
    *,
    reps: int = 3,
    depth: int = 0,
    pp_sizes: Sequence[int] = PP_SIZES,
    tg_tokens: int = TG_TOKENS,
    bound_tps: float | None = None,
    progress: Callable[[str], None] | None = None,
    warmup: bool = True,
) -> BenchResult:
    """Measure prompt processing (pp) and generation (tg) speed on the loaded model.

    `depth` 0 picks the deep tg test's depth from the context (`auto_depth`), a negative one
    skips it. Tests that do not fit the context are skipped with a note (in the result, and
    through `progress`). The KV cache is left empty.
    """
    if reps < 1:
        raise ValueError("reps must be at least 1")
    llm = engine.llm
    n_ctx = llm.n_ctx
    runner = TokenTimer(llm, SEED)
    notes: list[str] = []
    measurements: list[Measurement] = []

    def say(text: str) -> None:
        if progress is not None:
            progress(text)

    def note(text: str) -> None:
        notes.append(text)
        say(text)

    def timed(name: str, run: Callable[[], float]) -> list[float]:
        say(f"bench: {name}, {'1 warm-up + ' if warmup else ''}{reps} runs")
        if warmup:
            run()
        return [run() for _ in range(reps)]

    if depth == 0 and tg_tokens > 0:
        depth = auto_depth(n_ctx, tg_tokens)
        if depth == 0:
            note(
                f"tg{tg_tokens} at depth skipped: the context ({n_ctx} tokens) is too small "
                f"for one (it needs {AUTO_DEPTH_ROOM + tg_tokens + AUTO_DEPTH_MIN})"
            )
    elif depth > 0 and depth + tg_tokens > n_ctx:
        note(
            f"{bench_label(0, tg_tokens, depth)} skipped: {depth} + {tg_tokens} tokens do not "
            f"fit the context ({n_ctx} tokens)"
        )
        depth = 0
    depth = max(depth, 0)

    try:
        for n in pp_sizes:
            name = bench_label(n, 0)
            if n > n_ctx:
                note(f"{name} skipped: the context holds {n_ctx} tokens")
                continue
            ids = runner.tokens(n)

            def pp(ids: list[int] = ids) -> float:
                runner.clear()
                return runner.prompt(ids)

            measurements.append(Measurement(name, n, timed(name, pp)))

        if tg_tokens > 0 and tg_tokens > n_ctx:
            note(f"tg{tg_tokens} skipped: the context holds {n_ctx} tokens")
            depth = 0
        elif tg_tokens > 0:
            gen_ids = runner.tokens(tg_tokens)

            def tg() -> float:
                runner.clear()
                return runner.generate(gen_ids)

            name = bench_label(0, tg_tokens)
            measurements.append(Measurement(name, tg_tokens, timed(name, tg)))

            if depth > 0:
                say(f"bench: filling the KV cache to depth {depth} (not timed)")
                runner.clear()
                runner.prompt(runner.tokens(depth))

                def tg_deep() -> float:
                    runner.cut(depth)
                    return runner.generate(gen_ids)

                name = bench_label(0, tg_tokens, depth)
                measurements.append(Measurement(name, tg_tokens, timed(name, tg_deep), depth))
    finally:
        runner.clear()

    model, quant, plan_line = measured(engine)
    return BenchResult(
        model=model,
        plan=plan_dict(engine.load_plan),
        measurements=measurements,
        bound_tps=bound_tps,
        depth=depth,
        notes=notes,
        quant=quant,
        plan_line=plan_line,
    )


def measured(engine: LlamaEngine) -> tuple[str, str, str]:
    """What a bench of `engine` measures: the file's name, its quant and the plan line."""
    return engine.model_name, quant_name(engine.info), engine.plan_line()


def heading(engine: LlamaEngine) -> list[str]:
    """The lines above the table: which model and quant, and the plan they ran under."""
    model, quant, plan_line = measured(engine)
    return [f"model: {model}, {quant}", plan_line]


# --- output -------------------------------------------------------------------------------------


def format_table(
    result: BenchResult, compare: dict[str, float] | None = None
) -> list[tuple[str, ...]]:
    """Rows for a table, the header first: test, tok/s (median), runs; "of bound" for tg tests
    when the bound is known; llama-bench's tok/s and ours ÷ its when `compare` is given."""
    bound = result.bound_tps if result.bound_tps and result.bound_tps > 0 else None
    with_bound = bound is not None
    header: tuple[str, ...] = ("test", "tok/s", "runs")
    if bound is not None:  # the bound beside the fractions of it
        header += (f"of ~{rate_text(bound)} tok/s bound",)
    if compare is not None:
        header += ("llama-bench", "ratio")
    rows: list[tuple[str, ...]] = [header]
    for m in result.measurements:
        tps = m.median_tps
        row: tuple[str, ...] = (m.test, f"{tps:.2f}", str(len(m.seconds)))
        if with_bound:
            fraction = result.fraction_of_bound(m)
            row += (f"{fraction:.0%}" if fraction is not None else "",)
        if compare is not None:
            theirs = compare.get(m.test)
            if theirs:
                row += (f"{theirs:.2f}", f"{tps / theirs:.2f}")
            else:
                row += ("-", "-")
        rows.append(row)
    return rows
