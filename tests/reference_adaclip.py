"""A plain, independent re-statement of caoyunkang/AdaCLIP's test-time computation and training
loss, written from its semantics (tensor by tensor, LND layout, one image at a time as test.py
runs, no zsad code) to check ours.

Inputs: a CLIP state dict in OpenAI/open_clip key names (float32), the authors' checkpoint (flat,
``clip_model.``-prefixed) and preprocessed images. Exact GELU; bicubic position grid without
antialias; prompts rounded through fp16 on insertion; KMeans seeded with RandomState(seed) per
image (what one official test.py process per image computes after its setup_seed(111)).
"""
from __future__ import annotations

import math

import numpy as np
import torch
import torch.nn.functional as F
from scipy.ndimage import gaussian_filter
from sklearn.cluster import KMeans

P = "clip_model."
NORMAL = ["{}", "flawless {}", "perfect {}", "unblemished {}", "{} without flaw", "{} without defect",
          "{} without damage"]
ABNORMAL = ["damaged {}", "broken {}", "{} with flaw", "{} with defect", "{} with damage"]
TEMPLATES = ["a bad photo of a {}.", "a low resolution photo of the {}.", "a bad photo of the {}.",
             "a cropped photo of the {}."]


def _ln(x, sd, prefix):
    return F.layer_norm(x, x.shape[-1:], sd[f"{prefix}.weight"], sd[f"{prefix}.bias"], 1e-5)


