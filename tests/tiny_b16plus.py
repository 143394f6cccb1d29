"""A tiny, seeded open_clip GELU CLIP shaped like ViT-B-16-plus-240 (WinCLIP, CLIP-AD).

Vision: 12 blocks (CLIP-AD taps layers 3/6/9/12), width 128 (2 heads), patch 16, native 240 px
(a 15x15 grid, as the real model). Text: 4 blocks, width 64, the real vocabulary (the real
tokenizer works). Saved as a plain open_clip state dict for ``--backbone-file``.
"""
from __future__ import annotations

from pathlib import Path

import torch


def build_tiny_b16plus(seed: int = 0, *, vision_width: int = 128, embed_dim: int = 32):
    from open_clip.model import CLIP, CLIPTextCfg, CLIPVisionCfg

    torch.manual_seed(seed)
    model = CLIP(embed_dim, CLIPVisionCfg(layers=12, width=vision_width, patch_size=16, image_size=240),
                 CLIPTextCfg(context_length=77, vocab_size=49408, width=64, heads=1, layers=4),
                 quick_gelu=False)
    with torch.no_grad():  # randomise the constant-initialised tensors too (no symmetry)
        for name, tensor in model.named_parameters():
            if name.endswith("logit_scale"):
                continue
            if tensor.ndim == 1 and ("ln" in name or "norm" in name):
                tensor.copy_(1.0 + 0.1 * torch.randn_like(tensor) if name.endswith("weight")
                             else 0.1 * torch.randn_like(tensor))
            elif tensor.ndim == 1:
                tensor.copy_(0.02 * torch.randn_like(tensor))
    return model.eval().requires_grad_(False)


def tiny_b16plus_state_dict(seed: int = 0) -> dict[str, torch.Tensor]:
    return {k: v.clone().contiguous() for k, v in build_tiny_b16plus(seed).state_dict().items()}


def save_tiny_b16plus(path: Path, seed: int = 0) -> Path:
    """A plain open_clip state dict (torch.save), as a user's ``--backbone-file``."""
    torch.save(tiny_b16plus_state_dict(seed), path)
    return path
