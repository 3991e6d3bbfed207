"""The `wizardchat` command: the typer app, its commands, and the one error boundary.

The commands live by job in chat.py, models.py, machine.py and sessions.py; this module
registers them, gives each the run's Environment, and turns every failure into one stderr line
and a documented exit code. Heavy modules (llama_cpp, numpy, huggingface_hub, prompt_toolkit,
rich) are imported inside the commands that need them, so `--help` starts fast.
"""

from __future__ import annotations

import contextlib
import functools
import inspect
import signal
import sys
from collections.abc import Callable, Sequence
from typing import Annotated, Any

import typer

from wizardchat import __version__
from wizardchat.cli import chat, machine, models, serve, sessions
from wizardchat.cli.environment import Environment
from wizardchat.cli.output import output_failed, quiet_broken_pipe, stdout_failed
from wizardchat.cli.usage import STATE, Command, Group
from wizardchat.errors import Declined, ExitCode, WizardchatError
from wizardchat.signals import Terminated

TOP_LEVEL_EXAMPLES = """
wizardchat run                   chat with WizardLM-2 8x22B (asks to download it)
wizardchat run -m FILE.gguf      chat with a model file you already have
wizardchat ask "Why?"            one reply, to stdout
wizardchat COMMAND -h            the options of one command
"""


def _environment() -> Environment:
    """The Environment main() handed to the app; one from sys when the app is called directly."""
    from typer._click.globals import get_current_context

    found = get_current_context().find_root().obj
    return found if isinstance(found, Environment) else Environment.from_sys()


def _guarded(command: Callable[..., None]) -> Callable[..., None]:
    """The one error boundary: every failure becomes one stderr line and a documented exit code.

    The command gets the run's Environment as its first argument (typer does not see it).
    typer.Exit subclasses RuntimeError, so it is re-raised before the catch-all.
    """

    @functools.wraps(command)
    def wrapper(*args: Any, **kwargs: Any) -> None:
        env = _environment()
        try:
            command(env, *args, **kwargs)
        except typer.Exit:
            raise
        except Declined as e:  # the user said no: say what next, exit 0
            env.say(f"wizardchat: {e}")
            raise typer.Exit(e.exit_code) from None
        except WizardchatError as e:
            if STATE.debug:
                raise
            env.say(f"wizardchat: error: {e}")
            for hint in e.hints:
                env.say(f"wizardchat: hint: {hint}")
            raise typer.Exit(e.exit_code) from None
        except Terminated as e:  # SIGTERM/SIGHUP between replies: nothing was left unsaved
            raise typer.Exit(128 + e.signum) from None
        except KeyboardInterrupt:
            if STATE.debug:
                raise
            env.say("\nwizardchat: interrupted")
            raise typer.Exit(ExitCode.INTERRUPTED) from None
        except BrokenPipeError:
            quiet_broken_pipe(env.stdout)
            raise typer.Exit(ExitCode.OK) from None
        except Exception as e:
            if STATE.debug:
                raise
            if isinstance(e, OSError) and stdout_failed(env.stdout):
                quiet_broken_pipe(env.stdout)  # the buffered rest must not fail again at exit
                env.say(f"wizardchat: error: cannot write output: {e.strerror or e}")
                raise typer.Exit(ExitCode.OUTPUT) from None
            env.say(
                f"wizardchat: unexpected error: {type(e).__name__}: {e} (--debug shows details)"
            )
            raise typer.Exit(ExitCode.ERROR) from None

    shown = inspect.signature(command, eval_str=True)
    wrapper.__signature__ = shown.replace(  # type: ignore[attr-defined]
        parameters=[p for p in shown.parameters.values() if p.name != "env"]
    )
    return wrapper


def _version(value: bool) -> None:
    if value:
        typer.echo(f"wizardchat {__version__}")
        raise typer.Exit()


def _root(
    debug: Annotated[
        bool, typer.Option("--debug", help="Show tracebacks instead of one-line errors.")
    ] = False,
    version: Annotated[
        bool,
        typer.Option("--version", callback=_version, is_eager=True, help="Print the version."),
    ] = False,
) -> None:
    STATE.debug = debug


