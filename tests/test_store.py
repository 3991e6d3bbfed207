"""Saved sessions on disk, /set parsing, command lookup and the /show offload description."""

from __future__ import annotations

import json
import os
import re
import socket
import stat
import subprocess
import sys
from pathlib import Path

import pytest

from wizardchat import paths
from wizardchat.chat.session_file import MAX_FILE_BYTES
from wizardchat.chat.store import (
    SavedSession,
    SavedTurn,
    SessionChanged,
    SessionHeld,
    SessionStore,
    check_name,
)
from wizardchat.engine.llama_engine import describe_load, experts_in_ram
from wizardchat.engine.model import LoadPlan
from wizardchat.errors import ExitCode, SessionError
from wizardchat.plan.placement import expert_overrides, parse_override
from wizardchat.tui import commands


def session(name: str, *turns: str) -> SavedSession:
    return SavedSession(name=name, system="sys", turns=[SavedTurn(t, f"re: {t}") for t in turns])


def test_save_and_load_round_trip_with_unicode(tmp_path: Path) -> None:
    store = SessionStore(tmp_path / "sessions")
    saved = session("talk", "héllo €", "line one\nline two")
    saved.turns[1].interrupted = True
    store.save(saved)
    loaded = store.load("talk")
    assert loaded.system == "sys"
    assert [(t.user, t.reply, t.interrupted) for t in loaded.turns] == [
        ("héllo €", "re: héllo €", False),
        ("line one\nline two", "re: line one\nline two", True),
    ]
    assert "héllo €" in (tmp_path / "sessions" / "talk.json").read_text(encoding="utf-8")


def test_save_replaces_the_file_atomically_and_leaves_no_temp_files(tmp_path: Path) -> None:
    store = SessionStore(tmp_path)
    store.save(session("a", "one"))
    inode_before = os.stat(tmp_path / "a.json").st_ino
    store.save(session("a", "one", "two"))
    assert os.stat(tmp_path / "a.json").st_ino != inode_before  # a new file renamed over it
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a.json"]
    assert len(store.load("a").turns) == 2


