"""`wizardchat serve`: what a resident model saves a client, and what the socket costs decoding.

    .venv/bin/python benchmarks/serve.py [--quick] [--json PATH] [--threads N]

Two figures, each with its goal:

1. `ask` wall time: the installed `wizardchat ask "Hi" -m MODEL -n 16 --temp 0 --seed 0` run as
   a subprocess, timed from its start to its exit, without a server (`--no-server`: the model is
   loaded in-process) divided by the same with a `wizardchat serve` of the model running (the
   client finds it in the registry and loads nothing). The model is generated for it: random
   weights, F32, about 1 GB (ASK_MODEL). Both sides read the model from the page cache: it was
   just written and fsynced, and one `--no-server` ask and one through the server run first as
   warm-up (mincore says how much of the file is cached). The runs alternate in pairs, the
   `--no-server` one first in every other pair, and the median of the pairs' ratios is
   reported with the median times of each side. Goal: >= 5x faster. The server's `load_count`
   must still be 1 at the end (it loaded once, at its start, and never for a client), every
   ask through it must say `using wizardchat serve (pid N)`, and its replies must equal the
   in-process ones (greedy). For scale, what the server saves an ask is timed too: the
   in-process LlamaEngine load of the same file and importing llama_cpp in a fresh Python
   (and the prompt's evaluation, which the server has cached); the rest (Python starting,
   wizardchat's imports and settings, 16 tokens) both sides pay. The 16 tokens are timed
   in-process with the prompt cached, as the server has it: no served ask can be faster, so
   `without / that` is the most any server could reach on this model, printed beside the goal
   (on 2 cores a 1 GB F32 model generates 16 tokens in about 0.2 s and loads in 0.04 s: the 5x
   of the goal is for models whose load takes seconds).
2. decode speed: tokens/s through the server divided by tokens/s in-process, on the benchmark
   model of benchmarks/engine.py (its BIG shape, its settings: n_ctx 8192, flash attention,
   n_batch/n_ubatch 512, the same thread count on both sides). In this process a LlamaEngine
   streams 256 greedy tokens (Plan.decode_tokens) of a fixed prompt; a `wizardchat serve`
   subprocess of the same file streams the same prompt ids through `RemoteEngine`. The two
   take turns and never decode at once (the in-process engine is idle while the server
   decodes), the in-process side first in every other pair; each side's rate is its stream's
   `stats.decode_tokens_per_second` (first token to last, as the client sees them arrive), and
   the median of the pairs' ratios is reported. Goal: >= 0.95. Both sides must produce the same
   tokens.

Everything lives in a temporary directory, removed at the end: the models, WIZARDCHAT_HOME (so
the registry of servers, the sockets and the config are the benchmark's own), and the Python
bytecode cache of the subprocesses (PYTHONPYCACHEPREFIX, as an installed package has its .pyc
files, where PYTHONDONTWRITEBYTECODE would make every process compile wizardchat from source).
Each server is stopped at the end of its part with `wizardchat stop PID` (SIGTERM, then
SIGKILL, if that fails), errors and Ctrl-C included. Nothing is downloaded.

Runs during which other processes used the CPUs are redone (within a time budget) and reported,
as in benchmarks/engine.py, whose retry rules this follows with a meter that counts this
process, the `ask` subprocesses and the server as its own: on 2 cores a test run next to the
benchmark makes llama.cpp's threads wait for a core on every token.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import platform
import signal
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, TypeVar

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "benchmarks"))
sys.path.insert(0, str(ROOT / "tests"))
sys.path.insert(0, str(ROOT / "src"))

import gguf_models  # noqa: E402
import llama_cpp  # noqa: E402
from engine import (  # noqa: E402  (benchmarks/engine.py: the same model, meter, retries, table)
    BIG,
    MAX_FOREIGN_CORES,
    N_CTX,
    PROMPT_TEXT,
    Contention,
    CpuMeter,
    LogCounter,
    cpu_name,
    repeat,
    settings_for,
    table,
    verdict,
    write_json,
)
from resume import resident_fraction  # noqa: E402

from wizardchat.chat.conversation import Conversation  # noqa: E402
from wizardchat.engine.llama_engine import LlamaEngine  # noqa: E402
from wizardchat.serve import registry  # noqa: E402
from wizardchat.serve.client import RemoteEngine, call  # noqa: E402
from wizardchat.settings import load_settings  # noqa: E402

WIZARDCHAT = str(Path(sys.executable).parent / "wizardchat")
# F32, random weights: 5 x 8 experts x 3 x 2048 x 1024 x 4 bytes and attention, about 1 GB.
ASK_MODEL = {"n_embd": 1024, "n_layer": 5, "n_head": 8, "n_head_kv": 4, "n_ff": 2048}
ASK_PROMPT, ASK_TOKENS = "Hi", 16
ASK_FLAGS = ("-n", str(ASK_TOKENS), "--temp", "0", "--seed", "0")
GOAL_SPEEDUP, GOAL_DECODE = 5.0, 0.95
SERVER_START_S = 120.0
STOP_TIMEOUT_S = 45.0
GB, MIB = 1e9, 1 << 20


@dataclass(frozen=True)
class Plan:
    """How long each part runs."""

    ask_pairs: int
    ask_budget_s: float  # retries of contended pairs stop here
    load_reps: int
    decode_tokens: int
    decode_pairs: int
    decode_budget_s: float


FULL = Plan(
    ask_pairs=15, ask_budget_s=75, load_reps=5, decode_tokens=256, decode_pairs=60,
    decode_budget_s=120,
)  # fmt: skip
QUICK = Plan(
    ask_pairs=4, ask_budget_s=12, load_reps=2, decode_tokens=256, decode_pairs=12,
    decode_budget_s=15,
)  # fmt: skip


# --- the CPU meter, counting the processes this benchmark started as its own --------------------


def process_cpu_seconds(pid: int) -> float:
    """CPU time (user + system) process `pid` used so far; 0 when it is gone."""
    try:
        with open(f"/proc/{pid}/stat", encoding="ascii") as f:
            fields = f.read().rsplit(") ", 1)[1].split()
        return (int(fields[11]) + int(fields[12])) / CpuMeter.HZ
    except (OSError, IndexError, ValueError):
        return 0.0


class TreeMeter(CpuMeter):
    """CpuMeter whose "own" time also holds the reaped children (the `ask` runs) and the live
    server processes: only the rest of the machine counts as foreign."""

    def __init__(self, pids: tuple[int, ...]) -> None:
        self.pids = pids
        super().__init__()

    def _sample(self) -> tuple[float, float, float]:  # type: ignore[override]
        wall, busy, own = CpuMeter._sample()
        t = os.times()
        own += t.children_user + t.children_system
        own += sum(process_cpu_seconds(pid) for pid in self.pids)
        return wall, busy, own


T = TypeVar("T")


def repeat_tree(
    reps: int,
    budget_s: float,
    run: Callable[[int], T | None],
    c: Contention,
    pids: tuple[int, ...] = (),
) -> list[T]:
    """engine.repeat with TreeMeter: its default meter would count the server and the `ask`
    subprocesses as other processes and redo every run."""
    return repeat(reps, budget_s, run, c, meter_factory=lambda: TreeMeter(pids))


# --- servers ------------------------------------------------------------------------------------


@dataclass
class Server:
    """A `wizardchat serve` subprocess and its registry entry."""

    proc: subprocess.Popen[bytes]
    entry: registry.ServerEntry
    log: Path
    ready_s: float  # from the process's start to its registry entry (the load included)
    stopped_by: str = ""

    @property
    def pid(self) -> int:
        return self.proc.pid

    def status(self) -> dict[str, Any]:
        status = call(self.entry, "status")
        assert isinstance(status, dict)
        return status


def log_tail(path: Path, lines: int = 8) -> str:
    with contextlib.suppress(OSError):
        return "\n".join(path.read_text(encoding="utf-8", errors="replace").splitlines()[-lines:])
    return ""


@contextlib.contextmanager
def served(model: Path, args: list[str], log: Path) -> Iterator[Server]:
    """`wizardchat serve -m MODEL ARGS` running until the block ends (stopped even on errors)."""
    started = time.perf_counter()
    with log.open("wb") as err:
        proc = subprocess.Popen(
            [WIZARDCHAT, "serve", "-m", str(model), *args],
            stdin=subprocess.DEVNULL,
            stdout=subprocess.DEVNULL,
            stderr=err,
        )
    server: Server | None = None
    try:
        while server is None:
            found = [e for e in registry.entries() if e.pid == proc.pid]
            if found:
                server = Server(proc, found[0], log, time.perf_counter() - started)
                break
            if proc.poll() is not None:
                raise SystemExit(
                    f"wizardchat serve exited with {proc.returncode} before serving:\n"
                    + log_tail(log)
                )
            if time.perf_counter() - started > SERVER_START_S:
                raise SystemExit(
                    f"wizardchat serve did not serve within {SERVER_START_S:.0f} s:\n"
                    + log_tail(log)
                )
            time.sleep(0.05)
        yield server
    finally:
        how = stop_server(proc)
        if server is not None:
            server.stopped_by = how


def stop_server(proc: subprocess.Popen[bytes]) -> str:
    """Stop the server: `wizardchat stop PID`, else SIGTERM, else SIGKILL. Says which did."""
    if proc.poll() is not None:
        return f"had exited ({proc.returncode})"
    with contextlib.suppress(subprocess.TimeoutExpired, OSError):
        subprocess.run(
            [WIZARDCHAT, "stop", str(proc.pid)],
            stdin=subprocess.DEVNULL,
            capture_output=True,
            timeout=STOP_TIMEOUT_S,
        )
    for how, send in (
        ("wizardchat stop", None),
        ("SIGTERM", lambda: proc.send_signal(signal.SIGTERM)),
        ("SIGKILL", proc.kill),
    ):
        if send is not None:
            with contextlib.suppress(OSError):
                send()
        try:
            code = proc.wait(10)
            return f"{how} (exit {code})"
        except subprocess.TimeoutExpired:
            continue
    return "still running"


# --- part 1: ask with and without a server ------------------------------------------------------


@dataclass(frozen=True)
class AskRun:
    seconds: float
    stdout: str
    stderr: str


def ask(model: Path, *extra: str) -> AskRun:
    """One `wizardchat ask` subprocess, timed from its start to its exit."""
    argv = [WIZARDCHAT, "ask", ASK_PROMPT, "-m", str(model), *ASK_FLAGS, *extra]
    start = time.perf_counter()
    proc = subprocess.run(
        argv, stdin=subprocess.DEVNULL, capture_output=True, text=True, timeout=300
    )
    seconds = time.perf_counter() - start
    if proc.returncode != 0:
        raise SystemExit(f"{' '.join(argv)} exited with {proc.returncode}:\n{proc.stderr}")
    return AskRun(seconds, proc.stdout, proc.stderr)


def ask_alone(model: Path) -> AskRun:
    run = ask(model, "--no-server")
    if "using wizardchat serve" in run.stderr:
        raise SystemExit(f"ask --no-server used a server:\n{run.stderr}")
    return run


def ask_served(model: Path, server: Server) -> AskRun:
    run = ask(model)
    if f"using wizardchat serve (pid {server.pid})" not in run.stderr:
        raise SystemExit(f"ask did not use the server (pid {server.pid}):\n{run.stderr}")
    return run


def python_seconds(code: str) -> float:
    """Wall time of a fresh `python -c CODE` (this venv's Python, the subprocesses' setting)."""
    start = time.perf_counter()
    subprocess.run([sys.executable, "-c", code], stdin=subprocess.DEVNULL, check=True)
    return time.perf_counter() - start


def time_loads(model: Path, plan: Plan, log: LogCounter) -> dict[str, Any]:
    """What a server saves an ask besides the prompt: the in-process LlamaEngine load of the
    ask model (mmap, from the page cache) and importing llama_cpp in a fresh process."""
    flags = {"model": str(model), "temperature": 0.0, "seed": 0}
    settings = load_settings(flags, config_path=Path("/nonexistent"), environ={})
    c = Contention()

    def once(_i: int) -> float:
        start = time.perf_counter()
        engine = LlamaEngine(settings, progress=None, log=log)
        seconds = time.perf_counter() - start
        engine.close()
        return seconds

    def imports(_i: int) -> float:
        return python_seconds("import llama_cpp") - python_seconds("pass")

    engine = LlamaEngine(settings, progress=None, log=log)
    chat = Conversation(settings.system, engine.tokenize, engine.bos, engine.eos, engine.n_ctx)
    prompt = chat.prompt(chat.new_turn(ASK_PROMPT))

    decode(engine, prompt, ASK_TOKENS)  # the prompt cached from now on, as the server has it

    def reply(_i: int) -> float:
        start = time.perf_counter()
        decode(engine, prompt, ASK_TOKENS)
        return time.perf_counter() - start

    try:
        replies = repeat_tree(plan.load_reps, plan.ask_budget_s / 3, reply, c)
    finally:
        engine.close()
    loads = repeat_tree(plan.load_reps, plan.ask_budget_s / 3, once, c)
    imported = repeat_tree(plan.load_reps, plan.ask_budget_s / 3, imports, c)
    return {
        "seconds": loads,
        "median_s": statistics.median(loads),
        "import_seconds": imported,
        "import_median_s": statistics.median(imported),
        "reply_seconds": replies,
        "reply_median_s": statistics.median(replies),
        "prompt_tokens": len(prompt),
        "contention": c,
    }


def bench_ask(model: Path, plan: Plan, tmp: Path, step: Callable[[str], None]) -> dict[str, Any]:
    step("ask: warm-up, --no-server (the model file into the page cache)")
    reference = ask_alone(model)
    resident_alone = resident_fraction(model)
    step("ask: starting wizardchat serve")
    with served(model, [], tmp / "serve-ask.log") as server:
        asks_served = 1
        step("ask: warm-up through the server")
        warm_served = ask_served(model, server)
        c = Contention()
        same: list[bool] = [warm_served.stdout == reference.stdout]

        def pair(i: int) -> tuple[float, float]:
            nonlocal asks_served
            if i % 2 == 0:
                alone = ask_alone(model)
                through = ask_served(model, server)
            else:
                through = ask_served(model, server)
                alone = ask_alone(model)
            asks_served += 1
            same.extend([alone.stdout == reference.stdout, through.stdout == reference.stdout])
            return alone.seconds, through.seconds

        step(f"ask: {plan.ask_pairs} pairs, alternating")
        pairs = repeat_tree(plan.ask_pairs, plan.ask_budget_s, pair, c, (server.pid,))
        status = server.status()
        resident = resident_fraction(model)
        ready_s = server.ready_s
    alone_s = [a for a, _ in pairs]
    served_s = [s for _, s in pairs]
    ratios = [a / s for a, s in pairs]
    return {
        "model_bytes": model.stat().st_size,
        "command": f"wizardchat ask {ASK_PROMPT!r} -m MODEL {' '.join(ASK_FLAGS)}",
        "alone_seconds": alone_s,
        "served_seconds": served_s,
        "alone_median_s": statistics.median(alone_s),
        "served_median_s": statistics.median(served_s),
        "pair_ratios": ratios,
        "speedup": statistics.median(ratios),
        "identical_replies": sum(same),
        "replies": len(same),
        "reply": reference.stdout,
        "server_ready_s": ready_s,
        "server_asks": asks_served,
        "server_replies": status.get("replies"),
        "load_count": status.get("load_count"),
        "server_stopped_by": server.stopped_by,
        "resident_after_warmup": resident_alone,
        "resident_at_end": resident,
        "contention": c,
    }


# --- part 2: decoding through the server and in-process ----------------------------------------


def decode(engine: Any, prompt: list[int], n: int) -> tuple[list[int], Any]:
    """Stream `n` tokens of `prompt`; the token ids and the stream's stats."""
    stream = engine.stream(prompt, n, threading.Event())
    tokens = [token for token, _text in stream]
    return tokens, stream.stats


