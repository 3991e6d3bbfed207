"""The `wizardchat` command: parse flags, build the objects, call in; the one error boundary.

Heavy modules (llama_cpp, numpy, huggingface_hub, prompt_toolkit, rich) are imported inside
the commands that need them, so `wizardchat --help` starts about as fast as Python itself.
"""

from __future__ import annotations

import dataclasses
import functools
import json
import os
import sys
import time
import typing
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import IO, TYPE_CHECKING, Annotated, Any

import typer

from wizardchat import __version__
from wizardchat.cli.usage import (
    CHAT,
    MODEL,
    OUTPUT,
    PERFORMANCE,
    SESSIONS,
    Command,
    Group,
    flag_label,
)
from wizardchat.cli.usage import STATE as _state
from wizardchat.errors import (
    BadModelError,
    ContextError,
    Declined,
    ExitCode,
    NoModelError,
    OutputError,
    SessionError,
    UsageError,
    WizardchatError,
)
from wizardchat.settings import MAX_THREADS, Settings, field_help, load_settings
from wizardchat.signals import Terminated

if TYPE_CHECKING:
    from wizardchat.chat.session import ChatSession
    from wizardchat.chat.store import SavedSession, SessionStore
    from wizardchat.engine.llama_engine import LlamaEngine
    from wizardchat.tui.progress import PromptProgressLine
    from wizardchat.tui.repl import Repl

TOP_LEVEL_EXAMPLES = """
wizardchat run                   chat with WizardLM-2 8x22B (asks to download it)
wizardchat run -m FILE.gguf      chat with a model file you already have
wizardchat ask "Why?"            one reply, to stdout
wizardchat COMMAND -h            the options of one command
"""

app = typer.Typer(
    name="wizardchat",
    help="Chat with WizardLM-2 8x22B in your terminal, on llama.cpp.",
    epilog=TOP_LEVEL_EXAMPLES,
    cls=Group,
    add_completion=False,
    no_args_is_help=True,
    pretty_exceptions_enable=False,
    rich_markup_mode=None,  # typer's rich help costs ~150 ms of start-up
    # Help as wide as the terminal up to 100 columns (click stops at 80).
    context_settings={"help_option_names": ["-h", "--help"], "max_content_width": 100},
)


# Each setting's flag as an error message names it (`-c/--ctx-size`), filled in by _o.
FLAG_LABELS: dict[str, str] = {}


def _o(*names: str, name: str, panel: str = PERFORMANCE, **kw: Any) -> Any:
    """A settings flag: its help and default from settings.py, numbers shown as N."""
    FLAG_LABELS[name] = flag_label(names)
    kw.setdefault("metavar", "N")
    text = field_help(name) + _default_note(name)
    return typer.Option(*names, help=text, rich_help_panel=panel, **kw)


def _default_note(name: str) -> str:
    """`  [default: 0.8]`: a flag's own default is None (not given), so help shows Settings'."""
    default = Settings.__dataclass_fields__[name].default
    if name == "mmap":
        return "  [default: --mmap]"
    if isinstance(default, bool) or default in (None, ()) or name == "system":
        return ""
    return f"  [default: {default}]"


# Options shared by `ask` and `run`, spelled as llama.cpp spells them.
ModelOpt = Annotated[str | None, _o("--model", "-m", name="model", panel=MODEL, metavar="REF")]
CtxOpt = Annotated[int | None, _o("--ctx-size", "-c", name="ctx_size", panel=MODEL)]
NglOpt = Annotated[int | None, _o("--n-gpu-layers", "-ngl", name="n_gpu_layers")]
ThreadsOpt = Annotated[int | None, _o("--threads", "-t", name="threads")]
BatchOpt = Annotated[int | None, _o("--batch-size", "-b", name="batch_size")]
UbatchOpt = Annotated[int | None, _o("--ubatch-size", "-ub", name="ubatch_size")]
FlashOpt = Annotated[
    str | None, _o("--flash-attn", "-fa", name="flash_attn", metavar="on|off|auto")
]
CtkOpt = Annotated[str | None, _o("--cache-type-k", "-ctk", name="cache_type_k", metavar="TYPE")]
CtvOpt = Annotated[str | None, _o("--cache-type-v", "-ctv", name="cache_type_v", metavar="TYPE")]
MlockOpt = Annotated[bool | None, _o("--mlock", name="mlock", panel=MODEL)]
MmapOpt = Annotated[bool | None, _o("--mmap/--no-mmap", name="mmap", panel=MODEL)]
CpuMoeOpt = Annotated[bool | None, _o("--cpu-moe", "-cmoe", name="cpu_moe")]
NCpuMoeOpt = Annotated[int | None, _o("--n-cpu-moe", "-ncmoe", name="n_cpu_moe", metavar="N")]
OtOpt = Annotated[
    list[str] | None, _o("--override-tensor", "-ot", name="override_tensor", metavar="REGEX=BUFFER")
]
SystemOpt = Annotated[str | None, _o("--system", name="system", panel=CHAT, metavar="TEXT")]
TempOpt = Annotated[float | None, _o("--temperature", "--temp", name="temperature", panel=CHAT)]
TopPOpt = Annotated[float | None, _o("--top-p", name="top_p", panel=CHAT)]
TopKOpt = Annotated[int | None, _o("--top-k", name="top_k", panel=CHAT)]
MinPOpt = Annotated[float | None, _o("--min-p", name="min_p", panel=CHAT)]
RepeatOpt = Annotated[float | None, _o("--repeat-penalty", name="repeat_penalty", panel=CHAT)]
SeedOpt = Annotated[int | None, _o("--seed", "-s", name="seed", panel=CHAT)]
MaxTokOpt = Annotated[int | None, _o("--max-tokens", "-n", name="max_tokens", panel=CHAT)]
VerboseOpt = Annotated[bool | None, _o("--verbose", "-v", name="verbose", panel=OUTPUT)]
RpcOpt = Annotated[str | None, _o("--rpc", name="rpc", metavar="HOST:PORT[,...]")]
PlanOpt = Annotated[str | None, _o("--plan", name="plan", metavar="auto|off")]
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


