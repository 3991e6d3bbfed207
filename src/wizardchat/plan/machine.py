"""This machine: its cores, and its memories (RAM and GPUs, free bytes and bandwidth).

`Machine` is the one description of a machine that every fit uses (the quant choice, the
default context, the load plan, doctor, bench); the functions here fill it from the system
(`host_memory`, `machine_from_devices` with the devices engine/ lists) or measure it
(`measure_ram_bandwidth`). Only this module touches the machine.
"""

from __future__ import annotations

import ctypes
import math
import os
import re
import subprocess
import sys
import time
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol


def physical_cores() -> int:
    """Physical CPU cores usable by this process (llama.cpp's best thread count for decoding)."""
    logical = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    logical = logical or 1
    cores: int | None = None
    if sys.platform.startswith("linux"):
        siblings = set()
        for topo in Path("/sys/devices/system/cpu").glob("cpu[0-9]*/topology/thread_siblings_list"):
            try:
                siblings.add(topo.read_text().strip())
            except OSError:
                continue
        cores = len(siblings) or None
    elif sys.platform == "darwin":
        try:
            out = subprocess.run(
                ["sysctl", "-n", "hw.perflevel0.physicalcpu"],
                capture_output=True, text=True, timeout=2, check=True,
            )  # fmt: skip
            cores = int(out.stdout.strip())  # performance cores: efficiency cores slow decoding
        except (OSError, ValueError, subprocess.SubprocessError):
            cores = None
    return max(1, min(cores or logical, logical))


