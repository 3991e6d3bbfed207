"""Loading real GGUFs: expert placement from llama.cpp's own log, shards, bad files."""

from __future__ import annotations

import io
import re
from pathlib import Path

import pytest
from conftest import run_cli
from gguf_models import SCRIPT_REPLY, write_model

from wizardchat.engine.model import check_binding_layout
from wizardchat.errors import ExitCode, UsageError
from wizardchat.plan.placement import plan_overrides

OVERRIDDEN = re.compile(r"tensor (blk\.\d+\.ffn_\w+_exps)\.weight .*buffer type overridden to CPU")
EXPERT_TENSORS = {f"blk.{i}.ffn_{k}_exps" for i in (0, 1) for k in ("gate", "up", "down")}


def _overridden(log: str) -> set[str]:
    return set(OVERRIDDEN.findall(log))


def test_binding_layout_is_the_one_wizardchat_fills() -> None:
    check_binding_layout()


def test_n_cpu_moe_1_keeps_block_0_experts_in_ram_and_not_block_1(models, engine_factory) -> None:
    log = io.StringIO()
    engine_factory(models.scripted, log=log, n_cpu_moe=1)
    assert _overridden(log.getvalue()) == {f"blk.0.ffn_{k}_exps" for k in ("gate", "up", "down")}


def test_cpu_moe_keeps_every_expert_tensor_in_ram(models, engine_factory) -> None:
    log = io.StringIO()
    engine_factory(models.scripted, log=log, cpu_moe=True)
    assert _overridden(log.getvalue()) == EXPERT_TENSORS


def test_override_tensor_flag_uses_llama_cpp_syntax(models, engine_factory) -> None:
    log = io.StringIO()
    engine_factory(models.scripted, log=log, override_tensor=("blk\\.1\\.ffn_up_exps=CPU",))
    assert _overridden(log.getvalue()) == {"blk.1.ffn_up_exps"}


def test_no_overrides_by_default(models, engine_factory) -> None:
    log = io.StringIO()
    engine_factory(models.scripted, log=log)
    assert _overridden(log.getvalue()) == set()


@pytest.mark.parametrize(
    ("value", "message"),
    [("exps[=CPU", "invalid regex"), ("(?P<x>exps)=CPU", "no \\(\\?"), ("exps", "REGEX=BUFFER")],
)
def test_bad_override_regex_is_a_usage_error(value: str, message: str) -> None:
    with pytest.raises(UsageError, match=message):
        plan_overrides([value], cpu_moe=False, n_cpu_moe=0)


def test_unknown_buffer_type_names_the_available_ones(models) -> None:
    r = run_cli("ask", "Hi", "-m", str(models.scripted), "-ot", "exps=CUDA7")
    assert r.code == ExitCode.USAGE
    assert r.stderr.strip().splitlines() == [
        "wizardchat: error: unknown buffer type 'CUDA7' in exps=CUDA7; available here: CPU"
    ]


def test_placement_is_in_the_log_file_of_a_cli_run(models, isolated_home: Path) -> None:
    r = run_cli("ask", "Hi", "-m", str(models.scripted), "--n-cpu-moe", "1")
    assert r.code == 0 and r.stdout == SCRIPT_REPLY + "\n"
    log = (isolated_home / "logs" / "llama.log").read_text()
    assert _overridden(log) == {f"blk.0.ffn_{k}_exps" for k in ("gate", "up", "down")}


def test_split_model_loads_from_its_first_shard(models) -> None:
    assert models.split.name.endswith("-00001-of-00003.gguf")
    r = run_cli("ask", "Hi", "-m", str(models.split))
    assert (r.code, r.stdout) == (0, SCRIPT_REPLY + "\n")


def _one_error_line(r, code: int, *fragments: str) -> None:  # type: ignore[no-untyped-def]
    assert r.code == code, r.stderr
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("wizardchat: error: "), r.stderr
    for fragment in fragments:
        assert fragment in lines[0]
    assert r.stdout == ""


def test_missing_model_file(tmp_path: Path) -> None:
    r = run_cli("ask", "Hi", "-m", str(tmp_path / "nope.gguf"))
    _one_error_line(r, ExitCode.NO_MODEL, "not found", "nope.gguf")


