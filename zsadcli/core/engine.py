"""Build a method, run it over images or datasets, train it: batching, precision, progress,
checkpointing, seeding. The engine knows the Method contract, not method internals."""
from __future__ import annotations

import glob
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterator

import numpy as np
import torch
from PIL import Image
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn
from torch.utils.data import DataLoader

from zsadcli.console import err_console, log
from zsadcli.core import hub
from zsadcli.core.backbone import load_backbone
from zsadcli.core.checkpoints import LoadedCheckpoint, load_checkpoint
from zsadcli.core.methods import Method, MethodOutput, get_method
from zsadcli.core.runtime import Runner, as_runner
from zsadcli.data.images import IMAGE_EXTENSIONS, open_image
from zsadcli.errors import BadInput


def progress_bar(**kwargs) -> Progress:
    return Progress(TextColumn("[progress.description]{task.description}"), BarColumn(), MofNCompleteColumn(),
                    TimeRemainingColumn(), TextColumn("{task.fields[info]}"), console=err_console,
                    transient=True, disable=err_console.quiet, **kwargs)


# ---------------------------------------------------------------------- building
@dataclass
class MethodSpec:
    """Everything that decides what a method computes."""

    method: str
    backbone: str | None = None  # registry key or hf-hub:id (default: the method's)
    backbone_file: str | None = None
    checkpoint: str | None = None
    train_on: str | None = None  # picks the authors' released checkpoint
    image_size: int | None = None
    hparams: dict[str, Any] = field(default_factory=dict)
    ablate: frozenset[str] = frozenset()
    device: torch.device = field(default_factory=lambda: torch.device("cpu"))
    dtype: torch.dtype = torch.float32
    require_weights: bool = True  # False only when training from scratch
    class_name: str | None = None  # fixed object name for class-aware prompts (else per dataset class)
    allow_pickle: bool = False  # UNSAFE: whole-object pickles (BSR-CLIP's authors' files)
    model: str | None = None  # an exported model folder: it replaces everything above (core/runtime.py)
    runtime_precision: str | None = None  # its runtime's precision (None: the folder's default)


@dataclass
class BuiltMethod:
    method: Method | Runner  # a Runner (core/runtime.py) for an exported model
    description: dict[str, Any]


def _released_checkpoint(cls: type[Method], train_on: str) -> LoadedCheckpoint:
    key = cls.released.get(train_on)
    if key is None:
        raise BadInput(f"{cls.name} has no released checkpoint trained on {train_on!r}.",
                       hint=f"released: {', '.join(cls.released) or '(none)'}; or pass --checkpoint PATH")
    entry, path = hub.resolve_key(key, section="checkpoints")
    return load_checkpoint(path)


_BACKBONE_CACHE: dict[tuple, object] = {}


def _shared_backbone(source: str, quick_gelu: bool, device: torch.device, dtype: torch.dtype):
    """One frozen backbone per process for a given source, device and dtype: eval over several
    datasets and ablate's variants reuse it instead of reloading ~1 GB of weights each time.
    The dtype is part of the key: a backbone cast to bf16 is never cast back and reused as fp32."""
    key = (str(source), quick_gelu, str(device), dtype)
    if key not in _BACKBONE_CACHE:
        _BACKBONE_CACHE.clear()  # keep at most one resident
        _BACKBONE_CACHE[key] = load_backbone(source, quick_gelu=quick_gelu).to(device=device, dtype=dtype)
    return _BACKBONE_CACHE[key]


