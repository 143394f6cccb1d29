"""Build a method, run it over images or datasets, train it: batching, precision, progress,
checkpointing, seeding. The engine knows the Method contract, not method internals."""
from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterator

import numpy as np
import torch
from PIL import Image
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn
from torch.utils.data import DataLoader

from zsadcli.console import err_console, esc, log
from zsadcli.core import distributed, hub
from zsadcli.core.backbone import check_input_size, load_backbone, peek_patch_size
from zsadcli.core.checkpoints import LoadedCheckpoint, load_checkpoint
from zsadcli.core.methods import Method, MethodOutput, get_method
from zsadcli.core.runtime import Runner, as_runner
from zsadcli.data.images import open_image
from zsadcli.errors import BadInput, ZsadError


def progress_bar(**kwargs) -> Progress:
    return Progress(TextColumn("[progress.description]{task.description}"), BarColumn(), MofNCompleteColumn(),
                    TimeRemainingColumn(), TextColumn("{task.fields[info]}"), console=err_console,
                    transient=True, disable=err_console.quiet or not err_console.is_terminal, **kwargs)


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
    if spec.image_size is not None:
        hparams["image_size"] = spec.image_size
    cls.check_hparam_values(spec.hparams)
    source = spec.backbone_file or spec.backbone or cls.backbone_key
    input_size = hparams.get("image_size", cls.image_size)
    patch = peek_patch_size(source)  # checked before ~1 GB of weights load, where a header tells
    if patch:
        check_input_size(input_size, patch, str(source))
    device = distributed.local_device(spec.device)  # cuda:LOCAL_RANK under torchrun
    backbone = _shared_backbone(source, cls.quick_gelu, device, spec.dtype)
    check_input_size(input_size, backbone.arch.patch_size, str(source))
    method = cls(backbone, hparams, spec.ablate)
    if checkpoint is not None and checkpoint.kind == "zsad":
        method.load_checkpoint_state(checkpoint.tensors)
    elif checkpoint is not None:
        method.import_authors_checkpoint(checkpoint.raw)
    if spec.class_name:
        method.set_class_name(spec.class_name)
    method.to(device=device, dtype=spec.dtype).eval()
    description = {"method": cls.name, "backbone": backbone.source, "checkpoint": str(checkpoint.path) if checkpoint else None,
                   "checkpoint_format": checkpoint.kind if checkpoint else None, "hparams": method.hparams,
                   "ablate": sorted(spec.ablate), "class_name": spec.class_name, "device": str(device),
                   "dtype": str(spec.dtype).replace("torch.", "")}
    return BuiltMethod(method, description)


# ---------------------------------------------------------------------- inference
@dataclass
class Prediction:
    path: Path
    image: Image.Image
    image_score: float
    anomaly_map: np.ndarray  # float32, input size x input size
    index: int = 0  # position in the input list (under torchrun each rank yields its own share)


class _ImageFiles(torch.utils.data.Dataset):
    """Paths -> (index, decoded image, preprocessed tensor); decoding runs in loader workers."""

    def __init__(self, paths: list[Path], indices: range, preprocess) -> None:
        self.paths, self.indices, self.preprocess = paths, indices, preprocess

    def __len__(self) -> int:
        return len(self.indices)

    def __getitem__(self, i: int):
        index = self.indices[i]
        image = open_image(self.paths[index])
        return index, image, self.preprocess(image)


def _collate_images(items):
    return [i for i, _, _ in items], [img for _, img, _ in items], torch.stack([t for _, _, t in items])


class _Failure:
    """A ZsadError met while loading (in a worker process or not), carried to the main loop: a
    DataLoader re-raises a worker's exception with its traceback as the message."""

    def __init__(self, error: ZsadError) -> None:
        self.kind, self.message, self.hint = type(error), error.message, error.hint


class _Guarded(torch.utils.data.Dataset):
    def __init__(self, dataset) -> None:
        self.dataset = dataset

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, index):
        try:
            return self.dataset[index]
        except ZsadError as error:
            return _Failure(error)


class _Collate:
    def __init__(self, collate) -> None:
        self.collate = collate

    def __call__(self, items):
        failure = next((item for item in items if isinstance(item, _Failure)), None)
        return failure if failure is not None else self.collate(items)


class _Loader(DataLoader):
    def __iter__(self):
        for batch in super().__iter__():
            if isinstance(batch, _Failure):
                raise batch.kind(batch.message, hint=batch.hint)
            yield batch


