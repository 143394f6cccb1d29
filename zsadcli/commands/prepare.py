"""`zsad prepare <dataset> <root>`: turn a downloaded dataset into meta.json."""
from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer
from rich.table import Table

from zsadcli.commands.common import JsonOpt, QuietOpt, SeedOpt, merge_options
from zsadcli.console import emit_json, err_console, log
from zsadcli.data.meta import Meta, meta_path, write_meta
from zsadcli.errors import BadInput, NotAvailableYet


def summarize(meta: Meta) -> list[dict]:
    rows = []
    for split, classes in meta.items():
        for cls, items in classes.items():
            rows.append({"split": split, "class": cls,
                         "normal": sum(1 for it in items if it.anomaly == 0),
                         "anomalous": sum(1 for it in items if it.anomaly == 1),
                         "with_mask": sum(1 for it in items if it.mask_path)})
    return rows


def render_summary(rows: list[dict], title: str) -> None:
    table = Table(title=title)
    for column in ("split", "class", "normal", "anomalous", "with mask"):
        table.add_column(column, justify="right" if column not in ("split", "class") else "left")
    for row in rows:
        table.add_row(row["split"], row["class"], str(row["normal"]), str(row["anomalous"]), str(row["with_mask"]))
    err_console.print(table)


def prepare(
    ctx: typer.Context,
    dataset: Annotated[str, typer.Argument(help="Dataset name: synthetic (more in later versions).")],
    root: Annotated[Path, typer.Argument(help="The dataset's root folder (for synthetic: where to create it).")],
    force: Annotated[bool, typer.Option("--force", help="Replace an existing meta.json.")] = False,
    seed: SeedOpt = None,
    json: JsonOpt = False,
    quiet: QuietOpt = False,
) -> None:
    """Write ROOT/meta.json for a dataset (`synthetic` also creates the images)."""
    opts = merge_options(ctx, seed=seed, json=json, quiet=quiet)
    if dataset != "synthetic":
        raise NotAvailableYet(f"dataset {dataset!r} is not available yet in this version.",
                              hint="`zsad prepare synthetic DIR` works today")
    from zsadcli.data.synthetic import generate_synthetic

    if meta_path(root).exists() and not force:
        raise BadInput(f"meta.json {meta_path(root)} already exists.", hint="pass --force to replace it")
    meta = generate_synthetic(root, seed=opts.seed or 0)
    path = write_meta(root, meta, force=force)
    rows = summarize(meta)
    if opts.json:
        emit_json({"dataset": dataset, "root": str(root), "meta": str(path), "classes": rows})
    else:
        render_summary(rows, f"{dataset}: {root}")
        log(f"wrote {path}")
