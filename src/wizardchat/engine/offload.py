"""This load's fit: the machine as the engine sees it, and the fit model's answer for a model.

`--plan auto` (the default) lets the fit model choose GPU layers, how many layers' experts stay
in RAM and, when no `--ctx-size` was given, the context. Explicit `-ngl`, `--n-cpu-moe` /
`--cpu-moe` and `-c` are kept and the fit model fills in the rest. `--plan off` and `-ot`
(patterns the fit model cannot read) leave the placement to the flags, but the automatic context
is still sized by the same fit, with the placement those flags give. The host memory bandwidth
is measured by `wizardchat doctor`/`bench` and remembered in the data dir, so an ordinary start
stays fast and still shows a decode bound.
"""

from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass

from wizardchat import paths
from wizardchat.plan.fit import MIN_CTX, Fit, find_fit
from wizardchat.plan.machine import Machine, machine_from_devices
from wizardchat.plan.shapes import FitError, ModelShape
from wizardchat.settings import Settings

MACHINE_FILE = "machine.json"


def remembered_ram_bandwidth() -> float | None:
    """The host bandwidth doctor or bench measured on this machine, if any (bytes/s)."""
    try:
        data = json.loads((paths.data_dir() / MACHINE_FILE).read_text(encoding="utf-8"))
        value = float(data["ram_bandwidth"])
    except (OSError, ValueError, KeyError, TypeError):
        return None
    return value if value > 0 else None


def remember_ram_bandwidth(value: float) -> None:
    """Keep a measured host bandwidth for later starts (best effort)."""
    path = paths.data_dir() / MACHINE_FILE
    try:
        paths.make_private_dir(path.parent)  # the data dir is private (0700)
        path.write_text(json.dumps({"ram_bandwidth": value}) + "\n", encoding="utf-8")
    except OSError:
        pass


def detect_machine() -> Machine:
    """This machine as every fit sees it: llama.cpp's GPU and RPC devices (free memory, in device
    order), the system RAM (available and total) and the remembered host bandwidth.

    Where llama.cpp's libraries cannot be loaded, the RAM alone: `pull` still chooses a quant
    (and the load then says what is wrong with the build).
    """
    try:
        from wizardchat.engine import ggml

        devices = ggml.devices()
    except (ImportError, OSError, RuntimeError):  # llama_cpp raises RuntimeError for a bad .so
        devices = []
    return machine_from_devices(devices, ram_bandwidth=remembered_ram_bandwidth())


@dataclass(frozen=True)
class Offload:
    """What the load will use: the fit (None when the placement is left to the flags), why, and
    the context the fit model chose."""

    fit: Fit | None
    reason: str  # "auto", "off", or which flag turned it off
    n_ctx: int


def fit_load(settings: Settings, shape: ModelShape, machine: Machine, n_ctx: int) -> Offload:
    """The fit for this load at context `n_ctx` (0: the automatic one), keeping explicit flags;
    FitError when the model cannot fit at all (with the placement left to the flags, the
    smallest context is used instead: llama.cpp then tries, and says why it cannot)."""
    if not settings.mmap:  # without mmap the weights must fit the free RAM, not the page cache
        ram = dataclasses.replace(machine.ram, total_bytes=None)
        machine = dataclasses.replace(machine, ram=ram)
    n_cpu_moe = shape.n_layer if settings.cpu_moe else settings.n_cpu_moe or None
    ngl = None if settings.n_gpu_layers == -1 else settings.n_gpu_layers
    off = "off (--plan off)" if settings.plan == "off" else ""
    if settings.override_tensor and not off:
        off = "off (-ot places tensors by hand)"
    if off:  # the flags place the tensors: llama.cpp's -ngl default is all layers
        ngl, n_cpu_moe = shape.n_layer + 1 if ngl is None else ngl, n_cpu_moe or 0
    try:
        fit = find_fit(
            shape,
            machine,
            n_ctx=n_ctx or None,
            fixed_ctx=n_ctx > 0,
            type_k=settings.cache_type_k,
            type_v=settings.cache_type_v,
            flash_attn=settings.flash_attn,
            n_ubatch=min(settings.ubatch_size, settings.batch_size),  # llama.cpp's effective -ub
            n_gpu_layers=ngl,
            n_cpu_moe=n_cpu_moe,
        )
    except FitError:
        if not off:
            raise
        return Offload(None, off, n_ctx or min(MIN_CTX, shape.n_ctx_train or MIN_CTX))
    return Offload(None if off else fit, off or "auto", fit.n_ctx)
