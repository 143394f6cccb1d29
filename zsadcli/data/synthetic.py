"""A deterministic synthetic anomaly dataset in the MVTec AD layout, with exact masks.

Every test and demo uses it: no real dataset can be downloaded here. Defects are drawn as a
mask first and then painted exactly inside it, so the ground truth is pixel-exact.

Layout: ``<root>/<cls>/train/good/NNN.png``, ``<cls>/test/good/NNN.png``,
``<cls>/test/<defect>/NNN.png``, ``<cls>/ground_truth/<defect>/NNN_mask.png``.
"""
from __future__ import annotations

import os
from pathlib import Path
from typing import Callable

import numpy as np
from PIL import Image, ImageDraw

from zsadcli.data.meta import Meta, MetaItem

CLASSES = ("stripes", "checker", "disc")
DEFECTS = ("scratch", "stain", "hole")


def _stripes(rng: np.random.Generator, size: int) -> np.ndarray:
    yy, xx = np.mgrid[0:size, 0:size].astype(np.float32)
    angle = rng.uniform(0, np.pi)
    period = rng.uniform(size / 10, size / 6)
    wave = np.sin((xx * np.cos(angle) + yy * np.sin(angle)) * 2 * np.pi / period)
    base = np.array([170, 150, 110], np.float32) + rng.normal(0, 6, 3)
    img = base + 35 * wave[..., None] + rng.normal(0, 5, (size, size, 3))
    return img


def _checker(rng: np.random.Generator, size: int) -> np.ndarray:
    cell = max(4, size // 8)
    off = rng.integers(0, cell, 2)
    yy, xx = np.mgrid[0:size, 0:size]
    board = (((yy + off[0]) // cell + (xx + off[1]) // cell) % 2).astype(np.float32)
    img = np.array([90, 110, 140], np.float32) + 60 * board[..., None] + rng.normal(0, 5, (size, size, 3))
    return img


def _disc(rng: np.random.Generator, size: int) -> np.ndarray:
    yy, xx = np.mgrid[0:size, 0:size].astype(np.float32)
    cy, cx = size / 2 + rng.normal(0, size / 40, 2)
    radius = size * rng.uniform(0.30, 0.36)
    inside = ((yy - cy) ** 2 + (xx - cx) ** 2) < radius ** 2
    img = np.full((size, size, 3), 40, np.float32)
    img[inside] = np.array([200, 120, 60], np.float32) + rng.normal(0, 4, 3)
    return img + rng.normal(0, 4, (size, size, 3))


_GOOD: dict[str, Callable[[np.random.Generator, int], np.ndarray]] = {
    "stripes": _stripes, "checker": _checker, "disc": _disc}


def _defect_mask(rng: np.random.Generator, size: int, defect: str, scale: float = 1.0) -> np.ndarray:
    """A clearly visible region (~1-4% of the image at ``scale`` 1; area grows with scale^2)."""
    canvas = Image.new("L", (size, size), 0)
    draw = ImageDraw.Draw(canvas)
    lo, hi = int(size * 0.25), int(size * 0.75)
    cx, cy = rng.integers(lo, hi, 2)
    if defect == "scratch":
        length = size * rng.uniform(0.25, 0.4) * min(scale, 2.0)
        angle = rng.uniform(0, np.pi)
        dx, dy = length / 2 * np.cos(angle), length / 2 * np.sin(angle)
        draw.line([(cx - dx, cy - dy), (cx + dx, cy + dy)], fill=255, width=max(3, round(size * scale / 32)))
    elif defect == "stain":
        rx, ry = size * scale * rng.uniform(0.07, 0.12, 2)
        draw.ellipse([cx - rx, cy - ry, cx + rx, cy + ry], fill=255)
    else:  # hole
        r = size * scale * rng.uniform(0.05, 0.08)
        draw.ellipse([cx - r, cy - r, cx + r, cy + r], fill=255)
    return np.asarray(canvas) > 0


def _paint(img: np.ndarray, mask: np.ndarray, defect: str, rng: np.random.Generator) -> np.ndarray:
    out = img.copy()
    colour = {"scratch": (245, 245, 245), "stain": (60, 160, 60), "hole": (10, 10, 10)}[defect]
    out[mask] = np.array(colour, np.float32) + rng.normal(0, 3, (int(mask.sum()), 3))
    return out


def _save_png(array: np.ndarray, path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(np.clip(array, 0, 255).round().astype(np.uint8)).save(path)


def generate_synthetic(root: str | os.PathLike, *, seed: int = 0, classes: tuple[str, ...] = CLASSES,
                       size: int = 128, n_train: int = 4, n_test_good: int = 4,
                       n_per_defect: int = 3, defect_scale: float = 1.0) -> Meta:
    """Write the tree under ``root`` and return its meta (MVTec-script semantics, sorted).

    ``defect_scale`` enlarges the defects (e.g. 2 for a strong, easy-to-learn signal)."""
    root = Path(root)
    unknown = [c for c in classes if c not in _GOOD]
    if unknown:
        raise ValueError(f"unknown synthetic classes {unknown}; choose from {list(_GOOD)}")
    meta: Meta = {"train": {}, "test": {}}
    for ci, cls in enumerate(classes):
        make = _GOOD[cls]
        train, test = [], []
        for i in range(n_train):
            rel = f"{cls}/train/good/{i:03d}.png"
            _save_png(make(np.random.default_rng([seed, ci, 0, i]), size), root / rel)
            train.append(MetaItem(rel, "", cls, "good", 0))
        for di, defect in enumerate(DEFECTS):
            for i in range(n_per_defect):
                rng = np.random.default_rng([seed, ci, 2 + di, i])
                mask = _defect_mask(rng, size, defect, defect_scale)
                rel = f"{cls}/test/{defect}/{i:03d}.png"
                mask_rel = f"{cls}/ground_truth/{defect}/{i:03d}_mask.png"
                _save_png(_paint(make(rng, size), mask, defect, rng), root / rel)
                _save_png(mask.astype(np.float32) * 255, root / mask_rel)
                test.append(MetaItem(rel, mask_rel, cls, defect, 1))
        for i in range(n_test_good):
            rel = f"{cls}/test/good/{i:03d}.png"
            _save_png(make(np.random.default_rng([seed, ci, 1, i]), size), root / rel)
            test.append(MetaItem(rel, "", cls, "good", 0))
        meta["train"][cls] = train
        # species in sorted order, as `zsad prepare mvtec` lists them
        meta["test"][cls] = sorted(test, key=lambda item: (item.specie_name, item.img_path))
    return meta
