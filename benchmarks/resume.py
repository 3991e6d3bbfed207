"""Resuming a saved conversation: its KV state restored from disk against re-evaluating it.

    .venv/bin/python benchmarks/resume.py [--quick] [--json PATH] [--threads N] [--dir PATH]

Three figures, on the benchmark model of benchmarks/engine.py (its BIG shape: random weights,
F32, 8 experts with 2 used), with wizardchat's default KV settings (f16 K and V):

1. restore ÷ re-evaluate: the seconds `KvCache.restore` takes to bring back a conversation of
   1K, 4K and 8K tokens from its state file (record checks, llama.cpp's sequence-state load,
   llama-cpp-python's bookkeeping) divided by the seconds llama.cpp takes to evaluate the same
   tokens into an empty cache, which is what a resume costs without a state. Goal: <= 1/20 at 4K.
   Restores are timed warm (the file in the page cache, as right after a save) and cold (the
   file's pages dropped with posix_fadvise(DONTNEED) after its fsync, checked with mincore; a
   virtual disk may still be cached by the host). After a restore the next prompt must evaluate
   only what the state lacks: the last reply's final token and EOS, then the new message;
2. the state files: bytes per token, and what that means for WizardLM-2 8x22B, whose f16 KV
   cache takes 224 KiB a token (56 layers x 8 KV heads x 128 dims x K and V x 2 bytes);
3. the save after a reply: at a 4K and an 8K history, a 32-token reply alone against the same
   reply followed by a forced `KvCache.checkpoint` (what a reply costs when the policy writes:
   once the cache has grown SAVE_EVERY_TOKENS since the last write, and when leaving).

The conversations are real `ChatSession` histories: BOS, the default system prompt, then turns
of generated user text (random words of the test vocabulary, up to 400 tokens a message) with
greedy replies of up to 64 tokens, added until `conversation.tokens()` reaches the size (the
last message is sized to land on it; a reply that ends early leaves it a few tokens short).
The state saved is the cache a session holds after its last reply: all of the history but the
reply's final token and EOS, which llama.cpp never evaluated. Nothing is downloaded; the model
and the states live in a temporary directory (under --dir if given), removed at the end.

Runs during which other processes used the CPUs are redone (within a time budget) and reported,
as in benchmarks/engine.py, whose meter and retry loop this reuses: re-evaluation is llama.cpp's
threads on every core, and one busy core makes it slower, flattering the ratio.
"""

from __future__ import annotations

import argparse
import contextlib
import ctypes
import mmap
import os
import platform
import random
import statistics
import sys
import tempfile
import threading
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "benchmarks"))
sys.path.insert(0, str(ROOT / "tests"))
sys.path.insert(0, str(ROOT / "src"))

import gguf_models  # noqa: E402
import llama_cpp  # noqa: E402
from engine import (  # noqa: E402  (benchmarks/engine.py: the same meter, retries and table)
    BIG,
    MAX_FOREIGN_CORES,
    Contention,
    LogCounter,
    cpu_name,
    repeat,
    table,
    verdict,
    write_json,
)

from wizardchat.chat.kv_cache import SAVE_EVERY_TOKENS, KvCache  # noqa: E402
from wizardchat.chat.kv_store import KvStore  # noqa: E402
from wizardchat.chat.session import ChatSession  # noqa: E402
from wizardchat.engine.llama_engine import LlamaEngine  # noqa: E402
from wizardchat.settings import DEFAULT_SYSTEM_PROMPT, load_settings  # noqa: E402

N_CTX = 9216  # 8K of history, a message and a reply
N_CTX_TRAIN = 16384
BUILD_MESSAGE_TOKENS = 400  # the longest user message while a history is built
BUILD_REPLY_TOKENS = 64
REPLY_TOKENS = 32  # the reply timed with and without a save after it
REPLY_SAVE_FROM = 4096  # histories this long or longer get the reply-and-save figure
GOAL_TOKENS, GOAL_RATIO = 4096, 1 / 20
MIN_BATCH_S = 0.3  # fast operations are timed in batches this long (the CPU meter ticks at 10 ms)
KIB, MIB, GIB = 1 << 10, 1 << 20, 1 << 30
# WizardLM-2 8x22B: 56 layers, 8 KV heads of 128 dims; K and V; f16.
WIZARDLM2_KV_BYTES = 56 * 8 * 128 * 2 * 2
KV_ELEMENT_BYTES = {"f32": 4.0, "f16": 2.0, "bf16": 2.0, "q8_0": 34 / 32, "q4_0": 18 / 32}
PROJECT_TOKENS = 16384


