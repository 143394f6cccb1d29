"""Self-contained HTML reports: of eval run folders (``zsad report``, ``zsad eval --report``) and of
predict outputs (``zsad predict --report``). Everything is read from the run folders (metrics.json,
config.json, report_data.json, thumbs/); no model is run. Plots are matplotlib SVGs and
thumbnails PNGs, both inlined as data URIs; the page has no script and no external reference.

Needs the optional extra ``zsad[report]`` (jinja2, matplotlib): ``require_report_extra`` turns its
absence into exit 2 with the pip command.
"""
from __future__ import annotations

import base64
import io
import json
import math
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, Mapping

import numpy as np
from PIL import Image

from zsadcli import __version__
from zsadcli.atomic import write_text_atomic
from zsadcli.core.report_data import DATA_FILE, GALLERIES, SCHEMA, png_bytes
from zsadcli.errors import BadInput

IMAGE_METRICS = ("auroc", "ap", "f1_max")
PIXEL_METRICS = ("auroc", "ap", "f1_max", "aupro")
METRIC_LABELS = {"auroc": "AUROC", "ap": "AP", "f1_max": "F1-max", "aupro": "AUPRO"}
GALLERY_TITLES = {"normal_high": "highest-scoring normal images (false alarms first)",
                  "anomalous_low": "lowest-scoring anomalous images (misses first)",
                  "anomalous_high": "highest-scoring anomalous images"}
PIP_COMMAND = "pip install 'zsad[report]'"


def require_report_extra() -> None:
    """Exit 2 with the pip command when jinja2 or matplotlib is missing."""
    missing = []
    for module in ("jinja2", "matplotlib"):
        try:
            __import__(module)
        except ImportError:
            missing.append(module)
    if missing:
        raise BadInput(f"HTML reports need the optional extra zsad[report] ({', '.join(missing)} not installed).",
                       hint=PIP_COMMAND)


# ---------------------------------------------------------------------- run folders
@dataclass
class EvalRun:
    path: Path
    metrics: dict[str, Any]
    config: dict[str, Any]
    data: dict[str, Any] | None  # report_data.json; None for a run evaluated without --report

    @property
    def name(self) -> str:
        return self.path.name

    @property
    def method(self) -> str:
        return str(self.metrics.get("method", "?"))


def _read_json(path: Path, run: Path) -> Any:
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError) as exc:
        raise BadInput(f"{path} cannot be read as JSON ({type(exc).__name__}).",
                       hint=f"evaluate again into {run} with --force") from None


def load_run(path: str | Path) -> EvalRun:
    """An eval run folder, or exit 2 naming what is missing."""
    run = Path(path)
    if not run.is_dir():
        raise BadInput(f"run folder {run} does not exist.", hint="give folders written by `zsad eval` (runs/eval/NAME)")
    metrics_file, config_file = run / "metrics.json", run / "config.json"
    if not metrics_file.is_file() or not config_file.is_file():
        raise BadInput(f"{run} is not an eval run folder (no metrics.json and config.json).",
                       hint="give folders written by `zsad eval` (runs/eval/NAME)")
    config = _read_json(config_file, run)
    metrics = _read_json(metrics_file, run)
    if (not isinstance(config, dict) or config.get("command") != "eval" or not isinstance(metrics, dict)
            or not isinstance(metrics.get("datasets"), list)):
        raise BadInput(f"{run} is not an eval run folder (config.json names command "
                       f"{config.get('command') if isinstance(config, dict) else None!r}).",
                       hint="give folders written by `zsad eval` (runs/eval/NAME)")
    data = None
    if (run / DATA_FILE).is_file():
        data = _read_json(run / DATA_FILE, run)
        if not isinstance(data, dict) or data.get("schema") != SCHEMA:
            raise BadInput(f"{run / DATA_FILE} has schema {data.get('schema') if isinstance(data, dict) else None!r}, "
                           f"this zsad reads {SCHEMA!r}.", hint="evaluate again with this version and --report")
    return EvalRun(run, metrics, config, data)