def _block(x, sd, prefix, mask=None):
    """One residual attention block, x (L, N, C), heads = C // 64, exact GELU."""
    length, batch, width = x.shape
    heads = max(1, width // 64)
    d = width // heads
    h = _ln(x, sd, f"{prefix}.ln_1")
    qkv = F.linear(h, sd[f"{prefix}.attn.in_proj_weight"], sd[f"{prefix}.attn.in_proj_bias"])
    q, k, v = qkv.reshape(length, batch, 3, heads, d).permute(2, 1, 3, 0, 4)
    logits = q @ k.transpose(-2, -1) / math.sqrt(d)
    if mask is not None:
        logits = logits + mask
    out = (logits.softmax(-1) @ v).permute(2, 0, 1, 3).reshape(length, batch, width)
    x = x + F.linear(out, sd[f"{prefix}.attn.out_proj.weight"], sd[f"{prefix}.attn.out_proj.bias"])
    h = F.gelu(F.linear(_ln(x, sd, f"{prefix}.ln_2"), sd[f"{prefix}.mlp.c_fc.weight"], sd[f"{prefix}.mlp.c_fc.bias"]))
    return x + F.linear(h, sd[f"{prefix}.mlp.c_proj.weight"], sd[f"{prefix}.mlp.c_proj.bias"])


def _count(sd, prefix):
    return len({k[len(prefix):].split(".")[0] for k in sd if k.startswith(prefix)})


def _heads(ck, name, x):
    n = len({k for k in ck if k.startswith(f"{P}{name}.head.") and k.endswith(".weight")})
    return [F.linear(x, ck[f"{P}{name}.head.{i}.weight"], ck[f"{P}{name}.head.{i}.bias"]) for i in range(n)]


def _static(ck, tower):
    n = len({k for k in ck if k.startswith(f"{P}{tower}_prompter.static_prompts.")})
    return [ck[f"{P}{tower}_prompter.static_prompts.{i}"] for i in range(n)]


def encode_image(sd, image, out_layers, prompts=None):
    """image (1, 3, S, S) -> (pooled = ln_post(CLS) @ proj, [raw tokens of out_layers, prompts stripped])."""
    w = sd["visual.conv1.weight"]
    x = F.conv2d(image, w, stride=w.shape[-1]).reshape(1, w.shape[0], -1).permute(0, 2, 1)
    x = torch.cat([sd["visual.class_embedding"] + torch.zeros(1, 1, x.shape[-1]), x], dim=1)
    pos = sd["visual.positional_embedding"]
    side, new_side = int((pos.shape[0] - 1) ** 0.5), int((x.shape[1] - 1) ** 0.5)
    if side != new_side:
        grid = pos[1:].reshape(1, side, side, -1).permute(0, 3, 1, 2)
        grid = F.interpolate(grid, size=(new_side, new_side), mode="bicubic", align_corners=False)
        pos = torch.cat([pos[:1], grid.permute(0, 2, 3, 1).reshape(new_side * new_side, -1)], 0)
    x = _ln(x + pos, sd, "visual.ln_pre").permute(1, 0, 2)
    n = prompts[0].shape[0] if prompts else 0
    tapped = []
    for i in range(_count(sd, "visual.transformer.resblocks.")):
        if prompts and i < len(prompts):
            ctx = prompts[i].half().unsqueeze(1)
            x = torch.cat([x if i == 0 else x[:x.shape[0] - n], ctx], dim=0)
        x = _block(x, sd, f"visual.transformer.resblocks.{i}")
        if i + 1 in out_layers:
            tapped.append(x[:x.shape[0] - n].permute(1, 0, 2))
    return _ln(x[0], sd, "visual.ln_post") @ sd["visual.proj"], tapped


def encode_text(sd, token_ids, prompts=None):
    """token_ids (N, 77); prompts[i] (n, W) overwrite positions 1..n before block i (i >= 1)."""
    x = (sd["token_embedding.weight"][token_ids] + sd["positional_embedding"]).permute(1, 0, 2)
    length = x.shape[0]
    mask = torch.full((length, length), float("-inf")).triu_(1)
    for i in range(_count(sd, "transformer.resblocks.")):
        if prompts and 1 <= i < len(prompts):
            ctx = prompts[i].half().unsqueeze(1).expand(-1, x.shape[1], -1)
            x = torch.cat([x[:1], ctx, x[1 + ctx.shape[0]:]], dim=0)
        x = _block(x, sd, f"transformer.resblocks.{i}", mask)
    x = _ln(x.permute(1, 0, 2), sd, "ln_final")
    return x[torch.arange(x.shape[0]), token_ids.argmax(dim=-1)] @ sd["text_projection"]


def text_features(sd, class_name, prompts):
    from open_clip.tokenizer import tokenize

    name = class_name.replace("-", " ")
    states = []
    for group in (NORMAL, ABNORMAL):
        ids = tokenize([t.format(s.format(name)) for s in group for t in TEMPLATES])
        e = encode_text(sd, ids, prompts)
        e = e / e.norm(dim=-1, keepdim=True)
        e = e.mean(0)
        states.append(e / e.norm())
    return torch.stack(states, dim=1)  # (E, 2)


def hsf(patches, logits, k_clusters=20, seed=111):
    """patches: per layer (N, E) normalised; logits: per layer (N, 2)."""
    p = torch.stack(logits).mean(0).softmax(-1)[:, 1]
    top = torch.topk(p, k=min(p.shape[0], 5 * k_clusters)).indices
    selected = [t[top] for t in patches]
    rows = torch.cat(selected, dim=1).detach().numpy()
    clusters = min(k_clusters, rows.shape[0])
    labels = KMeans(n_clusters=clusters, n_init="auto", random_state=np.random.RandomState(seed)).fit_predict(rows)
    centres = [torch.cat([s[labels == c] for s in selected]).mean(0) for c in range(clusters)]
    g = torch.stack(centres).mean(0)
    return g / g.norm(), labels


def forward_one(sd, ck, image, class_name, layers, use_hsf=True, seed=111):
    """One image: (per-layer logits at the patch grid, image probs (2,), hsf labels)."""
    with torch.no_grad():
        plain, _ = encode_image(sd, image[None], layers)
    dyn_v = torch.stack(_heads(ck, "dynamic_visual_prompt_generator", plain[0]))  # (n, C)
    dyn_t = torch.stack(_heads(ck, "dynamic_text_prompt_generator", plain[0]))
    v_prompts = [dyn_v + s for s in _static(ck, "visual")]
    t_prompts = [dyn_t + s for s in _static(ck, "text")]
    pooled, tapped = encode_image(sd, image[None], layers, v_prompts)
    text = text_features(sd, class_name, t_prompts)
    patches = []
    for i, tokens in enumerate(tapped):
        p = _heads(ck, "patch_token_layer", tokens[0, 1:])[i]
        patches.append(p / p.norm(dim=-1, keepdim=True))
    g = _heads(ck, "cls_token_layer", pooled[0])[0]
    g = g / g.norm()
    logits = [100.0 * p @ text for p in patches]
    labels = None
    if use_hsf:
        fused, labels = hsf(patches, logits, seed=seed)
        g = 0.2 * fused + 0.8 * g
        g = g / g.norm()
    return logits, (100.0 * g @ text).softmax(-1), labels


def _upsample(logit, size):
    side = int(logit.shape[0] ** 0.5)
    return F.interpolate(logit.T.reshape(1, 2, side, side), size=size, mode="bilinear", align_corners=True)


@torch.no_grad()
def adaclip_reference(sd, ck, images, class_name="object", layers=(6, 12, 18, 24), sigma=4, use_hsf=True):
    """(image scores (B,), smoothed maps (B, S, S) numpy, hsf labels per image)."""
    size = images.shape[-1]
    scores, maps, all_labels = [], [], []
    for image in images:
        logits, probs, labels = forward_one(sd, ck, image, class_name, layers, use_hsf)
        m = torch.stack([_upsample(l, size) for l in logits]).mean(0).softmax(dim=1)
        amap = ((m[:, 1] + 1 - m[:, 0]) / 2)[0].numpy()
        maps.append(gaussian_filter(amap, sigma=sigma) if sigma else amap)
        scores.append(float(probs[1]))
        all_labels.append(labels)
    return torch.tensor(scores), np.stack(maps), all_labels


def _focal(probs, target, gamma=2.0, smooth=1e-5):
    c = probs.shape[1]
    logit = probs.reshape(probs.shape[0], c, -1).permute(0, 2, 1).reshape(-1, c) if probs.dim() > 2 else probs
    idx = target.reshape(-1, 1).long()
    one_hot = torch.zeros(idx.shape[0], c).scatter_(1, idx, 1).clamp(smooth / (c - 1), 1.0 - smooth)
    pt = (one_hot * logit).sum(1) + smooth
    return (-1 * torch.pow(1 - pt, gamma) * pt.log()).mean()


def _dice(pred, target):
    n = target.shape[0]
    p, t = pred.reshape(n, -1), target.reshape(n, -1)
    return 1 - ((2 * (p * t).sum(1) + 1) / (p.sum(1) + t.sum(1) + 1)).sum() / n


def adaclip_train_loss_reference(sd, ck, image, gt, label, class_name="object", layers=(6, 12, 18, 24)):
    """train_one_batch at batch 1: gt squeezed to (S, S), so the Dice terms run over rows."""
    size = image.shape[-1]
    logits, probs, _ = forward_one(sd, ck, image, class_name, layers)
    gt = gt.float().squeeze()
    loss = _focal(probs[None], torch.tensor([float(label)]))
    for l in logits:
        m = _upsample(l, size).softmax(dim=1)
        loss = loss + _focal(m, gt) + _dice(m[:, 1], gt) + _dice(m[:, 0], 1 - gt)
    return loss