@dataclass(frozen=True)
class Plan:
    """How long each part runs."""

    sizes: tuple[int, ...]
    reeval_reps: int
    io_reps: int  # batches of saves, warm restores, cold restores
    io_batch_max: int  # operations in one batch at most
    reply_pairs: int
    budget_s: float  # retries of contended runs stop here, per measurement


FULL = Plan(
    (1024, 4096, 8192), reeval_reps=5, io_reps=5, io_batch_max=40, reply_pairs=7, budget_s=60
)
QUICK = Plan((1024, 4096), reeval_reps=2, io_reps=2, io_batch_max=10, reply_pairs=3, budget_s=20)


# --- page cache --------------------------------------------------------------------------------


def drop_from_page_cache(path: Path) -> None:
    """Ask the kernel to forget the file's cached pages (they are clean: written and fsynced)."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
        os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
    finally:
        os.close(fd)


def resident_fraction(path: Path) -> float | None:
    """The fraction of the file's pages in the page cache (mincore); None when unknown."""
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        libc.mmap.restype = ctypes.c_void_p
        libc.mmap.argtypes = [
            ctypes.c_void_p,
            ctypes.c_size_t,
            ctypes.c_int,
            ctypes.c_int,
            ctypes.c_int,
            ctypes.c_long,
        ]
        libc.munmap.argtypes = [ctypes.c_void_p, ctypes.c_size_t]
        libc.mincore.argtypes = [
            ctypes.c_void_p,
            ctypes.c_size_t,
            ctypes.POINTER(ctypes.c_ubyte),
        ]
        size = path.stat().st_size
        if size == 0:
            return None
        pages = (size + mmap.PAGESIZE - 1) // mmap.PAGESIZE
        fd = os.open(path, os.O_RDONLY)
        try:
            addr = libc.mmap(None, size, mmap.PROT_READ, mmap.MAP_SHARED, fd, 0)
        finally:
            os.close(fd)
        if addr in (None, ctypes.c_void_p(-1).value):
            return None
        try:
            vec = (ctypes.c_ubyte * pages)()
            if libc.mincore(addr, size, vec) != 0:
                return None
            return sum(b & 1 for b in vec) / pages
        finally:
            libc.munmap(addr, size)
    except (OSError, AttributeError):
        return None


def filesystem_of(path: Path) -> str:
    """The type and device of the filesystem holding `path` (from /proc/mounts)."""
    best, found = "", "unknown"
    with contextlib.suppress(OSError):
        for line in Path("/proc/mounts").read_text().splitlines():
            fields = line.split()
            if len(fields) < 3:
                continue
            point = fields[1].replace("\\040", " ")
            inside = str(path) == point or str(path).startswith(point.rstrip("/") + "/")
            if inside and len(point) > len(best):
                best, found = point, f"{fields[2]} on {fields[0]}"
    return found


# --- the conversation -------------------------------------------------------------------------


def user_text(session: ChatSession, n_tokens: int, rng: random.Random) -> str:
    """A user message whose segment (`USER: ... ASSISTANT:`) is at most `n_tokens` tokens."""
    words = [rng.choice(gguf_models.WORDS) for _ in range(n_tokens)]

    def size(k: int) -> int:
        return len(session.conversation.new_turn(" ".join(words[:k])).user_tokens)

    lo, hi = 1, n_tokens  # the most words whose segment fits
    while lo < hi:
        mid = (lo + hi + 1) // 2
        if size(mid) <= n_tokens:
            lo = mid
        else:
            hi = mid - 1
    return " ".join(words[:lo])


def grow(session: ChatSession, target: int, rng: random.Random) -> int:
    """Add turns until the history the model sees is `target` tokens (short of it only when a
    reply ends before its budget). Returns the turns added."""
    conv, turns = session.conversation, 0
    overhead = len(conv.new_turn("").user_tokens)
    whole = overhead + 8 + BUILD_REPLY_TOKENS + 1  # the smallest usual turn
    try:
        while True:
            gap = target - len(conv.tokens())
            if gap < overhead + 3:  # not even a one-word message, a one-token reply and EOS
                return turns
            reply = max(1, min(BUILD_REPLY_TOKENS, gap - overhead - 2))
            room = gap - reply - 1  # the message; the reply and its EOS take the rest
            message = min(room, BUILD_MESSAGE_TOKENS)
            if message < room < message + whole:
                message = room // 2  # two turns to go: one would be too long, leave room for both
            session.max_tokens = reply
            session.send(user_text(session, message, rng)).text()
            turns += 1
    finally:
        session.max_tokens = BUILD_REPLY_TOKENS


