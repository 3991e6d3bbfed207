"""The offload planner: where each part of a MoE model sits on this machine, as pure arithmetic.

Decoding one token reads every shared byte of the model (attention, norms, router, output) and
`n_expert_used / n_expert` of each layer's expert bytes, so a byte of VRAM spent on shared tensors
or the KV cache saves four times more host-memory reads than a byte spent on experts (8 experts,
2 used). The planner therefore keeps all shared tensors and the KV cache on the GPU(s) and moves
whole layers' experts to system RAM (llama.cpp's `--n-cpu-moe N`: layers 0..N-1) until the rest
fits; only when even that fails does it offload fewer layers (`-ngl`), and only when nothing fits
in any arrangement does it halve the context. The order of preference:

1. everything on the GPU(s): `-ngl n_layer+1`, `--n-cpu-moe 0`;
2. all layers on the GPU(s) with the fewest expert layers in RAM;
3. fewer GPU layers (llama.cpp offloads the *last* ngl layers; the output goes with ngl >
   n_layer), and among those the fewest expert layers in RAM: the largest ngl wins first;
4. a smaller context (halved down to `min_ctx`), with a quantized KV cache suggested in the notes.

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

Only `shape_from_gguf` (for the other shards of a split model), `shape_from_path`,
`memories_from_devices`, `machine_memories` and `measure_ram_bandwidth` touch the machine.
"""

from __future__ import annotations

import bisect
import ctypes
import functools
import math
import re
import time
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Protocol

from wizardchat.errors import LoadError, UsageError
from wizardchat.gguf_file import GGUFInfo, quant_name, read_header, shard_paths
from wizardchat.plan.machine import physical_cores
from wizardchat.plan.placement import EXPERTS_REGEX

GIB = 1 << 30
DEFAULT_MARGIN = GIB  # fixed working memory per GPU
RAM_RESERVE = 2 * GIB  # system RAM left to the OS and this process
DEFAULT_UBATCH = 512
MIN_CTX = 4096
FLASH_ATTN_CHOICES = ("auto", "on", "off")
# KV cache type -> (block size in elements, bytes per block), as ggml stores them.
KV_TYPE_BLOCKS: dict[str, tuple[int, int]] = {
    "f32": (1, 4), "f16": (1, 2), "bf16": (1, 2), "q8_0": (32, 34), "q4_0": (32, 18),
    "q4_1": (32, 20), "q5_0": (32, 22), "q5_1": (32, 24), "iq4_nl": (32, 18),
}  # fmt: skip
_UNQUANTIZED_KV = ("f32", "f16", "bf16")
_EXPERTS_RE = re.compile(EXPERTS_REGEX)
_BLOCK_RE = re.compile(r"^blk\.(\d+)\.")


class PlanError(LoadError):
    """The model and its KV cache do not fit this machine's memories in any arrangement."""


# --------------------------------------------------------------------------------------------
# What the model is made of


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
class LayerSize:
    """Bytes of one transformer block (blk.N)."""

    shared: int  # attention, norms, router: everything in blk.N that is not an expert tensor
    experts: int  # blk.N.ffn_{gate,up,down}_exps (all experts)


@dataclass(frozen=True)
class ModelShape:
    """The sizes the planner needs: dimensions and the bytes of every layer."""

    n_layer: int
    n_embd: int
    n_head: int
    n_head_kv: int
    head_dim: int
    n_expert: int
    n_expert_used: int
    n_ctx_train: int
    layers: tuple[LayerSize, ...]
    input_bytes: int  # token_embd: llama.cpp keeps it on the CPU
    output_bytes: int  # output.weight + output_norm: on the GPU when n_gpu_layers > n_layer
    name: str = ""

    def __post_init__(self) -> None:
        if len(self.layers) != self.n_layer:
            raise ValueError(f"{len(self.layers)} layer sizes for {self.n_layer} layers")

    @property
    def total_bytes(self) -> int:
        """All weights."""
        return (
            self.input_bytes
            + self.output_bytes
            + sum(layer.shared + layer.experts for layer in self.layers)
        )

    @property
    def expert_bytes(self) -> int:
        """The expert tensors of all layers."""
        return sum(layer.experts for layer in self.layers)

    @property
    def active_fraction(self) -> float:
        """The share of each layer's expert bytes one token reads (n_expert_used / n_expert)."""
        if self.n_expert <= 0:
            return 1.0
        return min(1.0, max(self.n_expert_used, 1) / self.n_expert)

    def kv_layer_bytes(self, type_k: str, type_v: str) -> int:
        """KV cache bytes one context token costs in one layer."""
        n_embd_kv = self.n_head_kv * self.head_dim
        return _row_bytes(n_embd_kv, type_k) + _row_bytes(n_embd_kv, type_v)

    def kv_bytes_per_token(self, type_k: str, type_v: str) -> int:
        """KV cache bytes one context token costs (224 KiB in f16 for 8x22B)."""
        return self.n_layer * self.kv_layer_bytes(type_k, type_v)


