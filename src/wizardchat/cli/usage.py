"""The command line's own face: help pages people read, and usage errors in one line.

typer renders help with Python types (`<int>`, `[[REF]]`) and reports a bad flag in four lines
with pydantic's wording. wizardchat's commands and groups use the classes here instead: options in
panels, defaults and ranges in words, examples, `--debug` on every command, and every usage error
(bad value, unknown option or command, missing or extra argument) turned into one line that names
the flag as the command line spells it. cli/app.py prints that line; this module prints nothing.

typer (0.29) vendors click as `typer._click`; the classes below extend what typer itself uses.
"""

from __future__ import annotations

import difflib
import re
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from typer._click import exceptions as click_errors
from typer._click.core import Context, Parameter
from typer._click.decorators import option
from typer._click.formatting import HelpFormatter, join_options
from typer.core import TyperCommand, TyperGroup, TyperOption

from wizardchat.cli.plain_values import use_plain_values

ClickUsageError = click_errors.UsageError
NoArgsIsHelpError = click_errors.NoArgsIsHelpError

# Help panels, in the order a page shows them; options without a panel come last, as "Options".
CHAT = "Chat"
SESSIONS = "Sessions"
MODEL = "Model and loading"
PERFORMANCE = "Expert placement and performance"
OUTPUT = "Output"
PANELS = (CHAT, SESSIONS, MODEL, PERFORMANCE, OUTPUT)
OTHER = "Options"
FIRST_COLUMN_MAX = 30  # click's own: a longer option name gets its help on the next line


@dataclass
class State:
    """What the command line asked for beyond the command's own options."""

    debug: bool = False


STATE = State()


def flag_label(opts: Sequence[str]) -> str:
    """One flag's spellings as an error names them: `-c/--ctx-size`, `--top-p`."""
    return "/".join(sorted(opts, key=lambda name: name.startswith("--")))


# ------------------------------------------------------------------ help pages


def _set_debug(ctx: Context, param: Parameter, value: bool) -> None:
    if value:
        STATE.debug = True


def _add_debug_option(command: TyperCommand | TyperGroup) -> None:
    """`--debug` after the command too (`wizardchat run --debug`), as the crash hint says."""
    from typer._coercion import bool_flag_type_descriptor

    option(
        ["--debug"],
        is_flag=True,
        expose_value=False,
        is_eager=True,
        help="Show tracebacks instead of one-line errors.",
        callback=_set_debug,
        type_descriptor=bool_flag_type_descriptor(),
    )(command)


def _argument_name(param: Parameter) -> str:
    name = param.metavar or (param.name or "").upper()
    return name + ("..." if param.nargs != 1 else "")


def _usage_pieces(command: TyperCommand | TyperGroup, ctx: Context) -> list[str]:
    """[OPTIONS] and the arguments as a user writes them: REF, [REF], NAME..."""
    pieces = [command.options_metavar] if command.options_metavar else []
    for param in command.get_params(ctx):
        if param.param_type_name == "argument":
            name = _argument_name(param)
            pieces.append(name if param.required else f"[{name}]")
    return pieces


def _notes(param: Parameter) -> list[str]:
    """The default and the range of a typer-declared value, in words."""
    notes = []
    default = getattr(param, "default", None)
    is_flag = getattr(param, "is_flag", False)
    if getattr(param, "show_default", False) and isinstance(default, int | float | str):
        if is_flag and getattr(param, "secondary_opts", None):
            notes.append(f"default: {param.opts[0] if default else param.secondary_opts[0]}")
        elif not is_flag and not isinstance(default, bool):
            notes.append(f"default: {default}")
    low, high = getattr(param, "min", None), getattr(param, "max", None)
    if low is not None and high is not None:
        notes.append(f"{low} to {high}")
    elif low is not None:
        notes.append(f"at least {low}")
    elif high is not None:
        notes.append(f"at most {high}")
    return notes


_NOTE = re.compile(r"\s+(\[[^\[\]]*\])$")