# --- measurements ------------------------------------------------------------------------------


def batch(once: Callable[[], float], max_n: int) -> list[float]:
    """Seconds of `once()` done at least 3 times, then until MIN_BATCH_S passed or `max_n`."""
    times: list[float] = []
    end = time.perf_counter() + MIN_BATCH_S
    while len(times) < 3 or (len(times) < max_n and time.perf_counter() < end):
        times.append(once())
    return times


def flat(runs: list[list[float]]) -> list[float]:
    return [x for run in runs for x in run]


@dataclass
class Bench:
    """The engine, the session and the state directory the measurements share."""

    engine: LlamaEngine
    session: ChatSession
    store: KvStore
    plan: Plan
    notes: list[str]

    def kv(self) -> KvCache:
        """A fresh KvCache: it knows of no earlier save, so a checkpoint always writes."""
        return KvCache(self.engine, self.store, self.notes.append)

    def restore(self, name: str, tokens: list[int], held: int) -> float:
        """Empty the cache, then time the restore of `name`; a restore that does not bring back
        the `held` tokens the state holds is a real error."""
        self.engine.kv_keep(0)
        self.notes.clear()
        start = time.perf_counter()
        n = self.kv().restore(name, tokens)
        seconds = time.perf_counter() - start
        if n != held or self.engine.llm.n_tokens != held:
            raise SystemExit(
                f"restore of a {len(tokens)}-token conversation brought back {n} tokens "
                f"(the cache holds {self.engine.llm.n_tokens}; {held} saved): "
                + "; ".join(self.notes)
            )
        return seconds

    def reevaluate(self, tokens: list[int]) -> float:
        """Empty the cache and evaluate `tokens` into it (one token sampled after them)."""
        self.engine.kv_keep(0)
        stream = self.engine.stream(tokens, 1, threading.Event())
        for _ in stream:
            pass
        if stream.stats.evaluated_tokens != len(tokens):
            raise SystemExit(
                f"re-evaluating {len(tokens)} tokens evaluated {stream.stats.evaluated_tokens}"
            )
        return float(stream.stats.prompt_seconds)


def measure_size(b: Bench, turns_before: int) -> dict[str, Any]:
    """Save, restore (warm and cold) and re-evaluate the session's history as it is now."""
    engine, plan, name = b.engine, b.plan, "resume"
    tokens = b.session.conversation.tokens()
    n = len(tokens)
    held = engine.kv_held(tokens)
    c = {k: Contention() for k in ("save", "warm", "cold", "reeval")}
    path = b.store.kv_path(name)

    def save() -> float:
        start = time.perf_counter()
        b.kv().checkpoint(name, tokens, leaving=True)
        seconds = time.perf_counter() - start
        if not path.exists():
            raise SystemExit(f"no state was written for {n} tokens: " + "; ".join(b.notes))
        return seconds

    saves = flat(repeat(plan.io_reps, plan.budget_s, lambda _i: batch(save, 20), c["save"]))
    record = b.store.read(name)
    assert record is not None
    state_bytes = path.stat().st_size

    warm = flat(
        repeat(
            plan.io_reps,
            plan.budget_s,
            lambda _i: batch(lambda: b.restore(name, tokens, held), plan.io_batch_max),
            c["warm"],
        )
    )
    warm_resident = resident_fraction(path)

    # The next prompt after a restore: the history and a new message, of which only the new
    # message and what the state lacks (the last reply's final token, EOS) may be evaluated.
    b.restore(name, tokens, held)
    new = b.session.conversation.new_turn("Tell me more about it.").user_tokens
    stream = engine.stream(tokens + new, 1, threading.Event())
    for _ in stream:
        pass
    next_evaluated = stream.stats.evaluated_tokens
    next_allowed = n - held + len(new) + 1  # +1: llama.cpp may redo one token for its logits

    residents: list[float] = []

    def cold() -> float:
        drop_from_page_cache(path)
        fraction = resident_fraction(path)
        if fraction is not None:
            residents.append(fraction)
        return b.restore(name, tokens, held)

    colds = flat(
        repeat(plan.io_reps, plan.budget_s, lambda _i: batch(cold, plan.io_batch_max), c["cold"])
    )

    reevals = repeat(plan.reeval_reps, plan.budget_s, lambda _i: b.reevaluate(tokens), c["reeval"])
    # the session goes on from its history: the cache holds all of it now
    reeval_s = statistics.median(reevals)
    warm_s, cold_s, save_s = (statistics.median(x) for x in (warm, colds, saves))
    return {
        "tokens": n,
        "turns": turns_before,
        "held": held,
        "state_bytes": state_bytes,
        "record_kv_bytes": record.kv_bytes,
        "bytes_per_token": state_bytes / held,
        "save_s": save_s,
        "saves": saves,
        "warm_restore_s": warm_s,
        "warm_restores": warm,
        "warm_resident_after": warm_resident,
        "cold_restore_s": cold_s,
        "cold_restores": colds,
        "cold_resident_before_max": max(residents) if residents else None,
        "reeval_s": reeval_s,
        "reevals": reevals,
        "ratio_warm": warm_s / reeval_s,
        "ratio_cold": cold_s / reeval_s,
        "next_prompt_tokens": n + len(new),
        "next_new_tokens": len(new),
        "next_evaluated": next_evaluated,
        "next_ok": next_evaluated <= next_allowed,
        "contention": c,
    }


