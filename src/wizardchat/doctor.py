"""`wizardchat doctor`: what this install can do, what this machine has, the plan for a model."""

from __future__ import annotations

import platform
import shutil
import sys
from pathlib import Path
from typing import Any

from wizardchat import __version__
from wizardchat.catalog import DEFAULT_QUANT, ModelRef, human_size, parse_ref
from wizardchat.errors import WizardchatError

LLAMA_CPP_PYTHON = "llama-cpp-python==0.3.36"
# Backends worth having, and the build flag that adds each one.
BACKEND_FLAGS = {
    "CUDA": "-DGGML_CUDA=on",
    "Metal": "-DGGML_METAL=on",
    "Vulkan": "-DGGML_VULKAN=on",
    "RPC": "-DGGML_RPC=on",
}


def rebuild_command(flags: list[str]) -> str:
    """The pip command that rebuilds llama.cpp with these CMake flags."""
    return (
        f'CMAKE_ARGS="{" ".join(flags)}" pip install --no-cache-dir --force-reinstall '
        f"{LLAMA_CPP_PYTHON}"
    )


def _wanted_backends() -> list[str]:
    """The backends this machine could use: RPC always, a GPU backend if a GPU is visible."""
    wanted = ["RPC"]
    if sys.platform == "darwin" and platform.machine() == "arm64":
        wanted.append("Metal")
    elif shutil.which("nvidia-smi") or Path("/proc/driver/nvidia").exists():
        wanted.append("CUDA")
    return wanted


def collect(model: str | None) -> dict[str, Any]:
    """Everything doctor reports, as plain data (the --json output)."""
    import llama_cpp

    from wizardchat import hardware
    from wizardchat.engine import ggml

    backends = ggml.backends()
    devices = [
        {
            "name": d.name,
            "description": d.description,
            "kind": d.kind,
            "free_bytes": d.free_bytes,
            "total_bytes": d.total_bytes,
        }
        for d in ggml.devices()
    ]
    from wizardchat.engine.offload import remember_ram_bandwidth
    from wizardchat.planner import measure_ram_bandwidth

    available, total = hardware.host_memory()
    bandwidth = measure_ram_bandwidth()
    remember_ram_bandwidth(bandwidth)  # later starts show a decode bound without measuring
    missing = [b for b in _wanted_backends() if b not in backends]
    flags = [BACKEND_FLAGS[b] for b in ("RPC", *missing) if b in BACKEND_FLAGS]
    report: dict[str, Any] = {
        "wizardchat": __version__,
        "llama_cpp_python": llama_cpp.__version__,
        "ggml": ggml.version(),
        "python": platform.python_version(),
        "backends": backends,
        "missing_backends": missing,
        "rebuild": rebuild_command(sorted(set(flags), key=flags.index)) if missing else None,
        "devices": devices,
        "host": {
            "ram_total_bytes": total,
            "ram_available_bytes": available,
            "physical_cores": hardware.physical_cores(),
            "ram_bandwidth_bytes_per_s": bandwidth,
            "system": f"{platform.system()} {platform.machine()}",
        },
    }
    report["model"] = _model_report(model)
    return report


def _model_report(text: str | None) -> dict[str, Any]:
    """The model doctor plans for: the local file if there is one, else the catalog's shape."""
    from wizardchat import hub

    ref_or_path = parse_ref(text or "wizardlm2-8x22b")
    path: Path | None
    if isinstance(ref_or_path, Path):
        path, ref = ref_or_path, None
    else:
        ref = ref_or_path
        path = hub.resolve_local(ref)
    report: dict[str, Any] = {"reference": text or "wizardlm2-8x22b", "path": str(path or "")}
    try:
        report["plan"] = plan_report(path, ref)
    except WizardchatError as e:
        report["plan_error"] = str(e)
    return report


def plan_report(path: Path | None, ref: ModelRef | None) -> dict[str, Any]:
    """The automatic plan for this machine, as rows and numbers."""
    from wizardchat import planner
    from wizardchat.gguf_file import inspect_model

    if path is not None and path.exists():
        shape = planner.shape_from_gguf(inspect_model(path))
        source = f"{path.name} (tensor sizes from its header)"
    else:
        quant = (ref.quant if ref else None) or DEFAULT_QUANT
        shape = planner.wizardlm2_8x22b_shape(quant)
        source = f"WizardLM-2 8x22B {quant}, not downloaded (tensor sizes of its shape)"
    from wizardchat.engine import ggml
    from wizardchat.engine.offload import remembered_ram_bandwidth

    gpus, ram = planner.memories_from_devices(
        ggml.devices(), ram_bandwidth=remembered_ram_bandwidth()
    )
    plan = planner.make_plan(shape, gpus, ram, n_ctx=min(shape.n_ctx_train, 16384))
    return {
        "source": source,
        "model_bytes": shape.total_bytes,
        "one_line": plan.one_line(),
        "rows": plan.rows(),
        "n_gpu_layers": plan.n_gpu_layers,
        "n_cpu_moe": plan.n_cpu_moe,
        "n_ctx": plan.n_ctx,
        "decode_bound_tps": plan.decode_bound,
    }


def render(report: dict[str, Any]) -> str:
    """The report as text for a terminal."""
    lines = [
        f"wizardchat {report['wizardchat']} · llama-cpp-python {report['llama_cpp_python']} · "
        f"ggml {report['ggml']} · Python {report['python']}",
        f"backends: {', '.join(report['backends'])}",
    ]
    for name in report["missing_backends"]:
        lines.append(f"  {name} is not built in; to add it: {report['rebuild']}")
    lines.append("devices:")
    for d in report["devices"]:
        lines.append(
            f"  {d['name']:<10} {d['kind']:<5} {human_size(d['free_bytes'])} free of "
            f"{human_size(d['total_bytes'])}  {d['description']}"
        )
    host = report["host"]
    lines.append(
        f"host: {host['system']}, {host['physical_cores']} physical cores, RAM "
        f"{human_size(host['ram_available_bytes'])} available of "
        f"{human_size(host['ram_total_bytes'])}, read/write ~"
        f"{host['ram_bandwidth_bytes_per_s'] / 1e9:.0f} GB/s (measured now, rough)"
    )
    model = report["model"]
    lines.append(f"model: {model['reference']}" + (f" at {model['path']}" if model["path"] else ""))
    if "plan" in model:
        plan = model["plan"]
        lines.append(f"  {plan['source']}, {human_size(plan['model_bytes'])}")
        lines.append(f"  {plan['one_line']}")
        width = max(len(k) for k, _ in plan["rows"])
        lines += [f"    {k:<{width}}  {v}" for k, v in plan["rows"]]
    else:
        lines.append(f"  no plan: {model['plan_error']}")
    return "\n".join(lines)
