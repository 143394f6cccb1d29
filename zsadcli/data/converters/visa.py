"""VisA from its own split file ``split_csv/1cls.csv`` (AnomalyCLIP's ``visa.py``).

Records are the CSV rows of each class and split in CSV order: ``img_path`` and ``mask_path`` are
the CSV's columns, ``specie_name`` is empty, a row is anomalous when its label is ``anomaly``.
"""
from __future__ import annotations

import csv
from pathlib import Path

from zsadcli.data.converters.base import Builder, ConversionResult, Variant, first_match, register

CLASSES = ("candle", "capsules", "cashew", "chewinggum", "fryum", "macaroni1", "macaroni2", "pcb1", "pcb2",
           "pcb3", "pcb4", "pipe_fryum")
SPLIT_FILE = ("split_csv", "1cls.csv")
HEADER = ["object", "split", "label", "image", "mask"]


def _build(b: Builder, base: Path) -> None:
    csv_path = base.joinpath(*SPLIT_FILE)
    with open(csv_path, newline="", encoding="utf-8") as f:
        rows = [row for row in csv.reader(f) if row]
    header, rows = (rows[0], rows[1:]) if rows else ([], [])
    if [h.strip() for h in header] != HEADER:
        b.warn(f"{b.rel(csv_path)} header is {','.join(header)!r}; expected {','.join(HEADER)} "
               f"(columns are read by position, as the official script does)")
    short = [i for i, row in enumerate(rows, start=2) if len(row) < 4]
    if short:
        b.problem(csv_path, f"rows with fewer than 4 columns (lines {', '.join(map(str, short[:5]))})")
    rows = [row for row in rows if len(row) >= 4]
    present = [c for c in CLASSES if (base / c).is_dir()]
    missing = [c for c in CLASSES if c not in present]
    if missing:
        b.warn(f"class folders not found (left out): {', '.join(missing)}")
    unknown = sorted({row[0] for row in rows} - set(CLASSES))
    if unknown:
        b.warn(f"objects in {b.rel(csv_path)} that are not VisA classes (ignored): {', '.join(unknown)}")
    for cls in present:
        for split in ("train", "test"):
            b.ensure_class(split, cls)
            for row in rows:
                if row[0] != cls or row[1] != split:
                    continue
                anomalous = row[2] == "anomaly"
                mask = row[4] if anomalous and len(row) > 4 else ""
                if anomalous and not mask:
                    b.problem(base / row[3], f"anomalous row without a mask in {b.rel(csv_path)}")
                    continue
                b.add(split, cls, base / row[3], base / mask if anomalous else None, "", int(anomalous))


@register("visa", description="VisA: <cls>/Data/{Images,Masks}/... listed by split_csv/1cls.csv "
                              "(object,split,label,image,mask)",
          layout="""
<root>/                         (or <root>/VisA_20220922/)
  split_csv/1cls.csv            header: object,split,label,image,mask
  candle/ capsules/ ... pipe_fryum/
    Data/Images/Normal/0000.JPG
    Data/Images/Anomaly/000.JPG
    Data/Masks/Anomaly/000.png
""", differences="class folders absent from the tree are left out with a warning (script: lists their rows "
                 "anyway); an anomalous row without a mask is reported (script: writes NaN)")
def convert(root: Path) -> ConversionResult:
    variant = Variant("VisA with split_csv/1cls.csv", lambda base: base.joinpath(*SPLIT_FILE).is_file(), _build)
    return first_match(root, [variant], wrappers=("VisA_20220922", "VisA"))
