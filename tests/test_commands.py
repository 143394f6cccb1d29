"""predict / train / eval through the command line, as a user runs them (tiny CLIP, synthetic data)."""
from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from typer.testing import CliRunner

from test_anomalyclip import authors_checkpoint
from zsadcli.cli import app
from zsadcli.core.checkpoints import save_checkpoint
from zsadcli.core.engine import MethodSpec, build_method
from zsadcli.data.images import clip_preprocess, open_image
from zsadcli.data.meta import write_meta
from zsadcli.data.synthetic import generate_synthetic

TINY = ["--backbone", "tiny-clip", "--image-size", "112", "--device", "cpu"]


@pytest.fixture(scope="module")
def runner() -> CliRunner:
    return CliRunner()


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory, tiny_registry) -> Path:
    path = tmp_path_factory.mktemp("ckpt") / "epoch_15.pth"
    torch.save(authors_checkpoint(), path)
    return path


def lines(output: str) -> list[dict]:
    return [json.loads(line) for line in output.splitlines() if line.startswith("{")]


# ------------------------------------------------------------------ predict
def test_predict_one_image_png_npy_json(runner, tmp_path, checkpoint, synthetic_root):
    image = synthetic_root / "disc/test/stain/000.png"
    out, raw = tmp_path / "heat.png", tmp_path / "raw"
    result = runner.invoke(app, ["predict", str(image), "--checkpoint", str(checkpoint), *TINY, "--out", str(out),
                                 "--save-raw", str(raw), "--threshold", "0.5", "--json"])
    assert result.exit_code == 0, result.output
    [record] = lines(result.stdout)
    assert record["path"] == str(image) and record["heatmap"] == str(out)
    assert record["label"] in ("anomalous", "normal") and 0 <= record["image_score"] <= 1
    overlay = Image.open(out)
    overlay.load()
    width, height = Image.open(image).size
    assert overlay.format == "PNG" and overlay.size[0] > width and overlay.size[1] > height  # bar + caption
    saved = np.load(raw / "000.npy")
    assert saved.dtype == np.float32 and saved.shape == (112, 112)
    assert math.isclose(record["map_max"], float(saved.max()), rel_tol=1e-6)
    # the saved map is exactly what the method (and eval) computes
    method = build_method(MethodSpec("anomalyclip", backbone="tiny-clip", checkpoint=str(checkpoint),
                                     image_size=112)).method
    with torch.no_grad():
        out_map = method(clip_preprocess(open_image(image), 112)[None]).anomaly_map[0].numpy()
    np.testing.assert_array_equal(saved, out_map)


def test_predict_folder_and_glob_to_out_dir(runner, tmp_path, checkpoint, synthetic_root):
    folder = synthetic_root / "checker/test/hole"  # 000-002
    result = runner.invoke(app, ["predict", str(folder), str(synthetic_root / "disc/test/good/00[3-9].png"),
                                 "--checkpoint", str(checkpoint), *TINY, "--out-dir", str(tmp_path / "o"),
                                 "--normalize", "image", "--json", "--batch-size", "2"])
    assert result.exit_code == 0, result.output
    records = lines(result.stdout)
    assert [Path(r["path"]).name for r in records] == ["000.png", "001.png", "002.png", "003.png"]
    assert sorted(p.name for p in (tmp_path / "o").iterdir()) == ["000.png", "001.png", "002.png", "003.png"]
    assert all(r["heatmap"].startswith(str(tmp_path / "o")) for r in records)


def test_predict_refuses_colliding_outputs_and_overwrites(runner, tmp_path, checkpoint, synthetic_root):
    a, b = synthetic_root / "disc/test/good/000.png", synthetic_root / "disc/test/hole/000.png"
    collide = runner.invoke(app, ["predict", str(a), str(b), "--checkpoint", str(checkpoint), *TINY,
                                  "--out-dir", str(tmp_path / "o")])
    assert collide.exit_code == 2 and not (tmp_path / "o").exists()
    out = tmp_path / "h.png"
    out.write_bytes(b"user's file")
    again = runner.invoke(app, ["predict", str(a), "--checkpoint", str(checkpoint), *TINY, "--out", str(out)])
    assert again.exit_code == 2 and out.read_bytes() == b"user's file" and "--force" in again.output


