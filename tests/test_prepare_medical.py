"""`zsad prepare` on fake medical trees shaped like the real downloads and the official scripts' trees.

Where an official script writes absolute paths (brainmri, br35, clinicDB, colonDB, kvasir,
endoTect, tn3k, ViP2-CLIP's head_ct) the expectation is written as that script writes it and the
comparison is on resolved paths (``os.path.join(root, path)``, as every loader does)."""
from __future__ import annotations

from pathlib import Path

import pytest
from prepare_trees import image, item, mask, mvtec_class, mvtec_expected, resolved, written

from zsadcli.data.prepare import prepare_dataset


def _same_files(root: Path, official: dict) -> None:
    ours = written(root)
    assert resolved(root, ours) == resolved(root, official)
    for classes in ours.values():  # and ours are relative
        for items in classes.values():
            assert all(not it["img_path"].startswith("/") and not it["mask_path"].startswith("/") for it in items)


# ---------------------------------------------------------------- HeadCT

def test_headct_anomalyclip_tree(tmp_path):
    for name in ("000.png", "001.png"):
        image(tmp_path / "brain/test/good" / name)
    for name in ("100.png", "101.png"):
        image(tmp_path / "brain/test/hemorrhage" / name)
    prepare_dataset("headct", tmp_path)
    assert written(tmp_path) == {"train": {}, "test": {"brain": [
        item("brain/test/good/000.png", "", "brain", "good", 0),
        item("brain/test/good/001.png", "", "brain", "good", 0),
        item("brain/test/hemorrhage/100.png", "", "brain", "hemorrhage", 1),
        item("brain/test/hemorrhage/101.png", "", "brain", "hemorrhage", 1)]}}


LABELS_CSV = "id, hemorrhage\n0,1\n1,1\n100,0\n101,0\n"


def _vip_expected(root: Path, image_dir: str) -> dict:
    # ViP2-CLIP's head_ct.py: absolute img_path, specie_name = the file name, anomaly from labels.csv
    labels = {"000.png": 1, "001.png": 1, "100.png": 0, "101.png": 0}
    return {"train": {}, "test": {"brain": [item(f"{root}/{image_dir}/{n}", "", "brain", n, a)
                                            for n, a in labels.items()]}}


def test_headct_vip_tree_with_labels_csv_in_the_parent(tmp_path):
    root = tmp_path / "head_ct"
    for n in ("000.png", "001.png", "100.png", "101.png"):
        image(root / "brain" / n)
    (tmp_path / "labels.csv").write_text(LABELS_CSV)  # where ViP2-CLIP's script reads it
    outcome = prepare_dataset("headct", root)
    _same_files(root, _vip_expected(root, "brain"))
    assert outcome.variant == "images with labels.csv"


def test_headct_kaggle_download(tmp_path):
    for n in ("000.png", "001.png", "100.png", "101.png"):
        image(tmp_path / "head_ct/head_ct" / n)
    (tmp_path / "labels.csv").write_text(LABELS_CSV)
    prepare_dataset("headct", tmp_path)
    _same_files(tmp_path, _vip_expected(tmp_path, "head_ct/head_ct"))
    assert written(tmp_path)["test"]["brain"][0] == item("head_ct/head_ct/000.png", "", "brain", "000.png", 1)


def test_headct_image_missing_from_labels_csv_is_reported(tmp_path):
    for n in ("000.png", "150.png"):
        image(tmp_path / "head_ct/head_ct" / n)
    (tmp_path / "labels.csv").write_text(LABELS_CSV)
    outcome = prepare_dataset("headct", tmp_path, skip_bad=True)
    assert [p.path for p in outcome.skipped] == ["head_ct/head_ct/150.png"]
    assert "no label" in outcome.skipped[0].reason


def test_headct_adaclip_tree(tmp_path):
    root = tmp_path / "HeadCT_anomaly_detection"
    image(root / "headct/test/good/000.png")
    image(root / "headct/test/defect/100.png")
    (root / "headct/train/good").mkdir(parents=True)  # AdaCLIP leaves it empty
    prepare_dataset("headct", root)
    assert written(root) == {"train": {"headct": []}, "test": {"headct": [
        item("headct/test/defect/100.png", "", "headct", "defect", 1),
        item("headct/test/good/000.png", "", "headct", "good", 0)]}}


