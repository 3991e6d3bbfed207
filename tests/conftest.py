"""Shared fixtures: generated tiny GGUF models, an isolated WIZARDCHAT_HOME, a CLI runner."""

from __future__ import annotations

import io
import os
import signal
import subprocess
import sys
import traceback
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).parent))

from gguf_models import USER_TURN_PIECES, write_model
from real_models import (  # noqa: F401  (fixtures: real vocabularies and SmolLM2, cached)
    bpe_model,
    bpe_vocab,
    smollm2,
    spm_model,
    spm_model_no_bos,
    spm_vocab,
)

from wizardchat.settings import load_settings

WIZARDCHAT = str(Path(sys.executable).parent / "wizardchat")


@dataclass(frozen=True)
class Models:
    """Paths of the generated test models."""

    scripted: Path  # answers SCRIPT_REPLY to anything
    user_turn: Path  # answers "Hi\nUSER: Hi\nUSER: ..." forever
    random: Path  # random weights, tiny and fast
    slow: Path  # random weights, ~1 ms a token: long replies to interrupt or cut
    split: Path  # the scripted model in 3 shards (first shard's path)


@pytest.fixture(scope="session")
def models(tmp_path_factory: pytest.TempPathFactory) -> Models:
    d = tmp_path_factory.mktemp("models")
    (d / "split").mkdir()
    return Models(
        scripted=write_model(d / "scripted.gguf"),
        user_turn=write_model(d / "user-turn.gguf", script=USER_TURN_PIECES),
        random=write_model(d / "random.gguf", flavour="random"),
        slow=write_model(
            d / "slow.gguf", flavour="random", n_embd=256, n_layer=4, n_ff=512, n_ctx_train=8192
        ),
        split=write_model(d / "split" / "scripted.gguf", split_max_tensors=8),
    )


