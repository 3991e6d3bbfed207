"""Option values converted without pydantic when they are plain, as nearly all are.

typer 0.29 converts every option value through a pydantic TypeAdapter built at dispatch:
importing pydantic and building the adapters costs about 0.1 s on each `ask` and `run`, more than
Python's own start-up, to turn "0.7" into 0.7. Here a value of a plain kind (str, int, float,
bool, a list of str, each possibly None) that is already of its type, or a string in the one
spelling int() and float() read the same as pydantic does, is converted directly; anything else
(a bad value, a number out of its range, a spelling such as "1_000") goes to typer's own
conversion, so what is accepted and every error message stay typer's.
"""

from __future__ import annotations

import re
import types
from dataclasses import dataclass, field
from typing import Any, Union, get_args, get_origin

from typer._click.core import Context, Parameter
from typer._coercion import RuntimeParam, build_runtime_param
from typer.core import _TyperParameter

_INT = re.compile(r"[+-]?[0-9]+\Z")
_FLOAT = re.compile(r"[+-]?(?:[0-9]+\.?[0-9]*|\.[0-9]+)(?:[eE][+-]?[0-9]+)?\Z")
_PLAIN = (str, int, float, bool)


def _without_none(annotation: Any) -> Any:
    """`int` for `int | None`; the annotation itself otherwise."""
    if get_origin(annotation) in (Union, types.UnionType):
        args = [a for a in get_args(annotation) if a is not type(None)]
        if len(args) == 1:
            return args[0]
    return annotation


@dataclass(frozen=True)
class PlainValue(RuntimeParam):
    """typer's coercion of one parameter, with the plain cases done here (see the module)."""

    kind: type = str
    many: bool = False  # list[kind]
    _typer: list[RuntimeParam] = field(default_factory=list)  # built on the first hard case

    def _coerce_value(self, value: Any, param: _TyperParameter, ctx: Context) -> Any:
        if self.many and isinstance(value, (list, tuple)):
            items = [self._plain(v) for v in value]
            if all(item is not _HARD for item in items):
                return items
        elif not self.many:
            plain = self._plain(value)
            if plain is not _HARD:
                return plain
        if not self._typer:
            self._typer.append(build_runtime_param(param.type_descriptor))
        return self._typer[0]._coerce_value(value, param=param, ctx=ctx)

    def _plain(self, value: Any) -> Any:
        kind, info = self.kind, self.parameter_info
        if kind is bool:
            return value if isinstance(value, bool) else _HARD
        if kind is str:
            return value if isinstance(value, str) else _HARD
        if isinstance(value, bool):
            return _HARD
        if isinstance(value, str):
            if not (_INT if kind is int else _FLOAT).match(value):
                return _HARD
            number = kind(value)
        elif isinstance(value, (int, float)) and (kind is float or isinstance(value, int)):
            number = kind(value)
        else:
            return _HARD
        if (info.min is not None and number < info.min) or (
            info.max is not None and number > info.max
        ):
            return _HARD  # typer says so (or clamps)
        return number


_HARD = object()  # a value typer's own conversion handles


def use_plain_values(params: list[Parameter]) -> None:
    """Give each typer parameter of a plain kind the conversion above."""
    for param in params:
        if not isinstance(param, _TyperParameter) or param._runtime_param is not None:
            continue
        info = param.type_descriptor.parameter_info
        if info.parser is not None:
            continue
        annotation = _without_none(param.type_descriptor.annotation)
        many = get_origin(annotation) is list
        kind = get_args(annotation)[0] if many else annotation
        if kind in _PLAIN and not (many and kind is not str):
            param._runtime_param = PlainValue(
                parameter_info=info, annotation=param.type_descriptor.annotation, kind=kind,
                many=many,
            )  # fmt: skip