# ---------------------------------------------------------------- BrainMRI

BRAIN_NO = ("1 no.jpeg", "No12.jpg", "no 98.jpg")
BRAIN_YES = ("Y1.jpg", "Y10.JPG", "Y146.JPG", "y0.png")


def _brain_folders(folder: Path) -> None:
    for n in BRAIN_NO:
        image(folder / "no" / n)
    for n in BRAIN_YES:
        image(folder / "yes" / n)


def _brain_expected(prefix: str) -> dict:
    return {"train": {}, "test": {"brain": [item(f"{prefix}no/{n}", "", "brain", "no", 0) for n in sorted(BRAIN_NO)]
                                  + [item(f"{prefix}yes/{n}", "", "brain", "yes", 1) for n in sorted(BRAIN_YES)]}}


def test_brainmri_kaggle_archive_uses_brain_tumor_dataset(tmp_path):
    _brain_folders(tmp_path / "brain_tumor_dataset")
    _brain_folders(tmp_path)  # the archive's duplicate top-level yes/ and no/
    outcome = prepare_dataset("brainmri", tmp_path)
    # AnomalyCLIP's brainmri.py: img_path f"{root}/brain_tumor_dataset/{specie}/{name}"
    _same_files(tmp_path, _brain_expected(f"{tmp_path}/brain_tumor_dataset/"))
    assert written(tmp_path) == _brain_expected("brain_tumor_dataset/")
    assert any("duplicates" in w for w in outcome.warnings)


def test_brainmri_vip_tree_without_brain_tumor_dataset(tmp_path):
    _brain_folders(tmp_path)
    outcome = prepare_dataset("brainmri", tmp_path)
    assert written(tmp_path) == _brain_expected("")
    assert outcome.variant == "ViP2-CLIP no/yes tree"


def test_brainmri_adaclip_tree(tmp_path):
    root = tmp_path / "BrainMRI"
    image(root / "brain_mri/train/good/a.jpg")
    image(root / "brain_mri/test/good/b.jpg")
    image(root / "brain_mri/test/defect/c.jpg")
    prepare_dataset("brainmri", root)
    assert written(root) == {"train": {"brain_mri": [item("brain_mri/train/good/a.jpg", "", "brain_mri", "good", 0)]},
                             "test": {"brain_mri": [item("brain_mri/test/defect/c.jpg", "", "brain_mri", "defect", 1),
                                                    item("brain_mri/test/good/b.jpg", "", "brain_mri", "good", 0)]}}


# ---------------------------------------------------------------- Br35H

def test_br35h_kaggle_download_leaves_pred_out(tmp_path):
    for n in ("no0.jpg", "no1.jpg", "no10.jpg"):
        image(tmp_path / "no" / n)
    for n in ("y0.jpg", "y1.jpg"):
        image(tmp_path / "yes" / n)
    image(tmp_path / "pred/pred0.jpg")
    outcome = prepare_dataset("br35h", tmp_path)
    # br35.py: f"{root}/" + f"/{specie}/{name}" (doubled slash), anomalous unless 'no'
    official = {"train": {}, "test": {"brain": [
        item(f"{tmp_path}//no/{n}", "", "brain", "no", 0) for n in ("no0.jpg", "no1.jpg", "no10.jpg")] + [
        item(f"{tmp_path}//yes/{n}", "", "brain", "yes", 1) for n in ("y0.jpg", "y1.jpg")]}}
    _same_files(tmp_path, official)
    assert any("pred/" in w for w in outcome.warnings)


def test_br35h_crane_tree(tmp_path):
    image(tmp_path / "brain/no/no0.jpg")
    image(tmp_path / "brain/yes/y0.jpg")
    prepare_dataset("br35h", tmp_path)
    assert written(tmp_path) == {"train": {}, "test": {"brain": [item("brain/no/no0.jpg", "", "brain", "no", 0),
                                                                 item("brain/yes/y0.jpg", "", "brain", "yes", 1)]}}


