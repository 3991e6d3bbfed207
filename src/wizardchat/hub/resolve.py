"""Getting a model onto the machine: which quant fits, what to offer, and `--model REF`."""

from __future__ import annotations

import functools
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, TextIO

from wizardchat.errors import Declined, HubError, NoModelError
from wizardchat.hub import cache as hubcache
from wizardchat.hub import download as hub
from wizardchat.hub.catalog import (
    FAMILIES,
    Family,
    ModelRef,
    Quant,
    choose_quant,
    human_size,
    parse_ref,
    sort_quants,
)
from wizardchat.hub.progress import pull_quant
from wizardchat.plan.fit import MIN_CTX, find_fit
from wizardchat.plan.machine import Machine
from wizardchat.plan.search import DEFAULT_MARGIN, RAM_RESERVE
from wizardchat.plan.shapes import FitError, catalog_shape

if TYPE_CHECKING:
    pass

# A quant "fits" when the fit model (plan/fit.py find_fit) places it on this machine with its
# automatic context, which never goes below MIN_CTX (8K) tokens: experts in RAM where the GPUs
# are too small, with the fit model's own working memory. The load plan, doctor and bench ask
# the same function about the same Machine, so they say the same.
UNKNOWN_KV = 2 * 1024**3  # KV allowance for repositories outside the catalog
FALLBACK_FAMILY = "wizardlm2-7b"  # what runs where no 8x22B quant fits
BUDGET_STEP = 50_000_000  # how finely the largest fitting size is searched (bytes)


def describe(machine: Machine) -> str:
    """'21.0 GB RAM and no GPU', '137.4 GB RAM + 25.8 GB GPU'."""
    gpu = f" + {human_size(machine.gpu_bytes)} GPU" if machine.gpus else " and no GPU"
    return f"{human_size(machine.ram.limit)} RAM{gpu}"


def fit_kv(ref: ModelRef) -> int:
    """The KV cache a quant must leave room for: MIN_CTX tokens in f16."""
    if ref.family is None:
        return UNKNOWN_KV
    return catalog_shape(ref.family.name, 0).kv_bytes_per_token("f16", "f16") * MIN_CTX


def fits(family: Family, size: int, machine: Machine) -> bool:
    """Whether the fit model places a `size`-byte quant of `family` on `machine`.

    Its automatic context shrinks down to MIN_CTX, and whatever fits at more tokens fits at
    fewer, so asking at MIN_CTX gives the same answer at a quarter of the search.
    """
    try:
        return find_fit(catalog_shape(family.name, size), machine, n_ctx=MIN_CTX).fits
    except FitError:
        return False


@functools.lru_cache(maxsize=64)
def _planned_budget(family: Family, machine: Machine) -> int:
    """The largest quant size of `family` the fit model places here (to BUDGET_STEP bytes)."""
    lo, hi = 0, (machine.ram.limit + machine.gpu_bytes) // BUDGET_STEP + 1
    while lo < hi:  # about 15 fits of ~10 ms each
        mid = (lo + hi + 1) // 2
        if fits(family, mid * BUDGET_STEP, machine):
            lo = mid
        else:
            hi = mid - 1
    return lo * BUDGET_STEP


def memory_budget(ref: ModelRef, machine: Machine) -> int | None:
    """Bytes of model files this machine holds with an 8K KV cache, by the fit model's numbers
    (None: memory unknown). Outside the catalog, no shape: RAM + GPU less KV and reserve."""
    if machine.ram.limit <= 0:
        return None
    if ref.family is not None:
        return _planned_budget(ref.family, machine)
    reserve = RAM_RESERVE + DEFAULT_MARGIN * len(machine.gpus)
    return max(0, machine.ram.limit + machine.gpu_bytes - UNKNOWN_KV - reserve)


def size_limit(ref: ModelRef, quants: dict[str, Quant], machine: Machine) -> int | None:
    """The largest of these quants' sizes that fits `machine` (0: none does; None: memory
    unknown). In the catalog each size is asked of the fit model itself, not compared with the
    rounded budget, so `pull --list`, the load plan and doctor agree to the byte."""
    budget = memory_budget(ref, machine)
    if budget is None or ref.family is None:
        return budget
    return _largest_fitting(ref.family, tuple(sorted({q.size for q in quants.values()})), machine)


@functools.lru_cache(maxsize=64)
def _largest_fitting(family: Family, sizes: tuple[int, ...], machine: Machine) -> int:
    lo, hi = (
        0,
        len(sizes),
    )  # sizes[:lo] fit, sizes[hi:] do not: bigger never fits where smaller fails
    while lo < hi:
        mid = (lo + hi) // 2
        if fits(family, sizes[mid], machine):
            lo = mid + 1
        else:
            hi = mid
    return sizes[lo - 1] if lo else 0


