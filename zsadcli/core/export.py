"""`zsad export`: a whole method as one static graph, (B, 3, S, S) -> (image_score (B,),
anomaly_map (B, S, S)), for OpenVINO Runtime or ONNX Runtime.

The method's own ``forward`` is captured with ``torch.export`` (batch size dynamic) after one
warm-up pass, so everything that depends only on weights (static text features, resized
position grids, few-shot memories) enters the graph as constants and everything that depends
on the image (ViP²-CLIP's per-image prompts through the text tower, Crane+'s DINOv2 D-Attn,
BSR-CLIP's chain, the smoothing) is part of the graph. The graph is written as ONNX; the
OpenVINO IR is converted from it. A method declares what cannot be captured
(``Method.export_blockers``); nothing falls back to torch.
"""
from __future__ import annotations

import os
import shutil
import tempfile
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from zsadcli import __version__
from zsadcli.console import log
from zsadcli.core.graph import graph_capture
from zsadcli.core.methods import Method
from zsadcli.core.runtime import (CARD_SCHEMA, CARD_VERSION, FORMATS, MODEL_CARD, ModelCard, load_exported,
                                  require_extra, sha256_file)
from zsadcli.data.images import OPENAI_MEAN, OPENAI_STD
from zsadcli.errors import BadInput, ZsadError

EXPORT_PRECISIONS = ("fp32", "bf16")
# Faithfulness of an fp32 artefact on the check batch; above these the export is reported loudly.
MAP_TOLERANCE, SCORE_TOLERANCE = 1e-4, 1e-5
_EXAMPLE_BATCH = 2  # torch.export specialises sizes 0 and 1; 2 keeps the batch dimension symbolic