def _err(message: str) -> None:
    """One message on stderr, control characters made visible: messages echo untrusted text
    (paths, names, the prompt with past replies), and stderr is for people, pipe or not."""
    from wizardchat.safe_text import terminal_safe

    try:
        sys.stderr.write(terminal_safe(message) + "\n")
        sys.stderr.flush()
    except (OSError, ValueError):
        pass  # a full or closed stderr loses the message, never the reply or the exit code


def _settings(flags: dict[str, Any], *, yes: bool = False, can_ask: bool = False) -> Settings:
    """The run's settings, with a model reference resolved to a file (pulled if need be)."""
    return _settings_and_model_ref(flags, yes=yes, can_ask=can_ask)[0]


def _settings_and_model_ref(
    flags: dict[str, Any], *, yes: bool, can_ask: bool
) -> tuple[Settings, str]:
    """The settings (see _settings), and what a saved session keeps to load that model again."""
    if flags.get("override_tensor") == []:
        flags["override_tensor"] = None
    settings = load_settings(flags, labels=FLAG_LABELS)
    if getattr(sys.stdout, "closed_at_start", False):  # before minutes of loading, not after
        raise OutputError("cannot write output: stdout is closed")
    from wizardchat.hub.catalog import DEFAULT_FAMILY
    from wizardchat.hub.resolve import confirm_on_terminal, resolve_model

    given = settings.model or DEFAULT_FAMILY
    path = resolve_model(
        given,
        yes=yes,
        can_ask=can_ask,
        confirm=confirm_on_terminal,
        err=sys.stderr,
    )
    _check_model_file(path)
    from wizardchat.chat.recording import model_reference

    return dataclasses.replace(settings, model=str(path)), model_reference(given, path)


def _check_model_file(path: Path) -> None:
    """A directory, FIFO or device as --model: say so, before reading it blocks or never ends."""
    from wizardchat.inputs import regular_file_problem

    if path.exists() and (problem := regular_file_problem(path)):
        raise BadModelError(f"model {path} {problem}")


@contextmanager
def _llama_log(settings: Settings) -> Iterator[IO[str]]:
    """llama.cpp's log: stderr with --verbose, else a file in the log directory.

    A log that cannot be written (read-only home, full disk) costs one warning, never the chat.
    """
    if settings.verbose:
        yield sys.stderr
        return
    from wizardchat import paths
    from wizardchat.engine.llama_log import open_llama_log

    stderr = sys.stderr  # not the redirect the load puts in place, which is this log

    def warn(reason: str) -> None:
        stderr.write(f"wizardchat: warning: {reason}\n")
        stderr.flush()

    with open_llama_log(paths.llama_log_file(), warn) as log:
        log.write(f"\n=== wizardchat {__version__} {time.strftime('%Y-%m-%d %H:%M:%S')} ===\n")
        yield log


@contextmanager
def _engine(
    settings: Settings, verbose_prompt: bool, plan_line: bool = True
) -> Iterator[tuple[LlamaEngine, ChatSession]]:
    """Load the model with its log open; free it before the log closes (freeing logs too).

    `plan_line` False: the command shows the plan itself (bench's heading), not on stderr.
    """
    with _llama_log(settings) as log:
        engine = _open_engine(settings, log, plan_line)
        try:
            yield engine, _session(engine, settings, verbose_prompt)
        finally:
            engine.close()
            from wizardchat.engine.llama_log import route_llama_log

            route_llama_log(None)


def _open_engine(settings: Settings, log: IO[str], plan_line: bool = True) -> LlamaEngine:
    from wizardchat.engine.llama_engine import LlamaEngine
    from wizardchat.tui.progress import LoadProgress

    assert settings.model_path is not None
    bar = LoadProgress(sys.stderr, settings.model_path.name) if sys.stderr.isatty() else None
    try:
        engine = LlamaEngine(settings, progress=bar, log=log)
    finally:
        if bar:
            bar.done()
    plan = engine.load_plan
    # A pipe's reader wants the reply, not chatter.
    if plan_line and (sys.stderr.isatty() or settings.verbose):
        _err(engine.plan_line())
    if plan.ctx_capped:
        n_train = engine.info.arch_value("context_length", 0)
        _err(
            f"context: {plan.n_ctx} tokens (the model's {n_train} capped to fit memory; -c sets it)"
        )
    if plan.ctx_requested:
        _err(
            f"context: {plan.n_ctx} tokens (-c {plan.ctx_requested} rounded up to a multiple "
            "of 256, as llama.cpp does)"
        )
    if plan.flash_attn and settings.flash_attn == "off":  # plan_load forced it on
        _err("flash attention turned on: llama.cpp needs it for a quantized V cache")
    return engine


def _prompt_progress() -> PromptProgressLine | None:
    """The prompt's evaluation shown on stderr when it is a terminal; nothing elsewhere."""
    from wizardchat.tui.progress import PromptProgressLine

    return PromptProgressLine(sys.stderr) if sys.stderr.isatty() else None


