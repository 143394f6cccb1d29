"""`zsad doctor`: what this installation can run, offline."""
from __future__ import annotations

import platform

import typer
from rich.table import Table

from zsadcli import __version__
from zsadcli.commands.common import JsonOpt, QuietOpt, merge_options
from zsadcli.console import emit_json, err_console, esc
from zsadcli.core import hub


def _versions() -> dict[str, str]:
    import huggingface_hub
    import numpy
    import open_clip
    import torch

    cuda = torch.version.cuda or "none (CPU build)"
    return {"zsad": __version__, "python": platform.python_version(), "torch": torch.__version__,
            "torch CUDA": cuda, "open_clip": open_clip.__version__, "numpy": numpy.__version__,
            "huggingface_hub": huggingface_hub.__version__}


def _devices() -> list[str]:
    import torch

    found = ["cpu"]
    for i in range(torch.cuda.device_count() if torch.cuda.is_available() else 0):
        found.append(f"cuda:{i} ({torch.cuda.get_device_name(i)})")
    if getattr(torch.backends, "mps", None) and torch.backends.mps.is_available():
        found.append("mps")
    return found


def doctor(ctx: typer.Context, json: JsonOpt = False, quiet: QuietOpt = False) -> None:
    """Versions, devices, cache folders and which registry weights are present and verified.

    Works offline; hashing large cached files can take a few seconds each.
    """
    opts = merge_options(ctx, json=json, quiet=quiet)
    report = {"versions": _versions(), "devices": _devices(),
              "cache": {"hub": str(hub.hf_cache_dir()), "zsad": str(hub.zsad_cache_dir()),
                        "offline": hub.is_offline()},
              "registry": [str(p) for p in hub.registry_files()],
              "weights": hub.status(hub.load_registry().values(), check=True)}
    if opts.json:
        emit_json(report)
        return
    table = Table(title="zsad doctor", show_header=False)
    table.add_column("item", style="bold")
    table.add_column("value")
    for name, value in report["versions"].items():
        table.add_row(name, value)
    table.add_row("devices", ", ".join(report["devices"]))
    table.add_row("hub cache", esc(report["cache"]["hub"]))
    table.add_row("zsad cache", esc(report["cache"]["zsad"]))
    table.add_row("offline", "yes (HF_HUB_OFFLINE)" if report["cache"]["offline"] else "no")
    for row in report["weights"]:
        state = "missing" if not row["present"] else (
            f"present, verified ({row['basis']})" if row["verified"] else "[red]present, CHECKSUM MISMATCH[/]")
        table.add_row(f"weights {esc(row['key'])}", state)
    err_console.print(table)