def bench_decode(
    model: Path, threads: int, plan: Plan, tmp: Path, log: LogCounter, step: Callable[[str], None]
) -> dict[str, Any]:
    n = plan.decode_tokens
    settings = settings_for(model, threads)
    engine = LlamaEngine(settings, progress=None, log=log)
    try:
        prompt = [engine.bos, *engine.tokenize(PROMPT_TEXT)]
        lp = engine.load_plan
        args = ["-c", str(N_CTX), "-t", str(threads), "-fa", "on", "-b", str(lp.batch_size)]
        args += ["-ub", str(lp.ubatch_size), "-ctk", lp.type_k, "-ctv", lp.type_v]
        step(f"decode: starting wizardchat serve {' '.join(args)}")
        with served(model, args, tmp / "serve-decode.log") as server:
            notes: list[str] = []
            remote = RemoteEngine(server.entry, engine.sampling, settings.seed, notes.append)
            if remote.tokenize(PROMPT_TEXT) != prompt[1:] or remote.bos != engine.bos:
                raise SystemExit("the server tokenizes the prompt differently")
            if remote.n_ctx != engine.n_ctx:
                raise SystemExit(f"n_ctx: the server's {remote.n_ctx}, in-process {engine.n_ctx}")
            sides = {"in-process": engine, "server": remote}

            step("decode: warm-up, one stream each side")
            reference, stats = decode(engine, prompt, n)
            if stats.finish == "eos" or len(reference) < n:
                raise SystemExit(f"the model sent EOS after {len(reference)} tokens")
            first, _ = decode(remote, prompt, n)
            same = [first == reference]
            c = Contention()

            def pair(i: int) -> dict[str, Any] | None:
                order = ("in-process", "server") if i % 2 == 0 else ("server", "in-process")
                out: dict[str, Any] = {}
                for side in order:
                    tokens, stats = decode(sides[side], prompt, n)
                    same.append(tokens == reference)
                    out[side] = stats
                if any(s.completion_tokens < n for s in out.values()):
                    return None
                return {
                    side: {
                        "tokens_per_second": s.decode_tokens_per_second,
                        "first_token_s": s.prompt_seconds,
                        "evaluated": s.evaluated_tokens,
                    }
                    for side, s in out.items()
                }

            step(f"decode: {plan.decode_pairs} pairs of {n} tokens a side, alternating")
            lines_before = log.lines
            pairs = repeat_tree(plan.decode_pairs, plan.decode_budget_s, pair, c, (server.pid,))
            log_lines = log.lines - lines_before
            status = server.status()
            ready_s = server.ready_s
        info = {
            "n_ctx": engine.n_ctx,
            "batch": lp.batch_size,
            "ubatch": lp.ubatch_size,
            "kv": f"{lp.type_k}/{lp.type_v}",
            "flash_attn": "on" if lp.flash_attn else "off",
            "n_vocab": engine.llm.n_vocab(),
        }
    finally:
        engine.close()

    def rates(side: str) -> list[float]:
        return [p[side]["tokens_per_second"] for p in pairs]

    def first_token(side: str) -> float:
        return statistics.median(p[side]["first_token_s"] for p in pairs)

    local, remote_rates = rates("in-process"), rates("server")
    ratios = [r / lo for lo, r in zip(local, remote_rates, strict=True)]
    return {
        "tokens_per_run": n,
        "prompt_tokens": len(prompt),
        "settings": info,
        "server_args": args,
        "in_process_tokens_per_second": local,
        "server_tokens_per_second": remote_rates,
        "in_process_median": statistics.median(local),
        "server_median": statistics.median(remote_rates),
        "pair_ratios": ratios,
        "ratio": statistics.median(ratios),
        "first_token_s": {side: first_token(side) for side in sides},
        "evaluated": {
            side: statistics.median(p[side]["evaluated"] for p in pairs) for side in sides
        },
        "identical_streams": sum(same),
        "streams": len(same),
        "server_ready_s": ready_s,
        "server_replies": status.get("replies"),
        "load_count": status.get("load_count"),
        "server_notes": notes,
        "server_stopped_by": server.stopped_by,
        "log_lines_during_decode": log_lines,
        "contention": c,
    }