def _show_prompt(text: str, n_tokens: int) -> None:
    _err(f"--- prompt: {n_tokens} tokens ---\n{text}\n--- end of prompt ---")


def _session(engine: LlamaEngine, settings: Settings, verbose_prompt: bool) -> ChatSession:
    from wizardchat.chat.session import ChatSession

    return ChatSession(
        engine,
        system=settings.system,
        max_tokens=settings.max_tokens,
        notify=_err,
        show_prompt=_show_prompt if verbose_prompt else None,
    )


def _read_stdin_text() -> str:
    """All of stdin up to a bound, with invalid UTF-8 replaced rather than fatal."""
    from wizardchat.inputs import STDIN_LIMIT, TooLongError, read_limited

    try:
        data = read_limited(sys.stdin.buffer, STDIN_LIMIT)
    except TooLongError:
        raise ContextError(
            f"input too long: piped stdin is over {STDIN_LIMIT // (1024 * 1024)} MiB, more "
            "than any context holds"
        ) from None
    return data.decode("utf-8", errors="replace")


def _stdin_lines() -> Iterator[str]:
    from wizardchat.inputs import STDIN_LIMIT, TooLongError, read_lines

    count = 0
    try:
        for line in read_lines(sys.stdin.buffer, STDIN_LIMIT):
            count += 1
            yield line
    except TooLongError:
        raise ContextError(
            f"line {count + 1}: over {STDIN_LIMIT // (1024 * 1024)} MiB without a newline; "
            "the batch stops here"
        ) from None


def _version(value: bool) -> None:
    if value:
        typer.echo(f"wizardchat {__version__}")
        raise typer.Exit()


def _guarded(command: Callable[..., None]) -> Callable[..., None]:
    """The one error boundary: every failure becomes one stderr line and a documented exit code.

    typer.Exit subclasses RuntimeError, so it is re-raised before the catch-all.
    """

    @functools.wraps(command)
    def wrapper(*args: Any, **kwargs: Any) -> None:
        try:
            command(*args, **kwargs)
        except typer.Exit:
            raise
        except Declined as e:  # the user said no: say what next, exit 0
            _err(f"wizardchat: {e}")
            raise typer.Exit(e.exit_code) from None
        except WizardchatError as e:
            if _state.debug:
                raise
            _err(f"wizardchat: error: {e}")
            for hint in e.hints:
                _err(f"wizardchat: hint: {hint}")
            raise typer.Exit(e.exit_code) from None
        except Terminated as e:  # SIGTERM/SIGHUP between replies: nothing was left unsaved
            raise typer.Exit(128 + e.signum) from None
        except KeyboardInterrupt:
            if _state.debug:
                raise
            _err("\nwizardchat: interrupted")
            raise typer.Exit(ExitCode.INTERRUPTED) from None
        except BrokenPipeError:
            _quiet_broken_pipe()
            raise typer.Exit(ExitCode.OK) from None
        except Exception as e:
            if _state.debug:
                raise
            if isinstance(e, OSError) and _stdout_failed():
                _quiet_broken_pipe()  # the buffered rest must not fail again at exit
                _err(f"wizardchat: error: cannot write output: {e.strerror or e}")
                raise typer.Exit(ExitCode.OUTPUT) from None
            _err(f"wizardchat: unexpected error: {type(e).__name__}: {e} (--debug shows details)")
            raise typer.Exit(ExitCode.ERROR) from None

    return wrapper


@app.callback()
def _root(
    debug: Annotated[
        bool, typer.Option("--debug", help="Show tracebacks instead of one-line errors.")
    ] = False,
    version: Annotated[
        bool,
        typer.Option("--version", callback=_version, is_eager=True, help="Print the version."),
    ] = False,
) -> None:
    _state.debug = debug


ASK_EXAMPLES = """
wizardchat ask "Why is the sky blue?" -m FILE.gguf
git diff | wizardchat ask "Write a commit message for this." --temp 0.2
wizardchat ask "Name three primes." --json -n 64 | jq -r .reply
"""


