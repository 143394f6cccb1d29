"""Device and precision resolution shared by every command."""
from __future__ import annotations

import random

import numpy as np
import torch

from zsadcli.errors import BadInput

PRECISIONS = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


def _mps_available() -> bool:
    return bool(getattr(torch.backends, "mps", None)) and torch.backends.mps.is_available()


def resolve_device(spec: str) -> torch.device:
    """``auto`` picks cuda, then mps, then cpu; an explicit absent device is a usage error."""
    spec = (spec or "auto").strip().lower()
    if spec == "auto":
        if torch.cuda.is_available():
            return torch.device("cuda")
        if _mps_available():
            return torch.device("mps")
        return torch.device("cpu")
    if spec == "cpu":
        return torch.device("cpu")
    if spec == "mps":
        if not _mps_available():
            raise BadInput("--device mps was asked for but this machine has no MPS device.",
                           hint="use --device cpu, or --device auto to pick what is present")
        return torch.device("mps")
    if spec == "cuda" or spec.startswith("cuda:"):
        if not torch.cuda.is_available():
            raise BadInput(f"--device {spec} was asked for but torch sees no CUDA device.",
                           hint="use --device cpu, or install a CUDA build of torch (see `zsad doctor`)")
        index = int(spec.split(":", 1)[1]) if ":" in spec else 0
        if index >= torch.cuda.device_count():
            raise BadInput(f"--device {spec}: only {torch.cuda.device_count()} CUDA device(s) present.",
                           hint="choose an index below that, or --device auto")
        return torch.device("cuda", index)
    raise BadInput(f"--device {spec!r} is not a device zsad knows.",
                   hint="use auto, cpu, cuda, cuda:N or mps")


def resolve_precision(name: str, device: torch.device) -> torch.dtype:
    dtype = PRECISIONS.get((name or "fp32").lower())
    if dtype is None:
        raise BadInput(f"--precision {name!r} is not supported.", hint="use fp32, bf16 or fp16")
    if dtype is torch.float16 and device.type == "cpu":
        raise BadInput("--precision fp16 is not supported on the CPU.",
                       hint="use --precision bf16 for a fast CPU path, or fp32 for exact results")
    return dtype


def seed_everything(seed: int) -> None:
    """Seed every RNG the methods touch (the official recipes seed torch, numpy and random)."""
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)
    if torch.cuda.is_available():
        torch.cuda.manual_seed_all(seed)
