"""Load a GGUF through llama.cpp's C API, with wizardchat's defaults, placement and logging."""

from __future__ import annotations

import ctypes
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import IO, Any, Protocol

from wizardchat.engine import ggml
from wizardchat.engine.context import ModelContext
from wizardchat.engine.llama_lib import VERSION, lib
from wizardchat.engine.llama_log import install_abort_handler, route_llama_log, sink
from wizardchat.engine.offload import Offload, detect_machine, fit_load
from wizardchat.engine.placement import OverrideArray
from wizardchat.errors import LoadError, WizardchatError
from wizardchat.ggml_types import KV_CACHE_TYPES, flash_attn_enabled
from wizardchat.gguf_file import GGUFInfo, inspect_model
from wizardchat.plan.fit import FALLBACK_CTX
from wizardchat.plan.machine import Machine, physical_cores
from wizardchat.plan.placement import Override, expert_overrides
from wizardchat.plan.shapes import shape_from_gguf
from wizardchat.settings import Settings

LLAMA_CPP_VERSION = "0.3.36"
# llama.cpp pads every context to a multiple of this (llama-context.cpp: GGML_PAD(n_ctx, 256)).
CTX_PAD = 256
ProgressFn = Callable[[float], None]


class EvalProgress(Protocol):
    """Told how far the evaluation of a prompt got, and when it is over."""

    def update(self, done: int, total: int) -> None:
        """`done` of the prompt's `total` tokens are evaluated ((0, total) first)."""

    def end(self) -> None:
        """The prompt is evaluated, or its evaluation stopped: the reply comes next."""


# The fields of llama.cpp's parameter structs that load() sets.
MODEL_PARAMS_SET = {"n_gpu_layers", "load_mode", "tensor_buft_overrides", "progress_callback"}
CONTEXT_PARAMS_SET = {
    "n_ctx", "n_batch", "n_ubatch", "n_threads", "n_threads_batch", "flash_attn_type",
    "type_k", "type_v", "no_perf",
}  # fmt: skip


def check_binding_layout() -> None:
    """Fail clearly if llama-cpp-python is not the version whose struct layout we fill by hand."""
    fields = [name for name, _ in lib.llama_model_params._fields_[:2]]
    offset = lib.llama_model_params.tensor_buft_overrides.offset
    # A ctypes Structure takes any attribute: a field that is not there would be set on the
    # Python object and silently never reach llama.cpp.
    model_fields = {name for name, _ in lib.llama_model_params._fields_}
    context_fields = {name for name, _ in lib.llama_context_params._fields_}
    if (
        VERSION != LLAMA_CPP_VERSION
        or fields != ["devices", "tensor_buft_overrides"]
        or offset != ctypes.sizeof(ctypes.c_void_p)
        or not model_fields >= MODEL_PARAMS_SET
        or not context_fields >= CONTEXT_PARAMS_SET
    ):
        raise LoadError(
            f"llama-cpp-python {VERSION} is installed but wizardchat needs "
            f"exactly {LLAMA_CPP_VERSION}: pip install llama-cpp-python=={LLAMA_CPP_VERSION}"
        )


@dataclass(frozen=True)
class LoadPlan:
    """The resolved llama.cpp parameters for one load (what `--verbose` and stats report)."""

    path: Path
    n_ctx: int
    n_gpu_layers: int
    threads: int
    batch_size: int
    ubatch_size: int
    flash_attn: bool
    type_k: str
    type_v: str
    overrides: tuple[Override, ...]
    ctx_capped: bool
    offload: Offload | None = None  # the fit behind it, and why the placement is auto or not
    ctx_requested: int = 0  # -c as given, when llama.cpp's padding rounded it up to n_ctx


