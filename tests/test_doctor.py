"""`wizardchat doctor`, the plan shown at start and in /show, and `wizardchat bench` end to end."""

from __future__ import annotations

import json
import os
import re
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pexpect
import pytest
from conftest import WIZARDCHAT, Models, Result, run_cli
from hub_server import FakeFile, FakeHub, hub_env

from wizardchat.diagnose import doctor
from wizardchat.errors import ExitCode


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
        assert "wizardchat doctor -m wizardlm2-7b" in r.stdout  # what runs, as `run` offers
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


# --- the model doctor plans: the one asked for, sized from its header or the hub's listing -----

SEVEN = "MaziyarPanahi/WizardLM-2-7B-GGUF"
EIGHT = "MaziyarPanahi/WizardLM-2-8x22B-GGUF"
I1 = "mradermacher/WizardLM-2-8x22B-i1-GGUF"
# Published sizes of real quants (bytes); the loopback hub lists sparse files of these sizes.
SIZES = {
    (SEVEN, "WizardLM-2-7B.Q4_K_M.gguf"): 4_368_438_944,
    (EIGHT, "WizardLM-2-8x22B.IQ1_S.gguf"): 29_650_000_000,
    (EIGHT, "WizardLM-2-8x22B.IQ3_XS.gguf"): 58_240_000_000,
    (I1, "WizardLM-2-8x22B.i1-IQ2_XS.gguf"): 41_980_000_000,
}


