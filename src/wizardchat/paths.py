"""Where wizardchat keeps its files; WIZARDCHAT_HOME relocates all of them."""

from __future__ import annotations

import os
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


def config_file() -> Path:
    """The config file (TOML); it need not exist."""
    return config_dir() / "config.toml"


def llama_log_file() -> Path:
    """The file llama.cpp's own log goes to unless --verbose."""
    return log_dir() / "llama.log"


def sessions_dir() -> Path:
    """Saved conversations, one JSON file each."""
    return data_dir() / "sessions"


def input_history_file() -> Path:
    """The REPL's input history (up-arrow, Ctrl-R), kept across runs."""
    return data_dir() / "input-history"
