"""Where output goes: human-facing text to stderr, machine-readable results to stdout."""
from __future__ import annotations

import json
import math
import sys
from typing import Any

from rich.console import Console

err_console = Console(stderr=True)


def set_quiet(quiet: bool) -> None:
    """Silence logs and progress (errors still print)."""
    err_console.quiet = quiet


def log(message: str) -> None:
    err_console.print(message, highlight=False)


def _json_safe(value: Any) -> Any:
    # JSON has no NaN: undefined metrics become null rather than a non-standard token.
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, dict):
        return {k: _json_safe(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_json_safe(v) for v in value]
    return value


def emit_json(obj: Any, *, compact: bool = False) -> None:
    """Write one JSON document (or one JSON line when ``compact``) to stdout."""
    text = json.dumps(_json_safe(obj), indent=None if compact else 2, default=str)
    sys.stdout.write(text + "\n")
    sys.stdout.flush()
