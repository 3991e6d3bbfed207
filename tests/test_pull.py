"""`wizardchat pull`, `models`, `rm` and `--model REF`: the real huggingface_hub client and the
installed command against a hub-compatible server on 127.0.0.1 serving generated tiny GGUFs."""

from __future__ import annotations

import hashlib
import re
import threading
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest
from conftest import run_cli
from gguf_models import SCRIPT_REPLY, write_model
from hub_server import FakeFile, FakeHub, hub_env, point_huggingface_hub_at
from small_disk import subprocess_env

from wizardchat.errors import HubError
from wizardchat.hub import download as hubmod
from wizardchat.hub import fetch
from wizardchat.hub.catalog import (
    ModelRef,
    Quant,
    RemoteFile,
    choose_quant,
    group_quants,
    human_size,
    parse_ref,
    quant_of,
)

MAZ = "MaziyarPanahi/WizardLM-2-8x22B-GGUF"  # the catalog's default for wizardlm2-8x22b
BART = "bartowski/WizardLM-2-8x22B-GGUF"
MRAD = "mradermacher/WizardLM-2-8x22B-GGUF"
SEVEN = "MaziyarPanahi/WizardLM-2-7B-GGUF"
GATED = "someone/WizardLM-2-gated-GGUF"
TOKEN = "hf_secret_test_token_123"


@dataclass(frozen=True)
class Blobs:
    """Generated model bytes: one whole file, and the same model as three gguf-split shards."""

    single: bytes
    shards: tuple[bytes, ...]


@pytest.fixture(scope="session")
def blobs(tmp_path_factory: pytest.TempPathFactory) -> Blobs:
    d = tmp_path_factory.mktemp("hubmodels")
    single = write_model(d / "single.gguf").read_bytes()
    (d / "split").mkdir()
    first = write_model(d / "split" / "m.gguf", split_max_tensors=8)
    shards = tuple(p.read_bytes() for p in sorted(first.parent.glob("m-*-of-*.gguf")))
    assert len(shards) == 3
    return Blobs(single, shards)


def split_names(prefix: str, n: int) -> list[str]:
    return [f"{prefix}-{i:05d}-of-{n:05d}.gguf" for i in range(1, n + 1)]


