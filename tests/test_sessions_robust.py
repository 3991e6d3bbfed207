"""Sessions under stress, end to end: malformed files, two processes on one session, file modes,
a broken input history, and Ctrl-Z. The real `wizardchat` runs in a pty (pexpect)."""

from __future__ import annotations

import hashlib
import json
import os
import re
import shutil
import stat
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pexpect
import pytest
from conftest import WIZARDCHAT, Models, run_cli
from gguf_models import SCRIPT_REPLY
from test_repl import TOOLKIT_PROMPT, UP, Chat, chats, clean

__all__ = ["chats"]  # the pty chat fixture, shared with test_repl


def run_in_pty(*args: str, timeout: float = 30) -> tuple[int, str]:
    """A `wizardchat` that is expected to end by itself: its status and cleaned output."""
    child = pexpect.spawn(WIZARDCHAT, list(args), encoding="utf-8", timeout=timeout)
    child.expect(pexpect.EOF)
    child.close()
    return int(child.exitstatus if child.exitstatus is not None else -1), clean(str(child.before))


def sessions_dir(home: Path) -> Path:
    d = home / "data" / "sessions"
    d.mkdir(parents=True, exist_ok=True)
    return d


def good_session(name: str, user: str = "a good message", updated: float = 1.7e9) -> str:
    return json.dumps(
        {
            "version": 1,
            "name": name,
            "model": "m",
            "created": updated,
            "updated": updated,
            "system": "sys",
            "turns": [{"user": user, "reply": "ok", "interrupted": False}],
        }
    )


def session_with(**changes: object) -> Callable[[Path], None]:
    """A writer of an otherwise good session file with some fields changed."""

    def write(path: Path) -> None:
        data = json.loads(good_session("bad", updated=1.8e9))
        for key, value in changes.items():
            if key in ("user", "reply", "interrupted"):
                data["turns"][0][key] = value
            else:
                data[key] = value
        path.write_text(json.dumps(data), encoding="utf-8")  # NaN/Infinity as JSON5-ish literals

    return write


def text(content: str | bytes) -> Callable[[Path], None]:
    def write(path: Path) -> None:
        path.write_bytes(content.encode() if isinstance(content, str) else content)

    return write


def huge(path: Path) -> None:
    with path.open("wb") as f:  # sparse: 65 MiB of nothing on disk
        f.write(b'{"version": 1, "system": "')
        f.truncate(65 * 2**20)


def directory(path: Path) -> None:
    path.mkdir()
    (path / "inside").write_text("x", encoding="utf-8")


def fifo(path: Path) -> None:
    os.mkfifo(path)


def dangling_symlink(path: Path) -> None:
    path.symlink_to(path.parent / "nowhere" / "gone.json")


def symlink_to_a_device(path: Path) -> None:
    path.symlink_to("/dev/zero")


MALFORMED: dict[str, Callable[[Path], None]] = {
    "created-null": session_with(created=None),
    "updated-1e300": session_with(updated=1e300),
    "updated-nan": session_with(updated=float("nan")),
    "created-infinity": session_with(created=float("inf")),
    "updated-minus-1e308": session_with(updated=-1e308),
    "updated-text": session_with(updated="yesterday"),
    "updated-true": session_with(updated=True),
    "interrupted-no": session_with(interrupted="no"),
    "interrupted-1": session_with(interrupted=1),
    "system-list": session_with(system=["a", "b"]),
    "name-list": session_with(name=["a"]),
    "model-number": session_with(model=7),
    "user-list": session_with(user=["hi"]),
    "version-true": session_with(version=True),
    "turns-object": session_with(turns={"user": "x"}),
    "deep-nesting": text("[" * 100_000),
    "deep-nesting-inside": text('{"version": 1, "system": ' + "[" * 100_000),
    "huge": huge,
    "not-utf8": text(b'{"version": 1, "system": "\xff\xfe", "turns": []}'),
    "empty": text(""),
    "directory": directory,
    "fifo": fifo,
    "dangling-symlink": dangling_symlink,
    "symlink-to-dev-zero": symlink_to_a_device,
}


def snapshot(path: Path) -> object:
    """What is at `path`, to check it is left exactly as it was."""
    info = os.lstat(path)
    if stat.S_ISLNK(info.st_mode):
        return ("symlink", os.readlink(path))
    if stat.S_ISDIR(info.st_mode):
        return ("dir", sorted(p.name for p in path.iterdir()))
    if stat.S_ISFIFO(info.st_mode):
        return ("fifo",)
    return ("file", info.st_size, hashlib.sha256(path.read_bytes()).hexdigest())


