"""`zsad prepare` on fake industrial trees shaped like the real downloads; expected records follow
the official generate_dataset_json scripts (AnomalyCLIP; ViP2-CLIP for DAGM), species sorted."""
from __future__ import annotations

import json
from pathlib import Path

from prepare_trees import image, item, mask, mvtec_class, mvtec_expected, written

from zsadcli.data.prepare import SIDECAR, prepare_dataset

MVTEC = ("bottle", "cable", "capsule", "carpet", "grid", "hazelnut", "leather", "metal_nut", "pill", "screw",
         "tile", "toothbrush", "transistor", "wood", "zipper")


def _mvtec_family(root: Path, classes, defects, **kw) -> dict:
    expected = {"train": {}, "test": {}}
    for cls in classes:
        mvtec_class(root, cls, defects, good_train=["000", "001"], good_test=["000"], **{
            k: v for k, v in kw.items() if k in ("normal", "img_ext", "mask_ext", "mask_suffix")})
        expected["train"][kw.get("cls_name", cls)], expected["test"][kw.get("cls_name", cls)] = mvtec_expected(
            cls, defects, ["000", "001"], ["000"], **kw)
    return expected


def test_mvtec_all_classes_in_script_order(tmp_path):
    root = tmp_path / "mvtec_anomaly_detection"
    expected = _mvtec_family(root, MVTEC, {"broken_large": ["000", "001"], "contamination": ["000"]})
    (root / "license.txt").write_text("CC BY-NC-SA 4.0")
    (root / "readme.txt").write_text("MVTec AD")
    outcome = prepare_dataset("mvtec", root)
    meta = written(root)
    assert meta == expected
    assert list(meta["test"]) == list(MVTEC)
    assert outcome.warnings == [] and outcome.skipped == []
    assert meta["test"]["bottle"][0] == item("bottle/test/broken_large/000.png",
                                             "bottle/ground_truth/broken_large/000_mask.png", "bottle", "broken_large", 1)
    # the serialisation is the official one: json.dumps(indent=4) + "\n", no extra top-level keys
    assert (root / "meta.json").read_text() == json.dumps(expected, indent=4) + "\n"
    sidecar = json.loads((root / SIDECAR).read_text())
    assert sidecar["dataset"] == "mvtec" and sidecar["variant"] == "MVTec AD tree" and sidecar["skipped"] == []


def test_mvtec_inside_its_archive_folder_keeps_paths_relative_to_root(tmp_path):
    _mvtec_family(tmp_path / "mvtec_anomaly_detection", ("bottle",), {"broken_large": ["000"]})
    outcome = prepare_dataset("mvtec", tmp_path)
    assert "inside mvtec_anomaly_detection/" in outcome.variant
    assert written(tmp_path)["test"]["bottle"][0]["img_path"] == "mvtec_anomaly_detection/bottle/test/broken_large/000.png"
    assert any("classes not found" in w for w in outcome.warnings)


def test_mpdd(tmp_path):
    classes = ("bracket_black", "bracket_brown", "bracket_white", "connector", "metal_plate", "tubes")
    expected = _mvtec_family(tmp_path, classes, {"parallel_defect": ["000"], "scratches": ["000", "001"]})
    prepare_dataset("mpdd", tmp_path)
    assert written(tmp_path) == expected


def test_btad_ok_ko_with_bmp_and_png_in_its_archive_folder(tmp_path):
    root = tmp_path / "BTech_Dataset_transformed"
    # the real mixture: 01 .bmp images + .png masks, 02 .png + .png, 03 .bmp + .bmp
    exts = {"01": (".bmp", ".png"), "02": (".png", ".png"), "03": (".bmp", ".bmp")}
    expected = {"train": {}, "test": {}}
    for cls, (img_ext, mask_ext) in exts.items():
        mvtec_class(root, cls, {"ko": ["0000", "0001"]}, ["0000", "0001"], ["0000"], normal="ok",
                    img_ext=img_ext, mask_ext=mask_ext, mask_suffix="")
        expected["train"][cls], expected["test"][cls] = mvtec_expected(
            cls, {"ko": ["0000", "0001"]}, ["0000", "0001"], ["0000"], normal="ok", img_ext=img_ext,
            mask_ext=mask_ext, mask_suffix="")
    prepare_dataset("btad", root)
    meta = written(root)
    assert meta == expected
    assert meta["test"]["01"][0] == item("01/test/ko/0000.bmp", "01/ground_truth/ko/0000.png", "01", "ko", 1)
    assert meta["test"]["03"][-1] == item("03/test/ok/0000.bmp", "", "03", "ok", 0)
    # the same tree from the folder above: same files, paths relative to that root
    outcome = prepare_dataset("btad", tmp_path)
    assert outcome.variant.endswith("(inside BTech_Dataset_transformed/)")
    assert written(tmp_path)["test"]["02"][0]["img_path"] == "BTech_Dataset_transformed/02/test/ko/0000.png"