def _room(ref: ModelRef, budget: int) -> str:
    return (
        f"model files up to {human_size(budget)} with an {MIN_CTX // 1024}K-token KV cache "
        f"({human_size(fit_kv(ref))}) and working memory"
    )


def budget_line(ref: ModelRef, machine: Machine) -> str:
    """The line of `pull --list` about this machine's memory."""
    budget = memory_budget(ref, machine)
    if budget is None:
        return "this machine: memory unknown, so nothing is marked as fitting"
    return f"this machine: {describe(machine)}, which hold {_room(ref, budget)}"


def quant_table(
    model: hub.RemoteModel, ref: ModelRef, machine: Machine
) -> tuple[list[tuple[str, ...]], str | None, str]:
    """Rows of `pull --list` (quant, size, files, fits), the quant a plain pull would take (None:
    none fits, a plain pull refuses), and the line about this machine's budget."""
    limit = size_limit(ref, model.quants, machine)
    chosen = choose_quant(model.quants, ModelRef(ref.repo, None, ref.family), limit)
    default = None if limit is not None and chosen.size > limit else chosen.name
    rows: list[tuple[str, ...]] = [("QUANT", "SIZE", "FILES", "FITS", "")]
    for name in sort_quants(model.quants):
        q = model.quants[name]
        files = f"{len(q.files)} {q.layout}" + ("" if q.complete else f" (of {q.expected})")
        fits = "?" if limit is None else "yes" if q.size <= limit else "no"
        rows.append(
            (name, human_size(q.size), files, fits, "<- default" if name == default else "")
        )
    return rows, default, budget_line(ref, machine)


@dataclass(frozen=True)
class Download:
    """A quant that could be pulled, and whether it fits the machine."""

    ref: ModelRef  # the reference with the quant named
    model: hub.RemoteModel
    quant: Quant
    limit: int | None  # size_limit: the largest size of the repository's quants that fits

    @property
    def fits(self) -> bool:
        """Whether it fits (an unknown memory counts as fitting: nothing to say otherwise)."""
        return self.limit is None or self.quant.size <= self.limit

    @property
    def what(self) -> str:
        """'MaziyarPanahi/WizardLM-2-7B-GGUF Q8_0: 7.7 GB in 1 file(s)'."""
        return (
            f"{self.model.repo} {self.quant.name}: {human_size(self.quant.size)} "
            f"in {len(self.quant.files)} file(s)"
        )


def _download(ref: ModelRef, model: hub.RemoteModel, machine: Machine) -> Download:
    limit = size_limit(ref, model.quants, machine)
    quant = choose_quant(model.quants, ref, limit)
    return Download(ModelRef(ref.repo, quant.name, ref.family), model, quant, limit)


def what_runs(wanted: Download, machine: Machine) -> Download | None:
    """Where `wanted` does not fit: the biggest quant of the same repository that fits, else
    WizardLM-2 7B at the biggest quant that fits, else None."""
    same = _download(ModelRef(wanted.ref.repo, None, wanted.ref.family), wanted.model, machine)
    if same.fits:
        return same
    seven = FAMILIES[FALLBACK_FAMILY]
    if wanted.ref.family is seven:
        return None
    ref = ModelRef(seven.repo, None, seven)
    try:
        fallback = _download(ref, hub.list_remote(ref), machine)
    except (HubError, NoModelError):  # the hub cannot list it: there is nothing to offer
        return None
    return fallback if fallback.fits else None


def pull_choice(
    ref: ModelRef, model: hub.RemoteModel, machine: Machine, *, warn: Callable[[str], None]
) -> Download:
    """What `wizardchat pull REF` downloads: the quant named (with a warning when it does not
    fit), else the biggest that fits; with none that fits, an error that names what runs here."""
    wanted = _download(ref, model, machine)
    if wanted.fits:
        return wanted
    why = nothing_fits(wanted, machine)
    if ref.quant is not None:
        warn(f"wizardchat: warning: {why}")
        return wanted
    instead = what_runs(wanted, machine)
    advice = (
        f"`wizardchat pull {instead.ref}` gets what runs here"
        if instead
        else "`--model FILE.gguf` uses a smaller model file you have"
    )
    raise NoModelError(
        f"{why}: {advice}; `wizardchat pull {wanted.ref}` downloads {wanted.quant.name} anyway"
    )