@pytest.mark.parametrize("kind", list(MALFORMED))
def test_a_malformed_session_file_breaks_no_session_command(
    kind: str, models: Models, chats: type[Chat], isolated_home: Path
) -> None:
    sessions = sessions_dir(isolated_home)
    (sessions / "good.json").write_text(good_session("good"), encoding="utf-8")
    bad = sessions / "bad.json"
    MALFORMED[kind](bad)
    before = snapshot(bad)

    listing = run_cli("sessions", timeout=30)
    assert listing.code == 0, listing.stderr
    assert "Traceback" not in listing.stderr
    assert re.search(r"^good\s+1\s", listing.stdout, re.M), listing.stdout
    assert re.search(r"^bad\s+unreadable\s.*\(.+\)$", listing.stdout, re.M), listing.stdout

    code, out = run_in_pty("run", "-m", str(models.scripted), "--session", "bad")
    assert code == 7, out
    lines = out.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("wizardchat: error: "), out
    assert "session 'bad'" in lines[0] and "Traceback" not in out

    chat = chats("-m", str(models.scripted), "--resume")  # passes over it to the good one
    assert "continuing 'good'" in chat.intro and "a good message" in chat.intro
    out = chat.send("/sessions")
    assert re.search(r"^bad\s+unreadable\s", out, re.M) and re.search(r"^good\s+1\s", out, re.M)
    chat.child.send("/load ba\t")  # completion lists names; it reads no file
    chat.expect("d")
    out = chat.send("")
    assert "error: " in out and "session 'bad'" in out and "Traceback" not in out, out
    assert SCRIPT_REPLY in chat.send("still chatting")
    assert chat.exit() == 0
    assert snapshot(bad) == before


# --- two processes, one session ------------------------------------------------------------


def test_a_session_open_in_one_repl_cannot_be_opened_in_another(
    models: Models, chats: type[Chat], isolated_home: Path
) -> None:
    first = chats("-m", str(models.scripted), "--session", "work")
    first.send("first window's message")
    holder = first.child.pid

    code, out = run_in_pty("run", "-m", str(models.scripted), "--session", "work")
    assert code == 7, out
    assert out.strip().count("\n") == 0, out
    assert f"session 'work' is open in another wizardchat (pid {holder} on " in out, out

    other = chats("-m", str(models.scripted))
    out = other.send("/load work")
    assert f"error: session 'work' is open in another wizardchat (pid {holder}" in out, out
    out = other.send("/save work")
    assert "is open in another wizardchat" in out or "exists already" in out, out
    assert SCRIPT_REPLY in other.send("the second window goes on")

    first.send("first window again")
    assert first.exit() == 0
    out = other.send("/load work")  # released at exit
    assert "continuing 'work': 2 turns" in out, out
    other.send("now from the second window")
    assert other.exit() == 0
    data = json.loads((sessions_dir(isolated_home) / "work.json").read_text(encoding="utf-8"))
    assert [t["user"] for t in data["turns"]] == [
        "first window's message",
        "first window again",
        "now from the second window",
    ]
    names = sorted(p.name for p in sessions_dir(isolated_home).iterdir())
    assert not [n for n in names if n.endswith(".lock")], names  # released, and removed


def test_resume_of_a_session_open_elsewhere_is_refused(models: Models, chats: type[Chat]) -> None:
    first = chats("-m", str(models.scripted), "--session", "latest")
    first.send("hello")
    code, out = run_in_pty("run", "-m", str(models.scripted), "--resume")
    assert code == 7 and f"(pid {first.child.pid} on " in out, out
    removed = run_cli("sessions", "rm", "latest", timeout=30)
    assert removed.code == 7 and "is open in another wizardchat" in removed.stderr
    assert first.exit() == 0
    assert run_cli("sessions", "rm", "latest", timeout=30).code == 0


def test_a_killed_holder_does_not_block_the_next_run(
    models: Models, chats: type[Chat], isolated_home: Path
) -> None:
    first = chats("-m", str(models.scripted), "--session", "work")
    first.send("said before the kill")
    first.kill()  # SIGKILL: nothing released by the process itself; NAME.lock stays behind
    assert (sessions_dir(isolated_home) / "work.lock").exists()
    second = chats("-m", str(models.scripted), "--session", "work")
    assert "said before the kill" in second.intro
    second.send("after")
    assert second.exit() == 0


