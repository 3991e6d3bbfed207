"""A loaded model as the session sees it: tokenizer, special ids, context size, token streams."""

from __future__ import annotations

import dataclasses
import re
import threading
from collections.abc import Sequence
from pathlib import Path
from typing import IO, Any

from wizardchat.engine import ggml, kv_state
from wizardchat.engine.generate import PieceDecoder, Sampling, TokenStream
from wizardchat.engine.llama_lib import VERSION, lib
from wizardchat.engine.model import EvalProgress, LoadPlan, ProgressFn, load
from wizardchat.engine.model_identity import fingerprint
from wizardchat.engine.vocab import adds_bos, adds_space_prefix, token_text
from wizardchat.gguf_file import quant_name, shard_paths
from wizardchat.plan.placement import CPU_BUFFER, EXPERTS_REGEX, Override, plan_overrides
from wizardchat.plan.report import layer_ranges
from wizardchat.settings import Settings


@dataclasses.dataclass(eq=False)
class KvSnapshot:
    """A copy of the KV cache in RAM and the token ids it holds (LlamaEngine.kv_snapshot)."""

    tokens: list[int]
    data: Any  # a ctypes byte array

    @property
    def nbytes(self) -> int:
        """Its size in RAM."""
        return len(self.data)


class LlamaEngine:
    """llama.cpp behind the session's ChatEngine protocol."""

    def __init__(self, settings: Settings, *, progress: ProgressFn | None, log: IO[str] | None):
        overrides = plan_overrides(settings.override_tensor, settings.cpu_moe, settings.n_cpu_moe)
        # _overrides holds the C array of tensor_buft_overrides (and its pattern bytes) for as
        # long as the model that llama.cpp loaded with it: never read, only kept alive.
        self.llm, self.load_plan, self.info, self._overrides = load(
            settings, overrides, progress=progress, log=log
        )
        self.sampling = Sampling.of(settings)
        self.seed = settings.seed
        self.bos = int(self.llm.token_bos())
        self.eos = int(self.llm.token_eos())
        # How llama.cpp tokenizes a whole prompt with this vocabulary (engine/vocab.py), so the
        # history can be, token for token, that tokenization of the prompt as shown.
        self.add_bos = adds_bos(self.llm)
        self.eos_text = token_text(self.llm, self.eos)
        self.space_prefix = adds_space_prefix(self.llm)
        # The context as planned (padded to 256), whatever llama.cpp padded its KV cache to.
        self.n_ctx = self.llm.n_ctx
        self.model_name = self.load_plan.path.name
        offload = self.load_plan.offload
        self.fit = offload.fit if offload else None  # the fit model's placement, None when off
        self._kv_identity: dict[str, Any] | None = None

    def tokenize(self, text: str, special: bool = False) -> list[int]:
        """Token ids of `text` as llama.cpp tokenizes a prompt that is just this text (an SPM
        vocabulary's space prefix included): no BOS, and `</s>` typed by a user stays five
        characters (`special`: it is the end-of-sequence token, as in a raw prompt of the HTTP
        API)."""
        return list(self.llm.tokenize(text.encode("utf-8"), add_bos=False, special=special))

    def pieces(self, tokens: Sequence[int]) -> list[str]:
        """Each token's text as a reply streams it (a character split over tokens comes with
        its last byte). ValueError for an id outside the vocabulary (llama.cpp would abort)."""
        n_vocab = self.llm.n_vocab
        if any(not 0 <= t < n_vocab for t in tokens):
            raise ValueError("token id outside the vocabulary")
        decoder = PieceDecoder(self.llm)
        return [decoder.decode(t) for t in tokens]

    def stream(
        self,
        prompt: Sequence[int],
        max_tokens: int,
        cancel: threading.Event,
        abort_prompt: bool = False,
        progress: EvalProgress | None = None,
        text: str | None = None,
    ) -> TokenStream:
        """A token stream for one reply (`progress` hears how the prompt's evaluation goes;
        `text`, the prompt as a string, is for engines that take text: the ids are the prompt)."""
        return TokenStream(
            self.llm, prompt, self.sampling, max_tokens, cancel, abort_prompt, progress
        )

    def set_sampling(self, **changes: Any) -> None:
        """Change sampler settings for the next replies (names as in `Sampling`)."""
        self.sampling = dataclasses.replace(self.sampling, **changes)

    def set_seed(self, seed: int) -> None:
        """Seed the sampler of the next replies; -1 draws a new random seed for each."""
        self.seed = seed
        self.llm.seed = seed if seed >= 0 else lib.LLAMA_DEFAULT_SEED

    def describe(self) -> list[tuple[str, str]]:
        """What is loaded and where it sits, as (label, value) rows for /show."""
        rows = self._describe_load()
        if self.fit is not None:
            rows += [(f"plan: {k}", v) for k, v in self.fit.rows()[1:]]
        else:
            rows.append(("plan", self._off_reason()))
        return rows

    def plan_line(self) -> str:
        """The plan in one line for the start of a chat."""
        if self.fit is not None:
            return self.fit.one_line()
        return f"plan: {self._off_reason()}"

    def _off_reason(self) -> str:
        offload = self.load_plan.offload
        return offload.reason if offload else "off"

    def _describe_load(self) -> list[tuple[str, str]]:
        return describe_load(
            self.load_plan,
            quant=quant_name(self.info),
            architecture=self.info.architecture,
            n_layer=int(self.info.arch_value("block_count", 0)),
            n_expert=int(self.info.arch_value("expert_count", 0)),
            n_expert_used=int(self.info.arch_value("expert_used_count", 0)),
            n_ctx_train=int(self.info.arch_value("context_length", 0)),
            gpus=[  # the devices layers can go to: GPUs and RPC workers, named as such
                f"{d.name} ({'RPC worker ' if d.listed_kind == 'RPC' else ''}{d.description})"
                for d in ggml.devices()
                if d.kind == "GPU"
            ],
        )

    # --- the KV cache saved with a session (engine/kv_state.py) ----------------------------

    def kv_identity(self) -> dict[str, Any]:
        """What a saved KV state must have been made with to be valid here: this very model
        file (its content's fingerprint), context size, KV types, attention layout, and the
        llama.cpp that wrote it. OSError if the model file cannot be read for the fingerprint."""
        if self._kv_identity is None:
            plan = self.load_plan
            self._kv_identity = {
                "model": fingerprint(shard_paths(plan.path, self.info)),
                "n_ctx": self.n_ctx,
                "type_k": plan.type_k,
                "type_v": plan.type_v,
                "flash_attn": plan.flash_attn,
                "llama_cpp_python": VERSION,
            }
        return dict(self._kv_identity)

    def kv_held(self, tokens: Sequence[int]) -> int:
        """How many of `tokens`, from the first, the KV cache holds now."""
        return kv_state.held_prefix(self.llm, tokens)

    def kv_keep(self, n_tokens: int) -> int:
        """Keep the first `n_tokens` cached positions only; return the bytes a save of them
        would write."""
        kv_state.trim(self.llm, n_tokens)
        return kv_state.state_size(self.llm)

    def kv_save(self, path: Path) -> list[int]:
        """Write the cached positions to `path`; return the token ids written (KvStateError)."""
        tokens = list(self.llm.tokens)
        kv_state.save(self.llm, path)
        return tokens

    def kv_load(self, path: Path) -> list[int]:
        """Replace the KV cache with the state in `path`; the token ids it holds (KvStateError,
        and an empty cache, if it cannot be read)."""
        return kv_state.load(self.llm, path, self.n_ctx)

    @property
    def kv_cached(self) -> int:
        """How many positions the KV cache holds now."""
        return int(self.llm.n_tokens)

    def kv_snapshot(self) -> KvSnapshot:
        """The KV cache copied into RAM, to switch back to later (KvStateError)."""
        data, tokens = kv_state.snapshot(self.llm)
        return KvSnapshot(tokens, data)

    def kv_restore_snapshot(self, snap: KvSnapshot) -> None:
        """Make `snap` the KV cache again (KvStateError, and an empty cache, on failure)."""
        kv_state.restore_snapshot(self.llm, snap.data, snap.tokens)

    def close(self) -> None:
        """Free the model and context now rather than at interpreter exit."""
        self.llm.close()


