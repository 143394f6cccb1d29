"""From scores to decisions: `zsad calibrate`, predict/eval --calibration (tiny CLIP, synthetic data)."""
from __future__ import annotations

import csv
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
from zsadcli.core import metrics
from zsadcli.core.calibration import bootstrap_rate_interval, fpr_threshold
from zsadcli.data.images import load_mask
from zsadcli.data.meta import load_meta, write_meta
from zsadcli.data.synthetic import generate_synthetic

SIZE = 56


@pytest.fixture(scope="module")
def runner() -> CliRunner:
    return CliRunner()


@pytest.fixture(scope="module")
def weights(tmp_path_factory, tiny_registry) -> list[str]:
    """The interface check's weight options: a local backbone file and a checkpoint."""
    checkpoint = tmp_path_factory.mktemp("ckpt") / "epoch_15.pth"
    torch.save(authors_checkpoint(), checkpoint)
    return ["--backbone-file", str(tiny_registry["payload"]), "--checkpoint", str(checkpoint),
            "--image-size", str(SIZE), "--device", "cpu", "--batch-size", "8"]


@pytest.fixture(scope="module")
def data(tmp_path_factory) -> Path:
    """`good`: 20 normal training images and 20 held-out normal test images of one class;
    `small`: two classes with normal and anomalous test images (masks)."""
    root = tmp_path_factory.mktemp("calib")
    write_meta(root / "good", generate_synthetic(root / "good", seed=3, size=64, classes=("disc",), n_train=20,
                                                 n_test_good=20, n_per_defect=0))
    write_meta(root / "small", generate_synthetic(root / "small", seed=1, size=64, classes=("checker", "disc"),
                                                  n_train=0, n_test_good=3, n_per_defect=1, defect_scale=2.0))
    return root


def lines(output: str) -> list[dict]:
    return [json.loads(line) for line in output.splitlines() if line.startswith("{")]


def calibrate(runner, weights, card: Path, *args: str):
    return runner.invoke(app, ["calibrate", *weights, "--out", str(card), *args])


@pytest.fixture(scope="module")
def normal_card(runner, weights, data, tmp_path_factory) -> Path:
    card = tmp_path_factory.mktemp("card") / "card.json"
    result = calibrate(runner, weights, card, "--normal", str(data / "good/disc/train/good"), "--target-fpr", "0.25")
    assert result.exit_code == 0, result.output
    assert "n = 20 images" in result.output and "95% interval" in result.output and "warning" not in result.output
    return card


# ------------------------------------------------------------------ pure functions
def _brute_threshold(scores: np.ndarray, target: float) -> float:
    """Re-statement: the lowest candidate t (a score, or just above the maximum) flagging at most
    floor(target * n) scores with score >= t."""
    allowed = math.floor(target * scores.size + 1e-9)
    candidates = sorted(set(scores.tolist())) + [float(np.nextafter(scores.max(), np.inf))]
    return next(t for t in candidates if (scores >= t).sum() <= allowed)


@pytest.mark.parametrize("target", [0.01, 0.1, 0.25, 0.29, 0.5])
def test_fpr_threshold_matches_a_brute_force_restatement(target):
    rng = np.random.default_rng(0)
    for scores in (rng.random(37), rng.integers(0, 5, 40).astype(np.float64), np.array([0.2, 0.2, 0.9, 0.9])):
        t = fpr_threshold(scores, target)
        assert t == _brute_threshold(scores, target)
        assert (scores >= t).sum() <= math.floor(target * scores.size + 1e-9)