class ScoreAndMap(nn.Module):
    """The exported function: the method's forward, reduced to its two float32 outputs."""

    def __init__(self, method: Method) -> None:
        super().__init__()
        self.method = method

    def forward(self, images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        out = self.method(images)
        return out.image_score.float(), out.anomaly_map.float()


def _blockers(method: Method) -> list[str]:
    parts = list(method.export_blockers())
    cls = type(method)
    if cls.preprocess is not Method.preprocess:
        parts.append(f"{cls.name}'s preprocessing (it overrides Method.preprocess; an exported model needs it "
                     "as the classmethod preprocess_image)")
    if next(method.parameters()).dtype != torch.float32:
        parts.append("weights that are not float32 (export builds the method in fp32)")
    return parts


def capture(method: Method, size: int) -> torch.export.ExportedProgram:
    """torch.export of ``method`` at input size ``size`` with a dynamic batch dimension."""
    return capture_module(ScoreAndMap(method), size)


def capture_module(module: nn.Module, size: int) -> torch.export.ExportedProgram:
    """torch.export of any module over (B, 3, size, size) images, after one warm-up pass."""
    wrapper = module.eval()  # eval() first: it drops a method's caches
    example = torch.randn(_EXAMPLE_BATCH, 3, size, size, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        wrapper(example)  # fills the caches the graph takes as constants
        with graph_capture():
            return torch.export.export(wrapper, (example,), dynamic_shapes=({0: torch.export.Dim("batch", min=1)},),
                                       strict=False)


def write_onnx(program: torch.export.ExportedProgram, path: Path) -> None:
    """The captured graph as ONNX (weights in ``<name>.data`` beside it: ViT-L exceeds protobuf's 2 GB)."""
    import warnings

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.onnx.export(program, f=str(path), dynamo=True, input_names=["images"],
                          output_names=["image_score", "anomaly_map"], external_data=True, optimize=True,
                          verbose=False)


def write_openvino(onnx_path: Path, xml_path: Path) -> None:
    import openvino as ov

    ov.save_model(ov.convert_model(str(onnx_path)), str(xml_path), compress_to_fp16=False)


def _digest_path(path: Path) -> dict[str, Any]:
    if path.is_file():
        return {"path": str(path), "sha256": sha256_file(path)}
    files = sorted(p for p in path.rglob("*") if p.is_file())
    return {"path": str(path), "files": {str(p.relative_to(path)): sha256_file(p) for p in files}}


def source_digests(description: dict[str, Any], spec: Any) -> dict[str, Any]:
    """sha256 of every file the exported model was made from: backbone, checkpoint, and any
    hyperparameter that names a local file or folder (e.g. Crane+'s DINOv2, WinCLIP's references)
    or a weights.yaml entry."""
    from zsadcli.core import hub
    from zsadcli.core.methods import get_method

    registry = hub.load_registry()

    def registry_digest(key: str) -> dict[str, Any]:
        entry = registry[key]
        path = hub.cached_path(entry)
        return {"key": key, "source": entry.display_source, "path": str(path) if path else None,
                "sha256": sha256_file(path) if path else entry.sha256}

    sources: dict[str, Any] = {}
    backbone = spec.backbone_file or spec.backbone or get_method(spec.method).backbone_key
    if spec.backbone_file or Path(str(backbone)).expanduser().is_file():
        sources["backbone"] = _digest_path(Path(str(backbone)).expanduser())
    elif backbone in registry:
        sources["backbone"] = registry_digest(backbone)
    else:  # hf-hub:org/name: the cached download
        from zsadcli.core.backbone import _download_hub_id

        path = _download_hub_id(str(backbone)[len("hf-hub:"):])
        sources["backbone"] = {"source": str(backbone), **_digest_path(path)}
    if description.get("checkpoint"):
        sources["checkpoint"] = _digest_path(Path(description["checkpoint"]))
        if spec.train_on:
            sources["checkpoint"]["train_on"] = spec.train_on
    for key, value in sorted(description.get("hparams", {}).items()):
        if isinstance(value, str) and value and key != "image_size":
            if Path(value).expanduser().exists() and ("/" in value or os.sep in value or "." in value):
                sources[key] = _digest_path(Path(value).expanduser())
            elif value in registry:
                sources[key] = registry_digest(value)
    return sources


def _versions(fmt: str) -> dict[str, str]:
    import onnx
    import onnxscript

    out = {"torch": torch.__version__, "onnx": onnx.__version__, "onnxscript": onnxscript.__version__}
    if fmt == "openvino":
        import openvino

        out["openvino"] = openvino.__version__
    else:
        import onnxruntime

        out["onnxruntime"] = onnxruntime.__version__
    return out


def _check_target(out: Path, force: bool) -> None:
    if out.exists():
        if not force:
            raise BadInput(f"--out {out} already exists.", hint="pass --force to replace it, or choose another folder")
        if not out.is_dir() or (any(out.iterdir()) and not (out / MODEL_CARD).is_file()):
            raise BadInput(f"--out {out} exists and is not an exported zsad model; --force replaces only those.",
                           hint="choose another folder")


def _replace_folder(tmp: Path, out: Path) -> None:
    """Move the finished ``tmp`` folder to ``out``; an old ``out`` is removed only after."""
    old = None
    if out.exists():
        old = out.with_name(f".{out.name}.old-{os.getpid()}")
        os.replace(out, old)
    os.replace(tmp, out)
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)


def _faithfulness(method: Method, runner, size: int) -> dict[str, float]:
    """Max |artefact - torch| on a fresh batch of another size than the captured one."""
    images = torch.rand(3, 3, size, size, generator=torch.Generator().manual_seed(1)) * 4 - 2
    with torch.no_grad():
        ref = method(images)
    got = runner.run(images)
    return {"batch": 3,
            "max_abs_image_score": float((got.image_score - ref.image_score.float()).abs().max()),
            "max_abs_anomaly_map": float((got.anomaly_map - ref.anomaly_map.float()).abs().max())}


def export_method(method: Method, description: dict[str, Any], spec: Any, targets: dict[str, Path], *,
                  precision: str | None = None, force: bool = False) -> dict[str, ModelCard]:
    """Write one model folder per ``targets`` entry (format -> folder) from a single capture: the
    model file(s) and zsad-model.json, atomically (a temporary folder beside it, renamed when
    complete); an existing folder only with ``force``."""
    unknown = [f for f in targets if f not in FORMATS]
    if unknown or not targets:
        raise BadInput(f"--format {', '.join(unknown) or '(none)'}: choose openvino or onnx.")
    if precision is not None and precision not in EXPORT_PRECISIONS:
        raise BadInput(f"--precision {precision!r}: an exported model runs fp32 or bf16.")
    if "onnx" in targets and precision == "bf16":
        raise BadInput("--precision bf16: ONNX Runtime runs exported models in fp32 on the CPU.",
                       hint="use --format openvino for bf16, or --precision fp32")
    for fmt in targets:
        require_extra(fmt, *(("openvino", "onnx", "onnxscript") if fmt == "openvino" else
                             ("onnxruntime", "onnx", "onnxscript")))
    parts = _blockers(method)
    if parts:
        raise BadInput(f"{method.name} cannot be exported as one graph: {'; '.join(parts)}.",
                       hint="run it with torch (predict/eval without --model), or change the setting named")
    targets = {fmt: Path(out) for fmt, out in targets.items()}
    for out in targets.values():
        _check_target(out, force)
    size = method.input_size
    sources = source_digests(description, spec)
    log(f"capturing {method.name} at {size} px (batch size dynamic)")
    try:
        program = capture(method, size)
    except ZsadError:
        raise
    except Exception as exc:  # a method that does not capture is a bug to report, not bad input
        raise ZsadError(f"torch.export could not capture {method.name}: {type(exc).__name__}: {str(exc)[:400]}") from exc
    scratch = Path(tempfile.mkdtemp(prefix="zsad-export-"))
    try:
        onnx_path = scratch / FORMATS["onnx"][0]
        log("writing ONNX")
        write_onnx(program, onnx_path)
        return {fmt: _write_folder(method, fmt, out, onnx_path, sources=sources, precision=precision)
                for fmt, out in targets.items()}
    finally:
        shutil.rmtree(scratch, ignore_errors=True)


def _write_folder(method: Method, fmt: str, out: Path, onnx_path: Path, *, sources: dict[str, Any],
                  precision: str | None) -> ModelCard:
    size = method.input_size
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=out.parent, prefix=f".{out.name}.", suffix=".part"))
    umask = os.umask(0)
    os.umask(umask)
    tmp.chmod(0o777 & ~umask)  # a plain folder, not mkdtemp's private one
    try:
        if fmt == "openvino":
            log("converting to OpenVINO IR")
            write_openvino(onnx_path, tmp / FORMATS["openvino"][0])
        else:
            for name in FORMATS["onnx"]:
                shutil.copyfile(onnx_path.with_name(name), tmp / name)
        files = {name: sha256_file(tmp / name) for name in FORMATS[fmt] if (tmp / name).is_file()}
        cls = type(method)
        preprocess = cls.preprocess_image.__func__  # type: ignore[attr-defined]
        card = {
            "schema": CARD_SCHEMA, "version": CARD_VERSION, "zsad_version": __version__,
            "created": datetime.now(timezone.utc).isoformat(timespec="seconds"),
            "method": method.name, "description": cls.description, "format": fmt, "files": files,
            "inputs": {"images": {"shape": ["batch", 3, size, size], "dtype": "float32"}},
            "outputs": {"image_score": {"shape": ["batch"], "dtype": "float32"},
                        "anomaly_map": {"shape": ["batch", size, size], "dtype": "float32"}},
            "image_size": size,
            "normalisation": {"preprocess": f"{preprocess.__module__}.{preprocess.__qualname__}",
                              "mean": list(OPENAI_MEAN), "std": list(OPENAI_STD)},
            "hparams": method.hparams, "ablate": sorted(method.ablate),
            "class_name": method.class_name if cls.uses_class_name else None,
            "dataset_dependent": cls.set_dataset is not Method.set_dataset,
            "map_range": list(method.map_range),
            "precision": precision or ("auto" if fmt == "openvino" else "fp32"),
            "sources": sources, "exporter": _versions(fmt),
        }
        from zsadcli.core.runs import write_json

        write_json(tmp / MODEL_CARD, card)
        check = _faithfulness(method, load_exported(tmp, "fp32"), size)
        card["faithfulness_fp32"] = check
        write_json(tmp / MODEL_CARD, card)
        if not (np.isfinite(check["max_abs_anomaly_map"]) and np.isfinite(check["max_abs_image_score"])):
            raise ZsadError(f"the exported {method.name} does not reproduce torch (non-finite differences).")
        if check["max_abs_anomaly_map"] > MAP_TOLERANCE or check["max_abs_image_score"] > SCORE_TOLERANCE:
            log(f"[yellow]warning:[/] the exported {method.name} ({fmt}) differs from torch fp32 by "
                f"{check['max_abs_anomaly_map']:.2e} (map) / {check['max_abs_image_score']:.2e} (score) on the "
                f"check batch, above {MAP_TOLERANCE:g} / {SCORE_TOLERANCE:g}")
        _replace_folder(tmp, out)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)
    return ModelCard(out, card)