def make_loader(dataset, *, batch_size: int, workers: int | None, device: torch.device, collate_fn=None,
                **kwargs) -> DataLoader:
    """Batches in dataset order; ``workers`` processes decode ahead of the forward pass (0: in this
    process; None: the default), into pinned memory on CUDA. Results never depend on ``workers``;
    a bad file ends the run with its own message (exit 2) whichever process read it."""
    from torch.utils.data import default_collate

    workers = distributed.default_workers() if workers is None else workers
    loader = _Loader(_Guarded(dataset), batch_size=batch_size, num_workers=workers, pin_memory=device.type == "cuda",
                     collate_fn=_Collate(collate_fn or default_collate), **kwargs)
    return loader


@torch.no_grad()
def predict_paths(method: Method | Runner, paths: list[Path], batch_size: int = 1, workers: int | None = 0
                  ) -> Iterator[Prediction]:
    """Score images (with a torch Method or an exported model's Runner). Every image is decoded once
    up front, so a bad file stops the run (exit 2) before any output is written; images are decoded
    again batch by batch to keep memory flat. Under torchrun each rank scores its own share of whole
    batches (``Prediction.index`` says where each one stands in ``paths``)."""
    runner = as_runner(method)
    share = distributed.shard_range(len(paths), batch_size)

    def check_share() -> None:
        for index in share:
            open_image(paths[index])

    distributed.agree(check_share)
    loader = make_loader(_ImageFiles(paths, share, runner.preprocess), batch_size=batch_size, workers=workers,
                         device=runner.device, collate_fn=_collate_images)
    with progress_bar() as bar:
        task = bar.add_task("predicting", total=len(paths), info="")
        for indices, images, batch in loader:
            out = runner.run(batch)
            for offset, (index, img) in enumerate(zip(indices, images)):
                yield Prediction(paths[index], img, float(out.image_score[offset]),
                                 out.anomaly_map[offset].float().cpu().numpy(), index)
            bar.advance(task, len(indices) * distributed.world().world_size)  # rank 0's pace, for all ranks


def run_batches(method: Method | Runner, loader: DataLoader, description: str, total: int | None = None
                ) -> Iterator[tuple[dict, MethodOutput]]:
    """``total``: the items of the whole job when ``loader`` holds this rank's share (progress is
    rank 0's pace times the world size; only rank 0 shows it)."""
    runner = as_runner(method)
    pace = distributed.world().world_size if total is not None else 1
    with progress_bar() as bar:
        task = bar.add_task(esc(description), total=total if total is not None else len(loader.dataset),
                            info="")  # class names: no markup
        for batch in loader:
            yield batch, runner.run(batch["image"])
            bar.advance(task, len(batch["label"]) * pace)


@torch.no_grad()
def score_items(method: Method | Runner, dataset, *, batch_size: int, workers: int | None, description: str
                ) -> dict[str, torch.Tensor] | None:
    """Score every item of ``dataset`` (one class): {"scores", "labels", "maps", "masks"} in item
    order, on the host. Under torchrun each rank scores its share of whole batches and rank 0
    receives everything (other ranks get None); a ZsadError on any rank ends every rank."""
    share = distributed.shard_range(len(dataset), batch_size)
    device = as_runner(method).device

    def score_share() -> dict[str, torch.Tensor]:
        loader = make_loader(torch.utils.data.Subset(dataset, share), batch_size=batch_size, workers=workers,
                             device=device, shuffle=False)
        scores, labels, maps, masks = [], [], [], []
        for batch, out in run_batches(method, loader, description, total=len(dataset)):
            scores.append(out.image_score.float().cpu())
            labels.append(torch.as_tensor(batch["label"]))
            maps.append(out.anomaly_map.float().cpu())
            masks.append(batch["mask"])
        if not scores:  # more ranks than batches
            return {"scores": torch.zeros(0), "labels": torch.zeros(0, dtype=torch.long),
                    "maps": torch.zeros(0), "masks": torch.zeros(0, dtype=torch.bool)}
        return {"scores": torch.cat(scores), "labels": torch.cat(labels), "maps": torch.cat(maps),
                "masks": torch.cat(masks)}

    return distributed.gather_tensors(distributed.agree(score_share))


# ---------------------------------------------------------------------- training
STATE_FILE = "train_state.pt"


def epoch_checkpoint(run: Path, epoch: int) -> Path:
    return run / f"epoch_{epoch}.safetensors"


