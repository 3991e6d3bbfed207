"""Load a GGUF through llama-cpp-python with wizardchat's defaults, expert placement and logging."""

from __future__ import annotations

import contextlib
import ctypes
import io
import threading
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import IO, Any

import llama_cpp
import llama_cpp.llama as llama_module
from llama_cpp import Llama

from wizardchat import hardware
from wizardchat.engine import ggml
from wizardchat.engine.offload import Offload, plan_offload
from wizardchat.engine.placement import Override, OverrideArray, expert_overrides
from wizardchat.errors import LoadError, WizardchatError
from wizardchat.gguf_file import GGUFInfo, inspect_model, model_bytes
from wizardchat.safe_text import terminal_safe
from wizardchat.settings import KV_CACHE_TYPES, Settings

LLAMA_CPP_VERSION = "0.3.36"
# llama.cpp pads every context to a multiple of this (llama-context.cpp: GGML_PAD(n_ctx, 256)).
CTX_PAD = 256
ProgressFn = Callable[[float], None]


def check_binding_layout() -> None:
    """Fail clearly if llama-cpp-python is not the version whose struct layout we fill by hand."""
    fields = [name for name, _ in llama_cpp.llama_model_params._fields_[:2]]
    offset = llama_cpp.llama_model_params.tensor_buft_overrides.offset
    if (
        llama_cpp.__version__ != LLAMA_CPP_VERSION
        or fields != ["devices", "tensor_buft_overrides"]
        or offset != ctypes.sizeof(ctypes.c_void_p)
    ):
        raise LoadError(
            f"llama-cpp-python {llama_cpp.__version__} is installed but wizardchat needs "
            f"exactly {LLAMA_CPP_VERSION}: pip install llama-cpp-python=={LLAMA_CPP_VERSION}"
        )


class _LogSink:
    """Where llama.cpp's log goes: a file, or stderr with --verbose. One per process."""

    ERROR = 4  # GGML_LOG_LEVEL_ERROR in ggml.h (llama_cpp/_logger.py says 3: stale)

    def __init__(self) -> None:
        self.stream: IO[str] | None = None
        self.last_error = ""  # llama.cpp's own reason when a load fails
        self._lock = threading.Lock()
        # ctypes must keep the callback object alive for as long as llama.cpp may call it.
        self.callback = llama_cpp.llama_log_callback(self._write)

    def _write(self, level: int, text: bytes, user_data: ctypes.c_void_p) -> None:
        line = text.decode("utf-8", errors="replace")
        with self._lock:
            if level == self.ERROR and line.strip():
                self.last_error = line.strip()
            if self.stream is not None and not self.stream.closed:
                # The log quotes the model's path and metadata: untrusted text, read by people.
                self.stream.write(terminal_safe(line))
                self.stream.flush()

    def attach(self, stream: IO[str] | None) -> None:
        with self._lock:
            self.stream = stream
        llama_cpp.llama_log_set(self.callback, ctypes.c_void_p(0))


_sink = _LogSink()


def route_llama_log(stream: IO[str] | None) -> None:
    """Send llama.cpp's log lines (all levels, DEBUG included) to `stream`; None drops them."""
    _sink.attach(stream)


class CountingLlama(Llama):  # type: ignore[misc]
    """A Llama that counts the tokens it evaluates, so stats show real prefix-cache reuse."""

    evaluated_tokens: int = 0

    def eval(self, tokens: Any) -> None:
        self.evaluated_tokens += len(tokens)
        super().eval(tokens)


_params_lock = threading.Lock()


@contextlib.contextmanager
def _model_params_patch(
    overrides: OverrideArray, progress: Callable[[float, Any], bool] | None
) -> Iterator[None]:
    """Make `Llama.__init__` start from model params that carry our overrides and progress hook.

    Llama builds its params from `llama_model_default_params()` and has no argument for
    tensor_buft_overrides (upstream PR #2007 is open), so for the duration of one load the
    default is swapped for one that fills the fields Llama leaves alone.
    """
    original = llama_module.llama_cpp.llama_model_default_params
    callback = llama_cpp.llama_progress_callback(progress) if progress else None

    def defaults_with_overrides() -> Any:
        params = original()
        params.tensor_buft_overrides = overrides.address
        if callback is not None:
            params.progress_callback = callback
        return params

    with _params_lock:
        llama_module.llama_cpp.llama_model_default_params = defaults_with_overrides
        try:
            yield
        finally:
            llama_module.llama_cpp.llama_model_default_params = original


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
    offload: Offload | None = None  # the automatic plan and why it is on or off
    ctx_requested: int = 0  # -c as given, when llama.cpp's padding rounded it up to n_ctx