def test_dtd_synthetic_in_anomalyclip_class_order(tmp_path):
    classes = ("Woven_001", "Woven_127", "Woven_104", "Stratified_154", "Blotchy_099", "Woven_068", "Woven_125",
               "Marbled_078", "Perforated_037", "Mesh_114", "Fibrous_183", "Matted_069")
    expected = _mvtec_family(tmp_path / "DTD-Synthetic", sorted(classes), {"bad": ["000", "001"]})
    prepare_dataset("dtd", tmp_path / "DTD-Synthetic")
    meta = written(tmp_path / "DTD-Synthetic")
    assert list(meta["test"]) == list(classes)
    assert meta == {split: {c: expected[split][c] for c in classes} for split in expected}


def _sdd_tree(root: Path, folder: str) -> None:
    mvtec_class(root, folder, {"defect": ["kos01_Part5_0", "kos10_Part3_2"]},
                good_train=["kos01_Part0_0", "kos02_Part1_1"], good_test=["kos01_Part0_1"])


def test_sdd_anomalyclip_class_with_a_space(tmp_path):
    _sdd_tree(tmp_path, "electrical commutators")
    prepare_dataset("sdd", tmp_path)
    train, test = mvtec_expected("electrical commutators", {"defect": ["kos01_Part5_0", "kos10_Part3_2"]},
                                 ["kos01_Part0_0", "kos02_Part1_1"], ["kos01_Part0_1"])
    assert written(tmp_path) == {"train": {"electrical commutators": train}, "test": {"electrical commutators": test}}
    assert test[0]["mask_path"] == "electrical commutators/ground_truth/defect/kos01_Part5_0_mask.png"


def test_sdd_readme_spelling_keeps_the_official_class_name(tmp_path):
    _sdd_tree(tmp_path, "electrical_commutators")
    prepare_dataset("sdd", tmp_path)
    meta = written(tmp_path)
    assert list(meta["test"]) == ["electrical commutators"]
    assert meta["test"]["electrical commutators"][0] == item(
        "electrical_commutators/test/defect/kos01_Part5_0.png",
        "electrical_commutators/ground_truth/defect/kos01_Part5_0_mask.png", "electrical commutators", "defect", 1)


def test_sdd_dra_adaclip_conversion(tmp_path):
    _sdd_tree(tmp_path / "SDD_anomaly_detection", "SDD")
    outcome = prepare_dataset("sdd", tmp_path / "SDD_anomaly_detection")
    train, test = mvtec_expected("SDD", {"defect": ["kos01_Part5_0", "kos10_Part3_2"]},
                                 ["kos01_Part0_0", "kos02_Part1_1"], ["kos01_Part0_1"])
    assert written(tmp_path / "SDD_anomaly_detection") == {"train": {"SDD": train}, "test": {"SDD": test}}
    assert outcome.variant == "DRA/AdaCLIP tree"


def _dagm_kaggle(root: Path) -> dict:
    """ClassN/{Train,Test}/NNNN.PNG, Label/NNNN_label.PNG for defective ones, plus Labels.txt."""
    expected = {"train": {}, "test": {}}
    for n in range(1, 11):
        cls = f"Class{n}"
        for phase, ids, defects in (("Train", ["0001", "0003", "0004", "0007"], ["0007", "0003"]),
                                    ("Test", ["0002", "0005", "0006"], ["0006"])):
            for i in ids:
                image(root / cls / phase / f"{i}.PNG")
            for i in defects:
                mask(root / cls / phase / "Label" / f"{i}_label.PNG")
            (root / cls / phase / "Label" / "Labels.txt").write_text("1\n")
            # ViP2-CLIP's records: normal images, then the defective ones in sorted label order
            normals = [item(f"{cls}/{phase}/{i}.PNG", "", cls, "", 0) for i in sorted(set(ids) - set(defects))]
            defective = [item(f"{cls}/{phase}/{i}.PNG", f"{cls}/{phase}/Label/{i}_label.PNG", cls, "", 1)
                         for i in sorted(defects)]
            expected[phase.lower()][cls] = normals + defective
    return expected


def test_dagm_kaggle_upload_with_lowercase_keys(tmp_path):
    root = tmp_path / "DAGM_KaggleUpload"
    expected = _dagm_kaggle(root)
    outcome = prepare_dataset("dagm", root)
    meta = written(root)
    assert set(meta) == {"train", "test"}  # not AnomalyCLIP's Train/Test
    assert meta == expected
    assert meta["test"]["Class1"] == [item("Class1/Test/0002.PNG", "", "Class1", "", 0),
                                      item("Class1/Test/0005.PNG", "", "Class1", "", 0),
                                      item("Class1/Test/0006.PNG", "Class1/Test/Label/0006_label.PNG", "Class1", "", 1)]
    assert outcome.warnings == []  # Labels.txt is expected, not reported