def build_method(spec: MethodSpec) -> BuiltMethod:
    if spec.model:
        from zsadcli.core.runtime import load_exported

        runner = load_exported(spec.model, spec.runtime_precision)
        return BuiltMethod(runner, runner.description)
    cls = get_method(spec.method)
    checkpoint = None
    if spec.checkpoint:
        checkpoint = load_checkpoint(spec.checkpoint, allow_pickle=spec.allow_pickle)
    elif spec.train_on:
        checkpoint = _released_checkpoint(cls, spec.train_on)
    elif cls.recipe is not None and spec.require_weights:
        raise BadInput(f"{cls.name} needs learned weights: pass --checkpoint PATH or --train-on DATASET.",
                       hint=f"released: {', '.join(cls.released) or '(none)'}; or train one with `zsad train`")
    hparams: dict[str, Any] = {}
    if checkpoint is not None and checkpoint.kind == "zsad":
        if checkpoint.method != cls.name:
            raise BadInput(f"checkpoint {checkpoint.path} belongs to method {checkpoint.method!r}, not {cls.name!r}.",
                           hint=f"use --method {checkpoint.method}, or a {cls.name} checkpoint")
        hparams.update(checkpoint.hparams)
    elif checkpoint is not None:
        checkpoint.raw = cls.read_authors_checkpoint(checkpoint, allow_pickle=spec.allow_pickle)
        implied = cls.authors_checkpoint_hparams(checkpoint.raw)
        if implied is None:
            raise BadInput(f"checkpoint {checkpoint.path} does not hold {cls.name} weights (in neither zsad's "
                           "format nor the authors').", hint="check --method and --checkpoint")
        hparams.update(implied)
    hparams.update(spec.hparams)
    if spec.class_name and not cls.uses_class_name:
        raise BadInput(f"--class-name does not apply to {cls.name}: its prompts are class-agnostic.")
    if spec.image_size:
        hparams["image_size"] = spec.image_size
    source = spec.backbone_file or spec.backbone or cls.backbone_key
    backbone = _shared_backbone(source, cls.quick_gelu, spec.device, spec.dtype)
    method = cls(backbone, hparams, spec.ablate)
    if checkpoint is not None and checkpoint.kind == "zsad":
        method.load_checkpoint_state(checkpoint.tensors)
    elif checkpoint is not None:
        method.import_authors_checkpoint(checkpoint.raw)
    if spec.class_name:
        method.set_class_name(spec.class_name)
    method.to(device=spec.device, dtype=spec.dtype).eval()
    description = {"method": cls.name, "backbone": backbone.source, "checkpoint": str(checkpoint.path) if checkpoint else None,
                   "checkpoint_format": checkpoint.kind if checkpoint else None, "hparams": method.hparams,
                   "ablate": sorted(spec.ablate), "class_name": spec.class_name, "device": str(spec.device),
                   "dtype": str(spec.dtype).replace("torch.", "")}
    return BuiltMethod(method, description)


# ---------------------------------------------------------------------- inference
def expand_inputs(inputs: list[str]) -> list[Path]:
    """Files, folders (their images, sorted) and glob patterns -> image paths, in order."""
    paths: list[Path] = []
    for spec in inputs:
        path = Path(spec)
        if path.is_dir():
            found = sorted(p for p in path.iterdir() if p.suffix.lower() in IMAGE_EXTENSIONS)
            if not found:
                raise BadInput(f"folder {path} contains no images ({', '.join(IMAGE_EXTENSIONS)}).")
            paths.extend(found)
        elif path.exists():
            paths.append(path)
        elif any(ch in spec for ch in "*?["):
            found = sorted(Path(p) for p in glob.glob(spec, recursive=True)
                           if Path(p).suffix.lower() in IMAGE_EXTENSIONS)
            if not found:
                raise BadInput(f"pattern {spec!r} matches no images.")
            paths.extend(found)
        else:
            raise BadInput(f"image {path} does not exist.", hint="give image files, folders or glob patterns")
    return paths


@dataclass
class Prediction:
    path: Path
    image: Image.Image
    image_score: float
    anomaly_map: np.ndarray  # float32, input size x input size


@torch.no_grad()
def predict_paths(method: Method | Runner, paths: list[Path], batch_size: int = 1) -> Iterator[Prediction]:
    """Score images (with a torch Method or an exported model's Runner). Every image is decoded once
    up front, so a bad file stops the run (exit 2) before any output is written; images are decoded
    again batch by batch to keep memory flat."""
    for path in paths:
        open_image(path)
    runner = as_runner(method)
    with progress_bar() as bar:
        task = bar.add_task("predicting", total=len(paths), info="")
        for start in range(0, len(paths), batch_size):
            chunk = [open_image(p) for p in paths[start:start + batch_size]]
            batch = torch.stack([runner.preprocess(img) for img in chunk])
            out = runner.run(batch)
            for offset, img in enumerate(chunk):
                yield Prediction(paths[start + offset], img, float(out.image_score[offset]),
                                 out.anomaly_map[offset].float().cpu().numpy())
            bar.advance(task, len(chunk))


