"""Console entry point: answers `wizardchat --help` without importing typer, and ends the
process without the interpreter's teardown once a command is over (end_process).

Importing typer costs several times Python's own start-up, and `--help` is what a new user runs
first. The text below is typer's own rendering of the top-level help; a test fails if the two
ever differ, so edit the commands in cli/ and paste the new output here.
"""

from __future__ import annotations

import errno
import io
import os
import sys
from collections.abc import Sequence

TOP_LEVEL_HELP = """\
Usage: wizardchat [OPTIONS] COMMAND [ARGS]...

  Chat with WizardLM-2 8x22B in your terminal, on llama.cpp.

Options:
  --debug     Show tracebacks instead of one-line errors.
  --version   Print the version.
  -h, --help  Show this message and exit.

Commands:
  ask         Answer one prompt: the reply to stdout, the rest to stderr.
  run         Chat on a terminal, or answer piped lines (batch mode).
  pull        Download a model: all shards, resumable, verified.
  models      List downloaded models: reference, size, status.
  rm          Delete a downloaded model and report the space freed.
  doctor      Show this install, this machine and the offload plan.
  bench       Measure prompt and generation speed with the current plan.
  rpc-worker  Serve this machine's devices to --rpc (llama.cpp RPC).
  serve       Keep the model loaded: ask, run and batch mode use it.
  ps          List the running servers (wizardchat serve).
  stop        Stop a running server (wizardchat serve).
  sessions    List saved conversations; sessions rm NAME deletes one.

Examples:
  wizardchat run                   chat with WizardLM-2 8x22B (asks to download it)
  wizardchat run -m FILE.gguf      chat with a model file you already have
  wizardchat ask "Why?"            one reply, to stdout
  wizardchat COMMAND -h            the options of one command
"""


class ClosedOutput(io.TextIOBase):
    """Stands for a stdout that was closed when wizardchat started: every write fails.

    cli/ checks `closed_at_start` before loading a model and turns the failure into one line
    and exit code 9, instead of the AttributeError of writing to None.
    """

    closed_at_start = True

    def write(self, text: str) -> int:
        """Fail as writing to a closed file descriptor does."""
        raise OSError(errno.EBADF, "stdout is closed")

    def isatty(self) -> bool:
        """Not a terminal."""
        return False


def _fd_is_open(fd: int) -> bool:
    try:
        os.fstat(fd)
    except OSError:
        return False
    return True


def guard_standard_streams() -> None:
    """Make closed stdin, stdout or stderr (`>&-`, `2>&-`) safe before anything runs.

    Each closed descriptor gets /dev/null, so no file opened later (the model, a log) takes its
    number and receives what was meant for the terminal. A closed stderr then just loses the
    messages and the reply still goes out; a closed stdout fails on the first write (see
    ClosedOutput).
    """
    closed = [fd for fd in (0, 1, 2) if not _fd_is_open(fd)]
    for fd in closed:
        null = os.open(os.devnull, os.O_RDWR)
        if null != fd:
            os.dup2(null, fd)
            os.close(null)
    if 1 in closed or sys.stdout is None:
        sys.stdout = ClosedOutput()
    if 2 in closed or sys.stderr is None:
        sys.stderr = open(2, "w", encoding="utf-8", errors="backslashreplace", closefd=False)  # noqa: SIM115


def end_process(code: object) -> None:
    """Exit with `code` now without the interpreter's teardown, unless something is left to
    wait for (a thread still running, a stream that cannot be flushed): then return."""
    # The teardown frees every module's objects one by one (llama_cpp, numpy, typer...): 0.1 to
    # 0.2 s after the reply is out, for memory the kernel frees at once. The rest of a normal
    # exit is done here too: the streams flushed, the atexit handlers run (session claims,
    # logging, temporary directories).
    import atexit
    import threading

    if code is not None and not isinstance(code, int):
        return  # a message: Python prints it
    main_thread = threading.main_thread()
    if any(t is not main_thread and not t.daemon for t in threading.enumerate()):
        return  # Python waits for it
    try:
        for stream in (sys.stdout, sys.stderr):
            if stream is not None:
                stream.flush()
    except (OSError, ValueError):
        return  # the normal exit says what failed
    atexit._run_exitfuncs()
    for stream in (sys.stdout, sys.stderr):  # what the handlers wrote
        try:
            if stream is not None:
                stream.flush()
        except (OSError, ValueError):
            pass
    os._exit(code or 0)


def main(argv: Sequence[str] | None = None) -> None:
    """The `wizardchat` command, on `argv` (default: sys.argv's arguments)."""
    guard_standard_streams()
    args = sys.argv[1:] if argv is None else list(argv)
    if args in ([], ["--help"], ["-h"]):
        try:
            sys.stdout.write(TOP_LEVEL_HELP)
            sys.stdout.flush()
        except OSError as e:
            from wizardchat.cli.output import output_failed  # only when stdout has failed

            output_failed(e)
        return
    try:
        from wizardchat.cli.app import main as cli_main

        cli_main(args)
    except SystemExit as e:
        if argv is None:  # this process is wizardchat's own: the command line's run is over
            end_process(e.code)
        raise
    except (KeyboardInterrupt, RuntimeError) as e:
        # Ctrl-C before cli's error boundary exists (while importing); Python wraps one that
        # lands in a class body's __set_name__ in a RuntimeError.
        if not isinstance(e, KeyboardInterrupt) and not isinstance(e.__cause__, KeyboardInterrupt):
            raise
        sys.stderr.write("\nwizardchat: interrupted\n")
        sys.exit(130)  # errors.ExitCode.INTERRUPTED, not imported here: --help stays light