def pad_context(n_ctx: int) -> int:
    """The context llama.cpp really makes for `n_ctx`: rounded up to a multiple of 256.

    wizardchat asks for exactly that size, so llama-cpp-python's token buffer (sized from the
    request) and llama.cpp's KV cache (padded) agree, and every figure shows the same number.
    """
    return -(-n_ctx // CTX_PAD) * CTX_PAD


def plan_load(
    settings: Settings,
    path: Path,
    info: GGUFInfo,
    overrides: list[Override],
    machine: Machine | None = None,
) -> LoadPlan:
    """Resolve 'auto' settings (placement, context, threads, flash attention) for this model on
    `machine` (None: this one), through the one fit model."""
    n_ctx_train = int(info.arch_value("context_length", FALLBACK_CTX))
    offload = fit_load(
        settings,
        shape_from_gguf(info),
        machine or detect_machine(),
        pad_context(settings.ctx_size),
    )
    n_gpu_layers = settings.n_gpu_layers
    if offload.fit is not None:
        n_gpu_layers = offload.fit.n_gpu_layers
        if offload.fit.n_cpu_moe and not (settings.cpu_moe or settings.n_cpu_moe):
            overrides = overrides + expert_overrides(False, offload.fit.n_cpu_moe)
    n_ctx = pad_context(offload.n_ctx)
    return LoadPlan(
        path=path,
        n_ctx=n_ctx,
        n_gpu_layers=n_gpu_layers,
        threads=settings.threads or physical_cores(),
        batch_size=settings.batch_size,
        ubatch_size=min(settings.ubatch_size, settings.batch_size),
        flash_attn=flash_attn_enabled(settings.flash_attn, settings.cache_type_v),
        type_k=settings.cache_type_k,
        type_v=settings.cache_type_v,
        overrides=tuple(overrides),
        ctx_capped=settings.ctx_size == 0 and n_ctx < n_ctx_train,
        offload=offload,
        ctx_requested=settings.ctx_size if settings.ctx_size != n_ctx else 0,
    )


class _Progress:
    """Adapts llama.cpp's progress callback; remembers a Ctrl-C raised inside it, and stops the
    load on the next call after one was trapped in the log callback."""

    def __init__(self, report: ProgressFn | None) -> None:
        self.report = report
        self.interrupted = False

    def __call__(self, fraction: float, user_data: Any) -> bool:
        if self.interrupted or sink.interrupted:
            self.interrupted = True
            return False
        try:
            if self.report:
                self.report(fraction)
        except KeyboardInterrupt:
            # An exception cannot cross the C frame; returning False aborts the load instead.
            self.interrupted = True
            return False
        return True


_backend_ready = False


def _init_backend() -> None:
    """llama_backend_init, once per process (llama-cpp-python's Llama did it on first load)."""
    global _backend_ready
    if not _backend_ready:
        lib.llama_backend_init()
        _backend_ready = True


def _model_params(
    settings: Settings, plan: LoadPlan, overrides: OverrideArray, progress: Any
) -> Any:
    """llama_model_params for the plan: layers to offload, expert placement, mmap/mlock."""
    params = lib.llama_model_default_params()
    # llama.cpp takes "more layers than the model has" as all of them.
    params.n_gpu_layers = 0x7FFFFFFF if plan.n_gpu_layers < 0 else plan.n_gpu_layers
    if settings.mmap and settings.mlock:
        params.load_mode = lib.LLAMA_LOAD_MODE_MMAP_MLOCK
    elif settings.mlock:
        params.load_mode = lib.LLAMA_LOAD_MODE_MLOCK
    elif settings.mmap:
        params.load_mode = lib.LLAMA_LOAD_MODE_MMAP
    else:
        params.load_mode = lib.LLAMA_LOAD_MODE_NONE
    params.tensor_buft_overrides = overrides.address
    params.progress_callback = progress
    return params


def _context_params(plan: LoadPlan) -> Any:
    """llama_context_params for the plan."""
    params = lib.llama_context_default_params()
    params.n_ctx = plan.n_ctx
    params.n_batch = min(plan.n_ctx, plan.batch_size)
    params.n_ubatch = min(params.n_batch, plan.ubatch_size)
    params.n_threads = plan.threads
    params.n_threads_batch = plan.threads  # llama.cpp: -tb defaults to -t
    params.flash_attn_type = (
        lib.LLAMA_FLASH_ATTN_TYPE_ENABLED if plan.flash_attn else lib.LLAMA_FLASH_ATTN_TYPE_DISABLED
    )
    params.type_k = KV_CACHE_TYPES[plan.type_k]
    params.type_v = KV_CACHE_TYPES[plan.type_v]
    params.no_perf = True  # wizardchat times replies itself
    return params


def load(
    settings: Settings,
    overrides: list[Override],
    *,
    progress: ProgressFn | None = None,
    log: IO[str] | None = None,
) -> tuple[ModelContext, LoadPlan, GGUFInfo, OverrideArray]:
    """Check and load the model; return its context, plan, header and the live overrides
    (the C array the model was loaded with: kept alive as long as the model)."""
    check_binding_layout()
    install_abort_handler()
    path = settings.model_path
    if path is None:  # cli checks first; this guards direct callers
        raise WizardchatError("no model given")
    info = inspect_model(path)
    if log is not None:
        route_llama_log(log)
    if settings.rpc:  # the workers' devices must be registered before planning and loading
        from wizardchat.engine.rpc import add_servers

        add_servers(settings.rpc)
    plan = plan_load(settings, path, info, overrides)
    override_array = OverrideArray(list(plan.overrides), ggml.buffer_types())
    hook = _Progress(progress)
    callback = lib.llama_progress_callback(hook)  # alive until the load returns
    sink.last_error = ""
    sink.interrupted = False
    _init_backend()
    model = lib.llama_model_load_from_file(
        str(path).encode(), _model_params(settings, plan, override_array, callback)
    )
    ctx = None
    if model is not None and not (hook.interrupted or sink.interrupted):
        ctx = lib.llama_init_from_model(model, _context_params(plan))
    if hook.interrupted or sink.interrupted:
        sink.interrupted = False
        if ctx is not None:
            lib.llama_free(ctx)
        if model is not None:
            lib.llama_model_free(model)
        raise KeyboardInterrupt
    if model is None or ctx is None:
        if model is not None:
            lib.llama_model_free(model)
        fallback = "it could not read the model" if model is None else "it made no context"
        reason = sink.last_error.split(": ", 1)[-1] or fallback
        where = getattr(log, "name", "the log")
        raise LoadError(f"llama.cpp could not load {path.name}: {reason} (details: {where})")
    seed = settings.seed if settings.seed >= 0 else lib.LLAMA_DEFAULT_SEED
    # Budget the context as planned, never past the KV cache llama.cpp made.
    n_ctx = min(plan.n_ctx, int(lib.llama_n_ctx(ctx)))
    llm = ModelContext(model, ctx, n_ctx=n_ctx, n_batch=min(n_ctx, plan.batch_size), seed=seed)
    return llm, plan, info, override_array
