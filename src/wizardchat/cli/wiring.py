"""The objects a command builds: its settings (the model resolved to a file), the engine with
llama.cpp's log open, the chat session, stdin as text or lines, and the REPL with its reader."""

from __future__ import annotations

import dataclasses
import os
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import IO, TYPE_CHECKING, Any, cast

from wizardchat import __version__
from wizardchat.cli.environment import Environment
from wizardchat.cli.options import FLAG_LABELS, Flags
from wizardchat.cli.output import closed_at_start, plain_output_wanted
from wizardchat.errors import BadModelError, ContextError, OutputError
from wizardchat.settings import Settings, load_settings

if TYPE_CHECKING:
    from wizardchat.chat.kv_cache import KvCache
    from wizardchat.chat.session import ChatSession
    from wizardchat.chat.store import SessionStore
    from wizardchat.endpoint.engine import EndpointEngine
    from wizardchat.engine.llama_engine import LlamaEngine
    from wizardchat.serve.client import RemoteEngine
    from wizardchat.tui.progress import PromptProgressLine
    from wizardchat.tui.repl import Repl

    ChatBackend = LlamaEngine | RemoteEngine | EndpointEngine  # what a chat's replies come from


def settings(env: Environment, flags: Flags, *, yes: bool, can_ask: bool) -> Settings:
    """The run's settings, with a model reference resolved to a file (pulled if need be)."""
    return settings_and_model_ref(env, flags, yes=yes, can_ask=can_ask)[0]


def settings_and_model_ref(
    env: Environment, flags: Flags, *, yes: bool, can_ask: bool
) -> tuple[Settings, str]:
    """The settings (see settings), and what a saved session keeps to load that model again."""
    loaded = load_settings(flags, environ=env.environ, labels=FLAG_LABELS)
    if closed_at_start(env.stdout):  # before minutes of loading, not after
        raise OutputError("cannot write output: stdout is closed")
    if loaded.endpoint:  # the server has the model: nothing to find here
        return loaded, ""
    from wizardchat.hub.catalog import DEFAULT_FAMILY, model_reference, parse_ref

    given = loaded.model or DEFAULT_FAMILY
    found = parse_ref(given)
    # A file needs nothing found or downloaded: the hub's and the planner's code stays unloaded
    # (a tenth of the start-up of an `ask` that a running server answers).
    path = found if isinstance(found, Path) else _resolve(env, given, yes=yes, can_ask=can_ask)
    check_model_file(path)
    return dataclasses.replace(loaded, model=str(path)), model_reference(given, path)


def wants_endpoint(env: Environment, flags: Flags) -> bool:
    """Whether this run chats through --endpoint (flag, WIZARDCHAT_ENDPOINT or config)."""
    return bool(load_settings(flags, environ=env.environ, labels=FLAG_LABELS).endpoint)


def _resolve(env: Environment, given: str, *, yes: bool, can_ask: bool) -> Path:
    from wizardchat.engine.offload import detect_machine
    from wizardchat.hub.resolve import resolve_model

    return resolve_model(
        given, yes=yes, can_ask=can_ask, confirm=env.confirm, err=env.stderr,
        machine=detect_machine,
    )  # fmt: skip


def check_model_file(path: Path) -> None:
    """A directory, FIFO or device as --model: say so, before reading it blocks or never ends."""
    from wizardchat.inputs import regular_file_problem

    if path.exists() and (problem := regular_file_problem(path)):
        raise BadModelError(f"model {path} {problem}")


@contextmanager
def _llama_log(env: Environment, settings: Settings) -> Iterator[IO[str]]:
    """llama.cpp's log: stderr with --verbose, else a file in the log directory.

    A log that cannot be written (read-only home, full disk) costs one warning, never the chat.
    """
    if settings.verbose:
        yield env.stderr
        return
    from wizardchat import paths
    from wizardchat.engine.llama_log import open_llama_log

    stderr = env.stderr  # not the redirect the load puts in place, which is this log

    def warn(reason: str) -> None:
        stderr.write(f"wizardchat: warning: {reason}\n")
        stderr.flush()

    with open_llama_log(paths.llama_log_file(), warn) as log:
        log.write(f"\n=== wizardchat {__version__} {time.strftime('%Y-%m-%d %H:%M:%S')} ===\n")
        yield log


