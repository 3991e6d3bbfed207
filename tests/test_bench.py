"""`wizardchat bench`: the tests it times on a real (tiny) model, its table, and llama-bench."""

from __future__ import annotations

import json
import os
import stat
import sys
from pathlib import Path

import llama_cpp
import pytest

from wizardchat.diagnose import bench, llama_bench
from wizardchat.diagnose.bench import BenchResult, Measurement
from wizardchat.engine.decoder import decoder_for
from wizardchat.engine.model import LoadPlan
from wizardchat.plan.placement import Override, expert_overrides


class EvalSpy:
    """Wraps the model's decoder: per call, the positions the record says are cached, the
    tokens given and the KV cache's highest position (-1: empty) just before it."""

    def __init__(self, llm) -> None:  # type: ignore[no-untyped-def]
        self.llm = llm
        decoder = decoder_for(llm)
        real_evaluate, real_step = decoder.evaluate, decoder.step
        self.calls: list[tuple[int, int, int]] = []

        def evaluate(tokens, progress=None) -> None:  # type: ignore[no-untyped-def]
            self.calls.append((self.llm.n_tokens, len(tokens), self.kv_max()))
            real_evaluate(tokens, progress)

        def step(token) -> None:  # type: ignore[no-untyped-def]
            self.calls.append((self.llm.n_tokens, 1, self.kv_max()))
            real_step(token)

        decoder.evaluate, decoder.step = evaluate, step  # type: ignore[method-assign]

    def kv_max(self) -> int:
        mem = llama_cpp.llama_get_memory(self.llm.ctx)
        return int(llama_cpp.llama_memory_seq_pos_max(mem, 0))


def test_run_bench_times_each_test_from_the_cache_state_it_names(models, engine_factory) -> None:
    engine = engine_factory(models.random, ctx_size=4096)
    spy = EvalSpy(engine.llm)
    before = engine.llm.evaluated_tokens
    said: list[str] = []
    result = bench.run_bench(engine, reps=2, bound_tps=1e6, progress=said.append)

    depth = 4096 - 2048 - 128
    assert result.depth == depth
    assert [m.test for m in result.measurements] == [
        "pp512",
        "pp2048",
        "tg128",
        f"tg128 @ d{depth}",
    ]
    assert [m.tokens for m in result.measurements] == [512, 2048, 128, 128]
    for m in result.measurements:
        assert len(m.seconds) == 2
        assert all(s > 0 for s in m.seconds)
        assert m.median_tps > 0
    assert result.notes == []
    assert any("pp2048" in line for line in said)

    # Every run: warm-up + 2 timed. pp and depth-0 tg start from an empty cache; the deep tg
    # runs start with exactly `depth` positions, filled once.
    runs = 3
    prompts = [(n, k) for n, k, kv in spy.calls if k > 1]
    assert prompts == [(0, 512)] * runs + [(0, 2048)] * runs + [(0, depth)]
    assert all(kv == -1 for n, _, kv in spy.calls if n == 0)
    singles = [(n, kv) for n, k, kv in spy.calls if k == 1]
    assert len(singles) == 2 * runs * 128
    shallow, deep = singles[: runs * 128], singles[runs * 128 :]
    assert [n for n, _ in shallow] == list(range(128)) * runs
    assert [n for n, _ in deep] == list(range(depth, depth + 128)) * runs
    assert all(kv == n - 1 for n, kv in singles)
    assert engine.llm.evaluated_tokens - before == runs * (512 + 2048 + 128 + 128) + depth

    assert engine.llm.n_tokens == 0 and spy.kv_max() == -1  # left empty

    fraction = result.fraction_of_bound(result.measurements[2])
    assert fraction == pytest.approx(result.measurements[2].median_tps / 1e6)
    assert result.fraction_of_bound(result.measurements[0]) is None
    data = json.loads(json.dumps(result.to_json()))
    assert data["model"] == "random.gguf"
    assert data["plan"]["n_ctx"] == 4096 and data["plan"]["overrides"] == []
    assert data["depth"] == depth
    assert [t["test"] for t in data["tests"]] == [m.test for m in result.measurements]
    assert data["tests"][0]["fraction_of_bound"] is None
    assert data["tests"][2]["fraction_of_bound"] > 0


