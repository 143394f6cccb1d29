"""A torch Dataset over meta.json items, with a method's own preprocessing."""
from __future__ import annotations

import os
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
