"""ISIC 2016 (ISBI 2016 Part 1, skin lesions): pixel-level, every test image anomalous, class ``skin``.

- AnomalyCLIP (``isbi.py``): ``skin/test/<specie>/`` with the masks in
  ``skin/ISBI2016_ISIC_Part1_Test_GroundTruth/``; test only.
- ViP2-CLIP (``isbi.py``): MVTec-style ``skin/{train,test}/<specie>/`` + ``skin/ground_truth/<specie>/``.
- Crane (``isic.py``): ``skin/test/<specie>/`` + flat ``skin/ground_truth/``; test only.
- The raw challenge folders ``ISBI2016_ISIC_Part1_Test_Data/`` + ``..._Test_GroundTruth/`` are read
  like AnomalyCLIP's tree, the image folder's name being the species (AnomalyCLIP's own species
  folder name is not documented).
- AdaCLIP: MVTec-style ``isic/``, class ``isic``.
"""
from __future__ import annotations

from pathlib import Path

from zsadcli.data.converters.base import Builder, ConversionResult, Variant, first_match, register
from zsadcli.data.converters.common import MVTEC_STYLE_DIFFERENCES, add_mvtec_class, add_paired, list_dirs, mvtec_variant

CLASS = "skin"
TEST_DATA = "ISBI2016_ISIC_Part1_Test_Data"
TEST_MASKS = "ISBI2016_ISIC_Part1_Test_GroundTruth"


def _has_test(base: Path) -> bool:
    return (base / CLASS / "test").is_dir()


def _ground_truth_is_flat(base: Path) -> bool:
    gt = base / CLASS / "ground_truth"
    return gt.is_dir() and not list_dirs(gt)


def _build_raw(b: Builder, base: Path) -> None:
    if (base / "ISBI2016_ISIC_Part1_Training_Data").is_dir():
        b.warn("ISBI2016_ISIC_Part1_Training_* folders ignored: the official scripts use the test set only")
    add_paired(b, "test", CLASS, TEST_DATA, base / TEST_DATA, base / TEST_MASKS)


@register("isic", description="ISIC 2016: skin/test/<specie>/ + skin/ISBI2016_ISIC_Part1_Test_GroundTruth/ "
                              "(AnomalyCLIP), or the raw ISBI2016_ISIC_Part1_Test_{Data,GroundTruth}/ folders",
          layout="""
<root>/                                              (or <root>/ISIC/)
  skin/test/<specie>/ISIC_0000003.jpg                (AnomalyCLIP)
  skin/ISBI2016_ISIC_Part1_Test_GroundTruth/ISIC_0000003_Segmentation.png
or
  skin/{train,test}/<specie>/ + skin/ground_truth/<specie>/   (ViP2-CLIP)
or
  skin/test/<specie>/ + skin/ground_truth/*.png               (Crane)
or (the ISIC 2016 challenge download)
  ISBI2016_ISIC_Part1_Test_Data/ISIC_0000003.jpg
  ISBI2016_ISIC_Part1_Test_GroundTruth/ISIC_0000003_Segmentation.png
or AdaCLIP's isic/{train,test,ground_truth}/
""", differences="masks paired by name (ISIC_x.jpg <-> ISIC_x_Segmentation.png; scripts: sorted position, same "
                 "result on an intact tree); raw challenge folders: specie_name is the image folder's name "
                 "(no official script for that layout); " + MVTEC_STYLE_DIFFERENCES)
def convert(root: Path) -> ConversionResult:
    return first_match(root, [
        Variant("AnomalyCLIP skin tree", lambda base: _has_test(base) and (base / CLASS / TEST_MASKS).is_dir(),
                lambda b, base: add_mvtec_class(b, base, CLASS, phases=("test",),
                                                mask_dir=lambda cls_dir, specie: cls_dir / TEST_MASKS)),
        Variant("Crane skin tree (flat ground_truth/)", lambda base: _has_test(base) and _ground_truth_is_flat(base),
                lambda b, base: add_mvtec_class(b, base, CLASS, phases=("test",),
                                                mask_dir=lambda cls_dir, specie: cls_dir / "ground_truth")),
        Variant("ViP2-CLIP skin tree (ground_truth/<specie>/)", _has_test,
                lambda b, base: add_mvtec_class(b, base, CLASS)),
        Variant("ISIC 2016 challenge folders",
                lambda base: (base / TEST_DATA).is_dir() and (base / TEST_MASKS).is_dir(), _build_raw),
        mvtec_variant("AdaCLIP isic tree", ["isic"]),
    ], wrappers=("ISIC",))