def host_memory() -> tuple[int, int]:
    """(available, total) bytes of system RAM."""
    if sys.platform.startswith("linux"):
        try:
            fields = {}
            for line in Path("/proc/meminfo").read_text().splitlines():
                key, _, rest = line.partition(":")
                fields[key] = int(rest.split()[0]) * 1024
            return fields.get("MemAvailable", fields["MemFree"]), fields["MemTotal"]
        except (OSError, KeyError, ValueError, IndexError):
            pass
    try:
        total = os.sysconf("SC_PHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
    except (ValueError, OSError, AttributeError):
        return 0, 0
    return int(total * 0.7), total  # macOS has no cheap "available"; assume most is reclaimable


@dataclass(frozen=True)
class Memory:
    """One place weights can sit: a GPU, an RPC server or system RAM."""

    name: str  # "CUDA0", "RAM", "RPC[127.0.0.1:50052]"...
    kind: str  # "GPU", "RAM" or "RPC"
    free_bytes: int
    bandwidth: float | None = None  # bytes/s, None if unknown
    # RAM only: with mmap the model may exceed the free RAM up to the total (the page cache
    # streams it, slowly); None means free_bytes is the limit.
    total_bytes: int | None = None

    @property
    def limit(self) -> int:
        """The most bytes this memory can hold in a plan."""
        if self.kind == "RAM" and self.total_bytes:
            return max(self.total_bytes, self.free_bytes)
        return self.free_bytes


@dataclass(frozen=True)
class Machine:
    """The one description of a machine every fit uses: its GPUs/RPC servers, in device order
    (llama.cpp's tensor split follows it), and its system RAM."""

    gpus: tuple[Memory, ...]
    ram: Memory

    @classmethod
    def sized(cls, ram: int, gpus: Sequence[int] = (), *, ram_free: int | None = None) -> Machine:
        """A machine of `ram` bytes of RAM (`ram_free` of them free; default all) and GPUs of
        these free bytes, bandwidths unknown: what tests and `pull --list` examples describe."""
        return cls(
            tuple(Memory(f"GPU{i}", "GPU", g) for i, g in enumerate(gpus)),
            Memory("RAM", "RAM", ram if ram_free is None else ram_free, total_bytes=ram),
        )

    @property
    def gpu_bytes(self) -> int:
        """The free bytes of all GPUs/RPC servers together."""
        return sum(g.free_bytes for g in self.gpus)


# Peak memory bandwidth (bytes/s) by device description; every word must appear, first match
# wins, so specific entries come before general ones. Vendor data-sheet figures.
GPU_BANDWIDTHS: tuple[tuple[tuple[str, ...], float], ...] = (
    (("gh200",), 4.0e12),
    (("h200",), 4.8e12),
    (("h100", "pcie"), 2.0e12),
    (("h100", "nvl"), 3.9e12),
    (("h100",), 3.35e12),  # SXM
    (("h800", "pcie"), 2.0e12),
    (("h800",), 3.35e12),
    (("b200",), 8.0e12),
    (("a100", "40gb"), 1.555e12),
    (("a100",), 2.0e12),  # 80 GB: 1.94 (PCIe) to 2.04 (SXM)
    (("l40s",), 0.864e12),
    (("l40",), 0.864e12),
    (("l4",), 0.3e12),
    (("a40",), 0.696e12),
    (("a10g",), 0.6e12),
    (("a10",), 0.6e12),
    (("v100",), 0.9e12),
    (("t4",), 0.32e12),
    (("rtx", "5090"), 1.792e12),
    (("rtx", "4090"), 1.008e12),
    (("rtx", "4080"), 0.717e12),
    (("rtx", "3090", "ti"), 1.008e12),
    (("rtx", "3090"), 0.936e12),
    (("rtx", "pro", "6000"), 1.792e12),
    (("rtx", "6000", "ada"), 0.96e12),
    (("rtx", "a6000"), 0.768e12),
    (("mi325x",), 6.0e12),
    (("mi300x",), 5.3e12),
    (("mi250x",), 3.2e12),
    (("mi250",), 3.2e12),
    (("m1", "ultra"), 0.8e12),
    (("m2", "ultra"), 0.8e12),
    (("m3", "ultra"), 0.819e12),
    (("m1", "max"), 0.4e12),
    (("m2", "max"), 0.4e12),
    (("m3", "max"), 0.4e12),
    (("m4", "max"), 0.546e12),
    (("m4", "pro"), 0.273e12),
)


def gpu_bandwidth(description: str) -> float | None:
    """Peak memory bandwidth of a GPU from its description ("NVIDIA H100 PCIe"), if known."""
    words = set(re.split(r"[^a-z0-9]+", description.lower()))
    for needed, bandwidth in GPU_BANDWIDTHS:
        if words.issuperset(needed):
            return bandwidth
    return None


class DeviceLike(Protocol):
    """What `machine_from_devices` reads of a device (wizardchat.engine.ggml.Device fits)."""

    @property
    def name(self) -> str: ...
    @property
    def description(self) -> str: ...
    @property
    def kind(self) -> str: ...
    @property
    def free_bytes(self) -> int: ...


def machine_from_devices(
    devices: Sequence[DeviceLike],
    *,
    ram_bandwidth: float | None = None,
    host: tuple[int, int] | None = None,
) -> Machine:
    """The GPUs/RPC servers and the system RAM as fit memories (reads /proc/meminfo).

    `host` is (available, total) RAM, read from the system when None. An integrated GPU or an
    Apple GPU shares the system RAM, so what it can take is not counted twice.
    """
    available, total = host if host is not None else host_memory()
    gpus: list[Memory] = []
    for d in devices:
        if d.name.upper().startswith("RPC"):
            gpus.append(Memory(d.name, "RPC", d.free_bytes))
        elif d.kind in ("GPU", "IGPU"):
            gpus.append(Memory(d.name, "GPU", d.free_bytes, gpu_bandwidth(d.description)))
            if d.kind == "IGPU" or d.description.lower().startswith("apple"):
                available = max(available - d.free_bytes, 0)
                total = max(total - d.free_bytes, 0)
    return Machine(tuple(gpus), Memory("RAM", "RAM", available, ram_bandwidth, total))


def measure_ram_bandwidth(seconds_budget: float = 0.2, *, size: int = 256 << 20) -> float:
    """Host memory bandwidth in bytes/s, to an order of magnitude.

    Copies a `size`-byte buffer with `ctypes.memmove` (which releases the GIL) split over one
    thread per physical core, up to 16, repeated for about `seconds_budget` after the pages are
    touched; the best round counts `2 * size` bytes (read + write). It is not STREAM: it says
    "60 GB/s desktop" or "300 GB/s server", good enough for a decode bound.
    """
    threads = max(1, min(physical_cores(), 16))
    chunk = max(size // threads // 4096 * 4096, 4096)
    size = chunk * threads
    src = (ctypes.c_char * size)()
    dst = (ctypes.c_char * size)()
    src_at, dst_at = ctypes.addressof(src), ctypes.addressof(dst)

    def touch(k: int) -> None:
        ctypes.memset(src_at + k * chunk, 1, chunk)
        ctypes.memset(dst_at + k * chunk, 0, chunk)

    def copy(k: int) -> None:
        ctypes.memmove(dst_at + k * chunk, src_at + k * chunk, chunk)

    best = math.inf
    with ThreadPoolExecutor(threads) as pool:
        list(pool.map(touch, range(threads)))
        deadline = time.perf_counter() + seconds_budget
        rounds = 0
        while rounds < 2 or (time.perf_counter() < deadline and rounds < 100):
            start = time.perf_counter()
            list(pool.map(copy, range(threads)))
            best = min(best, time.perf_counter() - start)
            rounds += 1
    return 2 * size / max(best, 1e-9)
