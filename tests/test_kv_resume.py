"""The KV cache saved with a session: restored instead of re-evaluated, exactly, only when valid.

The model here has random weights large enough that a greedy reply depends on the whole history
(the tiny test models' replies barely do), so a wrong or stale KV state would change the reply.
"""

from __future__ import annotations

import json
import re
import shutil
import signal
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
from conftest import Result, run_cli
from gguf_models import write_model

from wizardchat.chat.kv_store import KvStore

real_process = pytest.mark.real_process

PROMPTS = ["Hello there, who are you?", "Tell me more about the stars.", "And then what?"]
COMMON = ("-t", "2", "--temp", "0", "-n", "24", "--seed", "1")


@pytest.fixture(scope="module")
def chatty(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    """Two generated models of one shape and vocabulary, different weights."""
    d = tmp_path_factory.mktemp("chatty")
    one = write_model(d / "chatty.gguf", flavour="random", weight_scale=0.3)
    other = write_model(d / "chatty-other.gguf", flavour="random", weight_scale=0.3, seed=7)
    return one, other


def batch(
    model: Path, prompts: list[str], *extra: str, session: str | None = None, ctx: int = 1024
) -> tuple[Result, list[dict[str, object]]]:
    """Batch mode (--jsonl) on `prompts`; the result and one record per reply."""
    stdin = "".join(json.dumps({"prompt": p}) + "\n" for p in prompts)
    named = ("--session", session) if session else ()
    r = run_cli(
        "run", "--jsonl", "-m", str(model), "-c", str(ctx), *COMMON, *named, *extra, stdin=stdin
    )
    assert r.code == 0, r.stderr
    assert "Traceback" not in r.stderr
    return r, [json.loads(line) for line in r.stdout.splitlines()]


def kv_dir(home: Path) -> Path:
    return home / "data" / "kv"


def restored(stderr: str) -> int | None:
    m = re.search(r"^restored ([\d,]+) tokens in \d+\.\d s$", stderr, re.M)
    return int(m.group(1).replace(",", "")) if m else None


def new_tokens(whole: list[dict[str, object]], turn: int) -> int:
    """Tokens turn `turn` adds to the history before it: its user segment and the EOS before."""
    before, this = whole[turn - 1], whole[turn]
    assert isinstance(before["prompt_tokens"], int) and isinstance(this["prompt_tokens"], int)
    assert isinstance(before["completion_tokens"], int)
    return this["prompt_tokens"] - before["prompt_tokens"] - before["completion_tokens"]


@real_process
def test_a_resumed_conversation_evaluates_only_its_new_tokens_and_replies_as_if_never_stopped(
    chatty: tuple[Path, Path], isolated_home: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    model = chatty[0]
    _, whole = batch(model, PROMPTS)  # one process, never stopped
    replies = [r["reply"] for r in whole]
    assert len(set(replies)) == 3, replies  # replies depend on the history: the test can fail

    _, first = batch(model, PROMPTS[:2], session="s")
    assert [r["reply"] for r in first] == replies[:2]
    assert (kv_dir(isolated_home) / "s.kv").is_file()
    assert (kv_dir(isolated_home) / "s.kv.json").is_file()

    # Without the saved state (a copy of the home with the feature off) the whole history is
    # evaluated again: what the saved state spares.
    off_home = isolated_home.parent / "off-home"
    shutil.copytree(isolated_home, off_home)
    monkeypatch.setenv("WIZARDCHAT_HOME", str(off_home))
    off, [slow] = batch(model, PROMPTS[2:], "--kv-cache-max-gb", "0", session="s")
    assert restored(off.stderr) is None
    assert slow["evaluated_tokens"] == slow["prompt_tokens"]
    monkeypatch.setenv("WIZARDCHAT_HOME", str(isolated_home))

    r, [third] = batch(model, PROMPTS[2:], session="s")
    n = restored(r.stderr)
    assert n is not None and n > 40, r.stderr
    assert third["reply"] == replies[2]
    assert third["completion_tokens"] == whole[2]["completion_tokens"]
    assert isinstance(third["evaluated_tokens"], int)
    assert third["evaluated_tokens"] <= new_tokens(whole, 2) + 8


@pytest.fixture
def saved_pair(chatty: tuple[Path, Path], isolated_home: Path) -> tuple[Path, Path]:
    """Session 's' (2 turns, its KV state saved) in the home, and a copy of that home."""
    batch(chatty[0], PROMPTS[:2], session="s")
    batch(chatty[0], ["Something else entirely", "More of it"], session="t")
    copy = isolated_home.parent / "reference-home"
    shutil.copytree(isolated_home, copy)
    return isolated_home, copy


def _truncate(home: Path) -> None:
    kv = kv_dir(home) / "s.kv"
    kv.write_bytes(kv.read_bytes()[: kv.stat().st_size // 2])


def _other_tokens(home: Path) -> None:
    for suffix in (".kv", ".kv.json"):  # t's state under s's name: a state of other tokens
        shutil.copy(kv_dir(home) / f"t{suffix}", kv_dir(home) / f"s{suffix}")


@pytest.mark.parametrize(
    ("case", "why"),
    [
        ("model", "it was saved with another model file"),
        ("ctx", "it was saved with a 1024-token context (this one has 2048; -c 1024 fits it)"),
        ("truncated", "its state file is truncated or damaged"),
        ("tokens", "it holds other tokens than this conversation"),
        ("record", "its record is damaged"),
    ],
)
def test_a_state_that_does_not_match_falls_back_with_one_line_and_the_right_reply(
    case: str,
    why: str,
    chatty: tuple[Path, Path],
    saved_pair: tuple[Path, Path],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    home, reference = saved_pair
    model = chatty[1] if case == "model" else chatty[0]
    ctx = 2048 if case == "ctx" else 1024
    if case == "truncated":
        _truncate(home)
    elif case == "tokens":
        _other_tokens(home)
    elif case == "record":
        (kv_dir(home) / "s.kv.json").write_text('{"version": 1, "identity": [', encoding="utf-8")

    r, [reply] = batch(model, PROMPTS[2:], session="s", ctx=ctx)
    lines = [line for line in r.stderr.splitlines() if "not used" in line]
    assert len(lines) == 1, r.stderr
    assert lines[0].startswith(f"saved KV state of 's' not used: {why}"), lines[0]
    assert lines[0].endswith("; evaluating the history")
    assert restored(r.stderr) is None
    assert reply["evaluated_tokens"] == reply["prompt_tokens"]

    # The right reply: the same history evaluated with no saved state at all.
    monkeypatch.setenv("WIZARDCHAT_HOME", str(reference))
    _, [expected] = batch(model, PROMPTS[2:], "--kv-cache-max-gb", "0", session="s", ctx=ctx)
    assert reply["reply"] == expected["reply"]

    # The exit saved a state that matches this conversation again: the next resume uses it.
    monkeypatch.setenv("WIZARDCHAT_HOME", str(home))
    r, _ = batch(model, ["Once more"], session="s", ctx=ctx)
    assert restored(r.stderr) is not None, r.stderr


KILLER = textwrap.dedent(
    """
    import io, os, signal, sys, threading
    from pathlib import Path
    from wizardchat.settings import load_settings
    from wizardchat.engine.llama_engine import LlamaEngine
    from wizardchat.chat.kv_store import KvStore

    model, directory, point = sys.argv[1:]
    values = {"model": model, "ctx_size": 1024, "threads": 2, "seed": 1, "temperature": 0}
    settings = load_settings(values, config_path=Path("/nonexistent"), environ={})
    engine = LlamaEngine(settings, progress=None, log=io.StringIO())
    list(engine.stream(engine.tokenize("a conversation to save"), 8, threading.Event()))
    store = KvStore(Path(directory), 10**9)

    def kill():
        os.kill(os.getpid(), signal.SIGKILL)

    def write_state(path):
        tokens = engine.kv_save(path)
        if point == "mid-write":  # what llama.cpp had written when the kill came
            with open(path, "r+b") as f:
                f.truncate(os.path.getsize(path) // 2)
            kill()
        return tokens

    if point == "before-record":
        store._write_record = lambda *args: kill()
    store.write("s", engine.kv_keep(engine.llm.n_tokens), engine.kv_identity(), write_state)
    """
)


@pytest.mark.parametrize("point", ["mid-write", "before-record"])
def test_sigkill_while_a_state_is_written_never_leaves_one_that_is_loaded(
    point: str, chatty: tuple[Path, Path], isolated_home: Path
) -> None:
    model = chatty[0]
    batch(model, PROMPTS[:2], session="s")
    directory = kv_dir(isolated_home)
    proc = subprocess.run(
        [sys.executable, "-c", KILLER, str(model), str(directory), point],
        capture_output=True,
        timeout=60,
    )
    assert proc.returncode == -signal.SIGKILL, proc.stderr.decode()[-2000:]
    assert KvStore(directory, 10**9).read("s") is None  # no record: no state, never half of one

    r, [reply] = batch(model, PROMPTS[2:], session="s")
    assert restored(r.stderr) is None and "not used" not in r.stderr
    assert reply["evaluated_tokens"] == reply["prompt_tokens"]
    left = sorted(p.name for p in directory.iterdir())
    assert left == ["s.kv", "s.kv.json"], left  # the killed write's leftovers are gone
    r, _ = batch(model, ["Once more"], session="s")
    assert restored(r.stderr) is not None, r.stderr


def test_the_budget_removes_the_least_recently_used_states(
    chatty: tuple[Path, Path], isolated_home: Path
) -> None:
    model = chatty[0]
    # 45 kB: two one-turn states of this model (15.3 kB each) but not three; later a two-turn
    # state (about 25 kB) and one one-turn state.
    budget = ("--kv-cache-max-gb", "0.000045")
    for name in ("a", "b", "c"):
        batch(model, [f"Hello from {name}"], *budget, session=name)
    names = sorted(p.name for p in kv_dir(isolated_home).glob("*.kv.json"))
    assert names == ["b.kv.json", "c.kv.json"]  # a, the oldest, made room
    # The states hold a conversation's content: private whatever the umask, as sessions are.
    assert kv_dir(isolated_home).stat().st_mode & 0o777 == 0o700
    assert {p.stat().st_mode & 0o777 for p in kv_dir(isolated_home).iterdir()} == {0o600}

    r, _ = batch(model, ["Again"], *budget, session="b")  # b is used: c is now the oldest
    assert restored(r.stderr) is not None, r.stderr
    batch(model, ["Hello from d"], *budget, session="d")
    names = sorted(p.name for p in kv_dir(isolated_home).glob("*.kv.json"))
    assert names == ["b.kv.json", "d.kv.json"]

    listing = run_cli("sessions")
    assert re.search(r"^NAME\s+TURNS\s+LAST USED\s+KV STATE$", listing.stdout, re.M)
    assert re.search(r"^b\s+2\s.*\d+(\.\d+)? kB$", listing.stdout, re.M), listing.stdout
    assert re.search(r"^a\s+1\s.*-$", listing.stdout, re.M), listing.stdout
    assert run_cli("sessions", "rm", "b").code == 0
    assert not list(kv_dir(isolated_home).glob("b.*"))


def test_a_state_too_big_for_the_budget_is_not_saved_and_said_once(
    chatty: tuple[Path, Path], isolated_home: Path
) -> None:
    r, _ = batch(chatty[0], PROMPTS[:2], "--kv-cache-max-gb", "0.000001", session="s")
    lines = [line for line in r.stderr.splitlines() if "not saved" in line]
    assert len(lines) == 1 and "kv_cache_max_gb" in lines[0], r.stderr
    assert not list(kv_dir(isolated_home).glob("s.*"))

    # A state that has grown past the budget leaves the earlier one, which still holds the start
    # of the conversation: the next resume restores it and evaluates the rest.
    batch(chatty[0], PROMPTS[:1], session="u")  # about 15 kB
    r, _ = batch(chatty[0], PROMPTS[1:2], "--kv-cache-max-gb", "0.00002", session="u")
    assert restored(r.stderr) is not None and "not saved" in r.stderr, r.stderr
    r, _ = batch(chatty[0], PROMPTS[2:], session="u")
    assert re.search(r"^restored [\d,]+ tokens in \d+\.\d s \([\d,]+ more to evaluate\)$",
                     r.stderr, re.M), r.stderr  # fmt: skip


@pytest.mark.parametrize("how", ["flag", "environment", "config"])
def test_zero_turns_the_feature_off(
    how: str, chatty: tuple[Path, Path], isolated_home: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    extra: tuple[str, ...] = ()
    if how == "flag":
        extra = ("--kv-cache-max-gb", "0")
    elif how == "environment":
        monkeypatch.setenv("WIZARDCHAT_KV_CACHE_MAX_GB", "0")
    else:
        (isolated_home / "config").mkdir(parents=True)
        (isolated_home / "config" / "config.toml").write_text("kv_cache_max_gb = 0\n", "utf-8")
    batch(chatty[0], PROMPTS[:1], *extra, session="s")
    assert (isolated_home / "data" / "sessions" / "s.json").is_file()
    assert not kv_dir(isolated_home).exists()


def test_ask_with_a_session_restores_and_saves_it(
    chatty: tuple[Path, Path], isolated_home: Path
) -> None:
    model = chatty[0]
    _, whole = batch(model, PROMPTS[:2])
    args = ("ask", "-m", str(model), "-c", "1024", *COMMON, "--json", "--session", "q")
    first = run_cli(*args, PROMPTS[0])
    assert first.code == 0, first.stderr
    assert restored(first.stderr) is None
    second = run_cli(*args, PROMPTS[1])
    assert second.code == 0, second.stderr
    assert "continuing 'q': 1 turn" in second.stderr
    assert restored(second.stderr) is not None, second.stderr
    assert json.loads(second.stdout)["reply"] == whole[1]["reply"]
    saved = json.loads((isolated_home / "data" / "sessions" / "q.json").read_text("utf-8"))
    assert [t["user"] for t in saved["turns"]] == PROMPTS[:2]