def test_br35h_adaclip_tree(tmp_path):
    root = tmp_path / "Br35h_anomaly_detection"
    image(root / "br35h/test/good/no0.jpg")
    image(root / "br35h/test/defect/y0.jpg")
    prepare_dataset("br35h", tmp_path)  # from the folder above: found inside the wrapper
    assert written(tmp_path)["test"]["br35h"] == [
        item("Br35h_anomaly_detection/br35h/test/defect/y0.jpg", "", "br35h", "defect", 1),
        item("Br35h_anomaly_detection/br35h/test/good/no0.jpg", "", "br35h", "good", 0)]


# ---------------------------------------------------------------- ISIC 2016

ISIC_IDS = ("ISIC_0000003", "ISIC_0000012", "ISIC_0000013")


def test_isic_anomalyclip_tree(tmp_path):
    specie = "ISBI2016_ISIC_Part1_Test_Data"
    for i in ISIC_IDS:
        image(tmp_path / "skin/test" / specie / f"{i}.jpg")
        mask(tmp_path / "skin/ISBI2016_ISIC_Part1_Test_GroundTruth" / f"{i}_Segmentation.png")
    prepare_dataset("isic", tmp_path)
    assert written(tmp_path) == {"train": {}, "test": {"skin": [
        item(f"skin/test/{specie}/{i}.jpg", f"skin/ISBI2016_ISIC_Part1_Test_GroundTruth/{i}_Segmentation.png",
             "skin", specie, 1) for i in ISIC_IDS]}}


def test_isic_vip_tree(tmp_path):
    for phase in ("train", "test"):
        for i in ISIC_IDS[:2] if phase == "train" else ISIC_IDS[2:]:
            image(tmp_path / "skin" / phase / "defect" / f"{i}.jpg")
            mask(tmp_path / "skin/ground_truth/defect" / f"{i}_Segmentation.png")
    outcome = prepare_dataset("isic", tmp_path)
    # both phases share ground_truth/defect/: the script's per-phase sorted-position pairing would give
    # the test image the first mask; name pairing does not, and says so
    assert any("ISIC_0000013.jpg the mask ISIC_0000003_Segmentation.png" in w for w in outcome.warnings)
    meta = written(tmp_path)
    assert meta["train"]["skin"] == [item(f"skin/train/defect/{i}.jpg", f"skin/ground_truth/defect/{i}_Segmentation.png",
                                          "skin", "defect", 1) for i in ISIC_IDS[:2]]
    assert meta["test"]["skin"] == [item(f"skin/test/defect/{i}.jpg", f"skin/ground_truth/defect/{i}_Segmentation.png",
                                         "skin", "defect", 1) for i in ISIC_IDS[2:]]


def test_isic_crane_tree(tmp_path):
    for i in ISIC_IDS:
        image(tmp_path / "skin/test/defect" / f"{i}.jpg")
        mask(tmp_path / "skin/ground_truth" / f"{i}_Segmentation.png")
    prepare_dataset("isic", tmp_path)
    assert written(tmp_path) == {"train": {}, "test": {"skin": [
        item(f"skin/test/defect/{i}.jpg", f"skin/ground_truth/{i}_Segmentation.png", "skin", "defect", 1)
        for i in ISIC_IDS]}}


def test_isic_challenge_download(tmp_path):
    for i in ISIC_IDS:
        image(tmp_path / "ISBI2016_ISIC_Part1_Test_Data" / f"{i}.jpg")
        mask(tmp_path / "ISBI2016_ISIC_Part1_Test_GroundTruth" / f"{i}_Segmentation.png")
    image(tmp_path / "ISBI2016_ISIC_Part1_Training_Data/ISIC_0000000.jpg")
    outcome = prepare_dataset("isic", tmp_path)
    assert written(tmp_path) == {"train": {}, "test": {"skin": [
        item(f"ISBI2016_ISIC_Part1_Test_Data/{i}.jpg", f"ISBI2016_ISIC_Part1_Test_GroundTruth/{i}_Segmentation.png",
             "skin", "ISBI2016_ISIC_Part1_Test_Data", 1) for i in ISIC_IDS]}}
    assert any("Training" in w for w in outcome.warnings)