@pytest.fixture
def hub(blobs: Blobs, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[FakeHub]:
    """The four layouts of WizardLM-2 8x22B quants, a 7B single file and a gated repo."""
    with FakeHub() as server:
        flat = dict(zip(split_names("WizardLM-2-8x22B.Q4_K_M", 3), blobs.shards, strict=True))
        server.add_repo(
            MAZ,
            {
                **{name: FakeFile(data) for name, data in flat.items()},
                "WizardLM-2-8x22B.IQ1_S.gguf": FakeFile(blobs.single),
                "README.md": FakeFile(b"# quants\n", lfs=False),
            },
        )
        folder = "WizardLM-2-8x22B-Q4_K_M.gguf/"
        server.add_repo(
            BART,
            {
                folder + name: FakeFile(data)
                for name, data in zip(
                    split_names("WizardLM-2-8x22B-Q4_K_M", 3), blobs.shards, strict=True
                )
            },
        )
        half = len(blobs.single) // 2
        server.add_repo(
            MRAD,
            {
                "WizardLM-2-8x22B.Q4_K_S.gguf.part1of2": FakeFile(blobs.single[:half]),
                "WizardLM-2-8x22B.Q4_K_S.gguf.part2of2": FakeFile(blobs.single[half:]),
            },
        )
        server.add_repo(SEVEN, {"WizardLM-2-7B.Q5_K_M.gguf": FakeFile(blobs.single)})
        server.add_repo(
            GATED, {"WizardLM-2-8x22B.Q2_K.gguf": FakeFile(blobs.single)}, gated=True, token=TOKEN
        )
        for key, value in hub_env(server.url, tmp_path / "hf").items():
            monkeypatch.setenv(key, value)
        for key in ("HF_TOKEN", "HUGGING_FACE_HUB_TOKEN", "HF_HUB_OFFLINE"):
            monkeypatch.delenv(key, raising=False)
        yield server


def cache(tmp_path: Path) -> Path:
    return tmp_path / "hf" / "hub"


def ask(ref: str, *extra: str) -> tuple[int, str, str]:
    r = run_cli("ask", "-m", ref, "-c", "512", "--temperature", "0", "Hi", *extra)
    return r.code, r.stdout, r.stderr


@pytest.mark.parametrize(
    ("ref", "loaded"),
    [
        ("wizardlm2-8x22b:Q4_K_M", "WizardLM-2-8x22B.Q4_K_M-00001-of-00003.gguf"),
        (
            f"{BART}:Q4_K_M",
            "WizardLM-2-8x22B-Q4_K_M.gguf/WizardLM-2-8x22B-Q4_K_M-00001-of-00003.gguf",
        ),
        (f"{MRAD}:Q4_K_S", "WizardLM-2-8x22B.Q4_K_S.gguf"),
        ("wizardlm2-8x22b:IQ1_S", "WizardLM-2-8x22B.IQ1_S.gguf"),
        ("wizardlm2-7b:Q5_K_M", "WizardLM-2-7B.Q5_K_M.gguf"),
    ],
)
def test_each_layout_downloads_verifies_and_answers(
    hub: FakeHub, tmp_path: Path, ref: str, loaded: str
) -> None:
    pulled = run_cli("pull", ref)
    assert pulled.code == 0, pulled.stderr
    path = Path(pulled.stdout.strip())
    assert path.is_file() and path.as_posix().endswith(loaded)
    assert str(cache(tmp_path)) in str(path)  # in the hub cache, HF_HOME respected
    assert not list(cache(tmp_path).rglob("*.wizardchat-partial"))
    assert not list(cache(tmp_path).rglob("*.part*of*"))  # byte parts joined, then removed
    code, out, err = ask(ref)
    assert code == 0, err
    assert out == SCRIPT_REPLY + "\n"
    again = run_cli("pull", ref)  # already there: nothing transferred
    assert again.code == 0 and sum(hub.bytes_served.values()) == sum(
        n for (repo, p), n in hub.bytes_served.items()
    )


def test_second_pull_transfers_nothing(hub: FakeHub) -> None:
    assert run_cli("pull", "wizardlm2-7b:Q5_K_M").code == 0
    hub.reset_counters()
    assert run_cli("pull", "wizardlm2-7b:Q5_K_M").code == 0
    assert sum(hub.bytes_served.values()) == 0


def test_list_shows_sizes_and_fit_without_downloading(hub: FakeHub, blobs: Blobs) -> None:
    r = run_cli("pull", "wizardlm2-8x22b", "--list")
    assert r.code == 0, r.stderr
    rows = {line.split()[0]: line.split() for line in r.stdout.splitlines()[1:]}
    assert set(rows) == {"Q4_K_M", "IQ1_S"}
    assert " ".join(rows["Q4_K_M"][1:4]) == f"{human_size(sum(map(len, blobs.shards)))} 3"
    assert rows["Q4_K_M"][4] == "split" and rows["IQ1_S"][4] == "single"
    assert rows["Q4_K_M"][5] == "yes"  # a few MB fit any machine
    assert "<- default" in " ".join(rows["Q4_K_M"])  # the biggest that fits
    assert r.stderr.startswith("this machine: ") and "model files up to" in r.stderr
    assert sum(hub.bytes_served.values()) == 0


def test_dropped_connection_then_a_second_pull_fetches_only_the_rest(
    hub: FakeHub, tmp_path: Path, blobs: Blobs
) -> None:
    path = "WizardLM-2-7B.Q5_K_M.gguf"
    size = len(blobs.single)
    # Every attempt of this run (the first try and its retries) is cut after 100 KB.
    hub.drop_after(SEVEN, path, 100_000, times=len(fetch.RETRY_DELAYS) + 1)
    first = run_cli("pull", "wizardlm2-7b:Q5_K_M")
    assert first.code == 8, first.stderr
    assert "run the same pull again to continue" in first.stderr
    errors = [line for line in first.stderr.splitlines() if "error" in line]
    assert len(errors) == 1 and errors[0].startswith("wizardchat: error: download of")
    assert "Traceback" not in first.stderr
    partial = next(cache(tmp_path).rglob("*.wizardchat-partial"))
    kept = partial.stat().st_size
    assert kept == 400_000  # each retry continued from the bytes on disk
    assert not list(cache(tmp_path).rglob(path))  # no file where the model is expected
    models = run_cli("models")
    assert re.search(r"wizardlm2-7b:Q5_K_M\s+Q5_K_M\s+[\d.]+ KB\s+incomplete \d+%", models.stdout)

    hub.reset_counters()
    second = run_cli("pull", "wizardlm2-7b:Q5_K_M")
    assert second.code == 0, second.stderr
    assert hub.served(SEVEN, path) == size - kept  # only the remaining bytes
    assert Path(second.stdout.strip()).read_bytes() == blobs.single


class BrokenProgress:
    """A progress display with a bug: a programming error inside the download step."""

    def start(self, path: str, total: int, done: int) -> None:
        pass

    def advance(self, path: str, n: int) -> None:
        raise TypeError("a bug in the progress display")

    def finish(self, path: str) -> None:
        pass

    def note(self, text: str) -> None:
        pass


def test_a_programming_error_while_downloading_is_not_retried_nor_called_a_network_failure(
    hub: FakeHub, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    point_huggingface_hub_at(monkeypatch, hub.url, tmp_path / "hf")
    ref = parse_ref("wizardlm2-7b:Q5_K_M")
    assert isinstance(ref, ModelRef)
    model = hubmod.list_remote(ref)
    hub.reset_counters()
    with pytest.raises(TypeError, match="a bug in the progress display"):
        hubmod.pull(model, model.quants["Q5_K_M"], BrokenProgress(), cancel=threading.Event())
    downloads = [r for r in hub.requests if r[0] == "GET" and "/resolve/" in r[1]]
    assert len(downloads) == 1  # asked once: a bug is not a dropped connection


def test_a_busy_hub_is_retried_and_a_hub_that_stays_down_says_so(
    hub: FakeHub, tmp_path: Path, blobs: Blobs
) -> None:
    path = "WizardLM-2-7B.Q5_K_M.gguf"
    hub.fail_with(SEVEN, path, 503, times=len(fetch.RETRY_DELAYS) + 1)  # every try of this run
    down = run_cli("pull", "wizardlm2-7b:Q5_K_M")
    assert down.code == 8, down.stderr
    assert "wizardchat: error: download of" in down.stderr and "503" in down.stderr
    assert "Traceback" not in down.stderr
    hub.fail_with(SEVEN, path, 503, times=len(fetch.RETRY_DELAYS))  # the last retry gets it
    busy = run_cli("pull", "wizardlm2-7b:Q5_K_M")
    assert busy.code == 0, busy.stderr
    assert Path(busy.stdout.strip()).read_bytes() == blobs.single


def test_corrupt_download_fails_verification_and_leaves_no_file(
    hub: FakeHub, tmp_path: Path
) -> None:
    hub.corrupt(SEVEN, "WizardLM-2-7B.Q5_K_M.gguf")
    r = run_cli("pull", "wizardlm2-7b:Q5_K_M")
    assert r.code == 8
    assert "does not match the hub's sha256" in r.stderr and "deleted" in r.stderr
    leftovers = [p for p in cache(tmp_path).rglob("*") if p.is_file() and "blobs" in p.parts]
    assert leftovers == []
    assert not list(cache(tmp_path).rglob("WizardLM-2-7B.Q5_K_M.gguf"))


def test_html_page_instead_of_the_file_is_refused(hub: FakeHub) -> None:
    hub.serve_html_error(SEVEN, "WizardLM-2-7B.Q5_K_M.gguf")
    r = run_cli("pull", "wizardlm2-7b:Q5_K_M")
    assert r.code == 8 and "web page instead of the file" in r.stderr


def test_unknown_repo_and_unknown_quant(hub: FakeHub) -> None:
    r = run_cli("pull", "nobody/NoSuchModel-GGUF")
    assert r.code == 3 and "no repository nobody/NoSuchModel-GGUF" in r.stderr
    r = run_cli("pull", "wizardlm2-8x22b:Q8_0")
    assert r.code == 3
    assert "has no quant Q8_0; it has: Q4_K_M, IQ1_S" in r.stderr


def test_gated_repo_needs_a_token_which_is_never_shown(hub: FakeHub, monkeypatch) -> None:
    r = run_cli("pull", f"{GATED}:Q2_K")
    assert r.code == 8 and "gated" in r.stderr and "HF_TOKEN" in r.stderr
    monkeypatch.setenv("HF_TOKEN", TOKEN)
    r = run_cli("pull", f"{GATED}:Q2_K", "--list")
    assert r.code == 0, r.stderr
    r = run_cli("pull", f"{GATED}:Q2_K")
    assert r.code == 0, r.stderr
    assert TOKEN not in r.stdout + r.stderr
    assert all(TOKEN not in str(headers) for _, _, headers in hub.requests)


def test_offline_uses_the_cache_only(hub: FakeHub, monkeypatch) -> None:
    assert run_cli("pull", "wizardlm2-7b:Q5_K_M").code == 0
    hub.reset_counters()
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    code, out, err = ask("wizardlm2-7b:Q5_K_M")
    assert code == 0 and out == SCRIPT_REPLY + "\n", err
    code, out, err = ask("wizardlm2-8x22b:IQ1_S")
    assert code == 3 and "not in the cache" in err and "HF_HUB_OFFLINE" in err
    r = run_cli("pull", "wizardlm2-8x22b")
    assert r.code == 8 and "HF_HUB_OFFLINE" in r.stderr
    assert hub.requests == []


def test_not_enough_disk_is_refused_before_downloading(
    hub: FakeHub, tmp_path: Path, monkeypatch
) -> None:
    for key, value in subprocess_env(1000, cache(tmp_path)).items():
        monkeypatch.setenv(key, value)
    r = run_cli("pull", "wizardlm2-8x22b:Q4_K_M")
    assert r.code == 8
    assert re.search(
        r"not enough disk space in .*: Q4_K_M needs [\d.]+ MB more, 1.0 KB free", r.stderr
    )
    assert sum(hub.bytes_served.values()) == 0


def test_models_and_rm(hub: FakeHub, tmp_path: Path, blobs: Blobs) -> None:
    assert run_cli("pull", "wizardlm2-8x22b:Q4_K_M").code == 0
    assert run_cli("pull", "wizardlm2-7b:Q5_K_M").code == 0
    listing = run_cli("models")
    assert listing.code == 0
    lines = listing.stdout.splitlines()
    assert lines[0].split() == ["REFERENCE", "QUANT", "SIZE", "STATUS"]
    assert any(
        re.match(r"wizardlm2-8x22b:Q4_K_M\s+Q4_K_M\s+[\d.]+ MB\s+complete$", line) for line in lines
    ), listing.stdout
    wide = run_cli("models", "--paths").stdout.splitlines()
    assert wide[0].split() == ["REFERENCE", "QUANT", "SIZE", "STATUS", "PATH"]
    assert any(
        re.match(
            r"wizardlm2-8x22b:Q4_K_M\s+Q4_K_M\s+[\d.]+ MB\s+complete\s+\S+00001-of-00003", line
        )
        for line in wide
    ), wide
    refused = run_cli("rm", "wizardlm2-8x22b:Q4_K_M")  # no terminal to confirm on
    assert refused.code == 2 and "--yes" in refused.stderr
    removed = run_cli("rm", "wizardlm2-8x22b:Q4_K_M", "--yes")
    assert removed.code == 0
    freed = int(re.search(r"freed \((\d+) bytes\)", removed.stderr).group(1))  # type: ignore[union-attr]
    assert freed == sum(map(len, blobs.shards))
    after = run_cli("models").stdout
    assert "wizardlm2-8x22b" not in after and "wizardlm2-7b:Q5_K_M" in after
    assert run_cli("rm", "wizardlm2-8x22b:Q4_K_M", "--yes").code == 3


def test_batch_mode_needs_yes_to_download(hub: FakeHub) -> None:
    r = run_cli("run", "-m", "wizardlm2-7b:Q5_K_M", "-c", "512", stdin="Hi\n")
    assert r.code == 3 and "wizardchat pull wizardlm2-7b:Q5_K_M" in r.stderr
    assert sum(hub.bytes_served.values()) == 0
    r = run_cli("run", "-m", "wizardlm2-7b:Q5_K_M", "-c", "512", "--yes", stdin="Hi\n")
    assert r.code == 0, r.stderr
    assert SCRIPT_REPLY in r.stdout


# --- pure parts -------------------------------------------------------------------------------


def test_references() -> None:
    ref = parse_ref("wizardlm2-8x22b")
    assert isinstance(ref, ModelRef) and ref.repo == MAZ and ref.quant is None
    ref = parse_ref("wizardlm2-7b:q5_k_m")
    assert isinstance(ref, ModelRef) and ref.quant == "Q5_K_M"
    ref = parse_ref(f"{BART}:IQ2_XS")
    assert isinstance(ref, ModelRef) and (ref.repo, ref.quant) == (BART, "IQ2_XS")
    assert parse_ref("./model.gguf") == Path("model.gguf")
    with pytest.raises(Exception, match="not a quant name"):
        parse_ref("wizardlm2-8x22b:banana")


@pytest.mark.parametrize(
    ("name", "quant"),
    [
        ("WizardLM-2-8x22B.Q4_K_M-00001-of-00005.gguf", "Q4_K_M"),
        ("WizardLM-2-8x22B-Q4_K_M.gguf/WizardLM-2-8x22B-Q4_K_M-00002-of-00005.gguf", "Q4_K_M"),
        ("WizardLM-2-8x22B.Q4_K_S.gguf.part1of2", "Q4_K_S"),
        ("WizardLM-2-8x22B.i1-Q2_K.gguf.part2of2", "Q2_K"),
        ("WizardLM-2-8x22B.IQ1_S.gguf", "IQ1_S"),
        ("WizardLM-2-8x22B-imatrix-Q4_K_M-00001-of-00002.gguf", "Q4_K_M"),
        ("README.md", None),
    ],
)
def test_quant_names_from_file_names(name: str, quant: str | None) -> None:
    assert quant_of(name) == quant


def test_grouping_orders_parts_numerically_and_notices_missing_shards() -> None:
    parts = [RemoteFile(f"m.Q2_K.gguf.part{i}of12", 10) for i in range(12, 0, -1)]
    shards = [RemoteFile(f"m.Q4_K_M-0000{i}-of-00003.gguf", 5) for i in (1, 3)]
    quants = group_quants([*parts, *shards, RemoteFile("mmproj-Q8_0.gguf", 1)])
    assert [f.path.rsplit("part", 1)[1] for f in quants["Q2_K"].files][:3] == [
        "1of12",
        "2of12",
        "3of12",
    ]
    assert quants["Q2_K"].model_path == "m.Q2_K.gguf" and quants["Q2_K"].complete
    assert not quants["Q4_K_M"].complete and "Q8_0" not in quants
    ref = ModelRef("a/b")
    assert choose_quant(quants, ref, budget=1000).name == "Q2_K"  # the only complete one


def test_choose_quant_prefers_the_biggest_that_fits_else_q4_k_m() -> None:
    def q(name: str, size: int) -> Quant:
        return Quant(name, "single", [RemoteFile(f"m.{name}.gguf", size)])

    quants = {n: q(n, s) for n, s in (("Q8_0", 150), ("Q4_K_M", 85), ("Q2_K", 52))}
    ref = ModelRef("a/b")
    assert choose_quant(quants, ref, budget=100).name == "Q4_K_M"
    assert choose_quant(quants, ref, budget=60).name == "Q2_K"
    assert choose_quant(quants, ref, budget=None).name == "Q4_K_M"  # memory unknown
    assert choose_quant(quants, ref, budget=10).name == "Q4_K_M"  # nothing fits: the default


def test_paths_leaving_the_repository_are_refused(tmp_path: Path, monkeypatch) -> None:
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path))
    for bad in ("../evil.Q4_K_M.gguf", "/etc/evil.Q4_K_M.gguf", "a/../../evil.Q4_K_M.gguf"):
        quant = Quant("Q4_K_M", "single", [RemoteFile(bad, 10, hashlib.sha256(b"").hexdigest())])
        model = hubmod.RemoteModel("a/b", "0" * 40, {"Q4_K_M": quant})
        with pytest.raises(HubError, match="leaves the repository"):
            hubmod.pull(model, quant, progress=None, cancel=threading.Event())  # type: ignore[arg-type]
    assert list(tmp_path.iterdir()) == []


