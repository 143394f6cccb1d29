"""`zsad eval`: per-class and mean metrics of a method on test datasets."""
from __future__ import annotations

import time
from dataclasses import replace
from pathlib import Path
from typing import Annotated, Optional

import typer
from rich.table import Table

from zsadcli.commands.common import (BatchSizeOpt, DeviceOpt, JsonOpt, MethodOptions, PrecisionOpt, QuietOpt,
                                     WorkersOpt, comma_list, merge_options, method_options)
from zsadcli.console import emit_json, esc, log, print_table
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
        table.add_row(esc(row["class"]), *cells, end_section=(i == len(rows) - 2))
    print_table(table)
    total = len(result.per_class)
    image_n, pixel_n = (result.mean[s]["auroc"]["n_classes"] for s in ("image", "pixel"))
    if image_n < total or pixel_n < total:
        log(f"mean over {image_n}/{total} classes (image) and {pixel_n}/{total} classes (pixel); "
            "undefined metrics show n/a")
    for note in result.notes:
        log(f"[yellow]note:[/] {esc(note)}")


DECISION_COLUMNS = (("image", "accuracy"), ("image", "precision"), ("image", "recall"), ("image", "fpr"),
                    ("pixel", "precision"), ("pixel", "recall"), ("pixel", "iou"))


def render_decisions(result, title: str) -> None:
    """The thresholded metrics of a calibration card, per class and mean."""
    table = Table(title=title)
    table.add_column("class")
    short = {"accuracy": "acc", "precision": "prec", "recall": "rec", "fpr": "fpr", "iou": "iou"}
    for side, name in DECISION_COLUMNS:
        table.add_column(f"{'img' if side == 'image' else 'px'} {short[name]}", justify="right")
    rows = result.rows()
    for i, row in enumerate(rows):
        table.add_row(esc(row["class"]), *(_cell(row.get(f"decision_{s}_{n}", float("nan")))
                                           for s, n in DECISION_COLUMNS), end_section=(i == len(rows) - 2))
    print_table(table)