# ---------------------------------------------------------------------- formatting
def _number(value: Any) -> float:
    return math.nan if value is None else float(value)


def percent(value: Any) -> str:
    """x100 with one decimal, as eval's table; n/a where undefined."""
    value = _number(value)
    return "n/a" if math.isnan(value) else f"{100 * value:.1f}"


def short(value: Any) -> str:
    value = _number(value)
    return "n/a" if math.isnan(value) else f"{value:.4g}"


def data_uri(mime: str, payload: bytes) -> str:
    return f"data:{mime};base64,{base64.b64encode(payload).decode('ascii')}"


# ---------------------------------------------------------------------- plots
def class_figure(record: Mapping[str, Any], image: Mapping[str, Any], pixel: Mapping[str, Any], title: str) -> bytes:
    """One SVG per class: ROC and PR curves (image and pixel level) and the image-score histogram
    of normal vs anomalous images with the threshold lines."""
    import matplotlib

    from matplotlib.figure import Figure  # no pyplot: no global backend state

    figure = Figure(figsize=(11, 3.2), layout="constrained")
    roc_ax, pr_ax, hist_ax = figure.subplots(1, 3)
    curves = (("image", record.get("image_curve"), image, "tab:blue"),
              ("pixel", record.get("pixel_curve"), pixel, "tab:orange"))
    plotted = False
    for level, curve, values, colour in curves:
        if not curve:
            continue
        plotted = True
        roc_ax.plot(curve["fpr"], curve["tpr"], color=colour, lw=1.5,
                    label=f"{level} (AUROC {percent(values.get('auroc'))})")
        pr_ax.plot(curve["recall"], curve["precision"], color=colour, lw=1.5, drawstyle="steps-post",
                   label=f"{level} (AP {percent(values.get('ap'))})")
    roc_ax.plot([0, 1], [0, 1], color="0.7", lw=0.8, ls=":")
    for ax, xlabel, ylabel, name in ((roc_ax, "false positive rate", "true positive rate", "ROC"),
                                     (pr_ax, "recall", "precision", "precision-recall")):
        ax.set(xlim=(0, 1), ylim=(0, 1.02), xlabel=xlabel, ylabel=ylabel, title=f"{title}: {name}")
        if plotted:
            ax.legend(loc="lower right" if ax is roc_ax else "lower left", fontsize=8)
    scores, labels = np.asarray(record.get("scores", []), float), np.asarray(record.get("labels", []), int)
    if scores.size:
        lo, hi = float(scores.min()), float(scores.max())
        bins = np.linspace(lo, hi if hi > lo else lo + 1e-6, 31)
        for label, name, colour in ((0, "normal", "tab:green"), (1, "anomalous", "tab:red")):
            chosen = scores[labels == label]
            if chosen.size:
                hist_ax.hist(chosen, bins=bins, histtype="stepfilled", alpha=0.45, color=colour,
                             label=f"{name} ({chosen.size})")
        thresholds = record.get("thresholds", {})
        for key, name, style in (("image_f1", "F1-max threshold", "--"), ("image_card", "card threshold", "-")):
            value = thresholds.get(key)
            if value is not None and math.isfinite(value):
                hist_ax.axvline(value, color="black", ls=style, lw=1.2, label=f"{name} {value:.4g}")
        hist_ax.legend(fontsize=8)
    hist_ax.set(xlabel="image score", ylabel="images", title=f"{title}: image scores")
    buffer = io.BytesIO()
    with matplotlib.rc_context({"svg.hashsalt": "zsad", "svg.fonttype": "path"}):
        figure.savefig(buffer, format="svg", metadata={"Date": None})
    return buffer.getvalue()


