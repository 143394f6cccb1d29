"""BTAD (AnomalyCLIP's ``btad.py``): MVTec layout whose normal folder is ``ok``; .bmp and .png files."""
from __future__ import annotations

from pathlib import Path

from zsadcli.data.converters.base import ConversionResult, first_match, register
from zsadcli.data.converters.common import MVTEC_STYLE_DIFFERENCES, mvtec_variant

CLASSES = ("01", "02", "03")


@register("btad", description="BTAD: {01,02,03}/{train/ok, test/{ok,ko}, ground_truth/ko} (.bmp/.png), as in btad.zip",
          layout="""
<root>/                         (or <root>/BTech_Dataset_transformed/, as btad.zip unpacks)
  01/ 02/ 03/
    train/ok/0000.bmp           (.bmp or .png)
    test/ok/0000.bmp
    test/ko/0000.bmp
    ground_truth/ko/0000.png    (same stem as the image)
""", differences=MVTEC_STYLE_DIFFERENCES)
def convert(root: Path) -> ConversionResult:
    return first_match(root, [mvtec_variant("BTAD tree", CLASSES, normal="ok")],
                       wrappers=("BTech_Dataset_transformed",))