def test_run_bench_skips_tests_the_context_cannot_hold(models, engine_factory) -> None:
    engine = engine_factory(models.random, ctx_size=1024)
    said: list[str] = []
    result = bench.run_bench(engine, reps=1, progress=said.append)
    assert [m.test for m in result.measurements] == ["pp512", "tg128"]
    assert result.depth == 0
    assert len(result.notes) == 2
    assert any("pp2048 skipped" in n and "1024" in n for n in result.notes)
    assert any("depth skipped" in n and "1024" in n for n in result.notes)
    assert all(n in said for n in result.notes)

    # An explicit depth that fits is run; one that does not is skipped with a note.
    spy = EvalSpy(engine.llm)
    result = bench.run_bench(engine, reps=1, depth=512, pp_sizes=(), tg_tokens=16)
    assert [m.test for m in result.measurements] == ["tg16", "tg16 @ d512"]
    assert result.depth == 512 and result.notes == []
    assert [n for n, k, _ in spy.calls if k == 1][-16:] == list(range(512, 528))
    result = bench.run_bench(engine, reps=1, depth=1000, pp_sizes=(), tg_tokens=32)
    assert [m.test for m in result.measurements] == ["tg32"]
    assert result.depth == 0
    assert result.notes == [
        "tg32 @ d1000 skipped: 1000 + 32 tokens do not fit the context (1024 tokens)"
    ]


def test_auto_depth() -> None:
    assert bench.auto_depth(1024) == 0
    assert bench.auto_depth(2048 + 128 + 511) == 0
    assert bench.auto_depth(2048 + 128 + 512) == 512
    assert bench.auto_depth(4096) == 1920
    assert bench.auto_depth(65536) == 4096


def _result(bound: float | None) -> BenchResult:
    return BenchResult(
        model="m.gguf",
        plan={},
        measurements=[
            Measurement("pp512", 512, [1.0, 0.5, 2.0]),  # 512, 1024, 256 tok/s: median 512
            Measurement("tg128", 128, [4.0, 2.0]),  # 32, 64 tok/s: median 48
            Measurement("tg128 @ d4096", 128, [8.0], depth=4096),
        ],
        bound_tps=bound,
        depth=4096,
    )


def test_format_table_plain() -> None:
    assert bench.format_table(_result(None)) == [
        ("test", "tok/s", "runs"),
        ("pp512", "512.00", "3"),
        ("tg128", "48.00", "2"),
        ("tg128 @ d4096", "16.00", "1"),
    ]


def test_format_table_with_bound_and_llama_bench() -> None:
    assert bench.format_table(_result(64.0)) == [
        ("test", "tok/s", "runs", "of ~64 tok/s bound"),
        ("pp512", "512.00", "3", ""),
        ("tg128", "48.00", "2", "75%"),
        ("tg128 @ d4096", "16.00", "1", "25%"),
    ]
    compare = {"pp512": 1024.0, "tg128": 40.0, "pp2048": 900.0}
    assert bench.format_table(_result(64.0), compare) == [
        ("test", "tok/s", "runs", "of ~64 tok/s bound", "llama-bench", "ratio"),
        ("pp512", "512.00", "3", "", "1024.00", "0.50"),
        ("tg128", "48.00", "2", "75%", "40.00", "1.20"),
        ("tg128 @ d4096", "16.00", "1", "25%", "-", "-"),
    ]
    assert bench.format_table(_result(None), {})[0] == (
        "test",
        "tok/s",
        "runs",
        "llama-bench",
        "ratio",
    )


# --- llama-bench ---------------------------------------------------------------------------------

