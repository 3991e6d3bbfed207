"""One frozen settings object: defaults < config.toml < WIZARDCHAT_* env < command-line flags."""

from __future__ import annotations

import dataclasses
import math
import os
import sys
import typing
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from wizardchat.errors import UsageError
from wizardchat.ggml_types import FLASH_ATTN_CHOICES, KV_CACHE_TYPES
from wizardchat.inputs import repair_text

DEFAULT_SYSTEM_PROMPT = (
    "A chat between a curious user and an artificial intelligence assistant. "
    "The assistant gives helpful, detailed, and polite answers to the user's questions."
)

ENV_PREFIX = "WIZARDCHAT_"
# Contexts, batches: llama.cpp keeps them in uint32 and allocates per token; past this is a typo.
MAX_CTX = 1 << 24
# ggml.h GGML_MAX_N_THREADS: llama.cpp crashes with more threads than this.
MAX_THREADS = 512
MAX_SEED = 2**32 - 2  # 2**32 - 1 is LLAMA_DEFAULT_SEED, llama.cpp's "random"


@dataclass(frozen=True)
class Bounds:
    """The values a numeric setting may take, and the words that say so."""

    low: float
    high: float
    rule: str
    low_open: bool = False  # `low` itself is not allowed
    holes: tuple[int, ...] = ()  # values between low and high that are not allowed

    def allows(self, value: float) -> bool:
        """Whether `value` is a finite number in range."""
        if not math.isfinite(value):
            return False
        above = value > self.low if self.low_open else value >= self.low
        return above and value <= self.high and value not in self.holes


# One table for flags, WIZARDCHAT_* variables, config.toml and the REPL's /set.
RANGES: dict[str, Bounds] = {
    "ctx_size": Bounds(0, MAX_CTX, f"0 (the model's) to {MAX_CTX}"),
    "n_gpu_layers": Bounds(-1, 10_000, "-1 (all) to 10000"),
    "threads": Bounds(0, MAX_THREADS, f"0 (physical cores) to {MAX_THREADS}"),
    "batch_size": Bounds(1, MAX_CTX, f"1 to {MAX_CTX}"),
    "ubatch_size": Bounds(1, MAX_CTX, f"1 to {MAX_CTX}"),
    "n_cpu_moe": Bounds(0, 1000, "0 to 1000"),
    "temperature": Bounds(0, 100, "0 to 100"),
    "top_p": Bounds(0, 1, "above 0, at most 1", low_open=True),
    "top_k": Bounds(0, 1_000_000, "0 to 1000000"),
    "min_p": Bounds(0, 1, "0 to 1"),
    "repeat_penalty": Bounds(0, 100, "above 0, at most 100", low_open=True),
    "seed": Bounds(-1, MAX_SEED, f"-1 to {MAX_SEED}"),
    "max_tokens": Bounds(-1, 2**31 - 1, f"-1 or 1 to {2**31 - 1}", holes=(0,)),
    "kv_cache_max_gb": Bounds(0, 1_000_000, "0 (off) to 1000000"),
    "endpoint_timeout": Bounds(0, 86_400, "above 0, at most 86400", low_open=True),
}


def _opt(default: Any, help: str) -> Any:
    return field(default=default, metadata={"help": help})


