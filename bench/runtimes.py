"""Runtimes: a method in torch (fp32, bf16), ONNX Runtime (fp32) and OpenVINO (f32, default), each
next to the bare image tower in the same runtime, and each runtime's drift from torch fp32.

Random weights with the real shapes (ViT-L/14@336 at 518 px; random DINOv2 ViT-B/14-reg4 for
Crane+), nothing downloaded: `python bench/runtimes.py` runs every ViT-L method at batch 1 and 8.
Reduced runs: `--methods anomalyclip --batch-sizes 1 --repeats 1`; `--arch tiny` for a smoke run.
`--synthetic` adds the drift of image and pixel AUROC on the synthetic set (|Δ| must stay <= 0.01).

Columns: images/s of the method, of the bare backbone (`encode_image`, exported the same way),
the cost method/bare, and the max |Δ| of map and image score against torch fp32 on the timed batch.
"""
from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parent))
from infer import build_backbone, random_dino_file, timed  # noqa: E402

VIT_L_METHODS = ("anomalyclip", "crane", "crane+", "vip2clip", "bsrclip")
RUNTIMES = ("torch-fp32", "torch-bf16", "ort-fp32", "ov-f32", "ov-default")


class BareTower(nn.Module):
    """The backbone's plain image tower (CLS embedding), the baseline every runtime is compared to."""

    def __init__(self, backbone) -> None:
        super().__init__()
        self.backbone = backbone

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return self.backbone.encode_image(images)


def export_bare(backbone, size: int, folder: Path) -> Path:
    from zsadcli.core.export import capture_module, write_onnx, write_openvino

    program = capture_module(BareTower(backbone), size)
    folder.mkdir(parents=True, exist_ok=True)
    write_onnx(program, folder / "model.onnx")
    write_openvino(folder / "model.onnx", folder / "model.xml")
    return folder


def bare_runners(folder: Path) -> dict[str, callable]:
    import onnxruntime as ort
    import openvino as ov

    session = ort.InferenceSession(str(folder / "model.onnx"), providers=["CPUExecutionProvider"])
    core = ov.Core()
    model = core.read_model(str(folder / "model.xml"))
    f32 = core.compile_model(model, "CPU", {"INFERENCE_PRECISION_HINT": "f32"}).create_infer_request()
    default = core.compile_model(model, "CPU").create_infer_request()
    name = session.get_inputs()[0].name
    return {"ort-fp32": lambda x: session.run(None, {name: x}),
            "ov-f32": lambda x: f32.infer({0: x}), "ov-default": lambda x: default.infer({0: x})}