# llama-bench's json_printer (tools/llama-bench/llama-bench.cpp): "[", then per test an object
# with test::get_fields() in order, then samples_ns and samples_ts; ",\n" between tests; "\n]".
FAKE_LLAMA_BENCH = r"""#!{python}
import json, os, sys

argv = sys.argv[1:]
with open({log!r}, "a") as f:
    f.write(json.dumps(argv) + "\n")
if os.environ.get("FAKE_FAIL"):
    print("error: invalid parameter for argument: -d", file=sys.stderr)
    sys.exit(1)

def values(flag, default):
    if flag not in argv:
        return [default]
    return [int(v) for v in argv[argv.index(flag) + 1].split(",")]

reps = values("-r", 5)[0]
tests = [(p, 0) for p in values("-p", 512) if p] + [(0, n) for n in values("-n", 128) if n]
depth = values("-d", 0)[0]
print("[")
for i, (n_prompt, n_gen) in enumerate(tests):
    base = n_prompt * 2.0 if n_prompt else (40.0 if depth else 50.0)
    ts = [base * f for f in (0.9, 1.0, 1.3, 1.0, 1.0)[:reps]]
    ns = [int(1e9 * (n_prompt + n_gen) / t) for t in ts]
    fields = {{
        "build_commit": "4f6d6bbf", "build_number": 7200, "cpu_info": "AMD EPYC",
        "gpu_info": "", "backends": "CPU", "model_filename": "m.gguf",
        "model_type": "llama 8x22B Q4_K - Medium", "model_size": 85592457216,
        "model_n_params": 140620634112, "n_batch": 2048, "n_ubatch": 512, "n_threads": 6,
        "cpu_mask": "0x0", "cpu_strict": False, "poll": 50, "type_k": "q8_0",
        "type_v": "q8_0", "n_gpu_layers": 999, "n_cpu_moe": 0, "split_mode": "layer",
        "main_gpu": 0, "no_kv_offload": False, "flash_attn": 1, "devices": "auto",
        "tensor_split": "0.00", "tensor_buft_overrides": "none", "load_mode": "mmap",
        "embeddings": False, "no_op_offload": 0, "no_host": False, "fit_target": 0,
        "fit_min_ctx": 0, "n_prompt": n_prompt, "n_gen": n_gen, "n_depth": depth,
        "test_time": "2026-01-01T00:00:00Z", "avg_ns": sum(ns) // len(ns), "stddev_ns": 1,
        "avg_ts": sum(ts) / len(ts), "stddev_ts": 0.5,
    }}
    if i:
        sys.stdout.write(",\n")
    sys.stdout.write("  {{\n")
    for k, v in fields.items():
        sys.stdout.write(f"    \"{{k}}\": {{json.dumps(v)}},\n")
    sys.stdout.write("    \"samples_ns\": [ " + ", ".join(map(str, ns)) + " ],\n")
    sys.stdout.write("    \"samples_ts\": [ " + ", ".join(f"{{t:g}}" for t in ts) + " ]\n")
    sys.stdout.write("  }}")
    sys.stdout.flush()
    if os.environ.get("FAKE_HANG"):
        import time
        time.sleep(60)
print("\n]")
"""


