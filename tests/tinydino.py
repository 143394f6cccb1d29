"""A tiny, seeded DINOv2-with-registers state dict in the facebookresearch key layout (the keys of
``dinov2_vitb14_reg4_pretrain.pth``: cls_token, pos_embed with the CLS position, register_tokens,
mask_token, patch_embed.proj, blocks.N.{norm1, attn.qkv, attn.proj, ls1.gamma, norm2, mlp.fc1,
mlp.fc2, ls2.gamma}, norm), small enough for tests (width 64, 2 blocks, 1 head, patch 14)."""
from __future__ import annotations

import torch


def tiny_dinov2_state_dict(seed: int = 0, width: int = 64, depth: int = 2, grid: int = 16, patch: int = 14,
                           registers: int = 4, mlp_ratio: int = 4) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)

    def randn(*shape, std=1.0, mean=0.0):
        return mean + std * torch.randn(*shape, generator=g)

    hidden = width * mlp_ratio
    state = {
        "cls_token": randn(1, 1, width, std=0.5),
        "pos_embed": randn(1, 1 + grid * grid, width, std=0.5),
        "register_tokens": randn(1, registers, width, std=0.5),
        "mask_token": randn(1, width, std=0.02),
        "patch_embed.proj.weight": randn(width, 3, patch, patch, std=0.05),
        "patch_embed.proj.bias": randn(width, std=0.1),
        "norm.weight": randn(width, std=0.1, mean=1.0),
        "norm.bias": randn(width, std=0.1),
    }
    for i in range(depth):
        p = f"blocks.{i}."
        state.update({
            p + "norm1.weight": randn(width, std=0.1, mean=1.0), p + "norm1.bias": randn(width, std=0.1),
            p + "attn.qkv.weight": randn(3 * width, width, std=width ** -0.5), p + "attn.qkv.bias": randn(3 * width, std=0.1),
            p + "attn.proj.weight": randn(width, width, std=width ** -0.5), p + "attn.proj.bias": randn(width, std=0.1),
            p + "ls1.gamma": randn(width, std=0.1, mean=0.5),
            p + "norm2.weight": randn(width, std=0.1, mean=1.0), p + "norm2.bias": randn(width, std=0.1),
            p + "mlp.fc1.weight": randn(hidden, width, std=width ** -0.5), p + "mlp.fc1.bias": randn(hidden, std=0.1),
            p + "mlp.fc2.weight": randn(width, hidden, std=hidden ** -0.5), p + "mlp.fc2.bias": randn(width, std=0.1),
            p + "ls2.gamma": randn(width, std=0.1, mean=0.5),
        })
    return state
