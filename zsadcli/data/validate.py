"""File checks on meta.json records: existence, empty files, readable images, mask sizes.

Cheap enough for real datasets: an image is opened for its header only (PIL reads the size without
decoding pixels); ``--check`` also decodes each mask, since a mask must be binarisable. Sizes are
those zsad scores with (EXIF rotation applied), through the same opener as predict/eval/train.
"""
from __future__ import annotations

import os
from collections import Counter
from pathlib import Path

from zsadcli.data.converters.base import Problem
from zsadcli.data.images import image_size, open_mask
from zsadcli.data.meta import Meta, MetaItem, load_meta, resolve_item_path
from zsadcli.errors import BadInput


def _probe(path: Path, decode: bool) -> tuple[tuple[int, int] | None, str | None]:
    """(size, None) for a readable image, else (None, why not)."""
    try:
        if path.is_dir():
            return None, "is a folder, not an image"
        if path.stat().st_size == 0:
            return None, "is an empty (zero-byte) file"
    except FileNotFoundError:
        return None, "does not exist"
    try:
        # the one opener of predict/eval/train: same size limit, EXIF rotation and mask binarising
        return (open_mask(path).size if decode else image_size(path)), None
    except BadInput as exc:
        detail = exc.message.removeprefix(f"{'mask' if decode else 'image'} {path} ").rstrip(".")
        return None, f"cannot be read as an image ({detail})"


def validate_items(root: str | os.PathLike, meta: Meta, *, decode_masks: bool = False) -> list[Problem]:
    """One problem per unreadable file (images and masks) and per mask whose size differs from its
    image's; every item is checked, so all problems are reported at once."""
    sizes: dict[str, tuple[int, int] | None] = {}
    problems: list[Problem] = []

    def size_of(rel: str, what: str, decode: bool) -> tuple[int, int] | None:
        if rel not in sizes:
            sizes[rel], why = _probe(resolve_item_path(root, rel), decode)
            if why:
                problems.append(Problem(rel, f"{what} {why}"))
        return sizes[rel]

    for classes in meta.values():
        for items in classes.values():
            for item in items:
                image_size = size_of(item.img_path, "image", False)
                if not item.mask_path:
                    continue
                mask_size = size_of(item.mask_path, "mask", decode_masks)
                if image_size and mask_size and image_size != mask_size:
                    problems.append(Problem(item.mask_path, f"mask is {mask_size[0]}x{mask_size[1]} but its image "
                                                            f"{item.img_path} is {image_size[0]}x{image_size[1]}"))
    return problems


_CHECKED_PAIRS: set[tuple[str, str]] = set()


def check_mask_sizes(root: str | os.PathLike, items: list[MetaItem]) -> None:
    """Exit 2 naming the first image/mask pair whose sizes differ; headers only (no decoding), each
    pair once per process. Unreadable files are left to the loader, which names them."""
    for item in items:
        if not item.mask_path:
            continue
        image, mask = resolve_item_path(root, item.img_path), resolve_item_path(root, item.mask_path)
        key = (str(image), str(mask))
        if key in _CHECKED_PAIRS or mask.is_dir():
            continue
        try:  # the sizes zsad scores with (EXIF rotation applied), from the headers
            image_dims, mask_dims = image_size(image), image_size(mask, "mask")
        except BadInput:
            continue
        if image_dims != mask_dims:
            raise BadInput(f"mask {mask} is {mask_dims[0]}x{mask_dims[1]} but its image {image} is "
                           f"{image_dims[0]}x{image_dims[1]}.",
                           hint=f"fix or remove the pair; `zsad prepare --check {root}` lists every problem")
        _CHECKED_PAIRS.add(key)


def split_notes(classes: dict[str, list[MetaItem]]) -> list[str]:
    """The one rule for classes a split cannot use as is, shared by eval, train and prepare --check:
    an empty class is skipped (with this note), and in a pixel-level dataset (some anomalous item
    has a mask) anomalous items without ``mask_path`` get one warning per class (their pixels count
    as normal)."""
    notes = [f"class {cls} has no items: skipped" for cls, items in classes.items() if not items]
    pixel_level = any(item.anomaly and item.mask_path for items in classes.values() for item in items)
    if pixel_level:
        for cls, items in classes.items():
            unmasked = [item.img_path for item in items if item.anomaly and not item.mask_path]
            if unmasked:
                notes.append(f"class {cls}: {len(unmasked)} anomalous image(s) have no mask_path (e.g. "
                             f"{unmasked[0]}); their pixels count as normal")
    return notes


def check_meta(root: str | os.PathLike) -> tuple[Meta, list[Problem]]:
    """Load ``root/meta.json`` (schema errors raise BadInput) and list every problem in it."""
    meta = load_meta(root)
    problems: list[Problem] = []
    for split, classes in meta.items():
        for cls, items in classes.items():
            for item in items:
                if item.cls_name != cls:
                    problems.append(Problem(item.img_path, f"cls_name {item.cls_name!r} differs from its class "
                                                           f"key {cls!r} in {split}"))
            for path, count in Counter(item.img_path for item in items).items():
                if count > 1:
                    problems.append(Problem(path, f"listed {count} times in {split}/{cls}"))
    problems += validate_items(root, meta, decode_masks=True)
    return meta, problems
