"""Options every command accepts, both before the subcommand (``zsad --device cpu predict``)
and after it (``zsad predict --device cpu``); the later one wins."""
from __future__ import annotations

import functools
from dataclasses import dataclass, replace
from typing import Annotated, Callable, Optional, TypeVar

import typer

from zsadcli.console import set_quiet
from zsadcli.errors import ZsadError

F = TypeVar("F", bound=Callable)


def guard(command: F) -> F:
    """Turn a ZsadError into its message on stderr and its exit code (no traceback)."""

    @functools.wraps(command)
    def wrapper(*args, **kwargs):
        try:
            return command(*args, **kwargs)
        except ZsadError as exc:
            exc.show()
            raise typer.Exit(exc.exit_code) from None

    return wrapper  # type: ignore[return-value]

DeviceOpt = Annotated[Optional[str], typer.Option(
    "--device", help="auto (cuda, then mps, then cpu), cpu, cuda, cuda:N or mps.", show_default=False)]
PrecisionOpt = Annotated[Optional[str], typer.Option(
    "--precision", help="fp32 (exact, the parity setting), bf16 (fast on CPU and GPU) or fp16 (GPU).",
    show_default=False)]
SeedOpt = Annotated[Optional[int], typer.Option("--seed", help="Random seed (default: the method's recipe).",
                                                show_default=False)]
JsonOpt = Annotated[bool, typer.Option("--json", help="Machine-readable results on stdout.")]
QuietOpt = Annotated[bool, typer.Option("--quiet", "-q", help="No logs or progress bars on stderr.")]


@dataclass(frozen=True)
class GlobalOptions:
    device: str = "auto"
    precision: str = "fp32"
    seed: Optional[int] = None
    json: bool = False
    quiet: bool = False


def merge_options(ctx: typer.Context, *, device: Optional[str] = None, precision: Optional[str] = None,
                  seed: Optional[int] = None, json: bool = False, quiet: bool = False) -> GlobalOptions:
    """The root callback's options overridden by what the subcommand was given."""
    base = ctx.find_root().obj if isinstance(ctx.find_root().obj, GlobalOptions) else GlobalOptions()
    merged = replace(base,
                     device=device or base.device,
                     precision=precision or base.precision,
                     seed=seed if seed is not None else base.seed,
                     json=json or base.json,
                     quiet=quiet or base.quiet)
    set_quiet(merged.quiet)
    if device:
        from zsadcli.core.devices import resolve_device

        resolve_device(device)  # an absent device is a usage error before any work starts
    return merged
