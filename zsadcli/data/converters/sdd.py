"""KolektorSDD after conversion to an MVTec layout (AnomalyCLIP's ``SDD.py``).

Two conversions are in use: AnomalyCLIP's copy, class folder ``electrical commutators`` (with a
space; its README draws ``electrical_commutators``), and DRA's ``convert_SDD.py`` / AdaCLIP's
``sdd-pre.py`` output, class folder ``SDD``. Raw KolektorSDD (``kos01/Part0.jpg``) must be converted
first: its images are cut into thirds, which is not a meta.json matter.
"""
from __future__ import annotations

from pathlib import Path

from zsadcli.data.converters.base import ConversionResult, first_match, register
from zsadcli.data.converters.common import MVTEC_STYLE_DIFFERENCES, mvtec_variant

CLASS = "electrical commutators"  # AnomalyCLIP's class name (its obj_list for --dataset SDD)


@register("sdd", description="KolektorSDD converted: 'electrical commutators'/ (AnomalyCLIP) or SDD/ (DRA, AdaCLIP), "
                             "each {train/good, test/{good,defect}, ground_truth/defect/*_mask.png}",
          layout="""
<root>/                                   (or <root>/SDD_anomaly_detection/)
  electrical commutators/                 (AnomalyCLIP; electrical_commutators/ also accepted)
  or SDD/                                 (DRA convert_SDD.py / AdaCLIP sdd-pre.py)
    train/good/kos01_Part0_0.png
    test/good/kos01_Part0_1.png
    test/defect/kos01_Part5_0.png
    ground_truth/defect/kos01_Part5_0_mask.png
Raw KolektorSDD (kos01/Part0.jpg + Part0_label.bmp) must be converted first (DRA's convert_SDD.py).
""", differences=MVTEC_STYLE_DIFFERENCES + "; the folder electrical_commutators (AnomalyCLIP's README "
          "spelling) is accepted and still named 'electrical commutators'")
def convert(root: Path) -> ConversionResult:
    return first_match(root, [
        mvtec_variant("AnomalyCLIP tree", [CLASS]),
        mvtec_variant("AnomalyCLIP tree, README spelling", ["electrical_commutators"],
                      names={"electrical_commutators": CLASS}),
        mvtec_variant("DRA/AdaCLIP tree", ["SDD"]),
    ], wrappers=("SDD_anomaly_detection", "SDD"))
