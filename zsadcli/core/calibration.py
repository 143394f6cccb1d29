"""Calibration cards: decision thresholds as data, tied to the weights that produced the scores.

A card holds an image threshold (an image is anomalous when ``image_score >= image_threshold``)
and a pixel threshold (a pixel is defective when ``map >= pixel_threshold``), the rule that
chose them, how many images they rest on, score statistics and the identity of the weights
(method, hyperparameters, image size, sha256 of the backbone and checkpoint files). predict and
eval apply a card; they never compute thresholds themselves.

Rules:
- ``fpr``: on normal images only. With n normal scores and k = floor(target_fpr * n), the
  threshold is the smallest normal score above the (n-k)-th smallest one, so at most k normal
  scores reach it (empirical FPR <= target); k = 0 puts it just above the largest normal score.
  Pixels: the same over all pixels of the normal images.
- ``f1``: on a labelled test split: the F1-max thresholds eval reports (``f1_threshold``).

The FPR a threshold implies on normal images comes with a percentile-bootstrap 95% interval
(images resampled with replacement, ``BOOTSTRAP_RESAMPLES`` times, numpy seed ``BOOTSTRAP_SEED``;
pixels are resampled by whole image, since neighbouring pixels are not independent).
"""
from __future__ import annotations

import hashlib
import json
import math
import os
import re
import warnings
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, Iterable, Mapping

import numpy as np

from zsadcli import __version__
from zsadcli.core import metrics
from zsadcli.errors import BadInput

CARD_SCHEMA_VERSION = 1
CARD_KIND = "zsad-calibration-card"
RULES = ("fpr", "f1")
REQUIRED_KEYS = ("schema_version", "rule", "image_threshold", "pixel_threshold", "n_images", "weights")
BOOTSTRAP_RESAMPLES = 2000
BOOTSTRAP_SEED = 0
CONFIDENCE = 0.95
UNSTABLE_BELOW = 20  # fewer normal images than this: the threshold is unstable (warned, and said in the card)
STAT_QUANTILES = {"q01": 0.01, "q05": 0.05, "q25": 0.25, "q50": 0.5, "q75": 0.75, "q95": 0.95, "q99": 0.99}


# ---------------------------------------------------------------------- thresholds
def fpr_threshold(normal_scores: np.ndarray, target_fpr: float) -> float:
    """The lowest threshold at which at most floor(target_fpr * n) of the ``n`` normal scores are
    >= it (see the module doc). Works on any shape (flattened); O(n), no full sort."""
    if not 0.0 < target_fpr < 1.0:
        raise ValueError(f"target_fpr must be in (0, 1), got {target_fpr}")
    scores = np.asarray(normal_scores).reshape(-1)
    n = scores.size
    if n == 0:
        raise ValueError("no normal scores")
    allowed = int(math.floor(target_fpr * n + 1e-9))  # the epsilon absorbs 0.29 * 100 = 28.999...
    kept = n - allowed  # the kept lowest scores must stay below the threshold
    boundary = np.partition(scores, kept - 1)[kept - 1]
    above = scores[scores > boundary]
    if above.size:
        return float(above.min())
    return float(np.nextafter(boundary, np.asarray(np.inf, dtype=scores.dtype)))


