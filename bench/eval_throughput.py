"""End-to-end eval throughput (decode + forward + gather + metrics), in images/s, for data-loading
workers and for 1 vs N processes under torchrun.

Everything is made up locally, so anyone can rerun it: a synthetic dataset (zsadcli.data.synthetic)
and AnomalyCLIP over a randomly initialised backbone of the real shape (default ViT-L/14@336 at
518 px) with randomly initialised prompts. Timing starts after the model is built (start-up and
weight loading are not eval throughput) and ends when rank 0 has the metrics.

    python bench/eval_throughput.py                               # CPU: workers 0/2, 1 vs 2 processes
    python bench/eval_throughput.py --device cuda --procs 1,8 --workers 0,8   # a GPU machine
    python bench/eval_throughput.py --arch tiny --images 16       # a quick smoke run

Each configuration runs in a fresh process (``torchrun --standalone`` when procs > 1) with
``OMP_NUM_THREADS`` = CPU cores / procs (or ``--threads``), so 1 and N processes use the same cores.
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
ARCHS = {"vit-l-14-336": ("ViT-L-14-336-quickgelu", 518), "vit-b-16": ("ViT-B-16-quickgelu", 224)}


def prepare(arch: str, size: int | None, images: int, workdir: Path) -> dict:
    """Backbone file, prompt checkpoint and dataset in ``workdir``; returns what the runs need."""
    import torch
    from safetensors.torch import save_file

    from zsadcli.core.backbone import backbone_from_state_dict
    from zsadcli.core.checkpoints import save_checkpoint
    from zsadcli.core.methods import get_method
    from zsadcli.data.meta import write_meta
    from zsadcli.data.synthetic import generate_synthetic

    torch.manual_seed(0)
    if arch == "tiny":
        sys.path.insert(0, str(REPO / "tests"))
        from tinyclip import tiny_state_dict

        state, default_size = tiny_state_dict(), 112
    else:
        import open_clip

        name, default_size = ARCHS[arch]
        state = {k: v.float().contiguous() for k, v in open_clip.create_model(name, pretrained=None).state_dict().items()}
    size = size or default_size
    backbone_file = workdir / "backbone.safetensors"
    save_file(state, str(backbone_file))
    method = get_method("anomalyclip")(backbone_from_state_dict(state, quick_gelu=True, source="random"),
                                       {"image_size": size})
    checkpoint = save_checkpoint(workdir / "prompts.safetensors", method.checkpoint_state(), method="anomalyclip",
                                 backbone="random", trained_on="none", hparams=method.hparams)
    # two classes (one below 8 images); per class: goods + 3 defect kinds
    classes = ("disc", "checker") if images >= 8 else ("disc",)
    per_defect = max(1, images // (4 * len(classes)))
    good = max(1, images // len(classes) - 3 * per_defect)
    write_meta(workdir / "data" / "synthetic", generate_synthetic(
        workdir / "data" / "synthetic", seed=0, size=min(size, 256), classes=classes, n_train=0,
        n_test_good=good, n_per_defect=per_defect))
    return {"backbone": str(backbone_file), "checkpoint": str(checkpoint), "size": size,
            "data": str(workdir / "data"), "images": len(classes) * (good + 3 * per_defect)}


def job(args: argparse.Namespace) -> None:
    """One timed eval in this process (a rank under torchrun, or alone)."""
    import torch

    from zsadcli.core import distributed
    from zsadcli.core.engine import MethodSpec, build_method
    from zsadcli.core.evaluation import evaluate_dataset
    from zsadcli.core.devices import resolve_device
    from zsadcli.data.meta import load_meta

    spec = MethodSpec("anomalyclip", backbone_file=args.backbone, checkpoint=args.checkpoint,
                      image_size=args.size, device=resolve_device(args.device))
    method = build_method(spec).method
    meta = load_meta(Path(args.data) / "synthetic")
    distributed.barrier()
    if spec.device.type == "cuda":
        torch.cuda.synchronize()
    start = time.perf_counter()
    result = evaluate_dataset(method, "synthetic", Path(args.data) / "synthetic", meta, batch_size=args.batch_size,
                              workers=args.job_workers)
    distributed.barrier()
    seconds = time.perf_counter() - start
    if distributed.is_writer():
        images = sum(r["n_images"] for r in result.per_class.values())
        print(json.dumps({"images": images, "seconds": seconds, "images_per_s": images / seconds}))


def run(config: dict, args: argparse.Namespace, procs: int, workers: int) -> dict:
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    threads = args.threads or max(1, cores // procs)
    env = {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": str(threads)}
    job_args = [str(Path(__file__).resolve()), "--job", "--backbone", config["backbone"], "--checkpoint",
                config["checkpoint"], "--size", str(config["size"]), "--data", config["data"], "--device",
                args.device, "--batch-size", str(args.batch_size), "--job-workers", str(workers)]
    launcher = [sys.executable] if procs == 1 else [sys.executable, "-m", "torch.distributed.run", "--standalone",
                                                     "--nproc-per-node", str(procs)]
    done = subprocess.run([*launcher, *job_args], env=env, capture_output=True, text=True)
    if done.returncode:
        raise SystemExit(f"procs {procs} workers {workers} failed:\n{done.stderr[-3000:]}")
    return json.loads(done.stdout.strip().splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--arch", default="vit-l-14-336", choices=[*ARCHS, "tiny"])
    parser.add_argument("--size", type=int, default=None, help="input size (default: 518 for ViT-L)")
    parser.add_argument("--images", type=int, default=32, help="test images in all (two classes)")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--batch-size", type=int, default=1)
    parser.add_argument("--workers", default="0,2", help="data-loading workers to compare (per process)")
    parser.add_argument("--procs", default="1,2", help="process counts to compare (torchrun when > 1)")
    parser.add_argument("--threads", type=int, default=0,
                        help="torch threads per process (default: CPU cores / procs)")
    parser.add_argument("--job", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--job-workers", type=int, default=0, help=argparse.SUPPRESS)
    parser.add_argument("--backbone", help=argparse.SUPPRESS)
    parser.add_argument("--checkpoint", help=argparse.SUPPRESS)
    parser.add_argument("--data", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.job:
        job(args)
        return
    sys.path.insert(0, str(REPO))
    with tempfile.TemporaryDirectory(prefix="zsad-bench-") as tmp:
        config = prepare(args.arch, args.size, args.images, Path(tmp))
        print(f"eval throughput: anomalyclip, random {args.arch} at {config['size']} px, {config['images']} images, "
              f"batch {args.batch_size}, {args.device}, threads/process {args.threads or 'cores / procs'}")
        print(f"{'procs':>5} {'workers':>7} {'images/s':>9} {'seconds':>8}")
        for procs in (int(p) for p in args.procs.split(",")):
            for workers in (int(w) for w in args.workers.split(",")):
                figures = run(config, args, procs, workers)
                print(f"{procs:>5} {workers:>7} {figures['images_per_s']:>9.2f} {figures['seconds']:>8.1f}",
                      flush=True)


if __name__ == "__main__":
    main()
