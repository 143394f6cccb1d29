"""BSR-CLIP's inference and training loss re-stated plainly from the official code's semantics
(IJCAI-LO/ICMR-BSR: clip/model.py ``detect_forward_seg`` / ``detect_forward``, util/utils.py's
evaluation post-processing, main's losses), on an open_clip model's tensors. Independent of zsad:
sequence-first attention through ``F.multi_head_attention_forward`` (with ``need_weights`` where the
official code asks for attention maps), ``unfold`` neighbour aggregation, an einsum Adaptor, a
full 2-D SRR convolution, scipy smoothing, and the official in-place ground-truth rewrite in the
patch-alignment loss (through ``copy.copy``)."""
from __future__ import annotations

import copy
import math

import numpy as np
import torch
import torch.nn.functional as F
from open_clip.tokenizer import tokenize
from scipy.ndimage import gaussian_filter

FEATURE_LAYERS = (6, 12, 18, 24)
ATTN_LAYERS = (6, 7, 8, 9)


def _mha(block, x, attn_mask=None, need_weights=False):
    """The block's attention on a sequence-first (L, B, C) input, as nn.MultiheadAttention computes it."""
    attn = block.attn
    return F.multi_head_attention_forward(
        x, x, x, x.shape[-1], attn.num_heads, attn.in_proj_weight, attn.in_proj_bias, None, None, False, 0.0,
        attn.out_proj.weight, attn.out_proj.bias, training=False, need_weights=need_weights, attn_mask=attn_mask,
        average_attn_weights=False)


def _block(block, x, attn_mask=None, need_weights=False):
    out, weights = _mha(block, block.ln_1(x), attn_mask, need_weights)
    x = x + out
    return x + block.mlp(block.ln_2(x)), weights


def encode_image(clip, images, feature_layers=FEATURE_LAYERS, attn_layers=()):
    v = clip.visual
    x = v.conv1(images)
    x = x.reshape(x.shape[0], x.shape[1], -1).permute(0, 2, 1)
    x = torch.cat([v.class_embedding + torch.zeros(x.shape[0], 1, x.shape[-1]), x], dim=1)
    pos = v.positional_embedding
    side, new_side = int((pos.shape[0] - 1) ** 0.5), int((x.shape[1] - 1) ** 0.5)
    if side != new_side:
        patch = pos[1:].reshape(side, side, -1).permute(2, 0, 1)[None]
        patch = F.interpolate(patch, size=(new_side, new_side), mode="bilinear", align_corners=False)
        pos = torch.cat([pos[:1], patch[0].permute(1, 2, 0).reshape(new_side * new_side, -1)])
    x = v.ln_pre(x + pos).permute(1, 0, 2)
    outs, attns = [], []
    for i, block in enumerate(v.transformer.resblocks, start=1):
        x, weights = _block(block, x, need_weights=i in attn_layers)
        if i in feature_layers:
            outs.append(x.permute(1, 0, 2))
        if i in attn_layers:
            attns.append(weights)  # (B, heads, L, L)
    return outs, attns


def encode_state_prompt(clip, prefix):
    ids = tokenize(["without defect.", "with defect."])
    x = clip.token_embedding(ids)
    x = torch.cat([prefix.repeat(x.shape[0], 1, 1), x], dim=1)[:, :77, :]
    x = (x + clip.positional_embedding).permute(1, 0, 2)
    mask = torch.empty(77, 77).fill_(float("-inf")).triu_(1)
    for block in clip.transformer.resblocks:
        x, _ = _block(block, x, attn_mask=mask)
    x = clip.ln_final(x.permute(1, 0, 2))
    idx = prefix.shape[1] + ids.argmax(dim=-1)
    return x[torch.arange(x.shape[0]), idx] @ clip.text_projection


def gaussian_kernel(size, sigma):
    x = torch.arange(size, dtype=torch.float32) - (size - 1) / 2
    x, y = torch.meshgrid(x, x, indexing="ij")
    k = torch.exp(-(x ** 2 + y ** 2) / (2 * sigma ** 2))
    return k / k.sum()


