"""Typed errors and the documented exit codes; only cli/ turns them into output."""

from __future__ import annotations

from collections.abc import Sequence
from enum import IntEnum


class ExitCode(IntEnum):
    """Exit statuses of the `wizardchat` command (documented in the README)."""

    OK = 0
    ERROR = 1  # anything unexpected (run with --debug for the traceback)
    USAGE = 2  # a bad flag, value, config file or input line
    NO_MODEL = 3  # no model configured, or the path does not exist
    BAD_MODEL = 4  # the file is not a loadable GGUF (pointer, truncated, shard missing, ...)
    LOAD_FAILED = 5  # llama.cpp refused to load the model or create the context
    CONTEXT = 6  # a message does not fit in the context window
    SESSION = 7  # a saved session is missing, unreadable or corrupt
    DOWNLOAD = 8  # the hub or the network failed, a file did not verify, or the disk is too full
    OUTPUT = 9  # stdout is closed or cannot be written (disk full, I/O error)
    SERVER = 10  # the `wizardchat serve` in use stopped, died or cannot be reached
    ENDPOINT = 11  # the --endpoint server cannot be reached, refused, or broke or cut a reply
    INTERRUPTED = 130  # Ctrl-C (128 + SIGINT)


class WizardchatError(Exception):
    """An error with a one-line message meant for the user and an exit code.

    `hints` are short lines of advice shown after the message (`wizardchat: hint: ...`).
    """

    exit_code: ExitCode = ExitCode.ERROR

    def __init__(self, message: str = "", *, hints: Sequence[str] = ()) -> None:
        super().__init__(message)
        self.hints = tuple(hints)


class Declined(WizardchatError):
    """The user answered no to a question: nothing was done, which is not a failure."""

    exit_code = ExitCode.OK


class UsageError(WizardchatError):
    """A bad option value, config file or input."""

    exit_code = ExitCode.USAGE


class NoModelError(WizardchatError):
    """No model was given, or the given path does not exist."""

    exit_code = ExitCode.NO_MODEL


class BadModelError(WizardchatError):
    """The model file exists but is not a complete, supported GGUF."""

    exit_code = ExitCode.BAD_MODEL


class LoadError(WizardchatError):
    """llama.cpp could not load the model or create a context for it."""

    exit_code = ExitCode.LOAD_FAILED


class ContextError(WizardchatError):
    """A message is too long for the context window."""

    exit_code = ExitCode.CONTEXT


class SessionError(WizardchatError):
    """A saved session cannot be found, read or written."""

    exit_code = ExitCode.SESSION


class HubError(WizardchatError):
    """A download from the hub failed: network, authorization, verification or disk space."""

    exit_code = ExitCode.DOWNLOAD


class OutputError(WizardchatError):
    """The reply cannot be written: stdout is closed, or writing it failed."""

    exit_code = ExitCode.OUTPUT


class KvStateError(WizardchatError):
    """A saved KV state cannot be used or written; the chat goes on without it (never fatal:
    the conversation's text is the source of truth and is evaluated again instead)."""

    exit_code = ExitCode.SESSION


class ServerError(WizardchatError):
    """The `wizardchat serve` a client uses stopped, died mid-reply, or cannot be reached."""

    exit_code = ExitCode.SERVER


class EndpointError(WizardchatError):
    """The OpenAI-compatible server of --endpoint cannot be reached, refused a request, or
    broke, stalled or cut a reply."""

    exit_code = ExitCode.ENDPOINT
