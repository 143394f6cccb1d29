"""Applying a calibration card to predictions: labels, margins and binary defect masks."""
from __future__ import annotations

import os
from pathlib import Path
from typing import Any, Mapping

import numpy as np
from PIL import Image

from zsadcli.atomic import atomic_path
from zsadcli.core.calibration import check_card_fits, load_card, thresholds_for
from zsadcli.errors import BadInput


def load_predict_card(path: str | os.PathLike | None, class_name: str | None,
                      mask_dir: str | os.PathLike | None) -> dict[str, Any] | None:
    """The card predict applies (validated before any work), or None without --calibration."""
    if path is None:
        if mask_dir is not None:
            raise BadInput("--save-mask needs a pixel threshold: pass --calibration CARD.json.",
                           hint="make a card with `zsad calibrate ... --out CARD.json`")
        if class_name is not None:
            raise BadInput("--class picks a calibration card's per-class thresholds: pass --calibration CARD.json.")
        return None
    card = load_card(path)
    thresholds_for(card, class_name, path)  # an unknown class fails now, not after the model is built
    return card


def predict_thresholds(card: Mapping[str, Any] | None, path: str | os.PathLike | None, class_name: str | None,
                       description: Mapping[str, Any], manual: float | None) -> tuple[float | None, float | None]:
    """(image, pixel) thresholds for predict: the card's (refused if made for other weights), the
    image one overridden by a manual --threshold."""
    if card is None:
        return manual, None
    check_card_fits(card, path, description)
    image_threshold, pixel_threshold = thresholds_for(card, class_name, path)
    return (image_threshold if manual is None else manual), pixel_threshold


def decision_record(image_score: float, threshold: float, pixel_threshold: float | None) -> dict[str, Any]:
    """The JSON-line fields of a decision: label, threshold, margin (score - threshold)."""
    record = {"label": "anomalous" if image_score >= threshold else "normal", "threshold": threshold,
              "margin": image_score - threshold}
    if pixel_threshold is not None:
        record["pixel_threshold"] = pixel_threshold
    return record


def defect_mask(anomaly_map: np.ndarray, pixel_threshold: float | None, size: tuple[int, int]) -> np.ndarray | None:
    """``map >= pixel_threshold`` at the map's size, brought to ``size`` (width, height) by nearest
    neighbour, so every mask pixel is the decision of the map pixel it falls in."""
    if pixel_threshold is None:
        return None
    binary = Image.fromarray((np.asarray(anomaly_map) >= pixel_threshold).astype(np.uint8) * 255)
    return np.asarray(binary.resize(size, Image.NEAREST)) > 0


def save_mask(mask: np.ndarray, target: str | os.PathLike) -> Path:
    """A single-channel PNG, 255 for defect pixels and 0 elsewhere (the layout of MVTec masks)."""
    with atomic_path(target) as tmp:
        Image.fromarray(mask.astype(np.uint8) * 255).save(tmp, format="PNG")
    return Path(target)
