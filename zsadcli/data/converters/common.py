"""Building blocks shared by the converters: listing folders, pairing masks with images, and the
MVTec-style tree that most datasets (and every AdaCLIP/Crane re-packaging) use.

Semantics follow the official ``generate_dataset_json`` scripts: a species folder named like the
normal folder is normal, every other one anomalous; files are sorted. Two deliberate differences,
shared by all converters: only image files are listed (the scripts take every directory entry, so a
stray ``Thumbs.db`` breaks them), and masks are paired by name instead of by sorted position.
"""
from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Sequence

from zsadcli.data.converters.base import Builder, Variant
from zsadcli.data.images import IMAGE_EXTENSIONS

# What mask files add to the image's stem in the supported datasets (MVTec/MPDD/DTD/SDD `_mask`,
# DAGM `_label`, ISIC `_Segmentation`); most medical sets use the image's own stem.
MASK_SUFFIXES = ("_mask", "_label", "_segmentation", "_gt")

# The deliberate differences shown by `zsad prepare --list`: MVTec-style trees, image/mask folders.
MVTEC_STYLE_DIFFERENCES = (
    "species and files sorted (script: os.listdir order); masks paired by name (script: sorted "
    "position; same result on an intact tree); non-image files ignored; absent classes or phase "
    "folders left out with a warning (script: crash)")
IMAGE_MASK_DIFFERENCES = (
    "paths relative to the root (script: absolute); masks paired by name (script: sorted position; same "
    "result on an intact tree); non-image files ignored")


def list_images(b: Builder, folder: Path, expected_extras: Sequence[str] = ()) -> list[str]:
    """Sorted image file names in ``folder``; other visible files (except ``expected_extras``, such
    as DAGM's ``Labels.txt``) are remembered for one warning."""
    names = []
    with os.scandir(folder) as entries:
        for entry in entries:
            if entry.name.startswith(".") or not entry.is_file() or entry.name in expected_extras:
                continue
            if os.path.splitext(entry.name)[1].lower() in IMAGE_EXTENSIONS:
                names.append(entry.name)
            else:
                b.ignored.add(b.rel(folder / entry.name))
    return sorted(names)


def list_dirs(folder: Path) -> list[str]:
    """Sorted visible sub-folders (the scripts use os.listdir order, which is file-system dependent)."""
    with os.scandir(folder) as entries:
        return sorted(e.name for e in entries if e.is_dir() and not e.name.startswith("."))


def _stem(name: str) -> str:
    return os.path.splitext(name)[0]


def _mask_keys(mask_name: str) -> set[str]:
    stem = _stem(mask_name)
    keys = {stem}
    for suffix in MASK_SUFFIXES:
        if stem.lower().endswith(suffix) and len(stem) > len(suffix):
            keys.add(stem[: -len(suffix)])
    return keys


@dataclass(frozen=True)
class Pairing:
    pairs: list[tuple[str, str | None]]  # (image, mask or None when no mask matches)
    orphans: list[str]                   # masks no image claimed
    by_index: bool                       # names unrelated: paired by sorted position
    index_example: tuple[str, str | None] | None  # (image, what sorted-position pairing would give it)


def pair_masks(images: Sequence[str], masks: Sequence[str], *, allow_index: bool = True) -> Pairing:
    """Pair sorted ``images`` with sorted ``masks`` by name (``000.png`` <-> ``000_mask.png``,
    ``X.jpg`` <-> ``X_Segmentation.png``, same stem); when no name corresponds at all and the
    counts agree, fall back to the official scripts' sorted-position pairing (``allow_index``)."""
    by_key: dict[str, list[str]] = {}
    for mask in masks:
        for key in _mask_keys(mask):
            by_key.setdefault(key, []).append(mask)
    pairs: list[tuple[str, str | None]] = []
    used: set[str] = set()
    for image in images:
        candidates = [m for m in by_key.get(_stem(image), []) if m not in used]
        exact = [m for m in candidates if _stem(m) == _stem(image)]
        chosen = exact[0] if len(exact) == 1 else candidates[0] if len(candidates) == 1 else None
        if chosen is not None:
            used.add(chosen)
        pairs.append((image, chosen))
    if allow_index and not used and masks and len(images) == len(masks):
        return Pairing(list(zip(images, masks)), [], True, None)
    example = None
    if all(m is not None for _, m in pairs):  # a complete name pairing: would position agree?
        example = next(((img, masks[i] if i < len(masks) else None) for i, (img, m) in enumerate(pairs)
                        if i >= len(masks) or masks[i] != m), None)
    return Pairing(pairs, [m for m in masks if m not in used], False, example)


def add_paired(b: Builder, split: str, cls_name: str, specie: str, img_dir: Path, mask_dir: Path,
               *, report_orphans: bool = True) -> set[str]:
    """Add every image of ``img_dir`` as anomalous with its mask from ``mask_dir``; images without
    a mask (and, unless told otherwise, masks without an image) become problems. Returns the
    mask names used."""
    b.ensure_class(split, cls_name)
    images = list_images(b, img_dir)
    if not mask_dir.is_dir():
        for image in images:
            b.problem(img_dir / image, f"no mask: the folder {b.rel(mask_dir)}/ does not exist")
        return set()
    pairing = pair_masks(images, list_images(b, mask_dir))
    if pairing.by_index:
        b.warn(f"{b.rel(img_dir)}/: image and mask names do not correspond; paired by sorted position "
               f"as the official scripts do")
    elif pairing.index_example:
        img, by_position = pairing.index_example
        b.warn(f"{b.rel(img_dir)}/: paired by name; the official script pairs by sorted position and would give "
               f"{img} {'the mask ' + by_position if by_position else 'no mask (IndexError)'} instead")
    for image, mask in pairing.pairs:
        if mask is None:
            b.problem(img_dir / image, f"no mask for this image in {b.rel(mask_dir)}/")
        else:
            b.add(split, cls_name, img_dir / image, mask_dir / mask, specie, 1)
    if report_orphans:
        for mask in pairing.orphans:
            b.problem(mask_dir / mask, f"mask without a matching image in {b.rel(img_dir)}/")
    return {mask for _, mask in pairing.pairs if mask is not None}


