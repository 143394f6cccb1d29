"""CVC-ClinicDB (colon polyps): pixel-level, every image anomalous, test only, class ``colon``
(AnomalyCLIP's ``clinicDB.py``, which reads ``images/`` + ``masks/``, the PraNet test-split layout)."""
from __future__ import annotations

from pathlib import Path

from zsadcli.data.converters.base import ConversionResult, first_match, register
from zsadcli.data.converters.common import (IMAGE_MASK_DIFFERENCES, MVTEC_STYLE_DIFFERENCES, image_mask_variant,
                                            mvtec_variant)

CLASS = "colon"


@register("clinicdb", description="CVC-ClinicDB: images/ + masks/ (AnomalyCLIP, PraNet) or Original/ + "
                                  "'Ground Truth'/ .tif (CVC-612)",
          layout="""
<root>/                                   (or <root>/CVC-ClinicDB/)
  images/1.png                            (AnomalyCLIP, PraNet test split, BSR)
  masks/1.png
or (the full CVC-612 download; also inside PNG/ or TIF/ as on Kaggle)
  Original/1.tif
  Ground Truth/1.tif
or AdaCLIP's ClinicDB/{train,test,ground_truth}/
""", differences=IMAGE_MASK_DIFFERENCES + "; Original/ + Ground Truth/ has no official script: read the same way. "
                 "AdaCLIP tree: " + MVTEC_STYLE_DIFFERENCES)
def convert(root: Path) -> ConversionResult:
    return first_match(root, [
        image_mask_variant("images/ + masks/", "images", "masks", CLASS),
        image_mask_variant("CVC-612 Original/ + Ground Truth/", "Original", "Ground Truth", CLASS),
        mvtec_variant("AdaCLIP ClinicDB tree", ["ClinicDB"]),
    ], wrappers=("CVC-ClinicDB", "PNG", "TIF"))
