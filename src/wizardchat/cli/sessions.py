"""The saved-conversation commands: `sessions` (list) and `sessions rm NAME...` (delete)."""

from __future__ import annotations

from typing import Annotated

import typer

from wizardchat.cli.environment import Environment
from wizardchat.cli.usage import STATE
from wizardchat.errors import ExitCode, SessionError

SESSIONS_EXAMPLES = """
wizardchat sessions                     name, turns, last used, KV state
wizardchat sessions rm work old-notes   delete two
"""


def sessions(env: Environment, ctx: typer.Context) -> None:
    """List saved conversations: name, turns, last used, saved KV state."""
    if ctx.invoked_subcommand is not None:
        return
    from wizardchat import paths
    from wizardchat.chat.kv_store import KvStore
    from wizardchat.chat.store import SessionStore
    from wizardchat.tui.commands import show_sessions
    from wizardchat.tui.output import PlainOutput

    found = SessionStore(paths.sessions_dir()).list()
    kv_sizes = KvStore(paths.kv_cache_dir(), 0).sizes()
    if not show_sessions(PlainOutput(env.stdout, env.stderr), found, kv_sizes):
        env.say("no saved conversations yet (wizardchat run saves each one)")


RM_EXAMPLES = "wizardchat sessions rm work\n"


def sessions_rm(
    env: Environment,
    names: Annotated[
        list[str], typer.Argument(metavar="NAME", help="Names of the sessions to delete.")
    ],
) -> None:
    """Delete saved conversations (exit 7 if any of them could not be deleted)."""
    from wizardchat import paths
    from wizardchat.chat.kv_store import KvStore
    from wizardchat.chat.store import SessionStore

    store = SessionStore(paths.sessions_dir())
    kv = KvStore(paths.kv_cache_dir(), 0)
    failed = False
    for name in names:  # one missing name must not keep the others
        try:
            store.remove(name)
        except SessionError as e:
            if STATE.debug:
                raise
            env.say(f"wizardchat: error: {e}")
            failed = True
            continue
        kv.remove(name)  # its saved KV state: a cache of it, worth nothing without it
        env.say(f"removed '{name}'")
    if failed:
        raise typer.Exit(ExitCode.SESSION)