def measure_reply_save(b: Bench, rng: random.Random) -> dict[str, Any]:
    """A REPLY_TOKENS reply at the current history, without and with a forced save after it."""
    engine, session, plan = b.engine, b.session, b.plan
    base = session.conversation.tokens()
    c = Contention()
    max_tokens = session.max_tokens
    session.max_tokens = REPLY_TOKENS

    def reply(text: str, save: bool) -> tuple[float, float, int, int]:
        engine.kv_keep(engine.kv_held(base))  # the history only: each reply evaluates its message
        start = time.perf_counter()
        answer = session.send(text)
        answer.text()
        replied = time.perf_counter()
        if save:
            b.kv().checkpoint("reply", session.conversation.tokens(), leaving=True)
        saved = time.perf_counter()
        result = answer.result
        session.drop_last()
        if save and not b.store.kv_path("reply").exists():
            raise SystemExit("no state was written after a reply: " + "; ".join(b.notes))
        return replied - start, saved - replied, result.completion_tokens, result.evaluated_tokens

    def pair(i: int) -> dict[str, float]:
        text = user_text(session, 24, rng)
        if i % 2 == 0:
            plain = reply(text, save=False)
            saving = reply(text, save=True)
        else:
            saving = reply(text, save=True)
            plain = reply(text, save=False)
        return {
            "reply_s": plain[0],
            "reply_with_save_s": saving[0],
            "save_s": saving[1],
            "completion_tokens": plain[2],
            "evaluated_tokens": plain[3],
        }

    try:
        pairs = repeat(plan.reply_pairs, plan.budget_s, pair, c)
    finally:
        session.max_tokens = max_tokens
    reply_s = statistics.median(p["reply_s"] for p in pairs)
    save_s = statistics.median(p["save_s"] for p in pairs)
    return {
        "history_tokens": len(base),
        "pairs": pairs,
        "reply_s": reply_s,
        "save_s": save_s,
        "state_bytes": b.store.kv_path("reply").stat().st_size,
        "completion_tokens": pairs[0]["completion_tokens"],
        "evaluated_tokens": pairs[0]["evaluated_tokens"],
        "ratio": statistics.median(
            (p["reply_with_save_s"] + p["save_s"]) / p["reply_s"] for p in pairs
        ),
        "contention": c,
    }


# --- output -----------------------------------------------------------------------------------


def ms(seconds: float) -> str:
    return f"{seconds * 1e3:.1f} ms" if seconds < 10 else f"{seconds:.1f} s"


def busy(*cs: Contention) -> str:
    return " (busy machine)" if any(c.contended for c in cs) else ""


def size_label(n: int) -> str:
    return f"{round(n / 1024)}K"


