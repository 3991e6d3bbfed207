"""The loopback hub (tests/hub_server.py) against the real huggingface_hub client."""

from __future__ import annotations

import contextlib
import hashlib
import os
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import httpx2
import pytest
from hub_server import FakeFile, FakeHub, git_blob_sha1, hub_env, point_huggingface_hub_at
from huggingface_hub import (
    HfApi,
    get_hf_file_metadata,
    hf_hub_download,
    hf_hub_url,
    snapshot_download,
)
from huggingface_hub.errors import (
    EntryNotFoundError,
    GatedRepoError,
    RemoteEntryNotFoundError,
    RepositoryNotFoundError,
    RevisionNotFoundError,
)
from huggingface_hub.hf_api import RepoFile, RepoFolder
from huggingface_hub.utils import build_hf_headers, get_session

REPO = "bartowski/WizardLM-2-8x22B-GGUF"
SPLIT_DIR = "WizardLM-2-8x22B-Q4_K_M.gguf"
SHARD1 = f"{SPLIT_DIR}/WizardLM-2-8x22B-Q4_K_M-00001-of-00002.gguf"
SHARD2 = f"{SPLIT_DIR}/WizardLM-2-8x22B-Q4_K_M-00002-of-00002.gguf"
SINGLE = "WizardLM-2-8x22B-IQ1_S.gguf"
README = "README.md"
GATED = "someone/gated-model"
TOKEN = "hf_secret_gate_token"

DATA = {
    SINGLE: bytes(range(256)) * 1200 + b"tail",  # 307204 bytes
    SHARD1: b"GGUF" + os.urandom(50_000),
    SHARD2: b"GGUF" + os.urandom(20_000),
    README: b"# WizardLM-2 8x22B GGUF\n",
}


