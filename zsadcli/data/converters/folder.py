"""A generic layout for users' own data: ``train/<cls>/good``, ``test/<cls>/<good|defect>``,
optional masks in ``ground_truth/<cls>/<defect>/`` (same stem as the image, or ``<stem>_mask``).

Same semantics as the MVTec script, with the split as the top folder: a species folder named
``good`` is normal, every other one anomalous; an anomalous species without a mask folder is
image-level only (``mask_path`` "").
"""
from __future__ import annotations

from pathlib import Path

from zsadcli.data.converters.base import Builder, ConversionResult, Variant, first_match, register
from zsadcli.data.converters.common import add_paired, add_unpaired, list_dirs, report_orphan_masks

NORMAL = "good"


def _build(b: Builder, base: Path) -> None:
    used: dict[Path, set[str]] = {}
    for split in ("train", "test"):
        split_dir = base / split
        if not split_dir.is_dir():
            continue
        for cls in list_dirs(split_dir):
            b.ensure_class(split, cls)
            for specie in list_dirs(split_dir / cls):
                img_dir = split_dir / cls / specie
                mask_dir = base / "ground_truth" / cls / specie
                if specie == NORMAL:
                    add_unpaired(b, split, cls, specie, img_dir, 0)
                elif mask_dir.is_dir():
                    used.setdefault(mask_dir, set()).update(
                        add_paired(b, split, cls, specie, img_dir, mask_dir, report_orphans=False))
                else:
                    b.warn(f"{b.rel(img_dir)}/ has no {b.rel(mask_dir)}/: image-level labels only")
                    add_unpaired(b, split, cls, specie, img_dir, 1)
    report_orphan_masks(b, used)


@register("folder", description="your own data: train/<cls>/good/, test/<cls>/{good,<defect>}/, optional "
                                "ground_truth/<cls>/<defect>/",
          layout="""
<root>/
  train/<cls>/good/*.png                  (optional)
  test/<cls>/good/*.png
  test/<cls>/<defect>/*.png               (any folder name but good is anomalous)
  ground_truth/<cls>/<defect>/<stem>.png  (optional; or <stem>_mask.png; binary or 0/non-zero)
""", differences="no official script: MVTec-script semantics with the split as the top folder")
def convert(root: Path) -> ConversionResult:
    return first_match(root, [Variant("train/test/<cls> folders",
                                      lambda base: (base / "test").is_dir() and bool(list_dirs(base / "test")),
                                      _build)])
