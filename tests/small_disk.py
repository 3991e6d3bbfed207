"""A nearly full disk for tests: `shutil.disk_usage` reports few bytes free under one folder.

The disk is the boundary wizardchat asks (it calls `shutil.disk_usage`); product code has no
hook for this. In process, `monkeypatch.setattr(shutil, "disk_usage", small_disk_usage(...))`.
For a `wizardchat` subprocess, `subprocess_env(...)` puts small_disk_site/ first on PYTHONPATH:
its sitecustomize.py, which Python imports at start-up, installs the same replacement there.
"""

from __future__ import annotations

import os
import shutil
from collections.abc import Callable
from pathlib import Path
from typing import Any

TESTS = Path(__file__).resolve().parent
SITE_DIR = TESTS / "small_disk_site"
FREE_VAR, UNDER_VAR = "SMALL_DISK_FREE_BYTES", "SMALL_DISK_UNDER"


def small_disk_usage(free: int, under: Path, real: Callable[..., Any] = shutil.disk_usage) -> Any:
    """`shutil.disk_usage` that reports `free` bytes free for paths in `under` (its parents too:
    the cache may not exist yet, and the nearest existing parent is what is asked about)."""
    folder = Path(under).resolve()

    def disk_usage(path: str | os.PathLike[str]) -> Any:
        usage = real(path)
        asked = Path(path).resolve()
        if asked == folder or folder.is_relative_to(asked) or asked.is_relative_to(folder):
            return usage._replace(free=free)
        return usage

    return disk_usage


def subprocess_env(free: int, under: Path) -> dict[str, str]:
    """Environment entries that make a child Python see `free` bytes free under `under`."""
    paths = [str(SITE_DIR), str(TESTS), os.environ.get("PYTHONPATH", "")]
    return {
        "PYTHONPATH": os.pathsep.join(p for p in paths if p),
        FREE_VAR: str(free),
        UNDER_VAR: str(under),
    }


def install_from_env() -> None:
    """In a child process: replace `shutil.disk_usage` if subprocess_env asked for it."""
    if FREE_VAR in os.environ and UNDER_VAR in os.environ:
        free, under = int(os.environ[FREE_VAR]), Path(os.environ[UNDER_VAR])
        shutil.disk_usage = small_disk_usage(free, under)  # type: ignore[assignment]
