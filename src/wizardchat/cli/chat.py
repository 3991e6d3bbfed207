"""The chat commands: `ask` (one reply to stdout), `run` (the REPL on a terminal, batch mode on
piped lines); their saved sessions are claimed, resumed and recorded here."""

from __future__ import annotations

import contextlib
import json
import os
from pathlib import Path
from typing import TYPE_CHECKING, Annotated

import typer

from wizardchat.cli import wiring
from wizardchat.cli.environment import Environment
from wizardchat.cli.options import (
    CHAT_OPTIONS,
    ApiKeyOpt,
    Flags,
    NoServerOpt,
    ServerOpt,
    VerbosePromptOpt,
    YesOpt,
    output_option,
    settings_options,
)
from wizardchat.cli.output import plain_output_wanted, quiet_broken_pipe, reply_output
from wizardchat.cli.usage import SESSIONS
from wizardchat.errors import ExitCode, NoModelError, UsageError

if TYPE_CHECKING:
    from wizardchat.chat.kv_cache import KvCache
    from wizardchat.chat.recording import Recording
    from wizardchat.chat.reply import Reply
    from wizardchat.chat.session import ChatSession
    from wizardchat.chat.store import SavedSession, SessionStore

ASK_EXAMPLES = """
wizardchat ask "Why is the sky blue?" -m FILE.gguf
git diff | wizardchat ask "Write a commit message for this." --temp 0.2
wizardchat ask "Name three primes." --json -n 64 | jq -r .reply
wizardchat ask --session work "And the next step?"
"""


@settings_options(*CHAT_OPTIONS)
def ask(
    env: Environment,
    flags: Flags,
    prompt: Annotated[
        str | None,
        typer.Argument(metavar="PROMPT", help="The question; piped stdin comes first."),
    ] = None,
    json_output: Annotated[
        bool, output_option("--json", "Print one JSON object with the reply and its stats.")
    ] = False,
    plain: Annotated[
        bool, output_option("--plain", "The reply's raw text on a terminal too, no markdown.")
    ] = False,
    session_name: Annotated[
        str | None,
        typer.Option(
            "--session",
            metavar="NAME",
            help="Continue the saved conversation NAME (or start it) and save this turn in it.",
            rich_help_panel=SESSIONS,
        ),
    ] = None,
    verbose_prompt: VerbosePromptOpt = False,
    no_server: NoServerOpt = False,
    server: ServerOpt = None,
    api_key: ApiKeyOpt = None,
    yes: YesOpt = False,
) -> None:
    """Answer one prompt: the reply to stdout, the rest to stderr."""
    from wizardchat.inputs import repair_text

    if session_name:
        from wizardchat.chat.store import check_name

        check_name(session_name)

    piped = "" if env.stdin is None or env.stdin_is_terminal else wiring.read_stdin_text(env)
    parts = [p for p in (piped.strip(), repair_text(prompt or "").strip()) if p]
    if not parts:
        raise UsageError('nothing to ask: give a prompt (wizardchat ask "...") or pipe text in')
    text = "\n\n".join(parts)
    with contextlib.ExitStack() as stack:
        store = _open_store(stack) if session_name else None
        saved = _claim_saved(env, store, session_name, resume=False) if store else None
        endpoint = wiring.wants_endpoint(env, flags)  # then the session's model is not loaded
        if flags["model"] is None and saved is not None and saved.model_ref and not endpoint:
            flags = {**flags, "model": _session_model(env, saved)}
        settings, model_ref = wiring.settings_and_model_ref(
            env, flags, yes=yes, can_ask=env.interactive
        )
        choice = wiring.ServerChoice(use=not no_server, target=server, api_key=api_key)
        with wiring.chat_engine(env, settings, verbose_prompt, choice) as (engine, session):
            from wizardchat.inputs import check_fits

            session.progress = wiring.prompt_progress(env)
            recording = None
            if store is not None and session_name:
                from wizardchat.chat.recording import Recording

                kv = wiring.kv_cache(env, engine, settings)
                if saved is not None:
                    recording = _continue_saved(env, session, store, saved, model_ref, kv)
                else:
                    model = engine.model_name
                    recording = Recording(store, session_name, model, model_ref=model_ref, kv=kv)
            check_fits(text, engine.n_ctx, "input too long for the context")
            reply = session.send(text)
            try:
                _answer(env, reply, engine.model_name, json_output=json_output, plain=plain)
            finally:
                reply.close()  # the turn is recorded however the reply ended
                if recording is not None:
                    recording.save(session.conversation, leaving=True)
            if reply.result.end_mark():
                env.say(reply.result.end_mark())  # never a silent cut or a silent empty reply


