"""`--endpoint`: what the client costs a reply streamed from an OpenAI-compatible server.

    .venv/bin/python benchmarks/endpoint.py [--quick] [--json PATH] [--threads N]

llama-cpp-python's own server (`python -m llama_cpp.server`) serves the benchmark model of
benchmarks/engine.py (its BIG shape, n_ctx 8192; without flash attention, with which this
server stalled for minutes mid-stream here). wizardchat's EndpointEngine,
the code `--endpoint` runs, streams 256 greedy tokens of a fixed prompt from it as a chat would
(its Vicuna text, its stop, its reader thread and queue, its JSON checks), and a bare reader
(http.client, each `data:` line's arrival time, nothing parsed but the line) streams the very
same request. The two take turns, the bare one first in every other pair; each rate is pieces
after the first / (arrival of the last - arrival of the first), what a user would see.

The goal is wizardchat / bare >= 0.97: the client must not slow the stream it reads (on a
2-core machine its CPU competes with the server's threads). Why not the server's own figure:
llama-cpp-python's server reports only llama.cpp's `eval time` (its own per-token Python, most
of its time on this small model, is not in it, and the figure is not reset between replies),
so it cannot stand for the rate it streams at. The median of the pairs' ratios is reported.
Runs during which processes other than this one and the server used the CPUs are redone
(benchmarks/engine.py's rules, with serve.py's meter that counts the server as its own).
Nothing is downloaded; everything lives in a temporary directory.
"""

from __future__ import annotations

import argparse
import http.client
import json
import os
import platform
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
import urllib.parse
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "benchmarks"))
sys.path.insert(0, str(ROOT / "tests"))
sys.path.insert(0, str(ROOT / "src"))

import gguf_models  # noqa: E402
import llama_cpp  # noqa: E402
from engine import BIG, N_CTX, Contention, cpu_name, table, verdict, write_json  # noqa: E402
from serve import repeat_tree  # noqa: E402

from wizardchat.chat.conversation import Conversation  # noqa: E402
from wizardchat.endpoint.engine import open_endpoint  # noqa: E402
from wizardchat.settings import DEFAULT_SYSTEM_PROMPT, Settings  # noqa: E402

GOAL = 0.97
TOKENS = 256
MESSAGE = "Tell me more about it."


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def start_server(model: Path, threads: int, log: Path) -> tuple[subprocess.Popen[bytes], str]:
    port = free_port()
    proc = subprocess.Popen(
        [sys.executable, "-m", "llama_cpp.server", "--model", str(model), "--host", "127.0.0.1",
         "--port", str(port), "--n_ctx", str(N_CTX), "--n_threads", str(threads),
         "--n_threads_batch", str(threads)],
        stdin=subprocess.DEVNULL, stdout=log.open("wb"), stderr=subprocess.STDOUT,
    )  # fmt: skip
    url = f"http://127.0.0.1:{port}/v1"
    deadline = time.monotonic() + 120
    while True:
        if proc.poll() is not None:
            raise SystemExit(f"llama_cpp.server ended: {log.read_text(errors='replace')[-800:]}")
        try:
            conn = http.client.HTTPConnection("127.0.0.1", port, timeout=2)
            conn.request("GET", "/v1/models")
            if conn.getresponse().status == 200:
                return proc, url
        except OSError:
            pass
        if time.monotonic() > deadline:
            raise SystemExit("llama_cpp.server did not start in 120 s")
        time.sleep(0.2)