@pytest.fixture
def hub(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[FakeHub]:
    """A loopback hub that lists catalog quants at their real sizes (sparse files, no bytes)."""
    sparse = tmp_path / "sparse"
    sparse.mkdir()
    repos: dict[str, dict[str, FakeFile]] = {}
    for (repo, name), size in SIZES.items():
        path = sparse / name
        with path.open("wb") as f:
            f.truncate(size)
        repos.setdefault(repo, {})[name] = FakeFile(path_on_disk=path, sha256="ab" * 32)
    with FakeHub() as server:
        for repo, files in repos.items():
            server.add_repo(repo, files)
        for key, value in hub_env(server.url, tmp_path / "hf").items():
            monkeypatch.setenv(key, value)
        for key in ("HF_TOKEN", "HUGGING_FACE_HUB_TOKEN", "HF_HUB_OFFLINE"):
            monkeypatch.delenv(key, raising=False)
        yield server


def _model(r: Result) -> dict[str, Any]:
    assert r.code == 0, r.stderr
    model: dict[str, Any] = json.loads(r.stdout)["model"]
    return model


def _planned_or_too_big(model: dict[str, Any], size: int) -> None:
    """The plan sized the model at the hub's size, or says this machine is too small for it."""
    if "plan" in model:
        assert model["plan"]["model_bytes"] == pytest.approx(size, rel=0.01)
    else:
        assert f"{size / 1e9:.1f} GB weights" in model["plan_error"], model


def test_doctor_plans_the_7b_when_asked_for_it(hub: FakeHub) -> None:
    model = _model(run_cli("doctor", "--json", "-m", "wizardlm2-7b:Q4_K_M"))
    size = SIZES[SEVEN, "WizardLM-2-7B.Q4_K_M.gguf"]
    _planned_or_too_big(model, size)
    plan = model["plan"]  # 4.4 GB fits any machine these tests run on
    assert "Q4_K_M" in plan["source"] and "8x22B" not in json.dumps(model)
    assert "/32 layers" in plan["one_line"] or "all 32 layers" in plan["one_line"]
    text = run_cli("doctor", "-m", "wizardlm2-7b:Q4_K_M").stdout
    assert "model: wizardlm2-7b:Q4_K_M" in text and "8x22B" not in text


def test_doctor_plans_the_7b_quant_run_would_download(hub: FakeHub) -> None:
    model = _model(run_cli("doctor", "--json", "-m", "wizardlm2-7b"))
    _planned_or_too_big(model, SIZES[SEVEN, "WizardLM-2-7B.Q4_K_M.gguf"])  # the only quant


@pytest.mark.parametrize(
    ("ref", "key"),
    [
        ("wizardlm2-8x22b:IQ1_S", (EIGHT, "WizardLM-2-8x22B.IQ1_S.gguf")),
        ("wizardlm2-8x22b:IQ3_XS", (EIGHT, "WizardLM-2-8x22B.IQ3_XS.gguf")),
        (f"{I1}:IQ2_XS", (I1, "WizardLM-2-8x22B.i1-IQ2_XS.gguf")),
    ],
)
def test_doctor_plans_every_quant_of_the_catalogs_repositories(
    hub: FakeHub, ref: str, key: tuple[str, str]
) -> None:
    r = run_cli("doctor", "--json", "-m", ref)
    model = _model(r)
    _planned_or_too_big(model, SIZES[key])
    assert "synthetic" not in r.stdout + r.stderr


def test_a_quant_not_downloaded_offline_says_why_in_words() -> None:
    r = run_cli("doctor", "-m", "wizardlm2-8x22b:IQ2_XS")  # HF_HUB_OFFLINE=1 in every test
    assert r.code == 0, r.stderr
    assert "synthetic" not in r.stdout + r.stderr
    line = next(x for x in r.stdout.splitlines() if "no plan:" in x)
    assert "IQ2_XS" in line and "not downloaded" in line and "HF_HUB_OFFLINE" in line, line


@pytest.mark.parametrize("how", ["env", "config"])
def test_a_configured_model_file_that_does_not_exist_is_reported_missing(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, how: str
) -> None:
    from wizardchat import paths

    missing = tmp_path / "gone" / "model.gguf"
    if how == "env":
        monkeypatch.setenv("WIZARDCHAT_MODEL", str(missing))
        source = "WIZARDCHAT_MODEL"
    else:
        config = paths.config_file()
        config.parent.mkdir(parents=True, exist_ok=True)
        config.write_text(f'model = "{missing}"\n', encoding="utf-8")
        source = str(config)
    r = run_cli("doctor")
    assert r.code == 0, r.stderr
    assert "Traceback" not in r.stderr
    lines = [x for x in r.stdout.splitlines() if str(missing) in x]
    assert len(lines) == 1, r.stdout
    assert "missing" in lines[0] and source in lines[0], lines[0]
    assert "8x22B" not in r.stdout  # not silently replaced by another model's plan
    report = json.loads(run_cli("doctor", "--json").stdout)["model"]
    assert report["missing"] and "plan" not in report


def test_a_model_path_and_the_plan_line_are_each_shown_once(models: Models) -> None:
    r = run_cli("doctor", "-m", str(models.slow))
    assert r.code == 0, r.stderr
    assert r.stdout.count(str(models.slow)) == 1, r.stdout  # not "model: X at X"
    plan = json.loads(run_cli("doctor", "--json", "-m", str(models.slow)).stdout)["model"]["plan"]
    where = plan["one_line"].removeprefix("plan: ").split(",")[0]
    assert r.stdout.count(where) == 1, r.stdout


# --- bench names what it measured; every command shows the load plan once ---------------------


def test_bench_names_the_model_quant_and_plan_it_measured(models: Models) -> None:
    r = run_cli("bench", "-m", str(models.random), "-c", "1024", "--reps", "1")
    assert r.code == 0, r.stderr
    lines = r.stdout.splitlines()
    assert lines[0] == "model: random.gguf, F32", lines[:3]
    assert lines[1].startswith("plan: all 2 layers in RAM, ctx 1024, KV f16, ~"), lines[:3]
    bound = re.search(r"~(\d+) tok/s bound$", lines[1])
    assert bound, lines[1]
    assert f"of ~{bound.group(1)} tok/s bound" in r.stdout  # the bound beside its fractions
    assert "plan:" not in r.stderr
    data = json.loads(
        run_cli("bench", "-m", str(models.random), "-c", "1024", "--reps", "1", "--json").stdout
    )
    assert data["model"] == "random.gguf" and data["quant"] == "F32"
    assert data["plan_line"].startswith("plan: all 2 layers in RAM")


@pytest.mark.parametrize(
    "args",
    [
        ("ask", "Hi", "-n", "4"),
        ("bench", "-c", "1024", "--reps", "1"),  # 1024: no pp2048, no depth test
        ("doctor",),
    ],
    ids=lambda a: a[0],
)
def test_a_terminal_shows_the_load_plan_once(models: Models, args: tuple[str, ...]) -> None:
    child = pexpect.spawn(
        WIZARDCHAT,
        [*args, "-m", str(models.random)],
        env={**os.environ, "TERM": "dumb"},
        encoding="utf-8",
        timeout=240,  # a loaded test machine
    )
    try:
        child.expect(pexpect.EOF)
        text = child.before or ""
    finally:
        child.close(force=True)
    assert child.exitstatus == 0, text
    assert len(re.findall(r"all 2 layers in RAM, ctx \d+", text)) == 1, text


def test_a_model_file_given_with_m_that_does_not_exist_is_an_error(tmp_path: Path) -> None:
    missing = tmp_path / "typo.gguf"
    r = run_cli("doctor", "-m", str(missing))
    assert r.code == ExitCode.NO_MODEL, (r.code, r.stdout)
    assert r.stderr == f"wizardchat: error: model file not found: {missing}\n"