def _answer(env: Environment, reply: Reply, model: str, *, json_output: bool, plain: bool) -> None:
    """`ask`'s reply on stdout: one JSON object, the raw text, or markdown on a terminal."""
    out = reply_output(env)
    if json_output:
        from wizardchat.chat.batch import answer_record
        from wizardchat.safe_text import json_safe

        reply.text()
        record = answer_record(reply.result, model)
        out.write(json_safe(json.dumps(record, ensure_ascii=False)) + "\n")
    elif plain_output_wanted(env, plain):  # a pipe or file gets the reply byte for byte
        from wizardchat.safe_text import stream_plain

        stream_plain(reply, out)
        out.write("\n")
    else:  # a terminal: as the REPL shows it (markdown, word wrap, no leading blank lines)
        from rich.console import Console

        from wizardchat.tui.markdown_stream import stream_markdown

        stream_markdown(reply, Console(highlight=False))
    out.flush()


RUN_EXAMPLES = r"""
wizardchat run                         WizardLM-2 8x22B (asks to download)
wizardchat run -m FILE.gguf            a model file you already have
wizardchat run --session work          open or start the conversation 'work'
wizardchat run --resume                continue the last conversation
wizardchat run -ncmoe 8 -c 16384       experts of 8 layers in RAM, 16K context
printf 'Hi\nWho are you?\n' | wizardchat run -m FILE.gguf    batch mode
"""


@settings_options(*CHAT_OPTIONS)
def run(
    env: Environment,
    flags: Flags,
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
        bool, output_option("--plain", "Plain text replies, no markdown or colour.")
    ] = False,
    no_stats: Annotated[
        bool, output_option("--no-stats", "No speed line after each reply.")
    ] = False,
    jsonl: Annotated[
        bool, output_option("--jsonl", 'Batch mode: stdin lines are {"prompt": ...} objects.')
    ] = False,
    verbose_prompt: VerbosePromptOpt = False,
    no_server: NoServerOpt = False,
    server: ServerOpt = None,
    api_key: ApiKeyOpt = None,
    yes: YesOpt = False,
) -> None:
    """Chat on a terminal, or answer piped lines (batch mode)."""
    if session_name:
        from wizardchat.chat.store import check_name

        check_name(session_name)
    interactive = env.stdin is not None and env.stdin_is_terminal and not jsonl
    with contextlib.ExitStack() as stack:
        # Batch mode without a session saves nothing: no sessions directory, no claim.
        keeps = interactive or session_name or resume
        store = _open_store(stack) if keeps else None
        # Read the saved conversation before loading the model: a bad name or file fails fast,
        # and its model is the one to load unless -m says otherwise.
        saved = _claim_saved(env, store, session_name, resume=resume) if store else None
        endpoint = wiring.wants_endpoint(env, flags)  # then the session's model is not loaded
        if flags["model"] is None and saved is not None and saved.model_ref and not endpoint:
            flags = {**flags, "model": _session_model(env, saved)}
        settings, model_ref = wiring.settings_and_model_ref(
            env, flags, yes=yes, can_ask=interactive
        )
        choice = wiring.ServerChoice(use=not no_server, target=server, api_key=api_key)
        with wiring.chat_engine(env, settings, verbose_prompt, choice) as (engine, session):
            kv = wiring.kv_cache(env, engine, settings) if store else None
            if not interactive:
                _run_batch(
                    env, session, store, saved, session_name, jsonl=jsonl, resume=resume,
                    model_ref=model_ref, kv=kv,
                )  # fmt: skip
                return
            assert store is not None
            repl = wiring.repl(
                env, engine, session, store, plain=plain, show_stats=not no_stats,
                model_ref=model_ref, kv=kv,
            )  # fmt: skip
            if saved is None and session_name:
                repl.name_session(session_name)
            repl.run(resume=saved)
            if repl.terminated_by:
                # after a hangup the terminal is gone: no flush errors at exit
                quiet_broken_pipe(env.stdout)
                raise typer.Exit(repl.terminated_by)


