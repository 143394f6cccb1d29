"""Inference throughput: a method next to a bare `encode_image` of the same backbone.

Random weights with the real architecture's shapes (nothing is downloaded), so anyone can run
it: `python bench/infer.py` (ViT-L/14@336 at 518 px, batch 1 and 8, fp32 and bf16, on the CPU
and on CUDA when present). `--arch tiny` runs a small model for a quick smoke run.
Prints images/s and the method's cost relative to the bare backbone forward.
"""
from __future__ import annotations

import argparse
import time
from pathlib import Path

import torch

ARCHS = {
    # open_clip config, default image size
    "vit-l-14-336": ("ViT-L-14-336-quickgelu", 518),
    "vit-b-16-plus-240": ("ViT-B-16-plus-240", 240),
}
ARCH_OF_BACKBONE = {"openai-vit-l-14-336": "vit-l-14-336", "laion-vit-b-16-plus-240": "vit-b-16-plus-240"}


def build_backbone(arch: str, quick_gelu: bool):
    from zsadcli.core.backbone import backbone_from_state_dict

    if arch == "tiny":
        import sys
        from pathlib import Path

        sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tests"))
        from tinyclip import tiny_state_dict

        return backbone_from_state_dict(tiny_state_dict(), quick_gelu=quick_gelu, source="tiny"), 112
    import open_clip

    name, size = ARCHS[arch]
    torch.manual_seed(0)
    model = open_clip.create_model(name, pretrained=None)
    state = {k: v.float() for k, v in model.state_dict().items()}
    del model
    return backbone_from_state_dict(state, quick_gelu=quick_gelu, source=f"random {name}"), size


def random_dino_file(tiny: bool) -> str:
    """Crane+'s DINOv2: random weights of the real ViT-B/14-reg4 shape (timm layout), or the tests'
    tiny one, in a temporary file (its D-Attn reads them through --dino-file)."""
    import tempfile

    from safetensors.torch import save_file

    if tiny:
        import sys

        sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tests"))
        from tinydino import tiny_dinov2_state_dict

        state = tiny_dinov2_state_dict()
    else:
        import timm

        torch.manual_seed(0)
        state = timm.create_model("vit_base_patch14_reg4_dinov2", pretrained=False, num_classes=0).state_dict()
    path = Path(tempfile.mkdtemp(prefix="zsad-bench-")) / "dino.safetensors"
    save_file({k: v.contiguous() for k, v in state.items()}, str(path))
    return str(path)


def timed(fn, repeats: int) -> float:
    fn()  # warm-up (allocations, kernels, cached text features)
    best = float("inf")
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - start)
    return best


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--method", default="anomalyclip")
    parser.add_argument("--arch", default=None, choices=[*ARCHS, "tiny"],
                        help="default: the architecture of the method's registered backbone")
    parser.add_argument("--image-size", type=int, default=None)
    parser.add_argument("--batch-sizes", default="1,8")
    parser.add_argument("--precisions", default="fp32,bf16")
    parser.add_argument("--devices", default="cpu,cuda")
    parser.add_argument("--repeats", type=int, default=1)
    parser.add_argument("--hparam", action="append", default=[], metavar="KEY=VALUE",
                        help="method hyperparameter override (repeatable; VALUE parsed as YAML)")
    args = parser.parse_args()

    from zsadcli.core.devices import PRECISIONS
    from zsadcli.core.methods import get_method

    cls = get_method(args.method)
    backbone, default_size = build_backbone(args.arch or ARCH_OF_BACKBONE[cls.backbone_key], cls.quick_gelu)
    size = args.image_size or default_size
    import yaml

    hparams = {"image_size": size}
    if "dino_file" in cls.defaults:  # Crane+ needs DINOv2 weights too
        hparams["dino_file"] = random_dino_file(args.arch == "tiny")
    hparams.update({k: yaml.safe_load(v) for k, _, v in (item.partition("=") for item in args.hparam)})
    method = cls(backbone, hparams).eval()
    devices = [d for d in args.devices.split(",") if d == "cpu" or (d == "cuda" and torch.cuda.is_available())]
    print(f"method {args.method}{' ' + ' '.join(args.hparam) if args.hparam else ''}, backbone {backbone.source}, "
          f"{size}x{size} px, torch {torch.__version__}, "
          f"threads {torch.get_num_threads()}")
    print(f"{'device':<7}{'precision':<10}{'batch':>6}{'bare img/s':>12}{'method img/s':>14}{'cost vs bare':>14}")
    for device in devices:
        for precision in args.precisions.split(","):
            dtype = PRECISIONS[precision]
            method.to(device=device, dtype=dtype)
            method.invalidate_caches()
            for batch in (int(b) for b in args.batch_sizes.split(",")):
                images = torch.randn(batch, 3, size, size, device=device)

                def sync():
                    if device == "cuda":
                        torch.cuda.synchronize()

                with torch.no_grad():
                    bare = timed(lambda: (backbone.encode_image(images), sync()), args.repeats)
                    full = timed(lambda: (method(images), sync()), args.repeats)
                print(f"{device:<7}{precision:<10}{batch:>6}{batch / bare:>12.3f}{batch / full:>14.3f}"
                      f"{full / bare:>13.2f}x", flush=True)


if __name__ == "__main__":
    main()
