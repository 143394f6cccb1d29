"""DTD-Synthetic (AnomalyCLIP's ``DTD.py``): MVTec layout, twelve texture classes."""
from __future__ import annotations

from pathlib import Path

from zsadcli.data.converters.base import ConversionResult, first_match, register
from zsadcli.data.converters.common import MVTEC_STYLE_DIFFERENCES, mvtec_variant

# The official script's order (AnomalyCLIP's obj_list order), which sets the meta.json key order.
CLASSES = ("Woven_001", "Woven_127", "Woven_104", "Stratified_154", "Blotchy_099", "Woven_068", "Woven_125",
           "Marbled_078", "Perforated_037", "Mesh_114", "Fibrous_183", "Matted_069")


@register("dtd", description="DTD-Synthetic: <cls>/{train/good, test/{good,<defect>}, ground_truth/<defect>/NNN_mask.png}",
          layout="""
<root>/                         (or <root>/DTD-Synthetic/)
  Blotchy_099/ Fibrous_183/ ... Woven_127/   (any of the 12 classes)
    train/good/000.png
    test/good/000.png
    test/<defect>/000.png
    ground_truth/<defect>/000_mask.png
""", differences=MVTEC_STYLE_DIFFERENCES)
def convert(root: Path) -> ConversionResult:
    return first_match(root, [mvtec_variant("DTD-Synthetic tree", CLASSES)], wrappers=("DTD-Synthetic",))