def _row_bytes(n: int, kv_type: str) -> int:
    block, size = KV_TYPE_BLOCKS[kv_type]
    return -(-n // block) * size


def shape_from_gguf(info: GGUFInfo, shards: Sequence[GGUFInfo] | None = None) -> ModelShape:
    """The model's shape from its GGUF header(s), without loading any weights.

    For a split model pass the other shards' headers, or leave `shards` None to have them read
    from beside `info.path`. Tensors are summed by name: `blk.N.*` matching llama.cpp's expert
    regex are experts, other `blk.N.*` are shared, `output*` go with the output layer, and
    everything else (token_embd, rope_freqs...) stays with the input on the CPU.
    """
    if shards is None:
        count = int(info.metadata.get("split.count", 1) or 1)
        paths = shard_paths(info.path, info)[1:] if count > 1 else []
        shards = [read_header(p) for p in paths]
    n_layer = int(info.arch_value("block_count", 0) or 0)
    tensors = [t for part in (info, *shards) for t in part.tensors]
    for t in tensors:
        m = _BLOCK_RE.match(t.name)
        if m:
            n_layer = max(n_layer, int(m.group(1)) + 1)
    shared = [0] * n_layer
    experts = [0] * n_layer
    input_bytes = output_bytes = 0
    for t in tensors:
        if t.nbytes is None:
            raise PlanError(
                f"tensor {t.name} has ggml type {t.ggml_type}, which wizardchat cannot size: "
                "set --n-gpu-layers and --n-cpu-moe yourself"
            )
        m = _BLOCK_RE.match(t.name)
        if m:
            i = int(m.group(1))
            if _EXPERTS_RE.search(t.name):
                experts[i] += t.nbytes
            else:
                shared[i] += t.nbytes
        elif t.name.startswith("output"):
            output_bytes += t.nbytes
        else:
            input_bytes += t.nbytes
    n_embd = int(info.arch_value("embedding_length", 0) or 0)
    n_head = int(info.arch_value("attention.head_count", 1) or 1)
    n_head_kv = int(info.arch_value("attention.head_count_kv", n_head) or n_head)
    head_dim = int(info.arch_value("attention.key_length", n_embd // n_head) or n_embd // n_head)
    label = " ".join(p for p in (str(info.metadata.get("general.name", "")), quant_name(info)) if p)
    return ModelShape(
        n_layer=n_layer,
        n_embd=n_embd,
        n_head=n_head,
        n_head_kv=n_head_kv,
        head_dim=head_dim,
        n_expert=int(info.arch_value("expert_count", 0) or 0),
        n_expert_used=int(info.arch_value("expert_used_count", 0) or 0),
        n_ctx_train=int(info.arch_value("context_length", 0) or 0),
        layers=tuple(LayerSize(s, e) for s, e in zip(shared, experts, strict=True)),
        input_bytes=input_bytes,
        output_bytes=output_bytes,
        name=label,
    )


def shape_from_path(path: Path) -> ModelShape:
    """Read the headers of a GGUF model (all its shards) and return its shape."""
    return shape_from_gguf(read_header(path))


# ggml type -> (block size in elements, bytes per block) for the synthetic shapes.
_GGML_BLOCKS: dict[str, tuple[int, int]] = {
    "F32": (1, 4), "Q8_0": (32, 34), "Q2_K": (256, 84), "Q3_K": (256, 110),
    "Q4_K": (256, 144), "Q5_K": (256, 176), "Q6_K": (256, 210),
}  # fmt: skip
# quant -> the default tensor type llama.cpp's quantize uses for it.
_DEFAULT_TYPE = {
    "Q2_K": "Q2_K", "Q4_K_S": "Q4_K", "Q4_K_M": "Q4_K", "Q5_K_M": "Q5_K", "Q6_K": "Q6_K",
    "Q8_0": "Q8_0",
}  # fmt: skip
SYNTHETIC_QUANTS = tuple(_DEFAULT_TYPE)


def _use_more_bits(i: int, n: int) -> bool:
    # llama.cpp src/llama-quant.cpp use_more_bits: the first and last eighth and every third
    # layer in between get the bigger type.
    return i < n // 8 or i >= 7 * n // 8 or (i - n // 8) % 3 == 2


def _tensor_type(quant: str, role: str, i: int, n: int) -> str:
    """The ggml type llama.cpp's quantize picks for one tensor of an 8-expert model."""
    default = _DEFAULT_TYPE[quant]
    if quant == "Q8_0":
        return "Q8_0"
    if role == "output":
        return "Q6_K"
    if role in ("attn_k", "attn_v"):
        return "Q8_0"  # "for the 8-expert model, bumping this to Q8_0 trades just ~128MB"
    if role == "attn_output" and quant in ("Q2_K", "Q4_K_S", "Q4_K_M"):
        return "Q5_K"  # the n_expert == 8 rule for attn_output
    if role == "ffn_down_exps":
        if quant == "Q2_K":
            return "Q3_K"
        if quant in ("Q4_K_M", "Q5_K_M") and _use_more_bits(i, n):
            return "Q6_K"
        if quant == "Q4_K_S" and i < n // 8:
            return "Q5_K"
    return default


def _tensor_bytes(elements: int, ggml_type: str) -> int:
    block, size = _GGML_BLOCKS[ggml_type]
    return elements // block * size


def _size(quant: str, role: str, elements: int, i: int = 0, n: int = 1) -> int:
    return _tensor_bytes(elements, _tensor_type(quant, role, i, n))


def wizardlm2_8x22b_shape(quant: str = "Q4_K_M") -> ModelShape:
    """WizardLM-2 8x22B (Mixtral-8x22B shapes) at `quant`, sized without the file.

    Tensor types follow llama.cpp's `llama_tensor_get_type` for an 8-expert llama model: the
    quant's base type everywhere (token_embd included); attn_k and attn_v in Q8_0; attn_output
    in Q5_K for Q2_K/Q4_K_S/Q4_K_M; output in Q6_K; ffn_down_exps in Q6_K on the 28 layers
    `use_more_bits` picks for Q4_K_M/Q5_K_M, Q5_K on the first 7 for Q4_K_S, Q3_K for Q2_K;
    norms and the router (ffn_gate_inp) stay F32. Q4_K_M comes to 85.58e9 bytes against the
    published 85.59 GB; Q8_0 is all Q8_0 except the F32 norms and routers.
    """
    if quant not in _DEFAULT_TYPE:
        raise UsageError(
            f"the size of WizardLM-2 8x22B {quant} is not known without its file or the hub's "
            f"listing; known here: {', '.join(SYNTHETIC_QUANTS)}"
        )
    n_layer, n_embd, n_ff, n_expert, n_vocab = 56, 6144, 16384, 8, 32000
    n_head, n_head_kv, head_dim = 48, 8, 128
    n_embd_kv = n_head_kv * head_dim
    one_expert_tensor = n_expert * n_ff * n_embd
    layers = []
    for i in range(n_layer):
        shared = (
            _size(quant, "attn_q", n_embd * n_embd, i, n_layer)
            + _size(quant, "attn_k", n_embd * n_embd_kv, i, n_layer)
            + _size(quant, "attn_v", n_embd * n_embd_kv, i, n_layer)
            + _size(quant, "attn_output", n_embd * n_embd, i, n_layer)
            + _tensor_bytes(2 * n_embd + n_embd * n_expert, "F32")  # norms + router
        )
        experts = sum(
            _size(quant, role, one_expert_tensor, i, n_layer)
            for role in ("ffn_gate_exps", "ffn_up_exps", "ffn_down_exps")
        )
        layers.append(LayerSize(shared, experts))
    return ModelShape(
        n_layer=n_layer,
        n_embd=n_embd,
        n_head=n_head,
        n_head_kv=n_head_kv,
        head_dim=head_dim,
        n_expert=n_expert,
        n_expert_used=2,
        n_ctx_train=65536,
        layers=tuple(layers),
        input_bytes=_size(quant, "token_embd", n_vocab * n_embd),
        output_bytes=_size(quant, "output", n_vocab * n_embd) + _tensor_bytes(n_embd, "F32"),
        name=f"WizardLM-2 8x22B {quant}",
    )


@dataclass(frozen=True)
class Dims:
    """A model's dimensions (its config.json), enough to lay its tensors out without the file."""

    n_layer: int
    n_embd: int
    n_ff: int
    n_head: int
    n_head_kv: int
    head_dim: int
    n_expert: int  # 0 for a dense model
    n_expert_used: int
    n_vocab: int
    n_ctx_train: int


# The catalog's families (catalog.FAMILIES names): Mixtral-8x22B and Mistral-7B dimensions.
CATALOG_DIMS = {
    "wizardlm2-8x22b": Dims(56, 6144, 16384, 48, 8, 128, 8, 2, 32000, 65536),
    "wizardlm2-7b": Dims(32, 4096, 14336, 32, 8, 128, 0, 0, 32000, 32768),
}


def shape_from_size(dims: Dims, total_bytes: int, name: str = "") -> ModelShape:
    """A model of these dimensions whose weights come to `total_bytes` (a quant's file size).

    Every tensor gets the file's average bytes per weight: the per-tensor types of a quant
    (IQ1_S, IQ2_XS...) are not known without its header, but the planner needs the bytes per
    layer and per part, which the average gives to within a few percent.
    """
    d = dims
    n_embd_kv = d.n_head_kv * d.head_dim
    attn = 2 * d.n_embd * d.n_head * d.head_dim + 2 * d.n_embd * n_embd_kv
    norms_router = 2 * d.n_embd + d.n_embd * d.n_expert
    ffn = 3 * d.n_ff * d.n_embd * max(d.n_expert, 1)
    shared, experts = (attn + norms_router, ffn) if d.n_expert else (attn + norms_router + ffn, 0)
    embd = d.n_vocab * d.n_embd
    params = d.n_layer * (shared + experts) + 2 * embd + d.n_embd
    per_weight = total_bytes / params
    layer = LayerSize(round(shared * per_weight), round(experts * per_weight))
    return ModelShape(
        n_layer=d.n_layer,
        n_embd=d.n_embd,
        n_head=d.n_head,
        n_head_kv=d.n_head_kv,
        head_dim=d.head_dim,
        n_expert=d.n_expert,
        n_expert_used=d.n_expert_used,
        n_ctx_train=d.n_ctx_train,
        layers=(layer,) * d.n_layer,
        input_bytes=round(embd * per_weight),
        output_bytes=round((embd + d.n_embd) * per_weight),
        name=name,
    )


# --------------------------------------------------------------------------------------------
# The machine


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
    """What `memories_from_devices` reads of a device (wizardchat.engine.ggml.Device fits)."""

    @property
    def name(self) -> str: ...
    @property
    def description(self) -> str: ...
    @property
    def kind(self) -> str: ...
    @property
    def free_bytes(self) -> int: ...


def memories_from_devices(
    devices: Sequence[DeviceLike],
    *,
    ram_bandwidth: float | None = None,
    host: tuple[int, int] | None = None,
) -> tuple[list[Memory], Memory]:
    """The GPUs/RPC servers and the system RAM as planner memories (reads /proc/meminfo).

    `host` is (available, total) RAM, read from the system when None. An integrated GPU or an
    Apple GPU shares the system RAM, so what it can take is not counted twice.
    """
    from wizardchat.plan.machine import host_memory

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
    return gpus, Memory("RAM", "RAM", available, ram_bandwidth, total)


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


@functools.cache
def _measured_ram_bandwidth() -> float:
    return measure_ram_bandwidth()


def machine_memories(*, measure_ram: bool = True) -> tuple[list[Memory], Memory]:
    """This machine's GPUs/RPC devices (from the ggml backends) and RAM.

    With `measure_ram` the host bandwidth is measured once per process (about 0.3 s) so plans
    that keep experts in RAM get a decode bound.
    """
    from wizardchat.engine import ggml

    bandwidth = _measured_ram_bandwidth() if measure_ram else None
    return memories_from_devices(ggml.devices(), ram_bandwidth=bandwidth)


# --------------------------------------------------------------------------------------------
# The plan


@dataclass(frozen=True)
class MemoryUse:
    """What one memory holds in a plan and what it reads per generated token."""

    memory: Memory
    weights: int
    kv: int
    reserve: int  # compute buffers (GPU) or OS and process (RAM)
    read_per_token: int
    layers: tuple[int, ...] = ()  # layers whose shared tensors (and KV) sit here
    expert_layers: tuple[int, ...] = ()  # layers whose experts sit here
    output: bool = False
    input: bool = False

    @property
    def need(self) -> int:
        """Bytes this memory must hold."""
        return self.weights + self.kv + self.reserve

    @property
    def fits(self) -> bool:
        """Whether the need is within the memory's limit."""
        return self.need <= self.memory.limit


@dataclass(frozen=True)
class Plan:
    """Where each part of the model sits, and what that costs per token."""

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
    fits: bool = True  # False only for explicit flags the planner would not have chosen
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
        """The plan as llama.cpp command-line flags."""
        parts = [f"-ngl {self.n_gpu_layers}"]
        if self.n_cpu_moe:
            parts.append(f"--n-cpu-moe {self.n_cpu_moe}")
        if len(self.tensor_split) > 1:
            parts.append("-ts " + ",".join(f"{s:.3g}" for s in self.tensor_split))
        parts += [f"-c {self.n_ctx}", f"-fa {'on' if self.flash_attn else 'off'}"]
        parts += [f"-ctk {self.type_k}", f"-ctv {self.type_v}"]
        return " ".join(parts)

    def _kv_label(self) -> str:
        return self.type_k if self.type_k == self.type_v else f"{self.type_k}/{self.type_v}"

    def _bound_label(self) -> str:
        """The bound once it is known; nothing otherwise (an unmeasured host says nothing)."""
        if self.decode_bound is None:
            return ""
        return f"~{rate_text(self.decode_bound)} tok/s bound"

    def _where(self) -> str:
        gpus = self.gpu_uses
        n = self.n_layer
        if not gpus:
            return f"all {n} layers in RAM"
        on = sorted(i for u in gpus for i in u.layers)
        if len(gpus) == 1:
            text = f"{len(on)}/{n} layers on {gpus[0].memory.name}"
        else:
            shares = " + ".join(f"{u.memory.name} ({_ranges(u.layers) or 'output'})" for u in gpus)
            text = f"{len(on)}/{n} layers on {shares}"
        in_ram = [i for i in range(n) if i not in set(on)]
        output_in_ram = not any(u.output for u in gpus)
        if in_ram:
            text += f", layers {_ranges(in_ram)}{' and output' if output_in_ram else ''} in RAM"
        elif output_in_ram:
            text += ", output in RAM"
        experts = self.experts_in_ram
        if experts:
            text += f", experts of layers {_ranges(experts)} in RAM"
        return text

    def one_line(self) -> str:
        """The plan in one line, for the start of a chat."""
        ctx = f"ctx {self.n_ctx}"
        if self.ctx_reduced:
            ctx += f" (asked {self.requested_ctx})"
        parts = [self._where(), ctx, f"KV {self._kv_label()}"]
        if not self.flash_attn:
            parts.append("flash attn off")
        parts.append(self._bound_label())
        line = "plan: " + ", ".join(p for p in parts if p)
        if not self.fits:
            line += " (over memory: loading may fail)"
        return line

    def rows(self) -> list[tuple[str, str]]:
        """The full plan as (label, value) rows, for doctor and /show."""
        rows = [("plan", self.one_line().removeprefix("plan: ")), ("llama.cpp flags", self.flags())]
        ctx = f"{self.n_ctx} tokens"
        if self.ctx_reduced:
            ctx += f" (reduced from {self.requested_ctx})"
        rows.append(("context", ctx))
        kv_total = sum(u.kv for u in self.memories)
        per_token = kv_total // self.n_ctx if self.n_ctx else 0
        rows.append(
            ("KV cache", f"{self._kv_label()}, {_gb(kv_total)} ({per_token // 1024} KiB/token)")
        )
        rows.append(("flash attention", "on" if self.flash_attn else "off"))
        for u in self.memories:
            if not u.need and u.memory.kind != "RAM":
                continue
            parts = []
            if u.layers:
                parts.append(f"layers {_ranges(u.layers)}")
            if u.expert_layers:
                parts.append(f"experts of layers {_ranges(u.expert_layers)}")
            if u.output:
                parts.append("output")
            if u.input:
                parts.append("token embeddings")
            held = "; ".join(parts) or "nothing"
            limit = "free" if u.memory.limit == u.memory.free_bytes else "total"
            rows.append(
                (
                    u.memory.name,
                    f"{_gb(u.weights)} weights + {_gb(u.kv)} KV + {_gb(u.reserve)} reserve = "
                    f"{_gb(u.need)} of {_gb(u.memory.limit)} {limit}: {held}",
                )
            )
        reads = ", ".join(
            f"{name} {_gb(n)}" + _at(self._bandwidth(name)) for name, n in self.read_per_token
        )
        rows.append(("read per token", reads or "nothing"))
        if self.decode_bound is not None:  # unknown until every bandwidth is: no row then
            bound = (
                f"~{rate_text(self.decode_bound)} tok/s (memory bandwidth alone; llama.cpp reaches "
                "roughly 50-85% of it)"
            )
            rows.append(("decode bound", bound))
        rows += [("note", note) for note in self.notes]
        return rows

    def _bandwidth(self, name: str) -> float | None:
        for u in self.memories:
            if u.memory.name == name:
                return u.memory.bandwidth
        return None


def _gb(n: float) -> str:
    return f"{n / 1e9:.1f} GB"


def _at(bandwidth: float | None) -> str:
    if bandwidth is None:
        return ""
    if bandwidth >= 1e12:
        return f" at {bandwidth / 1e12:.2f} TB/s"
    return f" at {bandwidth / 1e9:.0f} GB/s"


def rate_text(tok_s: float) -> str:
    """A decode speed as the plan writes it: 41, 7.5 (tok/s)."""
    return f"{tok_s:.0f}" if tok_s >= 10 else f"{tok_s:.1f}"


def _ranges(layers: Sequence[int]) -> str:
    """[0, 1, 2, 5] -> '0-2, 5'."""
    runs: list[list[int]] = []
    for n in sorted(layers):
        if runs and runs[-1][1] == n - 1:
            runs[-1][1] = n
        else:
            runs.append([n, n])
    return ", ".join(str(a) if a == b else f"{a}-{b}" for a, b in runs)


@dataclass(frozen=True)
class _Setup:
    """Everything make_plan holds fixed while it searches."""

    shape: ModelShape
    gpus: tuple[Memory, ...]
    ram: Memory
    type_k: str
    type_v: str
    flash_attn: bool
    margin_bytes: int
    n_ubatch: int
    splits: tuple[float, ...] = field(init=False)

    def __post_init__(self) -> None:
        # llama.cpp's default tensor split: cumulative shares of the devices' free memory.
        free = [max(g.free_bytes, 0) for g in self.gpus]
        total = sum(free) or 1
        running, splits = 0, []
        for f in free:
            running += f
            splits.append(running / total)
        object.__setattr__(self, "splits", tuple(splits))

    def device_of(self, il: int, ngl: int) -> int:
        """GPU index of layer `il` (n_layer = the output), or -1 for the CPU: llama.cpp's rule."""
        n_layer = self.shape.n_layer
        if not self.gpus:
            return -1
        i_gpu_start = max(n_layer - ngl, 0)
        act = min(ngl, n_layer + 1)
        if il < i_gpu_start or il - i_gpu_start >= act:
            return -1
        k = bisect.bisect_right(self.splits, (il - i_gpu_start) / act)
        return min(k, len(self.gpus) - 1)

    def scratch(self, n_ctx: int) -> int:
        """Attention working memory of one layer at `n_ctx` (see the module docstring)."""
        s = self.shape
        n_ubatch = min(self.n_ubatch, n_ctx)  # llama.cpp cuts the batch to the context
        if self.flash_attn:
            return n_ctx * n_ubatch * 2 + n_ctx * s.n_head_kv * s.head_dim * 4
        return n_ctx * n_ubatch * s.n_head * 4

    def layout(self, ngl: int, n_cpu_moe: int, n_ctx: int) -> tuple[MemoryUse, ...]:
        """Every memory's share for these flags: the GPUs in order, then RAM."""
        s = self.shape
        n = s.n_layer
        kv_layer = s.kv_layer_bytes(self.type_k, self.type_v)
        # Decode reads the KV cache up to the current position: n_ctx/2 on average over a chat.
        kv_read = kv_layer * (n_ctx // 2)
        count = len(self.gpus) + 1  # the last one is RAM
        weights = [0] * count
        kv = [0] * count
        read = [0.0] * count
        layers: list[list[int]] = [[] for _ in range(count)]
        expert_layers: list[list[int]] = [[] for _ in range(count)]
        ram = count - 1
        for i, layer in enumerate(s.layers):
            d = self.device_of(i, ngl)
            d = ram if d < 0 else d
            e = ram if i < n_cpu_moe else d
            weights[d] += layer.shared
            weights[e] += layer.experts
            kv[d] += kv_layer * n_ctx
            read[d] += layer.shared + kv_read
            read[e] += layer.experts * s.active_fraction
            layers[d].append(i)
            if layer.experts:
                expert_layers[e].append(i)
        out = self.device_of(n, ngl)
        out = ram if out < 0 else out
        weights[out] += s.output_bytes
        read[out] += s.output_bytes
        weights[ram] += s.input_bytes  # one row of it is read per token: counted as 0
        reserve = [0] * count
        for g in range(len(self.gpus)):
            if layers[g] or out == g:
                reserve[g] = self.margin_bytes + self.scratch(n_ctx)
        if self.gpus and (layers[ram] or expert_layers[ram]):
            # Op offload: prompt batches copy RAM-resident weights to the first GPU.
            biggest = max((max(x.experts, x.shared) for x in s.layers), default=0)
            if not reserve[0]:
                reserve[0] = self.margin_bytes
            reserve[0] += biggest // 2
        reserve[ram] = RAM_RESERVE + (self.scratch(n_ctx) if layers[ram] else 0)
        memories = (*self.gpus, self.ram)
        return tuple(
            MemoryUse(
                memory=memories[k],
                weights=weights[k],
                kv=kv[k],
                reserve=reserve[k],
                read_per_token=round(read[k]),
                layers=tuple(layers[k]),
                expert_layers=tuple(expert_layers[k]),
                output=out == k,
                input=k == ram,
            )
            for k in range(count)
        )

    def fits(self, ngl: int, n_cpu_moe: int, n_ctx: int) -> bool:
        """Whether every memory holds its share with these flags."""
        return all(u.fits for u in self.layout(ngl, n_cpu_moe, n_ctx))

    def gpus_fit(self, ngl: int, n_cpu_moe: int, n_ctx: int) -> bool:
        """Whether every GPU/RPC memory holds its share (RAM aside)."""
        return all(u.fits for u in self.layout(ngl, n_cpu_moe, n_ctx)[:-1])

    def least_moe(self, ngl: int, n_ctx: int) -> int | None:
        """The fewest expert layers in RAM that let the GPUs hold the rest, if any does."""
        n = self.shape.n_layer
        if self.gpus_fit(ngl, 0, n_ctx):
            return 0
        if not self.gpus_fit(ngl, n, n_ctx):
            return None
        # From 1 on, each expert layer moved to RAM only frees GPU memory: bisect for the least.
        lo, hi = 1, n
        while lo < hi:
            mid = (lo + hi) // 2
            if self.gpus_fit(ngl, mid, n_ctx):
                hi = mid
            else:
                lo = mid + 1
        return lo

    def search(
        self, n_ctx: int, fixed_ngl: int | None, fixed_moe: int | None
    ) -> tuple[int, int] | None:
        """The preferred (n_gpu_layers, n_cpu_moe) that fits at `n_ctx`, if any.

        The most GPU layers first, then the fewest expert layers in RAM. RAM needs grow with
        n_cpu_moe while GPU needs shrink, so the least n_cpu_moe the GPUs accept is also the
        best chance for RAM; when RAM cannot take that, the next smaller ngl is tried.
        """
        n = self.shape.n_layer
        if not self.gpus:
            ngl_options: Sequence[int] = [0]
        elif fixed_ngl is not None:
            ngl_options = [fixed_ngl]
        else:
            ngl_options = range(n + 1, -1, -1)
        for ngl in ngl_options:
            moe = fixed_moe if fixed_moe is not None else self.least_moe(ngl, n_ctx)
            if moe is not None and self.fits(ngl, moe, n_ctx):
                return ngl, moe
        return None


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
    setup: _Setup,
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


def make_plan(
    shape: ModelShape,
    gpus: Sequence[Memory],
    ram: Memory,
    *,
    n_ctx: int,
    type_k: str = "f16",
    type_v: str = "f16",
    flash_attn: str = "auto",
    margin_bytes: int = DEFAULT_MARGIN,
    min_ctx: int = MIN_CTX,
    n_ubatch: int = DEFAULT_UBATCH,
    n_gpu_layers: int | None = None,
    n_cpu_moe: int | None = None,
    fixed_ctx: bool = False,
) -> Plan:
    """Choose -ngl, --n-cpu-moe and the context for `shape` on these memories.

    `n_gpu_layers` (-1 = all) and `n_cpu_moe` are explicit flags: given, they are kept and only
    the rest is searched; a combination that does not fit is returned with `fits=False` and a
    note. `fixed_ctx` keeps `n_ctx` (an explicit --ctx-size). A model that does not fit at all
    raises PlanError with the numbers.
    """
    for name, kv_type in (("type_k", type_k), ("type_v", type_v)):
        if kv_type not in KV_TYPE_BLOCKS:
            raise UsageError(f"{name} must be one of {', '.join(KV_TYPE_BLOCKS)}, not {kv_type!r}")
    if flash_attn not in FLASH_ATTN_CHOICES:
        raise UsageError(f"flash_attn must be one of {', '.join(FLASH_ATTN_CHOICES)}")
    if n_ctx <= 0:
        raise UsageError(f"n_ctx must be positive, not {n_ctx}")
    notes: list[str] = []
    n = shape.n_layer
    fa = flash_attn != "off"
    if flash_attn == "off" and type_v not in _UNQUANTIZED_KV:
        fa = True
        notes.append(f"flash attention on: llama.cpp needs it for a {type_v} V cache")
    fixed_ngl = n_gpu_layers
    if fixed_ngl is not None and (fixed_ngl < 0 or fixed_ngl > n + 1):
        fixed_ngl = n + 1
    if fixed_ngl is not None and not gpus:
        fixed_ngl = None
    fixed_moe = None if n_cpu_moe is None else max(0, min(n_cpu_moe, n))
    setup = _Setup(shape, tuple(gpus), ram, type_k, type_v, fa, margin_bytes, n_ubatch)
    candidates = _ctx_candidates(n_ctx, min_ctx, fixed_ctx)
    solved = _solve(setup, candidates, fixed_ngl, fixed_moe)
    fits = True
    if solved is None:
        _check_total(setup, candidates[-1], fixed_ctx)
        if fixed_ngl is None and fixed_moe is None:
            raise _no_split_error(setup, candidates[-1])
        ngl = n + 1 if fixed_ngl is None else fixed_ngl
        moe = n if fixed_moe is None else fixed_moe
        solved, fits = (ngl if gpus else 0, moe, n_ctx), False
    ngl, moe, ctx = solved
    uses = setup.layout(ngl, moe, ctx)
    if not fits:
        over = "; ".join(
            f"{u.memory.name} needs {_gb(u.need)} of {_gb(u.memory.limit)}"
            for u in uses
            if not u.fits
        )
        notes.append(f"the given flags do not fit: {over}; llama.cpp may fail to load")
    if ctx < n_ctx:
        notes.append(
            f"context reduced from {n_ctx} to {ctx}: the KV cache of {n_ctx} tokens "
            f"({_gb(shape.kv_bytes_per_token(type_k, type_v) * n_ctx)}) does not fit beside "
            "the model"
        )
    notes += _kv_suggestion(setup, ngl, moe, ctx, n_ctx, candidates, fixed_ngl, fixed_moe)
    ram_use = uses[-1]
    if ram_use.need > ram.free_bytes and ram_use.fits:
        notes.append(
            f"the RAM part ({_gb(ram_use.need)}) exceeds the free RAM ({_gb(ram.free_bytes)}): "
            "the memory-mapped model is paged in from disk as it is read, slowly until cached"
        )
    if not gpus:
        notes.append("no GPU: every layer runs on the CPU from system RAM")
    reads, bound = _reads_and_bound(uses)
    return Plan(
        n_gpu_layers=ngl if gpus else 0,
        n_cpu_moe=moe,
        n_ctx=ctx,
        flash_attn=fa,
        type_k=type_k,
        type_v=type_v,
        placement=tuple((u.memory.name, u.weights + u.kv) for u in uses if u.weights + u.kv),
        read_per_token=reads,
        decode_bound=bound,
        ctx_reduced=ctx < n_ctx,
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
    setup: _Setup,
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
    if setup.type_k not in _UNQUANTIZED_KV or setup.type_v not in _UNQUANTIZED_KV:
        return []
    if ctx == n_ctx and (not setup.gpus or (ngl == n + 1 and moe == 0)):
        return []
    q8 = _Setup(
        setup.shape, setup.gpus, setup.ram, "q8_0", "q8_0", True, setup.margin_bytes,
        setup.n_ubatch,
    )  # fmt: skip
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


def _needs(setup: _Setup, n_ctx: int) -> tuple[int, int, int]:
    """(weights, KV, least working memory) of the whole model at `n_ctx`."""
    s = setup.shape
    kv = s.kv_bytes_per_token(setup.type_k, setup.type_v) * n_ctx
    reserve = RAM_RESERVE + (setup.margin_bytes + setup.scratch(n_ctx) if setup.gpus else 0)
    return s.total_bytes, kv, reserve


def _working(setup: _Setup, n_ctx: int, reserve: int) -> str:
    """The working memory, naming -ub when its compute buffers are a large part of it."""
    text = f"{_gb(reserve)} working memory"
    if setup.gpus and setup.scratch(n_ctx) * 2 > reserve:
        text += f", mostly compute buffers for -ub {min(setup.n_ubatch, n_ctx)}"
    return text


def _machine(setup: _Setup) -> str:
    if not setup.gpus:
        return f"this machine has {_gb(setup.ram.limit)} RAM and no GPU"
    gpu = sum(g.free_bytes for g in setup.gpus)
    kinds = "/".join(sorted({g.kind for g in setup.gpus}))
    return f"this machine has {_gb(setup.ram.limit)} RAM + {_gb(gpu)} {kinds}"


def _check_total(setup: _Setup, n_ctx: int, fixed_ctx: bool) -> None:
    weights, kv, reserve = _needs(setup, n_ctx)
    have = setup.ram.limit + sum(g.free_bytes for g in setup.gpus)
    short = weights + kv + reserve - have
    if short <= 0:
        return
    hints = ["a smaller quant", "more RAM", "an RPC worker"]
    if setup.type_v in _UNQUANTIZED_KV and kv // 2 >= short:
        hints.insert(0, "a q8_0 KV cache")
    if fixed_ctx:
        hints.insert(0, "a smaller --ctx-size")
    name = setup.shape.name or "the model"
    raise PlanError(
        f"{name} needs {_gb(weights + kv + reserve)} at ctx {n_ctx} ({_gb(weights)} weights + "
        f"{_gb(kv)} KV cache + {_working(setup, n_ctx, reserve)}); {_machine(setup)}: "
        f"try {', '.join(hints[:-1])} or {hints[-1]}"
    )


def _no_split_error(setup: _Setup, n_ctx: int) -> PlanError:
    weights, kv, reserve = _needs(setup, n_ctx)
    name = setup.shape.name or "the model"
    return PlanError(
        f"{name} needs {_gb(weights + kv + reserve)} at ctx {n_ctx} ({_gb(weights)} weights + "
        f"{_gb(kv)} KV cache + {_working(setup, n_ctx, reserve)}) and does not split to fit: "
        f"{_machine(setup)}, and each device must hold its own share"
    )
