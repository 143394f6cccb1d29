"""What a report needs, collected by eval while it holds one class's scores and maps, and written
into the run folder: per class the ROC and PR curve points (image and pixel level, at most
``MAX_CURVE_POINTS`` each), the image scores with their labels, the thresholds, and overlay
thumbnails of the k most telling images. Small and bounded: nothing is kept across classes but
these numbers and the thumbnails' PNG bytes; the report itself never recomputes a model.

Files: ``RUN/report_data.json`` (schema ``SCHEMA``) and ``RUN/thumbs/*.png``.
"""
from __future__ import annotations

import io
import math
import os
import re
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any, Mapping

import numpy as np
import torch
from PIL import Image
from scipy import ndimage

from zsadcli.atomic import atomic_path
from zsadcli.data.images import open_image
from zsadcli.data.meta import MetaItem, resolve_item_path

SCHEMA = "zsad-report-data/1"
DATA_FILE = "report_data.json"
THUMBS_DIR = "thumbs"
MAX_CURVE_POINTS = 512
THUMB_SIZE = 256
PIXEL_CURVE_BINS = 4096  # pixel curves: operating points at this many evenly spaced thresholds
GALLERIES = ("normal_high", "anomalous_low", "anomalous_high")

GT_COLOUR = (255, 255, 255)
PREDICTED_COLOUR = (255, 0, 0)


# ---------------------------------------------------------------------- curves
def _points_from_counts(neg: np.ndarray, pos: np.ndarray) -> dict[str, np.ndarray]:
    """Operating points for thresholds in descending order; ``neg``/``pos`` count the negatives and
    positives AT each threshold (a score is called anomalous when it is >= the threshold)."""
    fp, tp = np.cumsum(neg, dtype=np.float64), np.cumsum(pos, dtype=np.float64)
    n_neg, n_pos = fp[-1], tp[-1]
    fpr = np.concatenate([[0.0], fp / n_neg])
    tpr = np.concatenate([[0.0], tp / n_pos])
    called = tp + fp
    precision = np.divide(tp, called, out=np.ones_like(tp), where=called > 0)
    # PR starts at recall 0, precision 1 (sklearn's convention) so the curve spans the plot.
    return {"fpr": fpr, "tpr": tpr, "recall": np.concatenate([[0.0], tp / n_pos]),
            "precision": np.concatenate([[1.0], precision])}


def _thin(x: np.ndarray, y: np.ndarray, max_points: int) -> tuple[np.ndarray, np.ndarray]:
    """At most ``max_points`` points spread evenly along the curve's length, ends kept."""
    if len(x) <= max_points:
        return x, y
    length = np.concatenate([[0.0], np.cumsum(np.hypot(np.diff(x), np.diff(y)))])
    targets = np.linspace(0.0, length[-1], max_points)
    keep = np.unique(np.clip(np.searchsorted(length, targets), 0, len(x) - 1))
    keep[0], keep[-1] = 0, len(x) - 1
    return x[keep], y[keep]


def _rounded(values: np.ndarray) -> list[float]:
    return [float(f"{v:.6g}") for v in values]


def curve_points(labels: np.ndarray, scores: np.ndarray, *, binned: bool = False,
                 max_points: int = MAX_CURVE_POINTS) -> dict[str, list[float]] | None:
    """ROC (``fpr``, ``tpr``) and PR (``recall``, ``precision``) points of one class, at most
    ``max_points`` each; None when only one label is present (no curve exists).

    Exact (every distinct score a threshold) unless ``binned``: then the thresholds are
    ``PIXEL_CURVE_BINS`` evenly spaced values over the score range, one pass and no sort, for
    the millions of pixels of a class."""
    labels, scores = np.asarray(labels), np.asarray(scores)
    n_pos = int(np.count_nonzero(labels))
    if n_pos == 0 or n_pos == labels.size:
        return None
    if binned:
        # Chunks of the first axis (images) keep the temporaries small next to the maps themselves.
        lo, hi = float(scores.min()), float(scores.max())
        width = (hi - lo) / PIXEL_CURVE_BINS or 1.0
        total = np.zeros(PIXEL_CURVE_BINS, np.int64)
        pos = np.zeros(PIXEL_CURVE_BINS, np.int64)
        for start in range(0, scores.shape[0], 16):
            index = ((scores[start:start + 16].reshape(-1) - lo) / width).astype(np.int32)
            np.clip(index, 0, PIXEL_CURVE_BINS - 1, out=index)
            total += np.bincount(index, minlength=PIXEL_CURVE_BINS)
            pos += np.bincount(index[labels[start:start + 16].reshape(-1).astype(bool)], minlength=PIXEL_CURVE_BINS)
        neg, pos = (total - pos)[::-1], pos[::-1]
    else:
        labels, scores = labels.reshape(-1).astype(bool), scores.reshape(-1).astype(np.float64)
        distinct, group = np.unique(-scores, return_inverse=True)  # descending scores
        pos = np.bincount(group.reshape(-1), weights=labels.astype(np.float64), minlength=len(distinct))
        neg = np.bincount(group.reshape(-1), minlength=len(distinct)) - pos
    points = _points_from_counts(neg, pos)
    fpr, tpr = _thin(points["fpr"], points["tpr"], max_points)
    recall, precision = _thin(points["recall"], points["precision"], max_points)
    return {"fpr": _rounded(fpr), "tpr": _rounded(tpr), "recall": _rounded(recall), "precision": _rounded(precision)}


