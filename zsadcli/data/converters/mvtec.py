"""MVTec AD (AnomalyCLIP's ``mvtec.py``; identical in ViP2-CLIP, Crane and AdaCLIP)."""
from __future__ import annotations

from pathlib import Path

from zsadcli.data.converters.base import ConversionResult, first_match, register
from zsadcli.data.converters.common import MVTEC_STYLE_DIFFERENCES, mvtec_variant

CLASSES = ("bottle", "cable", "capsule", "carpet", "grid", "hazelnut", "leather", "metal_nut", "pill",
           "screw", "tile", "toothbrush", "transistor", "wood", "zipper")


@register("mvtec", description="MVTec AD: <cls>/{train/good, test/{good,<defect>}, ground_truth/<defect>/NNN_mask.png}",
          layout="""
<root>/                         (or <root>/mvtec_anomaly_detection/)
  bottle/ cable/ ... zipper/    (any of the 15 classes)
    train/good/000.png
    test/good/000.png
    test/<defect>/000.png
    ground_truth/<defect>/000_mask.png
""", differences=MVTEC_STYLE_DIFFERENCES)
def convert(root: Path) -> ConversionResult:
    return first_match(root, [mvtec_variant("MVTec AD tree", CLASSES)], wrappers=("mvtec_anomaly_detection",))
