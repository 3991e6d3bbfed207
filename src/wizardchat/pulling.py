"""Getting a model onto the machine: which quant fits, progress bars, and `--model REF`."""

from __future__ import annotations

import sys
import threading
import time
from collections.abc import Callable
from pathlib import Path
from types import TracebackType
from typing import TYPE_CHECKING, TextIO

from wizardchat import hub, hubcache
from wizardchat.catalog import (
    FAMILIES,
    ModelRef,
    Quant,
    choose_quant,
    human_size,
    parse_ref,
    sort_quants,
)
from wizardchat.errors import NoModelError, UsageError

if TYPE_CHECKING:
    from rich.progress import TaskID

# A quant "fits" when its files plus the KV cache of this many tokens fit in RAM + GPU memory;
# wizardchat's default context then grows to whatever else fits.
FIT_CONTEXT = 8192
MARGIN = 2 * 1024**3  # the OS, compute buffers, the rest of the desktop
UNKNOWN_KV = 2 * 1024**3  # KV allowance for repositories outside the catalog


def machine_memory() -> tuple[int, int]:
    """(RAM total, GPU memory total) in bytes; 0 where it cannot be read."""
    from wizardchat import hardware

    ram = hardware.host_memory()[1]
    try:
        from wizardchat.engine import ggml

        gpu = sum(d.total_bytes for d in ggml.devices() if d.kind in ("GPU", "IGPU"))
    except Exception:  # no llama.cpp backend to ask: count RAM only
        gpu = 0
    return ram, gpu


def memory_budget(ref: ModelRef) -> int | None:
    """Bytes of model files this machine can hold with room for an 8K KV cache (None: unknown)."""
    ram, gpu = machine_memory()
    if ram <= 0:
        return None
    kv = ref.family.kv_bytes_per_token() * FIT_CONTEXT if ref.family else UNKNOWN_KV
    return max(0, ram + gpu - kv - MARGIN)


def quant_table(model: hub.RemoteModel, ref: ModelRef) -> tuple[list[tuple[str, ...]], str]:
    """Rows of `pull --list` (quant, size, files, fits) and the quant a plain pull would take."""
    budget = memory_budget(ref)
    default = choose_quant(model.quants, ModelRef(ref.repo, None, ref.family), budget).name
    rows: list[tuple[str, ...]] = [("QUANT", "SIZE", "FILES", "FITS", "")]
    for name in sort_quants(model.quants):
        q = model.quants[name]
        files = f"{len(q.files)} {q.layout}" + ("" if q.complete else f" (of {q.expected})")
        fits = "?" if budget is None else "yes" if q.size <= budget else "no"
        rows.append(
            (name, human_size(q.size), files, fits, "<- default" if name == default else "")
        )
    return rows, default


class LineProgress:
    """Progress as plain lines (stderr not a terminal): one when a file starts, one when done."""

    def __init__(self, out: TextIO) -> None:
        self.out = out
        self._lock = threading.Lock()

    def _say(self, text: str) -> None:
        with self._lock:
            self.out.write(text + "\n")
            self.out.flush()

    def start(self, path: str, total: int, done: int) -> None:
        resumed = f", continuing from {human_size(done)}" if done else ""
        self._say(f"downloading {path} ({human_size(total)}{resumed})")

    def advance(self, path: str, n: int) -> None:
        pass

    def finish(self, path: str) -> None:
        self._say(f"verified {path}")

    def note(self, text: str) -> None:
        self._say(text)

    def __enter__(self) -> LineProgress:
        return self

    def __exit__(self, *exc: object) -> None:
        pass


class BarProgress:
    """rich progress bars on stderr: one per file and a total, with bytes, rate and ETA."""

    def __init__(self, total: int, already: int) -> None:
        from rich.console import Console
        from rich.progress import (
            BarColumn,
            DownloadColumn,
            TextColumn,
            TimeRemainingColumn,
            TransferSpeedColumn,
        )
        from rich.progress import Progress as RichProgress

        self._progress = RichProgress(
            TextColumn("{task.description}", table_column=None),
            BarColumn(),
            DownloadColumn(),
            TransferSpeedColumn(),
            TimeRemainingColumn(),
            console=Console(stderr=True),
            refresh_per_second=8,
        )
        self._total = self._progress.add_task("total", total=total, completed=already)
        self._tasks: dict[str, TaskID] = {}
        self._lock = threading.Lock()

    def __enter__(self) -> BarProgress:
        self._progress.start()
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self._progress.stop()

    def start(self, path: str, total: int, done: int) -> None:
        with self._lock:
            name = Path(path).name
            self._tasks[path] = self._progress.add_task(name, total=total, completed=done)

    def advance(self, path: str, n: int) -> None:
        self._progress.advance(self._tasks[path], n)
        self._progress.advance(self._total, n)

    def finish(self, path: str) -> None:
        task = self._tasks[path]
        self._progress.update(task, description=f"{Path(path).name} ✓")

    def note(self, text: str) -> None:
        self._progress.console.print(text)


def pull_quant(model: hub.RemoteModel, quant: Quant, err: TextIO, *, workers: int = 4) -> Path:
    """Download a quant with progress on `err`; Ctrl-C leaves what is there for the next run."""
    snapshot = hubcache.snapshot_dir(model.repo, model.commit)
    already = sum(f.size for f in quant.files if (snapshot / f.path).is_file())
    progress: LineProgress | BarProgress = (
        BarProgress(quant.size, already) if err.isatty() else LineProgress(err)
    )
    cancel = threading.Event()
    started = time.monotonic()
    with progress:
        try:
            path = hub.pull(model, quant, progress, workers=workers, cancel=cancel)
        except KeyboardInterrupt:
            cancel.set()
            err.write("\nwizardchat: pull interrupted; run it again to continue where it stopped\n")
            raise
    seconds = time.monotonic() - started
    err.write(f"{model.repo} {quant.name}: {human_size(quant.size)} ready in {seconds:.1f} s\n")
    return path


Confirm = Callable[[str], bool]


def resolve_model(text: str, *, yes: bool, can_ask: bool, confirm: Confirm, err: TextIO) -> Path:
    """The file to load for `--model TEXT`: a path as given, or a reference found or pulled."""
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
    model = hub.list_remote(ref)
    budget = memory_budget(ref)
    quant = choose_quant(model.quants, ref, budget)
    what = f"{ref.repo} {quant.name}: {human_size(quant.size)} in {len(quant.files)} file(s)"
    if budget is not None and quant.size > budget:  # nothing fits: say so before 80 GB arrive
        what += f", more than this machine's memory can hold ({human_size(budget)})"
    if not yes:
        if not can_ask:
            raise NoModelError(
                f"{ref} is not downloaded ({what}): run `wizardchat pull {ref}` first, "
                "or pass --yes to download it now"
            )
        if not confirm(f"{ref} is not downloaded. Download {what}? [y/N] "):
            raise UsageError("not downloaded")
    return pull_quant(model, quant, err)


def confirm_on_terminal(question: str) -> bool:
    """Ask on the terminal; anything but y/yes is no."""
    sys.stderr.write(question)
    sys.stderr.flush()
    try:
        with open("/dev/tty", encoding="utf-8") as tty:
            answer = tty.readline()
    except OSError:
        answer = sys.stdin.readline() if sys.stdin and sys.stdin.isatty() else ""
    return answer.strip().lower() in ("y", "yes")


def default_ref(configured: str | None) -> str:
    """What `pull` without REF pulls: the configured model if it is a reference, else 8x22B."""
    if configured and not isinstance(parse_ref(configured), Path):
        return configured
    return next(iter(FAMILIES))