# Every command and its examples, in the order the top-level help lists them.
COMMANDS: dict[str, tuple[Callable[..., None], str]] = {
    "ask": (chat.ask, chat.ASK_EXAMPLES),
    "run": (chat.run, chat.RUN_EXAMPLES),
    "pull": (models.pull, models.PULL_EXAMPLES),
    "models": (models.models, models.MODELS_EXAMPLES),
    "rm": (models.rm, models.RM_EXAMPLES),
    "doctor": (machine.doctor, machine.DOCTOR_EXAMPLES),
    "bench": (machine.bench, machine.BENCH_EXAMPLES),
    "rpc-worker": (machine.rpc_worker, machine.RPC_WORKER_EXAMPLES),
    "serve": (serve.serve, serve.SERVE_EXAMPLES),
    "ps": (serve.ps, serve.PS_EXAMPLES),
    "stop": (serve.stop, serve.STOP_EXAMPLES),
}
GROUPS = ("sessions",)


def build_app(only: str | None = None) -> typer.Typer:
    """The typer app with every command, or with the command `only` alone: typer builds each
    command it has on every run (~3 ms each), and a run needs just its own."""
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
    app.callback()(_root)
    for name, (function, epilog) in COMMANDS.items():
        if only in (None, name):
            app.command(name, cls=Command, epilog=epilog)(_guarded(function))
    if only in (None, "sessions"):
        sessions_app = typer.Typer(
            help="List saved conversations; sessions rm NAME deletes one.",
            epilog=sessions.SESSIONS_EXAMPLES,
            cls=Group,
            no_args_is_help=False,
            rich_markup_mode=None,
            context_settings={"help_option_names": ["-h", "--help"]},
        )
        app.add_typer(sessions_app, name="sessions")
        sessions_app.callback(invoke_without_command=True)(_guarded(sessions.sessions))
        sessions_app.command("rm", cls=Command, epilog=sessions.RM_EXAMPLES)(
            _guarded(sessions.sessions_rm)
        )
    return app


def __getattr__(name: str) -> typer.Typer:
    """`app`: the typer app with every command, built when first asked for (tests, tools);
    a run builds its own (_invoke) and skips this one's 1.5 ms."""
    if name != "app":
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    globals()["app"] = whole = build_app()
    return whole


def command_named(argv: Sequence[str]) -> str | None:
    """The command `argv` runs when nothing but --debug comes before it, else None (no command,
    --version, a misplaced option, a typo: the whole app answers those)."""
    for arg in argv:
        if arg != "--debug":
            return arg if arg in COMMANDS or arg in GROUPS else None
    return None


def _invoke(argv: Sequence[str], env: Environment) -> int:
    """Run the app: a usage error is one line and exit 2, `wizardchat` alone shows the help."""
    from wizardchat.cli.usage import ClickUsageError, NoArgsIsHelpError, error_line

    STATE.debug = False  # each run starts without --debug (tests run several in one process)
    try:
        code = build_app(command_named(argv))(
            args=list(argv),
            prog_name="wizardchat",
            standalone_mode=False,
            obj=env,
        )
    except NoArgsIsHelpError as e:
        assert e.ctx is not None
        env.stdout.write(e.ctx.get_help() + "\n")
        return ExitCode.OK
    except ClickUsageError as e:
        env.say(f"wizardchat: error: {error_line(e, argv)}")
        return ExitCode.USAGE
    return code if isinstance(code, int) else ExitCode.OK


def main(argv: Sequence[str] | None = None) -> None:
    """Run the typer app on `argv` (default: sys.argv) with this process's Environment."""
    env = Environment.from_sys()
    try:
        raise SystemExit(_invoke(sys.argv[1:] if argv is None else argv, env))
    except OSError as e:  # --version or --help into a closed or full stdout
        output_failed(e)
    except SystemExit:
        # What is still buffered (a table, a path, help) is written now, not in the
        # interpreter's own flush at exit, which could only print "Exception ignored".
        try:
            env.stdout.flush()
        except BrokenPipeError:
            quiet_broken_pipe(env.stdout)
        except OSError as e:
            output_failed(e)
        # The command is over and its exit status decided. Python's finalization puts SIGINT
        # back to the default action, so a Ctrl-C in the last milliseconds would kill the
        # process by signal (-2) instead of letting it exit with that status; ignored now, it
        # cannot (finalization leaves an ignored signal ignored).
        with contextlib.suppress(ValueError):  # not the main thread (an embedding caller)
            signal.signal(signal.SIGINT, signal.SIG_IGN)
        raise


if __name__ == "__main__":
    main()
