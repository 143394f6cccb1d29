"""`zsad export`: a whole method as an OpenVINO or ONNX model folder (the fast CPU path)."""
from __future__ import annotations

from dataclasses import replace
from pathlib import Path
from typing import Annotated

import typer

from zsadcli.commands.common import JsonOpt, MethodOptions, PrecisionOpt, QuietOpt, merge_options, method_options
from zsadcli.console import emit_json, log


@method_options(exclude={"model"})
def export(
    ctx: typer.Context,
    method_options: MethodOptions,
    fmt: Annotated[str, typer.Option("--format", help="openvino (OpenVINO IR) or onnx (ONNX Runtime).")],
    out: Annotated[Path, typer.Option("--out", help="Folder to write: the model file(s) and zsad-model.json.")],
    precision: PrecisionOpt = None,
    force: Annotated[bool, typer.Option("--force", help="Replace an existing exported model folder.")] = False,
    json: JsonOpt = False,
    quiet: QuietOpt = False,
) -> None:
    """Export a method with its weights as one graph: preprocessed images (B, 3, S, S) -> image score
    (B,) and anomaly map (B, S, S), the values `predict --save-raw` writes. Run it with
    `zsad predict/eval --model DIR`. --precision records the precision the model runs at by default
    (fp32, or bf16 with OpenVINO; left out: OpenVINO picks the device's preference); the weights are
    stored in fp32 either way.

    Example: `zsad export --method anomalyclip --train-on visa --format openvino --out models/ac-visa`.
    """
    from zsadcli.core.engine import build_method
    from zsadcli.core.export import export_method

    opts = merge_options(ctx, precision=precision, json=json, quiet=quiet)
    chosen = opts.precision if opts.precision_given else None
    spec = method_options.spec(replace(opts, device="cpu", precision="fp32"))  # captured in fp32 on the CPU
    built = build_method(spec)
    card = export_method(built.method, built.description, spec, {fmt: out}, precision=chosen, force=force)[fmt]
    summary = {"model": str(out), "method": card.method, "format": card.format, "image_size": card.image_size,
               "precision": card.data["precision"], "files": card.files,
               "faithfulness_fp32": card.data.get("faithfulness_fp32")}
    if opts.json:
        emit_json(summary)
    else:
        check = summary["faithfulness_fp32"] or {}
        log(f"wrote {out}: {', '.join(card.files)} + zsad-model.json ({card.method}, {card.image_size} px, "
            f"runs {summary['precision']}); max |Δ| vs torch fp32: map {check.get('max_abs_anomaly_map', float('nan')):.1e}, "
            f"score {check.get('max_abs_image_score', float('nan')):.1e}")
