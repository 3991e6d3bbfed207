"""The one fit model: where each part of a model sits on a machine, at which context, as pure
arithmetic. `find_fit` answers for every caller with the same margins: the quant choice
(`pull --list`, `run`'s offer), the default context and the load plan, `doctor` and `bench`.

Decoding one token reads every shared byte of the model (attention, norms, router, output) and
`n_expert_used / n_expert` of each layer's expert bytes, so a byte of VRAM spent on shared tensors
or the KV cache saves four times more host-memory reads than a byte spent on experts (8 experts,
2 used). The fit therefore keeps all shared tensors and the KV cache on the GPU(s) and moves
whole layers' experts to system RAM (llama.cpp's `--n-cpu-moe N`: layers 0..N-1) until the rest
fits; only when even that fails does it offload fewer layers (`-ngl`), and only when nothing fits
in any arrangement does it halve the context. The order of preference:

1. everything on the GPU(s): `-ngl n_layer+1`, `--n-cpu-moe 0`;
2. all layers on the GPU(s) with the fewest expert layers in RAM;
3. fewer GPU layers (llama.cpp offloads the *last* ngl layers; the output goes with ngl >
   n_layer), and among those the fewest expert layers in RAM: the largest ngl wins first;
4. a smaller context (halved down to `MIN_CTX`), with a quantized KV cache suggested in the notes.

The automatic context is the model's trained one when it fits, else the largest halving of it
that fits (not below `MIN_CTX`); a model that fits at none does not fit this machine.

Several GPUs (and RPC servers, which count like GPUs) share the offloaded layers the way
llama.cpp's default tensor split does: in proportion to their free memory, by layer count, in
device order. The plan follows that rule exactly instead of inventing a better split, so it holds
without a `--tensor-split` flag; `--n-cpu-moe` then relieves the first device first.

Working memory left free on each GPU (documented guesses, not measurements of llama.cpp):
`margin_bytes` (1 GiB: cuBLAS workspace, graph buffers, logits, fragmentation) plus the attention
scratch of one layer at the planned context (flash attention: the f16 KQ mask, `n_ctx * n_ubatch *
2`, and f16 copies of one layer's K and V, `n_ctx * n_embd_kv * 4`; without it the f32 KQ scores,
`n_ctx * n_ubatch * n_head * 4`), plus, on the first GPU, half of the largest layer's expert bytes
(about one expert tensor) when any weights stay in RAM: for prompt batches llama.cpp copies those
weights to the GPU ("op offload"). System RAM keeps `RAM_RESERVE` (2 GiB) for the OS and the
process, plus the attention scratch when layers run on the CPU.

Nothing here touches the machine: plan/machine.py describes it, plan/shapes.py the model,
plan/report.py writes the answer as text.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, replace

from wizardchat.errors import UsageError
from wizardchat.ggml_types import (
    FLASH_ATTN_CHOICES,
    KV_CACHE_TYPES,
    flash_attn_enabled,
    is_quantized,
)
from wizardchat.plan import report
from wizardchat.plan.machine import Machine
from wizardchat.plan.report import gb, rate_text
from wizardchat.plan.search import DEFAULT_MARGIN, RAM_RESERVE, FitSearch, MemoryUse
from wizardchat.plan.shapes import FitError, ModelShape

DEFAULT_UBATCH = 512
# The least context a fit may shrink to, for every caller: `pull --list` says a quant fits when
# it fits with this many tokens of KV cache ("an 8K-token KV cache"), and the load refuses less.
MIN_CTX = 8192
FALLBACK_CTX = 4096  # the context of a model whose header names none (llama.cpp's default)


@dataclass(frozen=True)
class Fit:
    """The fit model's answer for one model on one machine: where each part sits, the
    context, whether it fits, and what a token costs."""

    n_gpu_layers: int  # llama.cpp -ngl (0 = CPU only; n_layer+1 = everything incl. output)
    n_cpu_moe: int  # layers 0..n_cpu_moe-1 keep experts in RAM
    n_ctx: int
    flash_attn: bool
    type_k: str
    type_v: str
    placement: tuple[tuple[str, int], ...]  # memory -> bytes of weights + KV there
    read_per_token: tuple[tuple[str, int], ...]  # memory -> bytes read per generated token
    decode_bound: float | None  # tok/s from the bandwidths, None when one is unknown
    ctx_reduced: bool
    notes: tuple[str, ...]
    n_layer: int = 0
    requested_ctx: int = 0
    memories: tuple[MemoryUse, ...] = ()
    fits: bool = True  # False only for explicit flags the fit would not have chosen
    tensor_split: tuple[float, ...] = ()  # the GPUs' shares of the offloaded layers

    @property
    def gpu_uses(self) -> tuple[MemoryUse, ...]:
        """The GPU/RPC memories that hold a layer or the output."""
        return tuple(u for u in self.memories if u.memory.kind != "RAM" and (u.layers or u.output))

    @property
    def experts_in_ram(self) -> tuple[int, ...]:
        """Layers whose shared tensors are on a GPU but whose experts stay in RAM."""
        on_gpu = {i for u in self.gpu_uses for i in u.layers}
        ram = [u for u in self.memories if u.memory.kind == "RAM"]
        return tuple(i for u in ram for i in u.expert_layers if i in on_gpu)

    def flags(self) -> str:
        """The placement as llama.cpp command-line flags."""
        return report.flags_text(self)

    def one_line(self) -> str:
        """The fit in one line, for the start of a chat (the plan line)."""
        return report.one_line(self)

    def rows(self) -> list[tuple[str, str]]:
        """The full fit as (label, value) rows, for doctor and /show."""
        return report.rows(self)


def _ctx_candidates(n_ctx: int, min_ctx: int, fixed: bool) -> list[int]:
    candidates = [n_ctx]
    if fixed:
        return candidates
    c = n_ctx
    while c // 2 >= min_ctx:
        c //= 2
        candidates.append(c)
    if candidates[-1] > min_ctx:
        candidates.append(min_ctx)
    return candidates


def _solve(
    setup: FitSearch,
    candidates: Sequence[int],
    fixed_ngl: int | None,
    fixed_moe: int | None,
) -> tuple[int, int, int] | None:
    for ctx in candidates:
        found = setup.search(ctx, fixed_ngl, fixed_moe)
        if found:
            return found[0], found[1], ctx
    return None


def _reads_and_bound(
    uses: Sequence[MemoryUse],
) -> tuple[tuple[tuple[str, int], ...], float | None]:
    reads = tuple((u.memory.name, u.read_per_token) for u in uses if u.read_per_token > 0)
    seconds = 0.0
    for u in uses:
        if u.read_per_token <= 0:
            continue
        if not u.memory.bandwidth:
            return reads, None
        seconds += u.read_per_token / u.memory.bandwidth
    return reads, (1.0 / seconds if seconds > 0 else None)


def find_fit(
    shape: ModelShape,
    machine: Machine,
    *,
    n_ctx: int | None = None,
    fixed_ctx: bool = False,
    type_k: str = "f16",
    type_v: str = "f16",
    flash_attn: str = "auto",
    margin_bytes: int = DEFAULT_MARGIN,
    min_ctx: int = MIN_CTX,
    n_ubatch: int = DEFAULT_UBATCH,
    n_gpu_layers: int | None = None,
    n_cpu_moe: int | None = None,
) -> Fit:
    """Choose -ngl, --n-cpu-moe and the context for `shape` on `machine`.

    `n_ctx` None is the automatic context: the trained one, halved down to `min_ctx` until it
    fits. A given `n_ctx` is halved the same way unless `fixed_ctx` (an explicit --ctx-size)
    keeps it. `n_gpu_layers` (-1 = all) and `n_cpu_moe` are explicit flags: given, they are
    kept and only the rest is searched; a combination that does not fit comes back with
    `fits=False`, a note, and the smallest context tried. A model that does not fit at all
    raises FitError with the numbers.
    """
    for name, kv_type in (("type_k", type_k), ("type_v", type_v)):
        if kv_type not in KV_CACHE_TYPES:
            raise UsageError(f"{name} must be one of {', '.join(KV_CACHE_TYPES)}, not {kv_type!r}")
    if flash_attn not in FLASH_ATTN_CHOICES:
        raise UsageError(f"flash_attn must be one of {', '.join(FLASH_ATTN_CHOICES)}")
    if n_ctx is None:
        n_ctx, fixed_ctx = shape.n_ctx_train or FALLBACK_CTX, False
    if n_ctx <= 0:
        raise UsageError(f"n_ctx must be positive, not {n_ctx}")
    notes: list[str] = []
    n = shape.n_layer
    fa = flash_attn_enabled(flash_attn, type_v)
    if fa and flash_attn == "off":
        notes.append(f"flash attention on: llama.cpp needs it for a {type_v} V cache")
    gpus = machine.gpus
    fixed_ngl = n_gpu_layers
    if fixed_ngl is not None and (fixed_ngl < 0 or fixed_ngl > n + 1):
        fixed_ngl = n + 1
    if fixed_ngl is not None and not gpus:
        fixed_ngl = None
    fixed_moe = None if n_cpu_moe is None else max(0, min(n_cpu_moe, n))
    setup = FitSearch(shape, gpus, machine.ram, type_k, type_v, fa, margin_bytes, n_ubatch)
    candidates = _ctx_candidates(n_ctx, min_ctx, fixed_ctx)
    solved = _solve(setup, candidates, fixed_ngl, fixed_moe)
    fits = True
    if solved is None:
        _check_total(setup, candidates[-1], fixed_ctx)
        if fixed_ngl is None and fixed_moe is None:
            raise _no_split_error(setup, candidates[-1])
        ngl = n + 1 if fixed_ngl is None else fixed_ngl
        moe = n if fixed_moe is None else fixed_moe
        solved, fits = (ngl if gpus else 0, moe, candidates[-1]), False
    ngl, moe, ctx = solved
    uses = setup.layout(ngl, moe, ctx)
    if not fits:
        over = "; ".join(
            f"{u.memory.name} needs {gb(u.need)} of {gb(u.memory.limit)}"
            for u in uses
            if not u.fits
        )
        notes.append(f"the given flags do not fit: {over}; llama.cpp may fail to load")
    elif ctx < n_ctx:
        notes.append(
            f"context reduced from {n_ctx} to {ctx}: the KV cache of {n_ctx} tokens "
            f"({gb(shape.kv_bytes_per_token(type_k, type_v) * n_ctx)}) does not fit beside "
            "the model"
        )
    notes += _kv_suggestion(setup, ngl, moe, ctx, n_ctx, candidates, fixed_ngl, fixed_moe)
    ram_use = uses[-1]
    if ram_use.need > machine.ram.free_bytes and ram_use.fits:
        notes.append(
            f"the RAM part ({gb(ram_use.need)}) exceeds the free RAM "
            f"({gb(machine.ram.free_bytes)}): the memory-mapped model is paged in from disk as "
            "it is read, slowly until cached"
        )
    if not gpus:
        notes.append("no GPU: every layer runs on the CPU from system RAM")
    reads, bound = _reads_and_bound(uses)
    return Fit(
        n_gpu_layers=ngl if gpus else 0,
        n_cpu_moe=moe,
        n_ctx=ctx,
        flash_attn=fa,
        type_k=type_k,
        type_v=type_v,
        placement=tuple((u.memory.name, u.weights + u.kv) for u in uses if u.weights + u.kv),
        read_per_token=reads,
        decode_bound=bound,
        ctx_reduced=fits and ctx < n_ctx,
        notes=tuple(notes),
        n_layer=n,
        requested_ctx=n_ctx,
        memories=uses,
        fits=fits,
        tensor_split=_shares(setup.splits),
    )


def _shares(splits: Sequence[float]) -> tuple[float, ...]:
    """Cumulative split points -> each device's share."""
    if not splits:
        return ()
    return tuple(b - a for a, b in zip((0.0, *splits[:-1]), splits, strict=True))


