"""The start-up of `wizardchat ask`, phase by phase, from process start to the first token.

    .venv/bin/python benchmarks/startup.py [--model FILE.gguf] [--runs N] [--baseline SRC]
                                           [--json PATH]

Each run starts `wizardchat ask -m FILE -t 2 -c 2048 --temp 0 -n 1 Hi` in a fresh Python (stdin
from /dev/null, stdout a pipe, a temporary WIZARDCHAT_HOME) with a probe: an import hook that
timestamps a few functions of cli/ and gguf_file.py when they are called, with the monotonic
clock this process reads too. The phases, medians over the runs:

    interpreter    process start to the first line of Python (the interpreter, site, .pth files)
    cli            to the `ask` command's first line: importing typer and cli/, parsing argv
    settings       to the settings and the model file (settings_and_model_ref)
    engine import  to the header check: the log, a running server looked for, importing the
                   engine and llama_cpp (its share: `import llama_cpp` below)
    header check   gguf_file.inspect_model: the GGUF header read and checked
    load           to the engine loaded (the plan, llama.cpp's model and context)
    first token    to the reply's first byte on stdout (the prompt evaluated, one token)
    exit           to the process's end (the model freed, the interpreter's exit)

The model is --model (SmolLM2-135M-Instruct Q4_1 from benchmarks/peers.py's cache when it is
there), else a generated one (tests/gguf_models.py, a small vocabulary). --baseline SRC runs
another checkout's src/ (`git archive COMMIT src | tar -x -C DIR` gives one) in alternation with
this one, so that both see the same machine, and reports both and their difference.
PYTHONDONTWRITEBYTECODE is removed from the children's environment (compiling every module on
every run is not a start-up) and one unmeasured warm-up run of each tree writes the .pyc files.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from math import nan
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
MODEL_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"
ARGS = ("-t", "2", "-c", "2048", "--temp", "0", "-n", "1", "Hi")
RUN_TIMEOUT_S = 120
PHASES = (
    "interpreter", "cli", "settings", "engine import", "header check", "load", "first token",
    "exit",
)  # fmt: skip

# The imports reported as part of a phase.
PART_OF = {"cli": ("typer",), "engine import": ("llama_cpp", "llama_cpp.llama_cpp")}

# Runs in the child before wizardchat: records when each watched function starts and returns
# (and when watched modules finish importing), then runs the console script's entry point.
PROBE = r"""
import time
T = {"python": time.monotonic()}
import atexit, functools, importlib.machinery, json, os, sys

def timed(name, function):
    @functools.wraps(function)
    def wrapper(*args, **kwargs):
        T.setdefault(name + ">", time.monotonic())
        try:
            return function(*args, **kwargs)
        finally:
            T.setdefault(name + "<", time.monotonic())
    return wrapper

WRAP = {
    "wizardchat.cli.chat": ("ask",),
    "wizardchat.cli.wiring": ("settings_and_model_ref", "_open_engine"),
    "wizardchat.gguf_file": ("inspect_model",),
}
IMPORTS = ("typer", "llama_cpp", "llama_cpp.llama_cpp")

class Probe:
    def find_spec(self, name, path=None, target=None):
        if name not in WRAP and name not in IMPORTS:
            return None
        spec = importlib.machinery.PathFinder.find_spec(name, path)
        if spec is None or spec.loader is None:
            return spec
        execute = spec.loader.exec_module
        def exec_module(module):
            T["import " + name + ">"] = time.monotonic()
            execute(module)
            T["import " + name + "<"] = time.monotonic()
            for attr in WRAP.get(name, ()):
                setattr(module, attr, timed(attr, getattr(module, attr)))
        spec.loader.exec_module = exec_module
        return spec

sys.meta_path.insert(0, Probe())

@atexit.register
def report():
    with open(os.environ["STARTUP_PROBE_OUT"], "w") as f:
        json.dump(T, f)

