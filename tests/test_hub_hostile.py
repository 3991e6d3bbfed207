"""A hostile hub, a tampered cache and malformed references: wizardchat must never write, link
or delete outside the repository's folder of the hub cache, and never link a file it did not hash.

The hub is tests/hub_server.py telling lies in its JSON (`FakeHub.tamper`) to the real
huggingface_hub client inside the installed `wizardchat` command.
"""

from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Iterator
from pathlib import Path

import pytest
from conftest import run_cli
from hub_server import FakeFile, FakeHub, hub_env

REPO = "someone/Hostile-GGUF"
FILE = "Hostile.Q4_K_M.gguf"
DATA = b"GGUF" + bytes(range(256)) * 1000  # 256004 bytes
SHA = hashlib.sha256(DATA).hexdigest()
# From {cache}/models--someone--Hostile-GGUF/{blobs,snapshots}/ four levels up is tmp_path.
UP = "../../../../"


@pytest.fixture
def hub(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[FakeHub]:
    with FakeHub() as server:
        server.add_repo(REPO, {FILE: FakeFile(DATA), "README.md": FakeFile(b"# x\n", lfs=False)})
        for key, value in hub_env(server.url, tmp_path / "hf").items():
            monkeypatch.setenv(key, value)
        for key in ("HF_TOKEN", "HUGGING_FACE_HUB_TOKEN", "HF_HUB_OFFLINE"):
            monkeypatch.delenv(key, raising=False)
        (tmp_path / "outside").mkdir()
        yield server


def repo_folder(tmp_path: Path) -> Path:
    return tmp_path / "hf" / "hub" / ("models--" + REPO.replace("/", "--"))


def listing(tmp_path: Path) -> dict[str, object]:
    """Everything under tmp_path except the repo's own cache folder: name -> size or link text.

    The folders above the repo's (tmp_path/hf/hub) are left out: making them is how a cache
    starts. Links are not followed.
    """
    keep_out = repo_folder(tmp_path)
    found: dict[str, object] = {}
    for root, dirs, files in os.walk(tmp_path):
        here = Path(root)
        dirs[:] = [d for d in dirs if here / d != keep_out]
        for name in dirs + files:
            p = here / name
            rel = p.relative_to(tmp_path).as_posix()
            if rel in ("hf", "hf/hub"):
                continue
            if p.is_symlink():
                found[rel] = "-> " + os.readlink(p)
            elif p.is_file():
                found[rel] = p.stat().st_size
            else:
                found[rel] = "dir"
    return found


def links_leaving_the_repo(tmp_path: Path) -> list[str]:
    folder = repo_folder(tmp_path)
    if not folder.exists():
        return []
    inside = folder.resolve()
    return [
        str(p)
        for p in folder.rglob("*")
        if p.is_symlink() and not p.resolve().is_relative_to(inside)
    ]


def error_lines(stderr: str) -> list[str]:
    return [line for line in stderr.splitlines() if line.strip()]


def pull_refused(tmp_path: Path, *needles: str) -> str:
    """Pull, expect exit 8 with one error line containing `needles`, and nothing outside."""
    before = listing(tmp_path)
    r = run_cli("pull", f"{REPO}:Q4_K_M", timeout=60)
    lines = error_lines(r.stderr)
    assert r.code == 8, r.stderr
    assert len(lines) == 1 and lines[0].startswith("wizardchat: error: "), r.stderr
    for needle in needles:
        assert needle in lines[0], lines[0]
    assert "Traceback" not in r.stderr
    assert listing(tmp_path) == before
    assert links_leaving_the_repo(tmp_path) == []
    assert not list(repo_folder(tmp_path).rglob(FILE))  # nothing where a model is expected
    return lines[0]


# --- the commit id -------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "commit",
    [
        UP + "outside/evil",
        "../../evil",
        "0" * 39,
        "0" * 41,
        "A" * 40,  # git ids are lower case; another case is another folder
        "g" * 40,
        "0" * 39 + "/",
        "0" * 20 + "\x1b[2J" + "0" * 16,
    ],
)
def test_a_commit_that_is_not_40_hex_digits_is_refused(
    hub: FakeHub, tmp_path: Path, commit: str
) -> None:
    hub.tamper(REPO, commit=commit)
    line = pull_refused(tmp_path, "commit", "40 hex")
    assert "\x1b" not in line  # shown escaped, never as a control sequence
    assert sum(hub.bytes_served.values()) == 0  # refused before any byte of a file came


def test_a_refused_commit_leaves_no_refs_or_manifest(hub: FakeHub, tmp_path: Path) -> None:
    hub.tamper(REPO, commit="../../evil")
    pull_refused(tmp_path, "commit")
    assert not repo_folder(tmp_path).exists()


