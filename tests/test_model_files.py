"""Model files with bad header values: each ends with one line and exit 4 before llama.cpp sees
it (llama.cpp aborts the process on several of them), and a good file with a broken chat template
still loads."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
from conftest import Models, run_cli
from gguf_models import SCRIPT_REPLY, write_model

from wizardchat.errors import BadModelError, ExitCode
from wizardchat.gguf_file import inspect_model

Patch = Callable[[Any], None]  # edits a gguf.GGUFReader opened read-write


def patched(source: Path, target: Path, patch: Patch) -> Path:
    """Copy `source` to `target` and edit the copy in place through gguf-py's reader."""
    from gguf import GGUFReader

    shutil.copyfile(source, target)
    reader = GGUFReader(target, "r+")
    patch(reader)
    reader.data.flush()
    del reader
    return target


def set_value(key: str, value: int) -> Patch:
    """Overwrite a scalar metadata value (same type, so the layout stays)."""

    def patch(reader: Any) -> None:
        field = reader.fields[key]
        field.parts[field.data[0]][0] = value

    return patch


def set_array_count(key: str, count: int) -> Patch:
    def patch(reader: Any) -> None:
        reader.fields[key].parts[4][0] = count  # [key len, key, type, item type, count, ...]

    return patch


def set_token(index: int, text: str) -> Patch:
    """Overwrite the text of one vocabulary token with text of the same length."""
    import numpy as np

    def patch(reader: Any) -> None:
        field = reader.fields["tokenizer.ggml.tokens"]
        part = field.parts[field.data[index]]
        assert len(part) == len(text.encode())
        part[:] = np.frombuffer(text.encode(), dtype=np.uint8)

    return patch


def set_token_type(index: int, value: int) -> Patch:
    def patch(reader: Any) -> None:
        field = reader.fields["tokenizer.ggml.token_type"]
        field.parts[field.data[index]][0] = value

    return patch


def set_tensor_type(name: str, ggml_type: int) -> Patch:
    def patch(reader: Any) -> None:
        (tensor,) = [t for t in reader.tensors if t.name == name]
        tensor.field.parts[4][0] = ggml_type  # [name len, name, n_dims, dims, type, offset]

    return patch


BAD_VALUES: dict[str, tuple[Patch, str]] = {
    "block_count 0": (set_value("llama.block_count", 0), "llama.block_count is 0"),
    "block_count 100000": (set_value("llama.block_count", 100000), "block_count is 100000"),
    "expert_count 0": (set_value("llama.expert_count", 0), "expert_count is 0"),
    "expert_used_count 9 of 8": (
        set_value("llama.expert_used_count", 9),
        "expert_used_count is 9 (expected 1-8",
    ),
    "context_length 2^32-1": (
        set_value("llama.context_length", 2**32 - 1),
        "llama.context_length is 4294967295",
    ),
    "string array count 2^40": (
        set_array_count("tokenizer.ggml.tokens", 2**40),
        "array tokenizer.ggml.tokens claims 1,099,511,627,776 items",
    ),
    "number array count 2^62": (
        set_array_count("tokenizer.ggml.scores", 2**62),
        "array tokenizer.ggml.scores claims 4,611,686,018,427,387,904 items",
    ),
    "a token twice": (set_token(4, "<0x00>"), "lists a token twice"),
    "token type 99": (set_token_type(7, 99), "tokenizer.ggml.token_type has type 99"),
    "bos past the vocabulary": (
        set_value("tokenizer.ggml.bos_token_id", 99999),
        "tokenizer.ggml.bos_token_id is 99999",
    ),
    "tensor type 99": (
        set_tensor_type("output_norm.weight", 99),
        "tensor output_norm.weight has unknown type 99",
    ),
    "head_count 3 of embedding 64": (
        set_value("llama.attention.head_count", 3),
        "embedding_length 64 is not a multiple of head_count 3",
    ),
}


@pytest.mark.parametrize("case", list(BAD_VALUES))
def test_bad_header_value_is_one_line_and_exit_4(case: str, models: Models, tmp_path: Path) -> None:
    patch, fragment = BAD_VALUES[case]
    bad = patched(models.scripted, tmp_path / "bad.gguf", patch)
    with pytest.raises(BadModelError) as caught:
        inspect_model(bad)
    assert "corrupt header: " in str(caught.value) and fragment in str(caught.value)
    r = run_cli("ask", "Hi", "-m", str(bad), timeout=60)
    assert r.code == ExitCode.BAD_MODEL, r.stderr[-2000:]
    assert r.stdout == ""
    assert r.stderr.splitlines() == [f"wizardchat: error: {caught.value}"]


