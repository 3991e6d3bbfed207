"""llama.cpp's own `llama-bench`, run with the plan wizardchat loads, for `bench --compare`."""

from __future__ import annotations

import dataclasses
import json
import shlex
import shutil
import statistics
import subprocess
import time
from collections.abc import Callable, Sequence
from pathlib import Path

from wizardchat.diagnose.bench import PP_SIZES, TG_TOKENS, bench_label
from wizardchat.engine.model import LoadPlan
from wizardchat.ggml_types import LLAMA_BENCH_KV_TYPES

ALL_LAYERS = 999  # -ngl for "every layer": older llama-bench builds reject negative values


def find_llama_bench() -> str | None:
    """The llama-bench binary on PATH, if any."""
    return shutil.which("llama-bench")


class UnsupportedPlan(ValueError):
    """The plan has a setting llama-bench cannot be given."""


def llama_bench_flags(plan: LoadPlan) -> list[str]:
    """llama-bench's flags for the plan's model and context settings (not the tests)."""
    for name, kv_type in (("K", plan.type_k), ("V", plan.type_v)):
        if kv_type not in LLAMA_BENCH_KV_TYPES:
            raise UnsupportedPlan(f"llama-bench has no {kv_type} {name} cache")
    flags = [
        "-m",
        str(plan.path),
        "-ngl",
        str(ALL_LAYERS if plan.n_gpu_layers < 0 else plan.n_gpu_layers),
        "-t",
        str(plan.threads),
        "-b",
        str(plan.batch_size),
        "-ub",
        str(plan.ubatch_size),
        "-fa",
        "1" if plan.flash_attn else "0",
        "-ctk",
        plan.type_k,
        "-ctv",
        plan.type_v,
    ]
    if plan.overrides:
        # One -ot, overrides joined by ';': each ',' (or a second -ot) starts another test set.
        for o in plan.overrides:
            if any(c in o.pattern or c in o.buffer for c in ",;="):
                raise UnsupportedPlan(
                    f"-ot {o.pattern}={o.buffer}: llama-bench cannot take ',', ';' or '=' in one"
                )
        flags += ["-ot", ";".join(f"{o.pattern}={o.buffer}" for o in plan.overrides)]
    return flags


def parse_llama_bench(text: str) -> dict[str, float]:
    """tok/s per test from llama-bench's `-o json` or `-o jsonl` output (a cut-off run too):
    the median of samples_ts, else avg_ts; named as `bench_label` names them."""
    decoder = json.JSONDecoder()
    results: dict[str, float] = {}
    i = 0
    while i < len(text):
        if text[i] in " \t\r\n,[]":
            i += 1
            continue
        if text[i] != "{":  # not ours (a message on stdout): skip the line
            end = text.find("\n", i)
            i = len(text) if end < 0 else end + 1
            continue
        try:
            obj, i = decoder.raw_decode(text, i)
        except json.JSONDecodeError:
            break  # cut off in the middle of a test
        try:
            samples = [float(v) for v in obj.get("samples_ts") or []]
            tps = statistics.median(samples) if samples else float(obj["avg_ts"])
            name = bench_label(int(obj["n_prompt"]), int(obj["n_gen"]), int(obj.get("n_depth", 0)))
        except (AttributeError, KeyError, TypeError, ValueError):
            continue
        results[name] = tps
    return results


def _text(data: bytes | str | None) -> str:
    return data.decode("utf-8", "replace") if isinstance(data, bytes) else data or ""


def _last_line(data: bytes | str | None) -> str:
    lines = [line.strip() for line in _text(data).splitlines() if line.strip()]
    return lines[-1] if lines else ""


def run_llama_bench(
    binary: str,
    model_path: Path,
    plan: LoadPlan,
    *,
    reps: int,
    depth: int,
    timeout: float = 600,
    pp_sizes: Sequence[int] = PP_SIZES,
    tg_tokens: int = TG_TOKENS,
    progress: Callable[[str], None] | None = None,
) -> dict[str, float]:
    """Run llama-bench with the plan's settings and return its tok/s per test (`bench_label`).

    Two runs: the pp tests and tg at depth 0, then (when `depth` > 0) tg alone at that depth
    (-p 0 -n TG -d DEPTH), since llama-bench's -d applies to every test. Both together stay
    within `timeout` seconds. A run that fails adds nothing and is reported through
    `progress`; when none succeeds the result is {}.
    """

    def note(text: str) -> None:
        if progress is not None:
            progress(text)

    plan = dataclasses.replace(plan, path=model_path)
    try:
        flags = llama_bench_flags(plan)
    except UnsupportedPlan as e:
        note(f"--compare: {e}; not running it")
        return {}
    common = ["-r", str(reps), "-o", "json"]
    runs: list[list[str]] = []
    if pp_sizes or tg_tokens > 0:
        runs.append(["-p", ",".join(map(str, pp_sizes)) or "0", "-n", str(tg_tokens)])
    if depth > 0 and tg_tokens > 0:
        runs.append(["-p", "0", "-n", str(tg_tokens), "-d", str(depth)])
    deadline = time.monotonic() + timeout
    results: dict[str, float] = {}
    for tests in runs:
        argv = [binary, *flags, *tests, *common]
        left = deadline - time.monotonic()
        if left <= 0:
            note(f"--compare: no time left for llama-bench {' '.join(tests)}")
            break
        note(f"bench: {shlex.join(argv)}")
        try:
            proc = subprocess.run(
                argv, stdin=subprocess.DEVNULL, capture_output=True, timeout=left, check=False
            )
        except subprocess.TimeoutExpired as e:
            got = parse_llama_bench(_text(e.stdout))
            note(f"--compare: llama-bench stopped after {timeout:.0f} s; kept {len(got)} tests")
            results.update(got)
            break
        except OSError as e:
            note(f"--compare: cannot run {binary}: {e.strerror or e}")
            return {}
        if proc.returncode != 0:
            reason = _last_line(proc.stderr) or _last_line(proc.stdout) or "no message"
            note(f"--compare: llama-bench exited with {proc.returncode}: {reason}")
            continue
        got = parse_llama_bench(_text(proc.stdout))
        if not got:
            note("--compare: llama-bench printed no results")
        results.update(got)
    return results
