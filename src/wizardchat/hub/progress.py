"""Downloading a quant with progress on stderr: rich bars on a terminal, plain lines elsewhere."""

from __future__ import annotations

import threading
import time
from pathlib import Path
from types import TracebackType
from typing import TYPE_CHECKING, TextIO

from wizardchat.hub import cache as hubcache
from wizardchat.hub import download as hub
from wizardchat.hub.catalog import Quant, human_size

if TYPE_CHECKING:
    from rich.progress import TaskID


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