def _open_store(stack: contextlib.ExitStack[bool | None]) -> SessionStore:
    """The sessions directory, its claims ended with the command (`stack`), not the process."""
    from wizardchat import paths
    from wizardchat.chat.store import SessionStore

    return stack.enter_context(contextlib.closing(SessionStore(paths.sessions_dir())))


def _claim_saved(
    env: Environment, store: SessionStore, session_name: str | None, *, resume: bool
) -> SavedSession | None:
    """The saved conversation --session or --resume names, claimed (exit 7 if held elsewhere):
    a session is open in one wizardchat at a time. None: a new conversation."""
    if session_name:
        store.claim(session_name)
        return store.load(session_name) if store.exists(session_name) else None
    if not resume:
        return None
    last = store.last()
    saved = store.load(store.claim(last).name) if last else None
    if saved is None:
        env.say("wizardchat: no saved conversation to resume; starting a new one")
    return saved


def _continue_saved(
    env: Environment,
    session: ChatSession,
    store: SessionStore,
    saved: SavedSession,
    model_ref: str,
    kv: KvCache | None,
) -> Recording:
    """Make the saved conversation the session's, its KV state restored when it matches, and
    keep recording it under its name (batch mode and `ask --session`)."""
    from wizardchat.chat.recording import Recording

    session.restore(saved.system, saved.turns)
    n = len(saved.turns)
    env.say(f"continuing '{saved.name}': {n} turn{'' if n == 1 else 's'}")
    if kv is not None:
        kv.restore(saved.name, session.conversation.tokens())
    model = session.engine.model_name
    return Recording(store, saved.name, model, saved.created, model_ref=model_ref, kv=kv)


def _session_model(env: Environment, saved: SavedSession) -> str:
    """The model a saved session was held with, to load it again when no -m is given.

    Said on stderr (before minutes of loading); a file that is gone is an error naming it.
    """
    ref = saved.model_ref
    if Path(ref).is_absolute() and not os.path.lexists(ref):  # a hub reference never is
        raise NoModelError(
            f"session '{saved.name}' was held with the model {ref}, which is no longer there: "
            "pass -m PATH (or a model reference) to continue it with another model"
        )
    env.say(f"resuming '{saved.name}' with its model {ref}")
    return ref


def _run_batch(
    env: Environment,
    session: ChatSession,
    store: SessionStore | None,
    saved: SavedSession | None,
    session_name: str | None,
    *,
    jsonl: bool,
    resume: bool,
    model_ref: str,
    kv: KvCache | None,
) -> None:
    """Batch mode: piped lines, saved after every reply when a session is named or resumed."""
    from wizardchat.chat import batch
    from wizardchat.chat.recording import Recording, continue_command, free_name
    from wizardchat.signals import Termination

    session.progress = wiring.prompt_progress(env)  # a resumed history can take a while
    recording = None
    model = session.engine.model_name
    if store is not None and saved is not None:
        recording = _continue_saved(env, session, store, saved, model_ref, kv)
    elif store is not None and (session_name or resume):  # store: run() opened it for these
        name = session_name or free_name(store)
        recording = Recording(store, name, model, model_ref=model_ref, kv=kv)
    with Termination(session.cancel) as termination:
        job = batch.Batch(session, env.say, recording=recording, termination=termination)
        runner = batch.run_jsonl if jsonl else batch.run_lines
        try:
            result = runner(job, wiring.stdin_lines(env), reply_output(env))
        finally:  # the end of input, a signal, an error: the KV state is saved with it
            if job.recording is not None:
                job.recording.save(session.conversation, leaving=True)
    # A store is open in batch mode only for a recording (see run).
    if store is not None and job.recording is not None and store.exists(job.recording.name):
        name = job.recording.name
        env.say(f"saved as '{name}' · {continue_command(store, name, model_ref)} continues it")
    if result.terminated:
        raise typer.Exit(result.terminated)
    if result.failed:
        raise typer.Exit(ExitCode.USAGE)
