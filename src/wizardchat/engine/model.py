"""Load a GGUF through llama-cpp-python with wizardchat's defaults, expert placement and logging."""

from __future__ import annotations

import contextlib
import ctypes
import io
import threading
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import IO, Any, Protocol

import llama_cpp
import llama_cpp.llama as llama_module
from llama_cpp import Llama

from wizardchat.engine import ggml
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


class CountingLlama(Llama):  # type: ignore[misc]
    """A Llama that counts the tokens it evaluates, so stats show real prefix-cache reuse.

    Only its loading, tokenizer and KV-cache record (`input_ids[:n_tokens]`) are used: tokens
    are evaluated by engine/decoder.py, which keeps that record and `evaluated_tokens`.
    """

    evaluated_tokens: int = 0
    _metadata: dict[str, str]

    @property
    def metadata(self) -> dict[str, str]:
        """The model's metadata as Llama reads it, without its chat templates."""
        return self._metadata

    @metadata.setter
    def metadata(self, value: dict[str, str]) -> None:
        # Llama.__init__ compiles every chat template it finds in the metadata, and a broken
        # Jinja template stops the load. wizardchat builds the WizardLM-2 prompt itself and
        # never uses them, so Llama never sees them.
        self._metadata = {
            key: text
            for key, text in value.items()
            if not key.startswith("tokenizer.chat_template")
        }

    def close(self) -> None:
        decoder = self.__dict__.pop("decoder", None)
        if decoder is not None:
            decoder.close()
        super().close()


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


def load(
    settings: Settings,
    overrides: list[Override],
    *,
    progress: ProgressFn | None = None,
    log: IO[str] | None = None,
) -> tuple[CountingLlama, LoadPlan, GGUFInfo, OverrideArray]:
    """Check and load the model; return the Llama, its plan, its header and the live overrides."""
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
    # Llama prints its own chatter to sys.stderr when verbose; keep it in the log with
    # llama.cpp's lines. verbose=True also stops it from dup2-ing fds 1 and 2 to /dev/null.
    chatter = log if log is not None else io.StringIO()
    sink.last_error = ""
    sink.interrupted = False
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
        if hook.interrupted or sink.interrupted:
            sink.interrupted = False
            raise KeyboardInterrupt from None
        reason = sink.last_error.split(": ", 1)[-1] or str(e)
        where = getattr(log, "name", "the log")
        raise LoadError(
            f"llama.cpp could not load {path.name}: {reason} (details: {where})"
        ) from None
    if hook.interrupted or sink.interrupted:  # Ctrl-C after the last progress call
        sink.interrupted = False
        llm.close()
        raise KeyboardInterrupt
    llm.verbose = False  # no per-turn "prefix-match hit" prints on stderr
    return llm, plan, info, override_array
