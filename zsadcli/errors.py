"""Errors that end a command with a clear sentence and a documented exit code.

Exit codes (DESIGN.md): 0 ok, 1 unexpected error, 2 bad input / usage,
3 weights unavailable offline, 4 checksum mismatch.
"""
from __future__ import annotations



class ZsadError(Exception):
    """A user-facing error: one sentence naming the file and the fix; no traceback.

    Commands are wrapped by ``commands.common.guard``, which shows it and exits with
    ``exit_code`` (from the console script and under ``CliRunner`` alike).
    """

    exit_code = 1

    def __init__(self, message: str, hint: str | None = None) -> None:
        super().__init__(message)
        self.message = message
        self.hint = hint

    def show(self) -> None:
        from zsadcli.console import err_console

        err_console.print(f"[bold red]error:[/] {self.message}", highlight=False, soft_wrap=True)
        if self.hint:
            err_console.print(f"[dim]hint:[/] {self.hint}", highlight=False, soft_wrap=True)


class BadInput(ZsadError):
    """Bad input or usage (missing file, corrupt image, unknown name...)."""

    exit_code = 2


class NotAvailableYet(BadInput):
    """A command or option that a later release implements."""


class WeightsUnavailable(ZsadError):
    """Weights are not in the cache and cannot be downloaded (offline)."""

    exit_code = 3


class ChecksumMismatch(ZsadError):
    """A downloaded or cached file does not match its registered checksum."""

    exit_code = 4
