"""Br35H (brain tumour, yes/no): image-level only, test only, class ``brain``.

AnomalyCLIP/ViP2-CLIP (``br35.py``) read ``<root>/{no,yes}``, Crane's copy ``<root>/brain/{no,yes}``.
Every sub-folder is a species, anomalous unless ``no`` -- except the Kaggle download's unlabelled
``pred/`` folder, which the official script would count as anomalous; it is left out.
"""
from __future__ import annotations

from pathlib import Path

from zsadcli.data.converters.base import Builder, ConversionResult, Variant, first_match, register
from zsadcli.data.converters.common import add_species_folders, list_dirs, mvtec_variant

CLASS = "brain"
UNLABELLED = "pred"


def _has_yes_no(folder: Path) -> bool:
    return (folder / "no").is_dir() and (folder / "yes").is_dir()


def _build(b: Builder, cls_dir: Path) -> None:
    species = list_dirs(cls_dir)
    if UNLABELLED in species:
        b.warn(f"{b.rel(cls_dir / UNLABELLED)}/ holds unlabelled images: left out (the official script would "
               f"count them as anomalous)")
    extra = [d for d in species if d not in ("no", "yes", UNLABELLED)]
    if extra:
        b.warn(f"folders besides no/ and yes/ counted as anomalous, as the official script does: {', '.join(extra)}")
    add_species_folders(b, cls_dir, CLASS, is_normal=lambda specie: specie == "no", exclude=(UNLABELLED,))


@register("br35h", description="Br35H: {no,yes}/ (AnomalyCLIP, ViP2-CLIP, Kaggle; pred/ left out) or brain/{no,yes}/ "
                               "(Crane)",
          layout="""
<root>/                                   (or <root>/Br35h_anomaly_detection/)
  no/no0.jpg                              (AnomalyCLIP, ViP2-CLIP, the Kaggle download)
  yes/y0.jpg
  pred/pred0.jpg                          (unlabelled: left out)
or
  brain/no/  brain/yes/                   (Crane)
or AdaCLIP's br35h/{train/good, test/{good,defect}}/
""", differences="pred/ left out (script: counted as anomalous); paths relative to the root (script: absolute "
                 "with a doubled slash); files and folders sorted (script: os.listdir order); files beside the "
                 "folders ignored (script: crash, e.g. on an old meta.json)")
def convert(root: Path) -> ConversionResult:
    return first_match(root, [
        Variant("AnomalyCLIP no/yes tree", _has_yes_no, _build),
        Variant("Crane brain/{no,yes} tree", lambda base: _has_yes_no(base / CLASS),
                lambda b, base: _build(b, base / CLASS)),
        mvtec_variant("AdaCLIP br35h tree", ["br35h"], masks=False),
    ], wrappers=("Br35h_anomaly_detection", "Br35H"))