@dataclass(frozen=True)
class Settings:
    """Everything that shapes a wizardchat run; build it with `load_settings`."""

    model: str | None = _opt(
        None,
        "The model: wizardlm2-8x22b[:QUANT] (the default), wizardlm2-7b[:QUANT], "
        "OWNER/REPO[:QUANT] on the hub, or a .gguf path (a file or its first shard).",
    )
    ctx_size: int = _opt(0, "Context size in tokens; 0 = the model's, capped to what fits memory.")
    n_gpu_layers: int = _opt(-1, "Layers to offload to the GPU; -1 = all when a GPU exists.")
    threads: int = _opt(0, "CPU threads for generation; 0 = the number of physical cores.")
    batch_size: int = _opt(2048, "Logical batch size for prompt processing (llama.cpp -b).")
    ubatch_size: int = _opt(512, "Physical batch size for prompt processing (llama.cpp -ub).")
    flash_attn: str = _opt("auto", "Flash attention: on, off or auto.")
    cache_type_k: str = _opt("f16", "KV cache type for K: " + ", ".join(KV_CACHE_TYPES) + ".")
    cache_type_v: str = _opt("f16", "KV cache type for V (quantized V forces flash attention).")
    mlock: bool = _opt(False, "Lock the model in RAM so it is never swapped out.")
    mmap: bool = _opt(True, "Memory-map the model file instead of reading it in.")
    cpu_moe: bool = _opt(False, "Keep all MoE expert tensors in system RAM.")
    n_cpu_moe: int = _opt(0, "Keep the MoE expert tensors of the first N layers in system RAM.")
    override_tensor: tuple[str, ...] = _opt((), "Tensor buffer overrides, REGEX=BUFFER each.")
    system: str = _opt(DEFAULT_SYSTEM_PROMPT, "System prompt (default: WizardLM-2's own).")
    temperature: float = _opt(0.8, "Sampling temperature; 0 = greedy.")
    top_p: float = _opt(0.95, "Top-p (nucleus) sampling; 1.0 disables.")
    top_k: int = _opt(40, "Top-k sampling; 0 disables.")
    min_p: float = _opt(0.05, "Min-p sampling; 0 disables.")
    repeat_penalty: float = _opt(1.0, "Repetition penalty; 1.0 disables.")
    seed: int = _opt(-1, "Random seed; -1 = a new one each run.")
    max_tokens: int = _opt(
        -1, "Longest reply in tokens; -1 = until the model stops or the context is full."
    )
    rpc: tuple[str, ...] = _opt(
        (), "llama.cpp RPC workers (HOST:PORT, comma-separated) to spread the model over."
    )
    plan: str = _opt(
        "auto",
        "Offload plan: auto fits GPU layers, experts in RAM and context to the devices; "
        "off leaves llama.cpp's defaults. Explicit -ngl/--n-cpu-moe/--cpu-moe/-ot win.",
    )
    kv_cache_max_gb: float = _opt(
        20.0,
        "Disk for the KV caches saved with sessions (resumed without re-evaluating), in GB; "
        "the least recently used go first; 0 = off.",
    )
    verbose: bool = _opt(False, "Send llama.cpp's log to stderr instead of the log file.")
    endpoint: str | None = _opt(
        None,
        "Chat through this OpenAI-compatible server instead of loading a model "
        "(http://HOST:PORT/v1: vLLM, llama-server, llama-cpp-python's, wizardchat serve --http).",
    )
    endpoint_model: str | None = _opt(
        None, "The model to ask --endpoint for (default: the first it serves)."
    )
    endpoint_timeout: float = _opt(
        120.0,
        "Seconds --endpoint may send nothing before a reply is given up (a long prompt on a "
        "busy server takes a while before its first token).",
    )

    @property
    def model_path(self) -> Path | None:
        """The model path with ~ expanded, or None."""
        return Path(self.model).expanduser() if self.model else None


FIELD_NAMES = tuple(f.name for f in dataclasses.fields(Settings))
_TYPES: dict[str, Any] = typing.get_type_hints(Settings)


def field_help(name: str) -> str:
    """The description of one setting."""
    return str(Settings.__dataclass_fields__[name].metadata["help"])


def _shown(value: Any) -> str:
    """A value as an error message quotes it: repr, cut short (a 5000-digit number is a typo)."""
    text = repr(value)
    return text if len(text) <= 40 else text[:37] + "..."


def _coerce(name: str, value: Any, source: str) -> Any:
    """Turn a config/env/flag value into the field's type, checked, or fail with one clear line.

    `source` names where the value came from as the user wrote it (`-c/--ctx-size`,
    `WIZARDCHAT_CTX_SIZE`, `config file PATH: ctx-size`), so the line points at what to fix.
    """
    if name == "rpc":
        return _endpoints(value, source)
    kind = _TYPES[name]
    try:
        value = _coerce_value(name, kind, value)
    except (ValueError, TypeError, OverflowError):
        raise UsageError(f"{source}: {_shown(value)} {_not_a(kind)}") from None
    problem = value_problem(name, value)
    if problem:
        raise UsageError(f"{source}: {problem}")
    return value


def _endpoints(value: Any, source: str) -> tuple[str, ...]:
    """RPC endpoints, from any source, through the one parser (empty, bad, repeated: one line)."""
    from wizardchat.rpc_endpoints import parse_endpoints

    if not isinstance(value, str | list) or not all(isinstance(v, str) for v in value):
        raise UsageError(f"{source}: {_shown(value)} {_not_a(tuple[str, ...])}")
    try:
        return tuple(parse_endpoints(value))
    except UsageError as e:
        raise UsageError(f"{source}: {e}") from None


def _not_a(kind: Any) -> str:
    """What a value that cannot be converted to `kind` is not, in words."""
    if kind is int:
        return "is not a whole number"
    if kind is float:
        return "is not a number"
    if kind is bool:
        return "is not one of true, false, yes, no, on, off, 1, 0"
    if kind == tuple[str, ...]:
        return "is not a list of text values"
    return "is not text"


# Settings that take one of a few words; the rest of the checks are RANGES.
CHOICES: dict[str, tuple[str, ...]] = {
    "flash_attn": FLASH_ATTN_CHOICES,
    "cache_type_k": tuple(KV_CACHE_TYPES),
    "cache_type_v": tuple(KV_CACHE_TYPES),
    "plan": ("auto", "off"),
}


def value_problem(name: str, value: Any) -> str | None:
    """Why `value` is not allowed for the setting `name` (range or choice), or None."""
    bounds = RANGES.get(name)
    if bounds is not None and not bounds.allows(value):
        return f"must be {bounds.rule}, not {_shown(value)}"
    choices = CHOICES.get(name)
    if choices is not None and value not in choices:
        return f"must be one of {', '.join(choices)}, not {_shown(value)}"
    return None


