"""The llama.cpp and sampling options, declared once, and the decorator that gives them to commands.

Each option is spelled as llama.cpp spells it (`-c/--ctx-size`, `-ngl`, `-ot`), with its help and
default from settings.py. `@settings_options(...)` adds the chosen ones to a command's signature
(typer reads `__signature__`) and hands their values to the command as one `flags` mapping (None:
not given), ready for `load_settings`. Commands list the options they take; the order here is
the order a help page shows them in, panel by panel.
"""

from __future__ import annotations

import functools
import inspect
from collections.abc import Callable, Mapping
from typing import Annotated, Any, TypeVar

import typer

from wizardchat.cli.usage import CHAT, MODEL, OUTPUT, PERFORMANCE, SESSIONS, flag_label
from wizardchat.settings import Settings, field_help

# Each setting's flag as an error message names it (`-c/--ctx-size`), filled in by _option.
FLAG_LABELS: dict[str, str] = {}


def _default_note(name: str) -> str:
    """`  [default: 0.8]`: a flag's own default is None (not given), so help shows Settings'."""
    default = Settings.__dataclass_fields__[name].default
    if name == "mmap":
        return "  [default: --mmap]"
    if isinstance(default, bool) or default in (None, ()) or name == "system":
        return ""
    return f"  [default: {default}]"


def _option(kind: Any, *names: str, name: str, panel: str = PERFORMANCE, **kw: Any) -> Any:
    """A settings flag: its help and default from settings.py, numbers shown as N."""
    FLAG_LABELS[name] = flag_label(names)
    kw.setdefault("metavar", "N")
    text = field_help(name) + _default_note(name)
    return Annotated[kind | None, typer.Option(*names, help=text, rich_help_panel=panel, **kw)]


# Every settings option, in help order. A command takes all of them or a named subset.
OPTIONS: dict[str, Any] = {
    "model": _option(str, "--model", "-m", name="model", panel=MODEL, metavar="REF"),
    "system": _option(str, "--system", name="system", panel=CHAT, metavar="TEXT"),
    "ctx_size": _option(int, "--ctx-size", "-c", name="ctx_size", panel=MODEL),
    "n_gpu_layers": _option(int, "--n-gpu-layers", "-ngl", name="n_gpu_layers"),
    "threads": _option(int, "--threads", "-t", name="threads"),
    "batch_size": _option(int, "--batch-size", "-b", name="batch_size"),
    "ubatch_size": _option(int, "--ubatch-size", "-ub", name="ubatch_size"),
    "flash_attn": _option(str, "--flash-attn", "-fa", name="flash_attn", metavar="on|off|auto"),
    "cache_type_k": _option(str, "--cache-type-k", "-ctk", name="cache_type_k", metavar="TYPE"),
    "cache_type_v": _option(str, "--cache-type-v", "-ctv", name="cache_type_v", metavar="TYPE"),
    "mlock": _option(bool, "--mlock", name="mlock", panel=MODEL),
    "mmap": _option(bool, "--mmap/--no-mmap", name="mmap", panel=MODEL),
    "cpu_moe": _option(bool, "--cpu-moe", "-cmoe", name="cpu_moe"),
    "n_cpu_moe": _option(int, "--n-cpu-moe", "-ncmoe", name="n_cpu_moe"),
    "override_tensor": _option(
        list[str], "--override-tensor", "-ot", name="override_tensor", metavar="REGEX=BUFFER"
    ),
    "temperature": _option(float, "--temperature", "--temp", name="temperature", panel=CHAT),
    "top_p": _option(float, "--top-p", name="top_p", panel=CHAT),
    "top_k": _option(int, "--top-k", name="top_k", panel=CHAT),
    "min_p": _option(float, "--min-p", name="min_p", panel=CHAT),
    "repeat_penalty": _option(float, "--repeat-penalty", name="repeat_penalty", panel=CHAT),
    "seed": _option(int, "--seed", "-s", name="seed", panel=CHAT),
    "max_tokens": _option(int, "--max-tokens", "-n", name="max_tokens", panel=CHAT),
    "rpc": _option(str, "--rpc", name="rpc", metavar="HOST:PORT[,...]"),
    "plan": _option(str, "--plan", name="plan", metavar="auto|off"),
    "kv_cache_max_gb": _option(
        float, "--kv-cache-max-gb", name="kv_cache_max_gb", panel=SESSIONS, metavar="GB"
    ),
    "verbose": _option(bool, "--verbose", "-v", name="verbose", panel=OUTPUT),
    "endpoint": _option(str, "--endpoint", name="endpoint", panel=MODEL, metavar="URL"),
    "endpoint_model": _option(
        str, "--endpoint-model", name="endpoint_model", panel=MODEL, metavar="NAME"
    ),
    "endpoint_timeout": _option(
        float, "--endpoint-timeout", name="endpoint_timeout", panel=MODEL, metavar="SECONDS"
    ),
}
SAMPLING = ("system", "temperature", "top_p", "top_k", "min_p", "repeat_penalty", "seed",
            "max_tokens")  # fmt: skip
