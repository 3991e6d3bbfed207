"""Where wizardchat keeps its files; WIZARDCHAT_HOME relocates all of them."""

from __future__ import annotations

import contextlib
import os
import stat
from pathlib import Path

APP = "wizardchat"


def _home() -> Path | None:
    home = os.environ.get("WIZARDCHAT_HOME")
    return Path(home).expanduser() if home else None


def config_dir() -> Path:
    """Directory of config.toml."""
    home = _home()
    if home:
        return home / "config"
    import platformdirs

    return Path(platformdirs.user_config_dir(APP))


def data_dir() -> Path:
    """Directory for models, sessions and history."""
    home = _home()
    if home:
        return home / "data"
    import platformdirs

    return Path(platformdirs.user_data_dir(APP))


def log_dir() -> Path:
    """Directory for llama.cpp's log."""
    home = _home()
    if home:
        return home / "logs"
    import platformdirs

    return Path(platformdirs.user_log_dir(APP))


def runtime_dir() -> Path:
    """Directory of what lives only while processes run: the registry of `wizardchat serve`
    servers and their sockets."""
    home = _home()
    if home:
        return home / "run"
    import warnings

    import platformdirs

    # Without XDG_RUNTIME_DIR (ssh, containers, cron) platformdirs warns, on stderr, that it
    # falls back to a private directory of its own; that fallback is what wizardchat wants.
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return Path(platformdirs.user_runtime_dir(APP))


def config_file() -> Path:
    """The config file (TOML); it need not exist."""
    return config_dir() / "config.toml"


def llama_log_file() -> Path:
    """The file llama.cpp's own log goes to unless --verbose."""
    return log_dir() / "llama.log"


def sessions_dir() -> Path:
    """Saved conversations, one JSON file each."""
    return data_dir() / "sessions"


def kv_cache_dir() -> Path:
    """The KV caches saved with sessions (chat/kv_store.py), under their size budget."""
    return data_dir() / "kv"


def input_history_file() -> Path:
    """The REPL's input history (up-arrow, Ctrl-R), kept across runs."""
    return data_dir() / "input-history"


def make_private_dir(directory: Path) -> Path:
    """Create `directory` and any missing parents readable by the user alone (0700, whatever
    the umask), and tighten `directory` itself if it exists with a looser mode.

    The data dir holds every message typed. A directory we cannot chmod (someone else's) is
    left as it is; one that cannot be created raises OSError.
    """
    missing = []
    d = directory
    while not os.path.lexists(d) and d != d.parent:
        missing.append(d)
        d = d.parent
    for d in reversed(missing):
        with contextlib.suppress(FileExistsError):
            d.mkdir(mode=0o700)  # the umask can only take bits away from 0700
    with contextlib.suppress(OSError):
        mode = directory.stat().st_mode
        if stat.S_ISDIR(mode) and stat.S_IMODE(mode) & 0o077:
            directory.chmod(0o700)
    return directory