def test_dagm_adaclip_repackaging(tmp_path):
    root = tmp_path / "DAGM_anomaly_detection"
    expected = {"train": {}, "test": {}}
    for n in range(1, 11):
        cls = f"Class{n}"
        mvtec_class(root, cls, {"defect": ["0003", "0007"]}, ["0001", "0004"], ["0002"], img_ext=".PNG",
                    mask_ext=".PNG", mask_suffix="_label")
        expected["train"][cls], expected["test"][cls] = mvtec_expected(
            cls, {"defect": ["0003", "0007"]}, ["0001", "0004"], ["0002"], img_ext=".PNG", mask_ext=".PNG",
            mask_suffix="_label")
    outcome = prepare_dataset("dagm", root)
    assert written(root) == expected and outcome.variant == "AdaCLIP DAGM_anomaly_detection tree"


VISA = ("candle", "capsules", "cashew", "chewinggum", "fryum", "macaroni1", "macaroni2", "pcb1", "pcb2", "pcb3",
        "pcb4", "pipe_fryum")


def test_visa_from_split_csv_in_csv_order(tmp_path):
    rows = ["object,split,label,image,mask"]
    expected = {"train": {}, "test": {}}
    for cls in VISA:
        normal_train = f"{cls}/Data/Images/Normal/0001.JPG"
        normal_test = f"{cls}/Data/Images/Normal/0000.JPG"
        anomaly = f"{cls}/Data/Images/Anomaly/000.JPG"
        anomaly_mask = f"{cls}/Data/Masks/Anomaly/000.png"
        for rel in (normal_train, normal_test, anomaly):
            image(tmp_path / rel)
        mask(tmp_path / anomaly_mask)
        # CSV order, not sorted order: the anomaly is listed before the test normal
        rows += [f"{cls},train,normal,{normal_train},", f"{cls},test,anomaly,{anomaly},{anomaly_mask}",
                 f"{cls},test,normal,{normal_test},"]
        expected["train"][cls] = [item(normal_train, "", cls, "", 0)]
        expected["test"][cls] = [item(anomaly, anomaly_mask, cls, "", 1), item(normal_test, "", cls, "", 0)]
    (tmp_path / "split_csv").mkdir()
    (tmp_path / "split_csv" / "1cls.csv").write_text("\n".join(rows) + "\n")
    (tmp_path / "LICENSE-DATASET").write_text("CC BY 4.0")
    outcome = prepare_dataset("visa", tmp_path)
    assert written(tmp_path) == expected
    assert list(written(tmp_path)["test"]) == list(VISA) and outcome.warnings == []


def test_visa_real_masks_with_small_label_values_pass_validation(tmp_path):
    from PIL import Image

    image(tmp_path / "candle/Data/Images/Anomaly/000.JPG")
    label = Image.new("L", (8, 8), 0)
    label.putpixel((2, 2), 1)  # VisA masks hold small integers, not 255
    (tmp_path / "candle/Data/Masks/Anomaly").mkdir(parents=True)
    label.save(tmp_path / "candle/Data/Masks/Anomaly/000.png")
    (tmp_path / "split_csv").mkdir()
    (tmp_path / "split_csv/1cls.csv").write_text(
        "object,split,label,image,mask\n"
        "candle,test,anomaly,candle/Data/Images/Anomaly/000.JPG,candle/Data/Masks/Anomaly/000.png\n")
    prepare_dataset("visa", tmp_path)
    assert written(tmp_path)["test"]["candle"][0]["anomaly"] == 1


def test_folder_layout_for_own_data(tmp_path):
    image(tmp_path / "train/widget/good/a.png")
    image(tmp_path / "test/widget/good/b.png")
    image(tmp_path / "test/widget/dent/c.png")
    mask(tmp_path / "ground_truth/widget/dent/c_mask.png")
    image(tmp_path / "test/widget/smudge/d.jpg")  # no ground_truth folder: image-level only
    image(tmp_path / "test/gadget/good/e.png")
    image(tmp_path / "test/gadget/crack/f.png")
    mask(tmp_path / "ground_truth/gadget/crack/f.png")
    outcome = prepare_dataset("folder", tmp_path)
    assert written(tmp_path) == {
        "train": {"widget": [item("train/widget/good/a.png", "", "widget", "good", 0)]},
        "test": {"gadget": [item("test/gadget/crack/f.png", "ground_truth/gadget/crack/f.png", "gadget", "crack", 1),
                            item("test/gadget/good/e.png", "", "gadget", "good", 0)],
                 "widget": [item("test/widget/dent/c.png", "ground_truth/widget/dent/c_mask.png", "widget", "dent", 1),
                            item("test/widget/good/b.png", "", "widget", "good", 0),
                            item("test/widget/smudge/d.jpg", "", "widget", "smudge", 1)]}}
    assert any("test/widget/smudge/" in w and "image-level" in w for w in outcome.warnings)
