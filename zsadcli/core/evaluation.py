"""Evaluate a method on prepared datasets: per-class image and pixel metrics and class means,
computed the way the papers compute them (per class, at the model's input size, after the
method's smoothing; unweighted mean over classes)."""
from __future__ import annotations

import os
import warnings
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch
from torch.utils.data import DataLoader

from zsadcli.core import metrics
from zsadcli.core.engine import run_batches
from zsadcli.core.methods import Method
from zsadcli.core.runtime import Runner, as_runner
from zsadcli.data.dataset import MetaDataset
from zsadcli.data.meta import Meta

IMAGE_COLUMNS = ("auroc", "ap", "f1_max")
PIXEL_COLUMNS = ("auroc", "ap", "f1_max", "aupro")


@dataclass
class DatasetResult:
    dataset: str
    aupro_variant: str
    per_class: dict[str, dict[str, Any]] = field(default_factory=dict)
    mean: dict[str, Any] = field(default_factory=dict)
    notes: list[str] = field(default_factory=list)

    def to_json(self) -> dict[str, Any]:
        return {"dataset": self.dataset, "aupro_variant": self.aupro_variant, "per_class": self.per_class,
                "mean": self.mean, "notes": self.notes}

    def rows(self) -> list[dict[str, Any]]:
        """Flat rows (one per class, then the mean) for CSV and tables; values x100."""
        out = []
        for cls, result in self.per_class.items():
            row = {"dataset": self.dataset, "class": cls, "n_images": result["n_images"],
                   "n_anomalous": result["n_anomalous"]}
            row.update({f"image_{k}": 100 * result["image"][k] for k in IMAGE_COLUMNS})
            row.update({f"pixel_{k}": 100 * result["pixel"][k] for k in PIXEL_COLUMNS})
            out.append(row)
        mean = {"dataset": self.dataset, "class": "mean", "n_images": sum(r["n_images"] for r in out),
                "n_anomalous": sum(r["n_anomalous"] for r in out)}
        mean.update({f"image_{k}": 100 * self.mean["image"][k]["mean"] for k in IMAGE_COLUMNS})
        mean.update({f"pixel_{k}": 100 * self.mean["pixel"][k]["mean"] for k in PIXEL_COLUMNS})
        return out + [mean]


def evaluate_dataset(method: Method | Runner, name: str, root: str | os.PathLike, meta: Meta, *, batch_size: int = 1,
                     aupro_variant: str = "exact", classes: list[str] | None = None,
                     class_name: str | None = None) -> DatasetResult:
    """``method``: a torch Method or an exported model's Runner. ``class_name`` fixes the object
    name of class-aware prompts; by default each class's own."""
    result = DatasetResult(name, aupro_variant)
    method = as_runner(method)
    method.set_dataset(name)
    undefined: dict[str, list[str]] = {"image": [], "pixel": []}
    for cls, items in meta["test"].items():
        if classes and cls not in classes:
            continue
        method.set_class_name(class_name or cls)
        dataset = MetaDataset(root, items, method.preprocess, method.input_size, method.mask_resample)
        loader = DataLoader(dataset, batch_size=batch_size, shuffle=False, num_workers=0)
        scores, labels, maps, masks = [], [], [], []
        with torch.no_grad():
            for batch, out in run_batches(method, loader, f"{name}/{cls}"):
                scores.append(out.image_score.float().cpu())
                labels.append(batch["label"])
                maps.append(out.anomaly_map.float().cpu())
                masks.append(batch["mask"])
        label_array = torch.cat(labels).numpy()
        all_maps = torch.cat(maps)
        all_scores = method.finalize_class_scores(torch.cat(scores), all_maps)
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always", metrics.UndefinedMetric)
            image = metrics.image_metrics(label_array, all_scores.numpy())
            pixel = metrics.pixel_metrics(torch.cat(masks).numpy(), all_maps.numpy(), aupro_variant)
        if any(np.isnan(image[k]) for k in IMAGE_COLUMNS):
            undefined["image"].append(cls)
        if any(np.isnan(pixel[k]) for k in PIXEL_COLUMNS):
            undefined["pixel"].append(cls)
        for warning in caught:
            if not issubclass(warning.category, metrics.UndefinedMetric):
                warnings.warn_explicit(warning.message, warning.category, warning.filename, warning.lineno)
        result.per_class[cls] = {"n_images": len(label_array), "n_anomalous": int(label_array.sum()),
                                 "image": image, "pixel": pixel}
    if not result.per_class:
        from zsadcli.errors import BadInput

        raise BadInput(f"dataset {name}: no test classes to evaluate" + (f" among {classes}" if classes else "") + ".")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", metrics.UndefinedMetric)
        result.mean = {"image": metrics.class_mean({c: r["image"] for c, r in result.per_class.items()}),
                       "pixel": metrics.class_mean({c: r["pixel"] for c, r in result.per_class.items()})}
    scores_note = method.class_scores_note()
    if scores_note:
        result.notes.append(scores_note)
    if undefined["image"]:
        result.notes.append(f"image metrics undefined (one label only) for: {', '.join(undefined['image'])}")
    if undefined["pixel"]:
        result.notes.append(f"pixel metrics undefined (no anomalous pixels / no masks) for: "
                            f"{', '.join(undefined['pixel'])}")
    return result