def print_report(r: dict[str, Any]) -> None:
    m, big, sizes, replies = r["machine"], r["model"], r["sizes"], r["reply_save"]
    print()
    print(f"machine   {m['cores']} cores usable ({m['cpu']}), {m['threads']} threads")
    print(f"          llama-cpp-python {m['llama_cpp']}, Python {m['python']}")
    print(f"          load average at start {m['loadavg']}")
    print(
        f"model     random MoE (tests/gguf_models.py), n_embd {big['n_embd']}, "
        f"n_layer {big['n_layer']}, n_head {big['n_head']} ({big['n_head_kv']} kv), "
        f"n_ff {big['n_ff']} x 8 experts (2 used), vocab {big['n_vocab']}, "
        f"F32 {big['mib']:.0f} MiB"
    )
    s = r["settings"]
    print(
        f"settings  n_ctx {s['n_ctx']}, n_batch/n_ubatch {s['batch']}/{s['ubatch']}, flash_attn "
        f"{s['flash_attn']}, {s['kv']} KV, greedy; {r['mode']} run"
    )
    print(f"states    {r['state_dir']} ({r['filesystem']})")
    print(
        f"history   ChatSession turns: user text <= {BUILD_MESSAGE_TOKENS} tokens, replies <= "
        f"{BUILD_REPLY_TOKENS}; the state holds all of it but the last reply's final token and EOS"
    )
    print()
    rows: list[tuple[str, ...]] = []
    for x in sizes:
        rows.append(
            (
                size_label(x["tokens"]),
                f"{x['tokens']:,}",
                f"{x['held']:,}",
                ms(x["reeval_s"]),
                f"{x['tokens'] / x['reeval_s']:.0f}",
                ms(x["warm_restore_s"]),
                ms(x["cold_restore_s"]),
                f"1/{1 / x['ratio_warm']:.0f}",
                f"1/{1 / x['ratio_cold']:.0f}",
                ms(x["save_s"]),
                f"{x['state_bytes'] / MIB:.1f} MiB",
                f"{x['bytes_per_token']:,.0f}",
                f"{x['next_evaluated']} ({x['next_new_tokens']} new)",
            )
        )
    table(
        rows,
        (
            "size",
            "history",
            "in state",
            "re-eval",
            "tok/s",
            "restore",
            "cold",
            "warm/re-eval",
            "cold/re-eval",
            "save",
            "state file",
            "B/token",
            "next eval",
        ),
    )
    print()
    print(
        "re-eval: evaluating the history into an empty cache (median of "
        f"{len(sizes[0]['reevals'])}); restore: KvCache.restore into an empty cache, file in the "
        "page cache;\ncold: the same after posix_fadvise(DONTNEED) on the fsynced file; save: "
        "KvCache.checkpoint(leaving=True), fsync included;\nnext eval: tokens the first prompt "
        "after a restore evaluated (history + a new message)."
    )
    cold_res = [x["cold_resident_before_max"] for x in sizes]
    if all(v is not None for v in cold_res):
        print(
            f"cold:   at most {max(cold_res):.0%} of the state file was in the page cache before "
            "a cold restore (mincore); the host may cache the virtual disk anyway"
        )
    else:
        print("cold:   mincore unavailable: whether the pages were dropped is not known")
    print()
    goal = [x for x in sizes if size_label(x["tokens"]) == size_label(GOAL_TOKENS)]
    result_rows: list[tuple[str, ...]] = []
    for x in goal:
        cs = x["contention"]
        result_rows.append(
            (
                f"restore / re-eval @{size_label(x['tokens'])}, warm",
                f"{x['ratio_warm']:.4f}  ({ms(x['warm_restore_s'])} / {ms(x['reeval_s'])})",
                f"<= {GOAL_RATIO:.2f}",
                verdict(x["ratio_warm"] <= GOAL_RATIO) + busy(cs["warm"], cs["reeval"]),
            )
        )
        result_rows.append(
            (
                f"restore / re-eval @{size_label(x['tokens'])}, cold",
                f"{x['ratio_cold']:.4f}  ({ms(x['cold_restore_s'])} / {ms(x['reeval_s'])})",
                f"<= {GOAL_RATIO:.2f}",
                verdict(x["ratio_cold"] <= GOAL_RATIO) + busy(cs["cold"], cs["reeval"]),
            )
        )
    for x in sizes:
        allowed = x["tokens"] - x["held"] + x["next_new_tokens"] + 1
        result_rows.append(
            (
                f"first prompt after restore @{size_label(x['tokens'])}, evaluated",
                f"{x['next_evaluated']} of {x['next_prompt_tokens']:,}",
                f"<= {allowed}",
                verdict(x["next_ok"]),
            )
        )
    table(result_rows, ("metric", "measured", "goal", ""))
    if replies:
        print()
        reply_rows: list[tuple[str, ...]] = [
            (
                size_label(y["history_tokens"]),
                f"{y['history_tokens']:,}",
                f"{y['completion_tokens']} ({y['evaluated_tokens']} evaluated)",
                ms(y["reply_s"]),
                ms(y["save_s"]),
                f"{y['state_bytes'] / MIB:.1f} MiB",
                f"+{(y['ratio'] - 1):.0%}",
                f"{len(y['pairs'])}{busy(y['contention'])}",
            )
            for y in replies
        ]
        table(
            reply_rows,
            ("history", "tokens", "reply tokens", "reply", "save after", "state", "extra", "pairs"),
        )
        print()
        print(
            f"reply: a {REPLY_TOKENS}-token reply to a ~24-token message; save after: the forced "
            "checkpoint that follows it;\nextra: (reply + save) / reply alone - 1, median of the "
            "pairs (the order alternating).\n"
            f"policy: after a reply the state is written only when the cache has grown "
            f"{SAVE_EVERY_TOKENS} tokens since the last write,\nand always when the conversation "
            "is left (exit, SIGTERM/SIGHUP, /save, /load, /new, /system): with 256-token turns "
            f"one reply in {SAVE_EVERY_TOKENS // 256} pays the save."
        )
    p = r["projection"]
    print()
    print(
        f"size      the state file is {p['measured_bytes_per_token']:,.0f} bytes a token: "
        f"{p['kv_bytes_per_token']:,.0f} of KV ({big['n_layer']} layers x {big['n_head_kv']} "
        f"KV heads x {p['head_dim']} dims x K,V x {s['kv']}) and "
        f"{p['overhead_bytes_per_token']:,.0f} of token id and cell metadata"
    )
    print(
        f"          WizardLM-2 8x22B at f16: {WIZARDLM2_KV_BYTES / KIB:.0f} KiB of KV a token "
        f"(56 x 8 x 128 x 2 x 2 bytes); at {PROJECT_TOKENS // 1024}K tokens the state is "
        f"{p['wizardlm2_state_bytes'] / GIB:.2f} GiB"
    )
    print(
        f"          at the rates measured here for the {size_label(p['from_tokens'])} state "
        f"(save {p['save_gb_s']:.2f} GB/s, restore warm {p['warm_gb_s']:.2f} GB/s, cold "
        f"{p['cold_gb_s']:.2f} GB/s) that is {p['wizardlm2_save_s']:.1f} s to save,\n"
        f"          {p['wizardlm2_warm_s']:.1f} s to restore warm and "
        f"{p['wizardlm2_cold_s']:.1f} s cold on this (virtual) disk"
    )
    cs = [c for x in sizes for c in x["contention"].values()]
    cs += [y["contention"] for y in replies]
    contended = sum(c.contended for c in cs)
    loads = [x for c in cs for x in c.kept_loads]
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


