"""Helpers for the `zsad prepare` tests: tiny images in fake trees shaped like the real downloads,
and the expected records written out by hand from the official scripts' semantics."""
from __future__ import annotations

import json
import os
from pathlib import Path

from PIL import Image

SIZE = (8, 8)


def image(path: Path, size: tuple[int, int] = SIZE) -> Path:
    """A tiny image in the format its extension names (.png .PNG .JPG .jpeg .bmp .tif ...)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new("RGB", size, (120, 90, 60)).save(path)
    return path


def mask(path: Path, size: tuple[int, int] = SIZE) -> Path:
    """A tiny binary mask (one 255 pixel on 0)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    img = Image.new("L", size, 0)
    img.putpixel((1, 1), 255)
    img.save(path)
    return path


def item(img: str, mask_path: str, cls: str, specie: str, anomaly: int) -> dict:
    """One record, keys in the official scripts' order."""
    return {"img_path": img, "mask_path": mask_path, "cls_name": cls, "specie_name": specie, "anomaly": anomaly}


def written(root: Path) -> dict:
    return json.loads((root / "meta.json").read_text())


def resolved(root: Path, meta: dict) -> dict:
    """Records with paths joined to the root like the loaders do (``os.path.join``: absolute paths
    win), so relative and absolute paths to the same file compare equal."""
    def res(p: str) -> str:
        return os.path.normpath(os.path.join(str(root), p)) if p else ""

    return {split: {cls: [{**it, "img_path": res(it["img_path"]), "mask_path": res(it["mask_path"])}
                          for it in items] for cls, items in classes.items()}
            for split, classes in meta.items()}


def mvtec_class(root: Path, cls: str, defects: dict[str, list[str]], good_train: list[str], good_test: list[str],
                normal: str = "good", img_ext: str = ".png", mask_ext: str = ".png", mask_suffix: str = "_mask") -> None:
    """An MVTec-style class folder: <cls>/train/<normal>, test/<normal>, test/<defect>, ground_truth/<defect>."""
    for stem in good_train:
        image(root / cls / "train" / normal / f"{stem}{img_ext}")
    for stem in good_test:
        image(root / cls / "test" / normal / f"{stem}{img_ext}")
    for defect, stems in defects.items():
        for stem in stems:
            image(root / cls / "test" / defect / f"{stem}{img_ext}")
            mask(root / cls / "ground_truth" / defect / f"{stem}{mask_suffix}{mask_ext}")


def mvtec_expected(cls: str, defects: dict[str, list[str]], good_train: list[str], good_test: list[str],
                   normal: str = "good", img_ext: str = ".png", mask_ext: str = ".png", mask_suffix: str = "_mask",
                   prefix: str = "", cls_name: str | None = None) -> tuple[list[dict], list[dict]]:
    """The MVTec script's records for that class: (train, test), species in sorted order."""
    name = cls_name or cls
    train = [item(f"{prefix}{cls}/train/{normal}/{s}{img_ext}", "", name, normal, 0) for s in sorted(good_train)]
    species = sorted(list(defects) + [normal])
    test = []
    for specie in species:
        if specie == normal:
            test += [item(f"{prefix}{cls}/test/{normal}/{s}{img_ext}", "", name, normal, 0) for s in sorted(good_test)]
        else:
            test += [item(f"{prefix}{cls}/test/{specie}/{s}{img_ext}",
                          f"{prefix}{cls}/ground_truth/{specie}/{s}{mask_suffix}{mask_ext}", name, specie, 1)
                     for s in sorted(defects[specie])]
    return train, test