CHAT_OPTIONS = tuple(OPTIONS)  # ask, run (and a server): load the model and talk to it
# ask and run only: `serve` and `bench` load their own model.
ENDPOINT = ("endpoint", "endpoint_model", "endpoint_timeout")
# bench: load and measure (no conversation, so no saved KV state either)
LOAD_OPTIONS = tuple(
    name for name in OPTIONS if name not in (*SAMPLING, *ENDPOINT, "kv_cache_max_gb")
)


def output_option(flag: str, text: str) -> Any:
    """An option in the Output panel (`--json`, `--plain`)."""
    return typer.Option(flag, help=text, rich_help_panel=OUTPUT)


# Options of several commands that are not settings.
YesOpt = Annotated[
    bool,
    typer.Option(
        "--yes",
        "-y",
        help="Download a model that is not here without asking.",
        rich_help_panel=MODEL,
    ),
]
VerbosePromptOpt = Annotated[
    bool,
    typer.Option(
        "--verbose-prompt",
        help="Before each reply, print the exact prompt and its token count to stderr.",
        rich_help_panel=OUTPUT,
    ),
]
NoServerOpt = Annotated[
    bool,
    typer.Option(
        "--no-server",
        help="Load the model here even when a wizardchat serve of it is running.",
        rich_help_panel=MODEL,
    ),
]
ServerOpt = Annotated[
    str | None,
    typer.Option(
        "--server",
        metavar="SOCKET|PID",
        help="Use this wizardchat serve (its socket path or pid; wizardchat ps lists them).",
        rich_help_panel=MODEL,
    ),
]

ApiKeyOpt = Annotated[
    str | None,
    typer.Option(
        "--api-key",
        metavar="KEY",
        help="The --endpoint's API key, sent as a Bearer token and never shown "
        "(default: WIZARDCHAT_API_KEY, then OPENAI_API_KEY).",
        rich_help_panel=MODEL,
    ),
]

Flags = Mapping[str, Any]
F = TypeVar("F", bound=Callable[..., Any])


def settings_options(*names: str) -> Callable[[F], F]:
    """Add the settings options `names` after the command's own parameters (typer reads the
    new `__signature__`); the command gets their values as one mapping, its `flags` argument."""
    unknown = set(names) - set(OPTIONS)
    assert not unknown, unknown
    chosen = [name for name in OPTIONS if name in names]  # help order, whatever the call's

    def decorate(command: F) -> F:
        own = inspect.signature(command, eval_str=True)
        assert "flags" in own.parameters, f"{command.__name__} takes no flags"
        params = [p for p in own.parameters.values() if p.name != "flags"]
        params += [
            inspect.Parameter(name, inspect.Parameter.KEYWORD_ONLY, default=None,
                              annotation=OPTIONS[name])
            for name in chosen
        ]  # fmt: skip

        @functools.wraps(command)
        def wrapper(*args: Any, **kwargs: Any) -> Any:
            flags = {name: kwargs.pop(name, None) for name in chosen}
            if flags.get("override_tensor") == []:  # typer's "not given" for a list
                flags["override_tensor"] = None
            return command(*args, flags=flags, **kwargs)

        wrapper.__signature__ = own.replace(parameters=params)  # type: ignore[attr-defined]
        return wrapper  # type: ignore[return-value]

    return decorate
