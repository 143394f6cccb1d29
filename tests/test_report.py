"""`zsad eval --report`, `zsad report` and `zsad predict --report`: self-contained HTML pages read
back with the standard library's HTML parser and compared with metrics.json."""
from __future__ import annotations

import base64
import io
import json
import re
import shutil
import subprocess
import sys
import xml.etree.ElementTree as ET
from html.parser import HTMLParser
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from test_commands import checkpoint, runner  # noqa: F401 (shared module fixtures)
from zsadcli.cli import app

TINY = ["--backbone", "tiny-clip", "--image-size", "56", "--device", "cpu"]
IMAGE_KEYS = ("auroc", "ap", "f1_max")
PIXEL_KEYS = ("auroc", "ap", "f1_max", "aupro")


class Page(HTMLParser):
    """Tables (rows of cell texts, with the cells' classes), images, and anything that loads from outside."""

    def __init__(self, text: str) -> None:
        super().__init__()
        self.tables: list[dict] = []
        self.images: list[str] = []
        self.scripts = 0
        self.external: list[str] = []
        self.text_parts: list[str] = []
        self._row: list | None = None
        self._cell: list | None = None
        self.feed(text)

    def handle_starttag(self, tag, attrs):
        attrs = dict(attrs)
        for key in ("src", "href"):
            if key in attrs and not attrs[key].startswith("data:") and not attrs[key].startswith("#"):
                self.external.append(attrs[key])
        if tag == "script":
            self.scripts += 1
        elif tag == "table":
            self.tables.append({"attrs": attrs, "rows": []})
        elif tag == "tr":
            self._row = []
            self.tables[-1]["rows"].append({"attrs": attrs, "cells": self._row})
        elif tag in ("td", "th") and self._row is not None:
            self._cell = []
            self._row.append({"class": attrs.get("class", "") or "", "parts": self._cell})
        elif tag == "img":
            self.images.append(attrs["src"])

    def handle_endtag(self, tag):
        if tag in ("td", "th"):
            self._cell = None

    def handle_data(self, data):
        self.text_parts.append(data)
        if self._cell is not None:
            self._cell.append(data)

    @property
    def text(self) -> str:
        return re.sub(r"\s+", " ", " ".join(self.text_parts))

    def metric_tables(self) -> list[dict]:
        return [t for t in self.tables if "metrics" in t["attrs"].get("class", "")]


def dataset_of(run: Path) -> str:
    """The one dataset a test run evaluated."""
    return json.loads((run / "config.json").read_text())["test_on"][0]


def cell_text(cell: dict) -> str:
    return "".join(cell["parts"]).strip()


def shown(value) -> str:
    """metrics.json value -> the page's text (x100, one decimal; n/a for null)."""
    return "n/a" if value is None else f"{100 * value:.1f}"


def decode_all(images: list[str]) -> list[tuple[str, object]]:
    decoded = []
    for src in images:
        assert src.startswith("data:"), src[:60]
        mime, _, payload = src[5:].partition(";base64,")
        raw = base64.b64decode(payload, validate=True)
        if mime == "image/png":
            image = Image.open(io.BytesIO(raw))
            image.load()
            decoded.append((mime, image))
        else:
            assert mime == "image/svg+xml"
            root = ET.fromstring(raw)
            assert root.tag.endswith("svg")
            decoded.append((mime, root))
    return decoded


@pytest.fixture(scope="module")
def runs(tmp_path_factory, runner, checkpoint, synthetic_root) -> Path:
    """Two eval runs with --report: the default map, and an unsmoothed one of one class (other numbers)."""
    root = tmp_path_factory.mktemp("runs")
    for name, extra in (("x", []), ("y", ["--hparam", "sigma=0", "--report-k", "3", "--classes", "disc"])):
        result = runner.invoke(app, ["eval", "--test-on", synthetic_root.name, "--data-root", str(synthetic_root.parent),
                                     "--checkpoint", str(checkpoint), *TINY, "--runs", str(root), "--name", name,
                                     "--batch-size", "13", "--report", *extra])
        assert result.exit_code == 0, result.output
    return root


