"""The automatic offload plan for one load: the planner's choice, unless flags say otherwise.

`--plan auto` (the default) lets the planner choose GPU layers, how many layers' experts stay in
RAM and, when no `--ctx-size` was given, the context. Explicit `-ngl`, `--n-cpu-moe` /
`--cpu-moe` and `-c` are kept and the planner fills in the rest; `-ot` patterns the planner
cannot model turn it off. The host memory bandwidth is measured by `wizardchat doctor`/`bench`
and remembered in the data dir, so an ordinary start stays fast and still shows a decode bound.
"""

from __future__ import annotations

import json
from dataclasses import dataclass

from wizardchat import paths
from wizardchat.gguf_file import GGUFInfo
from wizardchat.plan.fit import Plan, make_plan, memories_from_devices, shape_from_gguf
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


@dataclass(frozen=True)
class Offload:
    """What the load will use: the plan (None when off) and why."""

    plan: Plan | None
    reason: str  # "auto", "off", or which flag turned it off


def plan_offload(settings: Settings, info: GGUFInfo, n_ctx: int, n_layer: int) -> Offload:
    """Plan this load, keeping explicit flags; PlanError when the model cannot fit at all."""
    if settings.plan == "off":
        return Offload(None, "off (--plan off)")
    if settings.override_tensor:
        return Offload(None, "off (-ot places tensors by hand)")
    from wizardchat.engine import ggml

    gpus, ram = memories_from_devices(ggml.devices(), ram_bandwidth=remembered_ram_bandwidth())
    n_cpu_moe = n_layer if settings.cpu_moe else settings.n_cpu_moe or None
    plan = make_plan(
        shape_from_gguf(info),
        gpus,
        ram,
        n_ctx=n_ctx,
        type_k=settings.cache_type_k,
        type_v=settings.cache_type_v,
        flash_attn=settings.flash_attn,
        n_ubatch=min(settings.ubatch_size, settings.batch_size),  # llama.cpp's effective -ub
        n_gpu_layers=None if settings.n_gpu_layers == -1 else settings.n_gpu_layers,
        n_cpu_moe=n_cpu_moe,
        fixed_ctx=settings.ctx_size > 0,
    )
    return Offload(plan, "auto")