def test_lfs_pointer_instead_of_the_file_is_refused(hub: FakeHub) -> None:
    pointer = b"version https://git-lfs.github.com/spec/v1\noid sha256:abc\nsize 123456789\n"
    hub.add_repo("someone/pointer-GGUF", {"m.Q4_K_M.gguf": FakeFile(pointer, lfs=False)})
    r = run_cli("pull", "someone/pointer-GGUF:Q4_K_M")
    assert r.code == 8 and "git-lfs pointer" in r.stderr


@pytest.mark.parametrize("answer", ["y", "n"])
def test_run_asks_before_downloading_and_shows_the_size(
    hub: FakeHub, blobs: Blobs, answer: str
) -> None:
    import os

    import pexpect
    from conftest import WIZARDCHAT

    child = pexpect.spawn(
        WIZARDCHAT,
        ["run", "-m", "wizardlm2-7b:Q5_K_M", "-c", "512", "--plain"],
        env={**os.environ, "TERM": "dumb"},
        encoding="utf-8",
        timeout=60,
    )
    try:
        child.expect(r"wizardlm2-7b:Q5_K_M is not downloaded\. Download (.*)\? \[y/N\] ")
        assert (
            child.match.group(1) == f"{SEVEN} Q5_K_M: {human_size(len(blobs.single))} in 1 file(s)"
        )
        child.send(answer + "\r")
        if answer == "n":
            child.expect(pexpect.EOF)
            child.close()
            assert child.exitstatus == 0  # declining is not an error
            assert sum(hub.bytes_served.values()) == 0
            return
        child.expect("ready in")
        child.expect(">>> ")
        child.send("Hi\r")
        child.expect_exact(SCRIPT_REPLY)
        child.sendcontrol("d")
        child.expect(pexpect.EOF)
    finally:
        child.close(force=True)
    assert child.exitstatus == 0


def test_the_download_question_warns_when_nothing_fits(
    hub: FakeHub, monkeypatch, tmp_path: Path
) -> None:
    import io

    from hub_server import point_huggingface_hub_at

    from wizardchat.errors import NoModelError
    from wizardchat.hub import resolve as pulling
    from wizardchat.plan.machine import Machine

    point_huggingface_hub_at(monkeypatch, hub.url, tmp_path / "hf")  # in this process too

    with pytest.raises(NoModelError, match=r"no quant of wizardlm2-7b fits this machine"):
        pulling.resolve_model(
            "wizardlm2-7b:Q5_K_M",
            yes=False,
            can_ask=False,
            confirm=lambda q: False,
            err=io.StringIO(),
            machine=lambda: Machine.sized(1000),  # a machine with 1 KB
        )