def test_eval_report_names_every_class_and_equals_metrics_json(runs):
    run = runs / "eval" / "x"
    metrics = json.loads((run / "metrics.json").read_text())
    page = Page((run / "report.html").read_text())
    [dataset] = metrics["datasets"]
    [table] = page.metric_tables()
    rows = {cell_text(r["cells"][0]): [cell_text(c) for c in r["cells"][1:]] for r in table["rows"]
            if r["attrs"].get("data-class")}
    assert set(rows) == set(dataset["per_class"]) | {"mean"} and len(dataset["per_class"]) == 3
    for cls, result in dataset["per_class"].items():
        expected = ([str(result["n_images"]), str(result["n_anomalous"])]
                    + [shown(result["image"][k]) for k in IMAGE_KEYS] + [shown(result["pixel"][k]) for k in PIXEL_KEYS])
        assert rows[cls][:9] == expected, cls
        assert float(rows[cls][9]) == pytest.approx(result["image"]["f1_threshold"], rel=1e-3)
        assert float(rows[cls][10]) == pytest.approx(result["pixel"]["f1_threshold"], rel=1e-3)
    mean = dataset["mean"]
    assert rows["mean"][2:9] == ([shown(mean["image"][k]["mean"]) for k in IMAGE_KEYS]
                                 + [shown(mean["pixel"][k]["mean"]) for k in PIXEL_KEYS])
    for cls in dataset["per_class"]:
        assert f"{dataset['dataset']} / {cls}" in page.text
    # header: method, weights with their sha256, precision, device, version, wall time
    data = json.loads((run / "report_data.json").read_text())
    checkpoint = [w for w in data["weights"] if w["role"] == "checkpoint"][0]
    assert len(checkpoint["sha256"]) == 64 and checkpoint["sha256"] in page.text
    assert "float32" in page.text and "wall time" in page.text and f"{data['wall_time_s']:.1f} s" in page.text
    # self-contained: no script, nothing fetched from elsewhere
    assert page.scripts == 0 and page.external == []


def test_every_inlined_image_decodes_and_thumbnails_are_bounded(runs):
    run = runs / "eval" / "x"
    page = Page((run / "report.html").read_text())
    decoded = decode_all(page.images)
    svgs = [d for mime, d in decoded if mime == "image/svg+xml"]
    pngs = [d for mime, d in decoded if mime == "image/png"]
    assert len(svgs) == 3  # one figure (ROC, PR, histogram) per class
    data = json.loads((run / "report_data.json").read_text())
    files = {e["file"] for record in data["datasets"][dataset_of(run)].values() for g in record["galleries"].values() for e in g}
    assert len(pngs) == sum(len(g) for record in data["datasets"][dataset_of(run)].values() for g in record["galleries"].values())
    assert {p.relative_to(run).as_posix() for p in (run / "thumbs").iterdir()} == files
    assert all(max(p.size) <= 256 for p in pngs)