# --- output -----------------------------------------------------------------------------------


def busy(part: dict[str, Any]) -> str:
    return " (busy machine)" if part["contention"].contended else ""


def shape(m: dict[str, Any]) -> str:
    return (
        f"n_embd {m['n_embd']}, n_layer {m['n_layer']}, n_head {m['n_head']} ({m['n_head_kv']} "
        f"kv), n_ff {m['n_ff']} x 8 experts (2 used)"
    )


def fraction(x: float | None) -> str:
    return "unknown (no mincore)" if x is None else f"{x:.0%}"


def print_report(r: dict[str, Any]) -> None:
    m, a, d, load = r["machine"], r["ask"], r["decode"], r["load"]
    s = d["settings"]
    print()
    print(f"machine   {m['cores']} cores usable ({m['cpu']}), {m['threads']} threads for decode")
    print(f"          llama-cpp-python {m['llama_cpp']}, Python {m['python']}")
    print(f"          load average at start {m['loadavg']}; {r['mode']} run")
    print()
    print(
        f"ask       {a['command']}, as a subprocess, start to exit; "
        f"the model: random MoE (tests/gguf_models.py),\n"
        f"          {shape(r['ask_model'])}, F32, {a['model_bytes'] / GB:.2f} GB "
        f"({a['model_bytes'] / MIB:.0f} MiB); settings: ask's defaults (mmap on) on both sides"
    )
    print(
        f"          page cache: the model file was written and fsynced, then one --no-server "
        f"and one served ask ran as warm-up;\n"
        f"          resident after the warm-up {fraction(a['resident_after_warmup'])}, at the end "
        f"{fraction(a['resident_at_end'])} (mincore)"
    )
    print(
        f"          without a server {a['alone_median_s']:.3f} s, with {a['served_median_s']:.3f} "
        f"s (medians of {len(a['pair_ratios'])} pairs, alternating, --no-server first every "
        f"other pair)"
    )
    print(
        f"          without / with per pair: median {a['speedup']:.2f}x, range "
        f"{min(a['pair_ratios']):.2f}..{max(a['pair_ratios']):.2f}"
    )
    print(
        f"          what the server saves an ask: the LlamaEngine load of this file "
        f"{load['median_s']:.3f} s (in-process, median of {len(load['seconds'])}), importing "
        f"llama_cpp {load['import_median_s']:.3f} s\n"
        f"          (a fresh Python, median of {len(load['import_seconds'])}), and the prompt's "
        f"evaluation (the server has it cached);\n"
        f"          both pay Python, wizardchat's imports and settings, and the reply: its "
        f"{ASK_TOKENS} tokens take {load['reply_median_s']:.3f} s on this model with the "
        f"{load['prompt_tokens']}-token prompt cached\n"
        f"          (in-process, median of {len(load['reply_seconds'])}); "
        f"{GOAL_SPEEDUP:g}x needs a served ask of {a['alone_median_s'] / GOAL_SPEEDUP:.3f} s, "
        f"but a served ask with no start-up at all would still take the reply's time:\n"
        f"          the ratio cannot pass {a['alone_median_s'] / load['reply_median_s']:.2f}x "
        f"here"
    )
    print(
        f"          server: ready {a['server_ready_s']:.2f} s after its start (load included), "
        f"{a['server_asks']} asks sent, {a['server_replies']} replies counted, load_count "
        f"{a['load_count']}; stopped by {a['server_stopped_by']}"
    )
    print()
    print(
        f"decode    the benchmark model of benchmarks/engine.py: {shape(r['decode_model'])}, "
        f"vocab {s['n_vocab']}, F32 {r['decode_model']['mib']:.0f} MiB"
    )
    print(
        f"          n_ctx {s['n_ctx']}, n_batch/n_ubatch {s['batch']}/{s['ubatch']}, flash_attn "
        f"{s['flash_attn']}, {s['kv']} KV, greedy, {m['threads']} threads, on both sides;\n"
        f"          wizardchat serve {' '.join(d['server_args'])}"
    )
    print(
        f"          in-process: LlamaEngine.stream in this process; server: RemoteEngine.stream "
        f"over the Unix socket; prompt {d['prompt_tokens']} tokens"
    )
    added_us = (1 / d["server_median"] - 1 / d["in_process_median"]) * 1e6
    print(
        f"          in-process {1e3 / d['in_process_median']:.3f} ms/token, server "
        f"{1e3 / d['server_median']:.3f} ms/token (medians of {len(d['pair_ratios'])} pairs of "
        f"{d['tokens_per_run']} tokens a side, taking turns, in-process first every other pair):"
        f"\n          the server adds {added_us:.0f} us a token"
    )
    print(
        f"          server / in-process per pair: median {d['ratio']:.4f}, range "
        f"{min(d['pair_ratios']):.3f}..{max(d['pair_ratios']):.3f}"
    )
    ft, ev = d["first_token_s"], d["evaluated"]
    print(
        f"          first token (prompt cached but {ev['in-process']:.0f} / {ev['server']:.0f} "
        f"tokens): in-process {ft['in-process'] * 1e3:.1f} ms, server "
        f"{ft['server'] * 1e3:.1f} ms (medians)"
    )
    print(
        f"          server: ready {d['server_ready_s']:.2f} s after its start, "
        f"{d['server_replies']} replies, load_count {d['load_count']}; stopped by "
        f"{d['server_stopped_by']}; llama.cpp log lines in this process while decoding: "
        f"{d['log_lines_during_decode']}"
    )
    print()
    rows = [
        (
            "ask wall time, without / with a server",
            f"{a['speedup']:.2f}x  ({a['alone_median_s']:.3f} s vs {a['served_median_s']:.3f} s)",
            f">= {GOAL_SPEEDUP:g}x",
            verdict(a["speedup"] >= GOAL_SPEEDUP) + busy(a),
        ),
        (
            "server load_count after the asks",
            str(a["load_count"]),
            "1",
            verdict(a["load_count"] == 1),
        ),
        (
            "ask replies equal to the first --no-server one",
            f"{a['identical_replies']} of {a['replies']}",
            "all",
            verdict(a["identical_replies"] == a["replies"]),
        ),
        (
            "decode tokens/s, server / in-process",
            f"{d['ratio']:.4f}  ({d['server_median']:.0f} vs {d['in_process_median']:.0f} tok/s)",
            f">= {GOAL_DECODE:g}",
            verdict(d["ratio"] >= GOAL_DECODE) + busy(d),
        ),
        (
            "greedy streams equal to the first in-process one",
            f"{d['identical_streams']} of {d['streams']}",
            "all",
            verdict(d["identical_streams"] == d["streams"]),
        ),
        (
            "decode server load_count",
            str(d["load_count"]),
            "1",
            verdict(d["load_count"] == 1),
        ),
    ]
    table(rows, ("metric", "measured", "goal", ""))
    cs = [a["contention"], d["contention"], load["contention"]]
    loads = [x for c in cs for x in c.kept_loads]
    contended = sum(c.contended for c in cs)
    print()
    print(
        f"load      other processes used at most {max(loads):.2f} cores during the runs kept; "
        f"{sum(c.redone for c in cs)} runs redone (load above {MAX_FOREIGN_CORES} cores)"
    )
    if contended:
        print(
            f"WARNING   {contended} run(s) kept although other processes were using the CPUs: "
            "figures unreliable, run again on an idle machine"
        )
    print(f"total     {r['seconds']:.1f} s")


