"""A tiny, seeded open_clip GELU CLIP shaped like ViT-B-16-plus-240 (WinCLIP, CLIP-AD).

Vision: 12 blocks (CLIP-AD taps layers 3/6/9/12), width 128 (2 heads), patch 16, native 240 px
(a 15x15 grid, as the real model). Text: 4 blocks, width 64, the real vocabulary (the real
tokenizer works). Saved as a plain open_clip state dict for ``--backbone-file``.
"""
from __future__ import annotations

from pathlib import Path

import torch

from tinyclip import build_seeded_clip


def build_tiny_b16plus(seed: int = 0, *, vision_width: int = 128, embed_dim: int = 32):
    return build_seeded_clip(seed, embed_dim=embed_dim, vision_layers=12, vision_width=vision_width, patch_size=16,
                             image_size=240, text_width=64, text_layers=4, quick_gelu=False)


def tiny_b16plus_state_dict(seed: int = 0) -> dict[str, torch.Tensor]:
    return {k: v.clone().contiguous() for k, v in build_tiny_b16plus(seed).state_dict().items()}


def save_tiny_b16plus(path: Path, seed: int = 0) -> Path:
    """A plain open_clip state dict (torch.save), as a user's ``--backbone-file``."""
    torch.save(tiny_b16plus_state_dict(seed), path)
    return path