def _kv_suggestion(
    setup: FitSearch,
    ngl: int,
    moe: int,
    ctx: int,
    n_ctx: int,
    candidates: Sequence[int],
    fixed_ngl: int | None,
    fixed_moe: int | None,
) -> list[str]:
    """A note when a q8_0 KV cache would buy a longer context or more of the model on the GPU."""
    n = setup.shape.n_layer
    if is_quantized(setup.type_k) or is_quantized(setup.type_v):
        return []
    if ctx == n_ctx and (not setup.gpus or (ngl == n + 1 and moe == 0)):
        return []
    q8 = replace(setup, type_k="q8_0", type_v="q8_0", flash_attn=True)
    alt = _solve(q8, candidates, fixed_ngl, fixed_moe)
    if alt is None:
        return []
    alt_ngl, alt_moe, alt_ctx = alt
    flags = "--cache-type-k q8_0 --cache-type-v q8_0 (needs flash attention)"
    if alt_ctx > ctx:
        return [f"a q8_0 KV cache, {flags}, would fit ctx {alt_ctx}"]
    if alt_ctx == ctx and (alt_ngl, -alt_moe) > (ngl, -moe):
        uses = q8.layout(alt_ngl, alt_moe, alt_ctx)
        bound = _reads_and_bound(uses)[1]
        gain = f" (~{rate_text(bound)} tok/s bound)" if bound else ""
        more = moe - alt_moe if alt_ngl == ngl else alt_ngl - ngl
        layers = f"{more} more layer{'s' if more > 1 else ''}"
        where = f"experts of {layers} on the GPU" if alt_ngl == ngl else f"{layers} on the GPU"
        return [f"a q8_0 KV cache, {flags}, would keep {where}{gain}"]
    return []