# --- main -------------------------------------------------------------------------------------


def isolate(tmp: Path) -> None:
    """This process and its subprocesses: WIZARDCHAT_HOME in `tmp`, no WIZARDCHAT_* settings
    from outside, no network, and a bytecode cache in `tmp`."""
    for key in list(os.environ):
        if key.startswith("WIZARDCHAT_"):
            del os.environ[key]
    os.environ["WIZARDCHAT_HOME"] = str(tmp / "home")
    os.environ["HF_HUB_OFFLINE"] = "1"
    os.environ.pop("PYTHONDONTWRITEBYTECODE", None)
    os.environ["PYTHONPYCACHEPREFIX"] = str(tmp / "pycache")


def main() -> None:
    parser = argparse.ArgumentParser(description=(__doc__ or "").split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="fewer repetitions")
    parser.add_argument("--json", type=Path, metavar="PATH", help="also write the results here")
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    parser.add_argument(
        "--threads", type=int, default=cores or 1, help="decode threads (default: all)"
    )
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
            "llama_cpp": llama_cpp.__version__,
            "python": platform.python_version(),
            "loadavg": " ".join(f"{x:.2f}" for x in os.getloadavg()),
        },
        "ask_model": ASK_MODEL,
    }
    log = LogCounter()
    with tempfile.TemporaryDirectory(prefix="wizardchat-serve-bench-") as tmp_name:
        tmp = Path(tmp_name)
        isolate(tmp)

        step(f"writing the ask model {ASK_MODEL} (about 1 GB)")
        ask_model = gguf_models.write_model(tmp / "ask.gguf", flavour="random", seed=0, **ASK_MODEL)
        fd = os.open(ask_model, os.O_RDONLY)
        try:
            os.fsync(fd)  # no writeback of it during the runs
        finally:
            os.close(fd)
        report["ask"] = bench_ask(ask_model, plan, tmp, step)
        step("ask: in-process loads of the ask model")
        report["load"] = time_loads(ask_model, plan, log)
        ask_model.unlink()

        step(f"writing the benchmark model {BIG}")
        big = gguf_models.write_model(
            tmp / "big.gguf", flavour="random", n_ctx_train=N_CTX, seed=0, **BIG
        )
        report["decode_model"] = {**BIG, "mib": big.stat().st_size / MIB}
        report["decode"] = bench_decode(big, args.threads, plan, tmp, log, step)
    report["seconds"] = time.perf_counter() - started
    print_report(report)
    write_json(report, args.json)


if __name__ == "__main__":
    main()
