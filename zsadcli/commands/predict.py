"""`zsad predict`: anomaly heatmaps and scores for images."""
from __future__ import annotations

from pathlib import Path
from typing import Annotated, Optional

import numpy as np
import typer

from zsadcli.atomic import atomic_path, refuse_overwrite
from zsadcli.commands.common import (BatchSizeOpt, DeviceOpt, JsonOpt, MethodOptions, PrecisionOpt, QuietOpt,
                                     WorkersOpt, finite_float, merge_options, method_options)
from zsadcli.console import emit_json, esc, log
from zsadcli.errors import BadInput
from zsadcli.outputs import check_output_file


@method_options()
def predict(
    ctx: typer.Context,
    inputs: Annotated[list[str], typer.Argument(help="Image files, folders or glob patterns.", show_default=False)],
    method_options: MethodOptions,
    out: Annotated[Optional[Path], typer.Option("--out", help="Overlay PNG for a single image.",
                                                show_default=False)] = None,
    out_dir: Annotated[Optional[Path], typer.Option("--out-dir", help="Folder for one overlay PNG per image.",
                                                    show_default=False)] = None,
    save_raw: Annotated[Optional[Path], typer.Option(
        "--save-raw", help="Folder for DIR/<stem>.npy: the final map (float32, size x size) eval scores.",
        show_default=False)] = None,
    threshold: Annotated[Optional[float], typer.Option(
        "--threshold", help="Image-score threshold: adds the label (anomalous if score >= T).",
        callback=finite_float(), show_default=False)] = None,
    calibration: Annotated[Optional[Path], typer.Option(
        "--calibration", help="A calibration card (`zsad calibrate`): adds label, threshold and margin; "
                              "--threshold still overrides its image threshold.", show_default=False)] = None,
    card_class: Annotated[Optional[str], typer.Option(
        "--class", help="Use the card's thresholds for this class (a card made with --per-class).",
        show_default=False)] = None,
    save_mask: Annotated[Optional[Path], typer.Option(
        "--save-mask", help="Folder for DIR/<stem>.png: the binary defect mask (map >= the card's pixel "
                            "threshold) at the image's own size; needs --calibration.", show_default=False)] = None,
    normalize: Annotated[str, typer.Option(
        "--normalize", help="Heatmap colour scale: fixed (the map's own probability scale) or image (min-max).")
    ] = "fixed",
    batch_size: BatchSizeOpt = 1,
    report: Annotated[bool, typer.Option(
        "--report", help="Also write an HTML gallery of every image, highest score first (needs zsad[report]).")
    ] = False,
    report_out: Annotated[Optional[Path], typer.Option(
        "--report-out", help="The gallery's HTML file; implies --report (--out stays the single image's overlay "
                             "PNG). Default: gallery.html.", show_default=False)] = None,
    force: Annotated[bool, typer.Option("--force", help="Replace existing output files.")] = False,
    workers: WorkersOpt = None,
    device: DeviceOpt = None,
    precision: PrecisionOpt = None,
    json: JsonOpt = False,
    quiet: QuietOpt = False,
) -> None:
    """Score images and write heatmap overlays (PNG), raw maps (.npy) and/or JSON lines.

    Examples: `zsad predict part.png --method anomalyclip --train-on mvtec --out heat.png`;
    `zsad predict 'shots/*.jpg' --checkpoint runs/train/x/epoch_15.safetensors --out-dir heat/ --json`.
    """
    from zsadcli.core import decisions
    from zsadcli.core.distributed import in_input_order, is_writer
    from zsadcli.core.engine import build_method, predict_paths
    from zsadcli.data.images import expand_inputs
    from zsadcli.core.report import PredictGallery, require_report_extra

    opts = merge_options(ctx, device=device, precision=precision, json=json, quiet=quiet)
    if normalize not in ("fixed", "image"):
        raise BadInput(f"--normalize {normalize!r}: use fixed or image.")
    if out and out_dir:
        raise BadInput("give --out (one image) or --out-dir (many), not both.")
    if batch_size < 1:
        raise BadInput("--batch-size must be at least 1.")
    card = decisions.load_predict_card(calibration, card_class, save_mask)
    paths = expand_inputs(inputs)
    if out and len(paths) != 1:
        raise BadInput(f"--out names one file but {len(paths)} images were given.", hint="use --out-dir DIR")
    if out and out.suffix.lower() != ".png":
        raise BadInput(f"--out {out}: the overlay is written as PNG; name it *.png.")
    if out_dir or save_raw or save_mask:
        first_with_stem: dict[str, Path] = {}
        for path in paths:
            other = first_with_stem.setdefault(path.stem, path)
            if other != path:
                raise BadInput(f"inputs {other} and {path} share the file name stem {path.stem!r}; their outputs "
                               "would collide.", hint="predict them separately")
    targets = {p: {"heatmap": out if out else (out_dir / f"{p.stem}.png" if out_dir else None),
                   "raw": save_raw / f"{p.stem}.npy" if save_raw else None,
                   "mask": save_mask / f"{p.stem}.png" if save_mask else None} for p in paths}
    for files in targets.values():
        for kind, target in files.items():
            if target is not None:
                check_output_file(target, "output file")  # before any compute: nothing is lost at the end
                refuse_overwrite(target, force, "output file")
    if report or report_out:
        report_out = report_out or Path("gallery.html")
        require_report_extra()
        check_output_file(report_out, "gallery")
        refuse_overwrite(report_out, force, "gallery")

    built = build_method(method_options.spec(opts))
    image_threshold, pixel_threshold = decisions.predict_thresholds(card, calibration, card_class, built.description,
                                                                    threshold)
    threshold = image_threshold
    value_range = built.method.map_range
    gallery = PredictGallery(value_range, normalize) if report_out else None
    made = _write_outputs(predict_paths(built.method, paths, batch_size, workers), targets, threshold,
                          pixel_threshold, normalize, value_range, gallery)
    for record, thumbnail in in_input_order(made):
        if gallery is not None:
            gallery.add_thumbnail(record, thumbnail)
        if opts.json:
            emit_json(record, compact=True)
        else:
            label = f"  {record['label']}" if "label" in record else ""
            log(f"{esc(record['path'])}: score {record['image_score']:.4f}  map max {record['map_max']:.4f}{label}"
                + (f"  -> {esc(record['heatmap'])}" if "heatmap" in record else ""))
    if gallery is not None and is_writer():  # under torchrun rank 0 holds every record
        gallery.write(report_out, f"zsad predict: {len(paths)} images", built.description)
        log(f"wrote {esc(report_out)}")


