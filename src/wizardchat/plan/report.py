"""The fit as text: the plan line, doctor's rows, llama.cpp flags, and the numbers' units."""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from wizardchat.plan.fit import Fit


def gb(n: float) -> str:
    return f"{n / 1e9:.1f} GB"


def _at(bandwidth: float | None) -> str:
    if bandwidth is None:
        return ""
    if bandwidth >= 1e12:
        return f" at {bandwidth / 1e12:.2f} TB/s"
    return f" at {bandwidth / 1e9:.0f} GB/s"


def rate_text(tok_s: float) -> str:
    """A decode speed as the plan writes it: 41, 7.5 (tok/s)."""
    return f"{tok_s:.0f}" if tok_s >= 10 else f"{tok_s:.1f}"


def layer_ranges(layers: Sequence[int]) -> str:
    """[0, 1, 2, 5] -> '0-2, 5'."""
    runs: list[list[int]] = []
    for n in sorted(layers):
        if runs and runs[-1][1] == n - 1:
            runs[-1][1] = n
        else:
            runs.append([n, n])
    return ", ".join(str(a) if a == b else f"{a}-{b}" for a, b in runs)


def flags_text(fit: Fit) -> str:
    """The placement as llama.cpp command-line flags."""
    parts = [f"-ngl {fit.n_gpu_layers}"]
    if fit.n_cpu_moe:
        parts.append(f"--n-cpu-moe {fit.n_cpu_moe}")
    if len(fit.tensor_split) > 1:
        parts.append("-ts " + ",".join(f"{s:.3g}" for s in fit.tensor_split))
    parts += [f"-c {fit.n_ctx}", f"-fa {'on' if fit.flash_attn else 'off'}"]
    parts += [f"-ctk {fit.type_k}", f"-ctv {fit.type_v}"]
    return " ".join(parts)


def _kv_label(fit: Fit) -> str:
    return fit.type_k if fit.type_k == fit.type_v else f"{fit.type_k}/{fit.type_v}"


def _bound_label(fit: Fit) -> str:
    """The bound once it is known; nothing otherwise (an unmeasured host says nothing)."""
    if fit.decode_bound is None:
        return ""
    return f"~{rate_text(fit.decode_bound)} tok/s bound"


def _where(fit: Fit) -> str:
    gpus = fit.gpu_uses
    n = fit.n_layer
    if not gpus:
        return f"all {n} layers in RAM"
    on = sorted(i for u in gpus for i in u.layers)
    if len(gpus) == 1:
        text = f"{len(on)}/{n} layers on {gpus[0].memory.name}"
    else:
        shares = " + ".join(f"{u.memory.name} ({layer_ranges(u.layers) or 'output'})" for u in gpus)
        text = f"{len(on)}/{n} layers on {shares}"
    in_ram = [i for i in range(n) if i not in set(on)]
    output_in_ram = not any(u.output for u in gpus)
    if in_ram:
        text += f", layers {layer_ranges(in_ram)}{' and output' if output_in_ram else ''} in RAM"
    elif output_in_ram:
        text += ", output in RAM"
    experts = fit.experts_in_ram
    if experts:
        text += f", experts of layers {layer_ranges(experts)} in RAM"
    return text


def one_line(fit: Fit) -> str:
    """The fit in one line, for the start of a chat."""
    ctx = f"ctx {fit.n_ctx}"
    if fit.ctx_reduced:
        ctx += f" (asked {fit.requested_ctx})"
    parts = [_where(fit), ctx, f"KV {_kv_label(fit)}"]
    if not fit.flash_attn:
        parts.append("flash attn off")
    parts.append(_bound_label(fit))
    line = "plan: " + ", ".join(p for p in parts if p)
    if not fit.fits:
        line += " (over memory: loading may fail)"
    return line


def rows(fit: Fit) -> list[tuple[str, str]]:
    """The full fit as (label, value) rows, for doctor and /show."""
    rows = [("plan", one_line(fit).removeprefix("plan: ")), ("llama.cpp flags", flags_text(fit))]
    ctx = f"{fit.n_ctx} tokens"
    if fit.ctx_reduced:
        ctx += f" (reduced from {fit.requested_ctx})"
    rows.append(("context", ctx))
    kv_total = sum(u.kv for u in fit.memories)
    per_token = kv_total // fit.n_ctx if fit.n_ctx else 0
    rows.append(("KV cache", f"{_kv_label(fit)}, {gb(kv_total)} ({per_token // 1024} KiB/token)"))
    rows.append(("flash attention", "on" if fit.flash_attn else "off"))
    for u in fit.memories:
        if not u.need and u.memory.kind != "RAM":
            continue
        parts = []
        if u.layers:
            parts.append(f"layers {layer_ranges(u.layers)}")
        if u.expert_layers:
            parts.append(f"experts of layers {layer_ranges(u.expert_layers)}")
        if u.output:
            parts.append("output")
        if u.input:
            parts.append("token embeddings")
        held = "; ".join(parts) or "nothing"
        limit = "free" if u.memory.limit == u.memory.free_bytes else "total"
        rows.append(
            (
                u.memory.name,
                f"{gb(u.weights)} weights + {gb(u.kv)} KV + {gb(u.reserve)} reserve = "
                f"{gb(u.need)} of {gb(u.memory.limit)} {limit}: {held}",
            )
        )
    reads = ", ".join(
        f"{name} {gb(n)}" + _at(_bandwidth(fit, name)) for name, n in fit.read_per_token
    )
    rows.append(("read per token", reads or "nothing"))
    if fit.decode_bound is not None:  # unknown until every bandwidth is: no row then
        bound = (
            f"~{rate_text(fit.decode_bound)} tok/s (memory bandwidth alone; llama.cpp reaches "
            "roughly 50-85% of it)"
        )
        rows.append(("decode bound", bound))
    rows += [("note", note) for note in fit.notes]
    return rows


def _bandwidth(fit: Fit, name: str) -> float | None:
    for u in fit.memories:
        if u.memory.name == name:
            return u.memory.bandwidth
    return None
