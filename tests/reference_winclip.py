"""A plain, independent re-statement of anomalib's WinCLIP (zero- and few-shot), written from its
semantics with obvious loops (windows listed one by one, then stacked window-major through the
tower as anomalib does, LND layout, explicit attention, per-patch harmonic means), no zsad code. Inputs: an open_clip CLIP module
(weights only are read) and images already preprocessed.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

NORMAL = ["{}", "flawless {}", "perfect {}", "unblemished {}", "{} without flaw", "{} without defect",
          "{} without damage"]
ANOMALOUS = ["damaged {}", "{} with flaw", "{} with defect", "{} with damage"]
TEMPLATES = ["a cropped photo of the {}.", "a close-up photo of a {}.", "a close-up photo of the {}.",
             "a bright photo of a {}.", "a bright photo of the {}.", "a dark photo of the {}.",
             "a dark photo of a {}.", "a jpeg corrupted photo of the {}.", "a jpeg corrupted photo of the {}.",
             "a blurry photo of the {}.", "a blurry photo of a {}.", "a photo of a {}.", "a photo of the {}.",
             "a photo of a small {}.", "a photo of the small {}.", "a photo of a large {}.",
             "a photo of the large {}.", "a photo of the {} for visual inspection.",
             "a photo of a {} for visual inspection.", "a photo of the {} for anomaly detection.",
             "a photo of a {} for anomaly detection."]


def _ln(x, ln):
    return F.layer_norm(x, ln.normalized_shape, ln.weight, ln.bias, ln.eps)


def _block(x, block, mask=None):
    """One pre-LN block on (L, N, C) with nn.GELU (exact erf)."""
    length, batch, width = x.shape
    heads = block.attn.num_heads
    d = width // heads
    h = _ln(x, block.ln_1).transpose(0, 1)
    q, k, v = F.linear(h, block.attn.in_proj_weight, block.attn.in_proj_bias).reshape(
        batch, length, 3, heads, d).permute(2, 0, 3, 1, 4)
    logits = (q @ k.transpose(-2, -1)) * d ** -0.5
    if mask is not None:
        logits = logits + mask
    out = (logits.softmax(-1) @ v).transpose(1, 2).reshape(batch, length, width)
    x = x + F.linear(out, block.attn.out_proj.weight, block.attn.out_proj.bias).transpose(0, 1)
    hidden = F.gelu(F.linear(_ln(x, block.ln_2), block.mlp.c_fc.weight, block.mlp.c_fc.bias))
    return x + F.linear(hidden, block.mlp.c_proj.weight, block.mlp.c_proj.bias)


def encode_text(clip, texts):
    from open_clip.tokenizer import tokenize

    ids = tokenize(texts)
    x = (clip.token_embedding(ids) + clip.positional_embedding).permute(1, 0, 2)
    mask = torch.full((77, 77), float("-inf")).triu_(1)
    for block in clip.transformer.resblocks:
        x = _block(x, block, mask)
    x = _ln(x.permute(1, 0, 2), clip.ln_final)
    return x[torch.arange(len(texts)), ids.argmax(dim=-1)] @ clip.text_projection


def text_embeddings(clip, class_name):
    out = []
    for states in (NORMAL, ANOMALOUS):
        prompts = [t.format(s.format(class_name)) for s in states for t in TEMPLATES]
        out.append(encode_text(clip, prompts).mean(dim=0))  # unnormalised mean
    return torch.stack(out)


def tower(clip, tokens):
    """(N, L, C) pre-ln_pre -> ln_post-ed (N, L, C), one LND pass."""
    x = _ln(tokens, clip.visual.ln_pre).permute(1, 0, 2)
    for block in clip.visual.transformer.resblocks:
        x = _block(x, block)
    return _ln(x.permute(1, 0, 2), clip.visual.ln_post)


def encode_image(clip, images, scales=(2, 3)):
    visual = clip.visual
    x = visual.conv1(images).reshape(images.shape[0], visual.conv1.out_channels, -1).permute(0, 2, 1)
    x = torch.cat([visual.class_embedding + torch.zeros(x.shape[0], 1, x.shape[-1]), x], dim=1)
    feature_map = x + visual.positional_embedding
    grid = int((feature_map.shape[1] - 1) ** 0.5)
    full = tower(clip, feature_map)
    image = full[:, 0] @ visual.proj
    patches = full[:, 1:]
    windows = {}
    for k in scales:
        sequences = []
        for top in range(grid - k + 1):
            for left in range(grid - k + 1):
                idx = [0] + [1 + (top + i) * grid + left + j for i in range(k) for j in range(k)]
                sequences.append(feature_map[:, idx])  # CLS + one window, every image
        n = len(sequences)
        cls = tower(clip, torch.cat(sequences))[:, 0] @ visual.proj  # window-major: (n * B, E)
        windows[k] = cls.reshape(n, images.shape[0], -1).transpose(0, 1)  # (B, n_windows, E)
    return image, patches, windows, grid


def _cos(a, b):
    return F.normalize(a, dim=-1) @ F.normalize(b, dim=-1).T


def _harmonic(scores, grid, k):
    """(B, n_windows) -> (B, grid, grid) by visiting every patch and its covering windows."""
    out = torch.zeros(scores.shape[0], grid, grid)
    n = grid - k + 1
    for r in range(grid):
        for c in range(grid):
            covering = [top * n + left for top in range(max(0, r - k + 1), min(r, n - 1) + 1)
                        for left in range(max(0, c - k + 1), min(c, n - 1) + 1)]
            out[:, r, c] = len(covering) / (1 / scores[:, covering]).sum(dim=1)
    return out.nan_to_num(posinf=0.0)


@torch.no_grad()
def winclip_reference(clip, images, class_name="object", reference_images=None, temperature=0.07, scales=(2, 3)):
    """(image scores (B,), maps (B, S, S))."""
    text = text_embeddings(clip, class_name)
    image, patches, windows, grid = encode_image(clip, images, scales)
    score = (_cos(image, text) / temperature).softmax(-1)[:, 1]
    maps = [score[:, None, None].expand(-1, grid, grid)]
    for k in scales:
        maps.append(_harmonic((_cos(windows[k], text) / temperature).softmax(-1)[..., 1], grid, k))
    zero = len(maps) / sum(1 / m for m in maps)
    if reference_images is not None:
        _, ref_patches, ref_windows, _ = encode_image(clip, reference_images, scales)
        few = [((1 - _cos(patches, ref_patches.reshape(-1, ref_patches.shape[-1]))).min(-1).values / 2)
               .reshape(-1, grid, grid)]
        for k in scales:
            assoc = (1 - _cos(windows[k], ref_windows[k].reshape(-1, ref_windows[k].shape[-1]))).min(-1).values / 2
            few.append(_harmonic(assoc, grid, k))
        few = sum(few) / len(few)
        zero = (zero + few) / 2
        score = (score + few.amax(dim=(-2, -1))) / 2
    maps = F.interpolate(zero[:, None], size=images.shape[-2:], mode="bilinear", align_corners=False)[:, 0]
    return score, maps
