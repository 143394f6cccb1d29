"""`zsad weights list | download NAME | verify [NAME]`: the registry and the local cache."""
from __future__ import annotations

from typing import Annotated, Optional

import typer
from rich.table import Table

from zsadcli.commands.common import JsonOpt, QuietOpt, guard, merge_options
from zsadcli.console import emit_json, err_console, log
from zsadcli.core import hub
from zsadcli.errors import ChecksumMismatch, WeightsUnavailable

app = typer.Typer(help="List, download and verify the registered weights (weights.yaml).",
                  no_args_is_help=True)


def _render(rows: list[dict], title: str) -> None:
    table = Table(title=title)
    for column in ("key", "section", "source", "present", "verified"):
        table.add_column(column, no_wrap=column == "key", overflow="fold")
    for row in rows:
        verified = row.get("verified")
        table.add_row(row["key"], row["section"], row["source"], "yes" if row["present"] else "no",
                      "-" if verified is None else (f"yes ({row['basis']})" if verified else "[red]MISMATCH[/]"))
    err_console.print(table)
    log(f"cache: {hub.hf_cache_dir()} (Hub files), {hub.zsad_cache_dir()} (zsad files)")


@app.command("list")
@guard
def list_weights(ctx: typer.Context, json: JsonOpt = False, quiet: QuietOpt = False) -> None:
    """Every registry entry and whether it is in the local cache (no hashing, no network)."""
    opts = merge_options(ctx, json=json, quiet=quiet)
    rows = hub.status(hub.load_registry().values(), check=False)
    if opts.json:
        emit_json(rows)
    else:
        _render(rows, "zsad weights")


@app.command("download")
@guard
def download(ctx: typer.Context,
             name: Annotated[str, typer.Argument(help="A registry key (see `zsad weights list`).")],
             json: JsonOpt = False, quiet: QuietOpt = False) -> None:
    """Fetch one entry into the cache and verify its checksum (a cache hit is re-verified)."""
    opts = merge_options(ctx, json=json, quiet=quiet)
    entry = hub.get_entry(name)
    path = hub.resolve(entry)
    result = hub.verify(entry, path)
    if opts.json:
        emit_json({"key": name, "path": str(path), "verified": result.ok, "basis": result.basis})
    else:
        log(f"[green]ok[/] {name}: {path} (verified against the {result.basis})")


@app.command("verify")
@guard
def verify(ctx: typer.Context,
           name: Annotated[Optional[str], typer.Argument(help="One key; default: every cached entry.")] = None,
           json: JsonOpt = False, quiet: QuietOpt = False) -> None:
    """Re-hash cached files against the registry; exit 4 if any does not match."""
    opts = merge_options(ctx, json=json, quiet=quiet)
    entries = [hub.get_entry(name)] if name else list(hub.load_registry().values())
    rows = hub.status(entries, check=True)
    if opts.json:
        emit_json(rows)
    else:
        _render(rows, "zsad weights verify")
    bad = [r["key"] for r in rows if r.get("verified") is False]
    if bad:
        raise ChecksumMismatch(f"cached weights {', '.join(bad)} do not match the registry.",
                                   hint="delete them and run `zsad weights download NAME`")
    if name and not rows[0]["present"]:
        raise WeightsUnavailable(f"weights {name!r} are not in the cache.",
                                     hint=hub.get_entry(name).fetch_command())