@dataclass(frozen=True)
class ServerChoice:
    """Whether a chat uses a running `wizardchat serve` of its model (--no-server, --server)."""

    use: bool = True
    target: str | None = None  # a socket path or pid (--server): that one or an error
    api_key: str | None = None  # --api-key, for --endpoint


@contextmanager
def chat_engine(
    env: Environment, settings: Settings, verbose_prompt: bool, server: ServerChoice
) -> Iterator[tuple[ChatBackend, ChatSession]]:
    """A chat's engine: the --endpoint server when one is set, a running `wizardchat serve` of
    the model when `server` allows and one runs, else the model loaded here (engine())."""
    if settings.endpoint:
        from wizardchat.endpoint.engine import open_endpoint

        environ = env.environ
        key = server.api_key or environ.get("WIZARDCHAT_API_KEY") or environ.get("OPENAI_API_KEY")
        served = open_endpoint(settings, key, env.say)
        yield served, _session(env, served, settings, verbose_prompt)
        return
    remote = _attach(env, settings, server)
    if remote is not None:
        yield remote, _session(env, remote, settings, verbose_prompt)
        return
    with engine(env, settings, verbose_prompt) as pair:
        yield pair


@contextmanager
def engine(
    env: Environment, settings: Settings, verbose_prompt: bool, plan_line: bool = True
) -> Iterator[tuple[LlamaEngine, ChatSession]]:
    """Load the model with its log open; free it before the log closes (freeing logs too).

    `plan_line` False: the command shows the plan itself (bench's heading), not on stderr.
    """
    with _llama_log(env, settings) as log:
        loaded = _open_engine(env, settings, log, plan_line)
        try:
            yield loaded, _session(env, loaded, settings, verbose_prompt)
        finally:
            loaded.close()
            from wizardchat.engine.llama_log import route_llama_log

            route_llama_log(None)


# Settings that shape the load; a server keeps its own, whatever a client asks.
SERVER_LOAD_FIELDS = (
    "ctx_size", "n_gpu_layers", "threads", "batch_size", "ubatch_size", "flash_attn",
    "cache_type_k", "cache_type_v", "mlock", "mmap", "cpu_moe", "n_cpu_moe", "override_tensor",
    "rpc", "plan",
)  # fmt: skip


def server_load_settings(settings: Settings) -> dict[str, Any]:
    """The load settings a server registers (JSON: tuples as lists)."""
    values = dataclasses.asdict(settings)
    return {
        k: list(values[k]) if isinstance(values[k], tuple) else values[k]
        for k in SERVER_LOAD_FIELDS
    }


def _attach(env: Environment, settings: Settings, choice: ServerChoice) -> RemoteEngine | None:
    """A RemoteEngine of the server to use, or None to load here."""
    if not choice.use:
        return None
    from wizardchat.serve import registry

    assert settings.model_path is not None
    if choice.target:
        entry = _named_server(choice.target, registry.entries())
    else:
        running = registry.for_model(settings.model_path)
        if not running:
            return None
        entry = running[-1]  # the newest
    # Only now the client: most chats find no server and load the model here.
    from wizardchat.engine.reply_data import Sampling
    from wizardchat.errors import ServerError
    from wizardchat.serve.client import RemoteEngine

    try:
        remote = RemoteEngine(entry, Sampling.of(settings), settings.seed, env.say)
    except ServerError as e:
        if choice.target:
            raise
        env.say(f"{e}; loading the model here")
        return None
    if choice.target and os.path.realpath(entry.model) != os.path.realpath(settings.model_path):
        env.say(f"--server serves {entry.model_name}, not {settings.model_path.name}: using it")
    line = f"using wizardchat serve (pid {entry.pid})"
    differ = _load_differences(settings, {**entry.settings, "ctx_size": remote.n_ctx})
    if differ:
        line += f"; it was started with {', '.join(differ)} (--no-server loads yours here)"
    env.say(line)
    return remote


