"""`zsad prepare` through the CLI: --list, --check, --dry-run, --force, --skip-bad, --json, exit codes,
and the bad-input cases (pairing errors, unreadable files, mask sizes, unknown layouts)."""
from __future__ import annotations

import json
from pathlib import Path

import pytest
from prepare_trees import image, item, mask, mvtec_class, written
from typer.testing import CliRunner

from zsadcli.cli import app
from zsadcli.data.converters import CONVERTERS
from zsadcli.data.prepare import SIDECAR

DATASETS = ("mvtec", "visa", "mpdd", "btad", "sdd", "dagm", "dtd", "headct", "brainmri", "br35h", "isic", "clinicdb",
            "colondb", "kvasir", "endo", "tn3k", "covid", "synthetic", "folder")


@pytest.fixture()
def runner() -> CliRunner:
    return CliRunner()


def _bottle(root: Path) -> Path:
    mvtec_class(root, "bottle", {"broken_large": ["000", "001"]}, ["000"], ["000"])
    return root


def _prepare(runner: CliRunner, *args: str):
    return runner.invoke(app, ["prepare", *args])


def test_list_shows_every_dataset_with_its_layout(runner):
    result = runner.invoke(app, ["prepare", "--list"], env={"COLUMNS": "250"})
    assert result.exit_code == 0, result.output
    for name in DATASETS:
        assert name in result.stderr
    listed = json.loads(runner.invoke(app, ["prepare", "--list", "--json"]).stdout)
    assert [entry["name"] for entry in listed] == list(DATASETS) == list(CONVERTERS)
    assert all(entry["description"] and entry["layout"] and entry["differences"] for entry in listed)


def test_prepare_writes_meta_and_sidecar_and_reports_json(runner, tmp_path):
    _bottle(tmp_path)
    result = _prepare(runner, "mvtec", str(tmp_path), "--json")
    assert result.exit_code == 0, result.output
    report = json.loads(result.stdout)
    assert report["variant"] == "MVTec AD tree" and report["dry_run"] is False
    assert {"split": "test", "class": "bottle", "normal": 1, "anomalous": 2, "with_mask": 2} in report["classes"]
    assert set(written(tmp_path)) == {"train", "test"}  # nothing but the schema in meta.json
    sidecar = json.loads((tmp_path / SIDECAR).read_text())
    assert sidecar["variant"] == "MVTec AD tree" and sidecar["zsad_version"]


def test_summary_table_goes_to_stderr(runner, tmp_path):
    _bottle(tmp_path)
    result = _prepare(runner, "mvtec", str(tmp_path))
    assert result.exit_code == 0
    assert result.stdout == ""
    assert "bottle" in result.stderr and "with mask" in result.stderr and "wrote" in result.stderr


def test_existing_meta_needs_force(runner, tmp_path):
    _bottle(tmp_path)
    (tmp_path / "meta.json").write_text("{}")
    result = _prepare(runner, "mvtec", str(tmp_path))
    assert result.exit_code == 2 and "--force" in result.stderr
    assert (tmp_path / "meta.json").read_text() == "{}"
    assert _prepare(runner, "mvtec", str(tmp_path), "--force").exit_code == 0
    assert "bottle" in written(tmp_path)["test"]


def test_dry_run_writes_nothing(runner, tmp_path):
    _bottle(tmp_path)
    result = _prepare(runner, "mvtec", str(tmp_path), "--dry-run", "--json")
    assert result.exit_code == 0, result.output
    assert json.loads(result.stdout)["dry_run"] is True and json.loads(result.stdout)["meta"] is None
    assert not (tmp_path / "meta.json").exists() and not (tmp_path / SIDECAR).exists()


def test_dry_run_with_existing_meta_does_not_need_force(runner, tmp_path):
    _bottle(tmp_path)
    (tmp_path / "meta.json").write_text("{}")
    assert _prepare(runner, "mvtec", str(tmp_path), "--dry-run").exit_code == 0
    assert (tmp_path / "meta.json").read_text() == "{}"


def test_unknown_dataset_lists_the_names(runner, tmp_path):
    result = _prepare(runner, "mvtek", str(tmp_path))
    assert result.exit_code == 2
    assert "mvtek" in result.stderr and "mvtec" in result.stderr and "tn3k" in result.stderr


def test_errors_print_under_quiet_and_keep_brackets(runner, tmp_path):
    root = tmp_path / "[set 1]"
    image(root / "images/a.png")
    (root / "masks").mkdir()
    result = runner.invoke(app, ["--quiet", "prepare", "kvasir", str(root)])
    assert result.exit_code == 2
    assert "[set 1]" in result.stderr and "images/a.png: no mask" in result.stderr


