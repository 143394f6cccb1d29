"""`zsad prepare DATASET ROOT`: turn a downloaded dataset into meta.json; `--list`, `--check ROOT`."""
from __future__ import annotations

from pathlib import Path
from typing import Annotated, Any, Optional

import typer
from rich.table import Table
from rich.text import Text

from zsadcli.commands.common import JsonOpt, QuietOpt, merge_options
from zsadcli.console import emit_json, err_console
from zsadcli.data.converters import CONVERTERS, Problem
from zsadcli.data.prepare import FileProblems, PrepareOutcome, prepare_dataset, problem_list, summarize
from zsadcli.data.validate import check_meta, split_notes
from zsadcli.errors import BadInput

USAGE = "usage: zsad prepare DATASET ROOT | zsad prepare --list | zsad prepare --check ROOT"


def _say(text: str) -> None:
    # markup off: file names may contain [brackets]
    err_console.print(text, markup=False, highlight=False, soft_wrap=True)


def _problems_json(problems: list[Problem]) -> list[dict[str, str]]:
    return [{"path": p.path, "reason": p.reason} for p in problems]


def _summary_table(rows: list[dict[str, Any]], title: str) -> Table:
    # Text, not markup: class names and paths come from folder names
    table = Table(title=Text(title), title_justify="left")
    table.add_column("split")
    table.add_column("class")
    for column in ("normal", "anomalous", "with mask"):
        table.add_column(column, justify="right")
    for row in rows:
        table.add_row(row["split"], Text(row["class"]), str(row["normal"]), str(row["anomalous"]),
                      str(row["with_mask"]))
    return table


def _show_list(as_json: bool) -> None:
    if as_json:
        emit_json([{"name": c.name, "description": c.description, "layout": c.layout,
                    "differences": c.differences} for c in CONVERTERS.values()])
        return
    table = Table(title="zsad prepare DATASET ROOT", title_justify="left", show_lines=True)
    table.add_column("dataset", no_wrap=True)
    table.add_column("expected layout")
    table.add_column("deliberate differences from the official script")
    for c in CONVERTERS.values():
        table.add_row(c.name, Text(c.description), Text(c.differences))
    err_console.print(table)


def _show_check(root: Path, as_json: bool) -> None:
    meta, problems = check_meta(root)
    rows = summarize(meta)
    notes = split_notes(meta["test"])  # the rule eval and train apply: empty classes skipped, unmasked flagged
    if as_json:
        emit_json({"root": str(root), "valid": not problems, "classes": rows, "problems": _problems_json(problems),
                   "notes": notes})
    else:
        err_console.print(_summary_table(rows, f"{root / 'meta.json'}"))
        for note in notes:
            _say(f"note: {note}")
    if problems:
        raise BadInput(f"{len(problems)} problem(s) in {root / 'meta.json'}:\n{problem_list(problems)}",
                       hint="regenerate it with `zsad prepare DATASET ROOT --force` or fix the files")
    _say(f"{root / 'meta.json'} is valid: every file exists and every mask matches its image.")


def _show_outcome(outcome: PrepareOutcome, dry_run: bool, as_json: bool) -> None:
    rows = summarize(outcome.meta)
    if as_json:
        emit_json({"dataset": outcome.dataset, "root": str(outcome.root), "variant": outcome.variant,
                   "dry_run": dry_run, "meta": str(outcome.meta_file) if outcome.meta_file else None,
                   "classes": rows, "warnings": outcome.warnings, "skipped": _problems_json(outcome.skipped)})
        return
    err_console.print(_summary_table(rows, f"{outcome.dataset}: {outcome.variant}"))
    for warning in outcome.warnings:
        _say(f"warning: {warning}")
    if outcome.skipped:
        _say(f"skipped {len(outcome.skipped)} file(s) (--skip-bad):\n{problem_list(outcome.skipped)}")
    if outcome.meta_file:
        _say(f"wrote {outcome.meta_file} (layout recorded in {outcome.sidecar_file})")
    else:
        _say(f"dry run: nothing written (would write {outcome.root / 'meta.json'})")


def prepare(
    ctx: typer.Context,
    dataset: Annotated[Optional[str], typer.Argument(metavar="DATASET",
        help=f"Dataset name: {', '.join(CONVERTERS)}.", show_default=False)] = None,
    root: Annotated[Optional[Path], typer.Argument(metavar="ROOT",
        help="The dataset's root folder (synthetic: where to create it).", show_default=False)] = None,
    list_: Annotated[bool, typer.Option("--list", help="List the datasets, their expected layouts and "
                                                       "deliberate differences from the official scripts.")] = False,
    check: Annotated[Optional[Path], typer.Option(
        "--check", metavar="ROOT", help="Validate ROOT/meta.json: files exist, masks readable, sizes match.",
        show_default=False)] = None,
    force: Annotated[bool, typer.Option("--force", help="Replace an existing meta.json.")] = False,
    dry_run: Annotated[bool, typer.Option("--dry-run", help="Show the summary; write nothing.")] = False,
    skip_bad: Annotated[bool, typer.Option("--skip-bad", help="Leave out (and list) images and masks with "
                                                              "problems instead of failing.")] = False,
    seed: Annotated[Optional[int], typer.Option(
        "--seed", help="Seed of the generated dataset (prepare synthetic only; default 0).", show_default=False)
    ] = None,
    json: JsonOpt = False,
    quiet: QuietOpt = False,
) -> None:
    """Write ROOT/meta.json for a downloaded dataset (`synthetic` also creates the images).

    The layout variant is detected and recorded in ROOT/.zsad-prepare.json. Pairing or file
    problems stop it (exit 2) unless --skip-bad; an existing meta.json is kept unless --force.
    """
    opts = merge_options(ctx, seed=seed, json=json, quiet=quiet)
    if list_:
        _show_list(opts.json)
    elif check is not None:
        if dataset or root:
            raise BadInput("--check takes only the dataset root.", hint=USAGE)
        _show_check(check, opts.json)
    elif dataset is None or root is None:
        raise BadInput("prepare needs a DATASET and its ROOT folder.", hint=USAGE)
    else:
        try:
            outcome = prepare_dataset(dataset, root, force=force, dry_run=dry_run, skip_bad=skip_bad,
                                      seed=opts.seed)
        except FileProblems as exc:
            if opts.json:  # every problem, not only those the message shows
                emit_json({"dataset": dataset, "root": str(root), "problems": _problems_json(exc.problems)})
            raise
        _show_outcome(outcome, dry_run, opts.json)
