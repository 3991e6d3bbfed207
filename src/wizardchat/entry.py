"""Console entry point: answers `wizardchat --help` without importing typer.

Importing typer costs several times Python's own start-up, and `--help` is what a new user runs
first. The text below is typer's own rendering of the top-level help; a test fails if the two
ever differ, so edit the commands in cli.py and paste the new output here.
"""

from __future__ import annotations

import sys

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
  models      List downloaded models: reference, size, status, path.
  rm          Delete a downloaded model and report the space freed.
  doctor      Show this install, this machine and the offload plan.
  bench       Measure prompt and generation speed with the current plan.
  rpc-worker  Serve this machine's devices to --rpc (llama.cpp RPC).
  sessions    List saved conversations; sessions rm NAME deletes one.
"""


def main() -> None:
    """The `wizardchat` command."""
    if sys.argv[1:] in (["--help"], ["-h"]):
        sys.stdout.write(TOP_LEVEL_HELP)
        return
    try:
        from wizardchat.cli import main as cli_main

        cli_main()
    except (KeyboardInterrupt, RuntimeError) as e:
        # Ctrl-C before cli's error boundary exists (while importing); Python wraps one that
        # lands in a class body's __set_name__ in a RuntimeError.
        if not isinstance(e, KeyboardInterrupt) and not isinstance(e.__cause__, KeyboardInterrupt):
            raise
        sys.stderr.write("\nwizardchat: interrupted\n")
        sys.exit(130)  # errors.ExitCode.INTERRUPTED, not imported here: --help stays light