def test_missing_root(runner, tmp_path):
    result = _prepare(runner, "mvtec", str(tmp_path / "nowhere"))
    assert result.exit_code == 2 and "does not exist" in result.stderr


@pytest.mark.parametrize("args", [[], ["mvtec"]])
def test_missing_arguments_are_a_usage_error(runner, args):
    result = _prepare(runner, *args)
    assert result.exit_code == 2 and "DATASET" in result.stderr


def test_no_known_layout_prints_the_expected_tree(runner, tmp_path):
    image(tmp_path / "random/picture.png")
    result = _prepare(runner, "dagm", str(tmp_path))
    assert result.exit_code == 2
    assert "no known dagm layout" in result.stderr
    assert "Class1/ ... Class10/" in result.stderr and "Label/0001_label.PNG" in result.stderr
    assert not (tmp_path / "meta.json").exists()


def _no_partial_files(root: Path) -> None:
    assert not (root / "meta.json").exists() and not (root / SIDECAR).exists()
    assert not list(root.glob(".meta.json.*"))


def test_image_without_mask_fails_then_is_skipped(runner, tmp_path):
    _bottle(tmp_path)
    image(tmp_path / "bottle/test/broken_large/002.png")
    result = _prepare(runner, "mvtec", str(tmp_path))
    assert result.exit_code == 2
    assert "bottle/test/broken_large/002.png" in result.stderr and "--skip-bad" in result.stderr
    _no_partial_files(tmp_path)
    result = _prepare(runner, "mvtec", str(tmp_path), "--skip-bad")
    assert result.exit_code == 0, result.output
    assert "bottle/test/broken_large/002.png" in result.stderr  # listed as skipped
    paths = [it["img_path"] for it in written(tmp_path)["test"]["bottle"]]
    assert "bottle/test/broken_large/002.png" not in paths and len(paths) == 3
    skipped = json.loads((tmp_path / SIDECAR).read_text())["skipped"]
    assert [s["path"] for s in skipped] == ["bottle/test/broken_large/002.png"]


def test_mask_without_image_fails(runner, tmp_path):
    _bottle(tmp_path)
    mask(tmp_path / "bottle/ground_truth/broken_large/007_mask.png")
    result = _prepare(runner, "mvtec", str(tmp_path))
    assert result.exit_code == 2 and "bottle/ground_truth/broken_large/007_mask.png" in result.stderr
    result = _prepare(runner, "mvtec", str(tmp_path), "--skip-bad", "--json")
    assert result.exit_code == 0
    assert json.loads(result.stdout)["skipped"][0]["path"] == "bottle/ground_truth/broken_large/007_mask.png"
    assert len(written(tmp_path)["test"]["bottle"]) == 3  # every image kept


def test_all_file_problems_are_reported_at_once(runner, tmp_path):
    _bottle(tmp_path)
    (tmp_path / "bottle/test/good/000.png").write_bytes(b"")                       # zero-byte
    (tmp_path / "bottle/train/good/000.png").write_bytes(b"not an image at all")  # unreadable
    mask(tmp_path / "bottle/ground_truth/broken_large/001_mask.png", size=(9, 8))  # wrong size
    result = _prepare(runner, "mvtec", str(tmp_path))
    assert result.exit_code == 2
    assert "3 file problem(s)" in result.stderr
    assert "bottle/test/good/000.png: image is an empty (zero-byte) file" in result.stderr
    assert "bottle/train/good/000.png: image cannot be read" in result.stderr
    assert "bottle/ground_truth/broken_large/001_mask.png: mask is 9x8 but its image" in result.stderr
    _no_partial_files(tmp_path)
    as_json = _prepare(runner, "mvtec", str(tmp_path), "--json")
    assert as_json.exit_code == 2 and len(json.loads(as_json.stdout)["problems"]) == 3
    assert _prepare(runner, "mvtec", str(tmp_path), "--skip-bad").exit_code == 0
    assert written(tmp_path) == {"train": {"bottle": []}, "test": {"bottle": [
        item("bottle/test/broken_large/000.png", "bottle/ground_truth/broken_large/000_mask.png", "bottle",
             "broken_large", 1)]}}


def test_nothing_left_after_skipping_is_an_error(runner, tmp_path):
    image(tmp_path / "images/1.png")
    mask(tmp_path / "masks/1.png", size=(4, 4))
    result = _prepare(runner, "kvasir", str(tmp_path), "--skip-bad")
    assert result.exit_code == 2 and "every test image" in result.stderr
    _no_partial_files(tmp_path)


