"""Option values converted without pydantic (cli/plain_values.py) mean what typer makes of them.

Each value goes through the conversion `ask` really uses and through typer's own (the pydantic
TypeAdapter it would build): the results, or the one-line errors, must be the same. And the
command line that starts every `ask` and `run` must not import pydantic at all.
"""

from __future__ import annotations

import subprocess
import sys
from typing import Any

import pytest
from conftest import Models
from typer._click import exceptions as click_errors
from typer._click.core import Context
from typer._coercion import build_runtime_param
from typer.main import get_command

from wizardchat.cli.app import app
from wizardchat.cli.plain_values import PlainValue

VALUES: dict[str, list[Any]] = {
    "temperature": ["0.7", "0", "1e-3", ".5", "5.", "-0.1", "+2", "x", "", " 1", "1_0", "nan",
                    "inf", "0x10", "1e400", 0.7, 3],
    "max_tokens": ["16", "-1", "+3", "007", "2.5", "1_000", " 4", "", "x", "1e3", 12, 2.0, True],
    "model": ["Q4_K_M", "a b", "", "-"],
    "override_tensor": [("blk.1=CPU",), ("a=CPU", "b=CUDA0"), ()],
    "verbose": [True, False],
}  # fmt: skip


def ask_param(name: str) -> Any:
    command = get_command(app).commands["ask"]  # type: ignore[attr-defined]
    return next(p for p in command.params if p.name == name)


def convert(runtime: Any, param: Any, value: Any) -> tuple[str, Any]:
    ctx = Context(get_command(app).commands["ask"])  # type: ignore[attr-defined]
    try:
        return "ok", runtime.coerce(value, param=param, ctx=ctx)
    except click_errors.BadParameter as e:
        return "error", e.message


@pytest.mark.parametrize(
    ("name", "value"), [(name, v) for name, values in VALUES.items() for v in values]
)
def test_a_plain_conversion_gives_what_typer_gives(name: str, value: Any) -> None:
    param = ask_param(name)
    assert isinstance(param._runtime_param, PlainValue)
    ours = convert(param._runtime_param, param, value)
    typers = convert(build_runtime_param(param.type_descriptor), param, value)
    assert repr(ours) == repr(typers)  # repr: nan, and 2 is not 2.0
    assert type(ours[1]) is type(typers[1])


def test_ask_and_its_options_do_not_import_pydantic(models: Models) -> None:
    # typer 0.29 converts values through pydantic: importing it and building its adapters
    # cost each `ask` about 0.1 s before the model even began loading.
    script = (
        "import sys\n"
        "from wizardchat.entry import main\n"
        "try:\n"
        f"    main(['ask', 'Hi', '-m', {str(models.scripted)!r}, '-n', '3', '--temp', '0',"
        " '--top-p', '0.9', '-c', '512', '-ot', 'blk\\\\.1\\\\.ffn_.*=CPU', '--no-server'])\n"
        "except SystemExit as e:\n"
        "    print('exit', e.code, file=sys.stderr)\n"
        "print('pydantic' in sys.modules, file=sys.stderr)\n"
    )
    proc = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True,
                          timeout=120, stdin=subprocess.DEVNULL)  # fmt: skip
    assert proc.stderr.splitlines()[-2:] == ["exit 0", "False"], proc.stderr
