"""COVID-19 Radiography Database: image-level only, test only, class ``chest`` (AnomalyCLIP's ``covid.py``).

Every sub-folder of the root is a species, anomalous unless it is the normal one. AnomalyCLIP's
copy has flat folders with ``NORMAL``; recent Kaggle versions name it ``Normal`` and keep the
images in ``<class>/images/`` (``<class>/masks/`` are lung masks, not anomaly masks: not used).
"""
from __future__ import annotations

from pathlib import Path

from zsadcli.data.converters.base import Builder, ConversionResult, Variant, first_match, register
from zsadcli.data.converters.common import add_species_folders, list_dirs

CLASS = "chest"


def _normal_dirs(base: Path) -> list[str]:
    return [d for d in list_dirs(base) if d.lower() == "normal"]


def _nested_images(base: Path) -> bool:
    return any((base / d / "images").is_dir() for d in _normal_dirs(base))


def _images_in(specie_dir: Path) -> Path:
    return specie_dir / "images" if (specie_dir / "images").is_dir() else specie_dir


def _build(b: Builder, base: Path) -> None:
    add_species_folders(b, base, CLASS, is_normal=lambda specie: specie.lower() == "normal", images_in=_images_in)


@register("covid", description="COVID-19 Radiography: <class>/*.png with a NORMAL/ folder (AnomalyCLIP), or "
                               "<class>/images/*.png (Kaggle v3+)",
          layout="""
<root>/                                   (or <root>/COVID-19_Radiography_Dataset/)
  NORMAL/Normal-1.png                     (AnomalyCLIP; any other folder is anomalous)
  COVID/COVID-1.png
  Viral Pneumonia/Viral Pneumonia-1.png
or (Kaggle versions 3 and later)
  Normal/images/Normal-1.png              (masks/ folders are lung masks: not used)
  COVID/images/COVID-1.png
  Lung_Opacity/images/ ...  Viral Pneumonia/images/ ...
""", differences="the normal folder is matched case-insensitively (NORMAL or Normal; script: NORMAL only, so "
                 "on Kaggle's current layout it would call every image anomalous); Kaggle's <class>/images/ "
                 "sub-folders are read (script: lists the folder names as images); files beside the folders "
                 "ignored (script: crash); files sorted")
def convert(root: Path) -> ConversionResult:
    return first_match(root, [
        Variant("Kaggle <class>/images/ tree", lambda base: bool(_normal_dirs(base)) and _nested_images(base), _build),
        Variant("AnomalyCLIP flat class folders", lambda base: bool(_normal_dirs(base)), _build),
    ], wrappers=("COVID-19_Radiography_Dataset", "COVID-19 Radiography Database"))