sys.argv[0] = "wizardchat"
from wizardchat.entry import main
sys.exit(main())
"""


def default_model() -> Path | None:
    """SmolLM2 where benchmarks/peers.py keeps it, if it is there."""
    cache = os.environ.get("WIZARDCHAT_PEERS_CACHE")
    base = Path(cache) if cache else Path.home() / ".cache" / "wizardchat-peers"
    path = base / "model" / MODEL_FILE
    return path if path.is_file() else None


def run_once(model: Path, src: Path | None, work: Path) -> dict[str, float]:
    """One `ask` in a fresh process: each phase's seconds, and the extra figures."""
    env = {k: v for k, v in os.environ.items() if k != "PYTHONDONTWRITEBYTECODE"}
    env["WIZARDCHAT_HOME"] = str(work / "home")
    env["STARTUP_PROBE_OUT"] = str(work / "probe.json")
    if src is not None:
        env["PYTHONPATH"] = os.pathsep.join([str(src), env.get("PYTHONPATH", "")]).rstrip(":")
    argv = [sys.executable, "-c", PROBE, "ask", "-m", str(model), *ARGS]
    with open(work / "stderr", "wb") as err:
        start = time.monotonic()
        proc = subprocess.Popen(
            argv, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=err, env=env
        )
        assert proc.stdout is not None
        first = proc.stdout.read(1)
        first_byte = time.monotonic()
        proc.stdout.read()
        code = proc.wait(timeout=RUN_TIMEOUT_S)
        end = time.monotonic()
    if code != 0 or not first:
        tail = (work / "stderr").read_text(errors="replace")[-2000:]
        raise SystemExit(f"wizardchat ask ended with exit {code}, output {first!r}:\n{tail}")
    t = json.loads((work / "probe.json").read_text())
    marks = [
        start,
        t["python"],
        t["ask>"],
        t["settings_and_model_ref<"],
        t["inspect_model>"],
        t["inspect_model<"],
        t["_open_engine<"],
        first_byte,
        end,
    ]
    out: dict[str, float] = {}
    for name, a, b in zip(PHASES, marks[:-1], marks[1:], strict=True):
        out[name] = b - a
        for module in PART_OF.get(name, ()):
            # nan where the import system never ran it (engine/llama_lib.py makes the package
            # module itself and runs its __init__ only if something asks for more)
            began, ended = t.get(f"import {module}>", nan), t.get(f"import {module}<", nan)
            out[f"import {module}"] = ended - began
    out["first token (from start)"] = first_byte - start
    out["total"] = end - start
    return out


def print_report(results: dict[str, list[dict[str, float]]]) -> None:
    """Each tree's medians in ms, one column each (and the difference, for two)."""
    names = list(results)
    keys = list(results[names[0]][0])
    med = {n: {k: statistics.median(r[k] for r in results[n]) * 1e3 for k in keys} for n in names}
    head = f"{'phase':26}" + "".join(f"{n:>12}" for n in names)
    print(head + (f"{'difference':>12}" if len(names) == 2 else ""))
    for k in keys:
        label = f"  {k}" if k.startswith("import") else k
        if k == "first token (from start)":
            print()
        line = f"{label:26}" + "".join(f"{med[n][k]:12.1f}" for n in names)
        if len(names) == 2:
            line += f"{med[names[0]][k] - med[names[1]][k]:+12.1f}"
        print(line)
    runs = len(results[names[0]])
    print(
        f"\nms, median of {runs} run(s) each. The `import` lines are part of the phase above;"
        "\nllama_cpp.llama_cpp is the bindings, llama_cpp the whole package (its __init__ "
        "imports the bindings\nand Llama, numpy, jinja2...); nan: the run did not import it."
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=(__doc__ or "").split("\n\n")[0])
    parser.add_argument("--model", type=Path, help="the GGUF to load (default: see above)")
    parser.add_argument("--runs", type=int, default=10, help="runs of each tree (default 10)")
    parser.add_argument("--baseline", type=Path, metavar="SRC", help="another tree's src/")
    parser.add_argument("--json", type=Path, metavar="PATH", help="also write every run here")
    args = parser.parse_args()
    trees: dict[str, Path | None] = {"this tree": None}
    if args.baseline is not None:
        trees["baseline"] = args.baseline.resolve()
    with tempfile.TemporaryDirectory(prefix="wizardchat-startup-") as tmp:
        work = Path(tmp)
        model = args.model or default_model()
        if model is None:
            sys.path.insert(0, str(ROOT / "tests"))
            import gguf_models

            model = gguf_models.write_model(work / "model.gguf")
        print(f"model     {model}")
        print(f"command   wizardchat ask -m MODEL {' '.join(ARGS)}")
        results: dict[str, list[dict[str, float]]] = {name: [] for name in trees}
        for src in trees.values():  # warm-up: .pyc files, the page cache
            run_once(model, src, work)
        for i in range(args.runs):
            order = list(trees.items())
            for name, src in order if i % 2 == 0 else reversed(order):
                results[name].append(run_once(model, src, work))
            print(f"[run {i + 1}/{args.runs}]", file=sys.stderr, flush=True)
    print()
    print_report(results)
    if args.json is not None:
        args.json.write_text(json.dumps(results, indent=2) + "\n", encoding="utf-8")
        print(f"results   written to {args.json}")


if __name__ == "__main__":
    main()