def test_report_data_curves_galleries_and_overlays(runs, synthetic_root):
    """Curves re-stated: the exact image ROC's trapezoid area is the AUROC of metrics.json; the binned
    pixel ROC is close to it. Galleries hold the k extremes of the recorded scores."""
    run = runs / "eval" / "x"
    metrics = json.loads((run / "metrics.json").read_text())["datasets"][0]["per_class"]
    data = json.loads((run / "report_data.json").read_text())
    assert data["k"] == 8
    for cls, record in data["datasets"][dataset_of(run)].items():
        for level in ("image_curve", "pixel_curve"):
            curve = record[level]
            assert all(len(curve[key]) <= 512 for key in ("fpr", "tpr", "recall", "precision"))
        roc = record["image_curve"]
        assert np.trapezoid(roc["tpr"], roc["fpr"]) == pytest.approx(metrics[cls]["image"]["auroc"], abs=1e-6)
        pixel = record["pixel_curve"]
        assert np.trapezoid(pixel["tpr"], pixel["fpr"]) == pytest.approx(metrics[cls]["pixel"]["auroc"], abs=0.01)
        scores, labels = np.array(record["scores"]), np.array(record["labels"])
        assert len(scores) == metrics[cls]["n_images"] and labels.sum() == metrics[cls]["n_anomalous"]
        galleries = record["galleries"]
        normal_high = sorted(scores[labels == 0], reverse=True)[:8]
        assert [e["score"] for e in galleries["normal_high"]] == pytest.approx(normal_high, rel=1e-5)
        assert [e["score"] for e in galleries["anomalous_low"]] == pytest.approx(sorted(scores[labels == 1])[:8],
                                                                                 rel=1e-5)
        assert record["thresholds"]["pixel_drawn"] == pytest.approx(metrics[cls]["pixel"]["f1_threshold"])
        # anomalous thumbnails carry the white ground-truth outline; normal ones have none
        for entry in galleries["anomalous_high"]:
            thumb = np.asarray(Image.open(run / entry["file"]).convert("RGB"))
            assert (thumb == 255).all(axis=-1).sum() > 0
        for entry in galleries["normal_high"]:
            original = np.asarray(Image.open(synthetic_root / entry["path"]).convert("RGB").resize((56, 56)))
            assert not (original == 255).all(axis=-1).any()  # so white in a thumbnail could only be an outline
            thumb = np.asarray(Image.open(run / entry["file"]).convert("RGB"))
            assert not (thumb == 255).all(axis=-1).any()


def test_two_runs_side_by_side(runs, runner, tmp_path):
    out = tmp_path / "cmp.html"
    result = runner.invoke(app, ["report", str(runs / "eval" / "x"), str(runs / "eval" / "y"), "--out", str(out)])
    assert result.exit_code == 0, result.output
    page = Page(out.read_text())
    [comparison] = [t for t in page.tables if "comparison" in t["attrs"].get("class", "")]
    body = [r for r in comparison["rows"] if r["cells"] and r["cells"][0]["class"] == "" and
            cell_text(r["cells"][0]).startswith("anomalyclip")]
    assert [cell_text(r["cells"][0]) for r in body] == ["anomalyclip · x", "anomalyclip · y"]
    means = []
    for name in ("x", "y"):
        mean = json.loads((runs / "eval" / name / "metrics.json").read_text())["datasets"][0]["mean"]
        means.append([shown(mean["image"][k]["mean"]) for k in IMAGE_KEYS]
                     + [shown(mean["pixel"][k]["mean"]) for k in PIXEL_KEYS])
    for row, expected in zip(body, means):
        assert [cell_text(c) for c in row["cells"][1:]] == expected
    for j in range(len(means[0])):  # the best of each column is marked, and only it
        best = max(float(m[j]) for m in means)
        marked = ["best" in body[i]["cells"][j + 1]["class"] for i in range(2)]
        assert marked == [float(m[j]) == best for m in means]
    assert len(page.metric_tables()) == 2  # then each run's own tables
    assert page.scripts == 0 and page.external == []
    decode_all(page.images)
    again = runner.invoke(app, ["report", str(runs / "eval" / "x"), "--out", str(out)])
    assert again.exit_code == 2 and "--force" in again.output


def test_missing_or_foreign_run_dir_exits_2(runs, runner, tmp_path):
    out = tmp_path / "r.html"
    foreign = tmp_path / "foreign"
    foreign.mkdir()
    (foreign / "config.json").write_text(json.dumps({"command": "train"}))
    (foreign / "metrics.json").write_text("{}")
    for bad in (tmp_path / "missing", tmp_path, foreign):
        result = runner.invoke(app, ["report", str(runs / "eval" / "x"), str(bad), "--out", str(out)])
        assert result.exit_code == 2, result.output
        assert str(bad) in result.output and "zsad eval" in result.output
    assert not out.exists()


