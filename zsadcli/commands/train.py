"""`zsad train`: learn a method's prompts/adapters on an auxiliary dataset."""
from __future__ import annotations

from pathlib import Path
from typing import Annotated, Optional

import typer

from zsadcli.commands.common import (DeviceOpt, JsonOpt, MethodOptions, PrecisionOpt, QuietOpt, SeedOpt, WorkersOpt,
                                     finite_float, merge_options, method_options)
from zsadcli.console import emit_json, esc, log
from zsadcli.errors import BadInput


@method_options(exclude={"checkpoint", "train_on", "class_name", "reference", "allow_pickle", "model"})
def train(
    ctx: typer.Context,
    method_options: MethodOptions,
    on: Annotated[str, typer.Option("--on", help="Auxiliary dataset name(s): reads DATA_ROOT/<name>/meta.json "
                                                 "(its test split, with masks, as the papers do); a comma list "
                                                 "(e.g. mvtec,colondb) concatenates several.")] = "mvtec",
    data_root: Annotated[Path, typer.Option("--data-root", help="Folder holding one prepared dataset per name.")
                         ] = Path("data"),
    name: Annotated[Optional[str], typer.Option("--name", help="Run name: runs/train/NAME/ (default: METHOD-ON).",
                                                show_default=False)] = None,
    epochs: Annotated[Optional[int], typer.Option("--epochs", min=1, help="Default: the authors' recipe.",
                                                  show_default=False)] = None,
    batch_size: Annotated[Optional[int], typer.Option("--batch-size", min=1, help="Default: the authors' recipe.",
                                                      show_default=False)] = None,
    lr: Annotated[Optional[float], typer.Option(
        "--lr", callback=finite_float(0.0), help="Learning rate, >= 0 (0 keeps the weights; default: the authors' "
                                                 "recipe).", show_default=False)] = None,
    init: Annotated[Optional[str], typer.Option(
        "--init", help="Start from these weights instead of the random initialisation: the authors' released "
                       "file or a zsad checkpoint (any file --checkpoint reads for the method).",
        show_default=False)] = None,
    init_train_on: Annotated[Optional[str], typer.Option(
        "--init-train-on", help="Start from the authors' released weights trained on this dataset (e.g. mvtec).",
        show_default=False)] = None,
    resume: Annotated[bool, typer.Option("--resume", help="Continue an interrupted run after its last epoch, "
                                                           "with the same options (--epochs may grow).")] = False,
    allow_changes: Annotated[bool, typer.Option(
        "--allow-changes", help="With --resume: continue although options that change what is trained differ "
                                "from the run's (listed in config.json).")] = False,
    force: Annotated[bool, typer.Option("--force", help="Overwrite an existing run folder.")] = False,
    runs_root: Annotated[Path, typer.Option("--runs", help="Where run folders go.")] = Path("runs"),
    workers: WorkersOpt = None,
    device: DeviceOpt = None,
    precision: PrecisionOpt = None,
    seed: SeedOpt = None,
    json: JsonOpt = False,
    quiet: QuietOpt = False,
) -> None:
    """Train a method on an auxiliary dataset with the authors' recipe; one checkpoint per epoch.

    Example: `zsad train --method anomalyclip --on mvtec --data-root data --name ac-mvtec`.
    Evaluate a result with `zsad eval --checkpoint runs/train/NAME/epoch_N.safetensors ...`.
    """
    from dataclasses import replace

    from zsadcli.core.devices import seed_everything
    from zsadcli.core.distributed import check_global_batch, is_writer
    from zsadcli.core.engine import build_method, train_method
    from zsadcli.core.methods import get_method
    from zsadcli.core.runs import environment, run_dir, write_json
    from zsadcli.core.training import resolve_init, resumed_config, start_point
    from zsadcli.data.dataset import auxiliary_items, concat_meta_datasets

    opts = merge_options(ctx, device=device, precision=precision, seed=seed, json=json, quiet=quiet)
    method = method_options.method
    cls = get_method(method)
    init_source = resolve_init(cls, init, init_train_on)
    if cls.recipe is None:
        raise BadInput(f"{method} is training-free; there is nothing to train.", hint="use `zsad eval` directly")
    if allow_changes and not resume:
        raise BadInput("--allow-changes only applies with --resume.")
    recipe = cls.recipe
    given_batch = batch_size is not None
    epochs = recipe.epochs_for(on) if epochs is None else epochs
    batch_size = recipe.batch_size if batch_size is None else batch_size
    lr = recipe.lr if lr is None else lr
    check_global_batch(batch_size, given=given_batch)
    notes: list[str] = []
    sources = auxiliary_items(data_root, on, notes)  # every named set's test split; fails before any work
    items = [item for _, source_items in sources for item in source_items]
    for note in notes:  # empty classes are skipped; unmasked anomalies train as normal pixels
        log(f"[yellow]note:[/] {esc(note)}")
    run = run_dir("train", name or f"{method}-{on}", root=runs_root, force=force, resume=resume)
    start_from, init_record, done = start_point(run, resume, init_source)
    seed_value = recipe.seed if opts.seed is None else opts.seed
    seed_everything(seed_value)  # before the method is built: prompt initialisation draws from it
    spec = replace(method_options.spec(opts, require_weights=False), checkpoint=start_from)
    built = build_method(spec)  # a file that does not fit the method or backbone stops here (exit 2)
    built.method.set_training_dataset(on)
    dataset = concat_meta_datasets(sources, built.method.preprocess, built.method.input_size,
                                   built.method.mask_resample)
    mosaic_rate = recipe.mosaic_rate_for(on)  # keyed by a single dataset name: one source, one MetaDataset
    if mosaic_rate > 0:
        from zsadcli.data.mosaic import MosaicDataset

        dataset = MosaicDataset(dataset, mosaic_rate, seed=seed_value)
    config = {"command": "train", "method": built.description, "trained_on": on,
              "data_root": ", ".join(str(root) for root, _ in sources),
              "items": len(items), "epochs": epochs, "batch_size": batch_size, "lr": lr,
              "betas": list(recipe.betas), "seed": seed_value, "mosaic_rate": mosaic_rate, "init": init_record,
              "environment": environment()}
    config = resumed_config(run, config, done=done, epochs=epochs, allow_changes=allow_changes)
    if is_writer():
        write_json(run / "config.json", config)
    log(f"training {esc(method)} on {esc(on)} ({len(items)} images) -> {esc(run)}"
        + (f", starting from {esc(init_record['source'])}" if init_record and not done else ""))
    history = train_method(built.method, dataset, run, epochs=epochs, batch_size=batch_size, lr=lr, resume=resume,
                           trained_on=on, backbone_name=spec.backbone_file or spec.backbone or cls.backbone_key,
                           seed=seed_value, workers=workers, init=init_record)
    if not is_writer():
        return
    write_json(run / "history.json", history)
    result = {"run": str(run), "checkpoint": str(run / f"epoch_{epochs}.safetensors"), "history": history}
    if opts.json:
        emit_json(result)
    else:
        log(f"done: {esc(result['checkpoint'])}")
