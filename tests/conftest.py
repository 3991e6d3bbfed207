"""Shared fixtures: generated tiny GGUF models, an isolated WIZARDCHAT_HOME, a CLI runner."""

from __future__ import annotations

import io
import os
import subprocess
import sys
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).parent))

from gguf_models import USER_TURN_PIECES, write_model

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


def run_cli(*args: str, stdin: str | bytes | None = None, timeout: float = 120) -> Result:
    """Run the installed `wizardchat` in a subprocess (stdin is /dev/null unless given)."""
    data = stdin.encode() if isinstance(stdin, str) else stdin
    proc = subprocess.run(
        [WIZARDCHAT, *args],
        input=data,
        stdin=subprocess.DEVNULL if data is None else None,
        capture_output=True,
        timeout=timeout,
        env=os.environ.copy(),
    )
    return Result(
        proc.returncode,
        proc.stdout.decode("utf-8", errors="replace"),
        proc.stderr.decode("utf-8", errors="replace"),
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
