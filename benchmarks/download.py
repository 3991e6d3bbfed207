"""`wizardchat pull`'s download against plain `hf_hub_download`, same files, same loopback hub.

    .venv/bin/python benchmarks/download.py [--quick] [--mb N] [--json PATH]

Two figures:

1. throughput: MB/s of wizardchat's downloader (`hub.pull`: ranged GETs into a stable partial
   file, sha256 while receiving, rename into the hub cache) divided by MB/s of
   `huggingface_hub.hf_hub_download` for the same single file (goal >= 0.95). Runs alternate,
   each into a fresh cache directory, and the median of the per-pair ratios is reported. Note that
   hf_hub_download does not hash what it downloads over plain HTTP; wizardchat does, so the ratio
   includes verification.
2. sharding: the time to pull the same total bytes as 4 gguf-split shards (4 downloads at once)
   divided by the time to pull them as one file (lower is better; 1.0 means no gain).

The files are random bytes on disk (written once per run into a temporary directory), served by
tests/hub_server.py on 127.0.0.1 from a thread per connection. On a 2-core machine the server,
the client and the hashing share the same two cores, so these are ratios, not link speeds.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import statistics
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "tests"))
sys.path.insert(0, str(ROOT / "src"))

from hub_server import FakeFile, FakeHub, hub_env  # noqa: E402

SINGLE = "bench/WizardLM-2-8x22B-single-GGUF"
SHARDED = "bench/WizardLM-2-8x22B-sharded-GGUF"


class Quiet:
    """A pull progress that shows nothing."""

    def start(self, path: str, total: int, done: int) -> None: ...

    def advance(self, path: str, n: int) -> None: ...

    def finish(self, path: str) -> None: ...

    def note(self, text: str) -> None: ...


def write_random(path: Path, size: int) -> str:
    """Random bytes to `path`; returns their sha256."""
    h = hashlib.sha256()
    block = os.urandom(1 << 20)
    with path.open("wb") as f:
        left = size
        while left:
            n = min(left, len(block))
            # vary each block cheaply so the file does not compress or dedupe trivially
            chunk = block[:n] if left % 3 else block[n - 1 :: -1][:n]
            f.write(chunk)
            h.update(chunk)
            left -= n
    return h.hexdigest()


def time_wizardchat(repo: str, quant: str, cache: Path) -> float:
    from wizardchat.hub import download as hub
    from wizardchat.hub.catalog import ModelRef

    os.environ["HF_HUB_CACHE"] = str(cache)
    start = time.perf_counter()
    model = hub.list_remote(ModelRef(repo, quant))
    path = hub.pull(model, model.quants[quant], Quiet(), workers=4, cancel=threading.Event())
    seconds = time.perf_counter() - start
    assert path.is_file()
    return seconds


def time_hf(repo: str, filename: str, cache: Path, url: str) -> float:
    from huggingface_hub import hf_hub_download

    start = time.perf_counter()
    path = hf_hub_download(repo, filename, cache_dir=str(cache), endpoint=url)
    seconds = time.perf_counter() - start
    assert Path(path).is_file()
    return seconds


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="fewer, smaller runs (~20 s)")
    parser.add_argument("--mb", type=int, default=0, help="total megabytes per model")
    parser.add_argument("--json", type=Path, help="write the results here too")
    args = parser.parse_args()
    total_mb = args.mb or (128 if args.quick else 512)
    pairs = 3 if args.quick else 5
    total = total_mb * 1_000_000
    shard = total // 4

    with tempfile.TemporaryDirectory(prefix="wizardchat-dl-") as tmp:
        work = Path(tmp)
        os.environ.update(hub_env("http://127.0.0.1:1", work / "hf"))  # replaced below
        for key in ("HF_TOKEN", "HUGGING_FACE_HUB_TOKEN", "HF_HUB_OFFLINE"):
            os.environ.pop(key, None)
        print(f"writing {total_mb} MB as one file and as 4 shards...", file=sys.stderr)
        single_name = "WizardLM-2-8x22B.Q4_K_M.gguf"
        single_sha = write_random(work / "single.bin", total)
        shard_files = {}
        for i in range(4):
            name = f"WizardLM-2-8x22B.Q4_K_M-{i + 1:05d}-of-00004.gguf"
            sha = write_random(work / f"shard{i}.bin", shard)
            shard_files[name] = FakeFile(path_on_disk=work / f"shard{i}.bin", sha256=sha)
        with FakeHub() as server:
            os.environ.update(hub_env(server.url, work / "hf"))
            server.add_repo(
                SINGLE, {single_name: FakeFile(path_on_disk=work / "single.bin", sha256=single_sha)}
            )
            server.add_repo(SHARDED, shard_files)
            results: dict[str, Any] = {"total_bytes": total, "pairs": pairs}
            ratios, ours, theirs = [], [], []
            run = 0
            # one warm-up of each, not counted
            time_wizardchat(SINGLE, "Q4_K_M", work / f"c{run}")
            time_hf(SINGLE, single_name, work / f"c{run}h", server.url)
            for i in range(pairs):
                run += 1
                order = ("w", "h") if i % 2 == 0 else ("h", "w")
                t: dict[str, float] = {}
                for who in order:
                    cache = work / f"c{run}{who}"
                    if who == "w":
                        t[who] = time_wizardchat(SINGLE, "Q4_K_M", cache)
                    else:
                        t[who] = time_hf(SINGLE, single_name, cache, server.url)
                    _remove(cache)
                ours.append(total / t["w"] / 1e6)
                theirs.append(total / t["h"] / 1e6)
                ratios.append(t["h"] / t["w"])
            results["throughput"] = {
                "wizardchat_mb_s": ours,
                "hf_hub_download_mb_s": theirs,
                "ratio_median": statistics.median(ratios),
            }
            single_t, sharded_t = [], []
            for _ in range(pairs):
                run += 1
                single_t.append(time_wizardchat(SINGLE, "Q4_K_M", work / f"s{run}"))
                _remove(work / f"s{run}")
                sharded_t.append(time_wizardchat(SHARDED, "Q4_K_M", work / f"m{run}"))
                _remove(work / f"m{run}")
            results["sharding"] = {
                "single_s": single_t,
                "four_shards_s": sharded_t,
                "ratio_median": statistics.median(sharded_t) / statistics.median(single_t),
            }
    report(results, total_mb)
    if args.json:
        args.json.write_text(json.dumps(results, indent=1) + "\n", encoding="utf-8")


def _remove(path: Path) -> None:
    import shutil

    shutil.rmtree(path, ignore_errors=True)


def report(r: dict[str, Any], total_mb: int) -> None:
    tp, sh = r["throughput"], r["sharding"]
    ratio = tp["ratio_median"]
    print(f"model     {total_mb} MB of random bytes, loopback hub (tests/hub_server.py), 4 workers")
    print(
        f"single    wizardchat {statistics.median(tp['wizardchat_mb_s']):.0f} MB/s, "
        f"hf_hub_download {statistics.median(tp['hf_hub_download_mb_s']):.0f} MB/s "
        f"(medians of {r['pairs']} alternating pairs; wizardchat also hashes)"
    )
    print(
        f"sharded   4 shards {statistics.median(sh['four_shards_s']):.2f} s, one file "
        f"{statistics.median(sh['single_s']):.2f} s"
    )
    print()
    print(f"{'metric':<44}{'measured':>10}  {'goal':<10}")
    verdict = "PASS" if ratio >= 0.95 else "MISS"
    print(
        f"{'throughput, wizardchat / hf_hub_download':<44}{ratio:>10.3f}  {'>= 0.95':<10}{verdict}"
    )
    print(
        f"{'time, 4 shards / 1 file, same bytes':<44}{sh['ratio_median']:>10.3f}  (lower is better)"
    )


if __name__ == "__main__":
    main()