def sha256(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


@pytest.fixture
def hub(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[FakeHub]:
    with FakeHub() as server:
        files = {p: FakeFile(d, lfs=p != README) for p, d in DATA.items()}
        server.add_repo(REPO, files)
        server.add_repo(GATED, {"model.gguf": FakeFile(b"gated!" * 100)}, gated=True, token=TOKEN)
        point_huggingface_hub_at(monkeypatch, server.url, tmp_path / "hf")
        yield server


def test_list_repo_tree_recursive_sizes_and_sha256(hub: FakeHub) -> None:
    entries = list(HfApi(endpoint=hub.url).list_repo_tree(REPO, recursive=True))
    files = {e.path: e for e in entries if isinstance(e, RepoFile)}
    folders = [e.path for e in entries if isinstance(e, RepoFolder)]
    assert folders == [SPLIT_DIR]  # a folder whose name ends in .gguf
    assert set(files) == set(DATA)
    for path, data in DATA.items():
        assert files[path].size == len(data)
        if path == README:
            assert files[path].lfs is None
            assert files[path].blob_id == git_blob_sha1(iter([data]), len(data))
        else:
            lfs = files[path].lfs
            assert lfs is not None
            assert (lfs.sha256, lfs.size) == (sha256(data), len(data))


def test_list_repo_tree_top_level_subfolder_and_pages(hub: FakeHub) -> None:
    api = HfApi(endpoint=hub.url)
    top = {e.path: type(e) for e in api.list_repo_tree(REPO)}
    assert top == {README: RepoFile, SINGLE: RepoFile, SPLIT_DIR: RepoFolder}
    inside = [e.path for e in api.list_repo_tree(REPO, path_in_repo=SPLIT_DIR)]
    assert inside == [SHARD1, SHARD2]
    expanded = list(api.list_repo_tree(REPO, expand=True))
    assert all(e.last_commit is not None for e in expanded)

    hub.tree_page_size = 2
    hub.reset_counters()
    paged = [e.path for e in api.list_repo_tree(REPO, recursive=True)]
    assert sorted(paged) == sorted([*DATA, SPLIT_DIR])
    assert len([r for r in hub.requests if "/tree/" in r[1]]) == 3  # followed Link: rel="next"


def test_model_info_with_files_metadata(hub: FakeHub) -> None:
    import huggingface_hub

    info = HfApi(endpoint=hub.url).model_info(REPO, files_metadata=True)
    assert info.id == REPO
    assert info.sha == hub.commit_of(REPO)
    assert info.siblings is not None
    siblings = {s.rfilename: s for s in info.siblings}
    assert set(siblings) == set(DATA)
    assert siblings[SHARD1].size == len(DATA[SHARD1])
    lfs = siblings[SHARD1].lfs
    assert lfs is not None
    assert lfs.sha256 == sha256(DATA[SHARD1])
    assert siblings[README].lfs is None
    # By revision (main or the commit), and through the module-level function (patched endpoint).
    assert huggingface_hub.model_info(REPO, revision="main").sha == info.sha
    assert huggingface_hub.model_info(REPO, revision=info.sha).sha == info.sha


def test_hf_hub_download_and_file_metadata(hub: FakeHub, tmp_path: Path) -> None:
    commit = hub.commit_of(REPO)
    path = hf_hub_download(REPO, SHARD1, endpoint=hub.url)
    assert Path(path).read_bytes() == DATA[SHARD1]
    assert Path(path).is_relative_to(tmp_path / "hf" / "hub")
    assert f"/snapshots/{commit}/{SHARD1}" in path
    # Without endpoint=, through the patched constants; and pinned to the commit.
    path2 = hf_hub_download(REPO, SINGLE, revision=commit)
    assert Path(path2).read_bytes() == DATA[SINGLE]

    meta = get_hf_file_metadata(hf_hub_url(REPO, SINGLE, endpoint=hub.url))
    assert (meta.etag, meta.size, meta.commit_hash) == (
        sha256(DATA[SINGLE]),
        len(DATA[SINGLE]),
        commit,
    )
    assert meta.xet_file_data is None
    meta = get_hf_file_metadata(hf_hub_url(REPO, README, endpoint=hub.url))
    assert meta.etag == git_blob_sha1(iter([DATA[README]]), len(DATA[README]))
    assert meta.size == len(DATA[README])

    methods = [(m, p) for m, p, _ in hub.requests if "/resolve/" in p]
    assert methods[:2] == [
        ("HEAD", f"/{REPO}/resolve/main/{SHARD1}"),
        ("GET", f"/{REPO}/resolve/main/{SHARD1}"),
    ]
    assert hub.served(REPO, SHARD1) == len(DATA[SHARD1])


def test_snapshot_download_with_pattern(hub: FakeHub) -> None:
    folder = Path(snapshot_download(REPO, allow_patterns=[f"{SPLIT_DIR}/*"], endpoint=hub.url))
    assert (folder / SHARD1).read_bytes() == DATA[SHARD1]
    assert (folder / SHARD2).read_bytes() == DATA[SHARD2]
    assert not (folder / SINGLE).exists()


def test_ranged_get_returns_206_and_the_tail(hub: FakeHub) -> None:
    url = hf_hub_url(REPO, SINGLE, endpoint=hub.url)
    data = DATA[SINGLE]
    r = get_session().get(url, headers={**build_hf_headers(), "Range": "bytes=300000-"})
    assert r.status_code == 206
    assert r.content == data[300000:]
    assert r.headers["Content-Range"] == f"bytes 300000-{len(data) - 1}/{len(data)}"
    assert r.headers["X-Linked-Etag"] == f'"{sha256(data)}"'
    assert not [h for h in r.headers if h.lower().startswith("x-xet")]

    r = get_session().get(url, headers={**build_hf_headers(), "Range": "bytes=10-19"})
    assert (r.status_code, r.content) == (206, data[10:20])
    r = get_session().get(url, headers={**build_hf_headers(), "Range": f"bytes={len(data)}-"})
    assert r.status_code == 416
    assert r.headers["Content-Range"] == f"bytes */{len(data)}"


def test_drop_after_cuts_the_body_and_counts_exactly(hub: FakeHub) -> None:
    url = hf_hub_url(REPO, SINGLE, endpoint=hub.url)
    hub.drop_after(REPO, SINGLE, 1000, times=2)
    for _ in range(2):
        got = bytearray()
        with (
            pytest.raises(httpx2.RemoteProtocolError),  # FIN before Content-Length bytes
            get_session().stream("GET", url, headers=build_hf_headers()) as r,
        ):
            for chunk in r.iter_bytes():
                got += chunk
        assert bytes(got) == DATA[SINGLE][:1000]
    assert hub.served(REPO, SINGLE) == 2000

    # Counted from the start of the requested range; reset=True ends with an RST instead.
    hub.drop_after(REPO, SINGLE, 500, reset=True)
    with (
        pytest.raises(httpx2.ReadError),
        get_session().stream("GET", url, headers={"Range": "bytes=100000-"}) as r,
    ):
        r.read()
    assert hub.served(REPO, SINGLE) == 2500

    r = get_session().get(url)  # the faults are used up
    assert r.content == DATA[SINGLE]
    assert hub.served(REPO, SINGLE) == 2500 + len(DATA[SINGLE])


def test_hf_hub_download_resumes_after_a_drop(hub: FakeHub) -> None:
    # http_get reads 10 MiB chunks (DOWNLOAD_CHUNK_SIZE) and, on a RemoteProtocolError, sleeps 1 s
    # and resumes with Range from the last whole chunk it wrote: bytes of a partial chunk are lost.
    mib = 1024 * 1024
    payload = os.urandom(12 * mib)
    hub.add_repo("org/resume", {"m.gguf": FakeFile(payload)})
    hub.drop_after("org/resume", "m.gguf", 11 * mib)
    path = hf_hub_download("org/resume", "m.gguf", endpoint=hub.url)
    assert Path(path).read_bytes() == payload
    ranges = [h.get("range") for m, _, h in hub.requests if m == "GET"]
    assert ranges == [None, f"bytes={10 * mib}-"]
    assert hub.served("org/resume", "m.gguf") == 11 * mib + 2 * mib


def test_errors_map_to_the_hub_exception_classes(hub: FakeHub) -> None:
    api = HfApi(endpoint=hub.url)
    for call in (
        lambda: hf_hub_download("nobody/nothing", "x.gguf", endpoint=hub.url),
        lambda: list(api.list_repo_tree("nobody/nothing")),
        lambda: api.model_info("nobody/nothing"),
    ):
        with pytest.raises(RepositoryNotFoundError) as err:
            call()
        assert not isinstance(err.value, GatedRepoError)
        assert err.value.response.status_code == 404

    with pytest.raises(RemoteEntryNotFoundError) as entry_err:
        hf_hub_download(REPO, "missing.gguf", endpoint=hub.url)
    assert isinstance(entry_err.value, EntryNotFoundError)
    with pytest.raises(RemoteEntryNotFoundError):
        list(api.list_repo_tree(REPO, path_in_repo="no-such-folder"))
    with pytest.raises(RevisionNotFoundError):
        hf_hub_download(REPO, SINGLE, revision="v9", endpoint=hub.url)


def test_gated_repo_needs_the_token_which_is_never_logged(hub: FakeHub) -> None:
    api = HfApi(endpoint=hub.url)
    for token in (None, "hf_wrong"):
        for call in (
            lambda t=token: hf_hub_download(GATED, "model.gguf", endpoint=hub.url, token=t),
            lambda t=token: list(api.list_repo_tree(GATED, token=t)),
            lambda t=token: api.model_info(GATED, token=t),
        ):
            with pytest.raises(GatedRepoError) as err:
                call()
            assert err.value.response.status_code == 401

    path = hf_hub_download(GATED, "model.gguf", endpoint=hub.url, token=TOKEN)
    assert Path(path).read_bytes() == b"gated!" * 100
    assert [e.path for e in api.list_repo_tree(GATED, token=TOKEN)] == ["model.gguf"]
    assert api.model_info(GATED, token=TOKEN).gated == "manual"

    assert TOKEN not in repr(hub.requests) and "hf_wrong" not in repr(hub.requests)
    auth = [h["authorization"] for _, _, h in hub.requests if "authorization" in h]
    assert auth and set(auth) == {"***"}


def test_corrupt_serves_other_bytes_of_the_same_length(hub: FakeHub) -> None:
    hub.corrupt(REPO, SHARD2)
    meta = get_hf_file_metadata(hf_hub_url(REPO, SHARD2, endpoint=hub.url))
    assert (meta.etag, meta.size) == (sha256(DATA[SHARD2]), len(DATA[SHARD2]))
    # huggingface_hub checks only the size of a plain HTTP download, not its sha256.
    got = Path(hf_hub_download(REPO, SHARD2, endpoint=hub.url)).read_bytes()
    assert len(got) == len(DATA[SHARD2])
    assert got != DATA[SHARD2]
    assert sha256(got) != meta.etag


def test_html_error_page_instead_of_the_file(hub: FakeHub) -> None:
    hub.serve_html_error(REPO, SINGLE)
    r = get_session().get(hf_hub_url(REPO, SINGLE, endpoint=hub.url))
    assert r.status_code == 200
    assert r.headers["Content-Type"].startswith("text/html")
    assert r.content.startswith(b"<!DOCTYPE html>")
    with pytest.raises(OSError, match="Consistency check failed"):
        hf_hub_download(REPO, SINGLE, endpoint=hub.url)
    hub.clear_faults()
    assert Path(hf_hub_download(REPO, SINGLE, endpoint=hub.url)).read_bytes() == DATA[SINGLE]


def test_stall_delays_the_body(hub: FakeHub) -> None:
    url = hf_hub_url(REPO, README, endpoint=hub.url)
    hub.stall(REPO, README, 0.3)
    start = time.monotonic()
    assert get_session().get(url).content == DATA[README]
    assert time.monotonic() - start >= 0.3
    hub.stall(REPO, README, 5)
    with pytest.raises(httpx2.ReadTimeout):
        get_session().get(url, timeout=0.2)


def test_concurrent_downloads_from_disk_and_a_quick_stop(tmp_path: Path) -> None:
    big = tmp_path / "big.gguf"
    payload = os.urandom(3 * 1024 * 1024 + 17)
    big.write_bytes(payload)
    hub = FakeHub().start()
    hub.add_repo("org/big", {"big.gguf": FakeFile(path_on_disk=big, sha256=sha256(payload))})
    url = f"{hub.url}/org/big/resolve/main/big.gguf"
    results: dict[int, bytes] = {}

    def fetch(i: int) -> None:
        start = i * 1_000_000
        with httpx2.Client(timeout=5) as client:
            r = client.get(url, headers={"Range": f"bytes={start}-{start + 1_499_999}"})
            results[i] = r.content

    threads = [threading.Thread(target=fetch, args=(i,)) for i in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(5)
    assert {i: payload[i * 1_000_000 : i * 1_000_000 + 1_500_000] for i in range(4)} == results
    assert hub.served("org/big", "big.gguf") == sum(len(v) for v in results.values())

    # A request stuck in a stall and an idle keep-alive connection do not hold stop() up.
    hub.stall("org/big", "big.gguf", 30)
    idle = httpx2.Client(timeout=5)
    idle.head(url)

    def stuck_get() -> None:
        with contextlib.suppress(httpx2.HTTPError):
            httpx2.get(url, timeout=10)

    stuck = threading.Thread(target=stuck_get)
    stuck.start()
    time.sleep(0.2)
    start = time.monotonic()
    hub.stop()
    assert time.monotonic() - start < 1.0
    stuck.join(2)
    assert not stuck.is_alive()
    assert not [t for t in threading.enumerate() if t.name.startswith("fakehub")]
    idle.close()


def test_subprocess_with_hub_env(hub: FakeHub, tmp_path: Path) -> None:
    env = {
        k: v
        for k, v in os.environ.items()
        if k not in ("HF_TOKEN", "HUGGING_FACE_HUB_TOKEN", "HF_HUB_OFFLINE")
    }
    env.update(hub_env(hub.url, tmp_path / "child-hf"))
    code = (
        "import huggingface_hub as h\n"
        f"print(len(list(h.list_repo_tree({REPO!r}, recursive=True))))\n"
        f"print(h.hf_hub_download({REPO!r}, {SHARD2!r}))\n"
    )
    out = subprocess.run(
        [sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=60
    )
    assert out.returncode == 0, out.stderr
    count, path_line = out.stdout.splitlines()[-2:]
    assert count == "5"  # 4 files and 1 folder
    path = Path(path_line)
    assert path.is_relative_to(tmp_path / "child-hf" / "hub")
    assert path.read_bytes() == DATA[SHARD2]
    assert not any("agent-harnesses" in p for _, p, _ in hub.requests)


def test_tamper_lies_in_model_info_and_tree_and_still_serves_the_bytes(hub: FakeHub) -> None:
    lie = "../" * 4 + "evil"
    hub.tamper(
        REPO,
        commit=lie,
        files={SINGLE: {"path": "../x.gguf", "size": -1, "lfs": {"sha256": "../y"}}},
    )
    api = HfApi(endpoint=hub.url)
    info = api.model_info(REPO, files_metadata=True)
    assert info.sha == lie
    told = {s.rfilename: s for s in info.siblings or []}
    assert SINGLE not in told and told["../x.gguf"].size == -1
    lfs = told["../x.gguf"].lfs
    assert lfs is not None and lfs.sha256 == "../y"
    tree = {e.path: e for e in api.list_repo_tree(REPO, recursive=True)}
    entry = tree["../x.gguf"]
    assert isinstance(entry, RepoFile) and entry.lfs is not None and entry.lfs.sha256 == "../y"
    # A client that believes it asks at the claimed commit and gets the real bytes.
    url = hf_hub_url(REPO, SINGLE, revision=lie, endpoint=hub.url)
    response = get_session().get(url, headers=build_hf_headers())
    assert response.status_code == 200 and response.content == DATA[SINGLE]
    hub.clear_faults()
    assert api.model_info(REPO).sha == hub.commit_of(REPO)