def _write_outputs(predictions, targets, threshold, pixel_threshold, normalize, value_range, gallery):
    """Each prediction's files, written by the process that made it (under torchrun: its rank);
    yields (input index, (JSON record, gallery thumbnail PNG or None))."""
    from zsadcli.core import decisions
    from zsadcli.core.heatmap import render_overlay

    for prediction in predictions:
        files = targets[prediction.path]
        record = {"path": str(prediction.path), "image_score": prediction.image_score,
                  "map_max": float(prediction.anomaly_map.max())}
        if threshold is not None:
            record.update(decisions.decision_record(prediction.image_score, threshold, pixel_threshold))
        mask = decisions.defect_mask(prediction.anomaly_map, pixel_threshold, prediction.image.size)
        if files["mask"] is not None:
            decisions.save_mask(mask, files["mask"])
            record["mask"] = str(files["mask"])
        if files["heatmap"] is not None:
            overlay = render_overlay(prediction.image, prediction.anomaly_map, score=prediction.image_score,
                                     normalize=normalize, value_range=value_range, threshold=threshold,
                                     mask=mask)
            with atomic_path(files["heatmap"]) as tmp:
                overlay.save(tmp, format="PNG")
            record["heatmap"] = str(files["heatmap"])
        if files["raw"] is not None:
            with atomic_path(files["raw"]) as tmp:
                with open(tmp, "wb") as fh:
                    np.save(fh, prediction.anomaly_map.astype(np.float32))
            record["raw"] = str(files["raw"])
        thumbnail = gallery.thumbnail(prediction.image, prediction.anomaly_map) if gallery is not None else None
        yield prediction.index, (record, thumbnail)