def test_metrics_at_a_threshold_and_bootstrap():
    labels = np.array([0, 0, 0, 1, 1, 1, 0, 1])
    scores = np.array([0.1, 0.6, 0.3, 0.7, 0.2, 0.9, 0.5, 0.5])
    got = metrics.image_decision_metrics(labels, scores, 0.5)
    # flagged: 0.6, 0.7, 0.9, 0.5, 0.5 -> TP 3 (0.7 0.9 0.5), FP 2 (0.6 0.5), FN 1, TN 2
    assert got == {"accuracy": 5 / 8, "precision": 3 / 5, "recall": 3 / 4, "fpr": 2 / 4}
    assert metrics.rates_at_threshold(labels, scores, 0.5) == {"fpr": 0.5, "tpr": 0.75}
    masks = np.zeros((1, 2, 2), bool)
    maps = np.array([[[0.9, 0.1], [0.8, 0.2]]])
    masks[0, 0, 0] = masks[0, 1, 1] = True
    assert metrics.pixel_decision_metrics(masks, maps, 0.5) == {"precision": 0.5, "recall": 0.5, "iou": 1 / 3}
    with pytest.warns(metrics.UndefinedMetric):
        assert math.isnan(metrics.image_decision_metrics(labels, scores, 2.0)["precision"])
    from sklearn import metrics as sk

    rng = np.random.default_rng(1)
    truth, maps = rng.random((3, 9, 9)) < 0.2, rng.random((3, 9, 9)).astype(np.float32)
    predicted = (maps >= 0.6).ravel()
    got = metrics.pixel_decision_metrics(torch.from_numpy(truth), torch.from_numpy(maps), 0.6)
    assert math.isclose(got["iou"], sk.jaccard_score(truth.ravel(), predicted))
    assert math.isclose(got["precision"], sk.precision_score(truth.ravel(), predicted))
    assert math.isclose(got["recall"], sk.recall_score(truth.ravel(), predicted))
    flagged = np.array([1, 0, 0, 0, 1, 0, 0, 0, 0, 0])
    low, high = bootstrap_rate_interval(flagged)
    assert low < 0.2 < high and bootstrap_rate_interval(flagged) == [low, high]  # seeded


# ------------------------------------------------------------------ calibrate -> predict
def test_normal_card_predicts_labels_masks_and_a_consistent_fpr(runner, weights, data, normal_card, tmp_path):
    card = json.loads(normal_card.read_text())
    assert card["schema_version"] == 1 and card["rule"] == "fpr" and card["target_fpr"] == 0.25
    assert card["n_images"] == 20 and card["unstable"] is False and card["bootstrap"]["resamples"] >= 1000
    assert card["weights"]["image_size"] == SIZE and len(card["weights"]["backbone_sha256"]) == 64
    assert len(card["weights"]["checkpoint_sha256"]) == 64
    stats = card["score_stats"]["image"]["normal"]
    assert stats["n"] == 20 and stats["min"] <= stats["q50"] <= stats["max"]
    low, high = card["image_fpr"]["ci95"]
    assert low <= card["image_fpr"]["value"] <= 0.25 <= high

    raw, masks, overlays = tmp_path / "raw", tmp_path / "masks", tmp_path / "overlays"
    held_out = data / "good/disc/test/good"
    result = runner.invoke(app, ["predict", str(held_out), *weights, "--calibration", str(normal_card), "--json",
                                 "--save-raw", str(raw), "--save-mask", str(masks), "--out-dir", str(overlays)])
    assert result.exit_code == 0, result.output
    records = lines(result.stdout)
    assert len(records) == 20
    for record in records:
        assert record["threshold"] == card["image_threshold"]
        assert record["label"] == ("anomalous" if record["image_score"] >= record["threshold"] else "normal")
        assert math.isclose(record["margin"], record["image_score"] - record["threshold"], abs_tol=1e-12)
        stem = Path(record["path"]).stem
        amap = np.load(raw / f"{stem}.npy")
        width, height = Image.open(record["path"]).size
        # nearest neighbour re-stated: output pixel i samples map pixel floor((i + 0.5) * S / size)
        rows = np.floor((np.arange(height) + 0.5) * amap.shape[0] / height).astype(int)
        cols = np.floor((np.arange(width) + 0.5) * amap.shape[1] / width).astype(int)
        expected = (amap >= card["pixel_threshold"])[rows][:, cols]
        saved = np.asarray(Image.open(masks / f"{stem}.png"))
        assert saved.shape == (height, width) and set(np.unique(saved)) <= {0, 255}
        np.testing.assert_array_equal(saved > 0, expected)
        overlay = np.asarray(Image.open(overlays / f"{stem}.png").convert("RGB"))[:height, :width]
        outline = (overlay == (255, 0, 255)).all(axis=2)  # the mask's outline, in magenta
        assert outline.any() == expected.any() and not (outline & ~expected).any()
    held_out_fpr = np.mean([r["label"] == "anomalous" for r in records])
    assert low <= held_out_fpr <= high  # the FPR on unseen normal images is what the card promised