def run_batches(method: Method | Runner, loader: DataLoader, description: str) -> Iterator[tuple[dict, MethodOutput]]:
    runner = as_runner(method)
    with progress_bar() as bar:
        task = bar.add_task(description, total=len(loader.dataset), info="")
        for batch in loader:
            yield batch, runner.run(batch["image"])
            bar.advance(task, len(batch["label"]))


# ---------------------------------------------------------------------- training
STATE_FILE = "train_state.pt"


def epoch_checkpoint(run: Path, epoch: int) -> Path:
    return run / f"epoch_{epoch}.safetensors"


def train_method(method: Method, dataset, run: Path, *, epochs: int, batch_size: int, lr: float,
                 resume: bool, trained_on: str, backbone_name: str) -> list[dict[str, float]]:
    """The authors' loop: Adam on the method's trainable parameters, shuffled batches, a checkpoint
    per epoch (atomic). ``resume`` continues after the last completed epoch with the optimizer
    and RNG states saved beside it, so an interrupted run ends where an uninterrupted one would."""
    from zsadcli.core.checkpoints import save_checkpoint

    device = next(method.parameters()).device
    optimizer = method.make_optimizer(lr)
    history: list[dict[str, float]] = []
    start = 0
    state_path = run / STATE_FILE
    if resume and state_path.is_file():
        state = torch.load(state_path, map_location="cpu", weights_only=True)
        start = int(state["epoch"])
        method.load_checkpoint_state(load_checkpoint(epoch_checkpoint(run, start)).tensors)
        method.to(device)
        optimizer = method.make_optimizer(lr)
        optimizer.load_state_dict(state["optimizer"])
        torch.set_rng_state(state["torch_rng"])
        history = list(state["history"])
        log(f"resuming after epoch {start} of {epochs}")
    elif resume:
        log("nothing to resume: starting from epoch 1")
    loader = DataLoader(dataset, batch_size=batch_size, shuffle=method.recipe.shuffle if method.recipe else True,
                        num_workers=0)
    method.train()
    with progress_bar() as bar:
        for epoch in range(start + 1, epochs + 1):
            task = bar.add_task(f"epoch {epoch}/{epochs}", total=len(dataset), info="")
            totals: dict[str, float] = {}
            batches = 0
            for batch in loader:
                if method.uses_class_name:
                    method.set_batch_class_names(list(batch["cls_name"]))
                out = method(batch["image"].to(device))
                loss, parts = method.loss(out, batch["mask"].to(device), batch["label"].to(device))
                optimizer.zero_grad()
                loss.backward()
                optimizer.step()
                batches += 1
                for key, value in {"loss": float(loss.detach()), **parts}.items():
                    totals[key] = totals.get(key, 0.0) + value
                bar.update(task, advance=len(batch["label"]), info=f"loss {float(loss.detach()):.4f}")
            bar.remove_task(task)
            means = {k: v / max(batches, 1) for k, v in totals.items()}
            history.append({"epoch": epoch, **means})
            save_checkpoint(epoch_checkpoint(run, epoch), method.checkpoint_state(), method=method.name,
                            backbone=backbone_name, trained_on=trained_on, hparams=method.hparams, epoch=epoch)
            from zsadcli.atomic import atomic_path

            with atomic_path(state_path) as tmp:
                torch.save({"epoch": epoch, "optimizer": optimizer.state_dict(), "torch_rng": torch.get_rng_state(),
                            "history": history}, tmp)
            log(f"epoch {epoch}/{epochs}: " + ", ".join(f"{k} {v:.4f}" for k, v in means.items()))
    method.set_batch_class_names(None)
    method.eval()
    return history