@pytest.fixture
def fake_llama_bench(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """A llama-bench on PATH that logs its argv (one JSON list a line) to the returned file."""
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    log = tmp_path / "argv.jsonl"
    script = bin_dir / "llama-bench"
    script.write_text(FAKE_LLAMA_BENCH.format(python=sys.executable, log=str(log)))
    script.chmod(script.stat().st_mode | stat.S_IXUSR)
    monkeypatch.setenv("PATH", f"{bin_dir}{os.pathsep}{os.environ.get('PATH', '')}")
    return log


def _plan(**changes: object) -> LoadPlan:
    values: dict[str, object] = {
        "path": Path("/models/wizard.gguf"),
        "n_ctx": 8192,
        "n_gpu_layers": -1,
        "threads": 6,
        "batch_size": 2048,
        "ubatch_size": 512,
        "flash_attn": True,
        "type_k": "q8_0",
        "type_v": "q8_0",
        "overrides": tuple(expert_overrides(False, 2)),
        "ctx_capped": False,
    }
    values.update(changes)
    return LoadPlan(**values)  # type: ignore[arg-type]


def _flag(argv: list[str], name: str) -> str:
    assert argv.count(name) == 1, (name, argv)
    return argv[argv.index(name) + 1]


def test_run_llama_bench_passes_the_plan_and_parses_its_json(fake_llama_bench: Path) -> None:
    binary = llama_bench.find_llama_bench()
    assert binary is not None and Path(binary).name == "llama-bench"
    model = Path("/elsewhere/wizard-00001-of-00003.gguf")
    said: list[str] = []
    got = llama_bench.run_llama_bench(
        binary, model, _plan(), reps=3, depth=4096, timeout=60, progress=said.append
    )
    # medians of the samples (not avg_ts), named as wizardchat names its tests
    assert got == {"pp512": 1024.0, "pp2048": 4096.0, "tg128": 50.0, "tg128 @ d4096": 40.0}

    runs = [json.loads(line) for line in fake_llama_bench.read_text().splitlines()]
    assert len(runs) == 2
    for argv in runs:
        assert _flag(argv, "-m") == str(model)
        assert _flag(argv, "-ngl") == "999"  # -1 (all): older llama-bench rejects negatives
        assert _flag(argv, "-t") == "6"
        assert _flag(argv, "-b") == "2048"
        assert _flag(argv, "-ub") == "512"
        assert _flag(argv, "-fa") == "1"
        assert _flag(argv, "-ctk") == "q8_0"
        assert _flag(argv, "-ctv") == "q8_0"
        assert _flag(argv, "-r") == "3"
        assert _flag(argv, "-o") == "json"
        assert _flag(argv, "-ot") == (
            r"blk\.0\.ffn_(up|down|gate|gate_up)_(ch|)exps=CPU;"
            r"blk\.1\.ffn_(up|down|gate|gate_up)_(ch|)exps=CPU"
        )
    pp_run, deep_run = runs
    assert (_flag(pp_run, "-p"), _flag(pp_run, "-n")) == ("512,2048", "128")
    assert "-d" not in pp_run
    assert (_flag(deep_run, "-p"), _flag(deep_run, "-n"), _flag(deep_run, "-d")) == (
        "0",
        "128",
        "4096",
    )
    assert sum("llama-bench -m" in line for line in said) == 2


def test_run_llama_bench_other_plan_flags(fake_llama_bench: Path) -> None:
    plan = _plan(n_gpu_layers=10, flash_attn=False, type_k="f16", type_v="q4_0", overrides=())
    got = llama_bench.run_llama_bench("llama-bench", plan.path, plan, reps=1, depth=0, timeout=60)
    assert set(got) == {"pp512", "pp2048", "tg128"}
    (argv,) = [json.loads(line) for line in fake_llama_bench.read_text().splitlines()]
    assert _flag(argv, "-ngl") == "10"
    assert _flag(argv, "-fa") == "0"
    assert (_flag(argv, "-ctk"), _flag(argv, "-ctv")) == ("f16", "q4_0")
    assert "-ot" not in argv and "-d" not in argv


def test_run_llama_bench_failure_returns_nothing(
    fake_llama_bench: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("FAKE_FAIL", "1")
    said: list[str] = []
    got = llama_bench.run_llama_bench(
        "llama-bench", Path("/m.gguf"), _plan(), reps=2, depth=512, progress=said.append
    )
    assert got == {}
    assert len(fake_llama_bench.read_text().splitlines()) == 2  # both runs tried
    assert any("exited with 1: error: invalid parameter" in line for line in said)


def test_run_llama_bench_missing_binary_and_unsupported_plans(
    tmp_path: Path, fake_llama_bench: Path
) -> None:
    said: list[str] = []
    missing = str(tmp_path / "no-such-llama-bench")
    assert (
        llama_bench.run_llama_bench(
            missing, Path("/m.gguf"), _plan(), reps=1, depth=0, progress=said.append
        )
        == {}
    )
    assert "cannot run" in said[-1]

    plan = _plan(type_k="f32")
    assert (
        llama_bench.run_llama_bench(
            "llama-bench", plan.path, plan, reps=1, depth=0, progress=said.append
        )
        == {}
    )
    assert "no f32 K cache" in said[-1]
    plan = _plan(overrides=(Override(r"blk\.[0-9]{1,2}\.ffn_.*_exps", "CPU"),))
    assert (
        llama_bench.run_llama_bench(
            "llama-bench", plan.path, plan, reps=1, depth=0, progress=said.append
        )
        == {}
    )
    assert "-ot" in said[-1]
    assert not fake_llama_bench.exists()  # never started


def test_run_llama_bench_keeps_the_tests_finished_before_the_timeout(
    fake_llama_bench: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("FAKE_HANG", "1")
    said: list[str] = []
    got = llama_bench.run_llama_bench(
        "llama-bench", Path("/m.gguf"), _plan(), reps=1, depth=4096, timeout=2, progress=said.append
    )
    assert got == {"pp512": 1024.0 * 0.9}
    assert len(fake_llama_bench.read_text().splitlines()) == 1  # no time for the deep run
    assert any("stopped after 2 s" in line for line in said)


def test_parse_llama_bench_jsonl_and_old_output_without_samples() -> None:
    jsonl = (
        '{"n_prompt": 512, "n_gen": 0, "n_depth": 0, "avg_ts": 10.0, "samples_ts": [ 9, 12 ]}\n'
        '{"n_prompt": 0, "n_gen": 128, "n_depth": 8192, "avg_ts": 5.0, "samples_ts": [ 5 ]}\n'
    )
    assert llama_bench.parse_llama_bench(jsonl) == {"pp512": 10.5, "tg128 @ d8192": 5.0}
    old = '[\n  {\n    "n_prompt": 0,\n    "n_gen": 128,\n    "avg_ts": 7.25\n  }\n]\n'
    assert llama_bench.parse_llama_bench(old) == {"tg128": 7.25}
    noise = 'error: unrecognized buffer type \'CUDA9\'\n[\n  {"n_prompt": 512, "n_gen'
    assert llama_bench.parse_llama_bench(noise) == {}