def test_a_failed_write_keeps_the_old_file(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    store = SessionStore(tmp_path)
    store.save(session("a", "one"))
    before = (tmp_path / "a.json").read_bytes()

    def disk_full(fd: int) -> None:
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(os, "fsync", disk_full)
    with pytest.raises(SessionError, match=r"cannot save session 'a'.*No space left"):
        store.save(session("a", "one", "two"))
    assert (tmp_path / "a.json").read_bytes() == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a.json"]  # the temp file is gone


@pytest.mark.parametrize(
    ("content", "reason"),
    [
        ('{"version": 1, "turns": [', "Expecting"),
        ('{"version": 9, "system": "", "turns": []}', "unknown format version 9"),
        ('{"version": 1, "system": "", "turns": [{"user": 1}]}', "turn 1 lacks"),
        ("[]", "not a JSON object"),
    ],
)
def test_corrupt_files_are_reported_and_left_untouched(
    tmp_path: Path, content: str, reason: str
) -> None:
    store = SessionStore(tmp_path)
    (tmp_path / "bad.json").write_text(content, encoding="utf-8")
    with pytest.raises(SessionError, match=reason) as error:
        store.load("bad")
    assert error.value.exit_code == ExitCode.SESSION
    assert "left as it is" in str(error.value)
    assert (tmp_path / "bad.json").read_text(encoding="utf-8") == content
    listed = store.list()
    assert [(s.name, s.turns) for s in listed] == [("bad", None)]
    assert store.last() is None  # never resumes into a file it cannot read


def test_list_is_most_recent_first_and_last_is_the_newest(tmp_path: Path) -> None:
    store = SessionStore(tmp_path)
    for name in ("old", "new"):
        store.save(session(name, "x"))
    data = json.loads((tmp_path / "old.json").read_text(encoding="utf-8"))
    data["updated"] -= 100
    (tmp_path / "old.json").write_text(json.dumps(data), encoding="utf-8")
    assert [s.name for s in store.list()] == ["new", "old"]
    assert store.last() == "new"


def test_missing_session_names_the_saved_ones(tmp_path: Path) -> None:
    store = SessionStore(tmp_path)
    store.save(session("kept", "x"))
    with pytest.raises(SessionError, match=r"no session named 'gone' \(saved: kept\)"):
        store.load("gone")
    with pytest.raises(SessionError, match="no session named 'gone'"):
        store.remove("gone")


@pytest.mark.parametrize("name", ["../etc", "a/b", ".hidden", "", "x" * 65, "sp ace"])
def test_unsafe_names_are_refused(name: str) -> None:
    with pytest.raises(SessionError, match="invalid session name"):
        check_name(name)


def test_unknown_commands_suggest_the_nearest() -> None:
    with pytest.raises(commands.CommandError, match="did you mean /regen"):
        commands.find("regn")
    with pytest.raises(commands.CommandError, match=r"unknown command /zzz \(/help"):
        commands.find("zzz")
    assert commands.find("bye").name == "exit"
    assert commands.find("QUIT").name == "exit"


@pytest.mark.parametrize(
    ("key", "text", "value"),
    [("temperature", "0", 0.0), ("top_k", "12", 12), ("max_tokens", "-1", -1), ("seed", "7", 7)],
)
def test_set_parses_valid_values(key: str, text: str, value: object) -> None:
    assert commands.PARAMS[key].parse(text) == value


@pytest.mark.parametrize(
    ("key", "text", "message"),
    [
        ("temperature", "-1", "out of range"),
        ("top_p", "0", "out of range"),
        ("top_k", "2.5", "not an integer"),
        ("min_p", "lots", "not a number"),
        ("max_tokens", "0", "out of range"),
    ],
)
def test_set_explains_invalid_values(key: str, text: str, message: str) -> None:
    with pytest.raises(commands.CommandError, match=message):
        commands.PARAMS[key].parse(text)


def test_help_lists_every_command_from_the_table() -> None:
    class Out:
        printed = ""

        def text(self, text: str) -> None:
            Out.printed += text

    class FakeRepl:
        out = Out()

    commands._help(FakeRepl(), "")  # type: ignore[arg-type]
    for command in commands.COMMANDS:
        assert f"/{command.name}" in Out.printed


def plan(**kw: object) -> LoadPlan:
    values: dict[str, object] = {
        "path": Path("/models/WizardLM-2-8x22B.Q4_K_M-00001-of-00005.gguf"),
        "n_ctx": 8192,
        "n_gpu_layers": -1,
        "threads": 16,
        "batch_size": 2048,
        "ubatch_size": 512,
        "flash_attn": True,
        "type_k": "q8_0",
        "type_v": "q8_0",
        "overrides": (),
        "ctx_capped": False,
    }
    values.update(kw)
    return LoadPlan(**values)  # type: ignore[arg-type]


def test_show_names_the_layers_whose_experts_sit_in_ram() -> None:
    overrides = tuple(expert_overrides(cpu_moe=False, n_cpu_moe=20))
    rows = dict(
        describe_load(
            plan(overrides=overrides),
            quant="Q4_K_M",
            architecture="llama",
            n_layer=56,
            n_expert=8,
            n_expert_used=2,
            n_ctx_train=65536,
            gpus=["CUDA0 (NVIDIA H100)"],
        )
    )
    assert rows["experts in RAM"] == "layers 0-19 (20 of 56)"
    assert rows["GPU offload"] == "56 of 56 layers on CUDA0 (NVIDIA H100)"
    assert rows["architecture"] == "llama, 56 layers, 8 experts (2 per token)"
    assert rows["quant"] == "Q4_K_M"


def test_experts_in_ram_for_cpu_moe_and_custom_overrides() -> None:
    assert experts_in_ram(expert_overrides(True, 0), 56) == "all 56 layers (--cpu-moe)"
    custom = [parse_override(r"blk\.(5|7)\.ffn_.*=CPU")]
    assert experts_in_ram(custom, 56) == r"-ot blk\.(5|7)\.ffn_.*=CPU"
    assert experts_in_ram([], 56).startswith("none")


# --- strict fields, claims, changes on disk, modes --------------------------------------------


def good_data() -> dict[str, object]:
    return session("x", "hi").to_json()


@pytest.mark.parametrize(
    ("change", "reason"),
    [
        ({"created": None}, "'created' is not a time stamp"),
        ({"updated": 1e300}, "'updated' is out of range"),
        ({"updated": float("nan")}, "'updated' is out of range"),
        ({"created": float("inf")}, "'created' is out of range"),
        ({"updated": -1e308}, "'updated' is out of range"),
        ({"updated": True}, "'updated' is not a time stamp"),
        ({"updated": "2024-01-01"}, "'updated' is not a time stamp"),
        ({"version": True}, "unknown format version True"),
        ({"version": 1.0}, "unknown format version 1.0"),
        ({"system": None}, "'system' is not a text"),
        ({"system": ["a"]}, "'system' is not a text"),
        ({"name": ["a"]}, "'name' is not a text"),
        ({"model": 3}, "'model' is not a text"),
    ],
)
def test_every_field_is_checked_for_its_type_and_range(
    tmp_path: Path, change: dict[str, object], reason: str
) -> None:
    store = SessionStore(tmp_path)
    (tmp_path / "bad.json").write_text(json.dumps({**good_data(), **change}), encoding="utf-8")
    with pytest.raises(SessionError, match=re.escape(reason)):
        store.load("bad")
    [listed] = store.list()
    assert listed.turns is None and reason in listed.problem
    commands.session_row(listed)  # a row can be printed


@pytest.mark.parametrize("interrupted", ["no", "false", 0, 1, None, []])
def test_interrupted_must_be_true_or_false(tmp_path: Path, interrupted: object) -> None:
    data = good_data()
    data["turns"] = [{"user": "u", "reply": "r", "interrupted": interrupted}]
    (tmp_path / "bad.json").write_text(json.dumps(data), encoding="utf-8")
    with pytest.raises(SessionError, match="'interrupted' is not true or false"):
        SessionStore(tmp_path).load("bad")


def test_deep_nesting_is_a_problem_not_a_crash(tmp_path: Path) -> None:
    store = SessionStore(tmp_path)
    (tmp_path / "deep.json").write_text("[" * 100_000, encoding="utf-8")
    with pytest.raises(SessionError, match="nested too deeply"):
        store.load("deep")
    assert [(s.name, s.problem) for s in store.list()] == [("deep", "nested too deeply")]


def test_special_files_are_not_read(tmp_path: Path) -> None:
    store = SessionStore(tmp_path)
    os.mkfifo(tmp_path / "pipe.json")  # opening it for reading would block without O_NONBLOCK
    (tmp_path / "zero.json").symlink_to("/dev/zero")  # reading it would never end
    (tmp_path / "dir.json").mkdir()
    for name in ("pipe", "zero", "dir"):
        with pytest.raises(SessionError, match="not a regular file"):
            store.load(name)
    assert sorted((s.name, s.turns) for s in store.list()) == [
        ("dir", None),
        ("pipe", None),
        ("zero", None),
    ]
    assert store.names() == ["dir", "pipe", "zero"]


def test_a_symlink_to_a_good_file_is_read(tmp_path: Path) -> None:
    store = SessionStore(tmp_path / "s")
    store.save(session("real", "x"))
    (tmp_path / "s" / "alias.json").symlink_to(tmp_path / "s" / "real.json")
    assert store.load("alias").turns[0].user == "x"


def test_a_file_too_large_is_not_parsed(tmp_path: Path) -> None:
    with (tmp_path / "big.json").open("wb") as f:
        f.truncate(MAX_FILE_BYTES + 1)  # sparse
    with pytest.raises(SessionError, match="too large"):
        SessionStore(tmp_path).load("big")


HOLDER = """
import sys, time
from pathlib import Path
from wizardchat.chat.store import SessionStore
claim = SessionStore(Path(sys.argv[1])).claim("work")
print("held", flush=True)
time.sleep(60)
"""


def start_holder(directory: Path) -> subprocess.Popen[str]:
    proc = subprocess.Popen(
        [sys.executable, "-c", HOLDER, str(directory)], stdout=subprocess.PIPE, text=True
    )
    assert proc.stdout is not None and proc.stdout.readline() == "held\n"
    return proc


def test_a_claim_is_exclusive_across_processes_and_dies_with_its_holder(tmp_path: Path) -> None:
    holder = start_holder(tmp_path)
    try:
        store = SessionStore(tmp_path)
        with pytest.raises(SessionHeld) as error:
            store.claim("work")
        host = socket.gethostname()
        assert str(error.value) == (
            f"session 'work' is open in another wizardchat (pid {holder.pid} on {host}); "
            "close it there or use another --session"
        )
        assert error.value.exit_code == ExitCode.SESSION
        with pytest.raises(SessionError, match="is open in another wizardchat"):
            store.claim("work")  # still held: a failed claim leaves nothing half done
    finally:
        holder.kill()  # SIGKILL: the kernel drops the lock
        holder.wait(timeout=10)
    assert (tmp_path / "work.lock").exists()  # left behind, and harmless
    with SessionStore(tmp_path).claim("work") as claim:
        assert claim.held
    assert not claim.held
    assert not (tmp_path / "work.lock").exists()


def test_claims_are_reentrant_per_store_and_released_by_close(tmp_path: Path) -> None:
    store = SessionStore(tmp_path)
    first = store.claim("a")
    assert store.claim("a") is first and store.holds("a")
    with pytest.raises(SessionError, match="is open in another wizardchat"):
        SessionStore(tmp_path).claim("a")  # another store is another holder
    store.claim("b")
    store.close()
    assert not store.holds("a") and not store.holds("b") and not first.held
    SessionStore(tmp_path).claim("a").release()
    assert sorted(p.name for p in tmp_path.iterdir()) == []


def test_removing_a_session_open_elsewhere_is_refused(tmp_path: Path) -> None:
    SessionStore(tmp_path).save(session("work", "x"))
    holder = start_holder(tmp_path)
    try:
        with pytest.raises(SessionError, match="is open in another wizardchat"):
            SessionStore(tmp_path).remove("work")
        assert (tmp_path / "work.json").exists()
    finally:
        holder.kill()
        holder.wait(timeout=10)
    SessionStore(tmp_path).remove("work")
    assert not (tmp_path / "work.json").exists()


def test_save_refuses_a_file_changed_since_it_was_read(tmp_path: Path) -> None:
    mine, theirs = SessionStore(tmp_path), SessionStore(tmp_path)
    mine.save(session("work", "one"))
    theirs_copy = theirs.load("work")
    theirs_copy.turns.append(SavedTurn("their turn", "r"))
    theirs.save(theirs_copy)
    after_theirs = (tmp_path / "work.json").read_bytes()
    with pytest.raises(
        SessionChanged, match="'work' was changed on disk by another program since it was read"
    ):
        mine.save(session("work", "one", "my turn"))
    assert (tmp_path / "work.json").read_bytes() == after_theirs
    assert mine.load("work").turns[-1].user == "their turn"
    mine.save(session("work", "one", "their turn", "mine"))  # read again: fine to write


def test_save_refuses_a_file_that_appeared_unseen(tmp_path: Path) -> None:
    mine = SessionStore(tmp_path)
    assert not mine.exists("new")
    SessionStore(tmp_path).save(session("new", "theirs"))
    with pytest.raises(
        SessionChanged, match="'new' was changed on disk by another program meanwhile"
    ):
        mine.save(session("new", "mine"))


def test_files_and_directories_are_private_whatever_the_umask(tmp_path: Path) -> None:
    old = os.umask(0)
    try:
        store = SessionStore(tmp_path / "data" / "sessions")
        store.save(session("a", "x"))
        claim = store.claim("a")
        modes = {
            p: stat.S_IMODE(os.stat(p).st_mode)
            for p in (tmp_path / "data", store.directory, store.path("a"), claim.path)
        }
        assert modes == {
            tmp_path / "data": 0o700,
            store.directory: 0o700,
            store.path("a"): 0o600,
            claim.path: 0o600,
        }
    finally:
        os.umask(old)


def test_a_loose_sessions_directory_is_tightened(tmp_path: Path) -> None:
    (tmp_path / "s").mkdir(mode=0o777)
    os.chmod(tmp_path / "s", 0o777)
    SessionStore(tmp_path / "s").save(session("a", "x"))
    assert stat.S_IMODE(os.stat(tmp_path / "s").st_mode) == 0o700
    assert stat.S_IMODE(os.stat(paths.make_private_dir(tmp_path / "q" / "r")).st_mode) == 0o700


def test_the_data_dir_is_private_whoever_creates_it_first(isolated_home: Path) -> None:
    from wizardchat.engine.offload import remember_ram_bandwidth

    old = os.umask(0)
    try:
        remember_ram_bandwidth(1e9)  # `doctor` may be the first to write in the data dir
    finally:
        os.umask(old)
    assert stat.S_IMODE(os.stat(paths.data_dir()).st_mode) == 0o700
    assert paths.data_dir() == isolated_home / "data"


def test_a_lock_file_that_cannot_be_made_is_a_plain_session_error(tmp_path: Path) -> None:
    (tmp_path / "not-a-dir").write_text("", encoding="utf-8")
    with pytest.raises(SessionError, match="cannot claim session 'a'") as error:
        SessionStore(tmp_path / "not-a-dir").claim("a")
    assert not isinstance(error.value, SessionHeld)