# --- the LFS sha256 ------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "oid",
    [
        UP + "outside/evil.bin",
        "../" + SHA[3:],
        SHA[:62],
        SHA.upper(),
        "g" * 64,
        "",  # an empty hash would skip the verification
        SHA + "0",
    ],
)
def test_an_lfs_sha256_that_is_not_64_hex_digits_is_refused(
    hub: FakeHub, tmp_path: Path, oid: str
) -> None:
    hub.tamper(REPO, files={FILE: {"lfs": {"sha256": oid}}})
    pull_refused(tmp_path, "sha256", "64 hex")
    assert sum(hub.bytes_served.values()) == 0


def test_a_file_of_the_right_size_at_a_traversed_blob_path_is_never_linked(
    hub: FakeHub, tmp_path: Path
) -> None:
    victim = tmp_path / "outside" / "victim.bin"
    victim.write_bytes(b"x" * len(DATA))  # the size the hub announces, other bytes
    hub.tamper(REPO, files={FILE: {"lfs": {"sha256": UP + "outside/victim.bin"}}})
    pull_refused(tmp_path, "sha256")
    assert victim.read_bytes() == b"x" * len(DATA)


def test_a_blob_already_in_the_cache_is_hashed_before_it_is_linked(
    hub: FakeHub, tmp_path: Path
) -> None:
    """A blob named by the right sha256 but holding other bytes (an earlier tool, a bad disk) is
    not trusted for its name and size: it is hashed, found wrong, and downloaded again."""
    blob = repo_folder(tmp_path) / "blobs" / SHA
    blob.parent.mkdir(parents=True)
    blob.write_bytes(b"y" * len(DATA))
    r = run_cli("pull", f"{REPO}:Q4_K_M", timeout=60)
    assert r.code == 0, r.stderr
    assert Path(r.stdout.strip()).read_bytes() == DATA
    assert hub.served(REPO, FILE) == len(DATA)


# --- paths and sizes -----------------------------------------------------------------------------


@pytest.mark.parametrize(
    "path",
    [
        UP + "outside/evil.Q4_K_M.gguf",
        "/tmp/evil.Q4_K_M.gguf",
        "a/../../evil.Q4_K_M.gguf",
        "a//evil.Q4_K_M.gguf",
        "./evil.Q4_K_M.gguf",
        "a\\..\\evil.Q4_K_M.gguf",
        "evil\x1b]0;pwned\x07.Q4_K_M.gguf",
        "evil\x00.Q4_K_M.gguf",
    ],
)
def test_a_file_path_leaving_the_repository_is_refused(
    hub: FakeHub, tmp_path: Path, path: str
) -> None:
    hub.tamper(REPO, files={FILE: {"path": path}})
    line = pull_refused(tmp_path, "path")
    assert "\x1b" not in line and "\x07" not in line and "\x00" not in line
    assert sum(hub.bytes_served.values()) == 0


@pytest.mark.parametrize(
    "fields",
    [
        {"size": -1, "lfs": {"size": -1}},
        {"size": 1 << 62, "lfs": {"size": 1 << 62}},
        {"size": len(DATA) + 1},  # the LFS size says otherwise
        {"size": "256004", "lfs": {"size": "256004"}},
        {"size": 2.5, "lfs": {"size": 2.5}},
    ],
)
def test_a_size_that_is_negative_huge_or_inconsistent_is_refused(
    hub: FakeHub, tmp_path: Path, fields: dict[str, object]
) -> None:
    hub.tamper(REPO, files={FILE: fields})
    pull_refused(tmp_path, "size")
    assert sum(hub.bytes_served.values()) == 0


def test_an_honest_answer_still_pulls(hub: FakeHub, tmp_path: Path) -> None:
    before = listing(tmp_path)
    r = run_cli("pull", f"{REPO}:Q4_K_M", timeout=60)
    assert r.code == 0, r.stderr
    assert Path(r.stdout.strip()).read_bytes() == DATA
    assert listing(tmp_path) == before
    assert links_leaving_the_repo(tmp_path) == []


# --- rm on a tampered cache ----------------------------------------------------------------------


def pulled(tmp_path: Path) -> Path:
    """Pull the honest model; return its snapshot link."""
    r = run_cli("pull", f"{REPO}:Q4_K_M", timeout=60)
    assert r.code == 0, r.stderr
    link = Path(r.stdout.strip())
    assert link.is_symlink()
    return link