def test_a_file_changed_on_disk_is_not_overwritten(
    models: Models, chats: type[Chat], isolated_home: Path
) -> None:
    sessions = sessions_dir(isolated_home)
    chat = chats("-m", str(models.scripted), "--session", "work")
    chat.send("mine, one")
    # Something that takes no claim (an older wizardchat, a sync tool) rewrites the file.
    theirs = good_session("work", user="theirs")
    (sessions / "work.json").write_text(theirs, encoding="utf-8")
    out = chat.send("mine, two")
    assert SCRIPT_REPLY in out
    assert "session 'work' was changed on disk" in out, out
    assert "saved as 'work-2'" in out, out
    assert (sessions / "work.json").read_text(encoding="utf-8") == theirs
    chat.send("mine, three")  # goes on under the new name, no more warnings
    assert chat.exit() == 0
    data = json.loads((sessions / "work-2.json").read_text(encoding="utf-8"))
    assert [t["user"] for t in data["turns"]] == ["mine, one", "mine, two", "mine, three"]


# --- file modes ------------------------------------------------------------------------------


@pytest.fixture
def open_umask() -> Iterator[None]:
    """Children start with umask 000: every mode must be set on purpose, not inherited."""
    old = os.umask(0)
    yield
    os.umask(old)


def mode(path: Path) -> int:
    return stat.S_IMODE(os.stat(path).st_mode)


def test_history_sessions_and_data_dir_are_private_whatever_the_umask(
    models: Models, chats: type[Chat], isolated_home: Path, open_umask: None
) -> None:
    chat = chats("-m", str(models.scripted), "--session", "work")
    chat.send("a private thought")
    data = isolated_home / "data"
    assert oct(mode(data)) == oct(0o700)
    assert oct(mode(data / "sessions")) == oct(0o700)
    assert oct(mode(data / "sessions" / "work.json")) == oct(0o600)
    assert oct(mode(data / "sessions" / "work.lock")) == oct(0o600)
    assert oct(mode(data / "input-history")) == oct(0o600)
    assert "a private thought" in (data / "input-history").read_text(encoding="utf-8")
    assert chat.exit() == 0


def test_loose_modes_left_by_older_versions_are_tightened(
    models: Models, chats: type[Chat], isolated_home: Path, open_umask: None
) -> None:
    data = isolated_home / "data"
    data.mkdir(parents=True)
    data.chmod(0o755)
    history = data / "input-history"
    history.write_text("\n# old\n+an old message\n", encoding="utf-8")
    history.chmod(0o644)
    chat = chats("-m", str(models.scripted))
    assert oct(mode(data)) == oct(0o700)
    assert oct(mode(history)) == oct(0o600)
    chat.child.send(UP)
    chat.expect("an old message")  # the history itself is kept
    chat.child.send("\r")  # send it again
    assert SCRIPT_REPLY in clean(chat.wait_prompt())
    assert chat.exit() == 0


# --- an input history that cannot be used ----------------------------------------------------


def history_is_a_directory(path: Path) -> None:
    path.mkdir(parents=True)


def history_is_not_readable(path: Path) -> None:
    if os.geteuid() == 0:
        pytest.skip("root reads a mode-000 file anyway")
    path.write_text("\n+x\n", encoding="utf-8")
    path.chmod(0)


def history_is_a_dangling_symlink_in_a_missing_dir(path: Path) -> None:
    path.parent.mkdir(parents=True)
    path.symlink_to(path.parent / "missing-dir" / "history")


@pytest.mark.parametrize(
    "spoil",
    [
        history_is_a_directory,
        history_is_not_readable,
        history_is_a_dangling_symlink_in_a_missing_dir,
    ],
)
def test_an_unusable_input_history_warns_once_and_keeps_history_in_memory(
    spoil: Callable[[Path], None], models: Models, chats: type[Chat], isolated_home: Path
) -> None:
    spoil(isolated_home / "data" / "input-history")
    chat = chats("-m", str(models.scripted))
    warning = "wizardchat: warning: input history not kept: cannot use "
    assert chat.intro.count(warning) == 1, chat.intro
    assert "this chat's history is in memory only" in chat.intro
    for message in ("first message", "second message", "third message"):
        out = chat.send(message)
        assert SCRIPT_REPLY in out and "Traceback" not in out and "warning" not in out, out
    assert "Traceback" not in chat.intro
    chat.child.send(UP)
    chat.expect("third message")  # in memory
    chat.child.send("\r")  # send it again
    assert SCRIPT_REPLY in clean(chat.wait_prompt())
    assert chat.exit() == 0
    everything = chat.intro + str(chat.child.before)
    assert "Traceback" not in everything