@app.command(cls=Command, epilog=ASK_EXAMPLES)
@_guarded
def ask(
    prompt: Annotated[
        str | None,
        typer.Argument(metavar="PROMPT", help="The question; piped stdin comes first."),
    ] = None,
    json_output: Annotated[
        bool,
        typer.Option(
            "--json",
            help="Print one JSON object with the reply and its stats.",
            rich_help_panel=OUTPUT,
        ),
    ] = False,
    plain: Annotated[
        bool,
        typer.Option(
            "--plain",
            help="The reply's raw text on a terminal too, no markdown.",
            rich_help_panel=OUTPUT,
        ),
    ] = False,
    verbose_prompt: VerbosePromptOpt = False,
    yes: YesOpt = False,
    model: ModelOpt = None,
    system: SystemOpt = None,
    ctx_size: CtxOpt = None,
    n_gpu_layers: NglOpt = None,
    threads: ThreadsOpt = None,
    batch_size: BatchOpt = None,
    ubatch_size: UbatchOpt = None,
    flash_attn: FlashOpt = None,
    cache_type_k: CtkOpt = None,
    cache_type_v: CtvOpt = None,
    mlock: MlockOpt = None,
    mmap: MmapOpt = None,
    cpu_moe: CpuMoeOpt = None,
    n_cpu_moe: NCpuMoeOpt = None,
    override_tensor: OtOpt = None,
    temperature: TempOpt = None,
    top_p: TopPOpt = None,
    top_k: TopKOpt = None,
    min_p: MinPOpt = None,
    repeat_penalty: RepeatOpt = None,
    seed: SeedOpt = None,
    max_tokens: MaxTokOpt = None,
    rpc: RpcOpt = None,
    plan: PlanOpt = None,
    verbose: VerboseOpt = None,
) -> None:
    """Answer one prompt: the reply to stdout, the rest to stderr."""
    flags = {
        k: v
        for k, v in locals().items()
        if k not in ("prompt", "json_output", "plain", "verbose_prompt", "yes")
    }
    from wizardchat.inputs import repair_text

    piped = "" if sys.stdin is None or sys.stdin.isatty() else _read_stdin_text().strip()
    parts = [p for p in (piped, repair_text(prompt or "").strip()) if p]
    if not parts:
        raise UsageError('nothing to ask: give a prompt (wizardchat ask "...") or pipe text in')
    text = "\n\n".join(parts)
    can_ask = sys.stdin is not None and sys.stdin.isatty() and sys.stderr.isatty()
    settings = _settings(flags, yes=yes, can_ask=can_ask)
    out = _reply_output()
    with _engine(settings, verbose_prompt) as (engine, session):
        from wizardchat.inputs import check_fits

        session.progress = _prompt_progress()

        check_fits(text, engine.n_ctx, "input too long for the context")
        reply = session.send(text)
        if json_output:
            from wizardchat.chat.batch import answer_record
            from wizardchat.safe_text import json_safe

            reply.text()
            record = answer_record(reply.result, engine.model_name)
            out.write(json_safe(json.dumps(record, ensure_ascii=False)) + "\n")
        elif _plain_output_wanted(plain):  # a pipe or file gets the reply byte for byte
            from wizardchat.safe_text import stream_plain

            stream_plain(reply, out)
            out.write("\n")
        else:  # a terminal: as the REPL shows it (markdown, word wrap, no leading blank lines)
            from rich.console import Console

            from wizardchat.tui.markdown_stream import stream_markdown

            stream_markdown(reply, Console(highlight=False))
        out.flush()
        if reply.result.end_mark():
            _err(reply.result.end_mark())  # never a silent cut or a silent empty reply


RUN_EXAMPLES = r"""
wizardchat run                         WizardLM-2 8x22B (asks to download)
wizardchat run -m FILE.gguf            a model file you already have
wizardchat run --session work          open or start the conversation 'work'
wizardchat run --resume                continue the last conversation
wizardchat run -ncmoe 8 -c 16384       experts of 8 layers in RAM, 16K context
printf 'Hi\nWho are you?\n' | wizardchat run -m FILE.gguf    batch mode
"""


@app.command(cls=Command, epilog=RUN_EXAMPLES)
@_guarded
def run(
    resume: Annotated[
        bool,
        typer.Option("--resume", help="Continue the last conversation.", rich_help_panel=SESSIONS),
    ] = False,
    session_name: Annotated[
        str | None,
        typer.Option(
            "--session",
            metavar="NAME",
            help="Open the saved conversation NAME, or start one by that name.",
            rich_help_panel=SESSIONS,
        ),
    ] = None,
    plain: Annotated[
        bool,
        typer.Option(
            "--plain", help="Plain text replies, no markdown or colour.", rich_help_panel=OUTPUT
        ),
    ] = False,
    no_stats: Annotated[
        bool,
        typer.Option("--no-stats", help="No speed line after each reply.", rich_help_panel=OUTPUT),
    ] = False,
    jsonl: Annotated[
        bool,
        typer.Option(
            "--jsonl",
            help='Batch mode: stdin lines are {"prompt": ...} objects.',
            rich_help_panel=OUTPUT,
        ),
    ] = False,
    verbose_prompt: VerbosePromptOpt = False,
    yes: YesOpt = False,
    model: ModelOpt = None,
    system: SystemOpt = None,
    ctx_size: CtxOpt = None,
    n_gpu_layers: NglOpt = None,
    threads: ThreadsOpt = None,
    batch_size: BatchOpt = None,
    ubatch_size: UbatchOpt = None,
    flash_attn: FlashOpt = None,
    cache_type_k: CtkOpt = None,
    cache_type_v: CtvOpt = None,
    mlock: MlockOpt = None,
    mmap: MmapOpt = None,
    cpu_moe: CpuMoeOpt = None,
    n_cpu_moe: NCpuMoeOpt = None,
    override_tensor: OtOpt = None,
    temperature: TempOpt = None,
    top_p: TopPOpt = None,
    top_k: TopKOpt = None,
    min_p: MinPOpt = None,
    repeat_penalty: RepeatOpt = None,
    seed: SeedOpt = None,
    max_tokens: MaxTokOpt = None,
    rpc: RpcOpt = None,
    plan: PlanOpt = None,
    verbose: VerboseOpt = None,
) -> None:
    """Chat on a terminal, or answer piped lines (batch mode)."""
    flags = {
        k: v
        for k, v in locals().items()
        if k
        not in ("resume", "session_name", "plain", "no_stats", "jsonl", "verbose_prompt", "yes")
    }
    from wizardchat import paths
    from wizardchat.chat.store import SessionStore, check_name

    if session_name:
        check_name(session_name)
    interactive = sys.stdin is not None and sys.stdin.isatty() and not jsonl
    store = SessionStore(paths.sessions_dir())
    # Read the saved conversation before loading the model: a bad name or file fails fast, and
    # its model is the one to load unless -m says otherwise.
    saved = None
    # A session is open in one wizardchat at a time: claim it first (exit 7 if held elsewhere).
    if session_name:
        store.claim(session_name)
        saved = store.load(session_name) if store.exists(session_name) else None
    elif resume:
        last = store.last()
        saved = store.load(store.claim(last).name) if last else None
        if saved is None:
            _err("wizardchat: no saved conversation to resume; starting a new one")
    if model is None and saved is not None and saved.model_ref:
        flags["model"] = _session_model(saved)
    settings, model_ref = _settings_and_model_ref(flags, yes=yes, can_ask=interactive)
    with _engine(settings, verbose_prompt) as (engine, session):
        if interactive:
            repl = _repl(
                engine, session, store, plain=plain, show_stats=not no_stats, model_ref=model_ref
            )
            if saved is None and session_name:
                repl.name_session(session_name)
            repl.run(resume=saved)
            if repl.terminated_by:
                _quiet_broken_pipe()  # after a hangup the terminal is gone: no flush errors at exit
                raise typer.Exit(repl.terminated_by)
            return
        _run_batch(
            session, store, saved, session_name, jsonl=jsonl, resume=resume, model_ref=model_ref
        )