def test_no_model_configured_means_wizardlm2_8x22b_and_says_how_to_get_it() -> None:
    r = run_cli("ask", "Hi")  # offline (conftest) with an empty hub cache
    _one_error_line(r, ExitCode.NO_MODEL, "wizardlm2-8x22b", "--model")


def test_not_a_gguf(tmp_path: Path) -> None:
    bad = tmp_path / "model.gguf"
    bad.write_bytes(b"<html>not found</html>" * 10)
    _one_error_line(run_cli("ask", "Hi", "-m", str(bad)), ExitCode.BAD_MODEL, "not a GGUF")


def test_git_lfs_pointer(tmp_path: Path) -> None:
    ptr = tmp_path / "model.gguf"
    ptr.write_text("version https://git-lfs.github.com/spec/v1\noid sha256:abc\nsize 85000000000\n")
    _one_error_line(run_cli("ask", "Hi", "-m", str(ptr)), ExitCode.BAD_MODEL, "git-lfs pointer")


def test_truncated_file(models, tmp_path: Path) -> None:
    cut = tmp_path / "cut.gguf"
    data = models.scripted.read_bytes()
    cut.write_bytes(data[: len(data) - 1000])
    _one_error_line(run_cli("ask", "Hi", "-m", str(cut)), ExitCode.BAD_MODEL, "truncated")
    header_only = tmp_path / "header.gguf"
    header_only.write_bytes(data[:5000])
    _one_error_line(run_cli("ask", "Hi", "-m", str(header_only)), ExitCode.BAD_MODEL, "truncated")


def test_missing_shard(models, tmp_path: Path) -> None:
    for shard in models.split.parent.glob("*.gguf"):
        if "-00002-" not in shard.name:
            (tmp_path / shard.name).write_bytes(shard.read_bytes())
    first = tmp_path / models.split.name
    r = run_cli("ask", "Hi", "-m", str(first))
    _one_error_line(r, ExitCode.BAD_MODEL, "1 of 3 shards missing", "-00002-of-00003.gguf")


def test_second_shard_given_instead_of_first(models) -> None:
    second = models.split.with_name(models.split.name.replace("00001-of", "00002-of"))
    r = run_cli("ask", "Hi", "-m", str(second))
    _one_error_line(r, ExitCode.BAD_MODEL, "pass the first shard", "-00001-of-00003.gguf")


def test_unsupported_architecture(tmp_path: Path) -> None:
    import gguf

    path = tmp_path / "other.gguf"
    w = gguf.GGUFWriter(str(path), "mamba")
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    _one_error_line(run_cli("ask", "Hi", "-m", str(path)), ExitCode.BAD_MODEL, "'mamba'")


def test_kv_cache_quantized_v_forces_flash_attention(tmp_path: Path) -> None:
    # q8_0 blocks are 32 wide, so this model has 32-wide attention heads.
    model = write_model(tmp_path / "heads32.gguf", n_head=2, n_head_kv=1)
    r = run_cli("ask", "Hi", "-m", str(model), "-ctv", "q8_0", "-ctk", "q8_0", "-fa", "off")
    assert (r.code, r.stdout) == (0, SCRIPT_REPLY + "\n")
    assert "flash attention turned on" in r.stderr


def test_llama_cpp_refusal_is_one_line_with_its_reason(models) -> None:
    r = run_cli("ask", "Hi", "-m", str(models.scripted), "-ctk", "q8_0")
    _one_error_line(r, ExitCode.LOAD_FAILED, "does not divide n_embd_head_k=16", "llama.log")


def test_default_context_is_the_models_not_512(models, engine_factory, tmp_path: Path) -> None:
    big = write_model(tmp_path / "ctx.gguf", n_ctx_train=6144)
    engine = engine_factory(big, ctx_size=0)
    assert engine.n_ctx == 6144


def test_cancel_aborts_a_prompt_evaluation_and_the_cache_stays_consistent(
    models, engine_factory
) -> None:
    import threading

    engine = engine_factory(models.slow, ctx_size=8192)
    prompt = [engine.bos, *engine.tokenize("word " * 2000)]  # 4000 tokens: two 2048 batches
    cancelled = threading.Event()
    cancelled.set()  # Ctrl-C arrived before llama.cpp even started
    stream = engine.stream(prompt, 5, cancelled, abort_prompt=True)
    assert list(stream) == []
    assert stream.stats.finish == "interrupted"
    kept = engine.llm.n_tokens
    assert kept < len(prompt)  # stopped inside the prompt, not after it

    # The next reply evaluates exactly what the cache lacks, and works.
    fresh = engine.stream(prompt, 3, threading.Event(), abort_prompt=True)
    assert len(list(fresh)) == 3 and fresh.stats.finish == "length"
    assert fresh.stats.evaluated_tokens == len(prompt) - kept

    # Without abort_prompt the flag only stops generation: the prompt is evaluated whole.
    other = [engine.bos, *engine.tokenize("other " * 1500)]
    stream = engine.stream(other, 5, cancelled, abort_prompt=False)
    assert len(list(stream)) == 1 and engine.llm.n_tokens == len(other)


