"""MPDD (AnomalyCLIP's ``mpdd.py``): the MVTec layout with six metal-part classes."""
from __future__ import annotations

from pathlib import Path

from zsadcli.data.converters.base import ConversionResult, first_match, register
from zsadcli.data.converters.common import MVTEC_STYLE_DIFFERENCES, mvtec_variant

CLASSES = ("bracket_black", "bracket_brown", "bracket_white", "connector", "metal_plate", "tubes")


@register("mpdd", description="MPDD: <cls>/{train/good, test/{good,<defect>}, ground_truth/<defect>/NNN_mask.png}",
          layout="""
<root>/                         (or <root>/MPDD/)
  bracket_black/ bracket_brown/ bracket_white/ connector/ metal_plate/ tubes/
    train/good/000.png
    test/good/000.png
    test/<defect>/000.png
    ground_truth/<defect>/000_mask.png
""", differences=MVTEC_STYLE_DIFFERENCES)
def convert(root: Path) -> ConversionResult:
    return first_match(root, [mvtec_variant("MPDD tree", CLASSES)], wrappers=("MPDD",))
