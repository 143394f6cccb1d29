"""DAGM 2007 as uploaded to Kaggle (``DAGM_KaggleUpload``), with ViP2-CLIP's ``DAGM.py`` semantics.

AnomalyCLIP's script writes ``Train``/``Test`` keys, which no loader reads; ViP2-CLIP's (and
Crane's) writes ``train``/``test``. Per class and phase: an image is defective when
``Label/<id>_label.PNG`` exists; items are the normal images, then the defective ones in label order;
``specie_name`` is empty. AdaCLIP's re-packaging (``DAGM_anomaly_detection``) is MVTec-style.
"""
from __future__ import annotations

from pathlib import Path

from zsadcli.data.converters.base import Builder, ConversionResult, Variant, first_match, register
from zsadcli.data.converters.common import MVTEC_STYLE_DIFFERENCES, list_images, mvtec_variant, pair_masks

CLASSES = tuple(f"Class{i}" for i in range(1, 11))
PHASES = (("Train", "train"), ("Test", "test"))


def _is_kaggle(base: Path) -> bool:
    return any((base / c / phase / "Label").is_dir() for c in CLASSES for phase, _ in PHASES)


def _build_kaggle(b: Builder, base: Path) -> None:
    present = [c for c in CLASSES if any((base / c / phase).is_dir() for phase, _ in PHASES)]
    missing = [c for c in CLASSES if c not in present]
    if missing:
        b.warn(f"classes not found (left out): {', '.join(missing)}")
    for cls in present:
        for folder, split in PHASES:
            b.ensure_class(split, cls)
            phase_dir = base / cls / folder
            if not phase_dir.is_dir():
                continue
            label_dir = phase_dir / "Label"
            images = list_images(b, phase_dir)
            labels = list_images(b, label_dir, expected_extras=("Labels.txt",)) if label_dir.is_dir() else []
            if not label_dir.is_dir():
                b.warn(f"{b.rel(label_dir)}/ not found: every image of {b.rel(phase_dir)}/ counted as normal")
            # A label file marks its image defective; labels are never paired by position here.
            pairing = pair_masks(images, labels, allow_index=False)
            for image, label in pairing.pairs:
                if label is None:
                    b.add(split, cls, phase_dir / image, None, "", 0)
            for image, label in sorted((p for p in pairing.pairs if p[1] is not None), key=lambda p: p[1]):
                b.add(split, cls, phase_dir / image, label_dir / label, "", 1)
            for label in pairing.orphans:
                b.problem(label_dir / label, f"label without its image in {b.rel(phase_dir)}/")


@register("dagm", description="DAGM 2007 (Kaggle): ClassN/{Train,Test}/NNNN.PNG + ClassN/{Train,Test}/Label/NNNN_label.PNG",
          layout="""
<root>/                                   (or <root>/DAGM_KaggleUpload/)
  Class1/ ... Class10/
    Train/0001.PNG
    Train/Label/0001_label.PNG            (only for defective images; Labels.txt ignored)
    Test/0002.PNG
    Test/Label/0002_label.PNG
or AdaCLIP's re-packaging (DAGM_anomaly_detection/):
  Class1/ ... Class10/{train/good, test/{good,defect}, ground_truth/defect/NNNN_label.PNG}
""", differences="keys train/test as ViP2-CLIP writes them (AnomalyCLIP's script writes Train/Test, which the "
                 "loaders cannot read); normal images sorted (script: Python set order); a label whose image "
                 "is missing is reported (script: lists the missing image); any image extension accepted "
                 "(script: .PNG only). AdaCLIP tree: " + MVTEC_STYLE_DIFFERENCES)
def convert(root: Path) -> ConversionResult:
    return first_match(root, [
        Variant("Kaggle DAGM_KaggleUpload tree", _is_kaggle, _build_kaggle),
        mvtec_variant("AdaCLIP DAGM_anomaly_detection tree", CLASSES),
    ], wrappers=("DAGM_KaggleUpload", "DAGM_anomaly_detection"))