def _session_model(saved: SavedSession) -> str:
    """The model a saved session was held with, to load it again when no -m is given.

    Said on stderr (before minutes of loading); a file that is gone is an error naming it.
    """
    ref = saved.model_ref
    if Path(ref).is_absolute() and not os.path.lexists(ref):  # a hub reference never is
        raise NoModelError(
            f"session '{saved.name}' was held with the model {ref}, which is no longer there: "
            "pass -m PATH (or a model reference) to continue it with another model"
        )
    _err(f"resuming '{saved.name}' with its model {ref}")
    return ref


def _run_batch(
    session: ChatSession,
    store: SessionStore,
    saved: SavedSession | None,
    session_name: str | None,
    *,
    jsonl: bool,
    resume: bool,
    model_ref: str,
) -> None:
    """Batch mode: piped lines, saved after every reply when a session is named or resumed."""
    from wizardchat.chat import batch
    from wizardchat.chat.recording import Recording, continue_command, free_name
    from wizardchat.signals import Termination

    session.progress = _prompt_progress()  # a resumed history can take a while to evaluate
    recording = None
    model = session.engine.model_name
    if saved is not None:
        session.restore(saved.system, [(t.user, t.reply, t.interrupted) for t in saved.turns])
        recording = Recording(store, saved.name, model, saved.created, model_ref=model_ref)
        n = len(saved.turns)
        _err(f"continuing '{saved.name}': {n} turn{'' if n == 1 else 's'}")
    elif session_name or resume:
        name = session_name or free_name(store)
        recording = Recording(store, name, model, model_ref=model_ref)
    with Termination(session.cancel) as termination:
        job = batch.Batch(session, _err, recording=recording, termination=termination)
        runner = batch.run_jsonl if jsonl else batch.run_lines
        result = runner(job, _stdin_lines(), _reply_output())
    if recording is not None and job.recording is not None and store.exists(job.recording.name):
        name = job.recording.name
        _err(f"saved as '{name}' · {continue_command(store, name, model_ref)} continues it")
    if result.terminated:
        raise typer.Exit(result.terminated)
    if result.failed:
        raise typer.Exit(ExitCode.USAGE)


def _plain_output_wanted(plain: bool) -> bool:
    """--plain, NO_COLOR, TERM=dumb or output that is not a terminal all mean plain text."""
    return (
        plain
        or bool(os.environ.get("NO_COLOR"))
        or os.environ.get("TERM", "") in ("dumb", "unknown")
        or not sys.stdout.isatty()
    )


def _repl(
    engine: LlamaEngine,
    session: ChatSession,
    store: SessionStore,
    *,
    plain: bool,
    show_stats: bool,
    model_ref: str,
) -> Repl:
    from wizardchat import paths
    from wizardchat.tui import commands
    from wizardchat.tui.output import Output, PlainOutput, RichOutput
    from wizardchat.tui.reader import make_reader
    from wizardchat.tui.repl import Repl

    out: Output
    if _plain_output_wanted(plain):
        out = PlainOutput(sys.stdout, sys.stderr)
    else:
        from rich.console import Console

        out = RichOutput(Console(highlight=False), Console(stderr=True, highlight=False))
    reader = make_reader(
        paths.input_history_file(),
        command_names=commands.BY_NAME,
        argument_kinds={c.name: c.completes for c in commands.COMMANDS if c.completes},
        session_names=store.names,  # file names only: completion never parses a file
        setting_names=commands.PARAMS,
        warn=_err,
        debug=_state.debug,
    )
    session.notify = out.note
    session.progress = _prompt_progress()
    session.abort_prompt = True  # the REPL's Ctrl-C only cancels, so it may stop a prompt too
    return Repl(session, engine, store, reader, out, show_stats=show_stats, model_ref=model_ref)


PULL_EXAMPLES = """
wizardchat pull --list                  the quants, their sizes, which fit
wizardchat pull                         the best quant of WizardLM-2 8x22B
wizardchat pull wizardlm2-8x22b:Q4_K_M
wizardchat pull bartowski/WizardLM-2-8x22B-GGUF:IQ3_XS
"""