def projection(r: dict[str, Any]) -> dict[str, Any]:
    """The state size per token, split into KV and overhead, and WizardLM-2 8x22B's estimate."""
    big, kv_type = r["model"], r["settings"]["type_k"]
    x = r["sizes"][-1]
    head_dim = big["n_embd"] // big["n_head"]
    element = KV_ELEMENT_BYTES.get(kv_type, 2.0)
    kv_bytes = big["n_layer"] * big["n_head_kv"] * head_dim * 2 * element
    overhead = x["bytes_per_token"] - kv_bytes
    wizard = PROJECT_TOKENS * (WIZARDLM2_KV_BYTES + overhead)
    rate = {
        key: x["state_bytes"] / x[key + "_s"] / 1e9
        for key in ("save", "warm_restore", "cold_restore")
    }
    return {
        "from_tokens": x["tokens"],
        "measured_bytes_per_token": x["bytes_per_token"],
        "head_dim": head_dim,
        "kv_bytes_per_token": kv_bytes,
        "overhead_bytes_per_token": overhead,
        "wizardlm2_kv_bytes_per_token": WIZARDLM2_KV_BYTES,
        "wizardlm2_state_bytes": wizard,
        "save_gb_s": rate["save"],
        "warm_gb_s": rate["warm_restore"],
        "cold_gb_s": rate["cold_restore"],
        "wizardlm2_save_s": wizard / 1e9 / rate["save"],
        "wizardlm2_warm_s": wizard / 1e9 / rate["warm_restore"],
        "wizardlm2_cold_s": wizard / 1e9 / rate["cold_restore"],
    }