def pad_context(n_ctx: int) -> int:
    """The context llama.cpp really makes for `n_ctx`: rounded up to a multiple of 256.

    wizardchat asks for exactly that size, so llama-cpp-python's token buffer (sized from the
    request) and llama.cpp's KV cache (padded) agree, and every figure shows the same number.
    """
    return -(-n_ctx // CTX_PAD) * CTX_PAD


def plan_load(
    settings: Settings, path: Path, info: GGUFInfo, overrides: list[Override]
) -> LoadPlan:
    """Resolve 'auto' settings (context, threads, flash attention) for this model and machine."""
    n_ctx_train = int(info.arch_value("context_length", 4096))
    n_ctx, capped = pad_context(settings.ctx_size), False
    if n_ctx == 0:
        free = hardware.host_memory()[0] + sum(
            d.free_bytes for d in ggml.devices() if d.kind == "GPU"
        )
        free -= model_bytes(path, info) if not settings.mmap else 0
        kv = hardware.kv_bytes_per_token(info, settings.cache_type_k, settings.cache_type_v)
        n_ctx = pad_context(hardware.default_context(n_ctx_train, kv, free))
        capped = n_ctx < n_ctx_train
    n_gpu_layers = settings.n_gpu_layers
    offload = plan_offload(settings, info, n_ctx, int(info.arch_value("block_count", 0)))
    if offload.plan is not None:
        auto = offload.plan
        n_gpu_layers = auto.n_gpu_layers
        if auto.n_cpu_moe and not (settings.cpu_moe or settings.n_cpu_moe):
            overrides = overrides + expert_overrides(False, auto.n_cpu_moe)
        if settings.ctx_size == 0 and auto.n_ctx != n_ctx:
            n_ctx, capped = pad_context(auto.n_ctx), True
    quantized_v = settings.cache_type_v not in ("f32", "f16", "bf16")
    # llama.cpp refuses a quantized V cache without flash attention; every backend wizardchat
    # builds for (CPU, CUDA, Metal) implements it, so "auto" means on.
    flash = settings.flash_attn != "off" or quantized_v
    return LoadPlan(
        path=path,
        n_ctx=n_ctx,
        n_gpu_layers=n_gpu_layers,
        threads=settings.threads or hardware.physical_cores(),
        batch_size=settings.batch_size,
        ubatch_size=min(settings.ubatch_size, settings.batch_size),
        flash_attn=flash,
        type_k=settings.cache_type_k,
        type_v=settings.cache_type_v,
        overrides=tuple(overrides),
        ctx_capped=capped,
        offload=offload,
        ctx_requested=settings.ctx_size if settings.ctx_size != n_ctx else 0,
    )


class _Progress:
    """Adapts llama.cpp's progress callback; remembers a Ctrl-C raised inside it."""

    def __init__(self, report: ProgressFn | None) -> None:
        self.report = report
        self.interrupted = False

    def __call__(self, fraction: float, user_data: Any) -> bool:
        if self.interrupted:
            return False
        try:
            if self.report:
                self.report(fraction)
        except KeyboardInterrupt:
            # An exception cannot cross the C frame; returning False aborts the load instead.
            self.interrupted = True
            return False
        return True


def load(
    settings: Settings,
    overrides: list[Override],
    *,
    progress: ProgressFn | None = None,
    log: IO[str] | None = None,
) -> tuple[CountingLlama, LoadPlan, GGUFInfo, OverrideArray]:
    """Check and load the model; return the Llama, its plan, its header and the live overrides."""
    check_binding_layout()
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
    # Llama prints its own chatter to sys.stderr when verbose; keep it in the log with
    # llama.cpp's lines. verbose=True also stops it from dup2-ing fds 1 and 2 to /dev/null.
    chatter = log if log is not None else io.StringIO()
    _sink.last_error = ""
    try:
        with _model_params_patch(override_array, hook), contextlib.redirect_stderr(chatter):
            llm = CountingLlama(
                model_path=str(path),
                n_ctx=plan.n_ctx,
                n_gpu_layers=plan.n_gpu_layers,
                n_threads=plan.threads,
                n_threads_batch=plan.threads,  # llama.cpp: -tb defaults to -t
                n_batch=plan.batch_size,
                n_ubatch=plan.ubatch_size,
                flash_attn=plan.flash_attn,
                type_k=KV_CACHE_TYPES[plan.type_k],
                type_v=KV_CACHE_TYPES[plan.type_v],
                use_mlock=settings.mlock,
                use_mmap=settings.mmap,
                seed=settings.seed if settings.seed >= 0 else llama_cpp.LLAMA_DEFAULT_SEED,
                logits_all=False,
                verbose=True,
            )
    except ValueError as e:
        if hook.interrupted:
            raise KeyboardInterrupt from None
        reason = _sink.last_error.split(": ", 1)[-1] or str(e)
        where = getattr(log, "name", "the log")
        raise LoadError(
            f"llama.cpp could not load {path.name}: {reason} (details: {where})"
        ) from None
    if hook.interrupted:
        raise KeyboardInterrupt
    llm.verbose = False  # no per-turn "prefix-match hit" prints on stderr
    return llm, plan, info, override_array
