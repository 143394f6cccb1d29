"""A plain, independent re-statement of ByChelsea/VAND-APRIL-GAN's test and training computation,
written from its semantics (LND layout, explicit attention with exact GELU, the position grid
resized bicubic with antialias as its resize_pos_embed, the 7x35 / 5x35 prompt ensemble, the
four linear heads on raw tokens, bilinear align_corners=True upsampling before the softmax, the
few-shot memory and its class-wise score fusion, Hsuxu focal + dice), no zsad code. fp32.
Inputs: an open_clip CLIP module (weights only are read) and images already preprocessed.
"""
from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F

NORMAL = ["{}", "flawless {}", "perfect {}", "unblemished {}", "{} without flaw", "{} without defect",
          "{} without damage"]
ABNORMAL = ["damaged {}", "broken {}", "{} with flaw", "{} with defect", "{} with damage"]
TEMPLATES = ["a bad photo of a {}.", "a low resolution photo of the {}.", "a bad photo of the {}.",
             "a cropped photo of the {}.", "a bright photo of a {}.", "a dark photo of the {}.", "a photo of my {}.",
             "a photo of the cool {}.", "a close-up photo of a {}.", "a black and white photo of the {}.",
             "a bright photo of the {}.", "a cropped photo of a {}.", "a jpeg corrupted photo of a {}.",
             "a blurry photo of the {}.", "a photo of the {}.", "a good photo of the {}.", "a photo of one {}.",
             "a close-up photo of the {}.", "a photo of a {}.", "a low resolution photo of a {}.",
             "a photo of a large {}.", "a blurry photo of a {}.", "a jpeg corrupted photo of the {}.",
             "a good photo of a {}.", "a photo of the small {}.", "a photo of the large {}.",
             "a black and white photo of a {}.", "a dark photo of a {}.", "a photo of a cool {}.",
             "a photo of a small {}.", "there is a {} in the scene.", "there is the {} in the scene.",
             "this is a {} in the scene.", "this is the {} in the scene.", "this is one {} in the scene."]
LAYERS = (6, 12, 18, 24)


def _ln(x, ln):
    return F.layer_norm(x, ln.normalized_shape, ln.weight, ln.bias, ln.eps)


def _block(x, block, mask=None):
    """One pre-LN residual block on (L, N, C): explicit multi-head attention, exact-GELU MLP."""
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
    h = F.gelu(F.linear(_ln(x, block.ln_2), block.mlp.c_fc.weight, block.mlp.c_fc.bias))
    return x + F.linear(h, block.mlp.c_proj.weight, block.mlp.c_proj.bias)


@torch.no_grad()
def encode_text(clip, texts):
    from open_clip.tokenizer import tokenize

    ids = tokenize(texts)
    x = (clip.token_embedding(ids) + clip.positional_embedding).permute(1, 0, 2)
    mask = torch.full((77, 77), float("-inf")).triu_(1)
    for block in clip.transformer.resblocks:
        x = _block(x, block, mask)
    x = _ln(x.permute(1, 0, 2), clip.ln_final)
    return x[torch.arange(len(texts)), ids.argmax(dim=-1)] @ clip.text_projection


_TEXT: dict = {}


def text_features(clip, class_name):
    """(E, 2) fp32 [normal, anomalous]: per side all 7x35 (5x35) normalised embeddings, one mean, normalised."""
    key = (id(clip), class_name)
    if key not in _TEXT:
        columns = []
        for states in (NORMAL, ABNORMAL):
            emb = encode_text(clip, [t.format(s.format(class_name)) for s in states for t in TEMPLATES])
            emb = emb / emb.norm(dim=-1, keepdim=True)
            mean = emb.mean(dim=0)
            columns.append(mean / mean.norm())
        _TEXT[key] = torch.stack(columns, dim=1)
    return _TEXT[key]


def resized_positions(visual, grid):
    pos = visual.positional_embedding
    native = int(round((pos.shape[0] - 1) ** 0.5))
    if native == grid:
        return pos
    img = pos[1:].reshape(1, native, native, -1).permute(0, 3, 1, 2)
    img = F.interpolate(img, size=(grid, grid), mode="bicubic", antialias=True, align_corners=False)
    return torch.cat([pos[:1], img.permute(0, 2, 3, 1).reshape(grid * grid, -1)])