# ---------------------------------------------------------------------- the page model
def _header(run: EvalRun) -> dict[str, Any]:
    config, data = run.config, run.data or {}
    environment = config.get("environment", {})
    models = config.get("models", {})
    first = next(iter(models.values()), {})
    wall = data.get("wall_time_s")
    return {
        "name": run.name, "path": str(run.path), "method": run.method,
        "models": [{"dataset": d, **{k: m.get(k) for k in ("backbone", "checkpoint", "checkpoint_format", "device",
                                                           "dtype", "ablate", "class_name")},
                    "hparams": ", ".join(f"{k}={v}" for k, v in sorted(m.get("hparams", {}).items())),
                    "digests": {k: v for k, v in m.items() if "sha256" in k}} for d, m in models.items()],
        "weights": data.get("weights", []),
        "protocol": {"test_on": ", ".join(config.get("test_on", [])), "aupro": config.get("aupro_variant"),
                     "batch_size": config.get("batch_size"), "data_root": config.get("data_root"),
                     "transductive": any(m.get("hparams", {}).get("transductive") for m in models.values())},
        "precision": first.get("dtype"), "device": first.get("device"),
        "version": environment.get("zsad"), "date": environment.get("time"),
        "environment": ", ".join(f"{k} {v}" for k, v in environment.items() if k not in ("zsad", "time")),
        "wall_time": f"{wall:.1f} s" if isinstance(wall, (int, float)) else "not recorded",
    }


def _table(dataset: Mapping[str, Any]) -> dict[str, Any]:
    rows = []
    for cls, result in dataset["per_class"].items():
        rows.append({"cls": cls, "n_images": result.get("n_images"), "n_anomalous": result.get("n_anomalous"),
                     "cells": [percent(result["image"].get(k)) for k in IMAGE_METRICS]
                     + [percent(result["pixel"].get(k)) for k in PIXEL_METRICS],
                     "thresholds": [short(result["image"].get("f1_threshold")),
                                    short(result["pixel"].get("f1_threshold"))]})
    mean = dataset.get("mean", {})
    mean_row = {"cls": "mean", "n_images": sum(r["n_images"] or 0 for r in rows),
                "n_anomalous": sum(r["n_anomalous"] or 0 for r in rows),
                "cells": [percent(mean.get("image", {}).get(k, {}).get("mean")) for k in IMAGE_METRICS]
                + [percent(mean.get("pixel", {}).get(k, {}).get("mean")) for k in PIXEL_METRICS]}
    return {"rows": rows, "mean": mean_row}


def _decision(result: Mapping[str, Any]) -> list[tuple[str, str]]:
    """A calibration card's per-class decision block (eval --calibration), as key/value lines."""
    decision = result.get("decision")
    if not isinstance(decision, Mapping):
        return []
    return [(str(k), short(v) if isinstance(v, (int, float)) and not isinstance(v, bool) else str(v))
            for k, v in decision.items() if not isinstance(v, (Mapping, list))]


def _with_card_thresholds(record: Mapping[str, Any], result: Mapping[str, Any]) -> dict[str, Any]:
    """The card's image threshold for the histogram: as eval recorded it, else from the class's
    decision block in metrics.json (eval --calibration)."""
    thresholds = dict(record.get("thresholds", {}))
    decision = result.get("decision")
    if thresholds.get("image_card") is None and isinstance(decision, Mapping):
        value = decision.get("image_threshold")
        thresholds["image_card"] = float(value) if isinstance(value, (int, float)) else None
    return {**record, "thresholds": thresholds}


def _thumb(run: EvalRun, entry: Mapping[str, Any]) -> dict[str, Any]:
    file = run.path / entry["file"]
    src = data_uri("image/png", file.read_bytes()) if file.is_file() else None
    return {"src": src, "caption": f"{entry.get('specie', '')} · {Path(entry['path']).name}",
            "score": short(entry.get("score")), "label": "anomalous" if entry.get("label") else "normal",
            "path": entry["path"]}


