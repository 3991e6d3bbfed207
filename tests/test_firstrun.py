"""A new user's first run: what fits this machine, what runs instead, declining, an unreachable hub,
what to do after `pull`, and a `models` table that fits a terminal.

The machine is a `Machine` passed in (what the CLI fills from hardware detection); the hub
is the loopback hub serving sparse files of the real quants' sizes, so listing them costs nothing
and any download would show in `bytes_served`."""

from __future__ import annotations

import io
import os
import shutil
import socket
from collections.abc import Iterator
from pathlib import Path

import pytest
from conftest import WIZARDCHAT, run_cli
from gguf_models import write_model
from hub_server import FakeFile, FakeHub, hub_env, point_huggingface_hub_at
from small_disk import small_disk_usage

from wizardchat import errors
from wizardchat.errors import NoModelError
from wizardchat.hub import resolve as pulling
from wizardchat.hub.catalog import FAMILIES, ModelRef, human_size
from wizardchat.plan.fit import find_fit
from wizardchat.plan.machine import Machine
from wizardchat.plan.shapes import wizardlm2_8x22b_shape

MAZ = "MaziyarPanahi/WizardLM-2-8x22B-GGUF"
SEVEN = "MaziyarPanahi/WizardLM-2-7B-GGUF"
GB = 10**9
GIB = 1 << 30
# Published sizes (bytes, rounded) of the quants the loopback hub lists; 8x22B ones as the planner
# computes them where it can (Q2_K ... Q8_0), the IQ1 ones as the hub shows them.
BIG_QUANTS = {
    "IQ1_S": 29_600_000_000,
    "Q2_K": 52_107_915_264,
    "Q4_K_M": 85_591_511_040,
    "Q8_0": 149_419_548_672,
}
SEVEN_QUANTS = {"Q4_K_M": 4_370_000_000, "Q5_K_M": 5_130_000_000, "Q8_0": 7_700_000_000}


def machine(ram: int, *gpus: int) -> Machine:
    return Machine.sized(ram, gpus)


def laptop() -> Machine:
    return machine(21 * GB)  # 21 GB, no GPU


def workstation() -> Machine:
    return machine(128 * GIB, 24 * GIB)


def _sparse(path: Path, size: int) -> FakeFile:
    with path.open("wb") as f:
        f.truncate(size)  # a hole: no disk used, the hub only lists it here
    return FakeFile(path_on_disk=path, sha256=f"{size:064x}"[-64:])