@method_options()
def evaluate(
    ctx: typer.Context,
    test_on: Annotated[str, typer.Option("--test-on", help="Comma-separated dataset names: DATA_ROOT/<name>/meta.json.")],
    method_options: MethodOptions,
    data_root: Annotated[Path, typer.Option("--data-root", help="Folder holding one prepared dataset per name.")
                         ] = Path("data"),
    aupro: Annotated[str, typer.Option("--aupro", help="exact (MVTec definition) or compat200 (the 200-threshold "
                                                       "variant the papers' tables use) or bsr200.")] = "exact",
    batch_size: BatchSizeOpt = 1,
    classes: Annotated[Optional[str], typer.Option("--classes", help="Only these classes (comma-separated).",
                                                   show_default=False)] = None,
    name: Annotated[Optional[str], typer.Option("--name", help="Run name: runs/eval/NAME/.", show_default=False)] = None,
    runs_root: Annotated[Path, typer.Option("--runs", help="Where run folders go.")] = Path("runs"),
    force: Annotated[bool, typer.Option("--force", help="Overwrite an existing run folder.")] = False,
    resume: Annotated[bool, typer.Option("--resume", help="Go on with an interrupted run (same --name and options): "
                                                          "finished classes are not scored again.")] = False,
    workers: WorkersOpt = None,
    clip_ad_transductive: Annotated[bool, typer.Option(
        "--clip-ad-transductive", help="CLIP-AD: fuse image scores with per-class min-max over the test set "
                                       "(the official, transductive protocol; reported as such).")] = False,
    calibration: Annotated[Optional[Path], typer.Option(
        "--calibration", help="A calibration card: adds accuracy/precision/recall/FPR at its image threshold and "
                              "pixel precision/recall/IoU at its pixel threshold.", show_default=False)] = None,
    report: Annotated[bool, typer.Option(
        "--report", help="Also keep curves, scores and thumbnails in the run folder and write "
                         "runs/eval/NAME/report.html (needs zsad[report]).")] = False,
    report_k: Annotated[int, typer.Option("--report-k", help="Report galleries: this many images each.")] = 8,
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
    from zsadcli.core.calibration import check_card_fits, decision_hook, decision_mean, load_card
    from zsadcli.core.distributed import is_writer
    from zsadcli.core.engine import build_method
    from zsadcli.core.evaluation import evaluate_dataset
    from zsadcli.core.resumable import ClassResults
    from zsadcli.core.methods import get_method
    from zsadcli.core.metrics import AUPRO_VARIANTS
    from zsadcli.core.report import require_report_extra, write_eval_report
    from zsadcli.core.report_data import ReportCollector
    from zsadcli.core.runs import environment, results_kept, run_dir, write_csv, write_json
    from zsadcli.data.meta import load_meta

    started = time.perf_counter()
    opts = merge_options(ctx, device=device, precision=precision, json=json, quiet=quiet)
    method, checkpoint, train_on, class_name = (method_options.method, method_options.checkpoint,
                                                method_options.train_on, method_options.class_name)
    if aupro not in AUPRO_VARIANTS:
        raise BadInput(f"--aupro {aupro!r}: choose from {', '.join(AUPRO_VARIANTS)}.")
    if batch_size < 1:
        raise BadInput("--batch-size must be at least 1.")
    if report_k < 0:
        raise BadInput("--report-k must be at least 0.")
    if report:
        require_report_extra()
    if report and resume:  # finished classes come back as numbers only: no curves or thumbnails to report
        raise BadInput("--report cannot be combined with --resume: the classes finished before the interruption "
                       "kept their metrics but not the curves and thumbnails a report shows.",
                       hint="resume without --report; `zsad report RUN_DIR` then writes the tables, or rerun with "
                            "--report --force for the full page")
    card = load_card(calibration) if calibration else None
    collector = ReportCollector(k=report_k, card=card) if report else None
    datasets = comma_list(test_on, "--test-on")
    if not datasets:
        raise BadInput("--test-on names no dataset.")
    if method_options.model:  # an exported model names its method (and fixes its weights: no protocol)
        from zsadcli.core.runtime import read_model_card

        method = read_model_card(method_options.model, verify=False).method
    cls = get_method(method)
    metas = {d: load_meta(data_root / d) for d in datasets}  # fail on a missing meta.json before any work
    weights = (checkpoint and Path(checkpoint).stem or train_on
               or (method_options.model and Path(method_options.model).name))
    run = run_dir("eval", name or f"{method}-{weights or 'protocol'}-{'_'.join(datasets)}", root=runs_root,
                  force=force, resume=resume)
    base = method_options.spec(opts, extra_hparams={"transductive": True} if clip_ad_transductive else None)
    options = {k: v for k, v in vars(method_options).items() if k != "given"}  # what was given varies, not what is
    store = ClassResults(run, {"test_on": datasets, "data_root": str(data_root), "aupro": aupro, "classes": classes,
                               "batch_size": batch_size, "precision": opts.precision, "method": options,
                               "clip_ad_transductive": clip_ad_transductive, "calibration": card}, resume=resume)
    results, configs, built, built_for = [], {}, None, None
    for dataset in datasets:
        spec = base
        if cls.recipe is not None and not (checkpoint or train_on or method_options.model):
            chosen = cls.protocol_train_on(dataset)
            if chosen is None:
                raise BadInput(f"no released {method} weights for the protocol on {dataset}.",
                               hint="pass --checkpoint PATH or --train-on DATASET")
            spec = replace(base, train_on=chosen)
            log(f"{esc(dataset)}: protocol -> weights trained on {esc(chosen)}")
        if dataset in (spec.train_on or "").split(","):  # also a training pair such as mvtec,colondb
            log(f"[yellow]note:[/] {esc(dataset)} is the training set of these weights: not a zero-shot result")
        if built is None or built_for != spec.train_on:
            built, built_for = build_method(spec), spec.train_on
            if card is not None:
                check_card_fits(card, calibration, built.description)
        result = evaluate_dataset(built.method, dataset, data_root / dataset, metas[dataset], batch_size=batch_size,
                                  aupro_variant=aupro, classes=comma_list(classes, "--classes") or None,
                                  class_name=class_name, class_hook=decision_hook(card) if card else None,
                                  report=collector, workers=workers, store=store)
        if card is not None:
            result.mean["decision"] = decision_mean(result.per_class)
        results.append(result)
        configs[dataset] = built.description
        if not opts.json and is_writer():
            render_result(result, f"{esc(method)} on {esc(dataset)} (x100)")
            if card is not None:
                render_decisions(result, f"{esc(method)} on {esc(dataset)} at the thresholds of {esc(str(calibration))} "
                                         "(x100)")
    if not is_writer():
        return
    metrics = {"method": method, "aupro_variant": aupro, "datasets": [r.to_json() for r in results]}
    with results_kept(run, metrics):  # a full disk now must not lose the computed metrics
        write_csv(run / "per_class.csv", [row for r in results for row in r.rows()])
        write_json(run / "config.json", {"command": "eval", "test_on": datasets, "data_root": str(data_root),
                                         "batch_size": batch_size, "aupro_variant": aupro, "models": configs,
                                         "calibration": str(calibration) if calibration else None,
                                         "environment": environment()})
        write_json(run / "metrics.json", metrics)  # last: the run is complete
        store.close()
        if collector is not None:
            collector.write(run, wall_time_s=time.perf_counter() - started, models=configs)
            write_eval_report([run], run / "report.html")
            log(f"wrote {esc(run)}/report.html")
    if opts.json:
        emit_json({"run": str(run), "aupro_variant": aupro, "datasets": [r.to_json() for r in results]})
    else:
        log(f"wrote {esc(run)}/metrics.json, per_class.csv, config.json")