# ---------------------------------------------------------------------- thumbnails
def _outline(region: np.ndarray) -> np.ndarray:
    """The region's inner border, 2 px wide (visible at thumbnail size)."""
    return region & ~ndimage.binary_erosion(region, iterations=2, border_value=0)


def thumbnail_size(map_size: int) -> int:
    return min(THUMB_SIZE, map_size)


def decision_overlay(image: Image.Image, amap: np.ndarray, mask: np.ndarray | None,
                     pixel_threshold: float | None) -> Image.Image:
    """The image at thumbnail size (squashed, as the model saw it), the predicted region (map >=
    ``pixel_threshold``) tinted and outlined red, the ground truth outlined white on top."""
    size = thumbnail_size(amap.shape[-1])
    base = np.asarray(image.convert("RGB").resize((size, size), Image.BICUBIC), dtype=np.float32)
    if pixel_threshold is not None and math.isfinite(pixel_threshold):
        scaled = np.asarray(Image.fromarray(amap.astype(np.float32), mode="F").resize((size, size), Image.BILINEAR))
        predicted = scaled >= pixel_threshold
        base[predicted] = 0.6 * base[predicted] + 0.4 * np.array(PREDICTED_COLOUR, np.float32)
        base[_outline(predicted)] = PREDICTED_COLOUR
    if mask is not None and mask.any():
        truth = np.asarray(Image.fromarray(mask.astype(np.uint8) * 255).resize((size, size), Image.NEAREST)) > 0
        base[_outline(truth)] = GT_COLOUR
    return Image.fromarray(base.round().clip(0, 255).astype(np.uint8))


def png_bytes(image: Image.Image) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    return buffer.getvalue()


def extreme_indices(labels: np.ndarray, scores: np.ndarray, k: int) -> dict[str, list[int]]:
    """The k highest-scoring normal images (false alarms), the k lowest-scoring anomalous ones
    (misses) and the k highest-scoring anomalous ones; ties keep dataset order."""
    normal, anomalous = np.flatnonzero(labels == 0), np.flatnonzero(labels == 1)
    by_score = lambda idx, descending: idx[np.argsort(-scores[idx] if descending else scores[idx], kind="stable")]  # noqa: E731
    return {"normal_high": by_score(normal, True)[:k].tolist(),
            "anomalous_low": by_score(anomalous, False)[:k].tolist(),
            "anomalous_high": by_score(anomalous, True)[:k].tolist()}


def _slug(text: str) -> str:
    return re.sub(r"[^A-Za-z0-9_.-]+", "_", text).strip("._") or "x"


def _card_value(card: Any, cls: str, key: str) -> float | None:
    """``key`` of a calibration card (a mapping as loaded from its JSON, or an object with the same
    attributes): the class's own entry under ``per_class`` first, else the card-wide one."""
    def get(obj: Any, name: str) -> Any:
        return obj.get(name) if isinstance(obj, Mapping) else getattr(obj, name, None)

    if card is None:
        return None
    per_class = get(card, "per_class") or {}
    own = per_class.get(cls) if isinstance(per_class, Mapping) else None
    value = get(own, key) if own is not None else None
    value = get(card, key) if value is None else value
    return None if value is None else float(value)