def test_run_without_report_data_gets_its_tables_and_other_schemas_are_refused(runs, runner, tmp_path):
    plain = tmp_path / "plain"
    shutil.copytree(runs / "eval" / "x", plain, ignore=shutil.ignore_patterns("report*", "thumbs"))
    out = tmp_path / "plain.html"
    result = runner.invoke(app, ["report", str(plain), "--out", str(out)])
    assert result.exit_code == 0, result.output
    page = Page(out.read_text())
    assert len(page.metric_tables()) == 1 and page.images == [] and "without --report" in page.text
    data = json.loads((runs / "eval" / "x" / "report_data.json").read_text())
    (plain / "report_data.json").write_text(json.dumps({**data, "schema": "zsad-report-data/99"}))
    result = runner.invoke(app, ["report", str(plain), "--out", str(tmp_path / "other.html")])
    assert result.exit_code == 2 and "report_data.json" in result.output
    assert not (tmp_path / "other.html").exists()


def test_missing_extra_exits_2_with_the_pip_command(runs, runner, tmp_path, monkeypatch, checkpoint, synthetic_root):
    monkeypatch.setitem(sys.modules, "jinja2", None)  # import jinja2 -> ImportError
    result = runner.invoke(app, ["report", str(runs / "eval" / "x"), "--out", str(tmp_path / "r.html")])
    assert result.exit_code == 2 and "pip install 'zsad[report]'" in result.output
    result = runner.invoke(app, ["eval", "--test-on", synthetic_root.name, "--data-root", str(synthetic_root.parent), "--checkpoint",
                                 str(checkpoint), *TINY, "--runs", str(tmp_path / "runs"), "--report"])
    assert result.exit_code == 2 and "zsad[report]" in result.output
    assert not (tmp_path / "r.html").exists() and not (tmp_path / "runs").exists()


def test_predict_gallery_sorted_by_score_with_decisions(runner, tmp_path, checkpoint, synthetic_root):
    images = synthetic_root / "disc" / "test"
    out = tmp_path / "gallery.html"
    result = runner.invoke(app, ["predict", str(images / "good"), str(images / "hole"), "--checkpoint",
                                 str(checkpoint), *TINY, "--threshold", "0.5", "--batch-size", "7", "--report",
                                 "--report-out", str(out), "--json"])
    assert result.exit_code == 0, result.output
    records = [json.loads(line) for line in result.stdout.splitlines() if line.startswith("{")]
    page = Page(out.read_text())
    decoded = decode_all(page.images)
    assert len(decoded) == len(records) == 7
    scores = [float(s) for s in re.findall(r"score\s+(\d\.\d{4})", page.text)]
    assert scores == sorted((round(r["image_score"], 4) for r in records), reverse=True)
    for record in records:
        assert Path(record["path"]).name in page.text
    assert page.text.count("anomalous") + page.text.count("normal") >= len(records)
    assert page.scripts == 0 and page.external == []


@pytest.mark.skipif(shutil.which("chromium") is None,
                    reason="chromium is not installed (Debian package `chromium`): the page is not rendered")
def test_chromium_renders_the_page(runs, tmp_path):
    shot = tmp_path / "page.png"
    subprocess.run(["chromium", "--headless", "--no-sandbox", "--disable-gpu", "--hide-scrollbars",
                    f"--user-data-dir={tmp_path / 'profile'}", "--window-size=1280,2400", f"--screenshot={shot}",
                    (runs / "eval" / "x" / "report.html").as_uri()],
                   check=True, capture_output=True, timeout=120)
    pixels = np.asarray(Image.open(shot).convert("RGB")).astype(np.int16)
    assert pixels.shape[:2] == (2400, 1280)
    ink = (np.abs(pixels - 255).sum(axis=-1) > 60).mean()  # share of clearly non-white pixels
    assert 0.02 < ink < 0.9
    assert len(np.unique(pixels.reshape(-1, 3), axis=0)) > 500  # text, plots and photos, not a flat page
