"""`wizardchat doctor`, the plan shown at start and in /show, and `wizardchat bench` end to end."""

from __future__ import annotations

import json
import os

import pexpect
from conftest import WIZARDCHAT, Models, run_cli

from wizardchat import doctor


def test_doctor_json_reports_install_machine_and_plan(models: Models) -> None:
    r = run_cli("doctor", "--json", "-m", str(models.slow))
    assert r.code == 0, r.stderr
    report = json.loads(r.stdout)
    assert report["llama_cpp_python"] == "0.3.36"
    assert {"CPU", "RPC"} <= set(report["backends"])  # the test build has the RPC backend
    assert any(d["kind"] == "CPU" and d["total_bytes"] > 0 for d in report["devices"])
    host = report["host"]
    assert host["ram_total_bytes"] > 0 and host["physical_cores"] >= 1
    assert host["ram_bandwidth_bytes_per_s"] > 1e8
    plan = report["model"]["plan"]
    size = os.path.getsize(models.slow)
    assert 0.9 * size < plan["model_bytes"] <= size  # the tensors' bytes, from the header
    gpus = [d for d in report["devices"] if d["kind"] in ("GPU", "IGPU")]
    if not gpus:
        assert plan["n_gpu_layers"] == 0 and "all 4 layers in RAM" in plan["one_line"]
    assert plan["decode_bound_tps"] > 0  # RAM bandwidth measured, so the bound is known


def test_doctor_plans_the_real_8x22b_shape_or_says_why_not() -> None:
    r = run_cli("doctor")  # offline, nothing downloaded: the catalog shape at Q4_K_M
    assert r.code == 0, r.stderr
    assert "model: wizardlm2-8x22b" in r.stdout
    if "no plan:" in r.stdout:  # a small machine: the numbers, and what would help
        assert "85.6 GB weights" in r.stdout and "GB RAM" in r.stdout
    else:
        assert "WizardLM-2 8x22B Q4_K_M, not downloaded" in r.stdout
        assert "llama.cpp flags" in r.stdout and "read per token" in r.stdout


def test_missing_backends_come_with_the_command_that_adds_them() -> None:
    report = {
        "wizardchat": "x",
        "llama_cpp_python": "0.3.36",
        "ggml": "0.25.3",
        "python": "3.11",
        "backends": ["CPU"],
        "missing_backends": ["RPC", "CUDA"],
        "rebuild": doctor.rebuild_command(["-DGGML_RPC=on", "-DGGML_CUDA=on"]),
        "devices": [],
        "host": {
            "system": "Linux",
            "physical_cores": 8,
            "ram_available_bytes": 1,
            "ram_total_bytes": 2,
            "ram_bandwidth_bytes_per_s": 5e10,
        },
        "model": {"reference": "wizardlm2-8x22b", "path": "", "plan_error": "too big"},
    }
    text = doctor.render(report)
    assert (
        'CUDA is not built in; to add it: CMAKE_ARGS="-DGGML_RPC=on -DGGML_CUDA=on" pip install '
        "--no-cache-dir --force-reinstall llama-cpp-python==0.3.36"
    ) in text
    assert "no plan: too big" in text


def test_the_plan_is_shown_at_start_and_in_show(models: Models) -> None:
    child = pexpect.spawn(
        WIZARDCHAT,
        ["run", "-m", str(models.scripted), "--plain"],
        env={**os.environ, "TERM": "dumb"},
        encoding="utf-8",
        timeout=60,
    )
    try:
        child.expect(r"plan: (.*), ctx (\d+), KV f16")
        child.expect_exact(">>> ")
        child.send("/show\r")
        child.expect(r"plan: llama.cpp flags\s+-ngl \d+")
        child.expect_exact(">>> ")
        child.sendcontrol("d")
        child.expect(pexpect.EOF)
    finally:
        child.close(force=True)
    assert child.exitstatus == 0


def test_bench_json(models: Models) -> None:
    r = run_cli("bench", "-m", str(models.random), "-c", "4096", "--reps", "1", "--json")
    assert r.code == 0, r.stderr
    data = json.loads(r.stdout)
    tests = {m["test"]: m for m in data["tests"]}
    assert {"pp512", "pp2048", "tg128"} <= set(tests)
    assert all(m["tokens_per_second"] > 0 for m in tests.values())
    assert data["bound_tokens_per_second"] > 0  # bench measures the RAM bandwidth first
