"""Model shapes: the dimensions and the bytes of every layer that the fit model needs.

A shape comes from a GGUF header (`shape_from_gguf`, all shards), from llama.cpp's quantization
rules for WizardLM-2 8x22B (`wizardlm2_8x22b_shape`), or from a catalog family's dimensions and
a quant's file size (`shape_from_size`); `catalog_shape` picks between the last two the same way
for every caller, so `pull --list`, `run`'s offer and `doctor` size a quant alike.
"""

from __future__ import annotations

import dataclasses
import functools
import re
from collections.abc import Sequence
from dataclasses import dataclass

from wizardchat.errors import LoadError, UsageError
from wizardchat.ggml_types import row_bytes, tensor_bytes
from wizardchat.gguf_file import GGUFInfo, quant_name, read_header, shard_paths
from wizardchat.plan.placement import EXPERTS_REGEX

_EXPERTS_RE = re.compile(EXPERTS_REGEX)
_BLOCK_RE = re.compile(r"^blk\.(\d+)\.")


class FitError(LoadError):
    """The model and its KV cache do not fit this machine's memories in any arrangement."""


@dataclass(frozen=True)
class LayerSize:
    """Bytes of one transformer block (blk.N)."""

    shared: int  # attention, norms, router: everything in blk.N that is not an expert tensor
    experts: int  # blk.N.ffn_{gate,up,down}_exps (all experts)


@dataclass(frozen=True)
class ModelShape:
    """The sizes the fit model needs: dimensions and the bytes of every layer."""

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
        return row_bytes(n_embd_kv, type_k) + row_bytes(n_embd_kv, type_v)

    def kv_bytes_per_token(self, type_k: str, type_v: str) -> int:
        """KV cache bytes one context token costs (224 KiB in f16 for 8x22B)."""
        return self.n_layer * self.kv_layer_bytes(type_k, type_v)


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
            raise FitError(
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

    def shape(
        self, layers: tuple[LayerSize, ...], input_bytes: int, output_bytes: int, name: str
    ) -> ModelShape:
        """A model of these dimensions with these bytes per layer and part."""
        return ModelShape(
            n_layer=self.n_layer,
            n_embd=self.n_embd,
            n_head=self.n_head,
            n_head_kv=self.n_head_kv,
            head_dim=self.head_dim,
            n_expert=self.n_expert,
            n_expert_used=self.n_expert_used,
            n_ctx_train=self.n_ctx_train,
            layers=layers,
            input_bytes=input_bytes,
            output_bytes=output_bytes,
            name=name,
        )


WIZARDLM2_8X22B = "wizardlm2-8x22b"  # catalog.DEFAULT_FAMILY: the family with a synthetic shape
# The catalog's families (catalog.FAMILIES names): Mixtral-8x22B and Mistral-7B dimensions.
CATALOG_DIMS = {
    WIZARDLM2_8X22B: Dims(56, 6144, 16384, 48, 8, 128, 8, 2, 32000, 65536),
    "wizardlm2-7b": Dims(32, 4096, 14336, 32, 8, 128, 0, 0, 32000, 32768),
}


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


def _size(quant: str, role: str, elements: int, i: int = 0, n: int = 1) -> int:
    return tensor_bytes(elements, _tensor_type(quant, role, i, n))


@functools.cache  # a frozen shape, asked for again by every fit of a catalog size
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
    dims = CATALOG_DIMS[WIZARDLM2_8X22B]
    n_layer, n_embd, n_ff, n_expert, n_vocab = (
        dims.n_layer, dims.n_embd, dims.n_ff, dims.n_expert, dims.n_vocab
    )  # fmt: skip
    n_head_kv, head_dim = dims.n_head_kv, dims.head_dim
    n_embd_kv = n_head_kv * head_dim
    one_expert_tensor = n_expert * n_ff * n_embd
    layers = []
    for i in range(n_layer):
        shared = (
            _size(quant, "attn_q", n_embd * n_embd, i, n_layer)
            + _size(quant, "attn_k", n_embd * n_embd_kv, i, n_layer)
            + _size(quant, "attn_v", n_embd * n_embd_kv, i, n_layer)
            + _size(quant, "attn_output", n_embd * n_embd, i, n_layer)
            + tensor_bytes(2 * n_embd + n_embd * n_expert, "F32")  # norms + router
        )
        experts = sum(
            _size(quant, role, one_expert_tensor, i, n_layer)
            for role in ("ffn_gate_exps", "ffn_up_exps", "ffn_down_exps")
        )
        layers.append(LayerSize(shared, experts))
    return dims.shape(
        tuple(layers),
        input_bytes=_size(quant, "token_embd", n_vocab * n_embd),
        output_bytes=_size(quant, "output", n_vocab * n_embd) + tensor_bytes(n_embd, "F32"),
        name=f"WizardLM-2 8x22B {quant}",
    )


def shape_from_size(dims: Dims, total_bytes: int, name: str = "") -> ModelShape:
    """A model of these dimensions whose weights come to `total_bytes` (a quant's file size).

    Every tensor gets the file's average bytes per weight: the per-tensor types of a quant
    (IQ1_S, IQ2_XS...) are not known without its header, but the fit needs the bytes per
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
    return d.shape(
        (layer,) * d.n_layer,
        input_bytes=round(embd * per_weight),
        output_bytes=round((embd + d.n_embd) * per_weight),
        name=name,
    )


def catalog_shape(family: str, size: int, name: str = "") -> ModelShape:
    """The shape of a `size`-byte quant of a catalog family, sized without its file: what
    `pull --list`, `run`'s offer and doctor (for a model not downloaded) all fit.

    8x22B: llama.cpp's Q4_K_M layout (shared tensors, experts per layer) scaled to `size`, so
    expert placement counts as it will at load time. Others (the dense 7B): the family's
    dimensions with every tensor at the file's average bytes per weight.
    """
    if family == WIZARDLM2_8X22B:
        base = wizardlm2_8x22b_shape("Q4_K_M")
        r = size / base.total_bytes
        return dataclasses.replace(
            base,
            layers=tuple(LayerSize(int(x.shared * r), int(x.experts * r)) for x in base.layers),
            input_bytes=int(base.input_bytes * r),
            output_bytes=int(base.output_bytes * r),
            name=name or family,
        )
    return shape_from_size(CATALOG_DIMS[family], size, name=name or family)