def nothing_fits(wanted: Download, machine: Machine) -> str:
    """Why `wanted` is not offered, with the numbers."""
    complete = [q for q in wanted.model.quants.values() if q.complete]
    smallest = min(complete, key=lambda q: q.size)
    budget = memory_budget(wanted.ref, machine) or 0
    name = str(ModelRef(wanted.ref.repo, None, wanted.ref.family))
    if smallest.size > (wanted.limit or 0):
        why = (
            f"no quant of {name} fits this machine: the smallest, {smallest.name}, is "
            f"{human_size(smallest.size)}"
        )
    else:
        why = f"{wanted.ref} ({human_size(wanted.quant.size)}) does not fit this machine"
    return f"{why}, and {describe(machine)} hold {_room(wanted.ref, budget)}"


Confirm = Callable[[str], bool]


def resolve_model(
    text: str,
    *,
    yes: bool,
    can_ask: bool,
    confirm: Confirm,
    err: TextIO,
    machine: Callable[[], Machine],
) -> Path:
    """The file to load for `--model TEXT`: a path as given, or a reference found or pulled.

    What is offered must fit the machine that `machine()` describes (asked only when a download
    must be chosen: detecting GPUs loads llama.cpp's libraries); where it does not, the question
    offers what runs here instead. Answering no raises Declined (exit 0, not an error).
    """
    ref = parse_ref(text)
    if isinstance(ref, Path):
        return ref
    local = hub.resolve_local(ref)
    if local is not None:
        return local
    if hubcache.offline():
        raise NoModelError(
            f"{ref} is not in the cache ({hubcache.cache_dir()}) and HF_HUB_OFFLINE is set: "
            "unset it to download, or pass --model PATH to a .gguf file"
        )
    pull_first = f"run `wizardchat pull {ref}` first, or pass --yes to download it now"
    try:
        model = hub.list_remote(ref)
    except HubError as e:
        if yes or can_ask:
            raise
        # No terminal to ask on: the advice is to pull first, whatever the hub's state.
        raise NoModelError(f"{ref} is not downloaded: {pull_first}", hints=(str(e),)) from None
    here = machine()
    wanted = _download(ref, model, here)
    if not wanted.fits:
        chosen = _nothing_fits(
            wanted,
            here,
            named=ref.quant is not None,
            yes=yes,
            can_ask=can_ask,
            confirm=confirm,
            err=err,
        )
        return pull_quant(chosen.model, chosen.quant, err)
    if not yes:
        if not can_ask:
            raise NoModelError(f"{ref} is not downloaded ({wanted.what}): {pull_first}")
        if not confirm(f"{ref} is not downloaded. Download {wanted.what}? [y/N] "):
            raise Declined(
                f"nothing downloaded: `wizardchat pull {ref}` downloads it later, "
                "and `wizardchat run -m FILE.gguf` uses a file you have"
            )
    return pull_quant(wanted.model, wanted.quant, err)


def _nothing_fits(
    wanted: Download,
    machine: Machine,
    *,
    named: bool,
    yes: bool,
    can_ask: bool,
    confirm: Confirm,
    err: TextIO,
) -> Download:
    """What to pull when `wanted` does not fit: what runs here, if the user takes it on the
    terminal; `wanted` itself only when named with its quant and --yes, or confirmed anyway."""
    why = nothing_fits(wanted, machine)
    if yes and named:
        err.write(f"wizardchat: warning: {why}\n")
        return wanted  # named with its quant and --yes: the user decided
    instead = what_runs(wanted, machine)
    if yes or not can_ask:
        advice = (
            f"`wizardchat pull {instead.ref}` gets what runs here"
            if instead
            else "`--model FILE.gguf` uses a smaller model file you have"
        )
        raise NoModelError(f"{wanted.ref} is not downloaded, and {why}: {advice}")
    err.write(f"{why}\n")
    if instead is not None:
        if confirm(f"Download {instead.ref} ({instead.what}) instead? [y/N] "):
            return instead
        raise Declined(
            f"nothing downloaded: `wizardchat run -m {instead.ref}` runs here, "
            f"`wizardchat pull {wanted.ref}` downloads {wanted.quant.name} anyway, and "
            "`wizardchat run -m FILE.gguf` uses a file you have"
        )
    if confirm(f"Download {wanted.what} anyway, more than this machine can hold? [y/N] "):
        return wanted
    raise Declined("nothing downloaded: `wizardchat run -m FILE.gguf` uses a file you have")


def default_ref(configured: str | None) -> str:
    """What `pull` without REF pulls: the configured model if it is a reference, else 8x22B."""
    if configured and not isinstance(parse_ref(configured), Path):
        return configured
    return next(iter(FAMILIES))