@torch.no_grad()
def encode_image(clip, images, layers=LAYERS):
    """(normalised global feature (B, E), raw tokens after each layer [(B, 1 + N, C)])."""
    visual = clip.visual
    x = visual.conv1(images)
    grid = x.shape[-1]
    x = x.reshape(x.shape[0], x.shape[1], -1).permute(0, 2, 1)
    x = torch.cat([visual.class_embedding + torch.zeros(x.shape[0], 1, x.shape[-1]), x], dim=1)
    x = _ln(x + resized_positions(visual, grid), visual.ln_pre).permute(1, 0, 2)
    taps = []
    for index, block in enumerate(visual.transformer.resblocks, start=1):
        x = _block(x, block)
        if index in layers:
            taps.append(x.permute(1, 0, 2))
    g = _ln(x.permute(1, 0, 2)[:, 0], visual.ln_post) @ visual.proj
    return g / g.norm(dim=-1, keepdim=True), taps


def head_maps(taps, heads, text, size, active=(0, 1, 2, 3)):
    """Per active layer (B, 2, size, size) probabilities; ``text`` (B, E, 2)."""
    maps = []
    for i in active:
        f = F.linear(taps[i][:, 1:], heads[f"fc.{i}.weight"], heads[f"fc.{i}.bias"])
        f = f / f.norm(dim=-1, keepdim=True)
        logits = 100.0 * f @ text  # (B, L, 2)
        side = int(np.sqrt(logits.shape[1]))
        logits = logits.permute(0, 2, 1).reshape(-1, 2, side, side)
        logits = F.interpolate(logits, size=size, mode="bilinear", align_corners=True)
        maps.append(torch.softmax(logits, dim=1))
    return maps


@torch.no_grad()
def aprilgan_reference(clip, images, heads, class_name, memory=None, active=(0, 1, 2, 3)):
    """(zero-shot scores (B,), maps (B, S, S) numpy). ``memory``: per layer (M, C) reference tokens."""
    size = images.shape[-1]
    text = text_features(clip, class_name)
    g, taps = encode_image(clip, images)
    scores = (100.0 * g @ text).softmax(dim=-1)[:, 1]
    amap = np.sum([m[:, 1].numpy() for m in head_maps(taps, heads, text.expand(len(images), -1, -1), size, active)],
                  axis=0)
    if memory is not None:
        few = []
        for i in active:
            for b in range(len(images)):
                p = taps[i][b, 1:]
                cos = (memory[i] / memory[i].norm(dim=-1, keepdim=True)) @ (p / p.norm(dim=-1, keepdim=True)).T
                side = int(np.sqrt(cos.shape[1]))
                d = (1 - cos).min(dim=0).values.reshape(1, 1, side, side)
                few.append((b, F.interpolate(d, size=size, mode="bilinear", align_corners=True)[0, 0].numpy()))
        for b, d in few:
            amap[b] = amap[b] + d
    return scores, amap


@torch.no_grad()
def reference_memory(clip, reference_images):
    """Per layer (k x N, C): the raw patch tokens (CLS dropped) of each reference image, one at a time."""
    per_image = [encode_image(clip, image[None])[1] for image in reference_images]
    return [torch.cat([taps[i][0, 1:] for taps in per_image]) for i in range(len(LAYERS))]


def fused_few_shot_scores(scores, maps):
    """test.py's few-shot image score over one class: 0.5 (score + min-max of the map maxima)."""
    peaks = np.array([m.max() for m in maps])
    peaks = (peaks - peaks.min()) / (peaks.max() - peaks.min())
    return 0.5 * (np.asarray(scores) + peaks)


def _focal(probs, target, gamma=2.0, smooth=1e-5):
    c = probs.shape[1]
    flat = probs.permute(0, 2, 3, 1).reshape(-1, c)
    one_hot = torch.zeros(flat.shape[0], c).scatter_(1, target.reshape(-1, 1).long(), 1)
    one_hot = torch.clamp(one_hot, smooth / (c - 1), 1.0 - smooth)
    pt = (one_hot * flat).sum(1) + smooth
    return (-1 * torch.pow(1 - pt, gamma) * pt.log()).mean()


def _dice(pred, target):
    n = target.shape[0]
    p, t = pred.reshape(n, -1), target.reshape(n, -1)
    return 1 - ((2 * (p * t).sum(1) + 1) / (p.sum(1) + t.sum(1) + 1)).sum() / n


def training_loss(clip, images, masks, heads, class_names):
    """train.py's loss for one batch: sum over the layers of focal(2-class map) + dice(anomalous map)."""
    text = torch.stack([text_features(clip, c) for c in class_names])  # (B, E, 2)
    _, taps = encode_image(clip, images)
    loss = 0
    for probs in head_maps(taps, heads, text, images.shape[-1]):
        loss = loss + _focal(probs, masks) + _dice(probs[:, 1], masks)
    return loss
