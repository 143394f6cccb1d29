"""Head CT (hemorrhage): image-level only, class ``brain``.

- AnomalyCLIP/Crane (``head_ct.py``): ``brain/test/{good,<abnormal>}/`` -> test only, specie =
  folder, anomalous unless ``good``.
- ViP2-CLIP (``head_ct.py``): images directly in ``brain/`` plus the Kaggle ``labels.csv``
  (``id, hemorrhage``) -> anomaly from the CSV, ``specie_name`` = the file name (sic).
- The raw Kaggle download (``head_ct/head_ct/*.png`` + ``labels.csv``) is read like ViP2-CLIP's.
- AdaCLIP (``headct-pre.py``): MVTec-style ``headct/{train/good,test/{good,defect}}``, class ``headct``.
"""
from __future__ import annotations

from pathlib import Path

from zsadcli.data.converters.base import Builder, ConversionResult, Variant, first_match, register
from zsadcli.data.converters.common import add_mvtec_class, list_images, mvtec_variant

CLASS = "brain"
IMAGE_DIRS = ("brain", "head_ct/head_ct", "head_ct")  # ViP2-CLIP's, then the Kaggle archive's


def _labels_csv(base: Path) -> Path | None:
    """labels.csv in the root, or in its parent (where ViP2-CLIP's script reads it from)."""
    for candidate in (base / "labels.csv", base.parent / "labels.csv"):
        if candidate.is_file():
            return candidate
    return None


def _image_dir(base: Path) -> Path | None:
    for rel in IMAGE_DIRS:
        folder = base / rel
        if folder.is_dir() and not (folder / "test").is_dir() and any(folder.iterdir()):
            return folder
    return None


def _read_labels(b: Builder, csv_path: Path) -> dict[int, int]:
    """``id, hemorrhage`` rows -> {id: 0|1}; the header (and any non-numeric line) is skipped."""
    labels: dict[int, int] = {}
    for line in csv_path.read_text(encoding="utf-8-sig").splitlines():
        fields = [f.strip() for f in line.split(",")]
        if len(fields) >= 2 and fields[0].isdigit() and fields[1] in ("0", "1"):
            labels[int(fields[0])] = int(fields[1])
    if not labels:
        b.warn(f"{csv_path} has no 'id, hemorrhage' rows")
    return labels


def _build_labelled(b: Builder, base: Path) -> None:
    image_dir = _image_dir(base)
    csv_path = _labels_csv(base)
    assert image_dir is not None and csv_path is not None  # guaranteed by the match
    labels = _read_labels(b, csv_path)
    b.ensure_class("test", CLASS)
    for name in list_images(b, image_dir):
        stem = name.split(".")[0]
        if not stem.isdigit():
            b.problem(image_dir / name, f"file name is not a numeric id of {csv_path.name}")
        elif int(stem) not in labels:
            b.problem(image_dir / name, f"id {int(stem)} has no label in {csv_path.name}")
        else:
            b.add("test", CLASS, image_dir / name, None, name, labels[int(stem)])


@register("headct", description="Head CT: brain/test/{good,<abnormal>}/ (AnomalyCLIP), or brain/*.png or "
                                "head_ct/head_ct/*.png with labels.csv (ViP2-CLIP, Kaggle)",
          layout="""
<root>/                                   (or <root>/HeadCT_anomaly_detection/)
  brain/test/good/000.png                 (AnomalyCLIP, Crane)
  brain/test/<abnormal>/100.png
or
  labels.csv                              header "id, hemorrhage"; in <root> or its parent
  brain/000.png ...                       (ViP2-CLIP)
  or head_ct/head_ct/000.png ...          (the Kaggle download)
or AdaCLIP's headct/{train/good, test/{good,defect}}/*.png
""", differences="test-only and class 'brain' as the official scripts; files sorted (scripts: os.listdir order); "
                 "ViP2-CLIP layout: paths relative to the root (script: absolute) and specie_name kept as the "
                 "file name, as that script writes it; an image whose id is missing from labels.csv is "
                 "reported (script: KeyError)")
def convert(root: Path) -> ConversionResult:
    return first_match(root, [
        Variant("AnomalyCLIP brain/test tree", lambda base: (base / CLASS / "test").is_dir(),
                lambda b, base: add_mvtec_class(b, base, CLASS, phases=("test",), mask_dir=None)),
        Variant("images with labels.csv", lambda base: _image_dir(base) is not None and _labels_csv(base) is not None,
                _build_labelled),
        mvtec_variant("AdaCLIP headct tree", ["headct"], masks=False),
    ], wrappers=("HeadCT_anomaly_detection",))