def _dataset_section(run: EvalRun, dataset: Mapping[str, Any]) -> dict[str, Any]:
    collected = (run.data or {}).get("datasets", {}).get(dataset["dataset"], {})
    classes = []
    for cls, result in dataset["per_class"].items():
        record = collected.get(cls)
        section: dict[str, Any] = {"cls": cls, "decision": _decision(result), "figure": None, "galleries": [],
                                   "thresholds": None}
        if record is not None:
            record = _with_card_thresholds(record, result)
            section["figure"] = data_uri("image/svg+xml", class_figure(record, result["image"], result["pixel"], cls))
            section["galleries"] = [{"title": GALLERY_TITLES[g], "thumbs": [_thumb(run, e) for e in record["galleries"][g]]}
                                    for g in GALLERIES if record.get("galleries", {}).get(g)]
            thresholds = record.get("thresholds", {})
            drawn = thresholds.get("pixel_drawn")
            section["thresholds"] = ("red: map >= " + short(drawn) + (" (calibration card)" if thresholds.get(
                "pixel_drawn_from") == "card" else " (pixel F1-max threshold)")) if drawn is not None else \
                "no pixel threshold (no ground-truth masks): no predicted region drawn"
        classes.append(section)
    return {"name": dataset["dataset"], "aupro_variant": dataset.get("aupro_variant"), "table": _table(dataset),
            "notes": dataset.get("notes", []), "classes": classes}


def _comparison(runs: list[EvalRun]) -> dict[str, Any]:
    """Methods x datasets: each run's class means side by side; the best value per column marked."""
    datasets = list(dict.fromkeys(d["dataset"] for run in runs for d in run.metrics["datasets"]))
    columns = [(d, level, key) for d in datasets for level, keys in (("image", IMAGE_METRICS), ("pixel", PIXEL_METRICS))
               for key in keys]
    values = []
    for run in runs:
        by_name = {d["dataset"]: d for d in run.metrics["datasets"]}
        values.append([_number(by_name[d]["mean"][level][key]["mean"]) if d in by_name else math.nan
                       for d, level, key in columns])
    rows = []
    for run, row in zip(runs, values):
        cells = []
        for j, value in enumerate(row):
            column = [percent(v) for v in (r[j] for r in values) if not math.isnan(v)]
            best = max((float(c) for c in column), default=None)
            shown = percent(value) if not math.isnan(value) else "—"
            cells.append({"text": shown, "best": len(values) > 1 and best is not None and shown != "—"
                          and float(shown) == best})
        rows.append({"label": f"{run.method} · {run.name}", "cells": cells})
    notes = []
    for d in datasets:  # class means over different classes are not comparable: say so
        counts = {run.name: len(by["per_class"]) for run in runs for by in run.metrics["datasets"] if by["dataset"] == d}
        if len(set(counts.values())) > 1:
            notes.append(f"{d}: the runs averaged different numbers of classes ("
                         + ", ".join(f"{name} {n}" for name, n in counts.items()) + ")")
    return {"datasets": [{"name": d, "span": len(IMAGE_METRICS) + len(PIXEL_METRICS)} for d in datasets],
            "notes": notes,
            "metrics": [f"{'img' if level == 'image' else 'px'} {METRIC_LABELS[key]}" for _, level, key in columns],
            "rows": rows}


def _environment(template: str):
    from jinja2 import Environment, PackageLoader, StrictUndefined, select_autoescape

    env = Environment(loader=PackageLoader("zsadcli", "templates"), autoescape=select_autoescape(["html", "j2"]),
                      undefined=StrictUndefined, trim_blocks=True, lstrip_blocks=True)
    return env.get_template(template)


