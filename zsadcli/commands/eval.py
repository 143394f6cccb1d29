"""`zsad eval`: per-class and mean metrics of a method on test datasets."""
from __future__ import annotations

from dataclasses import replace
from pathlib import Path
from typing import Annotated, Optional

import typer
from rich.table import Table

from zsadcli.commands.common import (DeviceOpt, JsonOpt, MethodOptions, PrecisionOpt, QuietOpt, merge_options,
                                     method_options)
from zsadcli.console import emit_json, err_console, log
from zsadcli.errors import BadInput


def _cell(value: float) -> str:
    return "n/a" if value != value else f"{value:.1f}"  # NaN != NaN


def render_result(result, title: str) -> None:
    from zsadcli.core.evaluation import IMAGE_COLUMNS, PIXEL_COLUMNS

    table = Table(title=title)
    table.add_column("class")
    for column in IMAGE_COLUMNS:
        table.add_column(f"img {column.replace('_', '-')}", justify="right")
    for column in PIXEL_COLUMNS:
        label = f"px {column.replace('_', '-')}" + (f" ({result.aupro_variant})" if column == "aupro" else "")
        table.add_column(label, justify="right")
    rows = result.rows()
    for i, row in enumerate(rows):
        cells = [_cell(row[f"image_{c}"]) for c in IMAGE_COLUMNS] + [_cell(row[f"pixel_{c}"]) for c in PIXEL_COLUMNS]
        table.add_row(row["class"], *cells, end_section=(i == len(rows) - 2))
    err_console.print(table)
    total = len(result.per_class)
    image_n, pixel_n = (result.mean[s]["auroc"]["n_classes"] for s in ("image", "pixel"))
    if image_n < total or pixel_n < total:
        log(f"mean over {image_n}/{total} classes (image) and {pixel_n}/{total} classes (pixel); "
            "undefined metrics show n/a")
    for note in result.notes:
        log(f"[yellow]note:[/] {note}")


@method_options()
def evaluate(
    ctx: typer.Context,
    test_on: Annotated[str, typer.Option("--test-on", help="Comma-separated dataset names: DATA_ROOT/<name>/meta.json.")],
    method_options: MethodOptions,
    data_root: Annotated[Path, typer.Option("--data-root", help="Folder holding one prepared dataset per name.")
                         ] = Path("data"),
    aupro: Annotated[str, typer.Option("--aupro", help="exact (MVTec definition) or compat200 (the 200-threshold "
                                                       "variant the papers' tables use) or bsr200.")] = "exact",
    batch_size: Annotated[int, typer.Option("--batch-size", help="Images per forward pass.")] = 1,
    classes: Annotated[Optional[str], typer.Option("--classes", help="Only these classes (comma-separated).",
                                                   show_default=False)] = None,
    name: Annotated[Optional[str], typer.Option("--name", help="Run name: runs/eval/NAME/.", show_default=False)] = None,
    runs_root: Annotated[Path, typer.Option("--runs", help="Where run folders go.")] = Path("runs"),
    force: Annotated[bool, typer.Option("--force", help="Overwrite an existing run folder.")] = False,
    clip_ad_transductive: Annotated[bool, typer.Option(
        "--clip-ad-transductive", help="CLIP-AD: fuse image scores with per-class min-max over the test set "
                                       "(the official, transductive protocol; reported as such).")] = False,
    device: DeviceOpt = None,
    precision: PrecisionOpt = None,
    json: JsonOpt = False,
    quiet: QuietOpt = False,
) -> None:
    """Score every class of one or more prepared datasets and write runs/eval/NAME/.

    Columns: image AUROC/AP/F1-max, pixel AUROC/AP/F1-max/AUPRO (x100); n/a where a dataset
    cannot have them (image-only or pixel-only sets). Without --checkpoint/--train-on the papers'
    protocol picks the released weights: VisA-trained for mvtec, MVTec-trained for the rest.
    """
    from zsadcli.core.engine import build_method
    from zsadcli.core.evaluation import evaluate_dataset
    from zsadcli.core.methods import get_method
    from zsadcli.core.metrics import AUPRO_VARIANTS
    from zsadcli.core.runs import environment, run_dir, write_csv, write_json
    from zsadcli.data.meta import load_meta

    opts = merge_options(ctx, device=device, precision=precision, json=json, quiet=quiet)
    method, checkpoint, train_on, class_name = (method_options.method, method_options.checkpoint,
                                                method_options.train_on, method_options.class_name)
    if aupro not in AUPRO_VARIANTS:
        raise BadInput(f"--aupro {aupro!r}: choose from {', '.join(AUPRO_VARIANTS)}.")
    if batch_size < 1:
        raise BadInput("--batch-size must be at least 1.")
    datasets = [d.strip() for d in test_on.split(",") if d.strip()]
    if not datasets:
        raise BadInput("--test-on names no dataset.")
    if method_options.model:  # an exported model names its method (and fixes its weights: no protocol)
        from zsadcli.core.runtime import read_model_card

        method = read_model_card(method_options.model, verify=False).method
    cls = get_method(method)
    metas = {d: load_meta(data_root / d) for d in datasets}  # fail on a missing meta.json before any work
    weights = checkpoint and Path(checkpoint).stem or train_on or (method_options.model and Path(method_options.model).name)
    run = run_dir("eval", name or f"{method}-{weights or 'protocol'}-{'_'.join(datasets)}", root=runs_root, force=force)
    base = method_options.spec(opts, extra_hparams={"transductive": True} if clip_ad_transductive else None)
    results, configs, built, built_for = [], {}, None, None
    for dataset in datasets:
        spec = base
        if cls.recipe is not None and not (checkpoint or train_on or method_options.model):
            chosen = cls.protocol_train_on(dataset)
            if chosen is None:
                raise BadInput(f"no released {method} weights for the protocol on {dataset}.",
                               hint="pass --checkpoint PATH or --train-on DATASET")
            spec = replace(base, train_on=chosen)
            log(f"{dataset}: protocol -> weights trained on {chosen}")
        if spec.train_on == dataset:
            log(f"[yellow]note:[/] {dataset} is the training set of these weights: not a zero-shot result")
        if built is None or built_for != spec.train_on:
            built, built_for = build_method(spec), spec.train_on
        result = evaluate_dataset(built.method, dataset, data_root / dataset, metas[dataset], batch_size=batch_size,
                                  aupro_variant=aupro, classes=classes.split(",") if classes else None,
                                  class_name=class_name)
        results.append(result)
        configs[dataset] = built.description
        if not opts.json:
            render_result(result, f"{method} on {dataset} (x100)")
    write_json(run / "metrics.json", {"method": method, "aupro_variant": aupro,
                                      "datasets": [r.to_json() for r in results]})
    write_csv(run / "per_class.csv", [row for r in results for row in r.rows()])
    write_json(run / "config.json", {"command": "eval", "test_on": datasets, "data_root": str(data_root),
                                     "batch_size": batch_size, "aupro_variant": aupro, "models": configs,
                                     "environment": environment()})
    if opts.json:
        emit_json({"run": str(run), "aupro_variant": aupro, "datasets": [r.to_json() for r in results]})
    else:
        log(f"wrote {run}/metrics.json, per_class.csv, config.json")