@app.command(cls=Command, epilog=PULL_EXAMPLES)
@_guarded
def pull(
    ref: Annotated[
        str | None,
        typer.Argument(
            metavar="REF",
            help="wizardlm2-8x22b[:QUANT], wizardlm2-7b[:QUANT] or OWNER/REPO[:QUANT] "
            "(default: the configured model, else wizardlm2-8x22b).",
        ),
    ] = None,
    list_quants: Annotated[
        bool,
        typer.Option(
            "--list", help="Show the quants, their sizes and which fit; download nothing."
        ),
    ] = False,
    workers: Annotated[
        int,
        typer.Option("--workers", min=1, max=16, metavar="N", help="Files downloaded at once."),
    ] = 4,
) -> None:
    """Download a model: all shards, resumable, verified."""
    from wizardchat.hub import download as hub
    from wizardchat.hub.catalog import parse_ref
    from wizardchat.hub.resolve import (
        default_ref,
        detect_machine,
        pull_choice,
        pull_quant,
        quant_table,
    )
    from wizardchat.tui.output import PlainOutput

    configured = load_settings({}).model
    parsed = parse_ref(ref or default_ref(configured), reference_only=True)
    if isinstance(parsed, Path):
        raise UsageError(f"{parsed} is a local path; pull takes a model reference")
    model = hub.list_remote(parsed)
    if not model.quants:
        raise NoModelError(f"{parsed.repo} has no GGUF files")
    machine = detect_machine()
    if list_quants:
        rows, _, budget = quant_table(model, parsed, machine)
        PlainOutput(sys.stdout, sys.stderr).rows(rows)
        _err(budget)
        return
    choice = pull_choice(parsed, model, machine, warn=_err)
    path = pull_quant(model, choice.quant, sys.stderr, workers=workers)
    sys.stdout.write(f"{path}\n")
    _err(f"chat with it: wizardchat run -m {choice.ref}")


@app.command(cls=Command, epilog="wizardchat models\n")
@_guarded
def models(
    show_paths: Annotated[
        bool, typer.Option("--paths", help="Add the path of each model's file (wide).")
    ] = False,
) -> None:
    """List downloaded models: reference, size, status."""
    from wizardchat.hub import cache as hubcache
    from wizardchat.hub.catalog import human_size
    from wizardchat.tui.output import PlainOutput

    found = hubcache.local_models()
    if not found:
        _err(f"no models in {hubcache.cache_dir()} yet (wizardchat pull downloads one)")
        return
    # Paths in the hub cache run to 150 columns: only when asked, so the table fits 100.
    rows: list[tuple[str, ...]] = [
        ("REFERENCE", "QUANT", "SIZE", "STATUS", *(["PATH"] * show_paths))
    ]
    for m in found:
        status = (
            "complete" if m.complete else f"incomplete {_percent(m.size_on_disk, m.total_size)}"
        )
        path = [str(m.path)] if show_paths else []
        rows.append((m.reference, m.quant, human_size(m.size_on_disk), status, *path))
    PlainOutput(sys.stdout, sys.stderr).rows(rows)


def _percent(part: int, whole: int) -> str:
    return f"{100 * part // whole}%" if whole else "?"


RM_EXAMPLES = """
wizardchat rm wizardlm2-8x22b:Q4_K_M    one quant (asks first)
wizardchat rm wizardlm2-7b --yes        every quant of it, without asking
"""


@app.command(cls=Command, epilog=RM_EXAMPLES)
@_guarded
def rm(
    ref: Annotated[str, typer.Argument(metavar="REF", help="REPO or REFERENCE[:QUANT] to delete.")],
    yes: Annotated[bool, typer.Option("--yes", "-y", help="Delete without asking.")] = False,
) -> None:
    """Delete a downloaded model and report the space freed."""
    from wizardchat.hub import cache as hubcache
    from wizardchat.hub.catalog import human_size, parse_ref
    from wizardchat.hub.resolve import confirm_on_terminal

    parsed = parse_ref(ref, reference_only=True)
    if isinstance(parsed, Path):
        raise UsageError(f"{parsed} is a path; rm takes a model reference (see wizardchat models)")
    targets = [m for m in hubcache.local_models(parsed.repo) if parsed.quant in (None, m.quant)]
    if not targets:
        raise NoModelError(f"{parsed} is not downloaded (wizardchat models lists what is)")
    size = sum(m.size_on_disk for m in targets)
    names = ", ".join(f"{m.repo}:{m.quant}" for m in targets)
    if not yes:
        if not (sys.stdin is not None and sys.stdin.isatty()):
            raise UsageError(f"rm {ref}: pass --yes to delete {names} without a terminal to ask")
        if not confirm_on_terminal(f"delete {names} ({human_size(size)})? [y/N] "):
            raise Declined("nothing deleted")
    removed = [hubcache.remove(m) for m in targets]
    freed = sum(r.freed for r in removed)
    for path in sorted({p for r in removed for p in r.kept}):
        _err(f"kept {path}: a link in the cache pointed there, outside the repository's folder")
    _err(f"deleted {names}: {human_size(freed)} freed ({freed} bytes)")


DOCTOR_EXAMPLES = """
wizardchat doctor                       this machine, the plan for WizardLM-2
wizardchat doctor -m FILE.gguf --json   the plan for a file, as JSON
"""