def train_method(method: Method, dataset, run: Path, *, epochs: int, batch_size: int, lr: float,
                 resume: bool, trained_on: str, backbone_name: str, seed: int = 0,
                 workers: int | None = 0, init: dict[str, Any] | None = None) -> list[dict[str, float]]:
    """The authors' loop: Adam on the method's trainable parameters, shuffled batches, a checkpoint
    per epoch (atomic). ``resume`` continues after the last completed epoch with the optimizer
    and RNG states saved beside it, so an interrupted run ends where an uninterrupted one would.
    ``init`` (source and sha256 of the weights training started from) goes into every checkpoint.

    Under torchrun: DistributedDataParallel over the trainable parameters (the frozen backbone is
    neither synchronised nor reduced), a DistributedSampler seeded with ``seed``, ``batch_size``
    the global batch (batch_size / world size per rank), rank 0 writes."""
    from zsadcli.core.checkpoints import save_checkpoint

    device = next(method.parameters()).device
    optimizer = method.make_optimizer(lr)
    history: list[dict[str, float]] = []
    start = 0
    state_path = run / STATE_FILE
    if resume and distributed.from_writer(state_path.is_file):  # rank 0's run folder decides
        state = torch.load(state_path, map_location="cpu", weights_only=True)
        start = int(state["epoch"])
        method.load_checkpoint_state(load_checkpoint(epoch_checkpoint(run, start)).tensors)
        method.to(device)
        optimizer = method.make_optimizer(lr)
        optimizer.load_state_dict(state["optimizer"])
        for group, wanted in zip(optimizer.param_groups, method.make_optimizer(lr).param_groups):
            group["lr"] = wanted["lr"]  # the saved state holds the old rate; an allowed change takes effect
        torch.set_rng_state(state["torch_rng"])
        history = list(state["history"])
        log(f"resuming after epoch {start} of {epochs}")
    elif resume:
        log("nothing to resume: starting from epoch 1")
    shuffle = method.recipe.shuffle if method.recipe else True
    here = distributed.world()
    model: torch.nn.Module = method
    if here.sharded:
        from torch.utils.data.distributed import DistributedSampler

        sampler = DistributedSampler(dataset, num_replicas=here.world_size, rank=here.rank, shuffle=shuffle,
                                     seed=seed)
        loader = make_loader(dataset, batch_size=batch_size // here.world_size, workers=workers, device=device,
                             sampler=sampler)
        model = distributed.data_parallel(method)
    else:
        sampler = None
        loader = make_loader(dataset, batch_size=batch_size, workers=workers, device=device, shuffle=shuffle)
    method.train()
    with progress_bar() as bar:
        for epoch in range(start + 1, epochs + 1):
            if sampler is not None:
                sampler.set_epoch(epoch)  # each epoch its own order, the same on every rank
            task = bar.add_task(f"epoch {epoch}/{epochs}", total=len(dataset), info="")
            if hasattr(dataset, "set_epoch"):  # per-epoch seeded augmentation (e.g. mosaics)
                dataset.set_epoch(epoch)
            totals: dict[str, float] = {}
            batches = 0
            for batch in loader:
                if method.uses_class_name:
                    method.set_batch_class_names(list(batch["cls_name"]))
                out = model(batch["image"].to(device, non_blocking=True))
                loss, parts = method.loss(out, batch["mask"].to(device, non_blocking=True),
                                          batch["label"].to(device, non_blocking=True))
                optimizer.zero_grad()
                loss.backward()
                optimizer.step()
                batches += 1
                for key, value in {"loss": float(loss.detach()), **parts}.items():
                    totals[key] = totals.get(key, 0.0) + value
                bar.update(task, advance=len(batch["label"]) * here.world_size,
                           info=f"loss {float(loss.detach()):.4f}")
            bar.remove_task(task)
            means = distributed.reduce_mean({k: v / max(batches, 1) for k, v in totals.items()})
            history.append({"epoch": epoch, **means})
            if here.is_writer:
                save_checkpoint(epoch_checkpoint(run, epoch), method.checkpoint_state(), method=method.name,
                                backbone=backbone_name, trained_on=trained_on, hparams=method.hparams, epoch=epoch,
                                init=init)
                from zsadcli.atomic import atomic_path

                with atomic_path(state_path) as tmp:
                    torch.save({"epoch": epoch, "optimizer": optimizer.state_dict(),
                                "torch_rng": torch.get_rng_state(), "history": history}, tmp)
            distributed.barrier()  # every rank sees the epoch's files before going on
            log(f"epoch {epoch}/{epochs}: " + ", ".join(f"{k} {v:.4f}" for k, v in means.items()))
    method.set_batch_class_names(None)
    method.eval()
    return history