def _needs(setup: FitSearch, n_ctx: int) -> tuple[int, int, int]:
    """(weights, KV, least working memory) of the whole model at `n_ctx`."""
    s = setup.shape
    kv = s.kv_bytes_per_token(setup.type_k, setup.type_v) * n_ctx
    reserve = RAM_RESERVE + (setup.margin_bytes + setup.scratch(n_ctx) if setup.gpus else 0)
    return s.total_bytes, kv, reserve


def _working(setup: FitSearch, n_ctx: int, reserve: int) -> str:
    """The working memory, naming -ub when its compute buffers are a large part of it."""
    text = f"{gb(reserve)} working memory"
    if setup.gpus and setup.scratch(n_ctx) * 2 > reserve:
        text += f", mostly compute buffers for -ub {min(setup.n_ubatch, n_ctx)}"
    return text


def _machine(setup: FitSearch) -> str:
    if not setup.gpus:
        return f"this machine has {gb(setup.ram.limit)} RAM and no GPU"
    gpu = sum(g.free_bytes for g in setup.gpus)
    kinds = "/".join(sorted({g.kind for g in setup.gpus}))
    return f"this machine has {gb(setup.ram.limit)} RAM + {gb(gpu)} {kinds}"


def _check_total(setup: FitSearch, n_ctx: int, fixed_ctx: bool) -> None:
    weights, kv, reserve = _needs(setup, n_ctx)
    have = setup.ram.limit + sum(g.free_bytes for g in setup.gpus)
    short = weights + kv + reserve - have
    if short <= 0:
        return
    hints = ["a smaller quant", "more RAM", "an RPC worker"]
    if not is_quantized(setup.type_v) and kv // 2 >= short:
        hints.insert(0, "a q8_0 KV cache")
    if fixed_ctx:
        hints.insert(0, "a smaller --ctx-size")
    name = setup.shape.name or "the model"
    raise FitError(
        f"{name} needs {gb(weights + kv + reserve)} at ctx {n_ctx} ({gb(weights)} weights + "
        f"{gb(kv)} KV cache + {_working(setup, n_ctx, reserve)}); {_machine(setup)}: "
        f"try {', '.join(hints[:-1])} or {hints[-1]}"
    )


def _no_split_error(setup: FitSearch, n_ctx: int) -> FitError:
    weights, kv, reserve = _needs(setup, n_ctx)
    name = setup.shape.name or "the model"
    return FitError(
        f"{name} needs {gb(weights + kv + reserve)} at ctx {n_ctx} ({gb(weights)} weights + "
        f"{gb(kv)} KV cache + {_working(setup, n_ctx, reserve)}) and does not split to fit: "
        f"{_machine(setup)}, and each device must hold its own share"
    )