def _named_server(target: str, entries: list[Any]) -> Any:
    from wizardchat.errors import ServerError

    for entry in entries:
        if target == str(entry.pid) or os.path.realpath(target) == os.path.realpath(entry.socket):
            return entry
    raise ServerError(f"no wizardchat serve runs as {target} (wizardchat ps lists them)")


def _load_differences(settings: Settings, served: dict[str, Any]) -> list[str]:
    """`-c 8192 (not 4096)` for each load setting this run asks for that the server lacks."""
    mine = server_load_settings(settings)
    defaults = server_load_settings(Settings())
    out = []
    for name in SERVER_LOAD_FIELDS:
        asked = mine[name]
        if name == "ctx_size":  # the server's is its context's real size: compare what -c gives
            asked = -(-asked // 256) * 256
        if mine[name] == defaults[name] or name not in served or served[name] == asked:
            continue  # not asked for, or the same
        label = FLAG_LABELS.get(name, name).split("/")[0]
        out.append(f"{label} {_shown(served[name])} (not {_shown(mine[name])})")
    return out


def _shown(value: Any) -> str:
    if isinstance(value, list):
        return ",".join(map(str, value)) or "none"
    return str(value)


@contextmanager
def loader(env: Environment, settings: Settings) -> Iterator[Callable[[], LlamaEngine]]:
    """A function that loads the model as engine() does (plan line, progress bar), for a
    server that loads again after unloading; llama.cpp's log stays open meanwhile."""
    with _llama_log(env, settings) as log:
        try:
            yield lambda: _open_engine(env, settings, log, True)
        finally:
            from wizardchat.engine.llama_log import route_llama_log

            route_llama_log(None)


def _open_engine(
    env: Environment, settings: Settings, log: IO[str], plan_line: bool
) -> LlamaEngine:
    from wizardchat.engine.llama_engine import LlamaEngine

    assert settings.model_path is not None
    bar = None
    if env.stderr_is_terminal:
        from wizardchat.tui.progress import LoadProgress

        bar = LoadProgress(env.stderr, settings.model_path.name)
    try:
        loaded = LlamaEngine(settings, progress=bar, log=log)
    finally:
        if bar:
            bar.done()
    plan = loaded.load_plan
    # A pipe's reader wants the reply, not chatter.
    if plan_line and (env.stderr_is_terminal or settings.verbose):
        env.say(loaded.plan_line())
    if plan.ctx_capped:
        n_train = loaded.info.arch_value("context_length", 0)
        env.say(
            f"context: {plan.n_ctx} tokens (the model's {n_train} capped to fit memory; -c sets it)"
        )
    if plan.ctx_requested:
        env.say(
            f"context: {plan.n_ctx} tokens (-c {plan.ctx_requested} rounded up to a multiple "
            "of 256, as llama.cpp does)"
        )
    if plan.flash_attn and settings.flash_attn == "off":  # plan_load forced it on
        env.say("flash attention turned on: llama.cpp needs it for a quantized V cache")
    return loaded


def kv_cache(env: Environment, loaded: ChatBackend, settings: Settings) -> KvCache | None:
    """The KV states saved with sessions, under --kv-cache-max-gb (None when it is 0, and
    through --endpoint, whose server keeps its cache to itself)."""
    if settings.kv_cache_max_gb <= 0 or settings.endpoint:
        return None
    from wizardchat import paths
    from wizardchat.chat.kv_cache import KvCache
    from wizardchat.chat.kv_store import GB, KvStore

    store = KvStore(paths.kv_cache_dir(), int(settings.kv_cache_max_gb * GB))
    # settings.endpoint, returned above, is the only way to an EndpointEngine (chat_engine):
    # the cast spares every chat importing the HTTP client to check it.
    return KvCache(cast("LlamaEngine | RemoteEngine", loaded), store, env.say)


def prompt_progress(env: Environment) -> PromptProgressLine | None:
    """The prompt's evaluation shown on stderr when it is a terminal; nothing elsewhere."""
    if not env.stderr_is_terminal:
        return None
    from wizardchat.tui.progress import PromptProgressLine

    return PromptProgressLine(env.stderr)


def _session(
    env: Environment, loaded: ChatBackend, settings: Settings, verbose_prompt: bool
) -> ChatSession:
    from wizardchat.chat.session import ChatSession

    def show_prompt(text: str, n_tokens: int) -> None:
        env.say(f"--- prompt: {n_tokens} tokens ---\n{text}\n--- end of prompt ---")

    return ChatSession(
        loaded,
        system=settings.system,
        max_tokens=settings.max_tokens,
        notify=env.say,
        show_prompt=show_prompt if verbose_prompt else None,
    )


def read_stdin_text(env: Environment) -> str:
    """All of stdin up to a bound, with invalid UTF-8 replaced rather than fatal."""
    from wizardchat.inputs import STDIN_LIMIT, TooLongError, read_limited

    assert env.stdin is not None
    try:
        data = read_limited(env.stdin.buffer, STDIN_LIMIT)
    except TooLongError:
        raise ContextError(
            f"input too long: piped stdin is over {STDIN_LIMIT // (1024 * 1024)} MiB, more "
            "than any context holds"
        ) from None
    return data.decode("utf-8", errors="replace")


def stdin_lines(env: Environment) -> Iterator[str]:
    """stdin's lines, each up to a bound, invalid UTF-8 replaced."""
    from wizardchat.inputs import STDIN_LIMIT, TooLongError, read_lines

    assert env.stdin is not None
    count = 0
    try:
        for line in read_lines(env.stdin.buffer, STDIN_LIMIT):
            count += 1
            yield line
    except TooLongError:
        raise ContextError(
            f"line {count + 1}: over {STDIN_LIMIT // (1024 * 1024)} MiB without a newline; "
            "the batch stops here"
        ) from None


def repl(
    env: Environment,
    loaded: ChatBackend,
    session: ChatSession,
    store: SessionStore,
    *,
    plain: bool,
    show_stats: bool,
    model_ref: str,
    kv: KvCache | None,
) -> Repl:
    """The interactive chat: output plain or rich, the line reader, the session wired to both."""
    from wizardchat import paths
    from wizardchat.cli.usage import STATE
    from wizardchat.tui import commands
    from wizardchat.tui.output import Output, PlainOutput, RichOutput
    from wizardchat.tui.reader import make_reader
    from wizardchat.tui.repl import Repl

    out: Output
    if plain_output_wanted(env, plain):
        out = PlainOutput(env.stdout, env.stderr)
    else:
        from rich.console import Console

        # Only on a terminal, where env's streams are sys's: rich finds them itself.
        out = RichOutput(Console(highlight=False), Console(stderr=True, highlight=False))
    reader = make_reader(
        paths.input_history_file(),
        command_names=commands.BY_NAME,
        argument_kinds={c.name: c.completes for c in commands.COMMANDS if c.completes},
        session_names=store.names,  # file names only: completion never parses a file
        setting_names=commands.PARAMS,
        warn=env.say,
        debug=STATE.debug,
    )
    session.notify = out.note
    session.progress = prompt_progress(env)
    session.abort_prompt = True  # the REPL's Ctrl-C only cancels, so it may stop a prompt too
    return Repl(
        session, loaded, store, reader, out, show_stats=show_stats, model_ref=model_ref, kv=kv
    )