def bare_reply(url: str, body: dict[str, Any]) -> tuple[float, int, str]:
    """The same request read by the least a client can do: tokens/s, pieces, text."""
    parts = urllib.parse.urlsplit(url)
    conn = http.client.HTTPConnection(parts.hostname or "", parts.port or 80, timeout=120)
    conn.request("POST", f"{parts.path}/completions", body=json.dumps(body),
                 headers={"Content-Type": "application/json"})  # fmt: skip
    response = conn.getresponse()
    arrivals: list[float] = []
    texts: list[str] = []
    while line := response.readline():
        if line.startswith(b"data: {"):
            now = time.perf_counter()
            text = json.loads(line[6:])["choices"][0]["text"]
            if text:
                arrivals.append(now)
                texts.append(text)
    conn.close()
    n = len(arrivals)
    seconds = arrivals[-1] - arrivals[0] if n > 1 else 0.0
    return ((n - 1) / seconds if seconds else 0.0), n, "".join(texts)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n", 1)[0])
    parser.add_argument("--quick", action="store_true", help="fewer replies")
    parser.add_argument("--json", type=Path, metavar="PATH", help="also write the results here")
    parser.add_argument("--threads", type=int, default=min(2, os.cpu_count() or 1))
    args = parser.parse_args()
    reps, budget = (3, 150.0) if args.quick else (8, 420.0)
    started = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="wizardchat-endpoint-") as tmp:
        os.environ["WIZARDCHAT_HOME"] = str(Path(tmp) / "home")
        model = gguf_models.write_model(
            Path(tmp) / "big.gguf", flavour="random", n_ctx_train=N_CTX, seed=0, **BIG
        )
        log = Path(tmp) / "server.log"
        print(f"starting llama_cpp.server on the benchmark model ({args.threads} threads)")
        proc, url = start_server(model, args.threads, log)
        try:
            settings = Settings(endpoint=url, temperature=0.0, seed=0, max_tokens=TOKENS)
            engine = open_endpoint(settings, None, lambda _line: None)
            chat = Conversation(
                DEFAULT_SYSTEM_PROMPT, engine.tokenize, engine.bos, engine.eos, engine.n_ctx
            )
            turn = chat.new_turn(MESSAGE)
            prompt, text = chat.prompt(turn), chat.text(turn)
            c = Contention()

            def pair(i: int) -> dict[str, Any] | None:
                def ours() -> tuple[float, int, str]:
                    stream = engine.stream(prompt, TOKENS, threading.Event(), text=text)
                    pieces = [piece for _token, piece in stream]
                    return stream.stats.decode_tokens_per_second, len(pieces), "".join(pieces)

                if i % 2 == 0:
                    bare, mine = bare_reply(url, body), ours()
                else:
                    mine, bare = ours(), bare_reply(url, body)
                if not bare[0] or not mine[0]:
                    return None
                return {
                    "pieces": mine[1],
                    "wizardchat_tps": mine[0],
                    "bare_tps": bare[0],
                    "ratio": mine[0] / bare[0],
                    "same_text": mine[2] == bare[2],
                    "text": mine[2],
                }

            body = {
                "model": engine.model.name, "prompt": text, "stream": True,
                "max_tokens": TOKENS, "temperature": 0.0, "top_p": engine.sampling.top_p,
                "top_k": engine.sampling.top_k, "min_p": engine.sampling.min_p,
                "stop": ["USER:"], "seed": 0,
            }  # fmt: skip
            print("warm-up")
            pair(0)
            print(f"{reps} pairs of replies of {TOKENS} tokens, taking turns")
            results = repeat_tree(reps, budget, pair, c, (proc.pid,))
        finally:
            proc.send_signal(signal.SIGTERM)
            try:
                proc.wait(15)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait(10)
    ratios = [r["ratio"] for r in results]
    same = len({r["text"] for r in results}) == 1 and all(r["same_text"] for r in results)
    report = {
        "machine": {
            "cpu": cpu_name(),
            "cores": len(os.sched_getaffinity(0)),
            "threads": args.threads,
            "llama_cpp": llama_cpp.__version__,
            "python": platform.python_version(),
        },
        "model": BIG,
        "prompt_tokens_counted": len(prompt),
        "replies": results,
        "ratio": statistics.median(ratios),
        "wizardchat_tps": statistics.median(r["wizardchat_tps"] for r in results),
        "bare_tps": statistics.median(r["bare_tps"] for r in results),
        "identical_replies": same,
        "contention": {"redone": c.redone, "max_foreign_cores": max(c.kept_loads, default=0.0)},
        "seconds": time.perf_counter() - started,
    }
    print()
    print(
        f"machine   {report['machine']['cores']} cores ({report['machine']['cpu']}), "
        f"{args.threads} server threads, llama-cpp-python {llama_cpp.__version__}"
    )
    print(
        f"model     benchmarks/engine.py's BIG shape {BIG}, n_ctx {N_CTX}, "
        f"greedy; prompt {len(prompt)} tokens (as counted through the server's tokenizer)"
    )
    print(
        f"replies   {len(results)} pairs of {TOKENS} tokens ({results[0]['pieces']} pieces); "
        f"through --endpoint {report['wizardchat_tps']:.1f} pieces/s, bare reader "
        f"{report['bare_tps']:.1f} (medians); per pair {min(ratios):.3f}..{max(ratios):.3f}"
    )
    print(f"load      {c.redone} runs redone (other processes using the CPUs)")
    print()
    table(
        [
            (
                "decode rate, through --endpoint / a bare reader",
                f"{report['ratio']:.4f}",
                f">= {GOAL}",
                verdict(report["ratio"] >= GOAL),
            ),
            ("the same greedy reply, both readers", "yes" if same else "no", "yes", verdict(same)),
        ],
        ("metric", "measured", "goal", ""),
    )  # fmt: skip
    print(f"total     {report['seconds']:.1f} s")
    write_json(report, args.json)


if __name__ == "__main__":
    main()