@pytest.mark.parametrize("case", ["missing", "corrupt", "empty"])
def test_predict_bad_images_exit_2_and_write_nothing(runner, tmp_path, checkpoint, synthetic_root, case):
    good = synthetic_root / "disc/test/good/000.png"
    bad = tmp_path / "bad.png"
    if case == "corrupt":
        bad.write_bytes(b"\x89PNG\r\n\x1a\n garbage")
    elif case == "empty":
        bad.write_bytes(b"")
    out_dir = tmp_path / "out"
    result = runner.invoke(app, ["predict", str(good), str(bad), "--checkpoint", str(checkpoint), *TINY,
                                 "--out-dir", str(out_dir), "--save-raw", str(tmp_path / "raw")])
    assert result.exit_code == 2, result.output
    assert "bad.png" in result.output and "Traceback" not in result.output
    assert not out_dir.exists() and not (tmp_path / "raw").exists()


def test_predict_unknown_method_and_foreign_checkpoint(runner, tmp_path, checkpoint, synthetic_root):
    image = str(synthetic_root / "disc/test/good/000.png")
    unknown = runner.invoke(app, ["predict", image, "--method", "nosuch", *TINY])
    assert unknown.exit_code == 2 and "unknown method" in unknown.output
    foreign = save_checkpoint(tmp_path / "other.safetensors", {"w": torch.zeros(2)}, method="crane",
                              backbone="tiny-clip", trained_on="mvtec", hparams={})
    result = runner.invoke(app, ["predict", image, "--checkpoint", str(foreign), *TINY, "--out", str(tmp_path / "x.png")])
    assert result.exit_code == 2 and "crane" in result.output and not (tmp_path / "x.png").exists()
    vip = tmp_path / "vip.pth"
    torch.save({"prompt_learner": {"ctx": torch.zeros(1)}, "Zero_try": {"w": torch.zeros(1)}}, vip)
    assert runner.invoke(app, ["predict", image, "--checkpoint", str(vip), *TINY]).exit_code == 2
    crane_like = tmp_path / "crane.pth"
    state = authors_checkpoint()["prompt_learner"]
    torch.save({"prompt_learner": {k: v for k, v in state.items() if "projections" not in k}}, crane_like)
    refused = runner.invoke(app, ["predict", image, "--checkpoint", str(crane_like), *TINY])
    assert refused.exit_code == 2 and "does not hold anomalyclip weights" in refused.output
    no_weights = runner.invoke(app, ["predict", image, *TINY])
    assert no_weights.exit_code == 2 and "--train-on" in no_weights.output


def test_predict_released_weights_offline_exit_3(runner, synthetic_root):
    result = runner.invoke(app, ["predict", str(synthetic_root / "disc/test/good/000.png"), "--train-on", "mvtec", *TINY])
    assert result.exit_code == 3 and "zsad weights download anomalyclip-trained-on-mvtec" in result.output


# ------------------------------------------------------------------ train
@pytest.fixture(scope="module")
def strong_data(tmp_path_factory) -> Path:
    """Larger defects: a random tiny backbone needs a strong signal to learn from in 2 epochs."""
    root = tmp_path_factory.mktemp("data")
    for name, seed in (("aux", 0), ("heldout", 1)):
        write_meta(root / name, generate_synthetic(root / name, seed=seed, size=112, defect_scale=2.5, n_train=0,
                                                   n_test_good=6, n_per_defect=4))
    return root


def test_train_two_epochs_learns_and_eval_reports(runner, tmp_path, strong_data):
    runs = tmp_path / "runs"
    result = runner.invoke(app, ["train", "--method", "anomalyclip", "--on", "aux", "--data-root", str(strong_data),
                                 "--epochs", "2", "--name", "t", "--runs", str(runs), *TINY, "--json"])
    assert result.exit_code == 0, result.output
    summary = json.loads(result.stdout)
    history = summary["history"]
    assert len(history) == 2 and history[1]["loss"] < history[0]["loss"]
    run = runs / "train" / "t"
    assert {p.name for p in run.iterdir()} >= {"epoch_1.safetensors", "epoch_2.safetensors", "config.json",
                                               "history.json", "train_state.pt"}
    evaluated = runner.invoke(app, ["eval", "--test-on", "heldout", "--data-root", str(strong_data), "--checkpoint",
                                    str(run / "epoch_2.safetensors"), *TINY, "--runs", str(runs), "--name", "e",
                                    "--aupro", "compat200", "--json"])
    assert evaluated.exit_code == 0, evaluated.output
    report = json.loads(evaluated.stdout)["datasets"][0]
    assert report["aupro_variant"] == "compat200" and set(report["per_class"]) == {"stripes", "checker", "disc"}
    assert report["mean"]["image"]["auroc"]["mean"] > 0.6  # above chance on held-out images
    assert report["mean"]["pixel"]["auroc"]["mean"] > 0.7
    files = {p.name for p in (runs / "eval" / "e").iterdir()}
    assert files == {"metrics.json", "per_class.csv", "config.json"}
    csv_lines = (runs / "eval" / "e" / "per_class.csv").read_text().splitlines()
    assert csv_lines[0].startswith("dataset,class") and csv_lines[-1].split(",")[1] == "mean"
    again = runner.invoke(app, ["eval", "--test-on", "heldout", "--data-root", str(strong_data), "--checkpoint",
                                str(run / "epoch_2.safetensors"), *TINY, "--runs", str(runs), "--name", "e"])
    assert again.exit_code == 2 and "--force" in again.output


