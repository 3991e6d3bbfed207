"""The objects a command builds: its settings (the model resolved to a file), the engine with
llama.cpp's log open, the chat session, stdin as text or lines, and the REPL with its reader."""

from __future__ import annotations

import dataclasses
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import IO, TYPE_CHECKING

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
    from wizardchat.engine.llama_engine import LlamaEngine
    from wizardchat.tui.progress import PromptProgressLine
    from wizardchat.tui.repl import Repl


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
    from wizardchat.engine.offload import detect_machine
    from wizardchat.hub.catalog import DEFAULT_FAMILY
    from wizardchat.hub.resolve import resolve_model

    given = loaded.model or DEFAULT_FAMILY
    path = resolve_model(
        given,
        yes=yes,
        can_ask=can_ask,
        confirm=env.confirm,
        err=env.stderr,
        machine=detect_machine,
    )
    check_model_file(path)
    from wizardchat.chat.recording import model_reference

    return dataclasses.replace(loaded, model=str(path)), model_reference(given, path)


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


def _open_engine(
    env: Environment, settings: Settings, log: IO[str], plan_line: bool
) -> LlamaEngine:
    from wizardchat.engine.llama_engine import LlamaEngine
    from wizardchat.tui.progress import LoadProgress

    assert settings.model_path is not None
    bar = LoadProgress(env.stderr, settings.model_path.name) if env.stderr_is_terminal else None
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


def kv_cache(env: Environment, loaded: LlamaEngine, settings: Settings) -> KvCache | None:
    """The KV states saved with sessions, under --kv-cache-max-gb (None when it is 0)."""
    if settings.kv_cache_max_gb <= 0:
        return None
    from wizardchat import paths
    from wizardchat.chat.kv_cache import KvCache
    from wizardchat.chat.kv_store import GB, KvStore

    store = KvStore(paths.kv_cache_dir(), int(settings.kv_cache_max_gb * GB))
    return KvCache(loaded, store, env.say)


def prompt_progress(env: Environment) -> PromptProgressLine | None:
    """The prompt's evaluation shown on stderr when it is a terminal; nothing elsewhere."""
    from wizardchat.tui.progress import PromptProgressLine

    return PromptProgressLine(env.stderr) if env.stderr_is_terminal else None


def _session(
    env: Environment, loaded: LlamaEngine, settings: Settings, verbose_prompt: bool
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
    loaded: LlamaEngine,
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