def aggregate_neighbor(x, patchsize):
    if patchsize == 1:
        return x
    cls, x = x[:, :1], x[:, 1:]
    b, l, c = x.shape
    h = int(math.sqrt(l))
    x = x.reshape(b, h, h, c).permute(0, 3, 1, 2)
    x = F.unfold(x, kernel_size=patchsize, padding=patchsize // 2, stride=1)
    x = x.permute(0, 2, 1).reshape(-1, c, patchsize * patchsize).permute(0, 2, 1)
    kernel = gaussian_kernel(patchsize, 4).reshape(1, patchsize * patchsize, 1)
    return torch.cat([cls, torch.sum(x * kernel, dim=1).reshape(b, l, c)], dim=1)


def adaptor(state, x, heads=8):
    x = F.layer_norm(x, x.shape[-1:], state["attention.norm.weight"], state["attention.norm.bias"])
    q, k, v = (x @ state[f"attention.attn.to_{n}.weight"].T for n in "qkv")
    b, n, inner = q.shape
    q, k, v = (t.reshape(b, n, heads, inner // heads).permute(0, 2, 1, 3).reshape(b * heads, n, -1) for t in (q, k, v))
    sim = torch.einsum("bid,bjd->bij", q, k) * (inner // heads) ** -0.5
    out = torch.einsum("bij,bjd->bid", sim.softmax(dim=-1), v)
    out = out.reshape(b, heads, n, -1).permute(0, 2, 1, 3).reshape(b, n, inner)
    return out @ state["attention.attn.to_out.0.weight"].T + state["attention.attn.to_out.0.bias"]


def detect_forward_seg(clip, checkpoint, images, attn_layers=ATTN_LAYERS):
    """(cls probability (B,), patch map (B, 1, h, w), logits (B, 1+N, 2), token sets, attention maps)."""
    text = F.normalize(encode_state_prompt(clip, checkpoint["prompt"]["state_prompt_embedding"]), dim=-1)
    base, attns = encode_image(clip, images, attn_layers=attn_layers)
    tokens = [aggregate_neighbor(t, r) for t in base for r in (1, 3, 5)]
    tokens = [clip.visual.ln_post(adaptor(checkpoint["adaptor"], t)) @ clip.visual.proj for t in tokens]
    scores = 0
    for t in tokens:
        scores = scores + F.normalize(t, dim=-1) @ text.T / 0.07
    logits = scores / len(tokens)
    prob = logits.softmax(dim=-1)
    b, n = prob.shape[0], prob.shape[1] - 1
    h = int(math.sqrt(n))
    return prob[:, 0, 1], prob[:, 1:, 1].reshape(b, 1, h, h), logits, tokens, attns


def detect_forward(clip, checkpoint, images, *, calib=True, rcs=True, srr=True):
    cls, pmap, logits, _, attns = detect_forward_seg(clip, checkpoint, images, ATTN_LAYERS if rcs else ())
    base_map = pmap
    if calib:
        la = logits[:, 1:, 1]
        p = base_map[:, 0].reshape(base_map.shape[0], -1)
        compact = (p.max(dim=1, keepdim=True)[0] / (p.mean(dim=1, keepdim=True) + 1e-6)).clamp(1.0, 50.0)
        beta = (0.52 * (1.2 - 0.3 * ((compact - 3.0) / 7.0).clamp(0.0, 1.0))).clamp(0.45, 0.70)
        bg = p <= torch.quantile(p, q=0.75, dim=1, keepdim=True)
        bases = []
        for i in range(la.shape[0]):
            vals = la[i][bg[i]]
            bases.append(la[i].mean() if vals.numel() < 16 else torch.quantile(vals, q=0.95))
        base = torch.stack(bases).view(-1, 1).clamp(min=0.0)
        cal = torch.stack([logits[..., 0], torch.cat([logits[:, :1, 1], la - beta * base], dim=1)], dim=-1)
        prob = cal.softmax(dim=-1)
        cls = prob[:, 0, 1]
        base_map = prob[:, 1:, 1].reshape(pmap.shape)
    full = base_map
    if rcs and attns:
        b, _, h, w = base_map.shape
        corr = sum(a.mean(dim=1)[:, 1:, 1:] for a in attns) / len(attns)
        vals, idx = torch.topk(corr, k=min(128, corr.shape[-1]), dim=-1)
        corr = torch.zeros_like(corr).scatter_(-1, idx, vals) + torch.eye(corr.shape[-1])[None]
        corr = corr.clamp(min=0.0) ** 1.2
        corr = corr / (corr.sum(dim=-1, keepdim=True) + 1e-6)
        spread = torch.bmm(corr, base_map.reshape(b, -1, 1)).reshape(b, 1, h, w)
        full = base_map + 1.5 * (spread - base_map)
    if srr:
        x = full.clamp(0.0, 1.0)
        b = x.shape[0]
        thr = torch.quantile(x[:, 0].reshape(b, -1), q=0.98, dim=1, keepdim=True).view(b, 1, 1, 1)
        gate = torch.sigmoid((x - thr) / (0.08 + 1e-12))
        coords = torch.arange(-9, 10, dtype=x.dtype)
        g1 = torch.exp(-(coords ** 2) / (2 * 9.0 + 1e-12))
        g1 = g1 / (g1.sum() + 1e-12)
        blur = F.conv2d(F.pad(x, (9, 9, 9, 9), mode="reflect"), (g1[:, None] * g1[None, :])[None, None])
        full = gate * blur + (1.0 - gate) * x
    return cls, full


def bsrclip_reference(clip, checkpoint, images, *, calib=True, rcs=True, srr=True):
    """(image scores (B,), final maps (B, S, S) numpy) as the official evaluation scores them."""
    with torch.no_grad():
        cls, maps = detect_forward(clip, checkpoint, images, calib=calib, rcs=rcs, srr=srr)
        maps = F.interpolate(maps, size=images.shape[-2:], mode="bilinear", align_corners=False).numpy()
    sigma = 2.0 if (rcs or srr) else 4.0
    return cls.clamp(0.0, 1.0), np.stack([gaussian_filter(m, sigma=sigma) for m in maps])[:, 0]


# ---------------------------------------------------------------------- training loss (main)
def focal_loss(inputs, targets, gamma=4):
    inputs, targets = inputs.float(), targets.float()
    ce = F.binary_cross_entropy(inputs, targets, reduction="none")
    p_t = inputs * targets + (1 - inputs) * (1 - targets)
    return (ce * ((1 - p_t) ** gamma)).mean()


def patch_alignment_loss(img_tokens, gts):
    gts = gts.reshape(img_tokens[0].size(0), -1)
    new_gts = copy.copy(gts)  # shares storage with gts: the rewrite below reaches the caller's tensor
    if len(new_gts[new_gts == 0]) == 0:
        return 0
    new_gts[new_gts == 0] = -1
    b, l = new_gts.size()
    mask = torch.matmul(new_gts.reshape(b, l, 1), new_gts.reshape(b, 1, l))
    total = 0
    for t in img_tokens:
        t = F.normalize(t[:, 1:, :], dim=-1)
        sim = t @ t.permute(0, 2, 1)
        sim = sim[mask == -1].mean() - sim[mask == 1].mean()
        total = total + (sim if sim > 0 else 0)
    return total / len(img_tokens)


def training_loss(clip, checkpoint, images, masks, labels):
    """The official loss for one batch (checkpoint tensors may require grad); masks (B, S, S)."""
    cls, pmap, _, tokens, _ = detect_forward_seg(clip, checkpoint, images)
    gts = F.interpolate(masks.float()[:, None], size=pmap.shape[-2:], mode="bilinear")
    gts[gts < 0.5] = 0
    gts[gts > 0.5] = 1
    return focal_loss(cls, labels) + (focal_loss(pmap, gts) + F.l1_loss(pmap, gts)) \
        + patch_alignment_loss(tokens, gts)
