"""ctypes bindings to the ggml backend API in the shared libraries shipped with llama_cpp."""

from __future__ import annotations

import ctypes
import functools
import types
from dataclasses import dataclass
from typing import Any

DEVICE_TYPES = {0: "CPU", 1: "GPU", 2: "IGPU", 3: "ACCEL", 4: "META"}


@functools.cache
def libggml() -> Any:
    """The ggml backend API of the libggml that llama.cpp itself uses, bound once.

    The functions are looked up through libllama's handle (dlsym searches its dependencies).
    The wheel also ships a second copy of the library (libggml.so beside libggml.so.0); loading
    that one by path would give a separate device registry that llama.cpp never sees, so RPC
    devices registered there would not be used. `lib[name]` makes fresh function objects,
    leaving llama_cpp's own cached ones untouched.
    """
    from wizardchat.engine.llama_lib import lib as bindings

    lib = bindings._lib
    vp, cp, sz = ctypes.c_void_p, ctypes.c_char_p, ctypes.c_size_t
    signatures: dict[str, tuple[list[Any], Any]] = {
        "ggml_backend_dev_count": ([], sz),
        "ggml_backend_dev_get": ([sz], vp),
        "ggml_backend_dev_by_type": ([ctypes.c_int], vp),
        "ggml_backend_dev_type": ([vp], ctypes.c_int),
        "ggml_backend_dev_name": ([vp], cp),
        "ggml_backend_dev_description": ([vp], cp),
        "ggml_backend_dev_buffer_type": ([vp], vp),
        "ggml_backend_dev_memory": ([vp, ctypes.POINTER(sz), ctypes.POINTER(sz)], None),
        "ggml_backend_dev_backend_reg": ([vp], vp),
        "ggml_backend_buft_name": ([vp], cp),
        "ggml_backend_reg_count": ([], sz),
        "ggml_backend_reg_get": ([sz], vp),
        "ggml_backend_reg_name": ([vp], cp),
        "ggml_version": ([], cp),
        "ggml_commit": ([], cp),
    }
    api = types.SimpleNamespace()
    for name, (argtypes, restype) in signatures.items():
        fn = lib[name]
        fn.argtypes, fn.restype = argtypes, restype
        setattr(api, name, fn)
    return api


@dataclass(frozen=True)
class Device:
    """One ggml backend device (CPU, a GPU, an RPC server...)."""

    handle: int
    name: str
    description: str
    kind: str
    buffer_type: str
    free_bytes: int
    total_bytes: int
    backend: str = ""  # the backend that registered it: "CPU", "CUDA", "RPC"...

    @property
    def listed_kind(self) -> str:
        """The kind to show a person: "RPC" for a worker's device, which llama.cpp types GPU
        whatever the worker serves (its CPU too); otherwise llama.cpp's type (CPU, GPU...)."""
        return "RPC" if self.backend == "RPC" else self.kind


def devices() -> list[Device]:
    """All devices the ggml backends registered, in llama.cpp's order."""
    lib = libggml()
    found = []
    for i in range(lib.ggml_backend_dev_count()):
        dev = lib.ggml_backend_dev_get(i)
        free, total = ctypes.c_size_t(0), ctypes.c_size_t(0)
        lib.ggml_backend_dev_memory(dev, ctypes.byref(free), ctypes.byref(total))
        buft = lib.ggml_backend_dev_buffer_type(dev)
        reg = lib.ggml_backend_dev_backend_reg(dev)
        found.append(
            Device(
                handle=dev,
                name=lib.ggml_backend_dev_name(dev).decode(),
                description=lib.ggml_backend_dev_description(dev).decode(),
                kind=DEVICE_TYPES.get(lib.ggml_backend_dev_type(dev), "?"),
                buffer_type=lib.ggml_backend_buft_name(buft).decode() if buft else "",
                free_bytes=free.value,
                total_bytes=total.value,
                backend=lib.ggml_backend_reg_name(reg).decode() if reg else "",
            )
        )
    return found


def buffer_types() -> dict[str, int]:
    """Buffer type name -> ggml_backend_buffer_type_t, the names `-ot REGEX=BUFFER` accepts."""
    lib = libggml()
    found: dict[str, int] = {}
    for i in range(lib.ggml_backend_dev_count()):
        buft = lib.ggml_backend_dev_buffer_type(lib.ggml_backend_dev_get(i))
        if buft:
            found[lib.ggml_backend_buft_name(buft).decode()] = buft
    return found


def backends() -> list[str]:
    """Names of the backends compiled into this llama.cpp build (CPU, CUDA, Metal, RPC...)."""
    lib = libggml()
    return [
        lib.ggml_backend_reg_name(lib.ggml_backend_reg_get(i)).decode()
        for i in range(lib.ggml_backend_reg_count())
    ]


def version() -> str:
    """ggml's version and commit, e.g. '0.25.3 (0c1e570)'."""
    lib = libggml()
    return f"{lib.ggml_version().decode()} ({lib.ggml_commit().decode()})"


def binding_version() -> str:
    """llama-cpp-python's version, e.g. '0.3.36' (the binding that carries this llama.cpp)."""
    from wizardchat.engine.llama_lib import VERSION

    return VERSION
