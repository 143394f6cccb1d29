"""`zsad calibrate`: decision thresholds (a calibration card) from normal images or a labelled test split."""
from __future__ import annotations

from pathlib import Path
from typing import Annotated, Optional

import typer

from zsadcli.atomic import refuse_overwrite
from zsadcli.commands.common import (DeviceOpt, JsonOpt, MethodOptions, PrecisionOpt, QuietOpt, merge_options,
                                     method_options)
from zsadcli.console import emit_json, esc, log
from zsadcli.errors import BadInput


@method_options()
def calibrate(
    ctx: typer.Context,
    method_options: MethodOptions,
    out: Annotated[Path, typer.Option("--out", help="The calibration card to write (JSON).")],
    normal: Annotated[Optional[list[str]], typer.Option(
        "--normal", help="Images of good parts: files, folders or glob patterns (repeatable).",
        show_default=False)] = None,
    on: Annotated[Optional[str], typer.Option(
        "--on", help="A prepared dataset whose test split (normal and anomalous, with masks) calibrates.",
        show_default=False)] = None,
    data_root: Annotated[Path, typer.Option("--data-root", help="Folder holding the dataset named by --on.")
                         ] = Path("data"),
    classes: Annotated[Optional[str], typer.Option("--classes", help="With --on: only these classes (comma-separated).",
                                                   show_default=False)] = None,
    target_fpr: Annotated[float, typer.Option(
        "--target-fpr", help="FPR rule: the share of normal images (and pixels) allowed to be flagged.")] = 0.01,
    rule: Annotated[Optional[str], typer.Option(
        "--rule", help="fpr (quantile of normal scores; the default with --normal) or f1 (eval's F1-max "
                       "thresholds; the default with --on).", show_default=False)] = None,
    per_class: Annotated[bool, typer.Option("--per-class", help="With --on: thresholds per class too.")] = False,
    batch_size: Annotated[int, typer.Option("--batch-size", help="Images per forward pass.")] = 1,
    force: Annotated[bool, typer.Option("--force", help="Replace an existing card.")] = False,
    device: DeviceOpt = None,
    precision: PrecisionOpt = None,
    json: JsonOpt = False,
    quiet: QuietOpt = False,
) -> None:
    """Choose the image and pixel thresholds that turn scores into decisions and write them, with the
    identity of the weights, to a calibration card for `zsad predict/eval --calibration`.

    Examples: `zsad calibrate --checkpoint ck.safetensors --normal good/ --target-fpr 0.01 --out card.json`;
    `zsad calibrate --train-on visa --on mvtec --data-root data --per-class --out card.json`.
    """
    from zsadcli.core import calibration
    from zsadcli.core.engine import build_method, predict_paths
    from zsadcli.data.images import expand_inputs

    opts = merge_options(ctx, device=device, precision=precision, json=json, quiet=quiet)
    if bool(normal) == bool(on):
        raise BadInput("give --normal PATH (images of good parts) or --on DATASET (a labelled test split), "
                       "exactly one of them.")
    rule = rule or ("f1" if on else "fpr")
    if rule not in calibration.RULES:
        raise BadInput(f"--rule {rule!r}: use fpr or f1.")
    if rule == "f1" and normal:
        raise BadInput("--rule f1 needs anomalous images: use it with --on DATASET.", hint="or use --rule fpr")
    if per_class and normal:
        raise BadInput("--per-class needs --on DATASET (normal images carry no class).")
    if classes and normal:
        raise BadInput("--classes applies to --on DATASET only.")
    if not 0.0 < target_fpr < 1.0:
        raise BadInput(f"--target-fpr {target_fpr:g}: give a rate between 0 and 1 (e.g. 0.01 for 1%).")
    if batch_size < 1:
        raise BadInput("--batch-size must be at least 1.")
    refuse_overwrite(out, force, "calibration card")

    if normal:
        paths = expand_inputs(normal)
        if len(paths) < 2:
            raise BadInput(f"--normal gives {len(paths)} image; calibration needs at least 2 "
                           f"(and {calibration.UNSTABLE_BELOW} or more for a stable threshold).",
                           hint="give a folder of images of good parts")
        built = build_method(method_options.spec(opts))
        identity = calibration.weights_identity(built.description)
        import numpy as np

        scores, maps = [], []
        for prediction in predict_paths(built.method, paths, batch_size):
            scores.append(prediction.image_score)
            maps.append(prediction.anomaly_map)
        image_scores, all_maps = np.asarray(scores), np.stack(maps)
        numbers = calibration.normal_rule(image_scores, all_maps, target_fpr, f"the {len(paths)} --normal images")
        card = calibration.new_card(
            rule=rule, target_fpr=target_fpr, identity=identity, thresholds=numbers,
            source={"normal": list(normal), "n_files": len(paths)}, n_images=len(paths), n_normal=len(paths),
            stats={"image": {"normal": calibration.score_stats(image_scores)},
                   "pixel": {"normal": calibration.score_stats(all_maps)}},
            notes=calibration.stability_warnings(len(paths), target_fpr))
    else:
        from zsadcli.core.evaluation import evaluate_dataset
        from zsadcli.data.meta import load_meta

        meta = load_meta(data_root / on)
        built = build_method(method_options.spec(opts))
        identity = calibration.weights_identity(built.description)
        collected: dict = {}
        result = evaluate_dataset(built.method, on, data_root / on, meta, batch_size=batch_size,
                                  classes=classes.split(",") if classes else None,
                                  class_name=method_options.class_name,
                                  class_hook=lambda cls, data: collected.__setitem__(cls, data))
        found = calibration.labelled_calibration(result, collected, rule=rule, target_fpr=target_fpr,
                                                 per_class=per_class)
        card = calibration.new_card(
            rule=rule, target_fpr=target_fpr if rule == "fpr" else None, identity=identity,
            thresholds=found["thresholds"], n_images=found["n_images"], n_normal=found["n_normal"],
            source={"dataset": on, "data_root": str(data_root), "split": "test", "classes": list(collected)},
            stats=found["stats"], notes=found["notes"], per_class=found["per_class"],
            at_threshold=found["at_threshold"])
    calibration.write_card(out, card)
    if opts.json:
        for note in card["warnings"]:  # stderr: stdout stays one JSON document
            log(f"[yellow]warning:[/] {esc(note)}")
        emit_json({"card": str(out), **card})
        return
    _summarise(card, out)


def _interval(entry) -> str:
    if not entry:
        return ""
    low, high = entry["ci95"]
    return f"  (FPR on these normal images {entry['value']:.4f}, 95% interval {low:.4f}-{high:.4f})"


def _summarise(card: dict, out: Path) -> None:
    target = f", target FPR {card['target_fpr']:g}" if card["target_fpr"] is not None else ""
    log(f"rule {card['rule']}{target}: n = {card['n_images']} images ({card['n_normal']} normal)")
    log(f"image threshold {card['image_threshold']:.6g}{_interval(card['image_fpr'])}")
    log(f"pixel threshold {card['pixel_threshold']:.6g}{_interval(card['pixel_fpr'])}")
    for side in ("image", "pixel"):
        rates = (card.get("at_threshold") or {}).get(side)
        if rates:
            log(f"{side} at its threshold on the test split: FPR {rates['fpr']:.4f}, TPR {rates['tpr']:.4f}")
    for cls, entry in (card.get("per_class") or {}).items():
        log(f"  {esc(cls)}: image {entry['image_threshold']:.6g}, pixel {entry['pixel_threshold']:.6g}")
    for note in card["warnings"]:
        log(f"[yellow]warning:[/] {esc(note)}")
    log(f"wrote {esc(out)}")