def test_the_generated_models_pass_the_checks(models: Models) -> None:
    for path in (models.scripted, models.random, models.slow, models.split):
        inspect_model(path)


def test_a_vocabulary_only_file_says_so_not_truncated(tmp_path: Path) -> None:
    vocab = write_model(tmp_path / "vocab.gguf", vocab_only=True)
    r = run_cli("ask", "Hi", "-m", str(vocab), timeout=60)
    assert r.code == ExitCode.BAD_MODEL
    assert r.stderr.splitlines() == [
        f"wizardchat: error: {vocab} has no weights (vocabulary only): it is not a model; "
        "pass the model's .gguf"
    ]


def test_a_broken_chat_template_does_not_stop_the_load(tmp_path: Path) -> None:
    model = write_model(tmp_path / "template.gguf", chat_template="{% if %}")
    r = run_cli("ask", "Hi", "-m", str(model), timeout=60)
    assert (r.code, r.stdout) == (0, SCRIPT_REPLY + "\n"), r.stderr[-2000:]


ABORT = """
import ctypes, sys
from wizardchat.engine import llama_log
import llama_cpp.llama_cpp as bindings
llama_log.install_abort_handler()
dev_get = bindings._lib["ggml_backend_dev_get"]
dev_get.argtypes, dev_get.restype = [ctypes.c_size_t], ctypes.c_void_p
print("before", flush=True)
dev_get(123456)  # GGML_ASSERT(index < ggml_backend_dev_count())
print("after", flush=True)
"""


def test_a_ggml_abort_is_one_line_and_exit_5_not_a_signal_and_backtrace() -> None:
    env = {k: v for k, v in os.environ.items() if k != "GGML_NO_BACKTRACE"}
    proc = subprocess.run(
        [sys.executable, "-c", ABORT], capture_output=True, text=True, timeout=60, env=env
    )
    assert proc.returncode == ExitCode.LOAD_FAILED, (proc.returncode, proc.stderr[-2000:])
    assert proc.stdout == "before\n"  # no gdb output, nothing after the abort
    (line,) = proc.stderr.splitlines()
    assert line.startswith("wizardchat: error: llama.cpp stopped on an internal error: ")
    assert "GGML_ASSERT" in line


def test_a_ggml_abort_mid_reply_gives_the_terminal_its_echo_back() -> None:
    import pty
    import termios

    # The REPL turns the terminal's echo off while a reply streams; an abort ends the process
    # without unwinding, and must not leave the user's shell without echo.
    script = ABORT.replace(
        'print("before", flush=True)',
        "from wizardchat.tui.repl import keyboard_echo_off\n"
        "ctx = keyboard_echo_off(sys.stdin); ctx.__enter__()\n"
        'print("before", flush=True)',
    )
    master, slave = pty.openpty()
    try:
        assert termios.tcgetattr(slave)[3] & termios.ECHO
        proc = subprocess.run(
            [sys.executable, "-c", script], stdin=slave, capture_output=True, text=True, timeout=60
        )
        assert proc.returncode == ExitCode.LOAD_FAILED, proc.stderr[-2000:]
        assert proc.stdout == "before\n"
        assert termios.tcgetattr(slave)[3] & termios.ECHO, "echo left off"
    finally:
        os.close(master)
        os.close(slave)


def test_the_engine_turns_ggml_backtraces_off_unless_the_user_chose() -> None:
    code = "import os, wizardchat.engine; print(os.environ.get('GGML_NO_BACKTRACE'))"
    env = {k: v for k, v in os.environ.items() if k != "GGML_NO_BACKTRACE"}
    run = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=30
    )
    assert run.stdout == "1\n"
    env["GGML_NO_BACKTRACE"] = "mine"
    run = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=30
    )
    assert run.stdout == "mine\n"


def test_names_from_the_file_reach_the_terminal_escaped(models: Models, tmp_path: Path) -> None:
    def rename_architecture(reader: Any) -> None:
        import numpy as np

        field = reader.fields["general.architecture"]
        part = field.parts[field.data[0]]
        part[:] = np.frombuffer(b"\x1b[2J\x07", dtype=np.uint8)  # clear screen, bell

    bad = patched(models.scripted, tmp_path / "escape.gguf", rename_architecture)
    r = run_cli("ask", "Hi", "-m", str(bad), timeout=60)
    assert r.code == ExitCode.BAD_MODEL
    assert "\x1b" not in r.stderr and "\x07" not in r.stderr
    assert "architecture '\\x1b[2J\\x07'" in r.stderr