def test_resume_equals_an_uninterrupted_run(runner, tmp_path, strong_data):
    runs = tmp_path / "runs"
    common = ["train", "--on", "aux", "--data-root", str(strong_data), "--runs", str(runs), *TINY, "--batch-size", "8"]
    assert runner.invoke(app, [*common, "--epochs", "2", "--name", "straight"]).exit_code == 0
    assert runner.invoke(app, [*common, "--epochs", "1", "--name", "cut"]).exit_code == 0
    resumed = runner.invoke(app, [*common, "--epochs", "2", "--name", "cut", "--resume"])
    assert resumed.exit_code == 0, resumed.output
    from safetensors.torch import load_file

    a = load_file(runs / "train" / "straight" / "epoch_2.safetensors")
    b = load_file(runs / "train" / "cut" / "epoch_2.safetensors")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    clash = runner.invoke(app, [*common, "--epochs", "1", "--name", "straight"])
    assert clash.exit_code == 2 and "--resume" in clash.output


def test_train_and_eval_missing_meta_exit_2(runner, tmp_path):
    for args in (["train", "--on", "nowhere", "--data-root", str(tmp_path), *TINY],
                 ["eval", "--test-on", "nowhere", "--data-root", str(tmp_path), "--checkpoint", "x.pth", *TINY]):
        result = runner.invoke(app, args)
        assert result.exit_code == 2 and "meta.json" in result.output and "zsad prepare" in result.output
    assert not (tmp_path / "runs").exists()


def test_eval_image_only_dataset_reports_na(runner, tmp_path, checkpoint, synthetic_root):
    """A dataset without masks (like HeadCT) gets NaN pixel metrics, left out of the means."""
    from zsadcli.data.meta import MetaItem, load_meta

    meta = load_meta(synthetic_root)
    stripped = {"train": {}, "test": {"disc": [MetaItem(str(synthetic_root / it.img_path), "", it.cls_name,
                                                        it.specie_name, it.anomaly) for it in meta["test"]["disc"]]}}
    write_meta(tmp_path / "imgonly", stripped)
    result = runner.invoke(app, ["eval", "--test-on", "imgonly", "--data-root", str(tmp_path), "--checkpoint",
                                 str(checkpoint), *TINY, "--runs", str(tmp_path / "runs"), "--json"])
    assert result.exit_code == 0, result.output
    report = json.loads(result.stdout)["datasets"][0]
    assert report["per_class"]["disc"]["pixel"]["auroc"] is None  # NaN -> null in JSON
    assert report["mean"]["pixel"]["auroc"]["n_classes"] == 0
    assert report["per_class"]["disc"]["image"]["auroc"] is not None
    table = runner.invoke(app, ["eval", "--test-on", "imgonly", "--data-root", str(tmp_path), "--checkpoint",
                                str(checkpoint), *TINY, "--runs", str(tmp_path / "runs"), "--name", "t2"])
    assert "n/a" in table.output


@pytest.mark.parametrize("option", [["--rep-vec", "dbscan"], ["--class-name", "bottle"], ["--no-bsr"],
                                    ["--hparam", "no_such_knob=3"]])
def test_options_of_other_methods_are_rejected(runner, checkpoint, synthetic_root, option):
    image = str(synthetic_root / "disc/test/good/000.png")
    result = runner.invoke(app, ["predict", image, "--checkpoint", str(checkpoint), *TINY, *option])
    assert result.exit_code == 2, result.output
    assert "does not apply" in result.output or "no hyperparameter" in result.output


def test_hparam_override_reaches_the_method(runner, checkpoint, synthetic_root, tmp_path):
    image = str(synthetic_root / "disc/test/good/000.png")
    maps = {}
    for sigma in ("4", "0"):
        result = runner.invoke(app, ["predict", image, "--checkpoint", str(checkpoint), *TINY, "--hparam",
                                     f"sigma={sigma}", "--save-raw", str(tmp_path / sigma)])
        assert result.exit_code == 0, result.output
        maps[sigma] = np.load(tmp_path / sigma / "000.npy")
    assert maps["0"].std() > maps["4"].std()  # no smoothing keeps the map rougher
