"""What `zsad eval --report` costs: the same eval of a synthetic set with and without --report
(through the real command), and `zsad report` on the run folder alone.

Random weights with a real architecture's shapes (nothing is downloaded): a backbone file and
a zsad checkpoint of the method's freshly initialised prompts are written to a temporary folder.
`python bench/report.py --arch tiny` is a quick run (the tests' tiny CLIP, 112 px);
`python bench/report.py` uses ViT-L/14@336 at 518 px (slow on a CPU; use --device cuda).
Needs the `report` extra (jinja2, matplotlib). Prints wall and CPU seconds per step (best of
--repeats) and the share of the eval spent on the report's own steps (collecting curves and
thumbnails, writing them, rendering the page), timed inside the same run.
"""
from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

sys.path[:0] = [str(Path(__file__).resolve().parent.parent), str(Path(__file__).resolve().parent)]  # this checkout

from infer import ARCH_OF_BACKBONE, build_backbone  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--method", default="anomalyclip")
    parser.add_argument("--arch", default=None, help="vit-l-14-336, vit-b-16-plus-240 or tiny (default: the method's)")
    parser.add_argument("--image-size", type=int, default=None)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--precision", default="fp32")
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--data-size", type=int, default=256, help="synthetic image side in pixels")
    parser.add_argument("--n-test-good", type=int, default=10)
    parser.add_argument("--n-per-defect", type=int, default=5)
    parser.add_argument("--repeats", type=int, default=2)
    args = parser.parse_args()

    import torch
    from safetensors.torch import save_file
    from typer.testing import CliRunner

    from zsadcli.cli import app
    from zsadcli.core.checkpoints import save_checkpoint
    from zsadcli.core.methods import get_method
    from zsadcli.data.meta import write_meta
    from zsadcli.data.synthetic import generate_synthetic

    work = Path(tempfile.mkdtemp(prefix="zsad-bench-report-"))
    cls = get_method(args.method)
    arch = args.arch or ARCH_OF_BACKBONE[cls.backbone_key]
    backbone, default_size = build_backbone(arch, cls.quick_gelu)
    size = args.image_size or default_size
    backbone_file = work / "backbone.safetensors"
    save_file({k: v.contiguous() for k, v in backbone.clip.state_dict().items()}, str(backbone_file))
    method = cls(backbone, {"image_size": size})
    checkpoint = None
    if cls.recipe is not None:
        checkpoint = save_checkpoint(work / "prompts.safetensors", method.checkpoint_state(), method=cls.name,
                                     backbone=str(backbone_file), trained_on="random", hparams={})
    del method, backbone
    meta = generate_synthetic(work / "data" / "synthetic", seed=0, size=args.data_size, n_train=0,
                              n_test_good=args.n_test_good, n_per_defect=args.n_per_defect)
    write_meta(work / "data" / "synthetic", meta)
    n_images = sum(len(items) for items in meta["test"].values())

    runner = CliRunner()
    common = ["eval", "--test-on", "synthetic", "--data-root", str(work / "data"), "--method", cls.name,
              "--backbone-file", str(backbone_file), "--image-size", str(size), "--device", args.device,
              "--precision", args.precision, "--batch-size", str(args.batch_size), "--runs", str(work / "runs"),
              "--quiet", "--force"]
    if checkpoint:
        common += ["--checkpoint", str(checkpoint)]

    from zsadcli.core import report as report_module
    from zsadcli.core.report_data import ReportCollector

    # CPU seconds (all threads) next to wall seconds: on a shared machine the CPU time of a step is
    # the steadier measure; the report's own steps are timed inside the same eval run.
    spent = {"report steps": [0.0, 0.0]}

    def timed_step(fn):
        def wrapper(*a, **kw):
            wall, cpu = time.perf_counter(), time.process_time()
            try:
                return fn(*a, **kw)
            finally:
                spent["report steps"][0] += time.perf_counter() - wall
                spent["report steps"][1] += time.process_time() - cpu
        return wrapper

    ReportCollector.add_class = timed_step(ReportCollector.add_class)
    ReportCollector.write = timed_step(ReportCollector.write)
    report_module.write_eval_report = timed_step(report_module.write_eval_report)

    def run(arguments: list[str]) -> tuple[float, float]:
        wall, cpu = time.perf_counter(), time.process_time()
        result = runner.invoke(app, arguments)
        if result.exit_code != 0:
            raise SystemExit(result.output)
        return time.perf_counter() - wall, time.process_time() - cpu

    run([*common, "--name", "warmup"])  # loads the backbone once (eval shares it per process), warms kernels
    rows: dict[str, list[tuple[float, float]]] = {"eval": [], "eval --report": [], "  of which report steps": [],
                                                  "report (render only)": []}
    for _ in range(args.repeats):
        rows["eval"].append(run([*common, "--name", "plain"]))
        spent["report steps"] = [0.0, 0.0]
        rows["eval --report"].append(run([*common, "--name", "report", "--report"]))
        rows["  of which report steps"].append(tuple(spent["report steps"]))
        rows["report (render only)"].append(run(["report", str(work / "runs" / "eval" / "report"), "--out",
                                                 str(work / "r.html"), "--force", "--quiet"]))
    page = work / "runs" / "eval" / "report" / "report.html"
    thumbs = work / "runs" / "eval" / "report" / "thumbs"
    print(f"method {cls.name}, {arch} at {size} px, {args.device} {args.precision}, batch {args.batch_size}, "
          f"synthetic set: 3 classes, {n_images} test images of {args.data_size} px, torch {torch.__version__}, "
          f"threads {torch.get_num_threads()}; best of {args.repeats}")
    print(f"{'':<26}{'wall s':>9}{'CPU s':>9}")
    best = {}
    for name, values in rows.items():
        best[name] = min(values, key=lambda v: v[1])
        print(f"{name:<26}{best[name][0]:9.2f}{best[name][1]:9.2f}")
    steps, evaluated = best["  of which report steps"], best["eval --report"]
    print(f"report steps / eval --report: {100 * steps[1] / evaluated[1]:.1f}% of CPU time, "
          f"{100 * steps[0] / evaluated[0]:.1f}% of wall time")
    print(f"report.html {page.stat().st_size / 1e6:.2f} MB, thumbs/ {sum(p.stat().st_size for p in thumbs.iterdir()) / 1e6:.2f}"
          f" MB in {len(list(thumbs.iterdir()))} files, report_data.json "
          f"{(page.parent / 'report_data.json').stat().st_size / 1e3:.0f} kB")

if __name__ == "__main__":
    main()
