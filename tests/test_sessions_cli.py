"""Sessions as a user meets them from the shell: `--resume` and `--session` bring the session's own
model back, the exit hint is a command that works, `sessions rm` of several names, what a corrupt
file's error says to do, one table style for `sessions` and `/sessions`, and the JSON records of
`ask --json` and `run --jsonl`. The real `wizardchat` runs in subprocesses and in a pty."""

from __future__ import annotations

import json
import os
import re
import shutil
import socket
import subprocess
from pathlib import Path

import pytest
from conftest import WIZARDCHAT, Models, Result, run_cli
from gguf_models import SCRIPT_REPLY
from test_repl import Chat, chats

from wizardchat.chat.store import SessionStore
from wizardchat.errors import ExitCode, SessionError

__all__ = ["chats"]  # the pty chat fixture, shared with test_repl


def closed_port() -> int:
    """A 127.0.0.1 port nothing listens on: a hub there refuses every connection at once."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@pytest.fixture
def no_hub(monkeypatch: pytest.MonkeyPatch) -> None:
    """Online, but the hub is a closed port: any use of the network fails loudly."""
    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    monkeypatch.setenv("HF_ENDPOINT", f"http://127.0.0.1:{closed_port()}")


def run_in(cwd: Path, *args: str, stdin: str, timeout: float = 120) -> Result:
    proc = subprocess.run(
        [WIZARDCHAT, *args],
        input=stdin.encode(),
        capture_output=True,
        timeout=timeout,
        cwd=cwd,
        env=os.environ.copy(),
    )
    return Result(proc.returncode, proc.stdout.decode(), proc.stderr.decode())


def sessions_dir(home: Path) -> Path:
    d = home / "data" / "sessions"
    d.mkdir(parents=True, exist_ok=True)
    return d


def saved(home: Path, name: str) -> dict[str, object]:
    data: dict[str, object] = json.loads(
        (sessions_dir(home) / f"{name}.json").read_text(encoding="utf-8")
    )
    return data


def old_session(name: str, model: str) -> str:
    """A session file as versions before the model reference wrote it: the base name only."""
    return json.dumps(
        {
            "version": 1,
            "name": name,
            "model": model,
            "created": 1.7e9,
            "updated": 1.7e9,
            "system": "sys",
            "turns": [{"user": "from an old version", "reply": "ok", "interrupted": False}],
        }
    )


# --- 1. the session keeps its model -----------------------------------------------------------


def test_resume_without_m_loads_the_sessions_model_and_no_network(
    models: Models, tmp_path: Path, isolated_home: Path, no_hub: None
) -> None:
    here = tmp_path / "work"
    here.mkdir()
    model = here / "mine.gguf"
    shutil.copy(models.scripted, model)
    first = run_in(here, "run", "-m", "mine.gguf", "--session", "s", stdin="one\n")  # relative
    assert first.code == 0, first.stderr
    data = saved(isolated_home, "s")
    assert data["model_ref"] == str(model)  # absolute, whatever the working directory was
    assert data["model"] == "mine.gguf"

    again = run_cli("run", "--resume", stdin="two\n", timeout=60)
    assert again.code == 0, again.stderr
    assert again.stdout == SCRIPT_REPLY + "\n\n"
    assert f"resuming 's' with its model {model}" in again.stderr
    turns = saved(isolated_home, "s")["turns"]
    assert [t["user"] for t in turns] == ["one", "two"]  # type: ignore[attr-defined]

    named = run_cli("run", "--session", "s", stdin="three\n", timeout=60)
    assert named.code == 0 and f"resuming 's' with its model {model}" in named.stderr


def test_an_explicit_m_wins_and_the_sessions_model_beats_the_configured_one(
    models: Models, isolated_home: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    assert run_cli("run", "-m", str(models.scripted), "--session", "s", stdin="one\n").code == 0
    monkeypatch.setenv("WIZARDCHAT_MODEL", str(models.random))
    resumed = run_cli("run", "--resume", stdin="two\n")
    assert resumed.code == 0 and resumed.stdout == SCRIPT_REPLY + "\n\n", resumed.stderr
    explicit = run_cli("run", "--resume", "-m", str(models.random), "-n", "3", stdin="three\n")
    assert explicit.code == 0 and explicit.stdout != SCRIPT_REPLY + "\n\n"
    assert "resuming" not in explicit.stderr
    # The session now holds the model it was last used with.
    assert saved(isolated_home, "s")["model_ref"] == str(models.random)


def test_a_sessions_model_that_is_gone_is_one_line_suggesting_m(
    models: Models, tmp_path: Path, no_hub: None
) -> None:
    model = tmp_path / "gone.gguf"
    shutil.copy(models.scripted, model)
    assert run_cli("run", "-m", str(model), "--session", "s", stdin="one\n").code == 0
    model.unlink()
    r = run_cli("run", "--resume", stdin="two\n", timeout=60)
    assert r.code == ExitCode.NO_MODEL
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1, r.stderr
    assert lines[0].startswith("wizardchat: error: ") and str(model) in lines[0]
    assert "-m" in lines[0] and "'s'" in lines[0]


def test_an_old_session_with_a_base_name_still_loads(
    models: Models, isolated_home: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    (sessions_dir(isolated_home) / "old.json").write_text(
        old_session("old", "scripted.gguf"), encoding="utf-8"
    )
    r = run_cli("run", "-m", str(models.scripted), "--resume", stdin="hi\n")
    assert r.code == 0 and "continuing 'old': 1 turn" in r.stderr, r.stderr
    assert saved(isolated_home, "old")["model_ref"] == str(models.scripted)
    (sessions_dir(isolated_home) / "older.json").write_text(
        old_session("older", "scripted.gguf"), encoding="utf-8"
    )
    monkeypatch.setenv("WIZARDCHAT_MODEL", str(models.scripted))  # no reference: the configured
    r = run_cli("run", "--session", "older", stdin="hi\n")
    assert r.code == 0 and "resuming" not in r.stderr, r.stderr


@pytest.mark.parametrize(
    ("given", "kept"),
    [
        ("wizardlm2-7b:Q4_K_M", "wizardlm2-7b:Q4_K_M"),
        ("bartowski/WizardLM-2-8x22B-GGUF:IQ3_XS", "bartowski/WizardLM-2-8x22B-GGUF:IQ3_XS"),
        (" wizardlm2-8x22b ", "wizardlm2-8x22b"),
    ],
)
def test_a_hub_reference_is_kept_as_given(given: str, kept: str, tmp_path: Path) -> None:
    from wizardchat.hub.catalog import model_reference

    assert model_reference(given, tmp_path / "snapshot" / "x.gguf") == kept


def test_a_path_is_kept_absolute(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from wizardchat.hub.catalog import model_reference

    monkeypatch.chdir(tmp_path)
    assert model_reference("m.gguf", Path("m.gguf")) == str(tmp_path / "m.gguf")


def test_the_exit_hint_is_a_command_that_continues_this_session(
    models: Models, chats: type[Chat], isolated_home: Path, no_hub: None
) -> None:
    old = chats("-m", str(models.scripted), "--session", "old", "--plain")
    old.send("first")
    old.child.sendcontrol("d")
    old.expect(r"saved as 'old' · wizardchat run --resume continues it")
    old.kill()
    new = chats("-m", str(models.scripted), "--session", "new")
    new.send("second")
    assert new.exit() == 0
    # Back in "old" without a new turn: --resume would open "new", so the hint names "old".
    back = chats("-m", str(models.scripted), "--plain")
    back.send("/load old")
    back.child.sendcontrol("d")
    back.expect(r"saved as 'old' · wizardchat run --session old continues it")
    back.kill()
    # And the hint works, without -m and without the network.
    resumed = chats("--resume")
    assert "continuing 'new'" in resumed.intro and "second" in resumed.intro
    resumed.kill()


def test_the_exit_hint_names_the_model_when_the_file_does_not(
    models: Models, chats: type[Chat], isolated_home: Path
) -> None:
    (sessions_dir(isolated_home) / "old.json").write_text(
        old_session("old", "scripted.gguf"), encoding="utf-8"
    )
    # No new turn: the file keeps what the old version wrote.
    chat = chats("-m", str(models.scripted), "--session", "old", "--plain")
    chat.child.sendcontrol("d")
    chat.expect(
        rf"saved as 'old' · wizardchat run --resume -m {re.escape(str(models.scripted))} "
        "continues it"
    )
    chat.kill()


def test_batch_mode_says_how_to_continue(models: Models, isolated_home: Path) -> None:
    r = run_cli("run", "-m", str(models.scripted), "--session", "job", stdin="one\n")
    assert r.code == 0
    assert "saved as 'job' · wizardchat run --resume continues it" in r.stderr, r.stderr
    # /reset saves the new conversation under a new name, with the model too.
    r = run_cli("run", "--session", "job", stdin="two\n/reset\nthree\n")
    assert r.code == 0, r.stderr
    new = re.search(r"saved as '(chat-[\d-]+)' · wizardchat run --resume continues it", r.stderr)
    assert new, r.stderr
    assert saved(isolated_home, new.group(1))["model_ref"] == str(models.scripted)


# --- 2. sessions rm with several names ---------------------------------------------------------


def test_sessions_rm_deletes_every_existing_name_and_reports_the_missing(
    isolated_home: Path,
) -> None:
    d = sessions_dir(isolated_home)
    for name in ("a", "b", "c"):
        (d / f"{name}.json").write_text(old_session(name, "m.gguf"), encoding="utf-8")
    r = run_cli("sessions", "rm", "a", "nope", "b", "../x", timeout=30)
    assert r.code == ExitCode.SESSION
    assert sorted(p.name for p in d.glob("*.json")) == ["c.json"]
    assert "removed 'a'" in r.stderr and "removed 'b'" in r.stderr
    errors = [line for line in r.stderr.splitlines() if line.startswith("wizardchat: error: ")]
    assert len(errors) == 2, r.stderr
    assert "'nope'" in errors[0] and "'../x'" in errors[1]
    assert "Traceback" not in r.stderr
    assert run_cli("sessions", "rm", "c", timeout=30).code == 0


# --- 3. a corrupt session says what to do -------------------------------------------------------


@pytest.mark.parametrize(
    "content", [b'{"version": 1, "turns": [', b'{"version": 1, "system": "\xff"}', b"[]"]
)
def test_a_corrupt_session_error_names_the_next_step(tmp_path: Path, content: bytes) -> None:
    (tmp_path / "broken.json").write_bytes(content)
    with pytest.raises(SessionError, match=re.escape("wizardchat sessions rm broken")):
        SessionStore(tmp_path).load("broken")


def test_a_dangling_session_symlink_error_names_the_next_step(tmp_path: Path) -> None:
    (tmp_path / "gone.json").symlink_to(tmp_path / "nowhere.json")
    with pytest.raises(SessionError, match=re.escape("wizardchat sessions rm gone")):
        SessionStore(tmp_path).load("gone")


def test_run_on_a_corrupt_session_says_how_to_remove_it(
    models: Models, isolated_home: Path
) -> None:
    (sessions_dir(isolated_home) / "broken.json").write_text("{", encoding="utf-8")
    r = run_cli("run", "-m", str(models.scripted), "--session", "broken", stdin="hi\n")
    assert r.code == ExitCode.SESSION
    assert r.stderr.count("\n") == 1 and "wizardchat sessions rm broken" in r.stderr
    listing = run_cli("sessions", timeout=30)
    assert "wizardchat sessions rm broken" in listing.stderr, listing.stderr


# --- 4. one table for sessions and /sessions -----------------------------------------------------


def test_sessions_and_slash_sessions_print_the_same_table(
    models: Models, chats: type[Chat], isolated_home: Path
) -> None:
    d = sessions_dir(isolated_home)
    (d / "alpha.json").write_text(old_session("alpha", "a.gguf"), encoding="utf-8")
    (d / "broken.json").write_text("{", encoding="utf-8")
    listing = run_cli("sessions", timeout=30)
    assert listing.code == 0
    table = listing.stdout.splitlines()
    assert table[0].split() == ["NAME", "TURNS", "LAST", "USED", "KV", "STATE", "PROBLEM"], table
    chat = chats("-m", str(models.scripted), "--plain")
    shown = [line.rstrip() for line in chat.send("/sessions").splitlines() if line.strip()]
    shown = shown[next(i for i, line in enumerate(shown) if line.startswith("NAME")) :]
    assert shown[: len(table)] == table
    assert "wizardchat sessions rm broken" in shown[len(table)]  # the note, on stderr
    assert chat.exit() == 0


# --- 5. ask --json and run --jsonl records ------------------------------------------------------

ANSWER_KEYS = {
    "reply",
    "model",
    "prompt_tokens",
    "completion_tokens",
    "evaluated_tokens",
    "finish",
    "timings",
}


def test_ask_json_and_jsonl_records_share_their_fields(models: Models) -> None:
    asked = run_cli("ask", "Hi", "-m", str(models.scripted), "--json")
    assert asked.code == 0
    one = json.loads(asked.stdout)
    assert set(one) == ANSWER_KEYS
    batch = run_cli("run", "--jsonl", "-m", str(models.scripted), stdin='{"prompt": "Hi"}\n')
    assert batch.code == 0
    line = json.loads(batch.stdout)
    assert set(line) == ANSWER_KEYS | {"prompt"}
    assert line["finish"] == one["finish"] == "eos"
    assert set(line["timings"]) == set(one["timings"])
    assert line["model"] == one["model"] == models.scripted.name


def test_load_of_a_session_held_with_another_model_says_how_to_reopen_it_with_that(
    models: Models, chats: type[Chat]
) -> None:
    assert run_cli("run", "-m", str(models.scripted), "--session", "s", stdin="one\n").code == 0
    chat = chats("-m", str(models.random), "--plain")
    out = chat.send("/load s")
    assert f"it was held with {models.scripted}" in out, out
    assert "wizardchat run --session s reopens it with that model" in out, out
    chat.kill()
