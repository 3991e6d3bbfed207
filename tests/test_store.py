"""Saved sessions on disk, /set parsing, command lookup and the /show offload description."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest

from wizardchat import commands
from wizardchat.engine.llama_engine import describe_load, experts_in_ram
from wizardchat.engine.model import LoadPlan
from wizardchat.engine.placement import expert_overrides, parse_override
from wizardchat.errors import ExitCode, SessionError
from wizardchat.store import SavedSession, SavedTurn, SessionStore, check_name


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
