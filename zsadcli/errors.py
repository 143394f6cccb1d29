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
        from rich.text import Text

        from zsadcli.console import err_console

        # Errors print even under --quiet; message and hint are plain text (file names may hold
        # [brackets], which rich would read as markup).
        quiet, err_console.quiet = err_console.quiet, False
        try:
            err_console.print(Text.assemble(("error:", "bold red"), " ", self.message), highlight=False, soft_wrap=True)
            if self.hint:
                err_console.print(Text.assemble(("hint:", "dim"), " ", self.hint), highlight=False, soft_wrap=True)
        finally:
            err_console.quiet = quiet


class BadInput(ZsadError):
    """Bad input or usage (missing file, corrupt image, unknown name...)."""

    exit_code = 2


class WriteFailed(BadInput):
    """An output could not be written (disk full, permissions changed); nothing partial is left."""

    @classmethod
    def of(cls, target, exc: OSError) -> "WriteFailed":
        reason = exc.strerror or type(exc).__name__
        return cls(f"could not write {target}: {reason}.",
                   hint="free some space or choose another output location; no partial file was left")


class NotAvailableYet(BadInput):
    """A command or option that a later release implements."""


class WeightsUnavailable(ZsadError):
    """Weights are not in the cache and cannot be downloaded (offline)."""

    exit_code = 3


class ChecksumMismatch(ZsadError):
    """A downloaded or cached file does not match its registered checksum."""

    exit_code = 4