def test_a_history_that_breaks_mid_chat_warns_once(
    models: Models, chats: type[Chat], isolated_home: Path
) -> None:
    history = isolated_home / "data" / "input-history"
    chat = chats("-m", str(models.scripted))
    assert "warning" not in chat.intro
    chat.send("written to the file")
    history.unlink()
    history.mkdir()  # appending now fails
    outs = [chat.send(f"message {i}") for i in range(3)]
    text = "".join(outs)
    assert text.count("warning: input history not kept") == 1, text
    assert "Traceback" not in text
    assert all(SCRIPT_REPLY in out for out in outs)
    assert chat.exit() == 0


def test_non_utf8_history_is_read_with_replacements(
    models: Models, chats: type[Chat], isolated_home: Path
) -> None:
    history = isolated_home / "data" / "input-history"
    history.parent.mkdir(parents=True)
    history.write_bytes(b"\n# old\n+caf\xe9 latin-1\n")
    chat = chats("-m", str(models.scripted))
    out = chat.send("new message")
    assert SCRIPT_REPLY in out and "Traceback" not in out + chat.intro
    chat.child.send(UP + UP)
    chat.expect("latin-1")
    chat.child.send("\r")  # send it again
    assert SCRIPT_REPLY in clean(chat.wait_prompt())
    assert chat.exit() == 0
    assert b"caf\xe9 latin-1" in history.read_bytes()  # the old bytes are kept as they were


# --- Ctrl-Z ----------------------------------------------------------------------------------


def process_state(pid: int) -> str:
    """The one-letter state of a process from /proc (T: stopped)."""
    stat_line = Path(f"/proc/{pid}/stat").read_text()
    return stat_line.rsplit(")", 1)[1].split()[0]


def wait_for_state(pid: int, wanted: str, timeout: float = 10) -> str:
    deadline = time.monotonic() + timeout
    state = process_state(pid)
    while state != wanted and time.monotonic() < deadline:
        time.sleep(0.05)
        state = process_state(pid)
    return state


@pytest.mark.skipif(not Path("/proc/self/stat").exists(), reason="reads /proc")
@pytest.mark.skipif(shutil.which("bash") is None, reason="needs bash for job control")
def test_ctrl_z_at_the_prompt_suspends_and_fg_resumes(models: Models, tmp_path: Path) -> None:
    """Run from an interactive bash, as a user would: only a shell's job gets stopped by
    SIGTSTP (an orphaned process group, like a bare pexpect child, ignores it)."""
    pidfile = tmp_path / "pid"
    env = {**os.environ, "TERM": "xterm-256color", "PS1": "SHELL$ ", "HISTFILE": "/dev/null"}
    env.pop("NO_COLOR", None)
    shell = pexpect.spawn(
        "bash", ["--norc", "--noprofile", "-i"], env=env, encoding="utf-8",
        dimensions=(30, 80), timeout=30,
    )  # fmt: skip
    try:
        shell.expect_exact("SHELL$ ")
        shell.sendline(
            f'sh -c \'echo $$ > "{pidfile}"; exec "{WIZARDCHAT}" run -m "{models.scripted}"\''
        )
        chat = Chat.__new__(Chat)
        chat.prompt = TOOLKIT_PROMPT  # __init__ (which starts its own process) is skipped
        chat.child = shell
        chat.expect("/help for commands")
        chat.wait_prompt()
        pid = int(pidfile.read_text().strip())
        shell.sendcontrol("z")
        assert wait_for_state(pid, "T") == "T"  # stopped by SIGTSTP
        shell.expect("Stopped")
        shell.expect_exact("SHELL$ ")
        shell.sendline("fg")  # SIGCONT, and the terminal back
        chat.wait_prompt()
        assert wait_for_state(pid, "S") in ("S", "R")
        out = chat.send("after the pause")
        assert SCRIPT_REPLY in out
        shell.sendcontrol("d")  # exits wizardchat
        shell.expect_exact("SHELL$ ")
        shell.sendline("exit")
        shell.expect(pexpect.EOF)
    finally:
        shell.close(force=True)