def add_unpaired(b: Builder, split: str, cls_name: str, specie: str, img_dir: Path, anomaly: int) -> None:
    """Image-level items (no mask), one per image in ``img_dir``."""
    b.ensure_class(split, cls_name)
    for image in list_images(b, img_dir):
        b.add(split, cls_name, img_dir / image, None, specie, anomaly)


def ground_truth_dir(cls_dir: Path, specie: str) -> Path:
    """Where the MVTec layout keeps a species' masks."""
    return cls_dir / "ground_truth" / specie


def add_mvtec_class(b: Builder, base: Path, folder: str, cls_name: str | None = None, *,
                    normal: str = "good", phases: Sequence[str] = ("train", "test"),
                    mask_dir: Callable[[Path, str], Path] | None = ground_truth_dir) -> None:
    """One class of an MVTec-style tree: ``<folder>/<phase>/<specie>/*`` with masks at
    ``mask_dir(class folder, specie)`` (None: an image-level dataset, masks ""). A missing phase
    folder gives an empty list (the official scripts would crash)."""
    cls_name = cls_name or folder
    cls_dir = base / folder
    used: dict[Path, set[str]] = {}  # per mask folder: several species may share one (ISIC)
    for phase in phases:
        b.ensure_class(phase, cls_name)
        phase_dir = cls_dir / phase
        if not phase_dir.is_dir():
            continue
        for specie in list_dirs(phase_dir):
            if specie == normal or mask_dir is None:
                add_unpaired(b, phase, cls_name, specie, phase_dir / specie, int(specie != normal))
            else:
                masks = mask_dir(cls_dir, specie)
                used.setdefault(masks, set()).update(
                    add_paired(b, phase, cls_name, specie, phase_dir / specie, masks, report_orphans=False))
    report_orphan_masks(b, used)


def report_orphan_masks(b: Builder, used: dict[Path, set[str]]) -> None:
    """Masks in the visited mask folders that no image claimed."""
    for folder, names in used.items():
        if folder.is_dir():
            for mask in list_images(b, folder):
                if mask not in names:
                    b.problem(folder / mask, "mask without a matching image")


def has_mvtec_class(base: Path, folder: str) -> bool:
    return (base / folder / "test").is_dir()


def add_mvtec_classes(b: Builder, base: Path, classes: Sequence[str], *, names: dict[str, str] | None = None,
                      normal: str = "good", masks: bool = True) -> None:
    """The known ``classes`` found under ``base``, in the official script's order; absent ones and
    unknown folders are reported as warnings (the official scripts crash / ignore them)."""
    names = names or {}
    present = [c for c in classes if has_mvtec_class(base, c)]
    missing = [c for c in classes if c not in present]
    if missing:
        b.warn(f"classes not found (left out): {', '.join(missing)}")
    unknown = [d for d in list_dirs(base) if d not in classes]
    if unknown:
        b.warn(f"folders that are not classes of this dataset (ignored): {', '.join(unknown)}")
    for folder in present:
        add_mvtec_class(b, base, folder, names.get(folder, folder), normal=normal,
                        mask_dir=ground_truth_dir if masks else None)


def mvtec_variant(name: str, classes: Sequence[str], *, names: dict[str, str] | None = None,
                  normal: str = "good", masks: bool = True) -> Variant:
    """A Variant matching an MVTec-style tree with any of ``classes``."""
    return Variant(name, lambda base: any(has_mvtec_class(base, c) for c in classes),
                   lambda b, base: add_mvtec_classes(b, base, classes, names=names, normal=normal, masks=masks))


def add_species_folders(b: Builder, cls_dir: Path, cls_name: str, *, is_normal: Callable[[str], bool],
                        exclude: Sequence[str] = (), images_in: Callable[[Path], Path] = lambda d: d) -> None:
    """Image-level, test-only datasets whose sub-folders are the labels (BrainMRI, Br35H, COVID):
    every sub-folder is a species, anomalous unless ``is_normal``; no masks."""
    for specie in list_dirs(cls_dir):
        if specie in exclude:
            continue
        add_unpaired(b, "test", cls_name, specie, images_in(cls_dir / specie), int(not is_normal(specie)))
    b.ensure_class("test", cls_name)


def image_mask_variant(name: str, images: str, masks: str, cls_name: str) -> Variant:
    """``<images>/`` + ``<masks>/`` folders of a pixel-level set (the colon and thyroid sets):
    every image anomalous with its mask, ``specie_name`` empty, test only."""
    return Variant(name, lambda base: (base / images).is_dir() and (base / masks).is_dir(),
                   lambda b, base: add_paired(b, "test", cls_name, "", base / images, base / masks))