def physical_cores() -> int:
    """Distinct cores (not SMT siblings) among the CPUs this process may run on; 2 if unknown."""
    cpus = os.sched_getaffinity(0) if hasattr(os, "sched_getaffinity") else set()
    cores = set()
    for cpu in cpus:
        topo = Path(f"/sys/devices/system/cpu/cpu{cpu}/topology")
        try:
            package = (topo / "physical_package_id").read_text().strip()
            cores.add((package, (topo / "core_id").read_text().strip()))
        except OSError:
            cores.add(("cpu", str(cpu)))
    return len(cores) or 2


def main() -> None:
    parser = argparse.ArgumentParser(description=(__doc__ or "").split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="1K and 4K only, fewer repetitions")
    parser.add_argument("--json", type=Path, metavar="PATH", help="also write the results here")
    parser.add_argument(
        "--threads", type=int, default=physical_cores(), help="threads (default: physical cores)"
    )
    parser.add_argument(
        "--dir", type=Path, metavar="PATH", help="where the temporary model and states go"
    )
    args = parser.parse_args()
    plan = QUICK if args.quick else FULL
    started = time.perf_counter()

    def step(text: str) -> None:
        print(f"[{time.perf_counter() - started:5.1f}s] {text}", file=sys.stderr, flush=True)

    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
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
    }
    rng = random.Random(0)
    log = LogCounter()
    with tempfile.TemporaryDirectory(prefix="wizardchat-resume-", dir=args.dir) as tmp:
        step(f"writing the model {BIG}")
        model = gguf_models.write_model(
            Path(tmp) / "big.gguf", flavour="random", n_ctx_train=N_CTX_TRAIN, seed=0, **BIG
        )
        flags = {
            "model": str(model),
            "ctx_size": N_CTX,
            "threads": args.threads,
            "seed": 1,
            "temperature": 0,
        }
        settings = load_settings(flags, config_path=Path("/nonexistent"), environ={})
        engine = LlamaEngine(settings, progress=None, log=log)
        try:
            lp = engine.load_plan
            report["model"] = {
                **BIG,
                "n_vocab": engine.llm.n_vocab(),
                "mib": model.stat().st_size / MIB,
            }
            report["settings"] = {
                "n_ctx": engine.n_ctx,
                "batch": lp.batch_size,
                "ubatch": lp.ubatch_size,
                "flash_attn": "on" if lp.flash_attn else "off",
                "kv": f"{lp.type_k}/{lp.type_v}",
                "type_k": lp.type_k,
            }
            state_dir = Path(tmp) / "kv"
            report["state_dir"] = str(state_dir)
            report["filesystem"] = filesystem_of(Path(tmp))
            engine.kv_identity()  # the model fingerprint: once per process, not per save
            notes: list[str] = []
            session = ChatSession(
                engine, system=DEFAULT_SYSTEM_PROMPT, max_tokens=BUILD_REPLY_TOKENS
            )
            bench = Bench(engine, session, KvStore(state_dir, 1 << 40), plan, notes)

            step("warm-up: 512 tokens evaluated twice (weights paged in)")
            warm_tokens = [engine.bos, *engine.tokenize(user_text(session, 511, rng))][:512]
            for _ in range(2):
                bench.reevaluate(warm_tokens)
            engine.kv_keep(0)

            sizes, replies, turns = [], [], 0
            for target in plan.sizes:
                step(f"history: growing to {target} tokens")
                turns += grow(session, target, rng)
                n = len(session.conversation.tokens())
                step(f"{n} tokens: save, restore warm and cold, re-evaluate")
                sizes.append(measure_size(bench, turns))
                if target >= REPLY_SAVE_FROM:
                    step(f"{n} tokens: {REPLY_TOKENS}-token replies without and with a save")
                    replies.append(measure_reply_save(bench, rng))
            report["sizes"] = sizes
            report["reply_save"] = replies
        finally:
            engine.close()
    report["projection"] = projection(report)
    report["log_lines"] = log.lines
    report["seconds"] = time.perf_counter() - started
    print_report(report)
    write_json(report, args.json)


if __name__ == "__main__":
    main()
