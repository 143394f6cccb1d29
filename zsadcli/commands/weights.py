"""`zsad weights list | download NAME | verify [NAME]`: the registry and the local cache."""
from __future__ import annotations

from typing import Annotated, Optional

import typer
from rich.table import Table
from rich.text import Text

from zsadcli.commands.common import JsonOpt, QuietOpt, guard, merge_options
from zsadcli.console import emit_json, err_console, esc, log
from zsadcli.core import hub
from zsadcli.errors import ChecksumMismatch, WeightsUnavailable

app = typer.Typer(help="List, download and verify the registered weights (weights.yaml).",
                  no_args_is_help=True)


def _verified_cell(row: dict) -> Text:
    verified = row.get("verified")
    if verified is None:
        return Text("-")
    return Text(f"yes ({row['basis']})") if verified else Text("MISMATCH", style="red")


def _render(rows: list[dict], title: str) -> None:
    """One table; where it does not fit the terminal (80 columns), one table per section with each
    source folded under its key, so nothing is cut and no column shrinks to a letter per line."""
    table = Table(title=title)
    for column in ("key", "section", "source", "present", "verified"):
        table.add_column(column, overflow="fold")
    for row in rows:
        table.add_row(Text(row["key"]), row["section"], Text(row["source"]), "yes" if row["present"] else "no",
                      _verified_cell(row))
    if err_console.measure(table, options=err_console.options.update(width=10_000)).maximum <= err_console.width:
        err_console.print(table)
    else:
        for section in dict.fromkeys(row["section"] for row in rows):
            compact = Table(title=f"{title}: {section}", show_lines=True)
            compact.add_column("key / source", overflow="fold")
            compact.add_column("present")
            compact.add_column("verified", overflow="fold")
            for row in (r for r in rows if r["section"] == section):
                compact.add_row(Text.assemble((row["key"], "bold"), "\n", (row["source"], "dim")),
                                "yes" if row["present"] else "no", _verified_cell(row))
            err_console.print(compact)
    log(f"cache: {esc(hub.hf_cache_dir())} (Hub files), {esc(hub.zsad_cache_dir())} (zsad files)")


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
    path = hub.resolve(entry, fallback=False)  # this very file, not an alternative
    result = hub.verify(entry, path)
    if opts.json:
        emit_json({"key": name, "path": str(path), "verified": result.ok, "basis": result.basis})
    else:
        log(f"[green]ok[/] {esc(name)}: {esc(path)} (verified against the {result.basis})")


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
    bad = [r for r in rows if r.get("verified") is False]
    if bad:
        import os
        import shlex

        # the Hub cache links snapshots to blobs: the blob itself must go, or the download reuses it
        fixes = [f"rm {shlex.quote(os.path.realpath(r['path']))} && zsad weights download {shlex.quote(r['key'])}"
                 for r in bad]
        raise ChecksumMismatch(f"cached weights {', '.join(r['key'] for r in bad)} do not match the registry.",
                               hint="delete the damaged file and fetch it again: " + "; ".join(fixes))
    if name and not rows[0]["present"]:
        raise WeightsUnavailable(f"weights {name!r} are not in the cache.",
                                     hint=hub.get_entry(name).fetch_command())