def _help_record(param: Parameter) -> tuple[str, str, str] | None:
    """Names (with the value's metavar), help text, and the [default; range] note."""
    if getattr(param, "hidden", False):
        return None
    if param.param_type_name == "argument":
        names = _argument_name(param)
    else:
        names = join_options(param.opts)[0]
        if param.secondary_opts:
            names += " / " + join_options(param.secondary_opts)[0]
        if not getattr(param, "is_flag", False):
            names += " " + (param.metavar or "VALUE")
    text = getattr(param, "help", None) or ""
    notes = _notes(param)
    note = f"[{'; '.join(notes)}]" if notes else ""
    if not note and (found := _NOTE.search(text)):  # a note written into the help (options._option)
        text, note = text[: found.start()], found.group(1)
    return names, text, note


def _write_panels(
    command: TyperCommand | TyperGroup, ctx: Context, formatter: HelpFormatter
) -> None:
    """Arguments, then the options panel by panel, one column width for all of them."""
    sections: dict[str, list[tuple[str, str, str]]] = {}
    for param in command.get_params(ctx):
        record = _help_record(param)
        if record is None:
            continue
        if param.param_type_name == "argument":
            sections.setdefault("Arguments", []).append(record)
        else:
            panel = getattr(param, "rich_help_panel", None) or OTHER
            sections.setdefault(panel, []).append(record)
    rows = [row for section in sections.values() for row in section]
    # On a narrow terminal long names get a line of their own rather than squeeze the help.
    limit = FIRST_COLUMN_MAX if formatter.width >= 78 else max(10, formatter.width // 3)
    width = min(max((len(row[0]) for row in rows), default=0), limit)
    known = ["Arguments", *PANELS]
    order = [s for s in known if s in sections]
    order += [s for s in sections if s not in known and s != OTHER]
    order += [OTHER] if OTHER in sections else []
    for section in order:
        with formatter.section(section):
            for row in sections[section]:
                _write_row(formatter, row, width + 2)


def _write_row(formatter: HelpFormatter, row: tuple[str, str, str], column: int) -> None:
    """One option as click writes it, except that the [default: ...] note is never split."""
    import textwrap

    names, text, note = row
    indent = " " * formatter.current_indent
    lines = textwrap.wrap(text, max(formatter.width - formatter.current_indent - column, 20))
    if note:
        if lines and len(lines[-1]) + 2 + len(note) <= formatter.width - len(indent) - column:
            lines[-1] += "  " + note
        else:
            lines.append(note)
    if len(names) + 2 > column:
        formatter.write(f"{indent}{names}\n")
        names = ""
    formatter.write(f"{indent}{names.ljust(column)}{lines[0] if lines else ''}".rstrip() + "\n")
    for line in lines[1:]:
        formatter.write(f"{indent}{' ' * column}{line}\n")


def _write_examples(epilog: str | None, formatter: HelpFormatter) -> None:
    """The epilog as written, line by line: examples are commands, not prose to rewrap."""
    if not epilog:
        return
    with formatter.section("Examples"):
        for line in epilog.strip("\n").splitlines():
            formatter.write(f"{'':>{formatter.current_indent}}{line}".rstrip() + "\n")


def _plain_help(help_option: TyperOption | None) -> TyperOption | None:
    if help_option is not None:
        use_plain_values([help_option])
    return help_option


class Command(TyperCommand):
    """A wizardchat command: readable help, `--debug` accepted after the command name."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        _add_debug_option(self)
        use_plain_values(self.params)

    def get_help_option(self, ctx: Context) -> TyperOption | None:
        """-h/--help, made when first asked for, with the plain conversion too."""
        return _plain_help(super().get_help_option(ctx))

    def collect_usage_pieces(self, ctx: Context) -> list[str]:
        """The usage line's arguments without typer's braces and doubled brackets."""
        return _usage_pieces(self, ctx)

    def format_options(self, ctx: Context, formatter: HelpFormatter) -> None:
        """Options in panels (chat, sessions, model, performance, output, the rest)."""
        _write_panels(self, ctx, formatter)

    def format_epilog(self, ctx: Context, formatter: HelpFormatter) -> None:
        """The examples, verbatim."""
        _write_examples(self.epilog, formatter)


# Words people type from other tools, per group: the command they mean ("" = the group itself).
HABITS: dict[str, dict[str, str]] = {
    "wizardchat": {
        "list": "models",
        "ls": "models",
        "chat": "run",
        "download": "pull",
        "get": "pull",
        "delete": "rm",
        "remove": "rm",
        "del": "rm",
        "sessions-rm": "sessions rm",
        "server": "serve",
        "daemon": "serve",
    },
    "wizardchat sessions": {"list": "", "ls": "", "delete": "rm", "remove": "rm", "del": "rm"},
}
NOT_YET: dict[str, str] = {}  # commands users look for that do not exist yet: what to do instead


class Group(TyperGroup):
    """A wizardchat command group: an unknown command names the one probably meant."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        if not any("--debug" in p.opts for p in self.params):
            _add_debug_option(self)
        use_plain_values(self.params)

    def get_help_option(self, ctx: Context) -> TyperOption | None:
        """-h/--help, made when first asked for, with the plain conversion too."""
        return _plain_help(super().get_help_option(ctx))

    def resolve_command(self, ctx: Context, args: list[str]) -> tuple[str | None, Any, list[str]]:
        """The command `args[0]` names; a usage error that suggests one if there is none."""
        name = args[0] if args else ""
        if name and not name.startswith("-") and self.get_command(ctx, name) is None:
            raise ClickUsageError(self._unknown(ctx, name), ctx)
        return super().resolve_command(ctx, args)

    def _unknown(self, ctx: Context, name: str) -> str:
        path = ctx.command_path
        typed = f"{path.partition(' ')[2]} {name}".strip()
        if name in NOT_YET:
            return f"unknown command '{typed}': {NOT_YET[name]}"
        meant = HABITS.get(path, {}).get(name)
        if meant is None:
            nearest = difflib.get_close_matches(name, list(self.commands), n=1, cutoff=0.6)
            meant = nearest[0] if nearest else None
        if meant is None:
            return f"unknown command '{typed}' ({path} -h lists the commands)"
        return f"unknown command '{typed}' (did you mean '{f'{path} {meant}'.strip()}'?)"

    def format_options(self, ctx: Context, formatter: HelpFormatter) -> None:
        """The group's options as a command's are written, then its commands."""
        _write_panels(self, ctx, formatter)
        self.format_commands(ctx, formatter)

    def format_epilog(self, ctx: Context, formatter: HelpFormatter) -> None:
        """The examples, verbatim."""
        _write_examples(self.epilog, formatter)


# ------------------------------------------------------------------ usage errors in one line


def error_line(error: click_errors.UsageError, argv: Sequence[str]) -> str:
    """The one line (after `wizardchat: error: `) that says what was wrong with `argv`."""
    ctx = error.ctx
    if isinstance(error, click_errors.NoSuchOption):
        return _unknown_option(error.option_name, ctx)
    if isinstance(error, click_errors.MissingParameter):
        return _missing(error, ctx)
    if isinstance(error, click_errors.BadParameter):
        return _bad_value(error, argv)
    if isinstance(error, click_errors.BadOptionUsage):
        return _bad_option_usage(error)
    if error.message == "Missing command." and ctx is not None:
        return f"missing COMMAND ({ctx.command_path} -h lists the commands)"
    extra = re.fullmatch(r"Got unexpected extra argument\(s\) \((.*)\)", error.message, re.S)
    if extra and ctx is not None:
        return _extra_arguments(extra.group(1).split(), ctx)
    return error.format_message().rstrip(".")


def _where(ctx: Context | None) -> str:
    """The command as typed after `wizardchat` (`rm`, `sessions rm`)."""
    return ctx.command_path.partition(" ")[2] if ctx else ""


def _usage(ctx: Context) -> str:
    return " ".join([ctx.command_path, *ctx.command.collect_usage_pieces(ctx)])


def _unknown_option(name: str, ctx: Context | None) -> str:
    if ctx is None:
        return f"unknown option {name}"
    typed = name.partition("=")[0]
    if isinstance(ctx.command, TyperGroup) and (owner := _command_with_option(ctx, typed)):
        return f"{typed} goes after the command: {ctx.command_path} {owner} {typed} ..."
    spellings = [
        o for p in ctx.command.get_params(ctx) for o in (*p.opts, *p.secondary_opts) if o[:1] == "-"
    ]
    nearest = difflib.get_close_matches(typed, spellings, n=1, cutoff=0.6)
    if nearest:
        return f"unknown option {typed} (did you mean {nearest[0]}?)"
    takes_text = any(p.param_type_name == "argument" for p in ctx.command.params)
    looks_like_text = _where(ctx) == "ask" or typed[1:2].isdigit()  # `ask "-5 degrees ..."`
    if takes_text and looks_like_text and not typed.startswith("--"):
        return f"unknown option {typed} (text that starts with - goes after --: " + (
            f"{ctx.command_path} -- TEXT)"
        )
    return f"unknown option {typed} ({ctx.command_path} -h lists the options)"


def _command_with_option(ctx: Context, typed: str) -> str | None:
    """The command (run first) that has the option a user put before any command."""
    assert isinstance(ctx.command, TyperGroup)
    names = sorted(ctx.command.commands, key=lambda name: name != "run")
    for name in names:
        command = ctx.command.commands[name]
        if any(typed in (*p.opts, *p.secondary_opts) for p in command.params):
            return name
    return None


def _missing(error: click_errors.MissingParameter, ctx: Context | None) -> str:
    param = error.param
    if param is None or ctx is None:
        return error.format_message().rstrip(".")
    if param.param_type_name == "argument":
        name = param.metavar or (param.name or "").upper()
        return f"{_where(ctx)}: missing {name} (usage: {_usage(ctx)})"
    return f"{flag_label(param.opts)}: required"


# pydantic's error types (typer validates values with it) and what they mean in words.
_NOT_A = {
    "int_parsing": "is not a whole number",
    "int_from_float": "is not a whole number",
    "int_type": "is not a whole number",
    "float_parsing": "is not a number",
    "float_type": "is not a number",
    "bool_parsing": "is not one of true, false, yes, no, on, off, 1, 0",
}
_OUT_OF_RANGE = {"greater_than_equal", "less_than_equal", "greater_than", "less_than"}


def _bad_value(error: click_errors.BadParameter, argv: Sequence[str]) -> str:
    param = error.param
    label = (
        flag_label(param.opts)
        if param is not None and param.param_type_name == "option"
        else _argument_name(param)
        if param is not None
        else "value"
    )
    details = getattr(error.__cause__, "errors", None)
    found = details()[0] if callable(details) and details() else {}
    kind, value = found.get("type"), found.get("input")
    if param is not None and (glued := _glued_option(param, value, argv)):
        return _unknown_option(glued, error.ctx)  # `-ng 5` read as -n with the value "g"
    if kind in _NOT_A:
        return f"{label}: {value!r} {_NOT_A[kind]}"
    if kind in _OUT_OF_RANGE and param is not None:
        rule = " and ".join(_notes_range(param)) or "in range"
        return f"{label}: must be {rule}, not {value}"
    message = error.message.rstrip(".")
    return f"{label}: {message}" if value is None else f"{label}: invalid value {value!r}"


def _glued_option(param: Parameter, value: Any, argv: Sequence[str]) -> str | None:
    """`-ng` when click read a mistyped `-ng` as the short option -n with the value "g"."""
    for opt in param.opts:
        if len(opt) == 2 and opt[0] == "-" and f"{opt}{value}" in argv:
            return f"{opt}{value}"
    return None


def _notes_range(param: Parameter) -> list[str]:
    return [n for n in _notes(param) if not n.startswith("default:")]


def _bad_option_usage(error: click_errors.BadOptionUsage) -> str:
    if "requires" in error.message:
        return f"{error.option_name}: needs a value"
    if "does not take a value" in error.message:
        return f"{error.option_name}: takes no value"
    return f"{error.option_name}: {error.message.rstrip('.')}"


def _extra_arguments(extra: list[str], ctx: Context) -> str:
    quoted = " ".join(f"'{a}'" for a in extra)
    noun = "argument" if len(extra) == 1 else "arguments"
    if _where(ctx) == "ask":
        hint = 'quote a prompt of several words: wizardchat ask "..."'
    else:
        hint = f"usage: {_usage(ctx)}"
    return f"{_where(ctx)}: unexpected extra {noun} {quoted} ({hint})"
