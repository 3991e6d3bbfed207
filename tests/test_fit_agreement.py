"""One fit model: `pull --list` (the quant choice), `doctor` and the load plan agree about the
same model on the same machine: the same "fits" and, where it fits, the same context and plan
line. The machine is a `Machine` passed in; the quants are the 8x22B's (sizes from llama.cpp's
quantization rules) and the 7B's, listed by the loopback hub as sparse files of those sizes."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest
from hub_server import FakeFile, FakeHub, point_huggingface_hub_at

from wizardchat.diagnose.doctor import plan_report
from wizardchat.engine.offload import fit_load
from wizardchat.errors import WizardchatError
from wizardchat.hub import download as hub
from wizardchat.hub.catalog import FAMILIES, ModelRef
from wizardchat.hub.resolve import quant_table
from wizardchat.plan.fit import MIN_CTX, find_fit
from wizardchat.plan.machine import Machine
from wizardchat.plan.shapes import SYNTHETIC_QUANTS, catalog_shape, wizardlm2_8x22b_shape
from wizardchat.settings import Settings

GIB = 1 << 30
BIG = FAMILIES["wizardlm2-8x22b"]
SEVEN = FAMILIES["wizardlm2-7b"]
QUANTS = {
    BIG: {q: wizardlm2_8x22b_shape(q).total_bytes for q in SYNTHETIC_QUANTS},
    SEVEN: {"Q2_K": 2_720_000_000, "Q4_K_M": 4_370_000_000, "Q8_0": 7_700_000_000},
}
# (RAM GiB, RAM free GiB, GPUs' free GiB): laptops to servers, none to two GPUs.
MACHINES = [
    (8, 6, ()),
    (16, 12, ()),
    (32, 32, ()),
    (64, 40, ()),
    (128, 128, ()),
    (32, 20, (24,)),
    (64, 64, (24,)),
    (128, 100, (80,)),
    (32, 32, (24, 24)),
    (64, 64, (48, 48)),
    (256, 200, (24, 24)),
]


@pytest.fixture
def listed(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[None]:
    """The loopback hub listing every quant of QUANTS, this process's huggingface_hub on it."""
    files = tmp_path / "sparse"
    files.mkdir()
    with FakeHub() as server:
        for family, quants in QUANTS.items():
            stem = family.repo.split("/")[1].removesuffix("-GGUF")
            repo_files = {}
            for quant, size in quants.items():
                path = files / f"{family.name}-{quant}"
                with path.open("wb") as f:
                    f.truncate(size)  # a hole: the hub only lists it
                repo_files[f"{stem}.{quant}.gguf"] = FakeFile(
                    path_on_disk=path, sha256=f"{size:064x}"[-64:]
                )
            server.add_repo(family.repo, repo_files)
        point_huggingface_hub_at(monkeypatch, server.url, tmp_path / "hf")
        yield


def _doctor(ref: ModelRef, machine: Machine) -> tuple[int, str] | None:
    """doctor's plan for `ref` (not downloaded) on `machine`: (context, plan line), None: no fit."""
    try:
        report = plan_report(None, ref, machine)
    except WizardchatError:
        return None
    return report["n_ctx"], report["one_line"]


def _load(family_name: str, size: int, machine: Machine) -> tuple[int, str] | None:
    """The load plan's fit, as plan_load asks it (default settings, automatic context), for a
    file of this quant's shape: (context, plan line), None: the load refuses."""
    try:
        offload = fit_load(Settings(), catalog_shape(family_name, size), machine, 0)
    except WizardchatError:
        return None
    assert offload.fit is not None and offload.fit.fits
    return offload.n_ctx, offload.fit.one_line()


@pytest.mark.parametrize(("ram", "free", "gpus"), MACHINES)
def test_pull_doctor_and_the_load_plan_agree(
    listed: None, ram: int, free: int, gpus: tuple[int, ...]
) -> None:
    machine = Machine.sized(ram * GIB, [g * GIB for g in gpus], ram_free=free * GIB)
    for family, quants in QUANTS.items():
        ref = ModelRef(family.repo, None, family)
        rows, _, _ = quant_table(hub.list_remote(ref), ref, machine)
        pull_says = {row[0]: row[3] for row in rows[1:]}
        for quant, size in quants.items():
            doctor = _doctor(ModelRef(family.repo, quant, family), machine)
            load = _load(family.name, size, machine)
            case = f"{family.name} {quant} on {ram} GiB RAM + GPUs {gpus}"
            assert pull_says[quant] == ("yes" if load else "no"), case
            assert doctor == load, case  # the same context and plan line, or both no fit
            if load is not None:
                n_ctx, _ = load
                assert MIN_CTX <= n_ctx <= catalog_shape(family.name, size).n_ctx_train, case


def test_the_grid_has_both_answers() -> None:
    """The grid is not one-sided (else the agreement above says little): the 8x22B at Q8_0 fits
    no laptop, the 7B at Q4_K_M fits the smallest one."""
    assert _load(BIG.name, QUANTS[BIG]["Q8_0"], Machine.sized(16 * GIB)) is None
    assert _load(SEVEN.name, QUANTS[SEVEN]["Q4_K_M"], Machine.sized(8 * GIB)) is not None


def test_with_the_plan_off_the_context_is_sized_for_the_flags_placement() -> None:
    """`--plan off` (and `-ot`) leave the placement to the flags, but the automatic context is
    the same fit's, for the placement those flags give; where they fit nowhere, the floor."""
    shape = catalog_shape(BIG.name, QUANTS[BIG]["Q4_K_M"])
    machine = Machine.sized(88 * GIB, [24 * GIB])
    cpu_only = Settings(plan="off", n_gpu_layers=0)
    off = fit_load(cpu_only, shape, machine, 0)
    assert off.fit is None and off.reason == "off (--plan off)"
    by_hand = find_fit(shape, machine, n_gpu_layers=0, n_cpu_moe=0)
    assert (
        by_hand.fits and off.n_ctx == by_hand.n_ctx < fit_load(Settings(), shape, machine, 0).n_ctx
    )
    hand_placed = fit_load(
        Settings(override_tensor=("exps=CPU",), n_gpu_layers=0), shape, machine, 0
    )
    assert hand_placed.reason == "off (-ot places tensors by hand)"
    assert hand_placed.n_ctx == by_hand.n_ctx
    # all 57 layers with every expert on a 24 GiB GPU fit at no context: the floor, no error
    everything = fit_load(Settings(plan="off"), shape, machine, 0)
    assert everything.fit is None and everything.n_ctx == MIN_CTX