@pytest.fixture
def sized_hub(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[FakeHub]:
    """The 8x22B and 7B repositories with their real file sizes (sparse files), this process's
    huggingface_hub pointed at it."""
    files = tmp_path / "sparse"
    files.mkdir()
    with FakeHub() as server:
        server.add_repo(
            MAZ,
            {
                f"WizardLM-2-8x22B.{q}.gguf": _sparse(files / f"big-{q}", size)
                for q, size in BIG_QUANTS.items()
            },
        )
        server.add_repo(
            SEVEN,
            {
                f"WizardLM-2-7B.{q}.gguf": _sparse(files / f"seven-{q}", size)
                for q, size in SEVEN_QUANTS.items()
            },
        )
        point_huggingface_hub_at(monkeypatch, server.url, tmp_path / "hf")
        yield server


class Questions:
    """A confirm callback that records each question and answers `answer`."""

    def __init__(self, answer: bool) -> None:
        self.answer = answer
        self.asked: list[str] = []

    def __call__(self, question: str) -> bool:
        self.asked.append(question)
        return self.answer


def _resolve(
    text: str, machine: Machine, confirm: Questions, *, can_ask: bool = True
) -> io.StringIO:
    err = io.StringIO()
    pulling.resolve_model(
        text, yes=False, can_ask=can_ask, confirm=confirm, err=err, machine=lambda: machine
    )
    return err


def test_nothing_fits_a_21_gb_machine_so_it_says_why_and_offers_the_7b(sized_hub: FakeHub) -> None:
    questions = Questions(answer=False)
    err = io.StringIO()
    with pytest.raises(errors.Declined) as declined:
        pulling.resolve_model(
            "wizardlm2-8x22b", yes=False, can_ask=True, confirm=questions, err=err, machine=laptop
        )
    said = err.getvalue()
    assert "no quant of wizardlm2-8x22b fits this machine" in said
    assert "the smallest, IQ1_S, is 29.6 GB" in said  # the numbers, not just "no"
    assert "21.0 GB RAM and no GPU" in said
    assert "85.6 GB" not in questions.asked[0]  # never offers what cannot load
    assert questions.asked == [
        f"Download wizardlm2-7b:Q8_0 ({SEVEN} Q8_0: 7.7 GB in 1 file(s)) instead? [y/N] "
    ]
    assert "wizardchat run -m wizardlm2-7b:Q8_0" in str(declined.value)
    assert "-m FILE.gguf" in str(declined.value)
    assert sum(sized_hub.bytes_served.values()) == 0


def test_a_quant_named_that_does_not_fit_offers_one_of_the_same_model_that_does(
    sized_hub: FakeHub,
) -> None:
    questions = Questions(answer=False)
    with pytest.raises(errors.Declined):
        _resolve("wizardlm2-8x22b:Q8_0", machine(64 * GIB), questions)
    assert questions.asked[0].startswith("Download wizardlm2-8x22b:Q2_K (")


def test_a_big_machine_gets_the_biggest_8x22b_quant_that_fits_with_experts_in_ram(
    sized_hub: FakeHub,
) -> None:
    questions = Questions(answer=False)
    err = io.StringIO()
    with pytest.raises(errors.Declined):
        pulling.resolve_model(
            "wizardlm2-8x22b",
            yes=False,
            can_ask=True,
            confirm=questions,
            err=err,
            machine=workstation,
        )
    assert err.getvalue() == ""
    assert questions.asked == [
        f"wizardlm2-8x22b is not downloaded. Download {MAZ} Q8_0: 149.4 GB in 1 file(s)? [y/N] "
    ]
    budget = pulling.memory_budget(ModelRef(MAZ, None, FAMILIES["wizardlm2-8x22b"]), workstation())
    assert budget is not None and BIG_QUANTS["Q8_0"] <= budget


def test_batch_mode_names_what_runs_when_nothing_fits(sized_hub: FakeHub) -> None:
    with pytest.raises(NoModelError) as e:
        _resolve("wizardlm2-8x22b", laptop(), Questions(answer=True), can_ask=False)
    assert "wizardchat pull wizardlm2-7b:Q8_0" in str(e.value)
    assert "no quant of wizardlm2-8x22b fits this machine" in str(e.value)


def test_pull_without_a_quant_refuses_when_nothing_fits_and_names_what_runs(
    sized_hub: FakeHub,
) -> None:
    from wizardchat.hub import download as hub

    ref = ModelRef(MAZ, None, FAMILIES["wizardlm2-8x22b"])
    warnings: list[str] = []
    with pytest.raises(NoModelError) as e:
        pulling.pull_choice(ref, hub.list_remote(ref), laptop(), warn=warnings.append)
    assert "`wizardchat pull wizardlm2-7b:Q8_0` gets what runs here" in str(e.value)
    named = ModelRef(MAZ, "Q4_K_M", ref.family)
    choice = pulling.pull_choice(named, hub.list_remote(named), laptop(), warn=warnings.append)
    assert choice.quant.name == "Q4_K_M"  # named: the user decides, and is told
    assert len(warnings) == 1 and "no quant of wizardlm2-8x22b fits this machine" in warnings[0]


def test_yes_never_downloads_what_cannot_run_unless_named(
    sized_hub: FakeHub, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from wizardchat.errors import HubError

    with pytest.raises(NoModelError, match="wizardchat pull wizardlm2-7b:Q8_0"):
        pulling.resolve_model(
            "wizardlm2-8x22b",
            yes=True,
            can_ask=True,
            confirm=Questions(answer=True),
            err=io.StringIO(),
            machine=laptop,
        )
    # A nearly full disk where the cache is: the pull must stop before any byte.
    monkeypatch.setattr(shutil, "disk_usage", small_disk_usage(1000, tmp_path / "hf" / "hub"))
    err = io.StringIO()
    with pytest.raises(HubError, match="not enough disk space"):
        pulling.resolve_model(
            "wizardlm2-8x22b:Q4_K_M",
            yes=True,
            can_ask=True,
            confirm=Questions(answer=False),
            err=err,
            machine=laptop,
        )
    assert "warning: no quant of wizardlm2-8x22b fits this machine" in err.getvalue()
    assert sum(sized_hub.bytes_served.values()) == 0


def test_pull_list_says_the_budget_and_marks_no_default_when_nothing_fits(
    sized_hub: FakeHub,
) -> None:
    from wizardchat.hub import download as hub

    ref = ModelRef(MAZ, None, FAMILIES["wizardlm2-8x22b"])
    model = hub.list_remote(ref)
    rows, default, line = pulling.quant_table(model, ref, laptop())
    assert default is None
    assert not any("default" in " ".join(r) for r in rows)
    assert line.startswith(
        "this machine: 21.0 GB RAM and no GPU, which hold model files up to 16.9 GB with an "
        "8K-token KV cache (1.9 GB)"
    )
    rows, default, line = pulling.quant_table(model, ref, workstation())
    assert default == "Q8_0" and "137.4 GB RAM + 25.8 GB GPU" in line


@pytest.mark.parametrize("quant", ["Q2_K", "Q4_K_M", "Q8_0"])
@pytest.mark.parametrize("gpus", [(), (24 * GIB,), (48 * GIB, 48 * GIB)])
def test_what_pull_calls_fitting_the_planner_loads_at_8k(quant: str, gpus: tuple[int, ...]) -> None:
    """One idea of "fits": on the machine with the least RAM where hub/resolve.py calls the quant
    fitting, the planner places the quant's real shape (experts in RAM as needed) at 8K tokens."""
    shape = wizardlm2_8x22b_shape(quant)
    ref = ModelRef(MAZ, None, FAMILIES["wizardlm2-8x22b"])
    size = shape.total_bytes

    def budget(ram: int) -> int:
        found = pulling.memory_budget(ref, machine(ram, *gpus))
        assert found is not None
        return found

    ram = 8 * GIB
    if budget(ram) < size:  # the budget grows with RAM byte for byte once experts sit there
        ram += size - budget(ram)
    while budget(ram) < size:
        ram += pulling.BUDGET_STEP
    assert ram == 8 * GIB or budget(ram - 2 * pulling.BUDGET_STEP) < size  # the least, to a step
    plan = find_fit(shape, machine(ram, *gpus), n_ctx=8192, min_ctx=8192)
    assert plan.n_ctx == 8192 and plan.fits


# --- the CLI ----------------------------------------------------------------------------------


@pytest.fixture
def tiny_hub(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[FakeHub]:
    """The 7B repository with one real tiny model, the environment of `wizardchat` pointed at it."""
    data = write_model(tmp_path / "tiny.gguf").read_bytes()
    with FakeHub() as server:
        server.add_repo(SEVEN, {"WizardLM-2-7B.Q5_K_M.gguf": FakeFile(data)})
        for key, value in hub_env(server.url, tmp_path / "hf").items():
            monkeypatch.setenv(key, value)
        monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
        yield server


def _answer_no(*args: str) -> tuple[int | None, str]:
    """Run wizardchat on a terminal, answer its [y/N] question with n: (exit status, output)."""
    import pexpect

    child = pexpect.spawn(
        WIZARDCHAT, list(args), env={**os.environ, "TERM": "dumb"}, encoding="utf-8", timeout=60
    )
    try:
        child.expect(r"\[y/N\] ")
        child.send("n\r")
        child.expect(pexpect.EOF)
        said = child.before
    finally:
        child.close(force=True)
    return child.exitstatus, said


def test_declining_the_download_is_not_an_error(tiny_hub: FakeHub) -> None:
    status, said = _answer_no("run", "-m", "wizardlm2-7b:Q5_K_M", "-c", "512", "--plain")
    assert status == 0
    assert "error" not in said
    assert "nothing downloaded" in said and "wizardchat pull wizardlm2-7b:Q5_K_M" in said
    assert sum(tiny_hub.bytes_served.values()) == 0


def test_pull_ends_with_the_command_to_chat_with_it(tiny_hub: FakeHub) -> None:
    r = run_cli("pull", "wizardlm2-7b:Q5_K_M")
    assert r.code == 0, r.stderr
    assert r.stderr.rstrip().endswith("chat with it: wizardchat run -m wizardlm2-7b:Q5_K_M")
    assert Path(r.stdout.strip()).is_file()  # stdout is still just the path
    again = run_cli("pull", "wizardlm2-7b:Q5_K_M")  # already there: the same advice
    assert "chat with it: wizardchat run -m wizardlm2-7b:Q5_K_M" in again.stderr


def test_models_fits_100_columns_and_shows_paths_when_asked(
    tiny_hub: FakeHub, tmp_path: Path
) -> None:
    assert run_cli("pull", "wizardlm2-7b:Q5_K_M").code == 0
    table = run_cli("models")
    assert table.code == 0, table.stderr
    assert "wizardlm2-7b:Q5_K_M" in table.stdout
    assert str(tmp_path) not in table.stdout
    assert max(map(len, table.stdout.splitlines())) <= 100
    paths = run_cli("models", "--paths")
    assert paths.code == 0 and "WizardLM-2-7B.Q5_K_M.gguf" in paths.stdout
    assert str(tmp_path / "hf") in paths.stdout


def _closed_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])  # closed again when the block ends: nothing listens


@pytest.fixture
def no_hub(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> str:
    url = f"http://127.0.0.1:{_closed_port()}"
    for key, value in hub_env(url, tmp_path / "hf").items():
        monkeypatch.setenv(key, value)
    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    return url


@pytest.mark.parametrize(
    "args",
    [
        ("pull",),
        ("pull", "--list"),
        ("pull", "wizardlm2-7b"),
        ("ask", "--yes", "-m", "wizardlm2-7b", "Hi"),
        ("run", "--yes", "-m", "wizardlm2-7b"),
        ("bench", "--yes", "-m", "wizardlm2-7b"),
    ],
)
def test_an_unreachable_hub_says_what_to_check(no_hub: str, args: tuple[str, ...]) -> None:
    r = run_cli(*args, stdin="Hi\n" if args[0] == "run" else None, timeout=90)
    assert r.code == 8, r.stderr
    lines = r.stderr.strip().splitlines()
    assert lines[0].startswith(f"wizardchat: error: cannot reach {no_hub}")
    hints = "\n".join(lines[1:])
    assert all(line.startswith("wizardchat: hint: ") for line in lines[1:]) and len(lines) <= 4
    for advice in ("HTTPS_PROXY", "HF_ENDPOINT", "HF_HUB_OFFLINE=1", "-m FILE.gguf"):
        assert advice in hints


def test_an_unreachable_hub_names_a_model_already_here(
    tiny_hub: FakeHub, monkeypatch: pytest.MonkeyPatch
) -> None:
    assert run_cli("pull", "wizardlm2-7b:Q5_K_M").code == 0
    monkeypatch.setenv("HF_ENDPOINT", f"http://127.0.0.1:{_closed_port()}")
    r = run_cli("pull", "wizardlm2-8x22b")
    assert r.code == 8
    assert "already here: wizardlm2-7b:Q5_K_M (wizardchat run -m wizardlm2-7b:Q5_K_M)" in r.stderr


@pytest.mark.parametrize(
    ("args", "stdin"),
    [(("run", "-m", "wizardlm2-7b"), "Hi\n"), (("ask", "-m", "wizardlm2-7b"), "Hi")],
)
def test_batch_and_piped_ask_say_pull_first_when_the_hub_is_unreachable(
    no_hub: str, args: tuple[str, ...], stdin: str
) -> None:
    r = run_cli(*args, stdin=stdin, timeout=90)
    assert r.code == 3, r.stderr
    assert "run `wizardchat pull wizardlm2-7b` first, or pass --yes" in r.stderr
    assert r.stderr.count("wizardchat: error:") == 1
    assert f"wizardchat: hint: cannot reach {no_hub}" in r.stderr  # why it could not say more


def test_rm_declined_is_not_an_error(tiny_hub: FakeHub) -> None:

    assert run_cli("pull", "wizardlm2-7b:Q5_K_M").code == 0
    status, said = _answer_no("rm", "wizardlm2-7b:Q5_K_M")
    assert status == 0 and "nothing deleted" in said and "error" not in said
    assert "wizardlm2-7b:Q5_K_M" in run_cli("models").stdout


def test_human_sizes_of_the_fixture() -> None:
    assert human_size(BIG_QUANTS["Q4_K_M"]) == "85.6 GB"
