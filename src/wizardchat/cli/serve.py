"""The resident model's commands: `serve` (load once, serve until stopped), `ps`, `stop`."""

from __future__ import annotations

import os
import re
import signal
import time
from typing import TYPE_CHECKING, Annotated, Any

import typer

from wizardchat.cli import wiring
from wizardchat.cli.environment import Environment
from wizardchat.cli.options import LOAD_OPTIONS, Flags, YesOpt, settings_options
from wizardchat.errors import ServerError, UsageError

if TYPE_CHECKING:
    from wizardchat.serve.http_api import HttpOptions
    from wizardchat.serve.registry import ServerEntry

SERVE_EXAMPLES = """
wizardchat serve -m FILE.gguf                 load once; ask and run use it
wizardchat serve -ncmoe 8 --keep-alive 2h     unload after 2 hours idle
wizardchat serve --keep-alive -1              never unload
wizardchat serve --http 8080                  and an OpenAI-compatible API on 127.0.0.1:8080
"""

DEFAULT_KEEP_ALIVE = "30m"
DEFAULT_CONVERSATION_CACHE_GB = 4.0
_DURATION = re.compile(r"(\d+(?:\.\d+)?)\s*(s|m|h)?")
_UNIT_SECONDS = {"s": 1, "m": 60, "h": 3600, None: 1}
STOP_WAIT_SECONDS = 30.0


def parse_keep_alive(text: str) -> float | None:
    """Seconds of idle time before unloading; None for -1 (never). UsageError otherwise."""
    text = text.strip()
    if text == "-1":
        return None
    match = _DURATION.fullmatch(text)
    if not match:
        raise UsageError(
            f"--keep-alive: {text!r} is not a duration (e.g. 90s, 30m, 2h, or -1 for never)"
        )
    return float(match.group(1)) * _UNIT_SECONDS[match.group(2)]


@settings_options(*LOAD_OPTIONS)
def serve(
    env: Environment,
    flags: Flags,
    keep_alive: Annotated[
        str,
        typer.Option(
            "--keep-alive",
            metavar="DURATION",
            help="Unload the model after this long idle (90s, 30m, 2h; -1: never); the next "
            "request loads it again.",
        ),
    ] = DEFAULT_KEEP_ALIVE,
    conversation_cache_gb: Annotated[
        float,
        typer.Option(
            "--conversation-cache-gb",
            metavar="GB",
            min=0,
            help="RAM for copies of the KV caches of conversations taking turns, so a client "
            "coming back evaluates only its new message (0: off).",
        ),
    ] = DEFAULT_CONVERSATION_CACHE_GB,
    http: Annotated[
        str | None,
        typer.Option(
            "--http",
            metavar="[HOST:]PORT",
            help="Also serve an OpenAI-compatible API (/v1/chat/completions, /v1/completions, "
            "/v1/models) there; the host is 127.0.0.1 unless given (port 0: a free one).",
        ),
    ] = None,
    allow_remote: Annotated[
        bool,
        typer.Option(
            "--allow-remote",
            help="Let --http listen on an address other machines reach (needs an API key).",
        ),
    ] = False,
    api_key: Annotated[
        str | None,
        typer.Option(
            "--api-key",
            metavar="KEY",
            help="Require `Authorization: Bearer KEY` on every HTTP request (the environment "
            "variable WIZARDCHAT_API_KEY keeps it out of the process list).",
        ),
    ] = None,
    yes: YesOpt = False,
) -> None:
    """Keep the model loaded: ask, run and batch mode use it."""
    import contextlib

    from wizardchat.serve import registry
    from wizardchat.serve.server import EngineServer

    idle = parse_keep_alive(keep_alive)
    http_options = _http_options(env, http, allow_remote=allow_remote, api_key=api_key)
    settings = wiring.settings(env, flags, yes=yes, can_ask=env.interactive)
    assert settings.model_path is not None
    running = registry.for_model(settings.model_path)
    if running:  # a second copy of 80 GB in memory would only push the first out
        other = running[0]
        raise ServerError(
            f"wizardchat serve (pid {other.pid}) already serves {other.model_name} "
            f"(wizardchat stop {other.pid} ends it)"
        )
    # Bound before the load, so a port in use fails at once; it listens once the model is in.
    listener, address = http_options.listen() if http_options else (None, None)
    entry = registry.new_entry(
        os.getpid(),
        settings.model_path,
        wiring.server_load_settings(settings),
        http=str(address) if address else "",
    )
    with listener or contextlib.nullcontext(), wiring.loader(env, settings) as load:
        server = EngineServer(
            load,
            entry,
            keep_alive=idle,
            say=env.say,
            switch_bytes=int(conversation_cache_gb * 1e9),
        )
        server.load_now()

        def stop(signum: int, frame: Any) -> None:
            server.stop()

        previous = {s: signal.signal(s, stop) for s in _stop_signals()}
        try:
            forever = "never unloads" if idle is None else f"unloads after {keep_alive} idle"
            env.say(
                f"serving {entry.model_name} (pid {entry.pid}, {forever}); wizardchat ask and "
                "run use it · Ctrl-C or wizardchat stop ends it"
            )
            if http_options is None or listener is None or address is None:
                server.serve()
            else:
                from wizardchat.serve.http_api import serving

                with serving(server, listener, http_options, system=settings.system):
                    env.say(f"OpenAI-compatible API on {address.url}")
                    server.serve()  # returns once stopped; then uvicorn is shut down
        finally:
            for s, handler in previous.items():
                signal.signal(s, handler)
    env.say(f"stopped serving {entry.model_name}")