# --- llama.cpp's log never stops the chat ------------------------------------------------------


def _warned_once(stderr: str) -> str:
    lines = stderr.splitlines()
    assert len(lines) == 1, stderr
    assert lines[0].startswith("wizardchat: warning: llama.cpp log unavailable: ")
    assert lines[0].endswith("; continuing without it")
    return lines[0]


def test_a_full_disk_under_the_log_warns_once_and_the_chat_goes_on(
    models, isolated_home: Path
) -> None:
    (isolated_home / "logs").mkdir(parents=True)
    (isolated_home / "logs" / "llama.log").symlink_to("/dev/full")
    r = run_cli("ask", "Hi", "-m", str(models.scripted))
    assert (r.code, r.stdout) == (0, SCRIPT_REPLY + "\n"), r.stderr[-2000:]
    assert "No space left on device" in _warned_once(r.stderr)


def test_a_log_write_failing_in_the_middle_of_the_load_warns_once_on_the_terminal(
    models, isolated_home: Path
) -> None:
    import os
    import resource
    import subprocess

    from conftest import WIZARDCHAT

    def small_files() -> None:  # writes past 4 KB fail with EFBIG (Python ignores SIGXFSZ)
        resource.setrlimit(resource.RLIMIT_FSIZE, (4096, 4096))

    proc = subprocess.run(
        [WIZARDCHAT, "ask", "Hi", "-m", str(models.scripted)],
        stdin=subprocess.DEVNULL,
        capture_output=True,
        text=True,
        timeout=120,
        env=os.environ.copy(),
        preexec_fn=small_files,
    )
    assert (proc.returncode, proc.stdout) == (0, SCRIPT_REPLY + "\n"), proc.stderr[-2000:]
    assert "File too large" in _warned_once(proc.stderr)
    assert (isolated_home / "logs" / "llama.log").stat().st_size <= 4096


def test_a_log_directory_that_cannot_be_made_warns_once_and_the_chat_goes_on(
    models, isolated_home: Path
) -> None:
    isolated_home.mkdir(parents=True)
    (isolated_home / "logs").write_text("a file where the log directory should be")
    r = run_cli("ask", "Hi", "-m", str(models.scripted))
    assert (r.code, r.stdout) == (0, SCRIPT_REPLY + "\n"), r.stderr[-2000:]
    _warned_once(r.stderr)


def test_without_a_log_a_load_error_points_at_verbose(models, isolated_home: Path) -> None:
    isolated_home.mkdir(parents=True)
    (isolated_home / "logs").write_text("not a directory")
    r = run_cli("ask", "Hi", "-m", str(models.scripted), "-ctk", "q8_0")
    assert r.code == ExitCode.LOAD_FAILED
    warning, error = r.stderr.splitlines()
    _warned_once(warning)
    assert error.startswith("wizardchat: error: llama.cpp could not load")
    assert error.endswith("(details: --verbose shows llama.cpp's log)")


def test_a_log_over_10_mb_is_rotated_keeping_one_old_log(models, isolated_home: Path) -> None:
    from wizardchat.engine.llama_log import LOG_ROTATE_BYTES

    logs = isolated_home / "logs"
    logs.mkdir(parents=True)
    (logs / "llama.log.1").write_text("the oldest log\n")
    with (logs / "llama.log").open("w") as f:
        f.write("the old log\n")
        f.truncate(LOG_ROTATE_BYTES + 1)
    r = run_cli("ask", "Hi", "-m", str(models.scripted))
    assert (r.code, r.stderr) == (0, "")
    old = logs / "llama.log.1"
    assert old.stat().st_size == LOG_ROTATE_BYTES + 1
    assert old.read_text()[:12] == "the old log\n"
    new = (logs / "llama.log").read_text()
    assert new.startswith("\n=== wizardchat ") and "llama_model_loader" in new
    assert sorted(p.name for p in logs.iterdir()) == ["llama.log", "llama.log.1"]