@pytest.fixture(scope="session")
def slow_prompt_model(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Random weights, 32 thin layers: a 2,400-token prompt takes a second or more to evaluate
    here (attention grows with the prompt), so a progress line shown after 0.3 s is seen at a
    percentage. The `slow` model evaluates it in 0.3 s, which made those tests race."""
    d = tmp_path_factory.mktemp("slow-prompt")
    return write_model(
        d / "slow-prompt.gguf", flavour="random", n_embd=256, n_layer=32, n_ff=64, n_ctx_train=8192
    )


@pytest.fixture(autouse=True)
def isolated_home(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """Every test gets its own WIZARDCHAT_HOME and hub cache, no WIZARDCHAT_* settings from
    outside, and HF_HUB_OFFLINE=1 unless it starts a loopback hub."""
    for key in list(os.environ):
        if key.startswith("WIZARDCHAT_"):
            monkeypatch.delenv(key)
    home = tmp_path / "home"
    monkeypatch.setenv("WIZARDCHAT_HOME", str(home))
    # Never the user's hub cache, never the network: tests that pull point HF_* at a local hub.
    for key in ("HF_TOKEN", "HUGGING_FACE_HUB_TOKEN", "HF_ENDPOINT", "HF_HUB_CACHE"):
        monkeypatch.delenv(key, raising=False)
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf"))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_HUB_DISABLE_TELEMETRY", "1")
    return home


@dataclass
class Result:
    """A finished CLI run."""

    code: int
    stdout: str
    stderr: str


def pytest_configure(config: pytest.Config) -> None:
    config.addinivalue_line(
        "markers",
        "real_process: run_cli spawns the installed wizardchat instead of running it in process "
        "(tests of a real terminal, signals, process-wide state such as RPC devices or the "
        "hub client's settings)",
    )


_in_process = True  # set per test by _cli_mode
# Fixtures of a loopback hub (or of none): huggingface_hub reads HF_HUB_OFFLINE, HF_ENDPOINT and
# its cache paths once, at import, so a wizardchat that talks to these hubs runs as a process.
HUB_FIXTURES = {"hub", "sized_hub", "tiny_hub", "no_hub"}


@pytest.fixture(autouse=True)
def _cli_mode(request: pytest.FixtureRequest) -> Iterator[None]:
    """run_cli runs wizardchat in this process unless the test is marked real_process or uses
    a hub fixture."""
    global _in_process
    spawn = request.node.get_closest_marker("real_process") or HUB_FIXTURES & set(
        request.fixturenames
    )
    _in_process = not spawn
    yield
    _in_process = True


def run_cli(*args: str, stdin: str | bytes | None = None, timeout: float = 120) -> Result:
    """Run `wizardchat ARGS` (stdin empty unless given): in this process with streams of its own
    (typer's CliRunner isolation), or in a subprocess where the test is marked real_process."""
    data = stdin.encode() if isinstance(stdin, str) else stdin
    if not _in_process:
        return run_process(*args, stdin=data, timeout=timeout)
    return _run_in_process(list(args), data, timeout)


def run_process(*args: str, stdin: bytes | None = None, timeout: float = 120) -> Result:
    """Run the installed `wizardchat` in a subprocess (stdin is /dev/null unless given)."""
    proc = subprocess.run(
        [WIZARDCHAT, *args],
        input=stdin,
        stdin=subprocess.DEVNULL if stdin is None else None,
        capture_output=True,
        timeout=timeout,
        env=os.environ.copy(),
    )
    return Result(
        proc.returncode,
        proc.stdout.decode("utf-8", errors="replace"),
        proc.stderr.decode("utf-8", errors="replace"),
    )


def _run_in_process(args: list[str], data: bytes | None, timeout: float) -> Result:
    """wizardchat's entry point on `args`, sys's streams swapped for buffers as a pipe would be.

    Help is as wide as COLUMNS says, else 80 columns as on a pipe (CliRunner forces 80 always).
    A run that hangs past `timeout` ends the test process with every thread's traceback.
    """
    import faulthandler

    from typer._click import formatting
    from typer.testing import CliRunner

    from wizardchat.entry import main

    width = {} if "COLUMNS" in os.environ else {"COLUMNS": "80"}
    code: int | str | None = 0
    faulthandler.dump_traceback_later(timeout, exit=True)
    sigint = signal.getsignal(signal.SIGINT)  # main() ignores SIGINT as it exits: not here
    try:
        with CliRunner().isolation(input=data or b"", env=width) as (out, err, _):
            formatting.FORCED_WIDTH = None
            try:
                main(args)
            except SystemExit as e:
                code = e.code
            except Exception:  # what the interpreter does with it: the traceback, exit 1
                traceback.print_exc()
                code = 1
            sys.stdout.flush()
            sys.stderr.flush()
            stdout, stderr = out.getvalue(), err.getvalue()
    finally:
        faulthandler.cancel_dump_traceback_later()
        signal.signal(signal.SIGINT, sigint)
    if not isinstance(code, int):
        code = 0 if code is None else 1
    return Result(
        code, stdout.decode("utf-8", errors="replace"), stderr.decode("utf-8", errors="replace")
    )


def make_engine(model: Path, log: io.StringIO | None = None, **flags: object):  # type: ignore[no-untyped-def]
    """Load `model` through wizardchat's engine with test-friendly settings."""
    from wizardchat.engine.llama_engine import LlamaEngine

    values = {"model": str(model), "ctx_size": 1024, "threads": 2, "seed": 1, **flags}
    settings = load_settings(values, config_path=Path("/nonexistent"), environ={})
    return LlamaEngine(settings, progress=None, log=log or io.StringIO())


@pytest.fixture
def engine_factory() -> Iterator[object]:
    """Load engines and free them after the test."""
    made = []

    def factory(model: Path, log: io.StringIO | None = None, **flags: object):  # type: ignore[no-untyped-def]
        engine = make_engine(model, log, **flags)
        made.append(engine)
        return engine

    yield factory
    for engine in made:
        engine.close()
