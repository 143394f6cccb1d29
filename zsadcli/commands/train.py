"""`zsad train`: learn a method's prompts/adapters on an auxiliary dataset."""
from __future__ import annotations

from pathlib import Path
from typing import Annotated, Optional

import typer

from zsadcli.commands.common import (DeviceOpt, JsonOpt, MethodOptions, PrecisionOpt, QuietOpt, SeedOpt, merge_options,
                                     method_options)
from zsadcli.console import emit_json, log
from zsadcli.errors import BadInput


@method_options(exclude={"checkpoint", "train_on", "class_name", "reference", "allow_pickle", "model"})
def train(
    ctx: typer.Context,
    method_options: MethodOptions,
    on: Annotated[str, typer.Option("--on", help="Auxiliary dataset name: reads DATA_ROOT/<name>/meta.json "
                                                 "(its test split, with masks, as the papers do).")] = "mvtec",
    data_root: Annotated[Path, typer.Option("--data-root", help="Folder holding one prepared dataset per name.")
                         ] = Path("data"),
    name: Annotated[Optional[str], typer.Option("--name", help="Run name: runs/train/NAME/ (default: METHOD-ON).",
                                                show_default=False)] = None,
    epochs: Annotated[Optional[int], typer.Option("--epochs", help="Default: the authors' recipe.",
                                                  show_default=False)] = None,
    batch_size: Annotated[Optional[int], typer.Option("--batch-size", help="Default: the authors' recipe.",
                                                      show_default=False)] = None,
    lr: Annotated[Optional[float], typer.Option("--lr", help="Default: the authors' recipe.", show_default=False)] = None,
    resume: Annotated[bool, typer.Option("--resume", help="Continue an interrupted run after its last epoch.")] = False,
    force: Annotated[bool, typer.Option("--force", help="Overwrite an existing run folder.")] = False,
    runs_root: Annotated[Path, typer.Option("--runs", help="Where run folders go.")] = Path("runs"),
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
    from zsadcli.core.devices import seed_everything
    from zsadcli.core.engine import build_method, train_method
    from zsadcli.core.methods import get_method
    from zsadcli.core.runs import environment, run_dir, write_json
    from zsadcli.data.dataset import MetaDataset
    from zsadcli.data.meta import load_meta

    opts = merge_options(ctx, device=device, precision=precision, seed=seed, json=json, quiet=quiet)
    method = method_options.method
    cls = get_method(method)
    if cls.recipe is None:
        raise BadInput(f"{method} is training-free; there is nothing to train.", hint="use `zsad eval` directly")
    recipe = cls.recipe
    epochs = epochs or recipe.epochs
    batch_size = batch_size or recipe.batch_size
    lr = lr or recipe.lr
    if epochs < 1 or batch_size < 1 or lr <= 0:
        raise BadInput("--epochs and --batch-size must be at least 1 and --lr positive.")
    root = data_root / on
    meta = load_meta(root)
    items = [item for items in meta["test"].values() for item in items]
    if not items:
        raise BadInput(f"{root}/meta.json has no test items to train on.")
    run = run_dir("train", name or f"{method}-{on}", root=runs_root, force=force, resume=resume)
    seed_value = recipe.seed if opts.seed is None else opts.seed
    seed_everything(seed_value)  # before the method is built: prompt initialisation draws from it
    spec = method_options.spec(opts, require_weights=False)
    built = build_method(spec)
    built.method.set_training_dataset(on)
    dataset = MetaDataset(root, items, built.method.preprocess, built.method.input_size, built.method.mask_resample)
    config = {"command": "train", "method": built.description, "trained_on": on, "data_root": str(root),
              "items": len(items), "epochs": epochs, "batch_size": batch_size, "lr": lr,
              "betas": list(recipe.betas), "seed": seed_value, "environment": environment()}
    write_json(run / "config.json", config)
    log(f"training {method} on {on} ({len(items)} images) -> {run}")
    history = train_method(built.method, dataset, run, epochs=epochs, batch_size=batch_size, lr=lr, resume=resume,
                           trained_on=on, backbone_name=spec.backbone_file or spec.backbone or cls.backbone_key)
    write_json(run / "history.json", history)
    result = {"run": str(run), "checkpoint": str(run / f"epoch_{epochs}.safetensors"), "history": history}
    if opts.json:
        emit_json(result)
    else:
        log(f"done: {result['checkpoint']}")