def render_eval_report(runs: list[EvalRun]) -> str:
    require_report_extra()
    page = {"title": "zsad report: " + ", ".join(r.name for r in runs), "generated": _now(), "version": __version__,
            "comparison": _comparison(runs) if len(runs) > 1 else None,
            "runs": [{"header": _header(run), "has_data": run.data is not None,
                      "datasets": [_dataset_section(run, d) for d in run.metrics["datasets"]]} for run in runs],
            "image_metrics": [METRIC_LABELS[k] for k in IMAGE_METRICS],
            "pixel_metrics": [METRIC_LABELS[k] for k in PIXEL_METRICS]}
    return _environment("report.html.j2").render(**page)


def write_eval_report(run_dirs: list[str | Path], out: Path) -> Path:
    """Load (and check) every run before writing anything; one HTML file, atomically."""
    runs = [load_run(p) for p in run_dirs]
    return write_text_atomic(out, render_eval_report(runs))


def _now() -> str:
    return datetime.now(timezone.utc).isoformat(timespec="seconds")


# ---------------------------------------------------------------------- predict gallery
class PredictGallery:
    """Predict adds each image's JSON record with its image and map; ``write`` renders every image,
    sorted by score (highest first), as a heatmap thumbnail with the record's decision fields
    (``label``, ``threshold``, ``margin``) when it has them. Only thumbnails are kept."""

    def __init__(self, value_range: tuple[float, float], normalize: str = "fixed") -> None:
        self.value_range = value_range
        self.normalize = normalize
        self.entries: list[tuple[dict[str, Any], bytes]] = []

    def add(self, record: Mapping[str, Any], image: Image.Image, amap: np.ndarray) -> None:
        self.add_thumbnail(record, self.thumbnail(image, amap))

    def add_thumbnail(self, record: Mapping[str, Any], png: bytes) -> None:
        """A record with its ``thumbnail`` (made where the prediction was made, e.g. another rank)."""
        self.entries.append((dict(record), png))

    def thumbnail(self, image: Image.Image, amap: np.ndarray) -> bytes:
        """The heatmap thumbnail (PNG bytes) of one image."""
        from zsadcli.core.heatmap import jet, normalise_map
        from zsadcli.core.report_data import thumbnail_size

        size = thumbnail_size(max(image.size))
        scale = size / max(image.size)
        shape = (max(1, round(image.size[0] * scale)), max(1, round(image.size[1] * scale)))
        base = np.asarray(image.convert("RGB").resize(shape, Image.BICUBIC), np.float32)
        scaled, _ = normalise_map(amap.astype(np.float32), self.normalize, self.value_range)
        heat = jet(np.asarray(Image.fromarray(scaled, mode="F").resize(shape, Image.BILINEAR))).astype(np.float32)
        thumb = Image.fromarray((0.5 * base + 0.5 * heat).round().clip(0, 255).astype(np.uint8))
        return png_bytes(thumb)

    def render(self, title: str, description: Mapping[str, Any] | None = None) -> str:
        require_report_extra()
        ordered = sorted(self.entries, key=lambda e: -float(e[0]["image_score"]))
        items = []
        for rank, (record, png) in enumerate(ordered, 1):
            extra = [(key, short(record[key]) if isinstance(record[key], (int, float)) else str(record[key]))
                     for key in ("threshold", "margin") if key in record]
            path = Path(record["path"])
            items.append({"rank": rank, "src": data_uri("image/png", png), "name": f"{path.parent.name}/{path.name}",
                          "path": record["path"], "score": f"{record['image_score']:.4f}",
                          "label": record.get("label"), "extra": extra})
        labels = [r.get("label") for r, _ in self.entries if r.get("label")]
        counts = {label: labels.count(label) for label in dict.fromkeys(labels)}
        return _environment("gallery.html.j2").render(
            title=title, generated=_now(), version=__version__, items=items, counts=counts,
            description=[(k, str(v)) for k, v in (description or {}).items()
                         if k in ("method", "backbone", "checkpoint", "device", "dtype")],
            normalize=self.normalize)

    def write(self, out: Path, title: str, description: Mapping[str, Any] | None = None) -> Path:
        return write_text_atomic(out, self.render(title, description))