@app.command(cls=Command, epilog=DOCTOR_EXAMPLES)
@_guarded
def doctor(
    model: Annotated[
        str | None,
        typer.Option(
            "--model",
            "-m",
            metavar="REF",
            help="The model to plan for (default: the configured one, else wizardlm2-8x22b).",
        ),
    ] = None,
    json_output: Annotated[bool, typer.Option("--json", help="One JSON object.")] = False,
    rpc: RpcOpt = None,
) -> None:
    """Show this install, this machine and the offload plan."""
    from wizardchat.diagnose import doctor as doctor_module

    settings = load_settings({"model": model, "rpc": rpc}, labels=FLAG_LABELS)
    from wizardchat.hub.catalog import parse_ref

    if settings.model and isinstance(local := parse_ref(settings.model), Path):
        if model and not local.exists():  # a typo in -m; a configured one is reported instead
            raise NoModelError(f"model file not found: {local}")
        _check_model_file(local)  # reading a FIFO's header would wait forever
    if settings.rpc:
        from wizardchat.engine.rpc import add_servers

        add_servers(settings.rpc)
    report = doctor_module.collect(settings.model, _model_source(model, settings.model))
    if json_output:
        sys.stdout.write(json.dumps(report, indent=1) + "\n")
    else:
        from wizardchat.safe_text import is_terminal, terminal_safe

        text = doctor_module.render(report)  # paths, GGUF metadata, RPC workers' descriptions
        sys.stdout.write((terminal_safe(text) if is_terminal(sys.stdout) else text) + "\n")


def _model_source(flag: str | None, configured: str | None) -> str:
    """Where a model not given with -m came from, for a report that it is missing."""
    if flag or not configured:
        return ""
    if "WIZARDCHAT_MODEL" in os.environ:
        return "WIZARDCHAT_MODEL"
    from wizardchat import paths

    return str(paths.config_file())


BENCH_EXAMPLES = """
wizardchat bench -m FILE.gguf
wizardchat bench -m FILE.gguf --n-cpu-moe 8 --reps 5 --compare
"""


@app.command(cls=Command, epilog=BENCH_EXAMPLES)
@_guarded
def bench(
    json_output: Annotated[bool, typer.Option("--json", help="One JSON object.")] = False,
    compare: Annotated[
        bool, typer.Option("--compare", help="Also run llama-bench (if on PATH) and compare.")
    ] = False,
    reps: Annotated[
        int,
        typer.Option("--reps", min=1, max=50, metavar="N", help="Timed runs of each test."),
    ] = 3,
    yes: YesOpt = False,
    model: ModelOpt = None,
    ctx_size: CtxOpt = None,
    n_gpu_layers: NglOpt = None,
    threads: ThreadsOpt = None,
    batch_size: BatchOpt = None,
    ubatch_size: UbatchOpt = None,
    flash_attn: FlashOpt = None,
    cache_type_k: CtkOpt = None,
    cache_type_v: CtvOpt = None,
    mlock: MlockOpt = None,
    mmap: MmapOpt = None,
    cpu_moe: CpuMoeOpt = None,
    n_cpu_moe: NCpuMoeOpt = None,
    override_tensor: OtOpt = None,
    rpc: RpcOpt = None,
    plan: PlanOpt = None,
    verbose: VerboseOpt = None,
) -> None:
    """Measure prompt and generation speed with the current plan."""
    flags = {
        k: v for k, v in locals().items() if k not in ("json_output", "compare", "reps", "yes")
    }
    from wizardchat.diagnose import bench as bench_module

    settings = _settings(flags, yes=yes, can_ask=sys.stdin is not None and sys.stdin.isatty())
    from wizardchat.engine.offload import remember_ram_bandwidth
    from wizardchat.plan.machine import measure_ram_bandwidth

    remember_ram_bandwidth(measure_ram_bandwidth())  # for the plan's decode bound
    # Text: the heading names the model, quant and plan first, so stderr does not repeat it.
    with _engine(settings, verbose_prompt=False, plan_line=json_output) as (engine, _):
        if not json_output:
            from wizardchat.safe_text import is_terminal, terminal_safe

            heading = "\n".join(bench_module.heading(engine))  # a file name: any bytes
            safe = terminal_safe(heading) if is_terminal(sys.stdout) else heading
            sys.stdout.write(safe + "\n")
            sys.stdout.flush()
        bound = engine.fit.decode_bound if engine.fit else None
        result = bench_module.run_bench(engine, reps=reps, bound_tps=bound, progress=_err)
        against: dict[str, float] | None = None
        if compare:
            binary = bench_module.find_llama_bench()
            if binary is None:
                _err("--compare: no llama-bench on PATH; showing wizardchat's figures only")
            else:
                assert settings.model_path is not None
                against = bench_module.run_llama_bench(
                    binary,
                    settings.model_path,
                    engine.load_plan,
                    reps=reps,
                    depth=result.depth,
                    progress=_err,
                )
    if json_output:
        data = result.to_json()
        if against is not None:
            data["llama_bench"] = against
        sys.stdout.write(json.dumps(data, indent=1) + "\n")
    else:
        from wizardchat.tui.output import PlainOutput

        PlainOutput(sys.stdout, sys.stderr).rows(bench_module.format_table(result, against))


RPC_WORKER_EXAMPLES = """
wizardchat rpc-worker                   serve on 127.0.0.1:50052
wizardchat rpc-worker --host 10.0.0.5 --allow-remote    trusted network only
"""