_LAYER_RE = re.compile(r"blk\\\.(\d+)" + re.escape(EXPERTS_REGEX) + "$")


def experts_in_ram(overrides: Sequence[Override], n_layer: int) -> str:
    """Which layers' expert tensors the overrides keep in system RAM, in words."""
    if not overrides:
        return "none (all follow their layer)"
    parts: list[str] = []
    layers: list[int] = []
    for o in overrides:
        m = _LAYER_RE.fullmatch(o.pattern)
        if o.pattern == EXPERTS_REGEX and o.buffer == CPU_BUFFER:
            parts.append(f"all {n_layer} layers (--cpu-moe)")
        elif m and o.buffer == CPU_BUFFER:
            layers.append(int(m.group(1)))
        else:
            parts.append(f"-ot {o.pattern}={o.buffer}")
    if layers:
        parts.insert(0, f"layers {layer_ranges(layers)} ({len(layers)} of {n_layer})")
    return "; ".join(parts)


def describe_load(
    plan: LoadPlan,
    *,
    quant: str,
    architecture: str,
    n_layer: int,
    n_expert: int,
    n_expert_used: int,
    n_ctx_train: int,
    gpus: list[str],
) -> list[tuple[str, str]]:
    """The rows of /show for one loaded model (pure, so it is testable without a model)."""
    experts = f", {n_expert} experts ({n_expert_used} per token)" if n_expert else ""
    if not gpus:
        offload = "no GPU in this build or machine: every layer runs on the CPU"
    else:
        on_gpu = n_layer if plan.n_gpu_layers < 0 else min(plan.n_gpu_layers, n_layer)
        offload = f"{on_gpu} of {n_layer} layers on {', '.join(gpus)}"
    return [
        ("model", str(plan.path)),
        ("quant", quant),
        ("architecture", f"{architecture}, {n_layer} layers{experts}"),
        ("context", f"{plan.n_ctx} tokens (trained {n_ctx_train})"),
        ("threads", str(plan.threads)),
        ("batch", f"{plan.batch_size} / ubatch {plan.ubatch_size}"),
        ("flash attention", "on" if plan.flash_attn else "off"),
        ("KV cache", f"K {plan.type_k}, V {plan.type_v}"),
        ("GPU offload", offload),
        ("experts in RAM", experts_in_ram(plan.overrides, n_layer)),
    ]
