"""The machine commands: `doctor` (this install, machine and plan), `bench` (measured speed),
`rpc-worker` (serve this machine's devices to another wizardchat)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Annotated

import typer

from wizardchat.cli import wiring
from wizardchat.cli.environment import Environment
from wizardchat.cli.options import (
    FLAG_LABELS,
    LOAD_OPTIONS,
    ApiKeyOpt,
    Flags,
    YesOpt,
    settings_options,
)
from wizardchat.cli.output import write_untrusted
from wizardchat.errors import NoModelError
from wizardchat.settings import MAX_THREADS, Settings, load_settings

DOCTOR_EXAMPLES = """
wizardchat doctor                       this machine, the plan for WizardLM-2
wizardchat doctor -m FILE.gguf --json   the plan for a file, as JSON
wizardchat doctor --endpoint URL        check a server to chat through
"""


@settings_options("rpc", "endpoint", "endpoint_model", "endpoint_timeout")
def doctor(
    env: Environment,
    flags: Flags,
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
    api_key: ApiKeyOpt = None,
) -> None:
    """Show this install, this machine and the offload plan."""
    from wizardchat.diagnose import doctor as doctor_module

    settings = load_settings({**flags, "model": model}, environ=env.environ, labels=FLAG_LABELS)
    if settings.endpoint:  # the server's model, not this machine's
        _doctor_endpoint(env, settings, api_key, json_output=json_output)
        return
    from wizardchat.hub.catalog import parse_ref

    if settings.model and isinstance(local := parse_ref(settings.model), Path):
        if model and not local.exists():  # a typo in -m; a configured one is reported instead
            raise NoModelError(f"model file not found: {local}")
        wiring.check_model_file(local)  # reading a FIFO's header would wait forever
    if settings.rpc:
        from wizardchat.engine.rpc import add_servers

        add_servers(settings.rpc)
    report = doctor_module.collect(settings.model, _model_source(env, model, settings.model))
    if json_output:
        env.stdout.write(json.dumps(report, indent=1) + "\n")
    else:  # paths, GGUF metadata, RPC workers' descriptions
        write_untrusted(env, doctor_module.render(report))


def _doctor_endpoint(
    env: Environment, settings: Settings, api_key: str | None, *, json_output: bool
) -> None:
    from wizardchat.endpoint import check

    environ = env.environ
    key = api_key or environ.get("WIZARDCHAT_API_KEY") or environ.get("OPENAI_API_KEY")
    report = check.check(settings, key)
    if json_output:
        env.stdout.write(json.dumps(report, indent=1) + "\n")
    else:  # the model's name and its reply are the server's words
        write_untrusted(env, check.render(report))


def _model_source(env: Environment, flag: str | None, configured: str | None) -> str:
    """Where a model not given with -m came from, for a report that it is missing."""
    if flag or not configured:
        return ""
    if "WIZARDCHAT_MODEL" in env.environ:
        return "WIZARDCHAT_MODEL"
    from wizardchat import paths

    return str(paths.config_file())


BENCH_EXAMPLES = """
wizardchat bench -m FILE.gguf
wizardchat bench -m FILE.gguf --n-cpu-moe 8 --reps 5 --compare
"""


@settings_options(*LOAD_OPTIONS)
def bench(
    env: Environment,
    flags: Flags,
    json_output: Annotated[bool, typer.Option("--json", help="One JSON object.")] = False,
    compare: Annotated[
        bool, typer.Option("--compare", help="Also run llama-bench (if on PATH) and compare.")
    ] = False,
    reps: Annotated[
        int,
        typer.Option("--reps", min=1, max=50, metavar="N", help="Timed runs of each test."),
    ] = 3,
    yes: YesOpt = False,
) -> None:
    """Measure prompt and generation speed with the current plan."""
    from wizardchat.diagnose import bench as bench_module
    from wizardchat.diagnose import llama_bench

    settings = wiring.settings(env, flags, yes=yes, can_ask=env.stdin_is_terminal)
    from wizardchat.engine.offload import remember_ram_bandwidth
    from wizardchat.plan.machine import measure_ram_bandwidth

    remember_ram_bandwidth(measure_ram_bandwidth())  # for the plan's decode bound
    # Text: the heading names the model, quant and plan first, so stderr does not repeat it.
    with wiring.engine(env, settings, verbose_prompt=False, plan_line=json_output) as (engine, _):
        if not json_output:
            write_untrusted(env, "\n".join(bench_module.heading(engine)))  # a file name: any bytes
            env.stdout.flush()
        bound = engine.fit.decode_bound if engine.fit else None
        result = bench_module.run_bench(engine, reps=reps, bound_tps=bound, progress=env.say)
        against: dict[str, float] | None = None
        if compare:
            binary = llama_bench.find_llama_bench()
            if binary is None:
                env.say("--compare: no llama-bench on PATH; showing wizardchat's figures only")
            else:
                assert settings.model_path is not None
                against = llama_bench.run_llama_bench(
                    binary,
                    settings.model_path,
                    engine.load_plan,
                    reps=reps,
                    depth=result.depth,
                    progress=env.say,
                )
    if json_output:
        data = result.to_json()
        if against is not None:
            data["llama_bench"] = against
        env.stdout.write(json.dumps(data, indent=1) + "\n")
    else:
        from wizardchat.tui.output import PlainOutput

        PlainOutput(env.stdout, env.stderr).rows(bench_module.format_table(result, against))


RPC_WORKER_EXAMPLES = """
wizardchat rpc-worker                   serve on 127.0.0.1:50052
wizardchat rpc-worker --host 10.0.0.5 --allow-remote    trusted network only
"""


def rpc_worker(
    env: Environment,
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
        announce=env.say,
    )