def test_threshold_overrides_the_card_and_per_class_needs_a_class(runner, weights, data, normal_card):
    image = str(data / "good/disc/test/good/000.png")
    result = runner.invoke(app, ["predict", image, *weights, "--calibration", str(normal_card), "--threshold", "0",
                                 "--json"])
    assert result.exit_code == 0, result.output
    [record] = lines(result.stdout)
    assert record["threshold"] == 0 and record["label"] == "anomalous"
    refused = runner.invoke(app, ["predict", image, *weights, "--calibration", str(normal_card), "--class", "disc"])
    assert refused.exit_code == 2 and "no thresholds for class 'disc'" in refused.output


# ------------------------------------------------------------------ labelled split: calibrate --on, eval --calibration
def test_on_dataset_f1_card_and_eval_share_thresholds(runner, weights, data, tmp_path):
    card_path = tmp_path / "card.json"
    result = calibrate(runner, weights, card_path, "--on", "small", "--data-root", str(data), "--per-class")
    assert result.exit_code == 0, result.output
    card = json.loads(card_path.read_text())
    assert card["rule"] == "f1" and set(card["per_class"]) == {"checker", "disc"} and card["n_images"] == 12
    runs = tmp_path / "runs"
    evaluated = runner.invoke(app, ["eval", "--test-on", "small", "--data-root", str(data), *weights, "--runs",
                                    str(runs), "--name", "e", "--calibration", str(card_path)])
    assert evaluated.exit_code == 0, evaluated.output
    assert "at the thresholds of" in evaluated.output and "px iou" in evaluated.output  # the decision table
    report = json.loads((runs / "eval/e/metrics.json").read_text())["datasets"][0]
    for cls, entry in card["per_class"].items():  # one code path: eval's F1-max thresholds
        assert entry["image_threshold"] == report["per_class"][cls]["image"]["f1_threshold"]
        assert entry["pixel_threshold"] == report["per_class"][cls]["pixel"]["f1_threshold"]

    # the thresholded metrics, re-stated from predict's scores and maps and the ground-truth masks
    meta = load_meta(data / "small")
    raw = tmp_path / "raw"
    for cls, items in meta["test"].items():
        paths = []  # unique file names (the defect folders reuse 000.png...), same pixels
        for i, item in enumerate(items):
            paths.append(str(tmp_path / "copies" / cls / f"{i:03d}.png"))
            Path(paths[-1]).parent.mkdir(parents=True, exist_ok=True)
            Path(paths[-1]).write_bytes((data / "small" / item.img_path).read_bytes())
        predicted = runner.invoke(app, ["predict", *paths, *weights, "--calibration", str(card_path), "--class", cls,
                                        "--json", "--save-raw", str(raw / cls)])
        assert predicted.exit_code == 0, predicted.output
        records = lines(predicted.stdout)
        labels = np.array([it.anomaly for it in items])
        flagged = np.array([r["label"] == "anomalous" for r in records])
        decision = report["per_class"][cls]["decision"]
        assert decision["thresholds"] == "per_class"
        assert math.isclose(decision["image"]["accuracy"], np.mean(flagged == labels))
        assert math.isclose(decision["image"]["fpr"], flagged[labels == 0].mean())
        assert math.isclose(decision["image"]["recall"], flagged[labels == 1].mean())
        maps = np.stack([np.load(raw / cls / f"{Path(p).stem}.npy") for p in paths]) >= card["per_class"][cls][
            "pixel_threshold"]
        truth = np.stack([load_mask(data / "small" / it.mask_path if it.mask_path else None, SIZE).numpy()
                          for it in items])
        tp = (maps & truth).sum()
        assert math.isclose(decision["pixel"]["iou"], tp / (maps | truth).sum())
        assert math.isclose(decision["pixel"]["precision"], tp / maps.sum())
    mean_accuracy = np.mean([report["per_class"][c]["decision"]["image"]["accuracy"] for c in card["per_class"]])
    assert math.isclose(report["mean"]["decision"]["image"]["accuracy"]["mean"], mean_accuracy)
    with open(runs / "eval/e/per_class.csv") as fh:
        rows = list(csv.DictReader(fh))
    assert rows[-1]["class"] == "mean" and math.isclose(float(rows[-1]["decision_image_accuracy"]), 100 * mean_accuracy)


