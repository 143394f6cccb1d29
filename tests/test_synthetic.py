"""The synthetic dataset every test and demo uses: deterministic, exact masks, meta.json."""
from __future__ import annotations

import json

import numpy as np
from PIL import Image
from typer.testing import CliRunner

from zsadcli.cli import app
from zsadcli.data.meta import load_meta
from zsadcli.data.synthetic import CLASSES, DEFECTS, generate_synthetic


def test_same_seed_same_bytes_other_seed_other_images(tmp_path):
    a = generate_synthetic(tmp_path / "a", seed=3, size=48)
    b = generate_synthetic(tmp_path / "b", seed=3, size=48)
    generate_synthetic(tmp_path / "c", seed=4, size=48)
    assert a == b
    rel = a["test"]["disc"][0].img_path
    assert (tmp_path / "a" / rel).read_bytes() == (tmp_path / "b" / rel).read_bytes()
    assert (tmp_path / "a" / rel).read_bytes() != (tmp_path / "c" / rel).read_bytes()


def test_tree_layout_and_exact_masks(tmp_path):
    meta = generate_synthetic(tmp_path, seed=0, size=64)
    assert set(meta["test"]) == set(CLASSES) == set(meta["train"])
    for cls in CLASSES:
        assert (tmp_path / cls / "train" / "good").is_dir()
        species = {item.specie_name for item in meta["test"][cls]}
        assert species == {"good", *DEFECTS}
        for item in meta["test"][cls]:
            image = np.asarray(Image.open(tmp_path / item.img_path).convert("RGB")).astype(int)
            if item.anomaly == 0:
                assert item.mask_path == "" and item.specie_name == "good"
                continue
            mask = np.asarray(Image.open(tmp_path / item.mask_path)) > 0
            assert item.mask_path == f"{cls}/ground_truth/{item.specie_name}/{item.img_path[-7:-4]}_mask.png"
            assert 0.005 < mask.mean() < 0.2
            # the defect colour is painted exactly inside the mask and nowhere else
            colour = {"scratch": (245, 245, 245), "stain": (60, 160, 60), "hole": (10, 10, 10)}[item.specie_name]
            close = (np.abs(image - np.array(colour)).max(axis=-1) <= 12)
            assert close[mask].mean() > 0.97
            assert close[~mask].mean() < 0.01


def test_prepare_synthetic_command_writes_meta_and_refuses_overwrite(tmp_path):
    runner = CliRunner()
    result = runner.invoke(app, ["prepare", "synthetic", str(tmp_path), "--seed", "1", "--json"])
    assert result.exit_code == 0, result.output
    summary = json.loads(result.stdout)
    meta = load_meta(tmp_path)
    assert len(meta["test"]["stripes"]) == summary["classes"][-1]["normal"] + summary["classes"][-1]["anomalous"]
    before = (tmp_path / "meta.json").read_bytes()
    again = runner.invoke(app, ["prepare", "synthetic", str(tmp_path)])
    assert again.exit_code == 2 and "--force" in again.output
    assert (tmp_path / "meta.json").read_bytes() == before
    assert runner.invoke(app, ["prepare", "synthetic", str(tmp_path), "--force"]).exit_code == 0
