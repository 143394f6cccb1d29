"""Brain MRI (brain tumour, yes/no): image-level only, test only, class ``brain``.

AnomalyCLIP/Crane (``brainmri.py``) read ``<root>/brain_tumor_dataset/{no,yes}``; ViP2-CLIP's copy
of the script reads ``<root>/{no,yes}``. Every sub-folder is a species, anomalous unless ``no``.
The Kaggle archive holds both (``brain_tumor_dataset/`` and duplicate top-level ``yes/``, ``no/``):
``brain_tumor_dataset/`` wins, as in AnomalyCLIP.
"""
from __future__ import annotations

from pathlib import Path

from zsadcli.data.converters.base import Builder, ConversionResult, Variant, first_match, register
from zsadcli.data.converters.common import add_species_folders, list_dirs, mvtec_variant

CLASS = "brain"
NESTED = "brain_tumor_dataset"


def _has_yes_no(folder: Path) -> bool:
    return (folder / "no").is_dir() and (folder / "yes").is_dir()


def _build(b: Builder, cls_dir: Path) -> None:
    extra = [d for d in list_dirs(cls_dir) if d not in ("no", "yes")]
    if extra:
        b.warn(f"folders besides no/ and yes/ in {b.rel(cls_dir)}/ counted as anomalous, as the official "
               f"script does: {', '.join(extra)}")
    add_species_folders(b, cls_dir, CLASS, is_normal=lambda specie: specie == "no")


def _build_nested(b: Builder, base: Path) -> None:
    if _has_yes_no(base):
        b.warn(f"top-level yes/ and no/ (duplicates in the Kaggle archive) ignored; {NESTED}/ used")
    _build(b, base / NESTED)


@register("brainmri", description="Brain MRI: brain_tumor_dataset/{no,yes}/ (AnomalyCLIP, Kaggle) or {no,yes}/ "
                                  "(ViP2-CLIP)",
          layout="""
<root>/                                   (or <root>/BrainMRI/)
  brain_tumor_dataset/no/1 no.jpeg        (AnomalyCLIP, Crane, the Kaggle download)
  brain_tumor_dataset/yes/Y1.jpg          (.jpg .jpeg .JPG .png)
or
  no/  yes/                               (ViP2-CLIP, BSR)
or AdaCLIP's brain_mri/{train/good, test/{good,defect}}/
""", differences="paths relative to the root (script: absolute); files sorted, folders sorted (script: "
                 "os.listdir order); files beside the folders ignored (script: crash)")
def convert(root: Path) -> ConversionResult:
    return first_match(root, [
        Variant("AnomalyCLIP brain_tumor_dataset tree", lambda base: _has_yes_no(base / NESTED), _build_nested),
        Variant("ViP2-CLIP no/yes tree", _has_yes_no, _build),
        mvtec_variant("AdaCLIP brain_mri tree", ["brain_mri"], masks=False),
    ], wrappers=("BrainMRI",))
