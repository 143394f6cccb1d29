"""A torch Dataset over meta.json items, with a method's own preprocessing."""
from __future__ import annotations

import os
from pathlib import Path
from typing import Callable

import torch
from PIL import Image
from torch.utils.data import Dataset

from zsadcli.data.images import load_mask, open_image
from zsadcli.data.meta import MetaItem, resolve_item_path
from zsadcli.data.validate import check_mask_sizes


class MetaDataset(Dataset):
    """Items -> {image, mask (bool, size x size), label, cls_name, path}.

    A normal item's mask is all zeros; an anomalous one without a usable mask path (""
    or a directory, as in image-only datasets) too — the official loaders' behaviour.
    """

    def __init__(self, root: str | os.PathLike, items: list[MetaItem],
                 preprocess: Callable[[Image.Image], torch.Tensor], size: int, mask_resample: str = "bilinear") -> None:
        self.root = root
        self.items = items
        self.preprocess = preprocess
        self.size = size
        self.mask_resample = mask_resample
        check_mask_sizes(root, items)  # a mask that does not fit its image stops the run before any compute

    def __len__(self) -> int:
        return len(self.items)

    def __getitem__(self, index: int) -> dict:
        item = self.items[index]
        path = resolve_item_path(self.root, item.img_path)
        image = self.preprocess(open_image(path))
        mask_path = resolve_item_path(self.root, item.mask_path) if item.anomaly and item.mask_path else None
        return {"image": image, "mask": load_mask(mask_path, self.size, self.mask_resample),
                "label": item.anomaly, "cls_name": item.cls_name, "path": str(path)}


def dataset_names(spec: str) -> list[str]:
    """``"mvtec,colondb"`` -> ``["mvtec", "colondb"]`` (a training pair, as AdaCLIP's recipe uses)."""
    from zsadcli.errors import BadInput

    names = [name.strip() for name in spec.split(",") if name.strip()]
    if not names or len(set(names)) != len(names):
        raise BadInput(f"--on {spec!r} must name one or more distinct datasets, comma-separated.")
    return names



def auxiliary_items(data_root: str | os.PathLike, spec: str, notes: list[str] | None = None
                    ) -> list[tuple[Path, list[MetaItem]]]:
    """(root, test items) of each dataset named in ``spec`` (DATA_ROOT/<name>/meta.json): the
    official trainers learn on the auxiliary sets' test splits. Missing or empty sets fail here;
    ``notes`` receives the split's notes (empty classes skipped, unmasked anomalies)."""
    from zsadcli.data.meta import load_meta
    from zsadcli.data.validate import split_notes
    from zsadcli.errors import BadInput

    sources = []
    for name in dataset_names(spec):
        root = Path(data_root) / name
        classes = load_meta(root)["test"]
        if notes is not None:
            notes.extend(f"{name}: {note}" for note in split_notes(classes))
        items = [item for items in classes.values() for item in items]
        if not items:
            raise BadInput(f"{root}/meta.json has no test items to train on.")
        sources.append((root, items))
    return sources


def concat_meta_datasets(sources: list[tuple[Path, list[MetaItem]]], preprocess: Callable[[Image.Image], torch.Tensor],
                         size: int, mask_resample: str = "bilinear") -> Dataset:
    """One MetaDataset per source, concatenated in order (torch's ConcatDataset, as the official code)."""
    from torch.utils.data import ConcatDataset

    parts = [MetaDataset(root, items, preprocess, size, mask_resample) for root, items in sources]
    return parts[0] if len(parts) == 1 else ConcatDataset(parts)
