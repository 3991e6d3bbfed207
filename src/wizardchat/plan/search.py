"""The memory arithmetic of one arrangement: what each GPU and the RAM hold for given flags.

`FitSearch.layout` applies llama.cpp's rules (the last -ngl layers on the GPUs, split in
proportion to their free memory; --n-cpu-moe keeps the first layers' experts in RAM) and adds
the working memory each memory keeps free (plan/fit.py's docstring says how much and why);
`FitSearch.search` finds the preferred flags that fit at one context.
"""

from __future__ import annotations

import bisect
from collections.abc import Sequence
from dataclasses import dataclass, field

from wizardchat.plan.machine import Memory
from wizardchat.plan.shapes import ModelShape

GIB = 1 << 30
DEFAULT_MARGIN = GIB  # fixed working memory per GPU
RAM_RESERVE = 2 * GIB  # system RAM left to the OS and this process


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
class FitSearch:
    """One model on one machine with one KV cache: the memory each arrangement needs, and the
    preferred arrangement that fits at a context. Everything find_fit holds fixed."""

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
