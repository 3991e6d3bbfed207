"""Composing a message in the user's editor ($VISUAL, $EDITOR, or a common one): /edit."""

from __future__ import annotations

import os
import shlex
import shutil
import subprocess
import tempfile
from pathlib import Path

from wizardchat.errors import WizardchatError


class EditorError(WizardchatError):
    """No editor was found, it could not start, or it failed: nothing is sent."""


def editor_command() -> list[str]:
    """$VISUAL or $EDITOR, else the first common editor found."""
    for var in ("VISUAL", "EDITOR"):
        value = os.environ.get(var, "").strip()
        if not value:
            continue
        try:
            return shlex.split(value)
        except ValueError as e:  # an unclosed quote: the chat goes on, nothing is sent
            raise EditorError(f"cannot use ${var} ({e.args[0].lower()}): {value[:60]!r}") from None
    for name in ("editor", "nano", "vim", "vi"):
        found = shutil.which(name)
        if found:
            return [found]
    raise EditorError("no editor found: set $EDITOR (e.g. export EDITOR=nano)")


def compose_in_editor(initial: str = "") -> str:
    """Open the user's editor on a temporary file and return what they saved."""
    command = editor_command()
    fd, name = tempfile.mkstemp(prefix="wizardchat-", suffix=".md")
    path = Path(name)
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            f.write(initial)
        try:
            code = subprocess.call([*command, str(path)])
        except OSError as e:
            raise EditorError(f"cannot start the editor {command[0]!r}: {e.strerror}") from None
        if code != 0:
            raise EditorError(f"the editor exited with status {code}: nothing sent")
        return path.read_text(encoding="utf-8", errors="replace")
    finally:
        path.unlink(missing_ok=True)