# ---------------------------------------------------------------------- the collector
class ReportCollector:
    """Eval calls ``add_class`` once per class (with what it already holds) and ``write`` once at the
    end. ``card``: a calibration card; its pixel threshold (per class, else card-wide) then draws
    the predicted regions instead of each class's F1-max threshold, and its thresholds are recorded
    for the report's histogram lines."""

    def __init__(self, k: int = 8, card: Any = None) -> None:
        if k < 0:
            raise ValueError("k must be >= 0")
        self.k = k
        self.card = card
        self.datasets: dict[str, dict[str, Any]] = {}
        self._thumbs: dict[str, bytes] = {}  # file name -> PNG, written in ``write``

    def add_class(self, dataset: str, cls: str, *, root: str | Path, items: list[MetaItem], labels: np.ndarray,
                  scores: np.ndarray, maps: torch.Tensor | np.ndarray, masks: torch.Tensor | np.ndarray,
                  image_metrics: Mapping[str, Any], pixel_metrics: Mapping[str, Any]) -> None:
        labels = np.asarray(labels).astype(np.int64).reshape(-1)
        scores = np.asarray(scores, dtype=np.float64).reshape(-1)
        maps_np = maps.numpy() if isinstance(maps, torch.Tensor) else np.asarray(maps)
        masks_np = masks.numpy() if isinstance(masks, torch.Tensor) else np.asarray(masks)
        has_masks = bool(masks_np.any())
        f1_pixel = pixel_metrics.get("f1_threshold")
        card_pixel = _card_value(self.card, cls, "pixel_threshold")
        pixel_threshold = card_pixel if card_pixel is not None else f1_pixel
        thresholds = {"image_f1": image_metrics.get("f1_threshold"), "pixel_f1": f1_pixel,
                      "image_card": _card_value(self.card, cls, "image_threshold"), "pixel_card": card_pixel,
                      "pixel_drawn": pixel_threshold if pixel_threshold is not None and
                      math.isfinite(pixel_threshold) else None,
                      "pixel_drawn_from": "card" if card_pixel is not None else "f1_max"}
        extremes = extreme_indices(labels, scores, self.k)
        names = {index: f"{THUMBS_DIR}/{_slug(dataset)}__{_slug(cls)}__{index:05d}.png"
                 for indices in extremes.values() for index in indices}

        def thumbnail(index: int) -> bytes:
            image = open_image(resolve_item_path(root, items[index].img_path))
            return png_bytes(decision_overlay(image, maps_np[index], masks_np[index] if has_masks else None,
                                              thresholds["pixel_drawn"]))

        # Decoding, resizing and PNG encoding release the GIL: threads overlap them.
        with ThreadPoolExecutor(max_workers=min(8, os.cpu_count() or 1)) as pool:
            for index, png in zip(names, pool.map(thumbnail, names)):
                self._thumbs[names[index]] = png
        galleries = {gallery: [{"file": names[index], "path": items[index].img_path,
                                "specie": items[index].specie_name, "label": int(labels[index]),
                                "score": float(scores[index])} for index in indices]
                     for gallery, indices in extremes.items()}
        self.datasets.setdefault(dataset, {})[cls] = {
            "image_curve": curve_points(labels, scores),
            "pixel_curve": curve_points(masks_np, maps_np, binned=True) if has_masks else None,
            "scores": _rounded(scores), "labels": labels.tolist(),
            "thresholds": thresholds, "galleries": galleries,
        }

    def write(self, run: Path, *, wall_time_s: float, models: Mapping[str, Mapping[str, Any]]) -> Path:
        """Thumbnails, then ``report_data.json`` (each file atomically)."""
        from zsadcli.core.runs import write_json

        for name, data in self._thumbs.items():
            with atomic_path(run / name) as tmp:
                tmp.write_bytes(data)
        for stale in (run / THUMBS_DIR).glob("*.png"):  # left by an earlier eval into this folder (--force)
            if f"{THUMBS_DIR}/{stale.name}" not in self._thumbs:
                stale.unlink()
        return write_json(run / DATA_FILE, {"schema": SCHEMA, "k": self.k, "wall_time_s": wall_time_s,
                                            "max_curve_points": MAX_CURVE_POINTS,
                                            "weights": weights_digests(models), "datasets": self.datasets})


def weights_digests(models: Mapping[str, Mapping[str, Any]]) -> list[dict[str, Any]]:
    """sha256 of the weights each dataset was evaluated with (eval's model descriptions): the
    registry's pinned digest for a registry backbone, the file's own for a local file or checkpoint."""
    from zsadcli.core import hub

    registry = hub.load_registry()
    seen: dict[tuple[str, str], dict[str, Any]] = {}
    for description in models.values():
        for role in ("backbone", "checkpoint"):
            source = description.get(role)
            if not source or (role, str(source)) in seen:
                continue
            source = str(source)
            key = source.split(" (", 1)[0]
            digest = None
            if key in registry:
                entry = registry[key]
                digest = entry.sha256 or entry.sha256_prefix
            elif Path(source).is_file():
                digest = hub.file_digests(Path(source))["sha256"]
            seen[(role, source)] = {"role": role, "source": source, "sha256": digest}
    return list(seen.values())
