"""The synthetic dataset (:mod:`zsadcli.data.synthetic`): creates the images, then its meta."""
from __future__ import annotations

from pathlib import Path

from zsadcli.data.converters.base import ConversionResult, register
from zsadcli.data.synthetic import generate_synthetic


@register("synthetic", generates=True,
          description="generated here (textures with exact defect masks, MVTec layout); ROOT is created",
          layout="""
<root>/ is created: <cls>/{train/good, test/{good,<defect>}, ground_truth/<defect>/NNN_mask.png}
""", differences="no official script; --seed changes the images")
def convert(root: Path, seed: int = 0) -> ConversionResult:
    return ConversionResult(generate_synthetic(root, seed=seed), "generated")
