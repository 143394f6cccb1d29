"""`zsad ablate`: switch a method's modules off one at a time and tabulate the effect."""
from __future__ import annotations

from pathlib import Path
from typing import Annotated, Optional

import typer
from rich.table import Table

from zsadcli.commands.common import (BatchSizeOpt, DeviceOpt, JsonOpt, MethodOptions, PrecisionOpt, QuietOpt,
                                     WorkersOpt, comma_list, merge_options, method_options)
from zsadcli.console import emit_json, esc, log, print_table
from zsadcli.errors import BadInput


@method_options(exclude={"ablate"})
def ablate(
    ctx: typer.Context,
    method_options: MethodOptions,
    list_switches: Annotated[bool, typer.Option("--list", help="List the method's ablation switches and exit.")] = False,
    test_on: Annotated[Optional[str], typer.Option("--test-on", help="Comma-separated dataset names.",
                                                   show_default=False)] = None,
    switches: Annotated[Optional[str], typer.Option("--switches", help="Only these switches (comma-separated); "
                                                                       "default: all.", show_default=False)] = None,
    data_root: Annotated[Path, typer.Option("--data-root", help="Folder holding one prepared dataset per name.")
                         ] = Path("data"),
    aupro: Annotated[str, typer.Option("--aupro", help="AUPRO variant: exact, compat200 or bsr200.")] = "exact",
    batch_size: BatchSizeOpt = 1,
    name: Annotated[Optional[str], typer.Option("--name", help="Run name: runs/ablate/NAME/.", show_default=False)] = None,
    runs_root: Annotated[Path, typer.Option("--runs", help="Where run folders go.")] = Path("runs"),
    force: Annotated[bool, typer.Option("--force", help="Overwrite an existing run folder.")] = False,
    workers: WorkersOpt = None,
    device: DeviceOpt = None,
    precision: PrecisionOpt = None,
    json: JsonOpt = False,
    quiet: QuietOpt = False,
) -> None:
    """Evaluate a method in full and with each ablation switch turned off in turn; table of class
    means (x100) and their change against the full method.

    Example: `zsad ablate --method anomalyclip --train-on mvtec --test-on visa --data-root data`.
    """
    from zsadcli.core.ablation import run_ablation
    from zsadcli.core.distributed import is_writer
    from zsadcli.core.metrics import AUPRO_VARIANTS
    from zsadcli.core.methods import get_method
    from zsadcli.core.runs import environment, run_dir, write_csv, write_json
    from zsadcli.data.meta import load_meta

    opts = merge_options(ctx, device=device, precision=precision, json=json, quiet=quiet)
    method_options.refuse_model("ablate", "it rebuilds the method with each module switched off, and an exported "
                                          "model is one fixed graph")
    method, checkpoint, train_on = method_options.method, method_options.checkpoint, method_options.train_on
    cls = get_method(method)
    if list_switches:
        if opts.json:
            emit_json(cls.ablations)
        else:
            table = Table(title=f"{esc(method)} ablation switches")
            table.add_column("switch")
            table.add_column("turns off")
            for switch, description in cls.ablations.items():
                table.add_row(switch, description)
            print_table(table)
        return
    if not test_on:
        raise BadInput("--test-on names no dataset.", hint="e.g. --test-on visa (or --list to see the switches)")
    if aupro not in AUPRO_VARIANTS:
        raise BadInput(f"--aupro {aupro!r}: choose from {', '.join(AUPRO_VARIANTS)}.")
    chosen = comma_list(switches, "--switches") if switches else list(cls.ablations)
    if not chosen:
        raise BadInput(f"{method} has no ablation switches.")
    names = comma_list(test_on, "--test-on")
    datasets = {d: (data_root / d, load_meta(data_root / d)) for d in names}
    run = run_dir("ablate", name or f"{method}-{'_'.join(names)}", root=runs_root, force=force)
    spec = method_options.spec(opts)
    if cls.recipe is not None and not (checkpoint or train_on):
        raise BadInput(f"{method} needs weights for an ablation: pass --checkpoint PATH or --train-on DATASET.")
    rows = run_ablation(spec, chosen, datasets, batch_size=batch_size, aupro_variant=aupro,
                        class_name=method_options.class_name, workers=workers)
    if not is_writer():
        return
    write_json(run / "ablation.json", {"method": method, "aupro_variant": aupro, "rows": [r.to_json() for r in rows],
                                       "environment": environment()})
    write_csv(run / "ablation.csv", [{"variant": r.variant, "dataset": r.dataset, **r.means,
                                      **{f"delta_{k}": v for k, v in r.deltas.items()}} for r in rows])
    if opts.json:
        emit_json({"run": str(run), "aupro_variant": aupro, "rows": [r.to_json() for r in rows]})
        return
    for dataset in names:
        table = Table(title=f"{esc(method)} ablation on {esc(dataset)} (class means x100; change vs full)")
        table.add_column("variant")
        columns = list(rows[0].means)
        for column in columns:
            table.add_column(column.replace("image_", "img ").replace("pixel_", "px ").replace("_", "-"),
                             justify="right")
        for row in (r for r in rows if r.dataset == dataset):
            cells = []
            for column in columns:
                value, delta = row.means[column], row.deltas[column]
                if value != value:
                    cells.append("n/a")
                elif row.variant == "full":
                    cells.append(f"{value:.1f}")
                else:
                    colour = "green" if delta > 0.05 else "red" if delta < -0.05 else "dim"
                    cells.append(f"{value:.1f} [{colour}]({delta:+.1f})[/]")
            table.add_row(esc(row.variant if row.variant == "full" else f"- {row.variant}"), *cells)
        print_table(table)
    log(f"wrote {esc(run)}/ablation.json, ablation.csv")