def test_isic_adaclip_tree(tmp_path):
    root = tmp_path / "ISIC"
    mvtec_class(root, "isic", {"defect": list(ISIC_IDS)}, [], ["ISIC_0000001"], img_ext=".jpg",
                mask_suffix="_Segmentation")
    prepare_dataset("isic", root)
    train, test = mvtec_expected("isic", {"defect": list(ISIC_IDS)}, [], ["ISIC_0000001"], img_ext=".jpg",
                                 mask_suffix="_Segmentation")
    assert written(root) == {"train": {"isic": train}, "test": {"isic": test}}


# ---------------------------------------------------------------- colon and thyroid image/mask folders

def _official_folder_pairs(root: Path, images: str, masks: str, names: list[str], cls: str, mask_names=None) -> dict:
    """clinicDB/colonDB/kvasir/tn3k.py: absolute paths, sorted-position pairing, specie '', anomaly 1."""
    mask_names = mask_names or names
    return {"train": {}, "test": {cls: [item(f"{root}/{images}/{n}", f"{root}/{masks}/{m}", cls, "", 1)
                                        for n, m in zip(sorted(names), sorted(mask_names))]}}


@pytest.mark.parametrize("dataset", ["clinicdb", "colondb"])
def test_cvc_images_and_masks(tmp_path, dataset):
    names = ["1.png", "10.png", "2.png", "100.png"]
    for n in names:
        image(tmp_path / "images" / n)
        mask(tmp_path / "masks" / n)
    prepare_dataset(dataset, tmp_path)
    _same_files(tmp_path, _official_folder_pairs(tmp_path, "images", "masks", names, "colon"))
    assert written(tmp_path)["test"]["colon"][0] == item("images/1.png", "masks/1.png", "colon", "", 1)


def test_clinicdb_cvc612_tif_download(tmp_path):
    for n in ("1.tif", "2.tif", "12.tif"):
        image(tmp_path / "Original" / n)
        mask(tmp_path / "Ground Truth" / n)
    outcome = prepare_dataset("clinicdb", tmp_path)
    assert written(tmp_path) == {"train": {}, "test": {"colon": [
        item(f"Original/{n}", f"Ground Truth/{n}", "colon", "", 1) for n in ("1.tif", "12.tif", "2.tif")]}}
    assert outcome.variant == "CVC-612 Original/ + Ground Truth/"


def test_clinicdb_kaggle_png_and_tif_folders(tmp_path):
    for fmt in ("PNG", "TIF"):
        ext = ".png" if fmt == "PNG" else ".tif"
        image(tmp_path / fmt / "Original" / f"1{ext}")
        mask(tmp_path / fmt / "Ground Truth" / f"1{ext}")
    outcome = prepare_dataset("clinicdb", tmp_path)
    assert written(tmp_path)["test"]["colon"] == [item("PNG/Original/1.png", "PNG/Ground Truth/1.png", "colon", "", 1)]
    assert outcome.variant.endswith("(inside PNG/)")


@pytest.mark.parametrize("dataset, folder, cls", [("clinicdb", "CVC-ClinicDB", "ClinicDB"),
                                                  ("colondb", "CVC-ColonDB", "ColonDB"),
                                                  ("endo", "EndoTect", "endo")])
def test_adaclip_pixel_level_trees(tmp_path, dataset, folder, cls):
    mvtec_class(tmp_path / folder, cls, {"defect": ["1", "2"]}, ["3"], ["4"])
    outcome = prepare_dataset(dataset, tmp_path / folder)
    train, test = mvtec_expected(cls, {"defect": ["1", "2"]}, ["3"], ["4"])
    assert written(tmp_path / folder) == {"train": {cls: train}, "test": {cls: test}}
    assert outcome.variant.startswith("AdaCLIP")


