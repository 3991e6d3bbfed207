"""Where tensors go: llama.cpp's --cpu-moe / --n-cpu-moe / -ot as a list of overrides.

Pure rules, no llama_cpp: engine/placement.py turns the list into the C array llama.cpp reads.
llama.cpp applies the first pattern that `std::regex_search`es a tensor's name.
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from dataclasses import dataclass

from wizardchat.errors import UsageError

# llama.cpp common/common.h LLM_FFN_EXPS_REGEX: the merged expert tensors of any layer.
EXPERTS_REGEX = r"\.ffn_(up|down|gate|gate_up)_(ch|)exps"
CPU_BUFFER = "CPU"
# ECMAScript std::regex rejects these Python-only constructs (named, atomic and comment groups,
# lookbehind, inline flags, possessive quantifiers); catch them here, not as a C++ abort.
_PYTHON_ONLY_SYNTAX = re.compile(r"\(\?(P|<[=!]?|#|>|[aiLmsux])|(?<!\\)[*+?}]\+")
# std::regex unrolls counted repeats into states: a{100000} takes memory and time by the GB.
_REPEAT_COUNTS = re.compile(r"(?<!\\)\{(\d+)(?:,(\d*))?\}")
MAX_REPEAT = 1000


@dataclass(frozen=True)
class Override:
    """Tensors whose name matches `pattern` go to the buffer type named `buffer`."""

    pattern: str
    buffer: str


def expert_overrides(cpu_moe: bool, n_cpu_moe: int) -> list[Override]:
    """The overrides that --cpu-moe and --n-cpu-moe N stand for, spelled as llama.cpp does."""
    if cpu_moe:
        return [Override(EXPERTS_REGEX, CPU_BUFFER)]
    return [Override(rf"blk\.{i}{EXPERTS_REGEX}", CPU_BUFFER) for i in range(n_cpu_moe)]


def parse_override(text: str) -> Override:
    """Parse one `-ot REGEX=BUFFER` value; a bad regex is a UsageError."""
    pattern, sep, buffer = text.rpartition("=")
    if not sep or not pattern or not buffer:
        problem = _regex_problem(text) if text and not sep else None
        what = f"invalid regex ({problem}) and " if problem else ""
        raise UsageError(f"--override-tensor {text!r}: {what}expected REGEX=BUFFER, e.g. exps=CPU")
    problem = _regex_problem(pattern)
    if problem:
        raise UsageError(f"--override-tensor {text!r}: invalid regex ({problem})")
    return Override(pattern, buffer)


def _regex_problem(pattern: str) -> str | None:
    """Why llama.cpp's std::regex cannot take `pattern`, or None."""
    if _PYTHON_ONLY_SYNTAX.search(pattern):
        return "llama.cpp regexes have no (?...) groups or possessive quantifiers"
    for m in _REPEAT_COUNTS.finditer(pattern):
        if any(n and (len(n) > 6 or int(n) > MAX_REPEAT) for n in m.groups()):
            return f"repeat counts go up to {MAX_REPEAT}"
    try:
        re.compile(pattern)
    except (re.error, OverflowError, RecursionError) as e:
        return str(e)
    return None


def plan_overrides(override_tensor: Sequence[str], cpu_moe: bool, n_cpu_moe: int) -> list[Override]:
    """All overrides in llama.cpp's order of precedence: explicit -ot first, then the MoE flags."""
    return [parse_override(t) for t in override_tensor] + expert_overrides(cpu_moe, n_cpu_moe)
