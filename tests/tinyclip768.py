"""A tiny seeded CLIP shaped for ViP²-CLIP's official code, which fixes the text width and
the embedding size at 768: vision 24 blocks x width 64 (1 head, so blocks 6/12/18/24 exist),
patch 14, native 224 px; text 2 blocks x width 768 (12 heads), embed 768, the real vocabulary.

The token embedding (49408 x 768) dominates the size; its values are fp16-representable and
the file stores it as fp16, so the float32 state dict below is exactly what any loader reads.
"""
from __future__ import annotations

from pathlib import Path

import torch

from tinyclip import build_seeded_clip


def build_tiny768_open_clip(seed: int = 0, quick_gelu: bool = True):
    model = build_seeded_clip(seed, embed_dim=768, vision_layers=24, vision_width=64, patch_size=14, image_size=224,
                              text_width=768, text_layers=2, quick_gelu=quick_gelu)
    with torch.no_grad():  # fp16-representable, so the fp16 file below stores it exactly
        model.token_embedding.weight.copy_(model.token_embedding.weight.half().float())
    return model


def tiny768_state_dict(seed: int = 0) -> dict[str, torch.Tensor]:
    return {k: v.clone().contiguous() for k, v in build_tiny768_open_clip(seed).state_dict().items()}


def save_tiny768(path: Path, seed: int = 0) -> dict[str, torch.Tensor]:
    """Write the model as safetensors (token embedding in fp16); returns the fp32 state dict."""
    from safetensors.torch import save_file

    state = tiny768_state_dict(seed)
    stored = dict(state, **{"token_embedding.weight": state["token_embedding.weight"].half()})
    save_file(stored, str(path))
    return state
