"""`wizardchat doctor`: what this install can do, what this machine has, the plan for a model."""

from __future__ import annotations

import platform
import shutil
import sys
from pathlib import Path
from typing import TYPE_CHECKING, Any

from wizardchat import __version__
from wizardchat.errors import NoModelError, WizardchatError
from wizardchat.hub.catalog import (
    DEFAULT_FAMILY,
    DEFAULT_QUANT,
    ModelRef,
    choose_quant,
    human_size,
    parse_ref,
)

if TYPE_CHECKING:
    from wizardchat.plan.machine import Machine
    from wizardchat.plan.shapes import ModelShape

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


def collect(model: str | None, model_source: str = "") -> dict[str, Any]:
    """Everything doctor reports, as plain data (the --json output); `model_source` says where
    a configured model came from (WIZARDCHAT_MODEL, the config file)."""
    from wizardchat.engine import ggml
    from wizardchat.plan import machine as hardware

    backends = ggml.backends()
    devices = [
        {
            "name": d.name,
            "description": d.description,
            "kind": d.listed_kind,
            "free_bytes": d.free_bytes,
            "total_bytes": d.total_bytes,
        }
        for d in ggml.devices()
    ]
    from wizardchat.engine.offload import remember_ram_bandwidth
    from wizardchat.plan.machine import measure_ram_bandwidth

    available, total = hardware.host_memory()
    bandwidth = measure_ram_bandwidth()
    remember_ram_bandwidth(bandwidth)  # later starts show a decode bound without measuring
    missing = [b for b in _wanted_backends() if b not in backends]
    flags = [BACKEND_FLAGS[b] for b in ("RPC", *missing) if b in BACKEND_FLAGS]
    report: dict[str, Any] = {
        "wizardchat": __version__,
        "llama_cpp_python": ggml.binding_version(),
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
    report["model"] = _model_report(model, model_source)
    return report


def _model_report(text: str | None, source: str = "") -> dict[str, Any]:
    """The model doctor plans for: the file given, the cached copy of a reference, else the
    reference's size from the hub (or, for 8x22B's common quants, from llama.cpp's rules).

    `source` says where a configured model came from (WIZARDCHAT_MODEL, the config file), for
    the line that reports a file that is not there.
    """
    from wizardchat.hub import download as hub

    reference = text or DEFAULT_FAMILY
    report: dict[str, Any] = {"reference": reference, "path": ""}
    ref_or_path = parse_ref(reference)
    path: Path | None
    if isinstance(ref_or_path, Path):
        if not ref_or_path.exists():
            report["missing"] = "no such file" + (f" (set by {source})" if source else "")
            return report
        path, ref = ref_or_path, None
    else:
        ref = ref_or_path
        path = hub.resolve_local(ref)
    report["path"] = str(path or "")
    try:
        report["plan"] = plan_report(path, ref)
    except WizardchatError as e:
        report["plan_error"] = str(e)
        if ref is not None and ref.family is not None and ref.family.name == DEFAULT_FAMILY:
            from wizardchat.hub.resolve import FALLBACK_FAMILY

            # As `run` offers it where no 8x22B quant fits (pulling.what_runs).
            report["instead"] = f"wizardchat doctor -m {FALLBACK_FAMILY}"
    return report


def _shape_not_downloaded(ref: ModelRef, machine: Machine) -> tuple[ModelShape, str]:
    """The shape of a reference that is not on this machine, and where its sizes came from:
    the shape `pull --list` fits for the quant it would choose on `machine`."""
    from wizardchat.hub import download as hub
    from wizardchat.hub.resolve import size_limit
    from wizardchat.plan.shapes import (
        CATALOG_DIMS,
        SYNTHETIC_QUANTS,
        catalog_shape,
        wizardlm2_8x22b_shape,
    )

    family = ref.family.name if ref.family else ""
    quant = ref.quant or (DEFAULT_QUANT if family == DEFAULT_FAMILY else None)
    if family == DEFAULT_FAMILY and quant in SYNTHETIC_QUANTS:
        size = wizardlm2_8x22b_shape(quant).total_bytes
        return catalog_shape(family, size, f"WizardLM-2 8x22B {quant}"), (
            f"WizardLM-2 8x22B {quant}, not downloaded (sizes from llama.cpp's quantization rules)"
        )
    if family not in CATALOG_DIMS:
        raise NoModelError(
            f"{ref} is not downloaded and its shape is not in wizardchat's catalog: "
            f"`wizardchat pull {ref}`, then doctor reads the file's header"
        )
    try:
        remote = hub.list_remote(ref)
    except WizardchatError as e:
        raise NoModelError(
            f"{ref} is not downloaded, so its size comes from the hub's file list: {e}"
        ) from e
    chosen = choose_quant(remote.quants, ref, size_limit(ref, remote.quants, machine))
    label = f"{ref.repo.rsplit('/', 1)[-1].removesuffix('-GGUF')} {chosen.name}"
    shape = catalog_shape(family, chosen.size, label)
    return shape, f"{ref.repo} {chosen.name}, not downloaded (sizes from the hub's file list)"


def plan_report(
    path: Path | None, ref: ModelRef | None, machine: Machine | None = None
) -> dict[str, Any]:
    """The fit for `machine` (None: this one), as rows and numbers: the same fit model, margins
    and automatic context as the load plan and `pull --list`."""
    from wizardchat.gguf_file import inspect_model
    from wizardchat.plan.fit import find_fit
    from wizardchat.plan.shapes import shape_from_gguf

    if machine is None:
        from wizardchat.engine.offload import detect_machine

        machine = detect_machine()
    if path is not None:
        shape = shape_from_gguf(inspect_model(path))
        source = f"{path.name} (tensor sizes from its header)"
    else:
        assert ref is not None
        shape, source = _shape_not_downloaded(ref, machine)
    fit = find_fit(shape, machine)
    return {
        "source": source,
        "model_bytes": shape.total_bytes,
        "one_line": fit.one_line(),
        "rows": fit.rows(),
        "n_gpu_layers": fit.n_gpu_layers,
        "n_cpu_moe": fit.n_cpu_moe,
        "n_ctx": fit.n_ctx,
        "decode_bound_tps": fit.decode_bound,
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
    if model.get("missing"):
        lines.append(f"model: {model['reference']}: missing: {model['missing']}")
        return "\n".join(lines)
    at = model["path"] if model["path"] != model["reference"] else ""  # not "X at X"
    lines.append(f"model: {model['reference']}" + (f" at {at}" if at else ""))
    if "plan" in model:
        plan = model["plan"]
        lines.append(f"  {plan['source']}, {human_size(plan['model_bytes'])}")
        width = max(len(k) for k, _ in plan["rows"])  # the first row is the plan's one line
        lines += [f"    {k:<{width}}  {v}" for k, v in plan["rows"]]
    else:
        lines.append(f"  no plan: {model['plan_error']}")
        if model.get("instead"):
            lines.append(f"  WizardLM-2 7B needs far less memory: {model['instead']}")
    return "\n".join(lines)
