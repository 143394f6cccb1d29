"""A tiny, seeded CLIP ViT that tests build instead of downloading real weights.

Vision: 24 blocks (so methods can tap block 24 exactly as with ViT-L/14), width 128 (2 heads),
patch 14, native 224 px. Text: 12 blocks, width 64, context 77, the real CLIP vocabulary size
(so the real tokenizer works). Everything is fast on 2 CPU cores at 56-112 px.
"""
from __future__ import annotations

import hashlib
import os
from pathlib import Path

import torch

TINY_REPO = "zsad-test/tiny-clip"
TINY_FILE = "tiny_clip.safetensors"
TINY_REVISION = "0123456789abcdef0123456789abcdef01234567"


def build_seeded_clip(seed: int = 0, *, embed_dim: int, vision_layers: int, vision_width: int, patch_size: int,
                      image_size: int, text_width: int, text_layers: int, quick_gelu: bool):
    """A frozen open_clip CLIP with seeded random weights (heads = width // 64, as CLIP's)."""
    from open_clip.model import CLIP, CLIPTextCfg, CLIPVisionCfg

    torch.manual_seed(seed)
    model = CLIP(embed_dim, CLIPVisionCfg(layers=vision_layers, width=vision_width, patch_size=patch_size,
                                          image_size=image_size),
                 CLIPTextCfg(context_length=77, vocab_size=49408, width=text_width, heads=max(1, text_width // 64),
                             layers=text_layers),
                 quick_gelu=quick_gelu)
    # open_clip leaves norms and biases at constant values; randomise everything so that no
    # test passes by symmetry.
    with torch.no_grad():
        for name, tensor in model.named_parameters():
            if name.endswith("logit_scale"):
                continue
            if tensor.ndim == 1 and ("ln" in name or "norm" in name):
                tensor.copy_(1.0 + 0.1 * torch.randn_like(tensor) if name.endswith("weight")
                             else 0.1 * torch.randn_like(tensor))
            elif tensor.ndim == 1:
                tensor.copy_(0.02 * torch.randn_like(tensor))
    return model.eval().requires_grad_(False)


def build_tiny_open_clip(seed: int = 0, quick_gelu: bool = True):
    return build_seeded_clip(seed, embed_dim=32, vision_layers=24, vision_width=128, patch_size=14, image_size=224,
                             text_width=64, text_layers=12, quick_gelu=quick_gelu)


def tiny_state_dict(seed: int = 0) -> dict[str, torch.Tensor]:
    return {k: v.clone().contiguous() for k, v in build_tiny_open_clip(seed).state_dict().items()}


def random_fc_heads(width: int, embed: int, seed: int, layers: int = 4) -> dict[str, torch.Tensor]:
    """Trained-looking linear heads ``fc.{i}.weight`` (embed, width) / ``fc.{i}.bias`` (embed), the
    layout April-GAN's and CLIP-AD's released heads share (each wraps it under its own key)."""
    gen = torch.Generator().manual_seed(seed)
    state = {}
    for i in range(layers):
        state[f"fc.{i}.weight"] = torch.randn(embed, width, generator=gen) / width ** 0.5
        state[f"fc.{i}.bias"] = 0.02 * torch.randn(embed, generator=gen)
    return state


def sha256_of(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def install_in_hf_cache(hub_cache: Path, repo_id: str, filename: str, revision: str, payload: Path) -> Path:
    """Place ``payload`` exactly where huggingface_hub puts a downloaded LFS file."""
    repo_dir = hub_cache / f"models--{repo_id.replace('/', '--')}"
    digest = sha256_of(payload)
    blob = repo_dir / "blobs" / digest
    blob.parent.mkdir(parents=True, exist_ok=True)
    blob.write_bytes(payload.read_bytes())
    link = repo_dir / "snapshots" / revision / filename
    link.parent.mkdir(parents=True, exist_ok=True)
    if link.exists() or link.is_symlink():
        link.unlink()
    link.symlink_to(os.path.relpath(blob, link.parent))
    (repo_dir / "refs").mkdir(exist_ok=True)
    (repo_dir / "refs" / "main").write_text(revision)
    return link