def bootstrap_rate_interval(flagged: np.ndarray, totals: np.ndarray | None = None, *,
                            resamples: int = BOOTSTRAP_RESAMPLES, seed: int = BOOTSTRAP_SEED,
                            confidence: float = CONFIDENCE) -> list[float]:
    """Percentile bootstrap interval of sum(flagged) / sum(totals), resampling the units (images)
    with replacement. ``flagged[i]``: flagged count of unit i; ``totals[i]``: its size (default 1)."""
    flagged = np.asarray(flagged, dtype=np.float64).reshape(-1)
    totals = np.ones_like(flagged) if totals is None else np.asarray(totals, dtype=np.float64).reshape(-1)
    rng = np.random.default_rng(seed)
    rates = np.empty(resamples)
    step = max(1, 2_000_000 // max(flagged.size, 1))  # bounded memory for large sets
    for start in range(0, resamples, step):
        idx = rng.integers(0, flagged.size, size=(min(step, resamples - start), flagged.size))
        rates[start:start + len(idx)] = flagged[idx].sum(axis=1) / totals[idx].sum(axis=1)
    tail = (1.0 - confidence) / 2
    low, high = np.quantile(rates, [tail, 1.0 - tail])
    return [float(low), float(high)]


def score_stats(values: np.ndarray) -> dict[str, float]:
    """min, quantiles, max and mean of a set of scores (any shape)."""
    flat = np.asarray(values).reshape(-1)
    if flat.size == 0:
        return {}
    quantiles = np.quantile(flat, list(STAT_QUANTILES.values()))
    return {"n": int(flat.size), "min": float(flat.min()),
            **{k: float(v) for k, v in zip(STAT_QUANTILES, quantiles)},
            "max": float(flat.max()), "mean": float(flat.mean(dtype=np.float64))}


def _check_not_degenerate(scores: np.ndarray, what: str, source: str) -> None:
    flat = np.asarray(scores).reshape(-1)
    if flat.min() == flat.max():
        raise BadInput(f"all {what} of {source} equal {float(flat.min()):g}: no threshold can separate anything "
                       "(degenerate scores; is the method's map or score switched off?).",
                       hint="calibrate with other images or weights, or check --ablate/--hparam")


def implied_fpr(image_scores: np.ndarray, maps: np.ndarray, image_threshold: float,
                pixel_threshold: float) -> dict[str, Any]:
    """The FPR the thresholds imply on these normal images, with bootstrap intervals."""
    image_flags = (np.asarray(image_scores) >= image_threshold).astype(np.int64)
    pixels = np.asarray(maps).reshape(len(maps), -1)
    pixel_flags = np.count_nonzero(pixels >= pixel_threshold, axis=1)
    pixel_totals = np.full(len(pixels), pixels.shape[1])
    return {"image_fpr": {"value": float(image_flags.mean()), "ci95": bootstrap_rate_interval(image_flags)},
            "pixel_fpr": {"value": float(pixel_flags.sum() / pixel_totals.sum()),
                          "ci95": bootstrap_rate_interval(pixel_flags, pixel_totals)}}


def normal_rule(image_scores: np.ndarray, maps: np.ndarray, target_fpr: float, source: str) -> dict[str, Any]:
    """FPR-rule thresholds from normal images and what they imply (the card's numeric core)."""
    image_scores = np.asarray(image_scores)
    if len(image_scores) < 2:
        raise BadInput(f"{source} holds {len(image_scores)} normal image(s); calibration needs at least 2 "
                       f"(and {UNSTABLE_BELOW} or more for a stable threshold).",
                       hint="give more images of good parts")
    _check_not_degenerate(image_scores, "image scores", source)
    _check_not_degenerate(maps, "anomaly-map pixels", source)
    image_t = fpr_threshold(image_scores, target_fpr)
    pixel_t = fpr_threshold(maps, target_fpr)
    return {"image_threshold": image_t, "pixel_threshold": pixel_t,
            **implied_fpr(image_scores, maps, image_t, pixel_t)}


def stability_warnings(n_normal: int, target_fpr: float | None) -> list[str]:
    notes = []
    if n_normal < UNSTABLE_BELOW:
        notes.append(f"only {n_normal} normal images (< {UNSTABLE_BELOW}): the thresholds are unstable; "
                     "calibrate on more images of good parts")
    if target_fpr is not None and target_fpr * n_normal < 1:
        notes.append(f"{n_normal} normal images cannot resolve an FPR of {target_fpr:g} (needs >= "
                     f"{math.ceil(1 / target_fpr)}): the image threshold sits just above the highest normal score")
    return notes


# ---------------------------------------------------------------------- weights identity
_DIGESTS: dict[tuple, str] = {}


def file_sha256(path: str | os.PathLike) -> str:
    """sha256 of a file, remembered per (path, size, mtime) within the process."""
    path = Path(path)
    stat = path.stat()
    key = (str(path.resolve()), stat.st_size, stat.st_mtime_ns)
    if key not in _DIGESTS:
        digest = hashlib.sha256()
        with open(path, "rb") as fh:
            for chunk in iter(lambda: fh.read(1 << 20), b""):
                digest.update(chunk)
        _DIGESTS[key] = digest.hexdigest()
    return _DIGESTS[key]


def backbone_sha256(source: str) -> str | None:
    """sha256 of the backbone file behind a built method's ``backbone`` description: a
    weights.yaml key shows as ``key (path)`` (its registered digest, else the file's), an
    ``hf-hub:`` id is looked up in the local Hub cache, anything else is a local file."""
    from zsadcli.core import hub

    if source.startswith("hf-hub:"):
        from zsadcli.core.backbone import _download_hub_id

        return file_sha256(_download_hub_id(source[len("hf-hub:"):]))
    registered = re.fullmatch(r"(\S+) \((.+)\)", source)
    if registered:
        entry = hub.load_registry().get(registered.group(1))
        if entry is not None and entry.sha256:
            return entry.sha256
        return file_sha256(registered.group(2))
    return file_sha256(source) if Path(source).is_file() else None


def _canonical(value: Any) -> Any:
    """JSON-shaped (tuples become lists, paths strings), so a card read back compares equal."""
    return json.loads(json.dumps(value, sort_keys=True, default=str))


def weights_identity(description: Mapping[str, Any]) -> dict[str, Any]:
    """What the scores depend on, from a built method's description (engine.build_method): the
    method, its hyperparameters (image size included), ablations, and the sha256 of the backbone
    and checkpoint files. Paths are kept for the reader but never compared.

    An exported model (``--model DIR``) is identified by the same things, read from its model card
    (the sha256 of the backbone and checkpoint it was made from): it computes what the torch method
    computes, so a card made with either fits the other; its folder is recorded, not compared."""
    hparams = _canonical(description.get("hparams") or {})
    if description.get("model"):
        sources = description.get("sources") or {}
        backbone, checkpoint_source = sources.get("backbone") or {}, sources.get("checkpoint") or {}
        return {"method": description["method"], "image_size": hparams.get("image_size"),
                "hparams": hparams, "ablate": sorted(description.get("ablate") or []),
                "class_name": description.get("class_name"),
                "backbone": backbone.get("key") or backbone.get("source") or backbone.get("path"),
                "backbone_sha256": backbone.get("sha256"), "checkpoint": checkpoint_source.get("path"),
                "checkpoint_sha256": checkpoint_source.get("sha256"), "model": description["model"]}
    checkpoint = description.get("checkpoint")
    return {"method": description["method"], "image_size": hparams.get("image_size"), "hparams": hparams,
            "ablate": sorted(description.get("ablate") or []), "class_name": description.get("class_name"),
            "backbone": description.get("backbone"), "backbone_sha256": backbone_sha256(str(description.get("backbone"))),
            "checkpoint": checkpoint, "checkpoint_sha256": file_sha256(checkpoint) if checkpoint else None}


_COMPARED = {"method": "method", "image_size": "image size", "ablate": "ablations",
             "backbone_sha256": "backbone (sha256)", "checkpoint_sha256": "checkpoint (sha256)"}


def identity_differences(card_identity: Mapping[str, Any], identity: Mapping[str, Any]) -> list[str]:
    """Human-readable differences between the weights a card was made with and these."""
    out = []
    for key, label in _COMPARED.items():
        if card_identity.get(key) != identity.get(key):
            out.append(f"{label}: card {_short(card_identity.get(key))}, now {_short(identity.get(key))}")
    theirs, ours = card_identity.get("hparams") or {}, identity.get("hparams") or {}
    changed = sorted(k for k in set(theirs) | set(ours) if k != "image_size" and theirs.get(k) != ours.get(k))
    if changed:
        out.append("hyperparameters " + ", ".join(f"{k} (card {_short(theirs.get(k))}, now {_short(ours.get(k))})"
                                                  for k in changed))
    return out


def _short(value: Any) -> str:
    text = "none" if value is None else str(value)
    return text[:12] + "…" if re.fullmatch(r"[0-9a-f]{64}", text) else text


def check_card_fits(card: Mapping[str, Any], path: str | os.PathLike, description: Mapping[str, Any]) -> None:
    """Refuse (exit 2) a card made with another method, other weights or another image size."""
    differences = identity_differences(card["weights"], weights_identity(description))
    if differences:
        raise BadInput(f"calibration card {path} was made for other weights: {'; '.join(differences)}.",
                       hint="use the same --method/--checkpoint/--backbone/--image-size as `zsad calibrate`, "
                            "or calibrate these weights")


# ---------------------------------------------------------------------- cards on disk
def new_card(*, rule: str, target_fpr: float | None, identity: Mapping[str, Any], source: Mapping[str, Any],
             n_images: int, n_normal: int, thresholds: Mapping[str, Any], stats: Mapping[str, Any],
             notes: Iterable[str], per_class: Mapping[str, Any] | None = None,
             at_threshold: Mapping[str, Any] | None = None) -> dict[str, Any]:
    """A card in the current schema (the key order is the order a reader meets them)."""
    notes = list(notes)
    card: dict[str, Any] = {
        "schema_version": CARD_SCHEMA_VERSION, "kind": CARD_KIND,
        "method": identity["method"], "image_size": identity["image_size"], "hparams": identity["hparams"],
        "rule": rule, "target_fpr": target_fpr,
        "image_threshold": thresholds["image_threshold"], "pixel_threshold": thresholds["pixel_threshold"],
        "decision": "anomalous if image_score >= image_threshold; defect pixels where map >= pixel_threshold",
        "n_images": n_images, "n_normal": n_normal, "unstable": n_normal < UNSTABLE_BELOW,
        "image_fpr": thresholds.get("image_fpr"), "pixel_fpr": thresholds.get("pixel_fpr"),
        "bootstrap": {"resamples": BOOTSTRAP_RESAMPLES, "seed": BOOTSTRAP_SEED, "confidence": CONFIDENCE,
                      "unit": "image"},
        "score_stats": dict(stats), "source": dict(source), "weights": dict(identity),
        "warnings": notes, "zsad_version": __version__,
        "created": datetime.now(timezone.utc).isoformat(timespec="seconds"),
    }
    if at_threshold is not None:
        card["at_threshold"] = dict(at_threshold)
    if per_class is not None:
        card["per_class"] = dict(per_class)
    return card


def write_card(path: str | os.PathLike, card: Mapping[str, Any]) -> Path:
    from zsadcli.core.runs import write_json

    return write_json(Path(path), card)


def _finite_number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


def load_card(path: str | os.PathLike) -> dict[str, Any]:
    """Read and validate a card; anything unusable is one clear BadInput (exit 2)."""
    path = Path(path)
    if not path.is_file():
        raise BadInput(f"calibration card {path} does not exist.", hint="make one with `zsad calibrate ... --out CARD`")
    try:
        card = json.loads(path.read_text())
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise BadInput(f"calibration card {path} is not valid JSON ({exc}).") from None
    if not isinstance(card, dict) or "schema_version" not in card:
        raise BadInput(f"calibration card {path} is not a zsad calibration card (no schema_version).",
                       hint="make one with `zsad calibrate ... --out CARD`")
    if card["schema_version"] != CARD_SCHEMA_VERSION:
        raise BadInput(f"calibration card {path} has schema version {card['schema_version']!r}; this zsad reads "
                       f"version {CARD_SCHEMA_VERSION}.", hint="recalibrate with this zsad version")
    missing = [k for k in REQUIRED_KEYS if k not in card]
    if missing:
        raise BadInput(f"calibration card {path} lacks the key(s) {', '.join(missing)}.",
                       hint="recalibrate with `zsad calibrate`; cards are not meant to be edited by hand")
    bad = [k for k in ("image_threshold", "pixel_threshold") if not _finite_number(card[k])]
    for cls, entry in (card.get("per_class") or {}).items():
        if not isinstance(entry, dict):
            bad.append(f"per_class.{cls}")
            continue
        bad += [f"per_class.{cls}.{k}" for k in ("image_threshold", "pixel_threshold")
                if not _finite_number(entry.get(k))]
    if bad or not isinstance(card["weights"], dict) or "method" not in card["weights"]:
        raise BadInput(f"calibration card {path} has no usable {', '.join(bad) or 'weights identity'}.",
                       hint="recalibrate with `zsad calibrate`")
    return card


def thresholds_for(card: Mapping[str, Any], class_name: str | None, path: str | os.PathLike = "card") -> tuple[float, float]:
    """(image, pixel) thresholds: the card's own, or those of ``class_name`` from its per_class."""
    if class_name is None:
        return float(card["image_threshold"]), float(card["pixel_threshold"])
    per_class = card.get("per_class") or {}
    if class_name not in per_class:
        raise BadInput(f"calibration card {path} has no thresholds for class {class_name!r}.",
                       hint=f"its classes: {', '.join(per_class) or '(none: calibrate with --per-class)'}")
    entry = per_class[class_name]
    return float(entry["image_threshold"]), float(entry["pixel_threshold"])


# ---------------------------------------------------------------------- eval at a card
def decision_hook(card: Mapping[str, Any]):
    """An ``evaluate_dataset`` class hook: accuracy/precision/recall/FPR at the card's image
    threshold and pixel precision/recall/IoU at its pixel threshold (the class's own thresholds
    when the card has per-class ones for it, else the global ones)."""

    def hook(cls: str, data) -> dict[str, Any]:
        own = cls in (card.get("per_class") or {})
        image_t, pixel_t = thresholds_for(card, cls if own else None)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", metrics.UndefinedMetric)  # NaN shows as n/a
            image = metrics.image_decision_metrics(data.labels, data.scores, image_t)
            pixel = metrics.pixel_decision_metrics(data.masks, data.maps, pixel_t)
        return {"decision": {"image": {**image, "threshold": image_t}, "pixel": {**pixel, "threshold": pixel_t},
                             "thresholds": "per_class" if own else "global"}}

    return hook


def decision_mean(per_class: Mapping[str, Mapping[str, Any]]) -> dict[str, Any]:
    """Unweighted class mean of the decision metrics (thresholds are per class: not averaged)."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", metrics.UndefinedMetric)
        return {side: metrics.class_mean({cls: {k: v for k, v in r["decision"][side].items() if k != "threshold"}
                                          for cls, r in per_class.items() if "decision" in r})
                for side in ("image", "pixel")}


# ---------------------------------------------------------------------- calibrate on a labelled split
def _pooled(collected: Mapping[str, Any]):
    parts = list(collected.values())
    return (np.concatenate([c.scores for c in parts]), np.concatenate([c.labels for c in parts]).astype(bool),
            np.concatenate([c.maps for c in parts]), np.concatenate([c.masks for c in parts]).astype(bool))


def _rates(labels: np.ndarray, scores: np.ndarray, threshold: float) -> dict[str, float]:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", metrics.UndefinedMetric)
        return metrics.rates_at_threshold(labels, scores, threshold)


def _labelled_thresholds(scores, labels, maps, masks, rule: str, target_fpr: float, source: str,
                         f1_thresholds: tuple[float, float] | None, notes: list[str]) -> dict[str, Any]:
    """Thresholds of one labelled set (a class, or all classes pooled) under ``rule``."""
    normal = ~labels
    if rule == "fpr":
        return normal_rule(scores[normal], maps[normal], target_fpr, f"the normal test images of {source}")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", metrics.UndefinedMetric)
        image_t, pixel_t = f1_thresholds or (metrics.f1_max(labels, scores).threshold,
                                             metrics.f1_max(masks, maps).threshold)
    if math.isnan(image_t):
        raise BadInput(f"{source} needs normal and anomalous test images for --rule f1.",
                       hint="use --rule fpr (normal images only)")
    if math.isnan(pixel_t):
        pixel_t = normal_rule(scores[normal], maps[normal], target_fpr, source)["pixel_threshold"]
        notes.append(f"{source}: no anomalous pixels with masks, so the pixel threshold follows the FPR rule "
                     f"(target {target_fpr:g}) on its normal images")
    out: dict[str, Any] = {"image_threshold": float(image_t), "pixel_threshold": float(pixel_t)}
    if normal.sum():
        out.update(implied_fpr(scores[normal], maps[normal], out["image_threshold"], out["pixel_threshold"]))
    return out


def labelled_calibration(result, collected: Mapping[str, Any], *, rule: str, target_fpr: float,
                         per_class: bool) -> dict[str, Any]:
    """Card numbers from a labelled test split scored by ``evaluate_dataset``: ``collected`` maps
    class -> ClassScores (from its class hook); the per-class F1 thresholds are eval's own."""
    notes: list[str] = []
    scores, labels, maps, masks = _pooled(collected)
    thresholds = _labelled_thresholds(scores, labels, maps, masks, rule, target_fpr, f"dataset {result.dataset}",
                                      None, notes)
    at_threshold = {"image": _rates(labels, scores, thresholds["image_threshold"]),
                    "pixel": _rates(masks, maps, thresholds["pixel_threshold"])}
    stats = {"image": {"normal": score_stats(scores[~labels]), "anomalous": score_stats(scores[labels])},
             "pixel": {"normal": score_stats(maps[~masks]), "anomalous": score_stats(maps[masks])}}
    classes: dict[str, Any] | None = None
    if per_class:
        classes = {}
        for cls, data in collected.items():
            labels_c, masks_c = data.labels.astype(bool), data.masks.astype(bool)
            f1 = (result.per_class[cls]["image"]["f1_threshold"], result.per_class[cls]["pixel"]["f1_threshold"])
            try:
                found = _labelled_thresholds(data.scores, labels_c, data.maps, masks_c, rule, target_fpr,
                                             f"class {cls}", f1, notes)
            except BadInput as exc:
                notes.append(f"class {cls} has no thresholds of its own: {exc.message}")
                continue
            classes[cls] = {**found, "n_images": int(len(labels_c)), "n_normal": int((~labels_c).sum()),
                            "n_anomalous": int(labels_c.sum()),
                            "image": _rates(labels_c, data.scores, found["image_threshold"]),
                            "pixel": _rates(masks_c, data.maps, found["pixel_threshold"])}
    n_normal = int((~labels).sum())
    return {"thresholds": thresholds, "at_threshold": at_threshold, "stats": stats, "per_class": classes,
            "n_images": int(len(labels)), "n_normal": n_normal,
            "notes": stability_warnings(n_normal, target_fpr if rule == "fpr" else None) + notes}
