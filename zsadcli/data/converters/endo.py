"""EndoTect 2020 segmentation test set (colon): pixel-level, test only, class ``colon``
(AnomalyCLIP's ``endoTect.py``): every folder beside ``masks/`` is a species (normally ``images/``),
anomalous unless named ``good``, its masks taken from ``masks/``."""
from __future__ import annotations

from pathlib import Path

from zsadcli.data.converters.base import Builder, ConversionResult, Variant, first_match, register
from zsadcli.data.converters.common import (IMAGE_MASK_DIFFERENCES, MVTEC_STYLE_DIFFERENCES, add_paired, add_unpaired,
                                            list_dirs, mvtec_variant, report_orphan_masks)

CLASS = "colon"
MASKS = "masks"


def _species(base: Path) -> list[str]:
    return [d for d in list_dirs(base) if d != MASKS]


def _build(b: Builder, base: Path) -> None:
    used: set[str] = set()
    for specie in _species(base):
        if specie == "good":
            add_unpaired(b, "test", CLASS, specie, base / specie, 0)
        else:
            used |= add_paired(b, "test", CLASS, specie, base / specie, base / MASKS, report_orphans=False)
    report_orphan_masks(b, {base / MASKS: used})


@register("endo", description="EndoTect 2020 segmentation test set: images/ + masks/ (any folder beside masks/ "
                              "is a species)",
          layout="""
<root>/                                   (or <root>/EndoTect_2020_Segmentation_Test_Dataset/)
  images/<name>.jpg
  masks/<name>.jpg                        (same stem as the image)
or AdaCLIP's endo/{train,test,ground_truth}/ (root EndoTect/)
""", differences=IMAGE_MASK_DIFFERENCES + "; species folders sorted (script: set order); files beside the "
                 "folders ignored (script: crash, e.g. on an old meta.json). AdaCLIP tree: " + MVTEC_STYLE_DIFFERENCES)
def convert(root: Path) -> ConversionResult:
    return first_match(root, [
        Variant("images/ + masks/", lambda base: (base / MASKS).is_dir() and bool(_species(base)), _build),
        mvtec_variant("AdaCLIP endo tree", ["endo"]),
    ], wrappers=("EndoTect_2020_Segmentation_Test_Dataset", "EndoTect"))