def _text(name: str, value: str) -> str:
    if "\0" in value:
        raise ValueError("NUL character")
    # The model path keeps its bytes (a file name need not be UTF-8); the rest is text for the
    # model or for llama.cpp, and gets U+FFFD for invalid UTF-8 as piped stdin does.
    return value if name == "model" else repair_text(value)


def _coerce_value(name: str, kind: Any, value: Any) -> Any:
    if kind is bool:
        if isinstance(value, bool):
            return value
        text = str(value).strip().lower()
        if text in ("1", "true", "yes", "on"):
            return True
        if text in ("0", "false", "no", "off"):
            return False
        raise ValueError
    if isinstance(value, bool) and kind in (int, float):
        raise ValueError
    if kind is int:
        if isinstance(value, float) and not value.is_integer():
            raise ValueError  # int(2.5) would quietly be 2
        if not isinstance(value, int | float | str):
            raise TypeError
        return int(value)
    if kind is float:
        if not isinstance(value, int | float | str):
            raise TypeError
        return float(value)
    if kind == tuple[str, ...]:
        if isinstance(value, str):
            return tuple(_text(name, v.strip()) for v in value.split(",") if v.strip())
        if isinstance(value, list | tuple) and all(isinstance(v, str) for v in value):
            return tuple(_text(name, v) for v in value)
        raise ValueError
    # str and str | None
    if value is None:
        return None
    if not isinstance(value, str | int | float) or isinstance(value, bool):
        raise ValueError
    return _text(name, str(value))


def _validate(s: Settings) -> None:
    """What no single value shows: each value was checked where it came in (see _coerce)."""
    if s.model is not None and not s.model.strip():
        raise UsageError("the model is empty: give --model a path or a reference")


def read_config_file(path: Path) -> dict[str, Any]:
    """Read config.toml; a missing file is an empty config, a broken one a UsageError."""
    from wizardchat.inputs import regular_file_problem

    try:
        problem = regular_file_problem(path) if path.exists() else None
        if problem:
            raise UsageError(f"config file {path} {problem}")
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        return {}
    except UnicodeDecodeError as e:
        raise UsageError(f"config file {path} is not UTF-8 text (byte {e.start})") from None
    except OSError as e:
        raise UsageError(f"cannot read config file {path}: {e.strerror}") from None
    # Imported only for a file there is (most runs have none).
    if sys.version_info >= (3, 11):
        import tomllib
    else:  # pragma: no cover - Python 3.10
        import tomli as tomllib
    try:
        data = tomllib.loads(text)
    except tomllib.TOMLDecodeError as e:
        raise UsageError(f"config file {path}: {e}") from None
    except RecursionError:
        raise UsageError(f"config file {path}: values nested too deeply") from None
    except ValueError as e:  # e.g. an integer longer than Python's 4300-digit limit
        raise UsageError(f"config file {path}: {e}") from None
    return data  # keys as written: ctx-size or ctx_size (see load_settings)


def _with_nearest(key: str) -> str:
    """'key', and the setting it was probably meant to be, spelled the same way (- or _)."""
    import difflib

    spelled = {name.replace("_", "-") if "-" in key else name: name for name in FIELD_NAMES}
    nearest = difflib.get_close_matches(key, spelled, n=1, cutoff=0.6)
    return f"'{key}'" + (f" (did you mean '{nearest[0]}'?)" if nearest else "")


def load_settings(
    flags: Mapping[str, Any] | None = None,
    *,
    config_path: Path | None = None,
    environ: Mapping[str, str] | None = None,
    labels: Mapping[str, str] | None = None,
) -> Settings:
    """Merge defaults < config file < WIZARDCHAT_* environment < flags (None means not given).

    `labels` spell each flag as the command line does (`-c/--ctx-size`) for error messages.
    """
    from wizardchat import paths

    values: dict[str, Any] = {}
    # A flag wins over the same setting from elsewhere, even a bad value there.
    flagged = {key for key, value in (flags or {}).items() if value is not None}
    config_path = config_path or paths.config_file()
    for written, value in read_config_file(config_path).items():
        key = written.replace("-", "_")  # dashes too (ctx-size), as the flags are spelled
        source = f"config file {config_path}: {written}"
        if key not in FIELD_NAMES:
            raise UsageError(f"config file {config_path}: unknown setting {_with_nearest(written)}")
        if key not in flagged:
            values[key] = _coerce(key, value, source)
    env = os.environ if environ is None else environ
    for key in FIELD_NAMES:
        env_name = ENV_PREFIX + key.upper()
        if env_name in env and key not in flagged:
            values[key] = _coerce(key, env[env_name], env_name)
    for key, value in (flags or {}).items():
        if value is None:
            continue
        if key not in FIELD_NAMES:
            raise KeyError(key)  # a programming error, not a user one
        values[key] = _coerce(key, value, (labels or {}).get(key, key))
    settings = Settings(**values)
    _validate(settings)
    return settings
