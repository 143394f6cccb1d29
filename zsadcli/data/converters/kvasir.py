"""Kvasir-SEG (colon polyps): pixel-level, every image anomalous, test only, class ``colon``
(AnomalyCLIP's ``kvasir.py``: ``images/`` + ``masks/``; the full Kvasir-SEG or PraNet's subset)."""
from __future__ import annotations

from pathlib import Path

from zsadcli.data.converters.base import ConversionResult, first_match, register
from zsadcli.data.converters.common import IMAGE_MASK_DIFFERENCES, image_mask_variant

CLASS = "colon"


@register("kvasir", description="Kvasir-SEG: images/ + masks/ (.jpg in Kvasir-SEG, .png in PraNet's subset)",
          layout="""
<root>/                                   (or <root>/Kvasir-SEG/, as the archive unpacks)
  images/cju0qkwl35piu0993l0dewei2.jpg
  masks/cju0qkwl35piu0993l0dewei2.jpg
""", differences=IMAGE_MASK_DIFFERENCES)
def convert(root: Path) -> ConversionResult:
    return first_match(root, [image_mask_variant("images/ + masks/", "images", "masks", CLASS)],
                       wrappers=("Kvasir-SEG", "Kvasir"))