def test_on_dataset_fpr_rule_uses_its_normal_images(runner, weights, data, tmp_path):
    card_path = tmp_path / "card.json"
    result = calibrate(runner, weights, card_path, "--on", "small", "--data-root", str(data), "--rule", "fpr",
                       "--target-fpr", "0.2", "--json")
    assert result.exit_code == 0, result.output
    card = json.loads(card_path.read_text())
    assert json.loads(result.stdout)["image_threshold"] == card["image_threshold"]
    assert card["unstable"] is True and any("unstable" in w for w in card["warnings"])  # 6 normal images
    assert set(card["at_threshold"]) == {"image", "pixel"}


# ------------------------------------------------------------------ every method
def test_a_training_free_method_calibrates(runner, b16plus_file, data, tmp_path):
    card = tmp_path / "card.json"
    images = [str(data / "good/disc/train/good" / f"00{i}.png") for i in range(3)]
    result = runner.invoke(app, ["calibrate", "--method", "clip-ad", "--backbone-file", str(b16plus_file),
                                 "--image-size", "96", "--device", "cpu", "--normal", images[0], "--normal", images[1],
                                 "--normal", images[2], "--out", str(card), "--json"])
    assert result.exit_code == 0, result.output
    written = json.loads(card.read_text())
    assert written["weights"]["method"] == "clip-ad" and written["weights"]["checkpoint_sha256"] is None
    assert written["n_images"] == 3 and written["unstable"] is True
    assert any("unstable" in w for w in written["warnings"]) and "warning: only 3 normal images" in result.stderr


# ------------------------------------------------------------------ refusals: exit 2, nothing written
def test_card_for_other_weights_is_refused(runner, weights, data, normal_card, tmp_path):
    other = [*weights[:4], "--image-size", "28", "--device", "cpu"]
    out = tmp_path / "out"
    result = runner.invoke(app, ["predict", str(data / "good/disc/test/good/000.png"), *other, "--calibration",
                                 str(normal_card), "--save-mask", str(out / "m"), "--save-raw", str(out / "r")])
    assert result.exit_code == 2 and "image size: card 56, now 28" in result.output
    torch.save(authors_checkpoint(seed=2), tmp_path / "other.pth")  # other learned prompts, same shapes
    other = [*weights[:2], "--checkpoint", str(tmp_path / "other.pth"), *weights[4:]]
    result = runner.invoke(app, ["predict", str(data / "good/disc/test/good/000.png"), *other, "--calibration",
                                 str(normal_card), "--save-mask", str(out / "m")])
    assert result.exit_code == 2 and "checkpoint (sha256)" in result.output and "image size" not in result.output
    assert not out.exists()


@pytest.mark.parametrize("broken", [{"schema_version": 99}, {"drop": "pixel_threshold"}, {"image_threshold": "x"},
                                    "not json"])
def test_unusable_cards_are_refused(runner, weights, data, normal_card, tmp_path, broken):
    card = json.loads(normal_card.read_text())
    if isinstance(broken, str):
        text = broken
    else:
        card.pop(broken.pop("drop", None), None)
        text = json.dumps(card | broken)
    bad = tmp_path / "bad.json"
    bad.write_text(text)
    for command in (["predict", str(data / "good/disc/test/good/000.png"), "--save-mask", str(tmp_path / "m")],
                    ["eval", "--test-on", "small", "--data-root", str(data), "--runs", str(tmp_path / "runs")]):
        result = runner.invoke(app, [*command, *weights, "--calibration", str(bad)])
        assert result.exit_code == 2 and f"calibration card {bad}" in result.output, result.output
    assert {p.name for p in tmp_path.iterdir()} == {"bad.json"}


def test_bad_calibration_sets_are_refused(runner, weights, data, normal_card, tmp_path):
    empty, same = tmp_path / "empty", tmp_path / "same"
    empty.mkdir()
    same.mkdir()
    source = data / "good/disc/train/good/000.png"
    for i in range(3):
        (same / f"{i}.png").write_bytes(source.read_bytes())
    card = tmp_path / "card.json"
    cases = {"contains no images": ["--normal", str(empty)],
             "at least 2": ["--normal", str(source)],
             "degenerate": ["--normal", str(same)],
             "needs anomalous images": ["--normal", str(same), "--rule", "f1"],
             "exactly one": []}
    for message, args in cases.items():
        result = calibrate(runner, weights, card, *args)
        assert result.exit_code == 2 and message in result.output, (message, result.output)
        assert not card.exists()
    clash = calibrate(runner, weights, normal_card, "--normal", str(same))
    assert clash.exit_code == 2 and "--force" in clash.output