def test_kvasir_seg_archive_folder(tmp_path):
    names = ["cju0qkwl35piu0993l0dewei2.jpg", "cju0qoxqj9q6s0835b43399p4.jpg", "cju0roawvklrq0799vmjorwfv.jpg"]
    for n in names:
        image(tmp_path / "Kvasir-SEG/images" / n)
        mask(tmp_path / "Kvasir-SEG/masks" / n)
    (tmp_path / "Kvasir-SEG/kavsir_bboxes.json").write_text("{}")
    prepare_dataset("kvasir", tmp_path / "Kvasir-SEG")
    root = tmp_path / "Kvasir-SEG"
    _same_files(root, _official_folder_pairs(root, "images", "masks", names, "colon"))
    prepare_dataset("kvasir", tmp_path)  # from the folder above
    assert written(tmp_path)["test"]["colon"][0]["img_path"] == f"Kvasir-SEG/images/{names[0]}"


def test_tn3k(tmp_path):
    root = tmp_path / "tn3k"
    names = ["0000.jpg", "0001.jpg", "0013.jpg"]
    for n in names:
        image(root / "test-image" / n)
        mask(root / "test-mask" / n)
    image(root / "trainval-image/0002.jpg")
    mask(root / "trainval-mask/0002.jpg")
    prepare_dataset("tn3k", root)
    _same_files(root, _official_folder_pairs(root, "test-image", "test-mask", names, "thyroid"))


def test_tn3k_adaclip_tree(tmp_path):
    root = tmp_path / "TN3K"
    mvtec_class(root, "tn3k", {"defect": ["0000", "0001"]}, ["0005"], [], img_ext=".jpg", mask_ext=".jpg",
                mask_suffix="")
    outcome = prepare_dataset("tn3k", root)
    assert outcome.variant == "AdaCLIP tn3k tree"
    assert written(root)["test"]["tn3k"] == [item(f"tn3k/test/defect/{i}.jpg", f"tn3k/ground_truth/defect/{i}.jpg",
                                                  "tn3k", "defect", 1) for i in ("0000", "0001")]


def test_endotect(tmp_path):
    names = ["0a1b.jpg", "1c2d.jpg"]
    for n in names:
        image(tmp_path / "images" / n)
        mask(tmp_path / "masks" / n)
    prepare_dataset("endo", tmp_path)
    # endoTect.py: species = folders except masks/, anomalous unless 'good', absolute paths
    _same_files(tmp_path, {"train": {}, "test": {"colon": [
        item(f"{tmp_path}/images/{n}", f"{tmp_path}/masks/{n}", "colon", "images", 1) for n in names]}})


# ---------------------------------------------------------------- COVID-19

def test_covid_anomalyclip_flat_folders(tmp_path):
    layout = {"NORMAL": ["NORMAL (1).png", "NORMAL (2).png"], "COVID-19": ["COVID-19 (1).png"],
              "Viral Pneumonia": ["Viral Pneumonia (1).png"]}
    for specie, names in layout.items():
        for n in names:
            image(tmp_path / specie / n)
    prepare_dataset("covid", tmp_path)
    # covid.py: relative f"{specie}/{name}", anomalous unless NORMAL, class chest
    assert written(tmp_path) == {"train": {}, "test": {"chest": [
        item(f"{s}/{n}", "", "chest", s, int(s != "NORMAL")) for s in sorted(layout) for n in layout[s]]}}


def test_covid_kaggle_current_layout(tmp_path):
    root = tmp_path / "COVID-19_Radiography_Dataset"
    for specie in ("COVID", "Lung_Opacity", "Normal", "Viral Pneumonia"):
        image(root / specie / "images" / f"{specie}-1.png")
        mask(root / specie / "masks" / f"{specie}-1.png")  # lung masks: not used
    (root / "README.md.txt").write_text("readme")
    (root / "Normal.metadata.xlsx").write_bytes(b"PK")
    outcome = prepare_dataset("covid", tmp_path)
    assert outcome.variant == "Kaggle <class>/images/ tree (inside COVID-19_Radiography_Dataset/)"
    assert written(tmp_path)["test"]["chest"] == [
        item(f"COVID-19_Radiography_Dataset/{s}/images/{s}-1.png", "", "chest", s, int(s != "Normal"))
        for s in ("COVID", "Lung_Opacity", "Normal", "Viral Pneumonia")]