def rm_keeps_outside(tmp_path: Path) -> str:
    before = listing(tmp_path)
    r = run_cli("rm", f"{REPO}:Q4_K_M", "--yes", timeout=60)
    assert r.code == 0, r.stderr
    assert "Traceback" not in r.stderr
    assert listing(tmp_path) == before
    return r.stderr


def victim(tmp_path: Path) -> Path:
    v = tmp_path / "outside" / "precious.gguf"
    v.write_bytes(b"precious" * 1000)
    return v


def test_rm_never_deletes_the_target_of_a_snapshot_link_outside_the_cache(
    hub: FakeHub, tmp_path: Path
) -> None:
    link = pulled(tmp_path)
    target = victim(tmp_path)
    link.unlink()
    link.symlink_to(target)  # absolute
    err = rm_keeps_outside(tmp_path)
    assert target.read_bytes() == b"precious" * 1000
    assert not link.exists() and not link.is_symlink()  # the link itself is the cache's
    assert f"kept {target}" in err and "outside" in err


def test_rm_never_follows_a_relative_dotdot_link_out_of_the_cache(
    hub: FakeHub, tmp_path: Path
) -> None:
    link = pulled(tmp_path)
    target = victim(tmp_path)
    link.unlink()
    link.symlink_to(os.path.relpath(target, link.parent))  # ../../../../outside/precious.gguf
    rm_keeps_outside(tmp_path)
    assert target.is_file()


def test_rm_never_deletes_the_target_of_a_blob_link_outside_the_cache(
    hub: FakeHub, tmp_path: Path
) -> None:
    link = pulled(tmp_path)
    blob = link.resolve()
    target = victim(tmp_path)
    blob.unlink()
    blob.symlink_to(target)  # snapshot -> blob -> outside
    rm_keeps_outside(tmp_path)
    assert target.is_file()
    assert not blob.is_symlink()


def test_rm_never_deletes_through_a_snapshot_folder_linked_outside(
    hub: FakeHub, tmp_path: Path
) -> None:
    link = pulled(tmp_path)
    snapshot = link.parent
    elsewhere = tmp_path / "outside" / "snap"
    elsewhere.mkdir()
    (elsewhere / FILE).write_bytes(b"precious")
    for p in snapshot.iterdir():
        p.unlink()
    snapshot.rmdir()
    snapshot.symlink_to(elsewhere, target_is_directory=True)
    before = listing(tmp_path)
    r = run_cli("rm", f"{REPO}:Q4_K_M", "--yes", timeout=60)
    assert "Traceback" not in r.stderr and r.code in (0, 3), r.stderr
    assert listing(tmp_path) == before
    assert (elsewhere / FILE).read_bytes() == b"precious"


@pytest.mark.parametrize(
    "record",
    [
        {"commit": UP + "outside"},
        {"files": [{"path": "../../../outside/precious.gguf", "size": 8000, "sha256": SHA}]},
        {"model_path": UP + "outside/precious.gguf"},
        {"files": [{"path": FILE, "size": 8000, "sha256": UP + "outside/precious.gguf"}]},
    ],
)
def test_rm_ignores_manifest_entries_that_leave_the_repository(
    hub: FakeHub, tmp_path: Path, record: dict[str, object]
) -> None:
    pulled(tmp_path)
    target = victim(tmp_path)
    manifest = repo_folder(tmp_path) / "wizardchat-pull.json"
    data = json.loads(manifest.read_text())
    data["quants"]["Q4_K_M"].update(record)
    manifest.write_text(json.dumps(data))
    before = listing(tmp_path)
    r = run_cli("rm", f"{REPO}:Q4_K_M", "--yes", timeout=60)
    assert "Traceback" not in r.stderr and r.code in (0, 3), r.stderr
    assert listing(tmp_path) == before
    assert target.is_file()
    models = run_cli("models", timeout=60)
    assert models.code == 0 and "Traceback" not in models.stderr


# --- malformed references ------------------------------------------------------------------------


@pytest.mark.parametrize(
    "ref",
    [
        "a/b/c",
        "a/b/c:Q4_K_M",
        "../x:Q4_K_M",
        "a b/c",
        "owner/na me:Q4_K_M",
        "owner/name-",
        "owner/name.",
        "-owner/name",
        "owner/na..me",
        "own--er/name",
        "owner/na--me",
        "owner/name.git",
        "owner/" + "n" * 97,
        "owner/näme",
        "owner/name$",
        "owner/",
        "/name",
    ],
)
def test_pull_of_a_malformed_reference_is_a_usage_error_before_any_request(
    hub: FakeHub, ref: str
) -> None:
    r = run_cli("pull", "--", ref, timeout=60)
    lines = error_lines(r.stderr)
    assert r.code == 2, r.stderr
    assert len(lines) == 1 and lines[0].startswith("wizardchat: error: "), r.stderr
    assert "cannot reach" not in lines[0]
    assert hub.requests == []


