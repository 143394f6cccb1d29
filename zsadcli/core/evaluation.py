"""Evaluate a method on prepared datasets: per-class image and pixel metrics and class means,
computed the way the papers compute them (per class, at the model's input size, after the
method's smoothing; unweighted mean over classes)."""
from __future__ import annotations

import os
import warnings
from dataclasses import dataclass, field
from typing import Any, Callable, NamedTuple

import numpy as np
from zsadcli.core import distributed, metrics
from zsadcli.core.engine import score_items
from zsadcli.core.methods import Method
from zsadcli.core.report_data import ReportCollector
from zsadcli.core.runtime import Runner, as_runner
from zsadcli.data.dataset import MetaDataset
from zsadcli.data.meta import Meta
from zsadcli.data.validate import split_notes

IMAGE_COLUMNS = ("auroc", "ap", "f1_max")
PIXEL_COLUMNS = ("auroc", "ap", "f1_max", "aupro")


class ClassScores(NamedTuple):
    """What a method produced for one test class, as eval scores it: image scores and labels (M,),
    maps and ground-truth masks (M, S, S) at the input size."""

    scores: np.ndarray
    labels: np.ndarray
    maps: np.ndarray
    masks: np.ndarray


# Called once per class with its ClassScores; a returned dict is merged into that class's entry
# (eval's decision metrics at a calibration card, calibrate's threshold search).
ClassHook = Callable[[str, ClassScores], "dict[str, Any] | None"]


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
            out.append(row | _decision_columns(result.get("decision")))
        mean = {"dataset": self.dataset, "class": "mean", "n_images": sum(r["n_images"] for r in out),
                "n_anomalous": sum(r["n_anomalous"] for r in out)}
        mean.update({f"image_{k}": 100 * self.mean["image"][k]["mean"] for k in IMAGE_COLUMNS})
        mean.update({f"pixel_{k}": 100 * self.mean["pixel"][k]["mean"] for k in PIXEL_COLUMNS})
        if "decision" in self.mean:
            mean.update(_decision_columns({side: {k: v["mean"] for k, v in values.items()}
                                           for side, values in self.mean["decision"].items()}))
        return out + [mean]


def _decision_columns(decision: dict[str, Any] | None) -> dict[str, Any]:
    """``decision_image_accuracy``... (x100) and the thresholds themselves, for CSV and tables."""
    if not decision:
        return {}
    return {f"decision_{side}_{k}": v if k == "threshold" else 100 * v
            for side, values in decision.items() if isinstance(values, dict)
            for k, v in values.items() if isinstance(v, float)}


def evaluate_dataset(method: Method | Runner, name: str, root: str | os.PathLike, meta: Meta, *,
                     batch_size: int = 1, aupro_variant: str = "exact", classes: list[str] | None = None,
                     class_name: str | None = None, class_hook: ClassHook | None = None,
                     report: ReportCollector | None = None, workers: int | None = 0, store=None) -> DatasetResult:
    """``method``: a torch Method or an exported model's Runner. ``class_name`` fixes the object name of class-aware prompts; by default each class's own.
    ``class_hook(cls, ClassScores)`` sees each class's scores and maps; its dict joins the class's entry.
    ``report`` collects, per class, what a report of this run needs (curves, scores, thumbnails).
    ``store`` (resumable.ClassResults): finished classes are read from it and new ones saved to it
    (a resumed class keeps its metrics, hook results included, but adds nothing to ``report``).
    Under torchrun every rank scores a share of each class, rank 0 computes the metrics and every
    rank returns rank 0's result."""
    result = DatasetResult(name, aupro_variant)
    method = as_runner(method)
    method.set_dataset(name)
    undefined: dict[str, list[str]] = {"image": [], "pixel": []}
    finished = store.finished(name) if store is not None else {}
    chosen = {cls: items for cls, items in meta["test"].items() if not classes or cls in classes}
    result.notes.extend(split_notes(chosen))  # empty classes are skipped; unmasked anomalies flagged
    for cls, items in chosen.items():
        if not items:
            continue
        if cls in finished:
            result.per_class[cls] = finished[cls]
            if any(np.isnan(finished[cls]["image"][k]) for k in IMAGE_COLUMNS):
                undefined["image"].append(cls)
            if any(np.isnan(finished[cls]["pixel"][k]) for k in PIXEL_COLUMNS):
                undefined["pixel"].append(cls)
            continue
        method.set_class_name(class_name or cls)
        dataset = MetaDataset(root, items, method.preprocess, method.input_size, method.mask_resample)
        scored = score_items(method, dataset, batch_size=batch_size, workers=workers, description=f"{name}/{cls}")
        if scored is None:  # not rank 0: it computes the metrics
            continue
        label_array = scored["labels"].numpy()
        all_maps = scored["maps"]
        all_scores = method.finalize_class_scores(scored["scores"], all_maps)
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always", metrics.UndefinedMetric)
            image = metrics.image_metrics(label_array, all_scores.numpy())
            pixel = metrics.pixel_metrics(scored["masks"].numpy(), all_maps.numpy(), aupro_variant)
        if any(np.isnan(image[k]) for k in IMAGE_COLUMNS):
            undefined["image"].append(cls)
        if any(np.isnan(pixel[k]) for k in PIXEL_COLUMNS):
            undefined["pixel"].append(cls)
        for warning in caught:
            if not issubclass(warning.category, metrics.UndefinedMetric):
                warnings.warn_explicit(warning.message, warning.category, warning.filename, warning.lineno)
        if report is not None:
            report.add_class(name, cls, root=root, items=items, labels=label_array, scores=all_scores.numpy(),
                             maps=all_maps, masks=scored["masks"], image_metrics=image, pixel_metrics=pixel)
        result.per_class[cls] = {"n_images": len(label_array), "n_anomalous": int(label_array.sum()),
                                 "image": image, "pixel": pixel}
        if class_hook is not None:
            result.per_class[cls].update(class_hook(cls, ClassScores(all_scores.numpy(), label_array, all_maps.numpy(),
                                                                     scored["masks"].numpy())) or {})
        if store is not None:
            store.save(name, cls, result.per_class[cls])
    result, undefined = distributed.share((result, undefined))  # rank 0's, on every rank
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