@app.command("rpc-worker", cls=Command, epilog=RPC_WORKER_EXAMPLES)
@_guarded
def rpc_worker(
    host: Annotated[
        str, typer.Option("--host", metavar="HOST", help="Address to listen on.")
    ] = "127.0.0.1",
    port: Annotated[
        int, typer.Option("--port", min=1, max=65535, metavar="PORT", help="TCP port.")
    ] = 50052,
    device: Annotated[
        list[str] | None,
        typer.Option(
            "--device",
            metavar="NAME",
            help="Backend device to serve (repeatable; default: the best).",
        ),
    ] = None,
    cache_dir: Annotated[
        Path | None,
        typer.Option(
            "--cache-dir",
            metavar="DIR",
            help="Keep received tensors here to reload them faster.",
        ),
    ] = None,
    threads: Annotated[
        int,
        typer.Option("--threads", "-t", min=0, max=MAX_THREADS, metavar="N", help="CPU threads."),
    ] = 0,
    allow_remote: Annotated[
        bool,
        typer.Option(
            "--allow-remote",
            help="Allow a non-loopback --host. The RPC protocol has no authentication.",
        ),
    ] = False,
) -> None:
    """Serve this machine's devices to --rpc (llama.cpp RPC)."""
    from wizardchat.engine.rpc import serve

    serve(
        host,
        port,
        devices=device or (),
        cache_dir=cache_dir,
        threads=threads,
        allow_remote=allow_remote,
        announce=_err,
    )


SESSIONS_EXAMPLES = """
wizardchat sessions                     name, turns, last used
wizardchat sessions rm work old-notes   delete two
"""

sessions_app = typer.Typer(
    help="List saved conversations; sessions rm NAME deletes one.",
    epilog=SESSIONS_EXAMPLES,
    cls=Group,
    no_args_is_help=False,
    rich_markup_mode=None,
    context_settings={"help_option_names": ["-h", "--help"]},
)
app.add_typer(sessions_app, name="sessions")


@sessions_app.callback(invoke_without_command=True)
@_guarded
def sessions(ctx: typer.Context) -> None:
    """List saved conversations: name, turns, last used."""
    if ctx.invoked_subcommand is not None:
        return
    from wizardchat import paths
    from wizardchat.chat.store import SessionStore
    from wizardchat.tui.commands import show_sessions
    from wizardchat.tui.output import PlainOutput

    found = SessionStore(paths.sessions_dir()).list()
    if not show_sessions(PlainOutput(sys.stdout, sys.stderr), found):
        _err("no saved conversations yet (wizardchat run saves each one)")


@sessions_app.command("rm", cls=Command, epilog="wizardchat sessions rm work\n")
@_guarded
def sessions_rm(
    names: Annotated[
        list[str], typer.Argument(metavar="NAME", help="Names of the sessions to delete.")
    ],
) -> None:
    """Delete saved conversations (exit 7 if any of them could not be deleted)."""
    from wizardchat import paths
    from wizardchat.chat.store import SessionStore

    store = SessionStore(paths.sessions_dir())
    failed = False
    for name in names:  # one missing name must not keep the others
        try:
            store.remove(name)
        except SessionError as e:
            if _state.debug:
                raise
            _err(f"wizardchat: error: {e}")
            failed = True
            continue
        _err(f"removed '{name}'")
    if failed:
        raise typer.Exit(ExitCode.SESSION)


class _ReplyOutput:
    """stdout for replies: a failed write (disk full, I/O error) is an OutputError, exit 9.

    A cut pipe stays a BrokenPipeError: the reader went away, which is not a failure.
    """

    def __init__(self, stream: IO[str]) -> None:
        self.stream = stream

    def write(self, text: str) -> int:
        try:
            return self.stream.write(text)
        except OSError as e:
            raise self._failed(e) from None

    def flush(self) -> None:
        try:
            self.stream.flush()
        except OSError as e:
            raise self._failed(e) from None

    def isatty(self) -> bool:
        return self.stream.isatty()

    @staticmethod
    def _failed(error: OSError) -> OSError | OutputError:
        if isinstance(error, BrokenPipeError):
            return error
        _quiet_broken_pipe()  # the unwritten rest must not fail again at exit
        return OutputError(f"cannot write output: {error.strerror or error}")


def _reply_output() -> typing.TextIO:
    return typing.cast(typing.TextIO, _ReplyOutput(sys.stdout))


def _stdout_failed() -> bool:
    """Whether stdout is what failed: closed from the start, or still unable to flush."""
    if getattr(sys.stdout, "closed_at_start", False):
        return True
    try:
        sys.stdout.flush()
    except (OSError, ValueError):
        return True
    return False


def _quiet_broken_pipe() -> None:
    """The reader went away (`| head`): point stdout at /dev/null so exit does not complain."""
    try:
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())
    except (OSError, ValueError):
        pass


def _invoke() -> int:
    """Run the app: a usage error is one line and exit 2, `wizardchat` alone shows the help."""
    from wizardchat.cli.usage import ClickUsageError, NoArgsIsHelpError, error_line

    try:
        code = app(prog_name="wizardchat", standalone_mode=False)
    except NoArgsIsHelpError as e:
        assert e.ctx is not None
        sys.stdout.write(e.ctx.get_help() + "\n")
        return ExitCode.OK
    except ClickUsageError as e:
        _err(f"wizardchat: error: {error_line(e)}")
        return ExitCode.USAGE
    return code if isinstance(code, int) else ExitCode.OK


def main() -> None:
    """Run the typer app (wizardchat.entry decides whether it is needed)."""
    from wizardchat.entry import output_failed

    try:
        raise SystemExit(_invoke())
    except OSError as e:  # --version or --help into a closed or full stdout
        output_failed(e)
    except SystemExit:
        # What is still buffered (a table, a path, help) is written now, not in the
        # interpreter's own flush at exit, which could only print "Exception ignored".
        try:
            sys.stdout.flush()
        except BrokenPipeError:
            _quiet_broken_pipe()
        except OSError as e:
            output_failed(e)
        raise


if __name__ == "__main__":
    main()