def test_unrelated_mask_names_pair_by_sorted_position_with_a_warning(runner, tmp_path):
    for i, (img, msk) in enumerate([("a.png", "m1.png"), ("b.png", "m2.png")]):
        image(tmp_path / "images" / img)
        mask(tmp_path / "masks" / msk)
    result = _prepare(runner, "colondb", str(tmp_path))
    assert result.exit_code == 0, result.output
    assert "paired by sorted position" in result.stderr
    assert [(it["img_path"], it["mask_path"]) for it in written(tmp_path)["test"]["colon"]] == [
        ("images/a.png", "masks/m1.png"), ("images/b.png", "masks/m2.png")]


def test_name_pairing_where_sorted_position_would_mispair(runner, tmp_path):
    # sorted images: a.png, a_1.png; sorted masks: a_1_mask.png, a_mask.png -> position pairing is wrong
    for stem in ("a", "a_1"):
        image(tmp_path / "test/widget/dent" / f"{stem}.png")
        mask(tmp_path / "ground_truth/widget/dent" / f"{stem}_mask.png")
    result = _prepare(runner, "folder", str(tmp_path))
    assert result.exit_code == 0, result.output
    assert "official script pairs by sorted position" in result.stderr
    pairs = {it["img_path"]: it["mask_path"] for it in written(tmp_path)["test"]["widget"]}
    assert pairs == {"test/widget/dent/a.png": "ground_truth/widget/dent/a_mask.png",
                     "test/widget/dent/a_1.png": "ground_truth/widget/dent/a_1_mask.png"}


def test_synthetic_creates_the_dataset(runner, tmp_path):
    root = tmp_path / "synth"
    result = _prepare(runner, "synthetic", str(root), "--seed", "3", "--json")
    assert result.exit_code == 0, result.output
    meta = written(root)
    assert set(meta["test"]) == {"stripes", "checker", "disc"}
    assert all((root / it["img_path"]).is_file() for it in meta["test"]["disc"])
    assert _prepare(runner, "--check", str(root)).exit_code == 0
    assert _prepare(runner, "synthetic", str(root)).exit_code == 2  # meta.json exists


def test_synthetic_dry_run_creates_nothing(runner, tmp_path):
    root = tmp_path / "synth"
    result = _prepare(runner, "synthetic", str(root), "--dry-run")
    assert result.exit_code == 0, result.output
    assert not root.exists()


# ---------------------------------------------------------------- --check

def test_check_valid_meta(runner, tmp_path):
    _bottle(tmp_path)
    assert _prepare(runner, "mvtec", str(tmp_path)).exit_code == 0
    result = _prepare(runner, "--check", str(tmp_path), "--json")
    assert result.exit_code == 0, result.output
    report = json.loads(result.stdout)
    assert report["valid"] is True and report["problems"] == []
    assert {"split": "test", "class": "bottle", "normal": 1, "anomalous": 2, "with_mask": 2} in report["classes"]


def test_check_reports_missing_and_bad_files(runner, tmp_path):
    _bottle(tmp_path)
    assert _prepare(runner, "mvtec", str(tmp_path)).exit_code == 0
    (tmp_path / "bottle/test/good/000.png").unlink()
    mask(tmp_path / "bottle/ground_truth/broken_large/000_mask.png", size=(16, 16))
    data = (tmp_path / "bottle/ground_truth/broken_large/001_mask.png").read_bytes()
    (tmp_path / "bottle/ground_truth/broken_large/001_mask.png").write_bytes(data[: len(data) // 2])  # truncated
    result = _prepare(runner, "--check", str(tmp_path))
    assert result.exit_code == 2
    assert "bottle/test/good/000.png: image does not exist" in result.stderr
    assert "bottle/ground_truth/broken_large/000_mask.png: mask is 16x16" in result.stderr
    assert "bottle/ground_truth/broken_large/001_mask.png: mask cannot be read" in result.stderr


def test_check_rejects_anomalyclip_dagm_keys(runner, tmp_path):
    (tmp_path / "meta.json").write_text(json.dumps({"Train": {}, "Test": {}}))
    result = _prepare(runner, "--check", str(tmp_path))
    assert result.exit_code == 2 and "Train" in result.stderr


def test_check_without_meta(runner, tmp_path):
    result = _prepare(runner, "--check", str(tmp_path))
    assert result.exit_code == 2 and "does not exist" in result.stderr