def synthetic_drift(runners: dict, size: int) -> dict[str, tuple[float, float]]:
    """(|Δ image AUROC|, |Δ pixel AUROC|) of each runner against torch fp32 on the synthetic set."""
    from zsadcli.core.evaluation import evaluate_dataset
    from zsadcli.data.meta import write_meta
    from zsadcli.data.synthetic import generate_synthetic

    root = Path(tempfile.mkdtemp(prefix="zsad-synthetic-"))
    meta = generate_synthetic(root, seed=0, size=max(64, size // 2))
    write_meta(root, meta)
    means = {}
    for name, runner in runners.items():
        result = evaluate_dataset(runner, "synthetic", root, meta, batch_size=4)
        means[name] = (result.mean["image"]["auroc"]["mean"], result.mean["pixel"]["auroc"]["mean"])
    base = means["torch-fp32"]
    return {name: (abs(m[0] - base[0]), abs(m[1] - base[1])) for name, m in means.items()}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--methods", default=",".join(VIT_L_METHODS))
    parser.add_argument("--arch", default="vit-l-14-336", choices=["vit-l-14-336", "tiny"])
    parser.add_argument("--image-size", type=int, default=None, help="default: 518 (tiny: 112)")
    parser.add_argument("--batch-sizes", default="1,8")
    parser.add_argument("--runtimes", default=",".join(RUNTIMES))
    parser.add_argument("--repeats", type=int, default=3, help="timed runs after one warm-up; the best counts")
    parser.add_argument("--no-bare", action="store_true", help="skip the bare-backbone baseline")
    parser.add_argument("--synthetic", action="store_true", help="also the AUROC drift on the synthetic set")
    parser.add_argument("--workdir", default=None, help="where exported models go (default: a temporary folder)")
    args = parser.parse_args()

    import warnings

    warnings.filterwarnings("ignore")
    from zsadcli.console import set_quiet
    from zsadcli.core.export import export_method
    from zsadcli.core.methods import get_method
    from zsadcli.core.runtime import TorchRunner, load_exported

    set_quiet(True)
    runtimes = args.runtimes.split(",")
    batches = [int(b) for b in args.batch_sizes.split(",")]
    work = Path(args.workdir or tempfile.mkdtemp(prefix="zsad-runtimes-"))
    backbone, default_size = build_backbone(args.arch, True)
    size = args.image_size or default_size
    import openvino as ov

    print(f"backbone {backbone.source}, {size}x{size} px, torch {torch.__version__} ({torch.get_num_threads()} threads), "
          f"openvino {ov.__version__} (CPU default precision "
          f"{ov.Core().get_property('CPU', 'INFERENCE_PRECISION_HINT').get_type_name()}), {args.repeats} timed run(s)")
    bare = None
    if not args.no_bare:
        start = time.perf_counter()
        bare = bare_runners(export_bare(backbone, size, work / "bare"))
        print(f"bare backbone exported in {time.perf_counter() - start:.0f} s")
    header = f"{'method':<12}{'runtime':<12}{'batch':>6}{'img/s':>9}{'bare img/s':>12}{'cost':>7}{'max|Δmap|':>11}{'max|Δscore|':>13}"
    for name in args.methods.split(","):
        cls = get_method(name)
        hparams = {"image_size": size}
        if "dino_file" in cls.defaults:
            hparams["dino_file"] = random_dino_file(args.arch == "tiny")
        torch.manual_seed(0)
        method = cls(backbone.float(), hparams).eval()
        start = time.perf_counter()
        targets = {"onnx": work / f"{name}-onnx", "openvino": work / f"{name}-openvino"}
        export_method(method, {"checkpoint": None, "hparams": method.hparams},
                      argparse.Namespace(method=name, backbone=None, backbone_file=None, train_on=None),
                      targets, precision=None, force=True) if _needs_export(runtimes) else None
        print(f"\n{name}: exported in {time.perf_counter() - start:.0f} s\n{header}")
        runners = {}
        if "ort-fp32" in runtimes:
            runners["ort-fp32"] = load_exported(targets["onnx"], "fp32")
        if "ov-f32" in runtimes:
            runners["ov-f32"] = load_exported(targets["openvino"], "fp32")
        if "ov-default" in runtimes:
            runners["ov-default"] = load_exported(targets["openvino"], None)
        for batch in batches:
            images = torch.randn(batch, 3, size, size, generator=torch.Generator().manual_seed(batch))
            with torch.no_grad():
                reference = method(images)
            rows = []
            for runtime in runtimes:
                if runtime.startswith("torch"):
                    dtype = torch.bfloat16 if runtime == "torch-bf16" else torch.float32
                    method.to(dtype=dtype)
                    method.invalidate_caches()
                    with torch.no_grad():
                        full = timed(lambda: method(images), args.repeats)
                        base = timed(lambda: backbone.encode_image(images), args.repeats) if bare else None
                        out = method(images)
                else:
                    runner = runners[runtime]
                    full = timed(lambda: runner.run(images), args.repeats)
                    base = timed(lambda: bare[runtime](images.numpy()), args.repeats) if bare else None
                    out = runner.run(images)
                dmap = float((out.anomaly_map.float() - reference.anomaly_map).abs().max())
                dscore = float((out.image_score.float() - reference.image_score).abs().max())
                cost = f"{full / base:>6.2f}x" if base else f"{'-':>7}"
                bare_rate = f"{batch / base:>12.3f}" if base else f"{'-':>12}"
                rows.append(f"{name:<12}{runtime:<12}{batch:>6}{batch / full:>9.3f}{bare_rate}{cost}{dmap:>11.2e}{dscore:>13.2e}")
                print(rows[-1], flush=True)
            if any(r.startswith("torch-bf16") for r in runtimes):
                # the bf16 cast is lossy: rebuild the fp32 method for the next batch size / method
                backbone, _ = build_backbone(args.arch, True)
                torch.manual_seed(0)
                method = cls(backbone, hparams).eval()
        if args.synthetic:
            drift_runners = {"torch-fp32": TorchRunner(method), **runners}
            for runtime, (d_img, d_px) in synthetic_drift(drift_runners, size).items():
                if runtime != "torch-fp32":
                    print(f"{name:<12}{runtime:<12} synthetic set: |Δ image AUROC| {d_img:.4f}, "
                          f"|Δ pixel AUROC| {d_px:.4f}  ({'ok' if max(d_img, d_px) <= 0.01 else 'ABOVE 0.01'})")


def _needs_export(runtimes: list[str]) -> bool:
    return any(not r.startswith("torch") for r in runtimes)


if __name__ == "__main__":
    main()
