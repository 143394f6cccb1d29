"""TN3K (thyroid nodules): pixel-level, every image anomalous, test only, class ``thyroid``
(AnomalyCLIP's ``tn3k.py``: ``test-image/`` + ``test-mask/`` from the TRFE-Net repository)."""
from __future__ import annotations

from pathlib import Path

from zsadcli.data.converters.base import ConversionResult, first_match, register
from zsadcli.data.converters.common import (IMAGE_MASK_DIFFERENCES, MVTEC_STYLE_DIFFERENCES, image_mask_variant,
                                            mvtec_variant)

CLASS = "thyroid"


@register("tn3k", description="TN3K: test-image/ + test-mask/ (AnomalyCLIP, TRFE-Net's tn3k/)",
          layout="""
<root>/                                   (or <root>/tn3k/)
  test-image/0000.jpg
  test-mask/0000.jpg
  trainval-image/  trainval-mask/         (not used, as in the official script)
or AdaCLIP's tn3k/{train,test,ground_truth}/ (root TN3K/)
""", differences=IMAGE_MASK_DIFFERENCES + ". AdaCLIP tree: " + MVTEC_STYLE_DIFFERENCES)
def convert(root: Path) -> ConversionResult:
    return first_match(root, [
        image_mask_variant("test-image/ + test-mask/", "test-image", "test-mask", CLASS),
        mvtec_variant("AdaCLIP tn3k tree", ["tn3k"]),
    ], wrappers=("tn3k", "TN3K"))