def test_our_repo_id_rules_are_at_least_as_strict_as_huggingface_hubs() -> None:
    from huggingface_hub.utils import HFValidationError, validate_repo_id

    from wizardchat.hub.catalog import repo_id_problem

    names = [
        "a/b",
        "_a/b_",
        "a.b/c-d",
        "a/b..c",
        "a--b/c",
        "a/b-",
        "a/.b",
        "a/b.git",
        "a/" + "b" * 96,
        "a/" + "b" * 97,
        "a/b c",
        "a/b\n",
        "a/ü",
        "a/b/c",
        "a",
        "a/",
    ]
    for name in names:
        try:
            validate_repo_id(name)
            hub_ok = "/" in name
        except HFValidationError:
            hub_ok = False
        if not hub_ok:
            assert repo_id_problem(name) is not None, name
    assert repo_id_problem("MaziyarPanahi/WizardLM-2-8x22B-GGUF") is None
    assert repo_id_problem("mradermacher/WizardLM-2-8x22B-i1-GGUF") is None


def test_run_with_a_malformed_repository_id_is_a_usage_error_before_any_request(
    hub: FakeHub,
) -> None:
    r = run_cli("ask", "-m", "owner/na..me:Q4_K_M", "--yes", "Hi", timeout=60)
    assert r.code == 2, r.stderr
    assert "not a model reference" in r.stderr and "cannot reach" not in r.stderr
    assert hub.requests == []


# --- siblings: what else from the hub or the cache is trusted -------------------------------------


def test_a_file_without_a_sha256_is_not_reused_from_another_commit(
    hub: FakeHub, tmp_path: Path
) -> None:
    """A non-LFS file has no sha256 to name its blob by; the bytes under the same path and size
    at a newer commit are other bytes, not the old blob."""
    old, new = b"GGUF" + b"a" * 2000, b"GGUF" + b"b" * 2000
    hub.add_repo("someone/small-GGUF", {"s.Q4_K_M.gguf": FakeFile(old, lfs=False)}, commit="1" * 40)
    first = run_cli("pull", "someone/small-GGUF:Q4_K_M", timeout=60)
    assert first.code == 0 and Path(first.stdout.strip()).read_bytes() == old, first.stderr
    hub.add_repo("someone/small-GGUF", {"s.Q4_K_M.gguf": FakeFile(new, lfs=False)}, commit="2" * 40)
    second = run_cli("pull", "someone/small-GGUF:Q4_K_M", timeout=60)
    assert second.code == 0, second.stderr
    assert Path(second.stdout.strip()).read_bytes() == new
    assert "2" * 40 in second.stdout


def test_shards_numbered_twice_or_with_a_gap_are_not_a_complete_quant(hub: FakeHub) -> None:
    """A listing of shards 1, 1 and 3 of 3 (the same path twice) counts three files but lacks
    shard 2: pulling it must say so instead of downloading a model llama.cpp cannot load."""
    shard1, shard3 = "m.Q4_K_M-00001-of-00003.gguf", "m.Q4_K_M-00003-of-00003.gguf"
    hub.add_repo(
        "someone/gap-GGUF",
        {
            shard1: FakeFile(b"GGUF1"),
            shard3: FakeFile(b"GGUF3"),
            "m.Q4_K_M-00001-of-00003.gguf.x": FakeFile(b"x"),
        },
    )
    hub.tamper("someone/gap-GGUF", files={"m.Q4_K_M-00001-of-00003.gguf.x": {"path": shard1}})
    r = run_cli("pull", "someone/gap-GGUF:Q4_K_M", timeout=60)
    assert r.code == 8 and "twice" in r.stderr, r.stderr
    assert sum(hub.bytes_served.values()) == 0


def test_a_quant_with_a_missing_shard_says_which() -> None:
    from wizardchat.hub.catalog import RemoteFile, group_quants

    names = ["m.Q4_K_M-00001-of-00003.gguf", "m.Q4_K_M-00003-of-00003.gguf"]
    quant = group_quants([RemoteFile(n, 5) for n in names])["Q4_K_M"]
    assert not quant.complete and quant.missing == [2]
    parts = [RemoteFile(f"m.Q2_K.gguf.part{i}of3", 5) for i in (1, 2, 2)]
    quant = group_quants(parts)["Q2_K"]
    assert not quant.complete and quant.missing == [3]