# --- Ctrl-C while llama.cpp logs --------------------------------------------------------------


class _CtrlCAt(io.StringIO):
    """A log that raises KeyboardInterrupt (as Python's SIGINT handler would) at a given line."""

    def __init__(self, marker: str) -> None:
        super().__init__()
        self.marker = marker
        self.fired = False

    def write(self, text: str) -> int:
        if not self.fired and self.marker in text:
            self.fired = True
            raise KeyboardInterrupt
        return super().write(text)


@pytest.mark.parametrize(
    "marker",
    [
        "llama_model_loader: - kv",  # while the header is read: the progress hook stops it
        "llama_context: constructing",  # after the last progress call: the context phase
    ],
)
def test_ctrl_c_landing_in_the_log_callback_stops_the_load(
    marker: str, models, engine_factory
) -> None:
    log = _CtrlCAt(marker)
    with pytest.raises(KeyboardInterrupt):
        engine_factory(models.scripted, log=log)
    assert log.fired
    engine = engine_factory(models.scripted)  # the next load is not interrupted
    assert engine.n_ctx == 1024


def test_ctrl_c_at_any_moment_of_ask_ends_with_130_and_no_traceback(models) -> None:
    import os
    import signal
    import subprocess
    import time

    from conftest import WIZARDCHAT

    codes = []
    for delay in (0.3, 0.6, 0.9, 1.2, 1.5, 2.0):
        proc = subprocess.Popen(
            [WIZARDCHAT, "ask", "-m", str(models.slow), "-n", "2000", "-c", "4096", "Hi"],
            stdin=subprocess.DEVNULL,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.PIPE,
            text=True,
            env=os.environ.copy(),
        )
        time.sleep(delay)
        proc.send_signal(signal.SIGINT)
        _, stderr = proc.communicate(timeout=60)
        codes.append(proc.returncode)
        assert proc.returncode in (0, ExitCode.INTERRUPTED), (delay, stderr[-2000:])
        assert "Traceback" not in stderr and "Exception ignored" not in stderr, stderr[-2000:]
    assert ExitCode.INTERRUPTED in codes


# --- progress while a prompt is evaluated -------------------------------------------------------


class ProgressLog:
    """Records what the engine reports while it evaluates a prompt."""

    def __init__(self) -> None:
        self.events: list[tuple[int, int] | str] = []

    def update(self, done: int, total: int) -> None:
        self.events.append((done, total))

    def end(self) -> None:
        self.events.append("end")


def test_prompt_progress_after_each_batch_and_none_while_decoding(models, engine_factory) -> None:
    import threading

    engine = engine_factory(models.slow, ctx_size=4096, batch_size=256)
    prompt = [engine.bos, *engine.tokenize("word " * 500)]
    n = len(prompt)
    log = ProgressLog()
    got = []
    for token, _ in engine.stream(prompt, 20, threading.Event(), progress=log):
        got.append(token)
        assert log.events[-1] == "end"  # the progress is over before the first token shows
    assert len(got) == 20
    steps = [*range(0, n, 256), n]
    assert log.events == [*((done, n) for done in steps), "end"]  # nothing per generated token

    # A reply whose prompt the cache holds but for its last turn reports only that part.
    log = ProgressLog()
    more = [*prompt, *got, *engine.tokenize(" word word word")]
    stream = engine.stream(more, 2, threading.Event(), progress=log)
    list(stream)
    evaluated = stream.stats.evaluated_tokens
    assert 0 < evaluated < 30
    assert log.events == [(0, evaluated), (evaluated, evaluated), "end"]


def test_prompt_progress_ends_when_the_prompt_is_aborted(models, engine_factory) -> None:
    import threading

    engine = engine_factory(models.slow, ctx_size=4096, batch_size=256)
    prompt = [engine.bos, *engine.tokenize("word " * 1000)]
    cancelled = threading.Event()
    cancelled.set()
    log = ProgressLog()
    stream = engine.stream(prompt, 5, cancelled, abort_prompt=True, progress=log)
    assert list(stream) == [] and stream.stats.finish == "interrupted"
    assert log.events[0] == (0, len(prompt)) and log.events[-1] == "end"