def _http_options(
    env: Environment, http: str | None, *, allow_remote: bool, api_key: str | None
) -> HttpOptions | None:
    """`--http`, `--allow-remote` and the key (the flag, else WIZARDCHAT_API_KEY), checked
    before anything loads; None without --http. UsageError without the serve extra."""
    if http is None:
        if allow_remote or api_key is not None:
            raise UsageError("--allow-remote and --api-key go with --http [HOST:]PORT")
        return None
    try:
        from wizardchat.serve import http_api
    except ModuleNotFoundError as e:  # starlette, uvicorn or one of theirs is not installed
        if (e.name or "").partition(".")[0] in {"starlette", "uvicorn", "anyio", "h11"}:
            raise UsageError(
                "--http needs the serve extra: pip install 'wizardchat[serve]'"
            ) from None
        raise
    key = api_key if api_key is not None else env.environ.get(http_api.API_KEY_ENV)
    return http_api.HttpOptions.of(http, allow_remote=allow_remote, api_key=key or None)


def _stop_signals() -> list[int]:
    names = ("SIGINT", "SIGTERM", "SIGHUP")
    return [getattr(signal, n) for n in names if hasattr(signal, n)]


PS_EXAMPLES = "wizardchat ps\n"


def ps(env: Environment) -> None:
    """List the running servers (wizardchat serve)."""
    from wizardchat.serve import registry
    from wizardchat.tui.commands import size_text
    from wizardchat.tui.output import PlainOutput

    running = registry.entries()
    if not running:
        env.say("no wizardchat serve is running (wizardchat serve -m FILE.gguf starts one)")
        return
    rows: list[tuple[str, ...]] = [
        ("PID", "MODEL", "STATE", "MEMORY", "IDLE", "WAITING", "REPLIES", "HTTP", "SOCKET")
    ]
    for entry in running:
        status = _status(entry)
        if status is None:
            rows.append((str(entry.pid), entry.model_name, "not answering", "-", "-", "-", "-",
                         _api_url(entry), entry.socket))  # fmt: skip
            continue
        state = "replying" if status["busy"] else "loaded" if status["loaded"] else "unloaded"
        rows.append(
            (
                str(entry.pid),
                entry.model_name,
                state,
                size_text(int(status["rss_bytes"])) if status["rss_bytes"] else "-",
                _duration(float(status["idle_seconds"])),
                str(status["waiting"]),
                str(status["replies"]),
                _api_url(entry),
                entry.socket,
            )
        )
    PlainOutput(env.stdout, env.stderr).rows(rows, header=True)


def _api_url(entry: ServerEntry) -> str:
    """Where `serve --http` answers, as OpenAI clients take it; "-" without --http."""
    return f"http://{entry.http}/v1" if entry.http else "-"


def _status(entry: ServerEntry) -> dict[str, Any] | None:
    from wizardchat.serve.client import call

    try:
        status = call(entry, "status")
    except ServerError:
        return None
    return status if isinstance(status, dict) else None


def _duration(seconds: float) -> str:
    if seconds < 120:
        return f"{seconds:.0f} s"
    if seconds < 7200:
        return f"{seconds / 60:.0f} min"
    return f"{seconds / 3600:.1f} h"


STOP_EXAMPLES = """
wizardchat stop                 the one running
wizardchat stop 4242            by pid
wizardchat stop model.gguf      by model file name
"""


def stop(
    env: Environment,
    which: Annotated[
        str | None,
        typer.Argument(metavar="[MODEL|PID]", help="Which server (needed when several run)."),
    ] = None,
) -> None:
    """Stop a running server (wizardchat serve)."""
    from wizardchat.serve import registry
    from wizardchat.serve.client import call

    running = registry.entries()
    if which is not None:
        running = [
            e
            for e in running
            if which in (str(e.pid), e.model_name) or os.path.realpath(which) == e.model
        ]
    if not running:
        target = f" as {which}" if which else ""
        raise ServerError(f"no wizardchat serve runs{target} (wizardchat ps lists them)")
    if len(running) > 1:
        pids = ", ".join(str(e.pid) for e in running)
        raise UsageError(f"{len(running)} servers run (pids {pids}): say which, by pid")
    entry = running[0]
    call(entry, "stop")
    deadline = time.monotonic() + STOP_WAIT_SECONDS
    while time.monotonic() < deadline and _running(entry.pid):
        time.sleep(0.05)
    if _running(entry.pid):
        raise ServerError(f"wizardchat serve (pid {entry.pid}) did not stop within 30 s")
    env.say(f"stopped wizardchat serve (pid {entry.pid}, {entry.model_name})")


def _running(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except OSError:
        return False
    # A child of this process that exited but was not reaped yet still answers kill(0).
    try:
        with open(f"/proc/{pid}/stat", encoding="ascii") as f:
            return f.read().split(") ", 1)[1][:1] != "Z"
    except (OSError, IndexError):
        return True
