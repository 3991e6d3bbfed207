"""The model-file commands: `pull` (download a quant that fits), `models` (list), `rm` (delete)."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from wizardchat.cli.environment import Environment
from wizardchat.errors import Declined, NoModelError, UsageError
from wizardchat.settings import load_settings

PULL_EXAMPLES = """
wizardchat pull --list                  the quants, their sizes, which fit
wizardchat pull                         the best quant of WizardLM-2 8x22B
wizardchat pull wizardlm2-8x22b:Q4_K_M
wizardchat pull bartowski/WizardLM-2-8x22B-GGUF:IQ3_XS
"""


def pull(
    env: Environment,
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
    from wizardchat.engine.offload import detect_machine
    from wizardchat.hub import download as hub
    from wizardchat.hub.catalog import parse_ref
    from wizardchat.hub.progress import pull_quant
    from wizardchat.hub.resolve import default_ref, pull_choice, quant_table
    from wizardchat.tui.output import PlainOutput

    configured = load_settings({}, environ=env.environ).model
    parsed = parse_ref(ref or default_ref(configured), reference_only=True)
    if isinstance(parsed, Path):
        raise UsageError(f"{parsed} is a local path; pull takes a model reference")
    model = hub.list_remote(parsed)
    if not model.quants:
        raise NoModelError(f"{parsed.repo} has no GGUF files")
    machine = detect_machine()
    if list_quants:
        rows, _, budget = quant_table(model, parsed, machine)
        PlainOutput(env.stdout, env.stderr).rows(rows)
        env.say(budget)
        return
    choice = pull_choice(parsed, model, machine, warn=env.say)
    path = pull_quant(model, choice.quant, env.stderr, workers=workers)
    env.stdout.write(f"{path}\n")
    env.say(f"chat with it: wizardchat run -m {choice.ref}")


MODELS_EXAMPLES = "wizardchat models\n"


def models(
    env: Environment,
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
        env.say(f"no models in {hubcache.cache_dir()} yet (wizardchat pull downloads one)")
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
    PlainOutput(env.stdout, env.stderr).rows(rows)


def _percent(part: int, whole: int) -> str:
    return f"{100 * part // whole}%" if whole else "?"


RM_EXAMPLES = """
wizardchat rm wizardlm2-8x22b:Q4_K_M    one quant (asks first)
wizardchat rm wizardlm2-7b --yes        every quant of it, without asking
"""


def rm(
    env: Environment,
    ref: Annotated[str, typer.Argument(metavar="REF", help="REPO or REFERENCE[:QUANT] to delete.")],
    yes: Annotated[bool, typer.Option("--yes", "-y", help="Delete without asking.")] = False,
) -> None:
    """Delete a downloaded model and report the space freed."""
    from wizardchat.hub import cache as hubcache
    from wizardchat.hub.catalog import human_size, parse_ref

    parsed = parse_ref(ref, reference_only=True)
    if isinstance(parsed, Path):
        raise UsageError(f"{parsed} is a path; rm takes a model reference (see wizardchat models)")
    targets = [m for m in hubcache.local_models(parsed.repo) if parsed.quant in (None, m.quant)]
    if not targets:
        raise NoModelError(f"{parsed} is not downloaded (wizardchat models lists what is)")
    size = sum(m.size_on_disk for m in targets)
    names = ", ".join(f"{m.repo}:{m.quant}" for m in targets)
    if not yes:
        if not env.stdin_is_terminal:
            raise UsageError(f"rm {ref}: pass --yes to delete {names} without a terminal to ask")
        if not env.confirm(f"delete {names} ({human_size(size)})? [y/N] "):
            raise Declined("nothing deleted")
    removed = [hubcache.remove(m) for m in targets]
    freed = sum(r.freed for r in removed)
    for path in sorted({p for r in removed for p in r.kept}):
        env.say(f"kept {path}: a link in the cache pointed there, outside the repository's folder")
    env.say(f"deleted {names}: {human_size(freed)} freed ({freed} bytes)")
