"""CVC-ColonDB (colon polyps): pixel-level, every image anomalous, test only, class ``colon``
(AnomalyCLIP's ``colonDB.py``: ``images/`` + ``masks/``, the PraNet test-split layout)."""
from __future__ import annotations

from pathlib import Path

from zsadcli.data.converters.base import ConversionResult, first_match, register
from zsadcli.data.converters.common import (IMAGE_MASK_DIFFERENCES, MVTEC_STYLE_DIFFERENCES, image_mask_variant,
                                            mvtec_variant)

CLASS = "colon"


@register("colondb", description="CVC-ColonDB: images/ + masks/ (AnomalyCLIP, PraNet test split)",
          layout="""
<root>/                                   (or <root>/CVC-ColonDB/)
  images/1.png
  masks/1.png
or AdaCLIP's ColonDB/{train,test,ground_truth}/
""", differences=IMAGE_MASK_DIFFERENCES + ". AdaCLIP tree: " + MVTEC_STYLE_DIFFERENCES)
def convert(root: Path) -> ConversionResult:
    return first_match(root, [
        image_mask_variant("images/ + masks/", "images", "masks", CLASS),
        mvtec_variant("AdaCLIP ColonDB tree", ["ColonDB"]),
    ], wrappers=("CVC-ColonDB",))
